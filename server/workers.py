"""More ingest processes on one machine: ``workers: N`` runs the server's ingest in N processes.

Why processes: a Python server stores frames under one GIL. Measured on 2 cores, one server
process spends ~700 us of CPU per stored frame and keeps the machine only ~63% busy; threads
cannot use the rest. gRPC's own advice for CPU-bound Python servers is several processes that
share the listening port (``SO_REUSEPORT``: the kernel spreads *connections* over them, so one
device's stream stays in one process), and MQTT 5 shared subscriptions already spread messages
over every bridge client in the group, whichever process it lives in.

The main process (worker 0) owns what must exist once: the bundled MongoDB, the FiftyOne App,
the release announcer. It starts workers 1..N-1 after its own ingest is serving; each worker
runs the same ingest core, gRPC services (ingest and registry) and MQTT bridge clients on the
same port and stores, with its own:

- MQTT client ids (``<client_id_prefix>-w<i>-<n>``): persistent sessions stay per process and
  stable across restarts with the same ``workers``;
- heartbeat database (``heartbeats-w<i>.sqlite3`` beside ``heartbeats.sqlite3``): each process keeps the
  devices that reported to it;
- metrics, on a loopback port of its own that the main process reads at every scrape of
  ``metrics.port``, which serves the sum (``server.metrics.SummedCollector``).

Every store is safe for several writers: media names are created with ``O_EXCL`` (a resend that
lands in another process replaces a leftover atomically), and the inbox's unique index on the
frame id stores a frame once whichever process inserts it. An acknowledgement still means
durable in the process that sends it, so a crash of any process loses nothing acknowledged.

Lifetime: a worker watches its pipe to the main process. A stop message, or the pipe closing
because the main process died (even ``kill -9``), makes it stop its transports and drain what it
holds, as the main process does on SIGTERM. A worker that dies on its own is started again by
the main process. SIGINT is ignored in workers (a terminal's Ctrl-C
reaches the whole process group; the main process decides).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from server.config import ServerConfig

logger = logging.getLogger(__name__)

#: How long the main process waits for a worker to be serving (imports, FiftyOne, the database).
START_TIMEOUT_S = 120.0
#: Pause before starting a worker that exited on its own again; it doubles, up to the maximum,
#: while restarts keep failing (no tight crash loop), and is back to the first after a success.
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
_STOP = "stop"


class WorkerStartError(RuntimeError):
    """An ingest worker did not start; the message carries its own error."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a started worker reports back."""

    index: int
    pid: int
    grpc_port: int
    metrics_port: int | None


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop


def worker_main(
    config: ServerConfig, index: int, grpc_port: int, db_uri: str, log_level: int, conn: Connection
) -> None:
    """Entry point of worker ``index`` (a spawned process): serve until told to stop or orphaned."""
    from edgeloop.logs import setup_logging
    from server.app import Server

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    setup_logging(logging.getLevelName(log_level))
    server = Server(config, worker_index=index, grpc_port=grpc_port, db_uri=db_uri)
    try:
        server.start()
    except BaseException as err:  # report any failure, then exit: the main process decides
        server.stop()
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(
        (
            "ready",
            WorkerInfo(index, multiprocessing.current_process().pid or 0, server.grpc_port or 0, server.metrics_port),
        )
    )
    try:
        while True:
            try:
                if conn.recv() == _STOP:
                    break
            except EOFError:
                logger.warning("ingest worker %d: the main server process is gone; stopping", index)
                break
    except _Stop:
        logger.info("ingest worker %d: SIGTERM; stopping", index)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain short
        server.stop()


class WorkerPool:
    """Workers 1..N-1 of a server whose main process is already serving on ``grpc_port``.

    A worker that exits on its own (a crash, the OOM killer) is started again after a pause
    (``RESTART_DELAY_S``, longer while restarts fail). The others and the main process serve
    meanwhile; devices whose connection it held reconnect to the processes still listening.
    """

    def __init__(self, config: ServerConfig, *, grpc_port: int, db_uri: str) -> None:
        self.config = config
        self.grpc_port = grpc_port
        self.db_uri = db_uri
        # spawn, not fork: the main process holds threads (gRPC, paho, pymongo) that fork would
        # copy in whatever state they were in.
        self._ctx = multiprocessing.get_context("spawn")
        self._level = logging.getLogger().getEffectiveLevel()
        self._lock = threading.Lock()  # guards _slots and _info
        self._slots: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
        self._info: dict[int, WorkerInfo] = {}
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def workers(self) -> list[WorkerInfo]:
        """The workers serving now."""
        with self._lock:
            return [self._info[i] for i in sorted(self._info)]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> WorkerPool:
        """Start every worker and wait until each serves.

        Raises:
            WorkerStartError: a worker failed or timed out; the ones started are stopped again.
        """
        try:
            for index in range(1, self.config.workers):
                self._launch(index)
            for index in range(1, self.config.workers):
                self._await_ready(index, timeout_s)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="ingest-workers", daemon=True)
        self._monitor.start()
        return self

    def _launch(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.config, index, self.grpc_port, self.db_uri, self._level, theirs),
            name=f"edgeloop-ingest-{index}",
            daemon=False,  # a daemon process may not start children; workers stop via the pipe
        )
        proc.start()
        theirs.close()  # only the worker holds its end: our death closes the pipe for it
        with self._lock:
            self._slots[index] = (proc, ours)

    def _await_ready(self, index: int, timeout_s: float) -> None:
        proc, conn = self._slots[index]
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if self._stopping.is_set():
                raise WorkerStartError(f"ingest worker {index}: stopped while starting")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"ingest worker {index} did not start within {timeout_s:.0f} s")
        try:
            kind, value = conn.recv()
        except EOFError:
            proc.join(5)
            raise WorkerStartError(f"ingest worker {index} exited (code {proc.exitcode})") from None
        if kind != "ready":
            raise WorkerStartError(f"ingest worker {index} could not start: {value}")
        with self._lock:
            self._info[index] = value
        logger.info(
            "ingest worker %d (pid %d) serving gRPC on port %d, metrics on %s",
            value.index,
            value.pid,
            value.grpc_port,
            value.metrics_port,
        )

    def _watch(self) -> None:
        """Start a worker again when it exits on its own."""
        delay = RESTART_DELAY_S
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {proc.sentinel: index for index, (proc, _conn) in self._slots.items()}
            for sentinel in wait(list(sentinels), timeout=1.0):
                index = sentinels[sentinel]  # type: ignore[index]
                if self._stopping.is_set():
                    return
                with self._lock:
                    proc, conn = self._slots.pop(index)
                    self._info.pop(index, None)
                proc.join()
                conn.close()
                logger.error(
                    "ingest worker %d (pid %s) exited with code %s; starting it again in %.0f s",
                    index,
                    proc.pid,
                    proc.exitcode,
                    delay,
                )
                if self._stopping.wait(delay):
                    return
                self._launch(index)
                try:
                    self._await_ready(index, START_TIMEOUT_S)
                    delay = RESTART_DELAY_S
                except WorkerStartError as err:
                    logger.error("%s; trying again", err)
                    delay = min(delay * 2, MAX_RESTART_DELAY_S)
                    proc, _conn = self._slots[index]
                    if proc.is_alive():
                        proc.kill()  # its exit brings it back to the top of this loop

    def stop(self) -> None:
        """Ask every worker to stop, wait for each to drain, and kill one that does not."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join()
        wait_s = self.config.grpc.grace_s + self.config.mqtt.drain_timeout_s + 30
        with self._lock:
            slots = list(self._slots.items())
            self._slots.clear()
            self._info.clear()
        for _index, (_proc, conn) in slots:
            with contextlib.suppress(OSError):  # already gone
                conn.send(_STOP)
        for index, (proc, conn) in slots:
            proc.join(wait_s)
            if proc.is_alive():
                logger.error("ingest worker %d did not stop within %.0f s; killing it", index, wait_s)
                proc.kill()
                proc.join()
            conn.close()

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
- heartbeat file (``heartbeats-w<i>.json`` beside ``heartbeats.json``): each process keeps the
  devices that reported to it;
- metrics port (``metrics.port + i``, or a free one when that is 0).

Every store is safe for several writers: media names are created with ``O_EXCL`` (a resend that
lands in another process replaces a leftover atomically), and the inbox's unique index on the
frame id stores a frame once whichever process inserts it. An acknowledgement still means
durable in the process that sends it, so a crash of any process loses nothing acknowledged.

Lifetime: a worker watches its pipe to the main process. A stop message, or the pipe closing
because the main process died (even ``kill -9``), makes it stop its transports and drain what it
holds, as the main process does on SIGTERM. SIGINT is ignored in workers (a terminal's Ctrl-C
reaches the whole process group; the main process decides).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from server.config import ServerConfig

logger = logging.getLogger(__name__)

#: How long the main process waits for a worker to be serving (imports, FiftyOne, the database).
START_TIMEOUT_S = 120.0
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
    from edgeloop.cli import setup_logging
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
        server.stop()


class WorkerPool:
    """Workers 1..N-1 of a server whose main process is already serving on ``grpc_port``."""

    def __init__(self, config: ServerConfig, *, grpc_port: int, db_uri: str) -> None:
        self.config = config
        self.grpc_port = grpc_port
        self.db_uri = db_uri
        self.workers: list[WorkerInfo] = []
        self._procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def start(self, timeout_s: float = START_TIMEOUT_S) -> WorkerPool:
        """Start every worker and wait until each serves.

        Raises:
            WorkerStartError: a worker failed or timed out; the ones started are stopped again.
        """
        # spawn, not fork: the main process holds threads (gRPC, paho, pymongo) that fork would
        # copy in whatever state they were in.
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        try:
            for index in range(1, self.config.workers):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main,
                    args=(self.config, index, self.grpc_port, self.db_uri, level, theirs),
                    name=f"edgeloop-ingest-{index}",
                    daemon=False,  # a daemon process may not start children; workers stop via the pipe
                )
                proc.start()
                theirs.close()  # only the worker holds its end: our death closes the pipe for it
                self._procs.append((proc, ours))
            for proc, conn in self._procs:
                if not conn.poll(timeout_s):
                    raise WorkerStartError(f"ingest worker {proc.name} did not start within {timeout_s:.0f} s")
                try:
                    kind, value = conn.recv()
                except EOFError:
                    raise WorkerStartError(f"ingest worker {proc.name} exited (code {proc.exitcode})") from None
                if kind != "ready":
                    raise WorkerStartError(f"ingest worker {proc.name} could not start: {value}")
                self.workers.append(value)
                logger.info(
                    "ingest worker %d (pid %d) serving gRPC on port %d, metrics on %s",
                    value.index,
                    value.pid,
                    value.grpc_port,
                    value.metrics_port,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask every worker to stop, wait for each to drain, and kill one that does not."""
        wait = timeout_s if timeout_s is not None else self.config.grpc.grace_s + self.config.mqtt.drain_timeout_s + 30
        for _proc, conn in self._procs:
            with contextlib.suppress(OSError):  # already gone
                conn.send(_STOP)
        for proc, conn in self._procs:
            proc.join(wait)
            if proc.is_alive():
                logger.error("ingest worker %s did not stop within %.0f s; killing it", proc.name, wait)
                proc.kill()
                proc.join()
            conn.close()
        self._procs.clear()

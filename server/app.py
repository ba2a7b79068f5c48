"""Wiring of the running server: database, stores, ingest core, gRPC (ingest + registry), MQTT
bridge, release announcer, FiftyOne App and metrics -- started in dependency order, stopped in
reverse.

The order matters for durability: the database and stores are up before any transport accepts a
frame, and on shutdown the transports stop taking frames first, then the core drains what it
holds, and the database is left running (it is shared with the App and other processes).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from typing import TYPE_CHECKING

import grpc

from server.config import ServerConfig
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.store.inbox import Inbox
    from server.workers import WorkerPool

logger = logging.getLogger(__name__)

#: Allocations at least this large are served by ``mmap`` and given back to the system when freed.
LARGE_ALLOCATION_BYTES = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _mtls_identity(context: grpc.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def return_large_allocations() -> None:
    """Make glibc serve allocations of :data:`LARGE_ALLOCATION_BYTES` and more from ``mmap``.

    Why: decoding an image to check it allocates tens of megabytes, in whichever gRPC or MQTT
    thread received the frame. By default glibc raises its mmap threshold after the first such
    block is freed (up to 32 MB), so later ones come from that thread's own heap arena, which
    keeps the memory after ``free``: measured, ten threads each decoding one 16 MP WebP left the
    process 311 MB larger for good, although the decode budget let one decode run at a time.
    With a fixed threshold each block goes back at ``free`` (the same ten decodes: +68 MB peak,
    +7 MB after), so the decode budget bounds the memory, not only the decodes. Frames of
    ordinary size (~100 KB) are not affected. Does nothing where glibc's ``mallopt`` is missing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.info("no mallopt in this C library; large allocations are left to its defaults")
        return
    if not mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES):
        logger.warning("mallopt(M_MMAP_THRESHOLD) failed; decoded images may stay in the process's heap")


def freeze_startup_heap(inbox: Inbox | None = None) -> None:
    """Load what the server will use, then exclude everything alive from garbage collection.

    FiftyOne, pymongo and gRPC leave ~250,000 objects that live as long as the process. Every
    full collection walks all of them, and ingest allocates fast enough to trigger one every
    few hundred frames: measured, collections cost ~70 us per stored frame (~15% of the
    server's CPU). ``gc.freeze()`` moves the start-up heap out of the collector's sight;
    objects made later are collected as usual.
    """
    if inbox is not None:
        try:
            _ = inbox.dataset  # imports FiftyOne and opens the dataset now
        except Exception as err:  # the database may be down; the ingest core retries on its own
            logger.warning("could not open the inbox at start-up (%s); it is opened on first use", err)
    gc.collect()
    gc.freeze()


class Server:
    """One edgeloop server. ``start()`` returns once every part is serving; ``stop()`` undoes it.

    With ``config.workers`` above 1 the server runs ingest in that many processes
    (:mod:`server.workers`): this object is worker 0 and starts the others. A worker (index > 0)
    is built by :mod:`server.workers` with the main process's ``grpc_port`` and ``db_uri``, and
    runs only the ingest side: no database management, App or release announcer.
    """

    def __init__(
        self, config: ServerConfig, *, worker_index: int = 0, grpc_port: int | None = None, db_uri: str | None = None
    ) -> None:
        self.config = config
        self.worker_index = worker_index
        self.metrics = ServerMetrics()
        self.grpc_port: int | None = grpc_port
        self.metrics_port: int | None = None
        self.db_uri: str | None = db_uri
        self.worker_pool: WorkerPool | None = None  # workers 1..N-1 (main process, workers > 1)
        self._stopped = threading.Event()
        self._parts: list[tuple[str, object]] = []  # (name, stop callable), in start order

    def start(self) -> Server:
        cfg = self.config
        # Heavy imports here, not at module level: `edgeloop server --help` stays fast.
        from server.devices import DeviceRegistry
        from server.ingest.core import IngestCore
        from server.ingest.grpc_service import IngestServicer, build_grpc_server
        from server.ingest.heartbeats import HeartbeatStore
        from server.ingest.mqtt_bridge import MqttBridge
        from server.registry.grpc_service import add_to_server as add_registry
        from server.registry.store import ModelRegistry
        from server.store.media import LocalMediaStore
        from server.store.mongo import MongoManager, configure_fiftyone

        main = self.worker_index == 0
        return_large_allocations()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if main:
            self.db_uri = MongoManager(cfg.mongo).ensure_running()
        if self.db_uri is None:
            raise ValueError("an ingest worker needs the main process's database URI (db_uri)")
        configure_fiftyone(self.db_uri, cfg.fiftyone_dir)
        from server.store.inbox import Inbox

        # The registry applies require_registered itself, and also refuses revoked certificates.
        self.devices = DeviceRegistry(cfg.devices)
        directory = self.devices
        self.media = LocalMediaStore(cfg.media.root)
        self.inbox = Inbox(cfg.inbox)
        self.core = IngestCore(
            self.media,
            self.inbox,
            directory,
            cfg.validation,
            self.metrics,
            batch_size=cfg.inbox.batch_size,
            max_wait_s=cfg.inbox.max_wait_s,
        )
        self._parts.append(("ingest core", self.core.close))
        self.heartbeats = HeartbeatStore.in_dir(cfg.data_dir, worker=self.worker_index)
        self._parts.append(("heartbeats", self.heartbeats.close))
        self.registry = ModelRegistry(cfg.registry)

        def authorize(context: grpc.ServicerContext, device_id: str) -> None:
            # With mutual TLS a device may only look up (and download) its own releases.
            identity = _mtls_identity(context)
            if identity is not None and identity != device_id:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"certificate of {identity} cannot ask for {device_id}"
                )

        ingest = IngestServicer.from_config(
            self.core, cfg.grpc, metrics=self.metrics, heartbeats=self.heartbeats, devices=directory
        )
        grpc_config = cfg.grpc if self.grpc_port is None else cfg.grpc.model_copy(update={"port": self.grpc_port})
        server, self.grpc_port = build_grpc_server(
            grpc_config,
            [ingest.add_to_server, lambda s: add_registry(s, self.registry, authorize=authorize)],
            reuse_port=cfg.workers > 1,
        )
        server.start()
        self._parts.append(("gRPC", lambda: server.stop(cfg.grpc.grace_s).wait()))
        logger.info("gRPC ingest and registry on %s:%d", cfg.grpc.host, self.grpc_port)

        if cfg.mqtt.enabled:
            mqtt_config = cfg.mqtt
            if not main:  # sessions are per client id: each process needs its own, stable ones
                prefix = f"{cfg.mqtt.client_id_prefix}-w{self.worker_index}"
                mqtt_config = cfg.mqtt.model_copy(update={"client_id_prefix": prefix})
            self.bridge = MqttBridge(
                mqtt_config, self.core, metrics=self.metrics, heartbeats=self.heartbeats, devices=directory
            ).start()
            self._parts.append(("MQTT bridge", self.bridge.stop))
        if cfg.announce is not None and main:
            from server.registry.announce import ReleaseAnnouncer

            # follow() connects on its own and retries while the broker is down: no start() here,
            # so a broker outage never keeps the server (and gRPC ingest) from starting.
            announcer = ReleaseAnnouncer(cfg.announce)
            announcer.follow(self.registry)
            self._parts.append(("release announcer", announcer.close))
        if cfg.metrics.enabled:
            from prometheus_client import CollectorRegistry, start_http_server

            if not main:  # read by the main process only (SummedCollector): loopback, any port
                http, _thread = start_http_server(0, addr="127.0.0.1", registry=self.metrics.registry)
            else:
                registry = self.metrics.registry
                if cfg.workers > 1:
                    from server.metrics import SummedCollector

                    registry = CollectorRegistry(auto_describe=False)
                    registry.register(SummedCollector(self.metrics.registry, self._worker_metrics_ports))
                http, _thread = start_http_server(cfg.metrics.port, addr=cfg.metrics.host, registry=registry)
            self.metrics_port = http.server_port
            self._parts.append(("metrics", http.shutdown))
        if cfg.app.enabled and main:
            from server.curation_app import CurationApp

            _ = self.inbox.dataset  # created now, so the App lists it from the first page on
            self.app = CurationApp(self.db_uri, cfg.fiftyone_dir, cfg.app.host, cfg.app.port)
            self._parts.append(("FiftyOne App", self.app.stop))
            self.app.wait_ready()
        if main and cfg.workers > 1:
            from server.workers import WorkerPool

            # Last: workers share this process's port and database, so both must be up first.
            self.worker_pool = WorkerPool(cfg, grpc_port=self.grpc_port, db_uri=self.db_uri).start()
            self._parts.append(("ingest workers", self.worker_pool.stop))
        freeze_startup_heap(self.inbox)
        return self

    def _worker_metrics_ports(self) -> list[int]:
        pool = self.worker_pool
        return [w.metrics_port for w in pool.workers if w.metrics_port] if pool is not None else []

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        self._stopped.wait()

    def stop(self) -> None:
        """Stop every part in reverse start order; errors are logged, the rest still stop."""
        for name, stop in reversed(self._parts):
            try:
                stop()  # type: ignore[operator]
            except Exception:
                logger.exception("stopping the %s failed", name)
        self._parts.clear()
        self._stopped.set()

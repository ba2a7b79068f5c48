"""Wiring of the running server: database, stores, ingest core, gRPC (ingest + registry), MQTT
bridge, release announcer, FiftyOne App and metrics -- started in dependency order, stopped in
reverse.

The order matters for durability: the database and stores are up before any transport accepts a
frame, and on shutdown the transports stop taking frames first, then the core drains what it
holds, and the database is left running (it is shared with the App and other processes).
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import TYPE_CHECKING

import grpc

from server.config import ServerConfig
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.store.inbox import Inbox

logger = logging.getLogger(__name__)


def _mtls_identity(context: grpc.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


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
    """One edgeloop server. ``start()`` returns once every part is serving; ``stop()`` undoes it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.db_uri: str | None = None
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

        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        mongo = MongoManager(cfg.mongo)
        self.db_uri = mongo.ensure_running()
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
        self.heartbeats = HeartbeatStore.in_dir(cfg.data_dir)
        self._parts.append(("heartbeats", self.heartbeats.close))
        self.registry = ModelRegistry(cfg.registry)

        def authorize(context: grpc.ServicerContext, device_id: str) -> None:
            # With mutual TLS a device may only look up (and download) its own releases.
            identity = _mtls_identity(context)
            if identity is not None and identity != device_id:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"certificate of {identity} cannot ask for {device_id}"
                )

        ingest = IngestServicer(
            self.core,
            metrics=self.metrics,
            heartbeats=self.heartbeats,
            devices=directory,
            max_outstanding_per_stream=cfg.grpc.max_outstanding_per_stream,
        )
        server, self.grpc_port = build_grpc_server(
            cfg.grpc, [ingest.add_to_server, lambda s: add_registry(s, self.registry, authorize=authorize)]
        )
        server.start()
        self._parts.append(("gRPC", lambda: server.stop(cfg.grpc.grace_s).wait()))
        logger.info("gRPC ingest and registry on %s:%d", cfg.grpc.host, self.grpc_port)

        if cfg.mqtt.enabled:
            self.bridge = MqttBridge(
                cfg.mqtt, self.core, metrics=self.metrics, heartbeats=self.heartbeats, devices=directory
            ).start()
            self._parts.append(("MQTT bridge", self.bridge.stop))
        if cfg.announce is not None:
            from server.registry.announce import ReleaseAnnouncer

            # follow() connects on its own and retries while the broker is down: no start() here,
            # so a broker outage never keeps the server (and gRPC ingest) from starting.
            announcer = ReleaseAnnouncer(cfg.announce)
            announcer.follow(self.registry)
            self._parts.append(("release announcer", announcer.close))
        if cfg.metrics.enabled:
            from prometheus_client import start_http_server

            http, _thread = start_http_server(cfg.metrics.port, addr=cfg.metrics.host, registry=self.metrics.registry)
            self.metrics_port = http.server_port
            self._parts.append(("metrics", http.shutdown))
        if cfg.app.enabled:
            from server.curation_app import CurationApp

            _ = self.inbox.dataset  # created now, so the App lists it from the first page on
            self.app = CurationApp(self.db_uri, cfg.fiftyone_dir, cfg.app.host, cfg.app.port)
            self._parts.append(("FiftyOne App", self.app.stop))
            self.app.wait_ready()
        freeze_startup_heap(self.inbox)
        return self

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

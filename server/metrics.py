"""The server's Prometheus metrics, on their own registry (several servers can share a test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServerMetrics:
    """Counters of the ingest path. Transports count what they receive and refuse; the core
    counts what it stores."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_received = Counter(
            "edgeloop_server_frames_received", "Frame messages received.", ["transport"], registry=r
        )
        self.frames_stored = Counter("edgeloop_server_frames_stored", "Frames stored durably.", registry=r)
        self.frames_duplicate = Counter(
            "edgeloop_server_frames_duplicate", "Redelivered frames that were already stored.", registry=r
        )
        self.frames_rejected = Counter(
            "edgeloop_server_frames_rejected", "Frames refused by validation.", ["transport", "reason"], registry=r
        )
        self.frames_retry = Counter(
            "edgeloop_server_frames_retry", "Frames answered RETRY (storage unavailable).", registry=r
        )
        self.batch_seconds = Histogram(
            "edgeloop_server_store_batch_seconds",
            "Time to store one batch durably (media fsync + database insert).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.queue_depth = Gauge("edgeloop_server_store_queue", "Frames waiting to be stored.", registry=r)
        self.heartbeats = Counter("edgeloop_server_heartbeats", "Device heartbeats received.", registry=r)

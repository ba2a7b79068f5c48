"""The agent's Prometheus metrics, on their own registry so several agents can share a process.

Exposed at ``http://<metrics.host>:<metrics.port>/metrics`` when enabled (loopback by default).
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from pydantic import Field

from edgeloop.config_base import StrictModel

logger = logging.getLogger(__name__)

#: Counters the agent reports, also sent in heartbeats (name -> help).
COUNTERS = {
    "frames_read": "Frames read from the source.",
    "frames_scored": "Frames run through the detector and the uncertainty triggers.",
    "frames_kept": "Frames whose uncertainty made them worth keeping.",
    "frames_deduplicated": "Kept frames dropped as near-duplicates of a recent one.",
    "frames_enqueued": "Frames durably written to the outbox.",
    "frames_uploaded": "Frames the receiver acknowledged as stored.",
    "bytes_uploaded": "Bytes of frames (serialized uploads) the receiver acknowledged as stored.",
    "frames_evicted": "Frames evicted from a full outbox (lowest score first).",
    "frames_dropped_disk_full": (
        "Kept frames not enqueued because the outbox's volume had no room (outbox.min_free_bytes, or a full disk)."
    ),
    "frames_rejected": "Frames the receiver refused for good (kept in the dead-letter table).",
    "upload_errors": "Upload attempts that failed (receiver unreachable, timeouts).",
}


#: Counters also kept per camera (source) and sent in heartbeats as ``<name>/<source>``: a camera's
#: keep share is ``frames_kept/<source> / frames_scored/<source>``.
PER_SOURCE = ("frames_scored", "frames_kept")
#: Cameras counted apart, the first seen; a heartbeat holds at most 64 counters.
MAX_SOURCES = 16


class MetricsConfig(StrictModel):
    enabled: bool = Field(default=True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field(default="127.0.0.1", description="Address to bind (loopback unless you mean otherwise).")
    port: int = Field(default=9108, ge=0, le=65535, description="Port; 0 picks a free one.")


class AgentMetrics:
    """Counters, gauges and the inference-latency histogram of one agent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = {
            name: Counter(f"edgeloop_agent_{name}", text, registry=self.registry) for name, text in COUNTERS.items()
        }
        self._values = dict.fromkeys(COUNTERS, 0)
        self._per_source: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self.inference_seconds = Histogram(
            "edgeloop_agent_inference_seconds",
            "Detector latency per frame (pre-processing, inference, post-processing).",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=self.registry,
        )
        self.fps = Gauge("edgeloop_agent_fps", "Frames processed per second (last window).", registry=self.registry)
        self.outbox_depth = Gauge(
            "edgeloop_agent_outbox_depth", "Frames waiting in the outbox.", registry=self.registry
        )
        self.outbox_bytes = Gauge("edgeloop_agent_outbox_bytes", "Bytes waiting in the outbox.", registry=self.registry)
        self.outbox_free_bytes = Gauge(
            "edgeloop_agent_outbox_free_bytes", "Free bytes on the outbox's volume.", registry=self.registry
        )
        self._fps_window_start = time.monotonic()
        self._fps_window_count = 0
        self.server_port: int | None = None
        self._server = None

    def inc(self, name: str, n: int = 1) -> None:
        if n <= 0:
            return
        self._counters[name].inc(n)
        with self._lock:
            self._values[name] += n

    def inc_source(self, name: str, source: str, n: int = 1) -> None:
        """Count ``name`` (one of :data:`PER_SOURCE`) for camera ``source`` too."""
        source = source[:100]  # the server takes counter names of up to 128 characters
        with self._lock:
            counts = self._per_source.get(source)
            if counts is None:
                if len(self._per_source) >= MAX_SOURCES:
                    return
                counts = self._per_source[source] = dict.fromkeys(PER_SOURCE, 0)
            counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def source_snapshot(self) -> dict[str, int]:
        """Per-camera counters as ``<name>/<source>`` (what heartbeats carry beside :meth:`snapshot`)."""
        with self._lock:
            return {f"{name}/{src}": v for src, counts in self._per_source.items() for name, v in counts.items()}

    def frame_done(self) -> None:
        """Count one processed frame towards the FPS gauge (updated about once a second)."""
        self._fps_window_count += 1
        now = time.monotonic()
        elapsed = now - self._fps_window_start
        if elapsed >= 1.0:
            self.fps.set(self._fps_window_count / elapsed)
            self._fps_window_start, self._fps_window_count = now, 0

    def serve(self, config: MetricsConfig) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        server, _thread = start_http_server(config.port, addr=config.host, registry=self.registry)
        self._server = server
        self.server_port = server.server_port
        logger.info("metrics at http://%s:%d/metrics", config.host, self.server_port)
        return self.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

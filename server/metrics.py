"""The server's Prometheus metrics, on their own registry (several servers can share a test process)."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)


class ServerMetrics:
    """Counters of the ingest path. Transports count what they receive and refuse; the core
    counts what it stores, and the frames it refuses after validation (``id_not_available``,
    ``storage_refused``)."""

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
        self.heartbeats_rejected = Counter(
            "edgeloop_server_heartbeats_rejected",
            "Heartbeats refused (over a size or field limit).",
            ["transport", "reason"],
            registry=r,
        )


class SummedCollector:
    """This process's metrics summed with its ingest workers' (``workers`` > 1), so one scrape of
    ``metrics.port`` covers the whole server.

    Each worker serves its own registry on a loopback port; every collect reads them (text format)
    and adds sample by sample (name and labels): every metric here is a counter, a histogram or
    the queue gauge, all of which add up across processes. Creation times (``*_created``) are the
    main process's own: it starts before its workers.
    A worker that does not answer (restarting) is left out of that scrape and logged; its counts
    come back with it, minus what it had counted before it died (Prometheus reads that as a
    counter reset).
    """

    def __init__(self, own: CollectorRegistry, worker_ports: Callable[[], list[int]], timeout_s: float = 2.0) -> None:
        self.own = own
        self.worker_ports = worker_ports
        self.timeout_s = timeout_s

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

        def add(family: Metric, *, own: bool) -> None:
            # The text format carries creation times as families of their own ("<name>_created").
            samples = [s for s in family.samples if own or not s.name.endswith("_created")]
            if not samples:
                return
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            acc = values[family.name]
            for s in samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = acc.get(key, 0.0) + s.value

        for family in self.own.collect():
            add(family, own=True)
        for port in self.worker_ports():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=self.timeout_s) as reply:
                    text = reply.read().decode()
            except OSError as err:
                logger.warning("metrics of the ingest worker on port %d left out of this scrape: %s", port, err)
                continue
            for family in text_string_to_metric_families(text):
                add(family, own=False)
        for name, family in families.items():
            for (sample, labels), value in values[name].items():
                family.add_sample(sample, dict(labels), value)
            yield family

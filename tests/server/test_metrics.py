"""``SummedCollector``: the main process's metrics endpoint shows its own and its ingest workers'
metrics added up, sample by sample, each sample once."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics, SummedCollector
from tests.fixtures.server_process import free_port


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_histograms_and_gauges_add_up_and_creation_times_are_the_main_process_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    main, worker = ServerMetrics(), ServerMetrics()
    main.frames_stored.inc(3)
    worker.frames_stored.inc(4)
    main.frames_rejected.labels("grpc", "bad_image").inc()
    worker.frames_rejected.labels("grpc", "bad_image").inc(2)
    worker.frames_rejected.labels("mqtt", "malformed").inc()
    main.batch_seconds.observe(0.004)
    worker.batch_seconds.observe(0.2)
    main.queue_depth.set(5)
    worker.queue_depth.set(7)
    http, _thread = start_http_server(0, addr="127.0.0.1", registry=worker.registry)
    dead = free_port()  # a worker that is restarting: nobody listens
    try:
        summed = CollectorRegistry(auto_describe=False)
        summed.register(SummedCollector(main.registry, lambda: [http.server_port, dead], timeout_s=1.0))
        with caplog.at_level(logging.WARNING):
            got = _samples(summed)
            text = generate_latest(summed).decode()
    finally:
        http.shutdown()

    own, theirs = _samples(main.registry), _samples(worker.registry)
    assert text.count("\nedgeloop_server_frames_stored_created ") == 1, "a sample appears twice"
    assert got[("edgeloop_server_frames_stored_total", ())] == 7
    bad_image = (("reason", "bad_image"), ("transport", "grpc"))
    assert got[("edgeloop_server_frames_rejected_total", bad_image)] == 3
    assert got[("edgeloop_server_frames_rejected_total", (("reason", "malformed"), ("transport", "mqtt")))] == 1
    assert got[("edgeloop_server_store_batch_seconds_count", ())] == 2
    assert got[("edgeloop_server_store_batch_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("edgeloop_server_store_batch_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("edgeloop_server_store_queue", ())] == 12
    created = ("edgeloop_server_frames_stored_created", ())
    assert got[created] == own[created] != theirs[created]
    assert any(str(dead) in r.getMessage() for r in caplog.records), "the silent worker is not logged"

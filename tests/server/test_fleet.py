"""The fleet view: every device's latest heartbeat, merged over the main process's file and each
ingest worker's (``workers`` > 1 spreads a device's heartbeats over processes)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgeloop.domain import DeviceStatus
from edgeloop.tables import format_table
from server.cli import app
from server.ingest.heartbeats import (
    FILE_NAME,
    MAX_COUNTERS,
    MAX_ERROR_CHARS,
    MAX_HEARTBEAT_BYTES,
    HeartbeatRejected,
    HeartbeatStore,
    bound_status,
    check_heartbeat_size,
    read_fleet,
)


def _status(device: str, t: float, model: str, **kw) -> DeviceStatus:
    return DeviceStatus(device_id=device, time=t, model_version=model, outbox_depth=3, outbox_bytes=2_000_000, **kw)


def _write(data_dir: Path, worker: int, *statuses: tuple[DeviceStatus, float]) -> None:
    store = HeartbeatStore.in_dir(data_dir, worker=worker)
    for status, received in statuses:
        store.record(status, received_at=received)
    store.close()


def test_the_newest_status_by_device_clock_wins_across_worker_files(tmp_path: Path) -> None:
    # cam-a: worker 1 holds the newer status (v2), the main file the older (v1) though it arrived later.
    _write(tmp_path, 0, (_status("cam-a", 100.0, "v1"), 5000.0), (_status("cam-b", 50.0, "v1"), 4000.0))
    _write(tmp_path, 1, (_status("cam-a", 200.0, "v2"), 4500.0))
    _write(tmp_path, 3, (_status("cam-c", 10.0, "v3", last_error="load failed"), 4200.0))
    (tmp_path / "heartbeats-w2.json").write_text("{not json")  # unreadable: skipped, not fatal
    (tmp_path / "heartbeats-w4.sqlite3").write_text("not a database")

    fleet = read_fleet(tmp_path)

    assert {d: e.status.model_version for d, e in fleet.items()} == {"cam-a": "v2", "cam-b": "v1", "cam-c": "v3"}
    assert fleet["cam-a"].received_at == 4500.0
    assert fleet["cam-c"].status.last_error == "load failed"
    assert read_fleet(tmp_path / "nothing-here") == {}


def test_edgeloop_server_fleet_prints_a_table_and_json(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    now = time.time()
    _write(data_dir, 0, (_status("cam-a", 100.0, "v1", channel="stable"), now - 30))
    _write(data_dir, 1, (_status("cam-a", 200.0, "v2", channel="canary"), now - 5))
    conf = tmp_path / "server.yaml"
    conf.write_text(yaml.safe_dump({"data_dir": str(data_dir)}))

    table = CliRunner().invoke(app, ["fleet", "--config", str(conf)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["DEVICE", "MODEL", "CHANNEL", "OUTBOX", "LAST", "SEEN", "LAST", "ERROR"]
    assert lines[1].split()[:4] == ["cam-a", "v2", "canary", "3"]
    assert "s ago" in lines[1]

    as_json = CliRunner().invoke(app, ["fleet", "--config", str(conf), "--json"])
    doc = json.loads(as_json.output)
    assert doc["cam-a"]["model_version"] == "v2" and doc["cam-a"]["channel"] == "canary"

    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "none")}))
    assert "No heartbeats" in CliRunner().invoke(app, ["fleet", "--config", str(empty)]).output


def test_format_table_pads_columns_to_their_widest_cell() -> None:
    assert format_table(["A", "LONG"], [["xyz", "1"], ["b", "22"]]).splitlines() == ["A    LONG", "xyz  1", "b    22"]
    assert format_table(["A", "B"], []) == "A  B"


# -- the heartbeat database (issue 9: bounded, and never rewritten whole) ------------------------------


def test_a_heartbeat_updates_its_row_and_does_not_rewrite_the_fleet(tmp_path: Path) -> None:
    """2,000 devices (~2 MB): one more heartbeat writes a few pages to the write-ahead log, not
    the whole file as the JSON file of earlier versions was."""
    import sqlite3

    store = HeartbeatStore.in_dir(tmp_path, flush_interval_s=0.0)
    for i in range(2000):
        store.record(_status(f"cam-{i}", 1.0, "v1", last_error="e" * 1000))
    path = tmp_path / FILE_NAME
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = path.with_name(path.name + "-wal")
    assert path.stat().st_size > 2_000_000 and wal.stat().st_size == 0
    store.record(_status("cam-7", 2.0, "v2"))
    assert 0 < wal.stat().st_size < 40_000
    store.close()
    assert read_fleet(tmp_path)["cam-7"].status.model_version == "v2" and len(read_fleet(tmp_path)) == 2000


def test_heartbeats_over_a_limit_are_refused_naming_the_field_and_long_errors_cut() -> None:
    with pytest.raises(HeartbeatRejected, match="limit of 65,536"):
        check_heartbeat_size(MAX_HEARTBEAT_BYTES + 1)
    check_heartbeat_size(MAX_HEARTBEAT_BYTES)
    for bad, field in [
        (_status("cam-a", 1.0, "v" * 129), "model_version"),
        (_status("cam-a", 1.0, "v", channel="c" * 200), "channel"),
        (_status("d" * 65, 1.0, "v"), "device_id"),
        (_status("cam-a", 1.0, "v", counters={f"c{i}": i for i in range(MAX_COUNTERS + 1)}), "counters holds 65"),
        (_status("cam-a", 1.0, "v", counters={"n" * 200: 1}), "counter name"),
    ]:
        with pytest.raises(HeartbeatRejected, match=field):
            bound_status(bad)
    cut = bound_status(_status("cam-a", 1.0, "v", last_error="boom: " + "x" * 100_000))
    assert len(cut.last_error) == MAX_ERROR_CHARS and cut.last_error.startswith("boom: x")
    assert cut.last_error.endswith("(100,006 characters, cut by the server)")
    fine = _status("cam-a", 1.0, "v", counters={"frames_read": 3}, last_error="short")
    assert bound_status(fine) is fine


def test_an_earlier_versions_json_file_is_read_and_taken_over(tmp_path: Path) -> None:
    legacy = {
        "version": 1,
        "devices": {
            "cam-old": {"status": dataclasses.asdict(_status("cam-old", 5.0, "v0")), "received_at": 100.0},
        },
    }
    (tmp_path / "heartbeats.json").write_text(json.dumps(legacy))
    (tmp_path / "heartbeats-w1.json").write_text(json.dumps(legacy).replace("cam-old", "cam-w1"))
    assert set(read_fleet(tmp_path)) == {"cam-old", "cam-w1"}  # read as they are
    store = HeartbeatStore.in_dir(tmp_path)  # the server starting after the upgrade
    store.record(_status("cam-new", 1.0, "v1"))
    store.close()
    assert not (tmp_path / "heartbeats.json").exists()
    assert set(read_fleet(tmp_path)) == {"cam-old", "cam-w1", "cam-new"}
    assert read_fleet(tmp_path)["cam-old"].received_at == 100.0

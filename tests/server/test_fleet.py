"""The fleet view: every device's latest heartbeat, merged over the main process's file and each
ingest worker's (``workers`` > 1 spreads a device's heartbeats over processes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from edgeloop.domain import DeviceStatus
from edgeloop.tables import format_table
from server.cli import app
from server.ingest.heartbeats import HeartbeatStore, read_fleet


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

"""The committed generated code in edgeloop/v1 is exactly what scripts/gen_proto.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_changes_nothing(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the wire code")
    written = _load_generator().generate(tmp_path)
    assert written, "protoc produced nothing"
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in (ROOT / "edgeloop" / "v1").glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_proto.py and commit"


def test_roundtrip_through_the_wire():
    import numpy as np

    from edgeloop.convert import parse_frame, serialize_frame
    from edgeloop.domain import Detection, FrameRecord, Reason

    rec = FrameRecord(
        frame_id="f" * 32,
        device_id="cam-1",
        capture_time=1_700_000_000.25,
        sequence=7,
        model_version="v3",
        image=b"\xff\xd8jpeg",
        media_type="image/jpeg",
        width=640,
        height=480,
        detections=[Detection((1.0, 2.0, 30.0, 40.0), 2, "car", 0.5, np.array([0.1, 0.2, 0.5], np.float32))],
        uncertainty=0.75,
        reasons=[Reason("confidence_band", 0.9, "car 0.50 in [0.25, 0.60)")],
        source_id="gate",
        class_names=["person", "bicycle", "car"],
        embedding=np.array([0.6, 0.0, -0.8], np.float32),
        source_name="gate#41",
    )
    wire = serialize_frame(rec)
    back = parse_frame(wire)
    assert serialize_frame(back) == wire  # deterministic and lossless
    assert back.capture_time == pytest.approx(rec.capture_time, abs=1e-6)
    assert back.detections[0].class_scores.tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert back.reasons[0].trigger == "confidence_band" and back.class_names == rec.class_names
    assert back.source_name == "gate#41"
    assert back.embedding.dtype == np.float32 and back.embedding.tolist() == pytest.approx([0.6, 0.0, -0.8])
    rec.embedding = None
    assert parse_frame(serialize_frame(rec)).embedding is None  # no embedding stays no embedding

"""Release test, end to end: the real agent following the real registry.

"Publishing v2 makes the agent download, verify, swap without a gap in processed frames, and report
v2; a tampered artifact, a bad signature and a model that fails to load are each refused while the
running model keeps serving; rollback returns the fleet to v1."

Everything is real: ``Agent(config)`` with the ONNX Runtime detector reads looping COCO images, keeps
every frame (random trigger at rate 1.0) and uploads it over gRPC to a receiver that also records its
heartbeats; the agent's updater polls a real gRPC registry server (the real ``RegistryServicer`` over a
``ModelRegistry`` in ``tmp_path``) and trusts only that registry's public key. v1 is the shared int8
YOLOv8n export (input 640), v2 a fresh float export of the same weights at imgsz 320 made by ultralytics
here: both name the 80 COCO classes, and they give different detections, so a frame's detections show
which model really ran it.

The agent installs v1 with one synchronous update round before it reads its first frame, so every
frame it processes is labelled with a release version.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.app import Agent
from edge_agent.config import AgentConfig
from edgeloop.convert import parse_frame
from edgeloop.v1 import frames_pb2
from server.registry.store import ModelRegistry, RegistryConfig
from tests.edge_agent.test_updater import make_hollow_model, serve_registry, sha256, write_public_key
from tests.fakes.receivers import GrpcTestReceiver
from tests.fixtures.ultralytics_offline import export_coco_onnx
from tests.server.test_registry import with_metadata

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
INT8_ONNX = SHARED / "models" / "yolov8n_int8.onnx"
COCO_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
COCO_TRAIN = SHARED / "data" / "coco8" / "images" / "train"
DEVICE = "cam-release"
WAIT_S = 30.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (INT8_ONNX.is_file() and COCO_PT.is_file() and COCO_TRAIN.is_dir()),
        reason="shared models / coco8 not found beside the checkout",
    ),
]


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, ultralytics_offline) -> Path:
    """A fresh ultralytics ONNX export (float, imgsz 320) of the shared COCO checkpoint, made offline."""
    return export_coco_onnx(ultralytics_offline, tmp_path_factory.mktemp("export"), imgsz=320)


def _agent_config(tmp_path: Path, receiver: GrpcTestReceiver, registry_target: str, public_key: Path) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "source": {"uri": str(COCO_TRAIN), "loop": True, "max_fps": 15},
            # The factory model; the first update round replaces it with v1 before any frame is read.
            "detector": {"type": "onnxruntime", "model": str(INT8_ONNX), "intra_op_threads": 1},
            "triggers": {"random": {"enabled": True, "rate": 1.0}},  # every frame enqueued, with its version
            "budget": {
                "frames_per_minute": 1e6,
                "bytes_per_minute": 1e12,
                "max_side": 320,
                "dedup": {"enabled": False},
            },
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            "transport": {"type": "grpc", "target": receiver.target, "deadline_s": 5, "connect_timeout_s": 0.5},
            "upload": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "idle_poll_s": 0.02, "heartbeat_s": 0.2},
            "metrics": {"enabled": False},
            "update": {
                "enabled": True,
                "channel": "stable",
                "target": registry_target,
                "public_key": str(public_key),
                "models_dir": str(tmp_path / "models"),
                "poll_s": 0.2,
                "timeout_s": 10,
                "smoke_frames": 2,
            },
            "seed": 0,
        }
    )


def test_release_swaps_without_a_gap_refuses_bad_releases_and_rolls_back(tmp_path: Path, float_export: Path):
    registry = ModelRegistry(RegistryConfig(root=tmp_path / "registry"))
    v1 = registry.publish(INT8_ONNX, dataset_version="coco")
    registry.promote("v1", "stable")
    public_key = write_public_key(registry, tmp_path / "release.pub.pem")
    models_dir = tmp_path / "models"

    with GrpcTestReceiver() as receiver, serve_registry(registry) as (target, servicer):
        agent = Agent(_agent_config(tmp_path, receiver, target, public_key))
        failures: list[BaseException] = []
        counters: dict[str, int] = {}

        def run() -> None:
            try:
                counters.update(agent.run())
            except BaseException as err:  # re-raised by the test
                failures.append(err)

        def heartbeat(predicate: Callable[[frames_pb2.DeviceStatus], bool], what: str) -> frames_pb2.DeviceStatus:
            """The first heartbeat (from now on) that satisfies ``predicate``."""
            deadline = time.monotonic() + WAIT_S
            seen = len(receiver.heartbeats)
            while True:
                assert not failures, f"the agent stopped: {failures[0]!r}"
                beats = receiver.heartbeats[seen:]
                for hb in beats:
                    if predicate(hb):
                        return hb
                seen += len(beats)
                if time.monotonic() > deadline:
                    last = receiver.heartbeats[-1] if receiver.heartbeats else None
                    raise AssertionError(f"no heartbeat with {what} within {WAIT_S} s; last one: {last}")
                time.sleep(0.05)

        def keeps_processing(after: frames_pb2.DeviceStatus, version: str) -> None:
            """Frames keep flowing through ``version`` after the heartbeat ``after``."""
            read = after.counters["frames_read"]
            heartbeat(
                lambda hb: hb.counters["frames_read"] >= read + 3 and hb.model_version == version,
                f"frames_read > {read + 2} on {version}",
            )

        runner = threading.Thread(target=run, name="agent", daemon=True)
        try:
            # 1. v1: installed by one update round before the first frame, then reported.
            assert agent.updater.check_once(), agent.updater.last_error
            assert agent.model_version == "v1"
            runner.start()
            hb = heartbeat(lambda hb: hb.counters["frames_read"] > 0, "frames read")
            assert (hb.model_version, hb.last_error, hb.channel) == ("v1", "", "stable")

            # 2. v2 published and promoted: downloaded, verified, swapped while frames flow, reported.
            registry.publish(float_export, parent="v1", dataset_version="coco")
            registry.promote("v2", "stable")
            hb = heartbeat(lambda hb: hb.model_version == "v2", "model_version v2")
            assert hb.last_error == ""
            assert sha256(models_dir / "v2" / "model.onnx") == registry.get("v2").artifact_sha256
            assert os.readlink(models_dir / "current") == "v2"
            keeps_processing(hb, "v2")

            # 3a. A tampered artifact: the registry's stored bytes no longer match the signed sha256.
            registry.publish(with_metadata(INT8_ONNX, tmp_path / "v3.onnx", edgeloop_test="3"), parent="v2")
            stored = registry.artifact_path("v3")
            os.chmod(stored, 0o644)
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
            registry.promote("v3", "stable")
            hb = heartbeat(lambda hb: "refused model v3" in hb.last_error, "v3 refused")
            assert "artifact check failed" in hb.last_error and registry.get("v3").artifact_sha256 in hb.last_error
            assert hb.model_version == "v2"
            keeps_processing(hb, "v2")
            assert not (models_dir / "v3").exists()
            registry.rollback("stable")  # the operator backs v3 out: the error clears
            heartbeat(lambda hb: hb.last_error == "" and hb.model_version == "v2", "v3's error cleared")

            # 3b. A bad signature: the registry address answers with releases signed by another key.
            impostor = ModelRegistry(RegistryConfig(root=tmp_path / "impostor"))
            impostor.publish(with_metadata(INT8_ONNX, tmp_path / "forged.onnx", edgeloop_test="forged"), version="v4")
            impostor.promote("v4", "stable")
            downloads_before = list(servicer.downloads)
            servicer.registry = impostor
            hb = heartbeat(lambda hb: "refused model v4" in hb.last_error, "forged v4 refused")
            assert "signature check failed" in hb.last_error and hb.model_version == "v2"
            keeps_processing(hb, "v2")
            assert servicer.downloads == downloads_before  # refused before a single byte was fetched
            assert not (models_dir / "v4").exists()
            servicer.registry = registry
            heartbeat(lambda hb: hb.last_error == "" and hb.model_version == "v2", "the forgery's error cleared")

            # 3c. A model that fails to load: properly published and signed (the genuine v4: the forged
            # release of that name did not get it blocked), but ONNX Runtime cannot build it.
            assert registry.publish(make_hollow_model(tmp_path), parent="v2").version == "v4"
            registry.verify("v4")
            registry.promote("v4", "stable")
            hb = heartbeat(lambda hb: "refused model v4" in hb.last_error, "hollow v4 refused")
            assert "model does not load" in hb.last_error and hb.model_version == "v2"
            keeps_processing(hb, "v2")
            assert ("v4", 0) in servicer.downloads[len(downloads_before) :]
            assert not (models_dir / "v4").exists()
            registry.rollback("stable")
            heartbeat(lambda hb: hb.last_error == "" and hb.model_version == "v2", "v4's error cleared")

            # 4. Rollback to v1: swapped back from disk, no download.
            assert registry.rollback("stable") == "v1"
            hb = heartbeat(lambda hb: hb.model_version == "v1", "model_version v1 after the rollback")
            assert hb.last_error == ""
            keeps_processing(hb, "v1")
            assert [d for d in servicer.downloads if d[0] == "v1"] == [("v1", 0)]  # only the first install
            assert os.readlink(models_dir / "current") == "v1"
            assert {p.name for p in models_dir.iterdir() if not p.is_symlink()} == {"v1", "v2"}  # keep_versions=2
        finally:
            agent.stop()
            if runner.ident is not None:
                runner.join(WAIT_S)
            stopped = not runner.is_alive()
            # What the agent had not sent when it stopped goes out now, so the receiver has every frame.
            drained = stopped and agent.uploader is not None and agent.uploader.drain(WAIT_S)
            agent.close()
        assert stopped and not failures, failures
        assert drained, "the outbox did not drain"

    # Every frame read was processed and enqueued: nothing dropped around the swaps.
    n = counters["frames_read"]
    assert n == counters["frames_scored"] == counters["frames_enqueued"] and n >= 15
    records = sorted((parse_frame(p) for p in receiver.frames.values()), key=lambda r: r.sequence)
    assert len(records) == n
    first = records[0].sequence
    assert [r.sequence for r in records] == list(range(first, first + n))  # contiguous across every swap
    # v1, then v2 exactly once and never back, until the rollback returned to v1.
    assert [version for version, _ in itertools.groupby(r.model_version for r in records)] == ["v1", "v2", "v1"]
    assert all(r.class_names == v1.class_names for r in records)

    # Each frame's detections came from the model its record names: per looped image, every frame a
    # version processed has the same detections, and v1's differ from v2's.
    images = len(list(COCO_TRAIN.glob("*.jpg")))
    found: dict[tuple[str, int], set[tuple]] = defaultdict(set)
    for r in records:
        found[(r.model_version, (r.sequence - first) % images)].add(
            tuple(sorted((d.class_id, round(d.confidence, 3)) for d in r.detections))
        )
    assert all(len(variants) == 1 for variants in found.values()), found
    same_image = [i for i in range(images) if ("v1", i) in found and ("v2", i) in found]
    assert same_image and any(found[("v1", i)] != found[("v2", i)] for i in same_image)

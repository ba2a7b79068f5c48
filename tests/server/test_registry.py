"""The model registry: publishing, signatures, targeting, durability, gRPC, MQTT announcements, CLI.

Publishes a real YOLOv8n detect export (../shared/models/yolov8n_int8.onnx, copied by the registry
into each test's own root). Distinct versions are made by appending one ONNX ``metadata_props``
entry to a copy: protobuf merges appended fields, so the result is still a valid model whose
bytes (and sha256) differ. gRPC and MQTT tests run a real server and a real Mosquitto on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edgeloop import topics
from edgeloop.releases import ReleaseVerificationError, load_public_key, verify_artifact, verify_release
from edgeloop.v1 import models_pb2, models_pb2_grpc
from server.registry.announce import AnnounceError, ReleaseAnnouncer, ReleaseAnnouncerConfig, release_messages
from server.registry.cli import models_app
from server.registry.grpc_service import CHUNK_BYTES, add_to_server
from server.registry.store import (
    InvalidArtifactError,
    ModelRegistry,
    NoRollbackError,
    RegistryConfig,
    RegistryError,
    RegistryStateError,
    UnknownChannelError,
    UnknownVersionError,
)
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.ultralytics_offline import export_coco_onnx

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
INT8_ONNX = SHARED / "models" / "yolov8n_int8.onnx"
COCO_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
P = topics.DEFAULT_PREFIX
WAIT_S = 5.0


# -- models to publish --------------------------------------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def with_metadata(src: Path, dst: Path, **props: str) -> Path:
    """Copy of ``src`` with extra ONNX metadata entries (later entries win on the reader's side)."""
    extra = b"".join(_field(14, _field(1, k.encode()) + _field(2, v.encode())) for k, v in props.items())
    dst.write_bytes(src.read_bytes() + extra)
    return dst


@pytest.fixture(scope="session")
def yolo_onnx() -> Path:
    if not INT8_ONNX.is_file():
        pytest.skip(f"{INT8_ONNX} (shared real model) not found")
    return INT8_ONNX


@pytest.fixture(scope="session")
def variants(yolo_onnx: Path, tmp_path_factory) -> list[Path]:
    """Three valid, distinct YOLO detect exports (different bytes, same network)."""
    work = tmp_path_factory.mktemp("variants")
    return [with_metadata(yolo_onnx, work / f"model-{i}.onnx", edgeloop_test=str(i)) for i in range(3)]


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(RegistryConfig(root=tmp_path / "registry"))


@pytest.fixture
def three(registry: ModelRegistry, variants: list[Path]) -> ModelRegistry:
    """A registry with v1 <- v2 <- v3 published."""
    registry.publish(variants[0], dataset_version="ds-1", metrics={"mAP50": 0.5})
    registry.publish(variants[1], parent="v1", dataset_version="ds-2", metrics={"mAP50": 0.6})
    registry.publish(variants[2], parent="v2", dataset_version="ds-3", metrics={"mAP50": 0.7})
    return registry


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- publishing ---------------------------------------------------------------------------------------


def test_publish_records_lineage_facts_and_a_verifiable_signature(registry: ModelRegistry, variants: list[Path]):
    v1 = registry.publish(
        variants[0],
        dataset_version="ds-2026-11-01",
        params={"epochs": 50, "imgsz": 640, "optimizer": "SGD"},
        metrics={"mAP50": 0.612, "mAP50-95": 0.41},
        notes="first fine-tune",
    )
    v2 = registry.publish(variants[1], parent="v1", dataset_version="ds-2026-11-08", metrics={"mAP50": 0.65})
    assert (v1.version, v2.version) == ("v1", "v2")
    assert v2.parent_version == "v1" and v2.dataset_version == "ds-2026-11-08"
    assert v1.params == {"epochs": 50, "imgsz": 640, "optimizer": "SGD"} and v1.notes == "first fine-tune"
    assert v1.metrics == {"mAP50": 0.612, "mAP50-95": 0.41}
    assert abs(v1.created - time.time()) < 60 and isinstance(v1.created, int)
    assert v1.source == "model-0.onnx"

    data = variants[0].read_bytes()
    assert v1.artifact_sha256 == sha256(data) and v1.artifact_size == len(data)
    assert v2.artifact_sha256 == sha256(variants[1].read_bytes()) != v1.artifact_sha256
    assert len(v1.class_names) == 80 and v1.class_names[:3] == ["person", "bicycle", "car"]
    assert v1.imgsz == 640

    stored = registry.artifact_path("v1")
    assert stored == registry.root / "artifacts" / "v1" / "model.onnx"
    assert stored.read_bytes() == data
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444  # published artifacts never change
    assert not any((registry.root / "artifacts" / ".incoming").iterdir())

    key_path = registry.root / "release_key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    public = load_public_key(registry.root / "release_key.pub.pem")
    assert v1.key_id.startswith("ed25519:")
    for version in ("v1", "v2"):
        release = registry.release(version)
        verify_release(release, public)
        verify_artifact(registry.artifact_path(version), release)
        registry.verify(version)
    assert registry.release("v2").parent_version == "v1"
    assert registry.release("v1").metrics["mAP50"] == pytest.approx(0.612)

    # A second registry object on the same root (another process) sees the same facts.
    again = ModelRegistry(RegistryConfig(root=registry.root))
    assert [v.model_dump() for v in again.list()] == [v.model_dump() for v in registry.list()]


def test_version_names_parents_and_values_are_checked(registry: ModelRegistry, variants: list[Path]):
    assert registry.publish(variants[0], version="exp-7").version == "exp-7"
    assert registry.publish(variants[1]).version == "v1"
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish(variants[1], version="exp-7")
    with pytest.raises(UnknownVersionError, match="unknown parent version 'v9'"):
        registry.publish(variants[1], parent="v9")
    with pytest.raises(RegistryError, match="invalid version"):
        registry.publish(variants[1], version="../escape")
    with pytest.raises(RegistryError, match="metric 'mAP' must be finite"):
        registry.publish(variants[1], metrics={"mAP": float("nan")})
    with pytest.raises(RegistryError, match="JSON values"):
        registry.publish(variants[1], params={"when": object()})
    assert registry.publish(variants[2], version="v7").version == "v7"
    assert registry.publish(variants[2]).version == "v8"  # automatic names continue after the highest
    with pytest.raises(UnknownVersionError):
        registry.get("v2")
    assert [v.version for v in registry.list()] == ["exp-7", "v1", "v7", "v8"]
    assert sorted(p.name for p in (registry.root / "artifacts").iterdir()) == [".incoming", "exp-7", "v1", "v7", "v8"]


def test_publish_refuses_files_that_are_not_yolo_detect_exports(
    registry: ModelRegistry, yolo_onnx: Path, tmp_path: Path
):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"\x08\x07")  # a ModelProto with ir_version 7 and nothing else: no metadata
    segment = with_metadata(yolo_onnx, tmp_path / "seg.onnx", task="segment")
    no_names = with_metadata(yolo_onnx, tmp_path / "nonames.onnx", names="{}")
    no_size = with_metadata(yolo_onnx, tmp_path / "nosize.onnx", imgsz="oops")
    cases = [
        (text, "not an ONNX model|no ONNX metadata"),
        (empty, "no ONNX metadata"),
        (bare, "no ONNX metadata, so it is not an ultralytics YOLO export"),
        (segment, "is a YOLO 'segment' model; the registry takes detect models"),
        (no_names, "no class names"),
        (no_size, r"no input size \(imgsz\)"),
        (tmp_path / "missing.onnx", "is not a file"),
        (tmp_path, "is not a file"),
    ]
    for path, message in cases:
        with pytest.raises(InvalidArtifactError, match=message):
            registry.publish(path)
    assert registry.list() == []
    assert not (registry.root / "artifacts").exists() or not any((registry.root / "artifacts" / ".incoming").iterdir())
    assert [p.name for p in (registry.root / "artifacts").iterdir()] == [".incoming"]


@pytest.mark.slow
def test_publish_reads_class_names_and_imgsz_of_a_fresh_export(
    registry: ModelRegistry, tmp_path_factory, ultralytics_offline
):
    """A real ultralytics export at imgsz 64 from the shared checkpoint: the registry reads 64, not 640."""
    onnx_path = export_coco_onnx(ultralytics_offline, tmp_path_factory.mktemp("export"), imgsz=64)
    v = registry.publish(onnx_path, params={"imgsz": 64})
    assert v.imgsz == 64 and len(v.class_names) == 80 and v.class_names[0] == "person"
    registry.verify(v.version)


# -- signatures ---------------------------------------------------------------------------------------


def test_signature_fails_after_tampering_or_with_another_key(three: ModelRegistry, tmp_path: Path):
    public = three.public_key()
    good = three.release("v2")
    verify_release(good, public)
    tampers = {
        "version": lambda r: setattr(r, "version", "v3"),
        "sha256": lambda r: setattr(r, "artifact_sha256", three.get("v3").artifact_sha256),
        "size": lambda r: setattr(r, "artifact_size", r.artifact_size + 1),
        "class_names": lambda r: r.class_names.__setitem__(0, "not-a-person"),
        "imgsz": lambda r: setattr(r, "imgsz", 320),
        "parent": lambda r: setattr(r, "parent_version", "v3"),
        "dataset": lambda r: setattr(r, "dataset_version", "ds-9"),
        "created": lambda r: setattr(r.created, "seconds", r.created.seconds - 1),
    }
    for name, tamper in tampers.items():
        release = models_pb2.ModelRelease()
        release.CopyFrom(good)
        tamper(release)
        with pytest.raises(ReleaseVerificationError, match="does not match"):
            verify_release(release, public)
        # ...while the unsigned fields may change freely (a promotion rewrites the channel).
        release.CopyFrom(good)
        release.channel, release.artifact_uri = "canary", f"https://mirror/{name}"
        release.metrics["recall"] = 0.5
        verify_release(release, public)
    other = ModelRegistry(RegistryConfig(root=tmp_path / "other"))
    with pytest.raises(ReleaseVerificationError, match="another key"):
        verify_release(good, other.signing_key().public_key())


def test_promoting_canary_to_stable_keeps_the_signature_valid(three: ModelRegistry):
    public = three.public_key()
    three.promote("v3", "canary")
    canary = three.resolve("cam-1", "canary")
    assert canary is not None and canary.channel == "canary"
    verify_release(canary, public)
    three.promote("v3", "stable")
    stable = three.resolve("cam-1", "stable")
    assert stable is not None and stable.channel == "stable" and stable.version == "v3"
    verify_release(stable, public)
    assert stable.signature == canary.signature
    stable.channel = "canary"
    assert stable.SerializeToString(deterministic=True) == canary.SerializeToString(deterministic=True)


# -- targeting ----------------------------------------------------------------------------------------


def test_pin_beats_group_beats_channel(three: ModelRegistry):
    assert three.resolve("cam-1", "stable") is None
    three.promote("v1", "stable")
    three.promote("v2", "stable", group="lobby")
    three.assign("cam-1", "lobby")
    assert three.resolve("cam-2", "stable").version == "v1"  # no group: the channel's
    assert three.resolve("cam-1", "stable").version == "v2"  # its group's
    assert three.resolve("cam-2", "stable", group="lobby").version == "v2"  # a group given by the caller
    assert three.resolve("cam-1", "canary") is None  # the group has nothing on canary, nor has canary
    three.promote("v1", "canary")
    assert three.resolve("cam-1", "canary").version == "v1"  # falls back to the channel's release

    three.pin("cam-1", "v3")
    pinned = three.resolve("cam-1", "stable")
    assert pinned.version == "v3" and pinned.channel == ""  # a pin is the device's, not a channel's
    assert three.resolve("cam-1", "canary").version == "v3"
    verify_release(pinned, three.public_key())
    assert three.unpin("cam-1") == "v3"
    assert three.unpin("cam-1") is None
    assert three.resolve("cam-1", "stable").version == "v2"
    assert three.assign("cam-1", None) == "lobby"
    assert three.resolve("cam-1", "stable").version == "v1"
    assert three.resolve("cam-1", "").channel == "stable"  # no channel: the first configured one


def test_unknown_channels_versions_and_bad_names_are_refused(three: ModelRegistry):
    with pytest.raises(UnknownChannelError, match="unknown channel 'beta'; configured: stable, canary"):
        three.promote("v1", "beta")
    with pytest.raises(UnknownChannelError):
        three.resolve("cam-1", "beta")
    with pytest.raises(UnknownVersionError, match="unknown version 'v9'"):
        three.promote("v9", "stable")
    with pytest.raises(UnknownVersionError):
        three.pin("cam-1", "v9")
    with pytest.raises(RegistryError, match="invalid device id"):
        three.pin("cam/1", "v1")
    with pytest.raises(RegistryError, match="invalid group"):
        three.promote("v1", "stable", group="lobby/#")
    with pytest.raises(ValueError, match="invalid channel"):
        RegistryConfig(root=Path("x"), channels=["stable", "a+b"])


def test_rollback_returns_the_previous_version_and_errors_when_none(three: ModelRegistry):
    with pytest.raises(NoRollbackError, match="channel stable has no earlier release to roll back to"):
        three.rollback("stable")
    assert three.promote("v1", "stable") is None
    with pytest.raises(NoRollbackError, match=r"current: v1"):
        three.rollback("stable")
    assert three.promote("v2", "stable") == "v1"
    assert three.promote("v2", "stable") == "v2"  # promoting the current one again changes nothing
    assert three.promote("v3", "stable") == "v2"
    assert three.rollback("stable") == "v2"
    assert three.current("stable") == "v2"
    assert three.rollback("stable") == "v1"  # two steps back, not back and forth
    with pytest.raises(NoRollbackError):
        three.rollback("stable")
    assert three.current("stable") == "v1"

    three.promote("v2", "canary", group="lobby")
    three.promote("v3", "canary", group="lobby")
    assert three.rollback("canary", group="lobby") == "v2"
    assert three.current("canary") is None  # the channel's own target is untouched
    with pytest.raises(NoRollbackError, match="group lobby on channel canary"):
        three.rollback("canary", group="lobby")


def test_keep_versions_prunes_only_unreferenced_artifacts(tmp_path: Path, variants: list[Path]):
    registry = ModelRegistry(RegistryConfig(root=tmp_path / "registry", keep_versions=2))
    registry.publish(variants[0])
    registry.promote("v1", "stable")
    registry.publish(variants[1], parent="v1")
    registry.publish(variants[2], parent="v2")  # v1 is served: kept
    assert not any(v.pruned for v in registry.list())
    registry.promote("v2", "stable")  # v1 is now in stable's rollback history: still kept
    registry.publish(variants[0], version="v4", parent="v3")
    assert [v.version for v in registry.list() if v.pruned] == []
    registry.pin("cam-1", "v3")
    registry.publish(variants[1], version="v5")
    # v1 (history), v2 (current), v3 (pin) stay; nothing unreferenced is older than the two newest.
    assert [v.version for v in registry.list() if v.pruned] == []

    other = ModelRegistry(RegistryConfig(root=tmp_path / "other", keep_versions=1))
    for i, path in enumerate(variants):
        other.publish(path, parent=f"v{i}" if i else None)
    assert [(v.version, v.pruned) for v in other.list()] == [("v1", True), ("v2", True), ("v3", False)]
    assert not (other.root / "artifacts" / "v1").exists()
    assert other.get("v2").parent_version == "v1"  # facts and lineage stay
    with pytest.raises(UnknownVersionError, match="pruned"):
        other.artifact_path("v1")
    with pytest.raises(UnknownVersionError, match="pruned"):
        other.promote("v1", "stable")


# -- durability and sharing ---------------------------------------------------------------------------


def test_registry_json_survives_a_crash_mid_write(three: ModelRegistry, monkeypatch: pytest.MonkeyPatch):
    three.promote("v1", "stable")
    before = three.state_path.read_bytes()

    # A writer died after writing part of its temporary file: readers never look at it.
    stale = three.root / ".registry.json.4242.deadbeef.tmp"
    stale.write_text('{"format": 1, "versions": {"v1": {"vers')
    fresh = ModelRegistry(RegistryConfig(root=three.root))
    assert fresh.current("stable") == "v1" and len(fresh.list()) == 3

    # A crash between writing the temporary file and renaming it: the old file stays whole.
    def crash(src, dst):
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        fresh.promote("v2", "stable")
    monkeypatch.undo()
    assert three.state_path.read_bytes() == before
    assert ModelRegistry(RegistryConfig(root=three.root)).current("stable") == "v1"

    # The next writer clears the leftovers and writes normally.
    fresh.promote("v2", "stable")
    assert not stale.exists()
    assert sorted(p.name for p in three.root.iterdir() if p.name.endswith(".tmp")) == []
    assert three.current("stable") == "v2"  # the first object re-reads the changed file


def test_a_change_within_one_file_system_clock_tick_is_still_seen(three: ModelRegistry, monkeypatch):
    """Two writes in one mtime tick may leave inode, size and mtime equal: a recent file is re-read anyway."""
    three.promote("v1", "stable")
    server_side = ModelRegistry(RegistryConfig(root=three.root))
    assert server_side.current("stable") == "v1"
    frozen = server_side._stamp()
    monkeypatch.setattr(server_side, "_stamp", lambda: frozen)  # the worst case: stat shows no change at all
    three.promote("v2", "stable")  # same size of registry.json, too
    assert server_side.current("stable") == "v2"


def test_a_corrupt_registry_json_is_a_clear_error(registry: ModelRegistry):
    registry.root.mkdir(parents=True)
    registry.state_path.write_text("{not json")
    with pytest.raises(RegistryStateError, match="cannot read"):
        registry.list()
    registry.state_path.write_text(json.dumps({"format": 99}))
    with pytest.raises(RegistryStateError, match="format 99"):
        registry.list()


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a separate process, as an operator would run it beside a server."""
    code = "import sys; from server.registry.cli import models_app; models_app(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--registry", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_cli_and_server_processes_see_each_others_changes(three: ModelRegistry):
    server_side = three  # stands for the running server: one object, kept for the whole test
    server_side.promote("v1", "stable")
    revision = server_side.revision()
    done = _cli(three.root, "promote", "v2", "--channel", "stable")
    assert done.returncode == 0, done.stderr
    assert server_side.revision() == revision + 1
    assert server_side.current("stable") == "v2"
    assert server_side.resolve("cam-1", "stable").version == "v2"

    server_side.pin("cam-7", "v3")
    listed = _cli(three.root, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["pins"] == {"cam-7": "v3"}


def test_concurrent_writers_lose_no_change(three: ModelRegistry):
    script = (
        "import sys; from server.registry.store import ModelRegistry, RegistryConfig\n"
        "r = ModelRegistry(RegistryConfig(root=sys.argv[1]))\n"
        "for i in range(15): r.pin(f'{sys.argv[2]}-{i}', 'v1')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(three.root), name], cwd=Path(__file__).resolve().parents[2])
        for name in ("a", "b")
    ]
    for i in range(15):
        three.pin(f"main-{i}", "v2")
    assert [p.wait(120) for p in procs] == [0, 0]
    pins = three.state().pins
    assert len(pins) == 45
    assert {d for d in pins if d.startswith("a-")} == {f"a-{i}" for i in range(15)}


# -- gRPC ---------------------------------------------------------------------------------------------


@pytest.fixture
def grpc_registry(three: ModelRegistry) -> Iterator[tuple[models_pb2_grpc.RegistryStub, ModelRegistry]]:
    def authorize(context: grpc.ServicerContext, device_id: str) -> None:
        if device_id == "intruder":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not your device")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_to_server(server, three, authorize=authorize)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield models_pb2_grpc.RegistryStub(channel), three
    finally:
        channel.close()
        server.stop(None).wait(5)


def _download(stub, version: str, offset: int = 0, device_id: str = "cam-1") -> tuple[bytes, list]:
    chunks = list(
        stub.DownloadArtifact(models_pb2.ArtifactRequest(version=version, offset=offset, device_id=device_id))
    )
    return b"".join(c.data for c in chunks), chunks


def test_grpc_get_release_resolves_like_the_registry(grpc_registry):
    stub, registry = grpc_registry
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRelease(models_pb2.ReleaseQuery(device_id="cam-1", channel="stable"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no release for device cam-1 on channel stable" in err.value.details()

    registry.promote("v1", "stable")
    registry.promote("v2", "stable", group="lobby")
    registry.assign("cam-2", "lobby")
    registry.pin("cam-3", "v3")
    got = {
        d: stub.GetRelease(models_pb2.ReleaseQuery(device_id=d, channel="stable")) for d in ("cam-1", "cam-2", "cam-3")
    }
    assert {d: r.version for d, r in got.items()} == {"cam-1": "v1", "cam-2": "v2", "cam-3": "v3"}
    for release in got.values():
        verify_release(release, registry.public_key())
    assert got["cam-1"] == registry.resolve("cam-1", "stable")
    assert stub.GetRelease(models_pb2.ReleaseQuery(device_id="cam-1")).channel == "stable"

    for query, code in [
        (models_pb2.ReleaseQuery(device_id="cam-1", channel="beta"), grpc.StatusCode.INVALID_ARGUMENT),
        (models_pb2.ReleaseQuery(channel="stable"), grpc.StatusCode.INVALID_ARGUMENT),
        (models_pb2.ReleaseQuery(device_id="intruder", channel="stable"), grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetRelease(query)
        assert err.value.code() == code, query


def test_grpc_download_full_and_resumed_give_identical_bytes(grpc_registry):
    stub, registry = grpc_registry
    expected = registry.artifact_path("v2").read_bytes()
    full, chunks = _download(stub, "v2")
    assert sha256(full) == registry.get("v2").artifact_sha256
    assert len(chunks) == -(-len(expected) // CHUNK_BYTES)
    assert all(c.total_size == len(expected) for c in chunks)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(len(chunks))]

    # A download that broke off after three chunks continues from the bytes it has.
    stream = stub.DownloadArtifact(models_pb2.ArtifactRequest(version="v2", device_id="cam-1"))
    partial = b"".join(next(stream).data for _ in range(3))
    stream.cancel()
    rest, rest_chunks = _download(stub, "v2", offset=len(partial))
    assert rest_chunks[0].offset == len(partial)
    assert sha256(partial + rest) == sha256(full)

    odd = 300_001  # not on a chunk boundary
    rest, _ = _download(stub, "v2", offset=odd)
    assert sha256(full[:odd] + rest) == registry.get("v2").artifact_sha256
    assert _download(stub, "v2", offset=len(expected)) == (b"", [])


def test_grpc_download_errors(grpc_registry):
    stub, registry = grpc_registry
    size = registry.get("v1").artifact_size
    cases = [
        (models_pb2.ArtifactRequest(version="v1", offset=size + 1), grpc.StatusCode.OUT_OF_RANGE, "beyond"),
        (models_pb2.ArtifactRequest(version="v9"), grpc.StatusCode.NOT_FOUND, "unknown version"),
        (models_pb2.ArtifactRequest(version="v1", device_id="intruder"), grpc.StatusCode.PERMISSION_DENIED, "not your"),
    ]
    for request, code, detail in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DownloadArtifact(request))
        assert err.value.code() == code and detail in err.value.details()


# -- MQTT announcements -------------------------------------------------------------------------------


class Subscriber:
    """A device-like MQTT client that records every message on its topics (retained ones included)."""

    def __init__(self, broker: MosquittoBroker, *topic_filters: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subscribed = queue.Queue()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topic_filters])
        client.on_subscribe = lambda *_: self._subscribed.put(True)
        client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, bool(m.retain)))
        client.connect(broker.host, broker.port)
        client.loop_start()
        self._client = client
        self._subscribed.get(timeout=WAIT_S)

    def collect(self, quiet_s: float = 0.5) -> dict[str, bytes]:
        """Messages until none arrives for ``quiet_s``: ``topic -> last payload``."""
        out: dict[str, bytes] = {}
        while True:
            try:
                topic, payload, _ = self.messages.get(timeout=quiet_s)
            except queue.Empty:
                return out
            out[topic] = payload

    def wait_for(self, topic: str, predicate: Callable[[bytes], bool], timeout: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching message on {topic} within {timeout} s")
            try:
                got_topic, payload, _ = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if got_topic == topic and predicate(payload):
                return payload

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _release(payload: bytes) -> models_pb2.ModelRelease:
    return models_pb2.ModelRelease.FromString(payload)


def test_late_subscribers_get_the_retained_release_of_their_channel(
    three: ModelRegistry, mosquitto_factory: Callable[..., MosquittoBroker]
):
    broker = mosquitto_factory()
    three.promote("v1", "stable")
    three.promote("v2", "canary")
    three.promote("v3", "canary", group="lobby")
    three.pin("cam-9", "v3")
    with ReleaseAnnouncer(ReleaseAnnouncerConfig(host=broker.host, port=broker.port)) as announcer:
        sent = announcer.announce_all(three)
        assert sent == sorted(
            [
                topics.channel_release(P, "stable"),
                topics.channel_release(P, "canary"),
                topics.group_release(P, "lobby", "canary"),
                topics.device_release(P, "cam-9"),
            ]
        )
        assert announcer.announce_all(three) == []  # nothing changed, nothing sent
        assert len(announcer.announce_all(three, force=True)) == 4

    # Connected after the announcement, and after the announcer left.
    device = Subscriber(broker, topics.channel_release(P, "stable"), topics.device_release(P, "cam-1"))
    try:
        got = device.collect()
    finally:
        device.close()
    assert list(got) == [topics.channel_release(P, "stable")]
    release = _release(got[topics.channel_release(P, "stable")])
    assert release.version == "v1" and release.channel == "stable"
    verify_release(release, three.public_key())
    assert release == three.resolve("cam-1", "stable")

    everything = Subscriber(broker, f"{P}/releases/#")
    try:
        got = everything.collect()
    finally:
        everything.close()
    assert got == release_messages(three, P)
    assert _release(got[topics.group_release(P, "lobby", "canary")]).version == "v3"
    pinned = _release(got[topics.device_release(P, "cam-9")])
    assert pinned.version == "v3" and pinned.channel == ""


def test_unpin_clears_the_retained_device_message_even_across_restarts(
    three: ModelRegistry, mosquitto_factory: Callable[..., MosquittoBroker]
):
    broker = mosquitto_factory()
    device_topic = topics.device_release(P, "cam-9")
    config = ReleaseAnnouncerConfig(host=broker.host, port=broker.port)
    three.pin("cam-9", "v2")
    with ReleaseAnnouncer(config) as announcer:
        announcer.announce_all(three)
        live = Subscriber(broker, device_topic)
        try:
            assert _release(live.wait_for(device_topic, bool)).version == "v2"
            three.unpin("cam-9")
            assert announcer.announce_all(three) == [device_topic]
            assert live.wait_for(device_topic, lambda p: p == b"") == b""  # the empty retained payload
        finally:
            live.close()
    late = Subscriber(broker, device_topic)
    try:
        assert late.collect() == {}
    finally:
        late.close()

    # The broker held a stale pin while the server was down (e.g. the clear never reached it):
    # a freshly started announcer clears it, because the registry remembers the unpin.
    stale = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    stale.connect(broker.host, broker.port)
    stale.loop_start()
    stale.publish(device_topic, three.release("v1").SerializeToString(), qos=1, retain=True).wait_for_publish(WAIT_S)
    stale.disconnect()
    stale.loop_stop()
    with ReleaseAnnouncer(config) as restarted:
        assert device_topic in restarted.announce_all(three)
    late = Subscriber(broker, device_topic)
    try:
        assert late.collect() == {}
    finally:
        late.close()


def test_follow_announces_changes_made_by_another_process(
    three: ModelRegistry, mosquitto_factory: Callable[..., MosquittoBroker]
):
    broker = mosquitto_factory()
    stable_topic = topics.channel_release(P, "stable")
    three.promote("v1", "stable")
    device = Subscriber(broker, stable_topic)
    announcer = ReleaseAnnouncer(ReleaseAnnouncerConfig(host=broker.host, port=broker.port, poll_s=0.1))
    try:
        announcer.start()
        announcer.follow(three)
        assert _release(device.wait_for(stable_topic, bool)).version == "v1"
        done = _cli(three.root, "promote", "v3", "--channel", "stable")
        assert done.returncode == 0, done.stderr
        assert _release(device.wait_for(stable_topic, lambda p: _release(p).version == "v3")).channel == "stable"
        done = _cli(three.root, "rollback", "--channel", "stable")
        assert done.returncode == 0, done.stderr
        assert _release(device.wait_for(stable_topic, lambda p: _release(p).version == "v1")).version == "v1"
    finally:
        announcer.close()
        device.close()


def test_announcer_reports_refusals_clearly(three: ModelRegistry, mosquitto_factory: Callable[..., MosquittoBroker]):
    three.promote("v1", "stable")
    broker = mosquitto_factory(
        users={"registry": "right", "reader": "pw"},
        acl=f"user registry\ntopic readwrite {P}/releases/#\nuser reader\ntopic read {P}/releases/#\n",
    )
    wrong = ReleaseAnnouncer(
        ReleaseAnnouncerConfig(host=broker.host, port=broker.port, username="registry", password="no")
    )
    with pytest.raises(AnnounceError, match="refused the connection"):
        wrong.start()
    wrong.close()
    reader = ReleaseAnnouncer(
        ReleaseAnnouncerConfig(host=broker.host, port=broker.port, username="reader", password="pw")
    )
    try:
        with pytest.raises(AnnounceError, match="refused the release announcement"):
            reader.announce_all(three)
    finally:
        reader.close()
    with ReleaseAnnouncer(
        ReleaseAnnouncerConfig(host=broker.host, port=broker.port, username="registry", password="right")
    ) as ok:
        assert ok.announce_all(three) == [topics.channel_release(P, "stable")]
    unreachable = ReleaseAnnouncer(ReleaseAnnouncerConfig(host="127.0.0.1", port=1, connect_timeout_s=1))
    with pytest.raises(AnnounceError, match="cannot connect"):
        unreachable.announce_all(three)
    unreachable.close()


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_publish_list_promote_pin_rollback(tmp_path: Path, variants: list[Path]):
    runner = CliRunner()
    root = str(tmp_path / "registry")

    def run(*args: str):
        result = runner.invoke(models_app, [*args, "--registry", root])
        assert result.exit_code == 0, result.output
        return result

    out = run(
        "publish", str(variants[0]), "--dataset-version", "ds-1", "--metric", "mAP50=0.61", "--param", "epochs=50",
        "--param", "optimizer=SGD", "--notes", "first",
    ).stdout  # fmt: skip
    assert out.startswith("published v1: 80 classes, imgsz 640")
    published = json.loads(run("publish", str(variants[1]), "--parent", "v1", "--json").stdout)
    assert published["version"] == "v2" and published["parent_version"] == "v1" and published["serving"] == []

    assert run("promote", "v1", "--channel", "stable").stdout.strip() == "stable: nothing -> v1"
    assert run("promote", "v2", "--channel", "stable").stdout.strip() == "stable: v1 -> v2"
    assert json.loads(run("promote", "v2", "--channel", "canary", "--group", "lobby", "--json").stdout) == {
        "channel": "canary",
        "group": "lobby",
        "version": "v2",
        "previous": None,
    }
    assert run("pin", "cam-1", "v1").stdout.strip() == "pinned cam-1 to v1"
    run("assign", "cam-2", "lobby")

    table = run("list").stdout
    assert "VERSION" in table and "SERVING" in table
    v1_line = next(line for line in table.splitlines() if line.startswith("v1 "))
    assert "ds-1" in v1_line and "mAP50=0.61" in v1_line and "pin:cam-1" in v1_line
    assert "canary@lobby" in next(line for line in table.splitlines() if line.startswith("v2 "))
    listed = json.loads(run("list", "--json").stdout)
    assert [v["version"] for v in listed["versions"]] == ["v1", "v2"]
    assert listed["versions"][0]["params"] == {"epochs": 50, "optimizer": "SGD"}
    assert listed["channels"]["stable"]["release"]["current"] == "v2"
    assert listed["pins"] == {"cam-1": "v1"} and listed["assignments"] == {"cam-2": "lobby"}

    shown = run("show", "v2").stdout
    assert "lineage    v2 <- v1" in shown and "signature  valid" in shown
    assert json.loads(run("show", "v1", "--json").stdout)["verified"] is True

    assert run("rollback", "--channel", "stable").stdout.strip() == "stable: rolled back v2 -> v1"
    assert json.loads(run("unpin", "cam-1", "--json").stdout) == {"device": "cam-1", "previous": "v1"}
    assert run("unpin", "cam-1").stdout.strip() == "cam-1 was not pinned"
    assert run("public-key").stdout.startswith("-----BEGIN PUBLIC KEY-----")

    registry = ModelRegistry(RegistryConfig(root=Path(root)))
    assert registry.current("stable") == "v1" and registry.state().pins == {}
    verify_release(registry.resolve("cam-2", "canary"), load_public_key(Path(root) / "release_key.pub.pem"))


def test_cli_errors_are_clear_messages_with_exit_code_2(tmp_path: Path, variants: list[Path]):
    runner = CliRunner()
    root = str(tmp_path / "registry")
    text = tmp_path / "readme.onnx"
    text.write_text("not a model")
    assert runner.invoke(models_app, ["publish", str(variants[0]), "--registry", root]).exit_code == 0
    cases = [
        (["promote", "v9", "--channel", "stable"], "error: unknown version 'v9'"),
        (["publish", str(text)], "error: "),
        (["publish", str(tmp_path / "nope.onnx")], "is not a file"),
        (["publish", str(variants[1]), "--metric", "mAP50"], "must look like name=value"),
        (["publish", str(variants[1]), "--metric", "mAP50=high"], "is not a number"),
        (["publish", str(variants[1]), "--parent", "v7"], "unknown parent version 'v7'"),
        (["rollback", "--channel", "stable"], "has no earlier release to roll back to"),
        (["promote", "v1", "--channel", "beta"], "unknown channel 'beta'"),
        (["pin", "cam/1", "v1"], "invalid device id"),
        (["show", "v3"], "unknown version 'v3'"),
    ]
    for args, message in cases:
        result = runner.invoke(models_app, [*args, "--registry", root])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
    assert "is not an ONNX model" in runner.invoke(models_app, ["publish", str(text), "--registry", root]).stderr
    listed = json.loads(runner.invoke(models_app, ["list", "--json", "--registry", root]).stdout)
    assert [v["version"] for v in listed["versions"]] == ["v1"]

    # A tampered registry.json is caught by `show`, not silently trusted.
    state = json.loads((Path(root) / "registry.json").read_text())
    state["versions"]["v1"]["class_names"][0] = "not-a-person"
    (Path(root) / "registry.json").write_text(json.dumps(state))
    shown = runner.invoke(models_app, ["show", "v1", "--registry", root])
    assert shown.exit_code == 0 and "NOT VALID" in shown.stdout and "does not match" in shown.stdout

"""The model updater against a real registry: a real gRPC server hosting the real ``RegistryServicer``
over a real ``ModelRegistry`` in ``tmp_path``, real signatures, real ONNX Runtime detectors built by
``create_detector`` from the files the updater downloaded.

The agent is a small stand-in (:class:`FakeAgent`: the running version, recent frames, the swap), so
each step of ``Updater.apply`` can be checked on its own; the whole agent is exercised by
``tests/test_release_flow.py``. Distinct model versions are copies of the shared YOLOv8n int8 export
with one extra ONNX metadata entry (same network, different bytes and sha256).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.app import Agent
from edge_agent.config import AgentConfig
from edge_agent.detectors import Detector, OnnxRuntimeDetectorConfig, create_detector
from edge_agent.detectors.yolo import read_onnx_metadata
from edge_agent.updater import MqttWatchConfig, UpdateConfig, Updater
from edgeloop import topics
from edgeloop.convert import parse_frame
from edgeloop.domain import Detection, Frame
from edgeloop.releases import public_key_pem, sign_release
from edgeloop.v1 import models_pb2_grpc
from server.registry.announce import ReleaseAnnouncer, ReleaseAnnouncerConfig
from server.registry.grpc_service import RegistryServicer
from server.registry.store import ModelRegistry, RegistryConfig
from tests.fakes.detectors import ScriptedDetector
from tests.fixtures.mosquitto import MosquittoBroker
from tests.server.test_registry import with_metadata

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
INT8_ONNX = SHARED / "models" / "yolov8n_int8.onnx"
COCO_TRAIN = SHARED / "data" / "coco8" / "images" / "train"
DEVICE = "cam-1"
#: Small download chunks, so an artifact of a few MB is many chunks and a download can break off mid-way.
CHUNK = 64 * 1024
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(not INT8_ONNX.is_file(), reason=f"{INT8_ONNX} (shared real model) not found")


# -- models, frames, a registry server ------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> list[Path]:
    """Four valid, distinct YOLO detect exports (same network, different bytes)."""
    work = tmp_path_factory.mktemp("updater-models")
    return [with_metadata(INT8_ONNX, work / f"model-{i}.onnx", edgeloop_test=str(i)) for i in range(4)]


def make_hollow_model(work: Path) -> Path:
    """An ONNX ``ModelProto`` with the real export's metadata (class names, imgsz, task) and no graph.

    The registry reads only the metadata, so it publishes and signs this like any export; ONNX Runtime
    cannot load it: a properly signed release whose model fails to build on the device.
    """
    header = work / "header.onnx"
    header.write_bytes(b"\x08\x07")  # ir_version 7, nothing else
    return with_metadata(header, work / "hollow.onnx", **read_onnx_metadata(INT8_ONNX))


@pytest.fixture(scope="session")
def hollow_model(tmp_path_factory) -> Path:
    return make_hollow_model(tmp_path_factory.mktemp("hollow"))


@pytest.fixture(scope="session")
def coco_frames() -> list[np.ndarray]:
    frames = [cv2.imread(str(p)) for p in sorted(COCO_TRAIN.glob("*.jpg"))]
    assert frames and all(f is not None for f in frames)
    return frames


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RecordingRegistry(RegistryServicer):
    """The real servicer, recording the calls it answers; it can break one download off after N chunks."""

    def __init__(self, registry: ModelRegistry, *, chunk_bytes: int = CHUNK) -> None:
        super().__init__(registry, chunk_bytes=chunk_bytes)
        self.lookups = 0
        self.downloads: list[tuple[str, int]] = []  # (version, offset) of each DownloadArtifact call
        self.break_after: int | None = None

    def GetRelease(self, request, context):  # noqa: N802
        try:
            return super().GetRelease(request, context)
        finally:  # counted once answered, so a test that waits for it knows the look-up is over
            self.lookups += 1

    def DownloadArtifact(self, request, context):  # noqa: N802
        self.downloads.append((request.version, request.offset))
        for sent, chunk in enumerate(super().DownloadArtifact(request, context)):
            if self.break_after is not None and sent == self.break_after:
                self.break_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
            yield chunk


@contextmanager
def serve_registry(registry: ModelRegistry, port: int = 0) -> Iterator[tuple[str, RecordingRegistry]]:
    """A real gRPC server on loopback with the Registry service; yields its target and servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-registry"))
    servicer = RecordingRegistry(registry)
    models_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"could not bind 127.0.0.1:{port}"
    server.start()
    try:
        yield f"127.0.0.1:{bound}", servicer
    finally:
        server.stop(None).wait(5)


def write_public_key(registry: ModelRegistry, path: Path) -> Path:
    path.write_bytes(public_key_pem(registry.public_key()))
    return path


def build(path: Path) -> Detector:
    return create_detector(OnnxRuntimeDetectorConfig(model=path))


class FakeAgent:
    """What the updater needs of an agent: the running version, recent frames and the swap."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.detector: Detector = build(INT8_ONNX)
        self.model_version = "factory"
        self.swaps: list[str] = []
        self.retired: list[Detector] = []
        self._frames = frames

    def recent_frames(self) -> list[np.ndarray]:
        return list(self._frames)

    def swap_detector(self, detector: Detector, version: str) -> Detector:
        old, self.detector = self.detector, detector
        self.model_version = version
        self.swaps.append(version)
        self.retired.append(old)
        return old


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(RegistryConfig(root=tmp_path / "registry"))


@pytest.fixture
def make_updater(tmp_path: Path, coco_frames) -> Iterator[Callable[..., tuple[Updater, FakeAgent]]]:
    """``make_updater(registry, target, **update_config)``: an Updater with a FakeAgent, stopped at teardown."""
    made: list[Updater] = []

    def make(registry: ModelRegistry, target: str, **overrides) -> tuple[Updater, FakeAgent]:
        settings = {
            "enabled": True,
            "target": target,
            "public_key": write_public_key(registry, tmp_path / "release.pub.pem"),
            "models_dir": tmp_path / "models",
            "poll_s": 0.1,
            "timeout_s": 5.0,
            "smoke_frames": 2,
        }
        settings.update(overrides)
        agent = FakeAgent(coco_frames)
        updater = Updater(UpdateConfig(**settings), DEVICE, agent, build)
        made.append(updater)
        return updater, agent

    yield make
    for updater in made:
        updater.stop()


def version_dirs(models_dir: Path) -> set[str]:
    return {p.name for p in models_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")}


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


# -- the happy path ---------------------------------------------------------------------------------


def test_a_new_release_is_downloaded_verified_swapped_and_made_current(registry, models, make_updater, tmp_path):
    registry.publish(models[0])
    registry.promote("v1", "stable")
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        models_dir = tmp_path / "models"

        assert updater.check_once() is True
        assert agent.swaps == ["v1"] and agent.model_version == "v1" and updater.last_error == ""
        artifact = models_dir / "v1" / "model.onnx"
        assert sha256(artifact) == registry.get("v1").artifact_sha256
        assert agent.detector.config.model == artifact  # the new detector runs the downloaded file
        assert agent.detector.class_names == registry.get("v1").class_names
        assert agent.retired[0]._session is None  # the old model was closed after the swap
        assert os.readlink(models_dir / "current") == "v1"  # relative: the models dir can move
        assert Updater.current_model(models_dir) == ("v1", artifact)
        assert not list(models_dir.glob("v1/*.part"))

        # The same release again: nothing to do, nothing fetched.
        assert updater.check_once() is False
        assert servicer.downloads == [("v1", 0)] and agent.swaps == ["v1"]

        registry.publish(models[1])
        registry.promote("v2", "stable")
        assert updater.check_once() is True
        assert agent.model_version == "v2" and os.readlink(models_dir / "current") == "v2"
        assert version_dirs(models_dir) == {"v1", "v2"}  # the previous one stays for a rollback
        assert servicer.downloads == [("v1", 0), ("v2", 0)]


def test_current_link_flips_atomically_and_a_restarted_agent_runs_the_installed_version(
    registry, models, make_updater, tmp_path
):
    registry.publish(models[0])
    registry.publish(models[1])
    registry.promote("v1", "stable")
    models_dir = tmp_path / "models"
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        assert updater.check_once()

        # A reader polling the link the way a restarting agent does never finds it missing or torn.
        seen: set[object] = set()
        stop = threading.Event()

        def read_link() -> None:
            while not stop.is_set():
                current = Updater.current_model(models_dir)
                seen.add(current[0] if current else None)

        reader = threading.Thread(target=read_link, daemon=True)
        reader.start()
        try:
            for version in ("v2", "v1", "v2"):
                registry.promote(version, "stable")
                assert updater.check_once(), version
        finally:
            stop.set()
            reader.join(5)
        assert seen == {"v1", "v2"}
        assert agent.swaps == ["v1", "v2", "v1", "v2"]
        assert servicer.downloads == [("v1", 0), ("v2", 0)]  # the flips back came from disk
        assert not (models_dir / ".current.tmp").exists() and not (models_dir / ".current.tmp").is_symlink()

    # A new agent on the same models dir runs what the last update installed, not its factory model.
    pub = tmp_path / "release.pub.pem"
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "source": {"uri": str(COCO_TRAIN)},
            "detector": {"type": "onnxruntime", "model": str(INT8_ONNX)},
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            "metrics": {"enabled": False},
            "update": {"enabled": True, "public_key": str(pub), "models_dir": str(models_dir), "target": "127.0.0.1:9"},
        }
    )
    restarted = Agent(config)
    try:
        assert restarted.model_version == "v2"
        assert restarted.detector.config.model == models_dir / "v2" / "model.onnx"
    finally:
        restarted.close()

    # The installed file became unloadable (disk damage): the agent falls back to its configured model.
    artifact = models_dir / "v2" / "model.onnx"
    artifact.write_bytes(b"not a model any more")
    fallback = Agent(config)
    try:
        assert fallback.model_version == build(INT8_ONNX).model_version
        assert fallback.detector.config.model == INT8_ONNX
    finally:
        fallback.close()


def test_an_interrupted_download_resumes_from_the_partial_file(registry, models, make_updater, tmp_path):
    registry.publish(models[0])
    registry.promote("v1", "stable")
    release = registry.release("v1")
    assert release.artifact_size > 8 * CHUNK
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        servicer.break_after = 5
        part = tmp_path / "models" / "v1" / "model.onnx.part"

        assert updater.check_once() is False
        assert agent.swaps == [] and agent.model_version == "factory"
        assert "broke off" in updater.last_error and "UNAVAILABLE" in updater.last_error
        assert part.stat().st_size == 5 * CHUNK  # what arrived stays on disk
        assert part.read_bytes() == registry.artifact_path("v1").read_bytes()[: 5 * CHUNK]

        # The next round (a poll, no operator action) continues from there instead of starting over.
        assert updater.check_once() is True
        assert servicer.downloads == [("v1", 0), ("v1", 5 * CHUNK)]
        assert agent.model_version == "v1" and updater.last_error == ""
        artifact = tmp_path / "models" / "v1" / "model.onnx"
        assert sha256(artifact) == release.artifact_sha256 and not part.exists()


def test_pruning_keeps_keep_versions_and_a_refused_release_takes_no_place(
    registry, models, hollow_model, make_updater, tmp_path
):
    for model in models[:3]:
        registry.publish(model)
    registry.publish(hollow_model, version="v4-broken")
    models_dir = tmp_path / "models"
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target, keep_versions=2)
        for version in ("v1", "v2"):
            registry.promote(version, "stable")
            assert updater.check_once(), updater.last_error
        assert version_dirs(models_dir) == {"v1", "v2"}

        # A release that is refused after its download leaves nothing behind to crowd out v1.
        registry.promote("v4-broken", "stable")
        assert updater.check_once() is False
        assert "refused model v4-broken: model does not load" in updater.last_error
        assert agent.model_version == "v2"
        assert version_dirs(models_dir) == {"v1", "v2"}

        registry.promote("v3", "stable")
        assert updater.check_once()
        assert version_dirs(models_dir) == {"v2", "v3"}  # v1 was the oldest

        registry.rollback("stable")  # v3 -> v4-broken: still refused, v3 keeps running
        assert updater.check_once() is False and agent.model_version == "v3"
        registry.rollback("stable")  # -> v2, still on disk
        assert updater.check_once() and agent.model_version == "v2"
        assert os.readlink(models_dir / "current") == "v2"
        assert [v for v, _ in servicer.downloads] == ["v1", "v2", "v4-broken", "v3"]  # no fetch of v2 again
        registry.rollback("stable")  # -> v1, pruned on the device: fetched again
        assert updater.check_once() and agent.model_version == "v1"
        assert servicer.downloads[-1] == ("v1", 0)
        assert version_dirs(models_dir) == {"v1", "v2"}  # v2 was swapped in more recently than v3


# -- refusals ---------------------------------------------------------------------------------------


def test_a_model_that_fails_to_load_is_refused_and_reported_until_the_channel_moves_on(
    registry, models, hollow_model, make_updater, tmp_path
):
    registry.publish(models[0])
    registry.publish(hollow_model)
    registry.verify("v2")  # properly signed, and the stored bytes are what was signed
    registry.promote("v1", "stable")
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        assert updater.check_once()
        running = agent.detector
        registry.promote("v2", "stable")

        assert updater.check_once() is False
        assert updater.last_error.startswith("refused model v2: model does not load")
        assert "v2" in updater.refused
        assert agent.model_version == "v1" and agent.detector is running and agent.swaps == ["v1"]
        assert running.detect(agent.recent_frames()[0]) is not None  # the old model still serves
        assert os.readlink(tmp_path / "models" / "current") == "v1"

        # Not retried in a loop: the next rounds neither download nor build it again, and keep saying why.
        for _ in range(2):
            assert updater.check_once() is False
        assert [v for v, _ in servicer.downloads] == ["v1", "v2"]
        assert updater.last_error.startswith("refused model v2")

        # The operator rolls the channel back to what the device runs: nothing is wrong any more.
        registry.rollback("stable")
        assert updater.check_once() is False
        assert updater.last_error == "" and agent.model_version == "v1"


def test_a_release_whose_class_names_differ_from_the_model_fails_the_smoke_test(
    registry, models, make_updater, tmp_path
):
    """A release signed with the right key whose class names do not match its model (a mislabelled
    release): the signature and the artifact check pass, the smoke test refuses it."""
    registry.publish(models[0])
    release = registry.release("v1", "stable")
    release.class_names[0] = "not-a-person"
    release.signature = sign_release(release, registry.signing_key())
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        updater.offer(release)  # as a retained MQTT release would arrive

        assert updater.check_once() is False
        assert updater.last_error.startswith("refused model v1: model's class names")
        assert servicer.downloads == [("v1", 0)]  # it got as far as building and testing the model
        assert agent.swaps == [] and agent.model_version == "factory"
        assert not (tmp_path / "models" / "v1").exists() and not (tmp_path / "models" / "current").is_symlink()


@pytest.mark.parametrize(
    "version",
    ["../escape", "a/b", ".hidden", "", "v1\x00", "x" * 300, "v1\n"],
    ids=["parent-dir", "slash", "hidden", "empty", "nul", "too-long", "newline"],
)
def test_a_release_with_a_malformed_version_name_is_refused(registry, models, make_updater, tmp_path, version):
    """The version names a directory on the device: a name the registry could never have given is
    refused before anything is fetched or created, even when the release is signed with the right key."""
    registry.publish(models[0])
    release = registry.release("v1", "stable")
    release.version = version
    if version:  # an empty version cannot be signed at all
        release.signature = sign_release(release, registry.signing_key())
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        updater.offer(release)

        assert updater.check_once() is False
        assert "not a valid name" in updater.last_error
        assert servicer.downloads == [] and agent.swaps == []
        assert not (tmp_path / "escape").exists()
        assert os.listdir(tmp_path / "models") == []


def test_a_release_signed_with_another_key_is_refused_before_any_download_and_does_not_block_the_real_one(
    registry, models, make_updater, tmp_path
):
    registry.publish(models[0])
    registry.promote("v1", "stable")
    impostor = ModelRegistry(RegistryConfig(root=tmp_path / "impostor"))  # its own release key
    impostor.publish(models[1], version="v1")
    impostor.promote("v1", "stable")
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        servicer.registry = impostor  # the device's registry address now answers with the impostor's releases

        assert updater.check_once() is False
        assert updater.last_error.startswith("refused model v1: signature check failed")
        assert "signed with another key" in updater.last_error
        assert servicer.downloads == [] and agent.swaps == []
        assert not (tmp_path / "models" / "v1").exists()

        # The genuine v1 has the same name: a forged message must not get it refused.
        servicer.registry = registry
        assert updater.check_once() is True
        assert agent.model_version == "v1" and updater.last_error == ""
        assert sha256(tmp_path / "models" / "v1" / "model.onnx") == registry.get("v1").artifact_sha256


def test_a_tampered_artifact_is_refused_and_deleted(registry, models, make_updater, tmp_path):
    registry.publish(models[0])
    registry.publish(models[1])
    registry.promote("v1", "stable")
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        assert updater.check_once()
        stored = registry.artifact_path("v2")
        os.chmod(stored, 0o644)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte different
        stored.write_bytes(bytes(data))
        registry.promote("v2", "stable")

        assert updater.check_once() is False
        assert updater.last_error.startswith("refused model v2: artifact check failed")
        assert registry.get("v2").artifact_sha256 in updater.last_error
        assert agent.model_version == "v1" and servicer.downloads == [("v1", 0), ("v2", 0)]
        assert version_dirs(tmp_path / "models") == {"v1"}  # the bad bytes are not kept


# -- the registry's answers --------------------------------------------------------------------------


def test_no_release_for_the_channel_is_a_no_op(registry, models, make_updater, tmp_path):
    registry.publish(models[0])
    registry.promote("v1", "canary")  # something exists, but not on the channel this device follows
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(registry, target)
        assert updater.check_once() is False
        assert servicer.lookups == 1 and servicer.downloads == []
        assert updater.last_error == "" and agent.swaps == [] and updater.refused == {}
        assert os.listdir(tmp_path / "models") == []


def test_an_unreachable_registry_is_reported_and_the_update_happens_once_it_is_back(registry, models, make_updater):
    registry.publish(models[0])
    registry.promote("v1", "stable")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here yet
    updater, agent = make_updater(registry, f"127.0.0.1:{port}", timeout_s=1.0)

    assert updater.check_once() is False
    assert updater.last_error.startswith("release look-up failed: UNAVAILABLE")
    assert agent.swaps == []

    updater.start()  # the background loop survives failing rounds
    time.sleep(0.3)
    assert updater._thread.is_alive() and updater.last_error.startswith("release look-up failed")
    with serve_registry(registry, port=port):
        # gRPC reconnects with a backoff of about a second.
        wait_until(
            lambda: agent.model_version == "v1" and updater.last_error == "", what="update once the registry is back"
        )
    updater.stop()
    assert not updater._thread.is_alive()


# -- MQTT -------------------------------------------------------------------------------------------


def test_a_retained_release_on_mqtt_triggers_an_immediate_update(
    registry, models, make_updater, tmp_path, mosquitto_factory: Callable[..., MosquittoBroker]
):
    broker = mosquitto_factory()
    registry.publish(models[0])
    with serve_registry(registry) as (target, servicer):
        updater, agent = make_updater(
            registry, target, poll_s=60.0, mqtt=MqttWatchConfig(host=broker.host, port=broker.port)
        )
        updater.start()
        wait_until(lambda: servicer.lookups == 1, what="the first look-up")  # NOT_FOUND: nothing yet

        registry.promote("v1", "stable")
        with ReleaseAnnouncer(ReleaseAnnouncerConfig(host=broker.host, port=broker.port)) as announcer:
            announcer.announce_all(registry)
        wait_until(lambda: agent.model_version == "v1", what="the update the announcement triggers")
        assert servicer.lookups == 1  # the release came over MQTT, long before the next poll
        assert servicer.downloads == [("v1", 0)]

        # Whoever can publish on the broker still cannot make the device run a model without the key.
        impostor = ModelRegistry(RegistryConfig(root=tmp_path / "impostor"))
        impostor.publish(models[1], version="v9")
        forged = impostor.release("v9", "stable")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            topic = topics.channel_release(topics.DEFAULT_PREFIX, "stable")
            client.publish(topic, forged.SerializeToString(), qos=1, retain=True).wait_for_publish(WAIT_S)
        finally:
            client.disconnect()
            client.loop_stop()
        wait_until(lambda: "refused model v9: signature check failed" in updater.last_error, what="refusal")
        assert agent.model_version == "v1" and servicer.downloads == [("v1", 0)]


# -- the agent's side of a swap ----------------------------------------------------------------------


def test_frames_detected_before_a_swap_keep_the_old_models_version_and_class_names(tmp_path, coco_frames):
    """A frame detected by the old model may still wait for the scoring worker when the swap happens:
    its record must name the model that produced its detections, version *and* class names."""
    old = ScriptedDetector(lambda i, image: [Detection((10.0, 10.0, 60.0, 60.0), 1, "square", 0.5, None)])
    new = ScriptedDetector(lambda i, image: [Detection((10.0, 10.0, 60.0, 60.0), 1, "dog", 0.5, None)])
    new.class_names, new.model_version = ["cat", "dog", "bird"], "scripted-2"
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "source": {"uri": str(COCO_TRAIN)},
            "detector": {"type": "onnxruntime", "model": str(INT8_ONNX)},
            "triggers": {"random": {"enabled": True, "rate": 1.0}},
            "budget": {"frames_per_minute": 1e6, "bytes_per_minute": 1e12, "dedup": {"enabled": False}},
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
            "metrics": {"enabled": False},
            "seed": 0,
        }
    )
    agent = Agent(config, detector=old)
    swapped = threading.Event()
    process = agent.process

    def slow_process(*args, **kwargs):  # the worker is behind: it scores frame 0 only after the swap
        assert swapped.wait(WAIT_S)
        return process(*args, **kwargs)

    agent.process = slow_process  # type: ignore[method-assign]

    def frames() -> Iterator[Frame]:
        yield Frame(coco_frames[0], "cam", 0, time.time(), "f0")
        assert swapped.wait(WAIT_S)
        yield Frame(coco_frames[1], "cam", 1, time.time(), "f1")

    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.update(agent.run(frames())), daemon=True)
    try:
        runner.start()
        wait_until(lambda: old.calls == 1 and agent.recent_frames(), what="frame 0 detected")
        assert agent.swap_detector(new, "scripted-2") is old
        swapped.set()
        runner.join(WAIT_S)
        assert not runner.is_alive() and result["frames_enqueued"] == 2
        records = sorted((parse_frame(p.payload) for p in agent.outbox.peek(10)), key=lambda r: r.sequence)
    finally:
        swapped.set()
        agent.close()
    assert [(r.model_version, r.class_names, r.detections[0].class_name) for r in records] == [
        ("scripted-1", ["circle", "square", "triangle"], "square"),
        ("scripted-2", ["cat", "dog", "bird"], "dog"),
    ]

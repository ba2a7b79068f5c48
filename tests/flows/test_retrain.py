"""Retraining end to end, without an orchestrator (the same steps the ``retrain`` flow runs as tasks):
the gate keeps a worse model off the fleet and records why; a better one goes to canary, a real agent
following canary swaps to it, and it reaches stable only after the agent's heartbeats show it healthy
for the set time. Transfer learning: fine-tuning the model of world A beats training from scratch on
the shifted world B, with the same epochs and data.

The world: production ``v1`` is the session's shapes model (``shapes_release``: trained on synthetic
world A, published with its checkpoint). The camera's world shifted (``B``: a new background, new
looks of known classes, smaller objects); curators labelled its frames into dataset version
``ds-b``. Two candidates train on ``ds-b`` with the same schedule:

* ``v2`` from scratch: worse than production, rejected by the gate, never released;
* ``v3`` fine-tuned from production's checkpoint (the default): better, released to canary, confirmed
  by the canary agent's heartbeats, promoted to stable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.app import Agent
from edge_agent.config import AgentConfig
from edgeloop.convert import device_status_from_pb
from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import write_dataset
from edgeloop.v1 import frames_pb2
from flows.config import FlowsConfig
from flows.curation import DirectoryCuration
from flows.pipeline import RetrainOutcome, run_retrain
from server.ingest.heartbeats import FleetEntry
from server.registry.store import ModelRegistry, RegistryConfig
from tests.edge_agent.test_updater import serve_registry, write_public_key
from tests.fakes.receivers import GrpcTestReceiver

pytestmark = pytest.mark.slow

DEVICE = "cam-canary"
#: World B and the candidates' schedule: small enough for CI, long enough for fine-tuning to show.
WORLD_B = "shapes-shifted"
IMAGES_B = 100
EPOCHS = 4
IMGSZ = 320
#: How long the canary agent must report the new version healthy before stable.
HEALTHY_FOR_S = 3.0
WAIT_S = 60.0


@dataclass
class World:
    registry: ModelRegistry
    data_yaml: Path
    scratch: RetrainOutcome
    tuned: RetrainOutcome
    heartbeats: list[frames_pb2.DeviceStatus] = field(default_factory=list)
    stable_since: float = 0.0


def _agent_config(work: Path, images: Path, model: Path, target: str, public_key: Path, receiver) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "source": {"uri": str(images), "loop": True, "max_fps": 10},
            "detector": {"type": "onnxruntime", "model": str(model), "intra_op_threads": 1},
            "triggers": {"random": {"enabled": True, "rate": 0.1}},
            "budget": {
                "frames_per_minute": 1e6,
                "bytes_per_minute": 1e12,
                "max_side": 320,
                "dedup": {"enabled": False},
            },
            "outbox": {"path": str(work / "outbox.sqlite3")},
            "transport": {"type": "grpc", "target": receiver.target, "deadline_s": 5, "connect_timeout_s": 0.5},
            "upload": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "idle_poll_s": 0.05, "heartbeat_s": 0.2},
            "metrics": {"enabled": False},
            "update": {
                "enabled": True,
                "channel": "canary",
                "target": target,
                "public_key": str(public_key),
                "models_dir": str(work / "models"),
                "poll_s": 0.2,
                "timeout_s": 30,
                "smoke_frames": 2,
            },
            "seed": 0,
        }
    )


@pytest.fixture(scope="module")
def world(shapes_release, tmp_path_factory: pytest.TempPathFactory, ultralytics_offline) -> Iterator[World]:
    work = tmp_path_factory.mktemp("retrain")
    versions = work / "versions"
    data_yaml = write_dataset(
        versions / "ds-b", get_scenario(WORLD_B), n=IMAGES_B, seed=11, val_fraction=0.2, test_fraction=0.2
    )
    registry = ModelRegistry(RegistryConfig(root=work / "registry"))
    registry.publish(shapes_release.onnx, dataset_version="ds-a", checkpoint=shapes_release.checkpoint)
    registry.promote("v1", "stable")
    registry.promote("v1", "canary")
    config = FlowsConfig.model_validate(
        {
            "work_dir": str(work / "runs"),
            "registry": {"root": str(work / "registry")},
            "training": {"epochs": EPOCHS, "patience": 0, "imgsz": IMGSZ, "batch": 16, "device": "cpu"},
            "evaluation": {"train_images": 20, "threads": 1},
            "gate": {"min_improvement": 0.02, "max_class_drop": 0.1},
            "rollout": {
                "healthy_for_s": HEALTHY_FOR_S,
                "min_devices": 1,
                "max_heartbeat_age_s": 5,
                "poll_s": 0.25,
                "timeout_s": 120,
            },
        }
    )
    curation = DirectoryCuration(versions)
    public_key = write_public_key(registry, work / "release.pub.pem")

    with GrpcTestReceiver() as receiver, serve_registry(registry) as (target, _servicer):
        agent = Agent(
            _agent_config(work, data_yaml.parent / "images" / "test", shapes_release.onnx, target, public_key, receiver)
        )
        assert agent.updater.check_once(), agent.updater.last_error
        assert agent.model_version == "v1"
        failures: list[BaseException] = []

        def run() -> None:
            try:
                agent.run()
            except BaseException as err:  # re-raised by the fixture
                failures.append(err)

        def fleet() -> dict[str, FleetEntry]:
            """The server's view of the fleet: each device's latest heartbeat, received just now."""
            assert not failures, failures
            beats = list(receiver.heartbeats)
            return {DEVICE: FleetEntry(device_status_from_pb(beats[-1]), time.time())} if beats else {}

        runner = threading.Thread(target=run, name="canary-agent", daemon=True)
        runner.start()
        try:
            scratch = run_retrain(
                config.model_copy(update={"training": config.training.model_copy(update={"init": "scratch"})}),
                curation,
                "ds-b",
                run_id="scratch",
                fleet=fleet,
            )
            tuned = run_retrain(config, curation, "ds-b", run_id="tuned", fleet=fleet)
        finally:
            agent.stop()
            runner.join(WAIT_S)
            agent.close()
        assert not failures, failures
        yield World(
            registry=registry,
            data_yaml=data_yaml,
            scratch=scratch,
            tuned=tuned,
            heartbeats=list(receiver.heartbeats),
            stable_since=registry.state().channels["stable"].release.since,
        )


def test_a_worse_candidate_is_registered_rejected_with_its_reason_and_never_released(world: World):
    assert world.scratch.version == "v2" and not world.scratch.decision.promote and world.scratch.rollout is None
    v2 = world.registry.get("v2")
    assert v2.rejected.startswith("gate: mAP50-95 ") and "vs production" in v2.rejected
    assert v2.parent_version == "v1" and v2.dataset_version == "ds-b" and v2.params["training"]["init"] == "scratch"
    assert not any(hb.model_version == "v2" for hb in world.heartbeats)  # no device ever ran it


def test_a_better_candidate_goes_canary_then_stable_as_the_agent_reports_it_healthy(world: World):
    tuned = world.tuned
    assert tuned.version == "v3" and tuned.decision.promote, tuned.decision.reason
    assert tuned.rollout is not None and tuned.rollout.outcome == "stable", tuned.rollout
    assert world.registry.current("stable") == "v3" and world.registry.current("canary") == "v3"
    v3 = world.registry.get("v3")
    assert v3.parent_version == "v1" and v3.params["started_from"].endswith("checkpoint.pt")
    world.registry.verify("v3")
    # The agent swapped from v1 to v3 and ran it without errors, frames flowing...
    versions = [hb.model_version for hb in world.heartbeats]
    assert versions[0] == "v1" and versions[-1] == "v3" and "v2" not in versions
    on_v3 = [hb for hb in world.heartbeats if hb.model_version == "v3"]
    assert all(hb.last_error == "" and hb.channel == "canary" for hb in on_v3)
    assert on_v3[-1].counters["frames_read"] > on_v3[0].counters["frames_read"]
    # ...and stable followed only after it had done so for the set time.
    first_v3 = device_status_from_pb(on_v3[0]).time
    assert world.stable_since - first_v3 >= HEALTHY_FOR_S


def test_transfer_from_world_a_beats_training_from_scratch_on_world_b(world: World):
    scratch = world.scratch.evaluations.candidate.map50_95
    tuned = world.tuned.evaluations.candidate.map50_95
    production = world.tuned.evaluations.production
    assert production is not None
    print(
        f"\nworld B ({WORLD_B}) test mAP50-95 after {EPOCHS} epochs on {IMAGES_B} images: "
        f"from scratch {scratch:.4f}, fine-tuned from world A's model {tuned:.4f} "
        f"(world A's model itself: {production.map50_95:.4f})"
    )
    assert tuned > scratch + 0.1
    # What the registry recorded is what was measured.
    assert world.registry.get("v3").metrics["map50_95"] == pytest.approx(tuned)
    assert world.registry.get("v2").metrics["map50_95"] == pytest.approx(scratch)

"""The flows on a real Prefect server: ``edgeloop flows serve`` serves the deployments, ``retrain`` runs
through Prefect's API to a registered, signed model whose recorded metrics are what an independent
evaluation of its ONNX finds; a training that fails fails the run, with the reason, and leaves
production untouched; curate and trigger are scheduled.

One Prefect server for the session (``tests.fixtures.prefect_server``) and one ``flows serve``
process for this module; the model ships as int8. Training is tiny (a few dozen synthetic images
at 160 px, 2 epochs from the COCO checkpoint): this is about the plumbing, ``test_retrain.py`` is
about better models.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import write_dataset
from tests.fixtures.ultralytics_offline import COCO_PT

ROOT = Path(__file__).resolve().parents[2]
#: The module's deployments must appear within this long after `flows serve` starts (imports, registration).
SERVE_TIMEOUT_S = 180.0
#: A tiny retrain through Prefect: a flow-run process importing torch and ultralytics, training, exporting.
RUN_TIMEOUT_S = 540.0
CURATE_INTERVAL_S = 600
TRIGGER_INTERVAL_S = 1800

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not COCO_PT.is_file(), reason=f"{COCO_PT} (shared checkpoint) not found"),
]


@dataclass
class Served:
    config: Path
    registry: Path
    versions: Path
    log: Path


def _write_config(work: Path, versions: Path) -> Path:
    config = {
        "work_dir": str(work / "runs"),
        "server_data_dir": str(work / "server"),
        "registry": {"root": str(work / "registry")},
        "curation": {"provider": "directory", "options": {"root": str(versions)}},
        "training": {
            "init": "base",
            "base_checkpoint": str(COCO_PT),
            "epochs": 2,
            "patience": 0,
            "imgsz": 160,
            "batch": 8,
            "device": "cpu",
        },
        "export": {"int8": True, "calibration_images": 16},  # what ships (and is gated) is the int8 model
        "evaluation": {"train_images": 8, "threads": 1},
        "gate": {"first_model_floor": 0.0},
        "rollout": {"straight_to_stable": True},
        "curate": {"interval_s": CURATE_INTERVAL_S},
        "trigger": {"interval_s": TRIGGER_INTERVAL_S},
    }
    path = work / "flows.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _deployment(name: str):  # noqa: ANN202 - prefect's DeploymentResponse
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory: pytest.TempPathFactory, ultralytics_offline) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("flows")
    versions = work / "versions"
    write_dataset(versions / "ds-0001", get_scenario("shapes"), n=40, seed=5, val_fraction=0.2, test_fraction=0.2)
    # A dataset version whose "images" are not images: export and split checks pass, training cannot.
    broken = write_dataset(versions / "ds-0000-broken", get_scenario("shapes"), n=10, seed=6, test_fraction=0.2)
    for image in (broken.parent / "images").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    config = _write_config(work, versions)
    log = work / "serve.log"
    env = {**os.environ, **prefect_server.env, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.cli", "flows", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while not all(_deployment(f"{n}/{n}") for n in ("retrain", "curate", "trigger", "tune")):
            assert process.poll() is None, f"flows serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"deployments not served in time:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield Served(config=config, registry=work / "registry", versions=versions, log=log)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve pauses its schedules and stops its runs on SIGINT
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _run(name: str, parameters: dict, served: Served):  # noqa: ANN202 - prefect's FlowRun
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=RUN_TIMEOUT_S, poll_interval=2)
    assert run.state is not None and run.state.is_final(), (
        f"{name} did not finish in {RUN_TIMEOUT_S:g} s: {run.state}\n{served.log.read_text()[-4000:]}"
    )
    return run


def test_curate_and_trigger_are_scheduled_retrain_and_tune_on_demand(served: Served):
    for name, interval in (("curate/curate", CURATE_INTERVAL_S), ("trigger/trigger", TRIGGER_INTERVAL_S)):
        deployment = _deployment(name)
        intervals = [s.schedule.interval.total_seconds() for s in deployment.schedules if s.active]
        assert intervals == [interval], (name, deployment.schedules)
        assert deployment.parameters == {"config": str(served.config)}
    for name in ("retrain/retrain", "tune/tune"):
        assert _deployment(name).schedules == []


@pytest.fixture(scope="module")
def retrained(served: Served):  # noqa: ANN201
    run = _run("retrain/retrain", {"dataset_version": "ds-0001"}, served)
    assert run.state.is_completed(), f"{run.state}: {run.state.message}\n{served.log.read_text()[-4000:]}"
    return run


def test_retrain_through_prefect_registers_a_signed_model_with_the_metrics_of_its_onnx(served, retrained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.training.evaluate import evaluate_onnx
    from server.registry.store import ModelRegistry, RegistryConfig

    registry = ModelRegistry(RegistryConfig(root=served.registry))
    [v1] = registry.list()
    registry.verify(v1.version)  # signature and artifact check out
    assert (v1.version, v1.dataset_version, v1.flow_run_id, v1.rejected) == ("v1", "ds-0001", str(retrained.id), "")
    assert registry.checkpoint_path("v1").stat().st_size > 1_000_000  # the training checkpoint, kept for fine-tuning
    assert registry.current("stable") == "v1"
    assert v1.params["training"]["epochs"] == 2 and v1.params["gate"]["promote"] is True
    import onnx

    assert v1.params["int8"] is True  # the registered artifact is the int8 model the gate evaluated
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(registry.artifact_path("v1"))).graph.node}

    # An independent evaluation of the registered ONNX on the version's frozen test split.
    independent = evaluate_onnx(registry.artifact_path("v1"), served.versions / "ds-0001" / "data.yaml", "test")
    assert independent.images == 8
    recorded = {k: v for k, v in v1.metrics.items() if k != "production_map50_95"}
    assert recorded == pytest.approx(independent.metrics(), abs=1e-9)
    print(f"v1 on the test split: mAP50 {independent.map50:.4f}, mAP50-95 {independent.map50_95:.4f}")

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[retrained.id]))
        )
    keys = {a.key for a in artifacts}
    assert {"retrain-metrics", "retrain-per-class", "retrain-gate", "training-report"} <= keys, keys
    assert {"training-curves", "confusion-matrix"} <= keys, keys
    images = [a for a in artifacts if a.key == "training-curves"]
    assert images[0].data.startswith("data:image/png;base64,")


def test_a_training_that_fails_fails_the_run_and_leaves_production_untouched(served, retrained):
    from server.registry.store import ModelRegistry, RegistryConfig

    registry = ModelRegistry(RegistryConfig(root=served.registry))
    before = registry.state().model_dump()
    run = _run("retrain/retrain", {"dataset_version": "ds-0000-broken"}, served)
    assert run.state.is_failed(), run.state
    assert "training failed" in run.state.message, run.state.message
    assert registry.state().model_dump() == before  # nothing registered, nothing released
    assert registry.current("stable") == "v1"

    unknown = _run("retrain/retrain", {"dataset_version": "ds-9999"}, served)
    assert unknown.state.is_failed() and "unknown dataset version 'ds-9999'" in unknown.state.message


def test_the_curators_start_retraining_button_starts_the_retrain_deployment(served, retrained):
    """The FiftyOne operator's hook: a run of the served retrain deployment (here on an unknown
    version, so it ends quickly, and says so)."""
    from flows.client import wait_for_run
    from server.curation.hooks import start_retraining

    run_id = start_retraining("ds-4242")
    outcome = wait_for_run(run_id, RUN_TIMEOUT_S)
    assert outcome.final and outcome.state == "Failed", outcome
    assert "unknown dataset version 'ds-4242'" in outcome.message


def test_trigger_and_curate_run_through_prefect(served, retrained):
    trigger = _run("trigger/trigger", {}, served)
    assert trigger.state.is_completed(), trigger.state.message
    curate = _run("curate/curate", {}, served)
    assert curate.state.is_completed(), curate.state.message
    # ds-0001 already gave v1: the trigger must not retrain on it again.
    from server.registry.store import ModelRegistry, RegistryConfig

    assert [v.version for v in ModelRegistry(RegistryConfig(root=served.registry)).list()] == ["v1"]


def test_cli_runs_a_flow_through_its_deployment(served):
    from typer.testing import CliRunner

    from edgeloop.cli import app

    result = CliRunner().invoke(
        app, ["flows", "run", "curate", "--config", str(served.config), "--deployment", "--wait", str(RUN_TIMEOUT_S)]
    )
    assert result.exit_code == 0, result.output
    assert "started curate: flow run " in result.output and "curate: Completed" in result.output


def test_deploy_puts_training_on_the_gpu_pool_and_the_rest_on_the_light_pool(served):
    """Last in the module: deploying re-registers the served deployments on work pools."""
    from prefect.client.orchestration import get_client

    from flows.config import load_flows_config
    from flows.deployments import deploy

    config = load_flows_config(served.config)
    names = deploy(config, served.config)
    assert sorted(names) == ["curate/curate", "retrain/retrain", "trigger/trigger", "tune/tune"]
    pools = {name: _deployment(name).work_pool_name for name in names}
    assert pools == {
        "retrain/retrain": "edgeloop-gpu",
        "tune/tune": "edgeloop-gpu",
        "curate/curate": "edgeloop-light",
        "trigger/trigger": "edgeloop-light",
    }
    assert _deployment("retrain/retrain").entrypoint == "flows.retrain.retrain"  # a worker imports it by module
    with get_client(sync_client=True) as client:
        assert {client.read_work_pool(p).type for p in ("edgeloop-gpu", "edgeloop-light")} == {"process"}
    assert deploy(config, served.config) == names  # again: updated in place, pools reused


def test_only_transient_io_errors_are_retried():
    from prefect.states import Failed

    from flows.curation import DatasetVersionError
    from flows.retrain import transient
    from server.registry.store import RegistryError, RegistryLockedError

    assert transient(None, None, Failed(data=OSError("stale NFS handle")))
    assert transient(None, None, Failed(data=RegistryLockedError("locked")))
    assert not transient(None, None, Failed(data=DatasetVersionError("unknown dataset version")))
    assert not transient(None, None, Failed(data=RegistryError("version v3 already exists")))

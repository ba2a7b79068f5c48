"""What the retrain flow keeps in the registry: the training checkpoint beside the ONNX (never served),
lineage (flow run id among it), and rejected candidates that stay on record but can never be released."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from edgeloop.cli import app
from edgeloop.v1 import models_pb2, models_pb2_grpc
from server.registry.store import ModelRegistry, RegistryConfig, RegistryError, UnknownVersionError
from tests.edge_agent.test_updater import serve_registry
from tests.server.test_registry import INT8_ONNX, with_metadata

pytestmark = pytest.mark.skipif(not INT8_ONNX.is_file(), reason=f"{INT8_ONNX} (shared model) not found")


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(RegistryConfig(root=tmp_path / "registry"))


def test_checkpoint_is_kept_beside_the_onnx_with_its_lineage(registry, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights" * 1000)
    v1 = registry.publish(
        INT8_ONNX,
        dataset_version="ds-1",
        params={"training": {"epochs": 3}},
        metrics={"map50_95": 0.4},
        checkpoint=checkpoint,
        flow_run_id="run-123",
    )
    stored = registry.checkpoint_path("v1")
    assert stored.read_bytes() == checkpoint.read_bytes() and stored.parent == registry.artifact_path("v1").parent
    assert (v1.checkpoint_size, v1.flow_run_id, v1.status) == (7000, "run-123", "ok")
    registry.verify("v1")  # the signature covers what it did before: the checkpoint changes nothing there
    registry.publish(with_metadata(INT8_ONNX, tmp_path / "v2.onnx", edgeloop_test="2"), parent="v1")
    with pytest.raises(UnknownVersionError, match="without a training checkpoint"):
        registry.checkpoint_path("v2")


def test_a_rejected_candidate_is_recorded_but_never_released(registry, tmp_path):
    registry.publish(INT8_ONNX)
    registry.promote("v1", "stable")
    v2 = registry.publish(
        with_metadata(INT8_ONNX, tmp_path / "v2.onnx", edgeloop_test="2"), parent="v1", rejected="gate: worse"
    )
    assert v2.status == "rejected" and v2.rejected == "gate: worse"
    for change in (lambda: registry.promote("v2", "stable"), lambda: registry.pin("cam-1", "v2")):
        with pytest.raises(RegistryError, match=r"v2 was rejected \(gate: worse\)"):
            change()
    assert registry.current("stable") == "v1"
    with serve_registry(registry) as (target, _servicer), grpc.insecure_channel(target) as channel:
        stub = models_pb2_grpc.RegistryStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.DownloadArtifact(models_pb2.ArtifactRequest(version="v2", device_id="cam-1"))))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "rejected" in info.value.details()


def test_reject_refuses_a_served_version_and_needs_a_reason(registry):
    registry.publish(INT8_ONNX)
    registry.promote("v1", "canary")
    with pytest.raises(RegistryError, match="still served \\(channel canary\\)"):
        registry.reject("v1", "canary failed")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.reject("v1", " ")


def test_cli_shows_status_checkpoint_and_flow_run(registry, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"w")
    registry.publish(INT8_ONNX, checkpoint=checkpoint, flow_run_id="run-9")
    registry.publish(with_metadata(INT8_ONNX, tmp_path / "v2.onnx", edgeloop_test="2"), rejected="gate: no gain")
    runner = CliRunner()
    root = str(registry.root)
    listed = runner.invoke(app, ["models", "list", "--registry", root]).stdout
    assert "v2 (rejected)" in listed
    shown = runner.invoke(app, ["models", "show", "v2", "--registry", root]).stdout
    assert "REJECTED: gate: no gain" in shown
    data = json.loads(runner.invoke(app, ["models", "show", "v1", "--registry", root, "--json"]).stdout)
    assert data["status"] == "ok" and data["flow_run_id"] == "run-9" and data["checkpoint"].endswith("checkpoint.pt")
    published = runner.invoke(
        app, ["models", "publish", str(INT8_ONNX), "--registry", root, "--checkpoint", str(checkpoint), "--json"]
    )
    assert json.loads(published.stdout)["checkpoint_size"] == 1

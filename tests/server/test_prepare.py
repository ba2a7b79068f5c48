"""Preparing a model for the fleet (server.registry.prepare): the embedding output and the reference
statistics, on the real pretrained detector and a fresh ultralytics export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
from edgeloop.embedding import EMBEDDING_OUTPUT, REFERENCE_METADATA_KEY
from server.registry.cli import models_app
from server.registry.prepare import PrepareError, add_embedding_output, head_inputs, prepare_model
from tests.fixtures.ultralytics_offline import export_coco_onnx

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
INT8_ONNX = SHARED / "models" / "yolov8n_int8.onnx"
COCO8 = SHARED / "data" / "coco8" / "images"

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (shared real models and data) not found")


def _images(split: str) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted((COCO8 / split).glob("*.jpg"))]


def _detector(path: Path) -> OnnxRuntimeDetector:
    return OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=path))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "coco-int8-embed.onnx"
    stats = prepare_model(INT8_ONNX, out, [COCO8 / "train"])
    assert stats is not None and len(stats.vectors) == 4
    return out


def test_head_inputs_of_the_quantized_export_are_its_three_float_feature_maps() -> None:
    names = head_inputs(onnx.load(str(INT8_ONNX)))
    assert names == [f"/model.{n}/cv2/act/Mul_output_0" for n in (15, 18, 21)]


def test_the_prepared_model_detects_exactly_as_before_and_adds_an_embedding(prepared: Path) -> None:
    plain, ours = _detector(INT8_ONNX), _detector(prepared)
    assert plain.detect_all(_images("val")[0]).embedding is None
    for image in _images("val") + _images("train"):
        before, after = plain.detect_all(image), ours.detect_all(image)
        assert [(d.box, d.class_id, d.confidence) for d in before.detections] == [
            (d.box, d.class_id, d.confidence) for d in after.detections
        ]
        assert after.embedding is not None and after.embedding.shape == (64 + 128 + 256,)
        # three L2-normalised scales, concatenated
        parts = np.split(after.embedding, [64, 192])
        assert [float(np.linalg.norm(p)) for p in parts] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)


def test_reference_statistics_travel_in_the_model_and_tell_its_images_from_others(prepared: Path) -> None:
    detector = _detector(prepared)
    ref = detector.reference
    assert ref is not None and ref.dim == 448 and "coco8/images/train" in ref.source
    train = [ref.distance(ref.project(detector.detect_all(i).embedding)) for i in _images("train")]
    assert max(train) < 1e-2  # the reference holds these very images
    other = [ref.distance(ref.project(detector.detect_all(i).embedding)) for i in _images("val")]
    assert min(other) > 1.0
    meta = onnx.load(str(prepared)).metadata_props
    assert REFERENCE_METADATA_KEY in {p.key for p in meta}
    assert "names" in {p.key for p in meta}  # ultralytics' own metadata is kept


def test_preparing_twice_adds_one_output(prepared: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.onnx"
    prepare_model(prepared, again)
    outputs = [o.name for o in onnx.load(str(again)).graph.output]
    assert outputs.count(EMBEDDING_OUTPUT) == 1 and len(outputs) == 2
    # without new reference images the old statistics stay
    assert _detector(again).reference is not None


def test_a_graph_without_ultralytics_layer_names_is_refused(tmp_path: Path) -> None:
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    with pytest.raises(PrepareError, match="ultralytics export"):
        add_embedding_output(helper.make_model(graph))


def test_cli_prepare_and_its_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    result = runner.invoke(models_app, ["prepare", str(INT8_ONNX), str(out), "-r", str(COCO8 / "val"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["embedding"] is True and report["reference"]["vectors"] == 4
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = runner.invoke(models_app, ["prepare", str(bad), str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(models_app, ["prepare", str(INT8_ONNX), str(tmp_path / "y.onnx"), "-r", str(empty)])
    assert result.exit_code == 2 and "no readable reference images" in result.output


@pytest.mark.slow
def test_a_fresh_float_export_is_prepared_too(tmp_path_factory, ultralytics_offline) -> None:
    exported = export_coco_onnx(ultralytics_offline, tmp_path_factory.mktemp("export"), imgsz=320)
    out = exported.with_name("prepared.onnx")
    prepare_model(exported, out, [COCO8 / "train"])
    plain, ours = _detector(exported), _detector(out)
    image = _images("val")[1]
    assert [d.box for d in plain.detect(image)] == [d.box for d in ours.detect(image)]
    assert ours.detect_all(image).embedding.shape == (448,) and ours.reference is not None

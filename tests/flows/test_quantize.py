"""int8 export: ONNX Runtime static quantization calibrated on training images, prepared as a release
(embedding output and reference statistics), still detects about as well as the float model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_int8_model_keeps_its_metadata_embedding_and_accuracy(tmp_path, shapes_release, ultralytics_offline):
    import onnx

    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_dataset
    from flows.training.evaluate import evaluate_onnx, split_images
    from flows.training.quantize import calibration_images, head_decode_nodes, quantize_int8
    from flows.training.trainer import export_onnx
    from server.registry.prepare import prepare_model

    train_images = shapes_release.data_yaml.parent / "images" / "train"
    raw = export_onnx(shapes_release.checkpoint, tmp_path / "raw.onnx", imgsz=320)
    calibration = calibration_images([train_images], limit=24)
    assert len(calibration) == 24
    int8_raw = quantize_int8(raw, tmp_path / "int8-raw.onnx", calibration)
    int8 = tmp_path / "int8.onnx"
    prepare_model(int8_raw, int8, [train_images])

    model = onnx.load(str(int8))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized
    decode = set(head_decode_nodes(onnx.load(str(raw))))
    assert decode and not any(n.name in decode and n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert int8.stat().st_size < raw.stat().st_size / 2

    data = write_dataset(tmp_path / "d", get_scenario("shapes"), n=30, seed=31, val_fraction=0.1, test_fraction=0.5)
    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=int8))
    assert detector.class_names == ["circle", "square", "triangle"] and detector.reference is not None
    output = detector.detect_all(cv2.imread(str(split_images(data, "test")[0])))
    assert output.detections and output.embedding is not None and np.isfinite(output.embedding).all()

    float_eval = evaluate_onnx(shapes_release.onnx, data, "test")
    int8_eval = evaluate_onnx(int8, data, "test")
    print(f"test mAP50-95: float {float_eval.map50_95:.4f}, int8 {int8_eval.map50_95:.4f}")
    assert float_eval.map50_95 > 0.3
    assert int8_eval.map50_95 == pytest.approx(float_eval.map50_95, abs=0.1)


def test_quantize_needs_images_and_a_model(tmp_path):
    from flows.training.quantize import QuantizationError, quantize_int8

    (tmp_path / "bad.onnx").write_bytes(b"nope")
    with pytest.raises(QuantizationError, match="calibration images"):
        quantize_int8(tmp_path / "bad.onnx", tmp_path / "out.onnx", [])
    with pytest.raises(QuantizationError, match="not a readable ONNX model"):
        quantize_int8(tmp_path / "bad.onnx", tmp_path / "out.onnx", [tmp_path / "x.jpg"])

"""Detector backends: ONNX Runtime against ultralytics' own predictions on real COCO images, the
shared YOLO pre/post-processing on synthetic arrays, error handling, TensorRT where it exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from edge_agent.detectors import (
    DetectorConfig,
    DetectorError,
    OnnxRuntimeDetectorConfig,
    TensorRTDetectorConfig,
    UltralyticsDetectorConfig,
    create_detector,
    yolo,
)
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector
from edge_agent.detectors.tensorrt import TensorRTDetector, engine_cache_key
from edgeloop.domain import Detection
from edgeloop.durable import write_atomic

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
INT8_ONNX = SHARED / "models" / "yolov8n_int8.onnx"
COCO_PT = SHARED / "models" / "yolov8n_coco_dequant.pt"
COCO8 = SHARED / "data" / "coco8" / "images"


# Only a missing ../shared skips; a file missing inside it is a broken checkout and fails.
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} (shared real models and data) not found")


def _coco8(split: str) -> list[Path]:
    return sorted((COCO8 / split).glob("*.jpg"))


def _coco8_params() -> list:
    if not SHARED.is_dir():
        return [pytest.param(None, id="no-shared")]  # one visibly skipped case instead of an empty set
    return [pytest.param(p, id=f"{p.parent.name}/{p.stem}") for p in _coco8("val") + _coco8("train")]


def _imread(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pair(ours: list[Detection], ref: list[tuple[tuple[float, ...], int, float]]):
    """Greedy pairs (our detection, reference row) by IoU within the same class, best IoU first."""
    candidates = sorted(
        ((_iou(d.box, r[0]), i, j) for i, d in enumerate(ours) for j, r in enumerate(ref) if d.class_id == r[1]),
        reverse=True,
    )
    used_i, used_j, pairs = set(), set(), []
    for iou, i, j in candidates:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((iou, ours[i], ref[j]))
    return pairs


@pytest.fixture(scope="module")
def coco_int8_onnx() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (shared real models and data) not found")
    return INT8_ONNX


@pytest.fixture(scope="module")
def ort_coco_detector(coco_int8_onnx: Path):
    with create_detector(OnnxRuntimeDetectorConfig(model=coco_int8_onnx, intra_op_threads=2)) as det:
        yield det


@pytest.fixture(scope="session")
def offline_ultralytics(ultralytics_offline):
    """``ultralytics.YOLO``, imported with the offline settings from the setup notes (no network, no pip)."""
    return ultralytics_offline.YOLO


@pytest.fixture(scope="module")
def ultralytics_int8_reference(offline_ultralytics, coco_int8_onnx: Path):
    """ultralytics' own predictor on the same ONNX file: the reference the ORT backend must match."""
    return offline_ultralytics(str(coco_int8_onnx), task="detect")


# --- ONNX Runtime on real images -------------------------------------------------------------------


def test_ort_finds_named_objects_on_coco8_val(ort_coco_detector: OnnxRuntimeDetector):
    det = ort_coco_detector
    assert len(det.class_names) == 80 and det.class_names[:3] == ["person", "bicycle", "car"]
    assert det.input_size == (640, 640)
    assert det.model_version.startswith("8.4.115+sha256:83de8f0d2cd5")

    found: set[str] = set()
    for path in _coco8("val"):
        image = _imread(path)
        h, w = image.shape[:2]
        detections = det.detect(image)
        for d in detections:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (path.name, d.box)
            assert d.class_scores is not None and d.class_scores.shape == (80,)
            assert d.class_scores.dtype == np.float32
            assert d.class_scores.argmax() == d.class_id
            assert d.confidence == pytest.approx(float(d.class_scores[d.class_id]))
            assert 0.2 < d.confidence <= 1.0
            assert d.class_name == det.class_names[d.class_id]
        confidences = [d.confidence for d in detections]
        assert confidences == sorted(confidences, reverse=True)
        found |= {d.class_name for d in detections}
    assert {"person", "umbrella", "horse"} <= found, found


@pytest.mark.parametrize("conf,iou", [(0.2, 0.7), (0.05, 0.45)])
@pytest.mark.parametrize("image_path", _coco8_params())
@needs_shared
def test_ort_matches_ultralytics_predictions(coco_int8_onnx, ultralytics_int8_reference, image_path, conf, iou):
    """Acceptance: the raw ORT backend gives what ``YOLO(onnx).predict`` gives, box for box."""
    image = _imread(image_path)
    config = OnnxRuntimeDetectorConfig(model=coco_int8_onnx, conf_threshold=conf, iou_threshold=iou)
    with create_detector(config) as det:
        ours = det.detect(image)
    boxes = ultralytics_int8_reference.predict(image, conf=conf, iou=iou, imgsz=640, device="cpu", verbose=False)[
        0
    ].boxes
    ref = [
        (tuple(map(float, b)), int(c), float(s))
        for b, c, s in zip(boxes.xyxy.numpy(), boxes.cls.numpy(), boxes.conf.numpy(), strict=True)
    ]

    assert ref, "the reference found nothing: the comparison would prove nothing"
    assert len(ours) == len(ref)
    assert sorted(d.class_id for d in ours) == sorted(r[1] for r in ref)
    pairs = _pair(ours, ref)
    assert len(pairs) == len(ref)
    for pair_iou, d, r in pairs:
        assert pair_iou > 0.99, (d, r)
        assert np.abs(np.array(d.box) - np.array(r[0])).max() < 1.0, (d.box, r[0])
        assert abs(d.confidence - r[2]) < 1e-3, (d.confidence, r[2])


def test_ort_stages_compose_to_detect(ort_coco_detector: OnnxRuntimeDetector):
    image = _imread(_coco8("val")[0])
    tensor, info = ort_coco_detector.preprocess(image)
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    output = ort_coco_detector.infer(tensor)
    assert output.shape == (1, 84, 8400)
    staged = ort_coco_detector.postprocess(output, info)
    direct = ort_coco_detector.detect(image)
    assert [(d.box, d.class_id) for d in staged] == [(d.box, d.class_id) for d in direct]


# --- yolo.py on synthetic arrays -------------------------------------------------------------------


def test_nms_suppresses_same_class_overlaps_but_keeps_other_classes():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [0, 0, 100, 100], [300, 300, 350, 350]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    # Same class everywhere: box 1 (IoU 0.82) and box 2 (IoU 1.0) go, the far box stays.
    assert yolo.nms(boxes, scores, 0.5).tolist() == [0, 3]
    # Box 2 of another class survives its identical twin of class 0.
    kept = yolo.batched_nms(boxes, scores, np.array([0, 0, 1, 0]), 0.5)
    assert kept.tolist() == [0, 2, 3]
    # The threshold is "above": IoU 0.82 stays under a 0.9 threshold.
    assert yolo.nms(boxes[:2], scores[:2], 0.9).tolist() == [0, 1]
    assert yolo.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_letterbox_pads_with_114_and_keeps_aspect():
    image = np.full((300, 600, 3), 7, dtype=np.uint8)  # wide: scaled to 640 x 320, 160 px bands above/below
    boxed, info = yolo.letterbox(image, (640, 640))
    assert boxed.shape == (640, 640, 3)
    assert info.orig_shape == (300, 600) and info.pad == (0, 160)
    assert info.gain == pytest.approx((640 / 600, 320 / 300))
    assert (boxed[:160] == 114).all() and (boxed[480:] == 114).all() and (boxed[160:480] == 7).all()

    tensor = yolo.to_input_tensor(boxed)
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32
    assert tensor.max() == pytest.approx(114 / 255)

    with pytest.raises(ValueError, match="H x W x 3"):
        yolo.letterbox(np.zeros((10, 10), np.uint8), (640, 640))


def test_letterbox_swaps_bgr_to_rgb():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure blue in BGR
    tensor, _ = yolo.preprocess(image, (32, 32))
    assert tensor[0, 2].min() == 1.0 and tensor[0, 0].max() == 0.0  # blue is the last RGB channel


def _synthetic_output(rows: list[tuple[float, float, float, float, list[float]]], nc: int) -> np.ndarray:
    """A (1, 4 + nc, N) head output from (cx, cy, w, h, scores) rows in input pixels."""
    out = np.zeros((1, 4 + nc, len(rows)), dtype=np.float32)
    for i, (cx, cy, w, h, scores) in enumerate(rows):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4:, i] = scores
    return out


def test_decode_maps_boxes_back_to_non_square_images():
    h, w = 300, 600
    _, info = yolo.letterbox(np.zeros((h, w, 3), np.uint8), (640, 640))
    gx, gy = info.gain
    px, py = info.pad

    def to_input(x1, y1, x2, y2):
        return ((x1 + x2) / 2 * gx + px, (y1 + y2) / 2 * gy + py, (x2 - x1) * gx, (y2 - y1) * gy)

    rows = [
        (*to_input(100, 50, 200, 150), [0.1, 0.9, 0.0]),  # inside the image
        (*to_input(550, 250, 650, 350), [0.6, 0.0, 0.3]),  # sticks out bottom-right: clipped
        (*to_input(10, 10, 20, 20), [0.2, 0.1, 0.0]),  # at the threshold: dropped ("above" only)
    ]
    names = ["a", "b", "c"]
    dets = yolo.decode(_synthetic_output(rows, 3), info, names, yolo.YoloThresholds(conf_threshold=0.2))
    assert [d.class_name for d in dets] == ["b", "a"]
    assert dets[0].box == pytest.approx((100, 50, 200, 150), abs=1e-3)
    assert dets[1].box == pytest.approx((550, 250, 600, 300), abs=1e-3)
    np.testing.assert_allclose(dets[1].class_scores, [0.6, 0.0, 0.3])

    capped = yolo.decode(
        _synthetic_output(rows, 3), info, names, yolo.YoloThresholds(conf_threshold=0.2, max_detections=1)
    )
    assert [d.class_name for d in capped] == ["b"]
    assert yolo.decode(_synthetic_output(rows, 3), info, names, yolo.YoloThresholds(conf_threshold=0.95)) == []


def test_decode_applies_nms_per_class():
    _, info = yolo.letterbox(np.zeros((640, 640, 3), np.uint8), (640, 640))
    rows = [
        (100, 100, 50, 50, [0.9, 0.0]),
        (102, 102, 50, 50, [0.8, 0.0]),  # same class, IoU ~0.85: suppressed
        (101, 101, 50, 50, [0.0, 0.7]),  # other class on top: kept
    ]
    dets = yolo.decode(_synthetic_output(rows, 2), info, ["x", "y"], yolo.YoloThresholds(iou_threshold=0.7))
    assert [(d.class_name, round(d.confidence, 2)) for d in dets] == [("x", 0.9), ("y", 0.7)]


def test_decode_all_reports_weak_candidates_apart_from_detections():
    _, info = yolo.letterbox(np.zeros((640, 640, 3), np.uint8), (640, 640))
    rows = [
        (100, 100, 50, 50, [0.9, 0.0]),  # a detection
        (102, 102, 50, 50, [0.15, 0.0]),  # its weaker twin: overlaps it, so not weak evidence
        (400, 400, 40, 40, [0.0, 0.18]),  # a half-seen object elsewhere
        (403, 401, 40, 40, [0.12, 0.1]),  # the same blob again, another class: one candidate
        (300, 500, 30, 30, [0.04, 0.0]),  # under the weak threshold: noise
        (500, 100, 30, 30, [0.2, 0.0]),  # exactly the detection threshold: weak ("above" only detects)
    ]
    thresholds = yolo.YoloThresholds(conf_threshold=0.2, weak_threshold=0.05)
    dets, weak = yolo.decode_all(_synthetic_output(rows, 2), info, ["x", "y"], thresholds)
    assert [(d.class_name, round(d.confidence, 2)) for d in dets] == [("x", 0.9)]
    assert [(d.class_name, round(d.confidence, 2)) for d in weak] == [("x", 0.2), ("y", 0.18)]
    assert weak[1].box == pytest.approx((380, 380, 420, 420), abs=1e-3)
    assert weak[0].class_scores is None  # weak candidates carry no score vector
    # off, or capped
    off = yolo.YoloThresholds(conf_threshold=0.2, weak_threshold=0.0)
    assert yolo.decode_all(_synthetic_output(rows, 2), info, ["x", "y"], off)[1] == []
    capped = yolo.YoloThresholds(conf_threshold=0.2, max_weak=1)
    assert len(yolo.decode_all(_synthetic_output(rows, 2), info, ["x", "y"], capped)[1]) == 1
    # detections are exactly what decode gives: the weak pass does not change them
    plain = yolo.decode(_synthetic_output(rows, 2), info, ["x", "y"], thresholds)
    assert [(d.box, d.class_id, d.confidence) for d in plain] == [(d.box, d.class_id, d.confidence) for d in dets]


def test_a_model_that_sees_nothing_leaves_weak_candidates():
    _, info = yolo.letterbox(np.zeros((640, 640, 3), np.uint8), (640, 640))
    rows = [(60 + 70 * i, 320, 40, 40, [0.06 + 0.01 * i, 0.0]) for i in range(8)]
    dets, weak = yolo.decode_all(_synthetic_output(rows, 2), info, ["x", "y"], yolo.YoloThresholds())
    assert dets == [] and len(weak) == 8
    assert [round(d.confidence, 2) for d in weak] == sorted((round(0.06 + 0.01 * i, 2) for i in range(8)), reverse=True)


def test_parse_ultralytics_metadata():
    meta = yolo.parse_ultralytics_metadata(
        {
            "names": "{0: 'cat', 2: 'dog'}",
            "imgsz": "[480, 640]",
            "stride": "32",
            "task": "detect",
            "version": "8.4",
        }
    )
    assert meta.names == ["cat", "class1", "dog"]
    assert meta.imgsz == (480, 640) and meta.stride == 32 and meta.version == "8.4" and not meta.end2end
    broken = yolo.parse_ultralytics_metadata({"names": "{0: 'cat'", "imgsz": "__import__('os')"})
    assert broken.names is None and broken.imgsz is None
    assert yolo.class_names_for(broken, 2) == ["class0", "class1"]


def test_check_output_shape_rejects_non_detect_heads():
    meta = yolo.UltralyticsMetadata(names=["a", "b"])
    assert yolo.check_output_shape((1, 6, 8400), meta, "m") == 2
    with pytest.raises(ValueError, match="metadata names 2"):
        yolo.check_output_shape((1, 38, 8400), meta, "m")  # a segmentation head: 32 mask coefficients more
    with pytest.raises(ValueError, match="end-to-end"):
        yolo.check_output_shape((1, 300, 6), yolo.UltralyticsMetadata(end2end=True), "m")
    with pytest.raises(ValueError, match="'segment' export"):
        yolo.check_output_shape((1, 38, 8400), yolo.UltralyticsMetadata(task="segment"), "m")
    with pytest.raises(ValueError, match="expected"):
        yolo.check_output_shape((1, 1000), yolo.UltralyticsMetadata(), "m")


def test_read_onnx_metadata_matches_onnxruntime(coco_int8_onnx: Path, tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(coco_int8_onnx), providers=["CPUExecutionProvider"])
    assert yolo.read_onnx_metadata(coco_int8_onnx) == session.get_modelmeta().custom_metadata_map
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"garbage, not protobuf\n")
    with pytest.raises(ValueError):
        yolo.read_onnx_metadata(garbage)


# --- configuration and errors ----------------------------------------------------------------------


def test_detector_config_is_discriminated_by_type():
    adapter = TypeAdapter(DetectorConfig)
    ort_cfg = adapter.validate_python({"type": "onnxruntime", "model": "m.onnx"})
    assert isinstance(ort_cfg, OnnxRuntimeDetectorConfig)
    assert (ort_cfg.conf_threshold, ort_cfg.iou_threshold, ort_cfg.max_detections) == (0.2, 0.7, 300)
    assert ort_cfg.providers == ["CPUExecutionProvider"] and ort_cfg.intra_op_threads is None
    assert isinstance(adapter.validate_python({"type": "tensorrt", "model": "m.onnx"}), TensorRTDetectorConfig)
    assert isinstance(adapter.validate_python({"type": "ultralytics", "model": "m.pt"}), UltralyticsDetectorConfig)
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "onnxruntime", "model": "m.onnx", "conf_treshold": 0.3})  # typo
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "openvino", "model": "m.xml"})
    for cls in (OnnxRuntimeDetectorConfig, TensorRTDetectorConfig, UltralyticsDetectorConfig):
        undocumented = [name for name, f in cls.model_fields.items() if not f.description]
        assert undocumented == [], f"{cls.__name__} fields without a description: {undocumented}"


def test_ort_missing_and_garbage_models_raise_clear_errors(tmp_path: Path):
    with pytest.raises(DetectorError, match="does not exist"):
        create_detector(OnnxRuntimeDetectorConfig(model=tmp_path / "nope.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n")
    with pytest.raises(DetectorError, match="not a loadable ONNX model"):
        create_detector(OnnxRuntimeDetectorConfig(model=garbage))
    with pytest.raises(DetectorError, match="none of the providers"):
        create_detector(OnnxRuntimeDetectorConfig(model=garbage, providers=["NoSuchExecutionProvider"]))


def test_ort_rejects_a_model_that_is_not_a_detect_head(tmp_path: Path):
    onnx = pytest.importorskip("onnx", reason="onnx (train extra) builds the test model")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"])],
        "classifier_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 3, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "pool.onnx"
    onnx.save(model, path)
    with pytest.raises(DetectorError, match=r"output shape \[1, 3, 1, 1\]"):
        create_detector(OnnxRuntimeDetectorConfig(model=path))


# --- TensorRT --------------------------------------------------------------------------------------


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def test_tensorrt_missing_gives_a_helpful_error(tmp_path: Path):
    if _tensorrt_importable():
        pytest.skip("TensorRT is installed here: the missing-runtime message cannot be observed")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"unused")
    with pytest.raises(DetectorError) as info:
        create_detector(TensorRTDetectorConfig(model=model))
    message = str(info.value)
    assert "TensorRT is not installed" in message
    assert "python3-libnvinfer" in message and "type: onnxruntime" in message


def test_engine_cache_key_changes_with_every_input():
    base = dict(
        onnx_sha256="ab" * 32,
        gpu_name="NVIDIA Orin",
        compute_capability=(8, 7),
        trt_version="10.3.0",
        fp16=True,
    )
    key = engine_cache_key(**base)
    assert key == "abababababababab-nvidia-orin-sm87-trt10.3.0-fp16.engine"
    variants = [
        {"onnx_sha256": "cd" * 32},
        {"gpu_name": "NVIDIA GeForce RTX 4090"},
        {"compute_capability": (8, 9)},
        {"trt_version": "10.4.0"},
        {"fp16": False},
    ]
    keys = {engine_cache_key(**{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert "/" not in engine_cache_key(**{**base, "gpu_name": "A/B \\ weird:name"})


def test_engine_cache_write_is_atomic(tmp_path: Path):
    target = tmp_path / "cache" / "model.engine"
    write_atomic(target, b"engine v1")
    write_atomic(target, b"engine v2")
    assert target.read_bytes() == b"engine v2"
    assert [p.name for p in target.parent.iterdir()] == ["model.engine"]  # no temp files left behind


@pytest.fixture(scope="module")
def tensorrt_gpu():
    """TensorRT plus a CUDA device, or a visible skip."""
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT not installed here (it needs NVIDIA's index); runs on Jetson/NVIDIA containers",
    )
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            pytest.skip(f"no CUDA device ({err})")
    else:
        torch = pytest.importorskip("torch", reason="neither cuda-python nor torch to reach the GPU")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def coco_float_onnx(tmp_path_factory, offline_ultralytics, tensorrt_gpu) -> Path:
    """A float ONNX export of the COCO checkpoint: TensorRT cannot parse the int8 model's ConvInteger."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (shared real models and data) not found")
    work = tmp_path_factory.mktemp("trt-export")
    pt = work / COCO_PT.name  # export writes beside its input: keep ../shared untouched
    shutil.copy(COCO_PT, pt)
    return Path(offline_ultralytics(str(pt)).export(format="onnx", imgsz=640, device="cpu"))


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_matches_onnxruntime_and_reuses_its_engine(coco_float_onnx: Path, tmp_path: Path):
    cache = tmp_path / "engines"
    trt_cfg = TensorRTDetectorConfig(model=coco_float_onnx, fp16=False, cache_dir=cache)
    with (
        create_detector(OnnxRuntimeDetectorConfig(model=coco_float_onnx)) as ort_det,
        create_detector(trt_cfg) as trt_det,
    ):
        assert isinstance(trt_det, TensorRTDetector)
        assert trt_det.class_names == ort_det.class_names
        assert trt_det.model_version == ort_det.model_version
        engine = trt_det.engine_path
        for path in _coco8("val") + _coco8("train"):
            image = _imread(path)
            ref = [(d.box, d.class_id, d.confidence) for d in ort_det.detect(image) if d.confidence > 0.3]
            pairs = _pair(trt_det.detect(image), ref)
            assert len(pairs) == len(ref), path.name
            for pair_iou, d, r in pairs:
                assert pair_iou > 0.98 and abs(d.confidence - r[2]) < 0.01, (path.name, d, r)
                assert d.class_scores is not None and d.class_scores.shape == (80,)
    assert engine.is_file() and engine.parent == cache
    built = engine.stat().st_mtime_ns
    with create_detector(trt_cfg) as again:  # second start: loads the cached engine, builds nothing
        assert again.engine_path == engine
        assert again.detect(_imread(_coco8("val")[0]))
    assert engine.stat().st_mtime_ns == built
    assert [p.name for p in cache.iterdir()] == [engine.name]


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_fp16_finds_the_same_confident_objects(coco_float_onnx: Path, tmp_path: Path):
    with (
        create_detector(OnnxRuntimeDetectorConfig(model=coco_float_onnx)) as ort_det,
        create_detector(TensorRTDetectorConfig(model=coco_float_onnx, cache_dir=tmp_path)) as trt_det,
    ):
        for path in _coco8("val"):
            image = _imread(path)
            ref = [(d.box, d.class_id, d.confidence) for d in ort_det.detect(image) if d.confidence > 0.5]
            pairs = _pair(trt_det.detect(image), ref)
            assert len(pairs) == len(ref) and all(p[0] > 0.9 for p in pairs), path.name


@pytest.mark.gpu
def test_tensorrt_rejects_missing_and_garbage_models(tensorrt_gpu, tmp_path: Path):
    with pytest.raises(DetectorError, match="does not exist"):
        create_detector(TensorRTDetectorConfig(model=tmp_path / "nope.onnx", cache_dir=tmp_path))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"garbage, not protobuf\n")
    with pytest.raises(DetectorError, match="not an ONNX model"):
        create_detector(TensorRTDetectorConfig(model=garbage, cache_dir=tmp_path))


# --- ultralytics -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ultralytics_backend_detects_with_the_coco_checkpoint(offline_ultralytics, ort_coco_detector):
    image = _imread(COCO8 / "val" / "000000000036.jpg")  # a person under an umbrella
    with create_detector(UltralyticsDetectorConfig(model=COCO_PT)) as det:
        assert len(det.class_names) == 80 and det.class_names[0] == "person"
        assert det.model_version.startswith("sha256:")
        detections = det.detect(image)
    assert {"person", "umbrella"} <= {d.class_name for d in detections}
    h, w = image.shape[:2]
    for d in detections:
        assert d.class_scores is None
        assert 0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h
    # Same weights as the int8 ONNX: the confident person is in the same place.
    person = max((d for d in detections if d.class_name == "person"), key=lambda d: d.confidence)
    ort_person = max(
        (d for d in ort_coco_detector.detect(image) if d.class_name == "person"), key=lambda d: d.confidence
    )
    assert _iou(person.box, ort_person.box) > 0.9


def test_ultralytics_backend_errors(tmp_path: Path):
    with pytest.raises(DetectorError, match="does not exist"):
        create_detector(UltralyticsDetectorConfig(model=tmp_path / "nope.pt"))


def test_ultralytics_backend_rejects_a_corrupt_checkpoint(offline_ultralytics, tmp_path: Path):
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="ultralytics cannot load"):
        create_detector(UltralyticsDetectorConfig(model=garbage))


def test_importing_the_package_loads_no_runtime():
    heavy = ("onnxruntime", "tensorrt", "ultralytics", "torch", "cv2")
    probe = f"import sys, edge_agent.detectors; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"

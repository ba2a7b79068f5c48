"""Pre- and post-processing of ultralytics YOLO detect exports, shared by the ORT and TensorRT backends.

An ultralytics detect export takes one letterboxed RGB image ``(1, 3, H, W)`` in 0..1 and returns
``(1, 4 + nc, N)``: per anchor a box ``(cx, cy, w, h)`` in input pixels, then ``nc`` class scores,
with no NMS applied. This module reproduces ultralytics' own predict path step for step
(``LetterBox``, ``non_max_suppression`` with class-aware torchvision NMS, ``scale_boxes``) so a raw
runtime gives the same detections as ``YOLO(model).predict(...)``, and in addition keeps each
detection's full class-score vector, which ultralytics' ``Results`` drop and the uncertainty
triggers need (margin, entropy).

Only numpy and OpenCV here (OpenCV imported on first use); the runtimes are imported by the backends, lazily.
"""

from __future__ import annotations

import abc
import ast
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from edge_agent.detectors.base import Detector, DetectorOutput
from edgeloop.config_base import StrictModel
from edgeloop.domain import Detection
from edgeloop.embedding import ReferenceError, ReferenceStats

logger = logging.getLogger(__name__)

#: Gray that ultralytics pads with; a different value shifts scores slightly at the borders.
PAD_VALUE = 114
#: Input size assumed when neither the model's input shape nor its metadata gives one.
DEFAULT_IMGSZ = (640, 640)
#: Candidates kept (by confidence) before NMS, as ultralytics' ``max_nms``: bounds NMS cost on noisy frames.
MAX_NMS_CANDIDATES = 30_000
#: Weak candidates kept (by score) before their NMS: bounds its cost on a frame full of noise.
MAX_WEAK_CANDIDATES = 300
#: Weak candidates overlapping each other, or a detection, at this IoU or more are one object.
WEAK_NMS_IOU = 0.5
#: Per-class coordinate offset for class-aware NMS in one pass; ultralytics' ``max_wh``. Using the same
#: constant gives the same float32 rounding, hence the same kept boxes at IoU ties.
CLASS_OFFSET = 7680.0


class YoloThresholds(StrictModel):
    """Post-processing settings all YOLO backends share (ultralytics' predict defaults, except conf)."""

    conf_threshold: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Keep detections whose top class score is above this. Low on purpose (ultralytics "
        "predicts with 0.25) so the uncertainty triggers also see weak detections.",
    )
    iou_threshold: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="NMS IoU threshold (per class); 0.7 is ultralytics' predict default, so results match.",
    )
    max_detections: int = Field(300, ge=1, description="Keep at most this many detections per frame.")
    weak_threshold: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Candidates scoring above this but not above conf_threshold are reported as weak evidence "
        "(the weak_evidence trigger: a model that half-sees objects it cannot name); 0 turns it off.",
    )
    max_weak: int = Field(100, ge=1, description="Report at most this many weak candidates per frame.")


@dataclass(frozen=True, slots=True)
class UltralyticsMetadata:
    """What an ultralytics export says about itself (ONNX ``metadata_props``); ``None`` where it is silent."""

    names: list[str] | None = None
    imgsz: tuple[int, int] | None = None
    stride: int | None = None
    task: str | None = None
    version: str | None = None
    end2end: bool = False


@dataclass(frozen=True, slots=True)
class LetterboxInfo:
    """How a frame was fitted into the model input, to map boxes back.

    Attributes:
        orig_shape: ``(height, width)`` of the frame.
        gain: ``(x, y)`` scale from frame pixels to input pixels (per axis, as the resized size was rounded).
        pad: ``(left, top)`` padding in input pixels.
    """

    orig_shape: tuple[int, int]
    gain: tuple[float, float]
    pad: tuple[int, int]


def parse_ultralytics_metadata(meta: Mapping[str, str]) -> UltralyticsMetadata:
    """Parse ultralytics' export metadata; malformed entries are logged and treated as absent.

    Values are Python literals written as strings, e.g. ``names = "{0: 'person', 1: 'bicycle'}"``
    and ``imgsz = "[640, 640]"``, so they are read with :func:`ast.literal_eval` (never ``eval``).
    """

    def literal(key: str) -> object:
        raw = meta.get(key)
        if raw is None:
            return None
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            logger.warning("ignoring unparsable model metadata %s=%.80r", key, raw)
            return None

    names: list[str] | None = None
    raw_names = literal("names")
    if isinstance(raw_names, dict) and raw_names and all(isinstance(k, int) and k >= 0 for k in raw_names):
        names = [str(raw_names.get(i, f"class{i}")) for i in range(max(raw_names) + 1)]
    elif isinstance(raw_names, list | tuple) and raw_names:
        names = [str(n) for n in raw_names]

    imgsz: tuple[int, int] | None = None
    raw_imgsz = literal("imgsz")
    if isinstance(raw_imgsz, int):
        imgsz = (raw_imgsz, raw_imgsz)
    elif isinstance(raw_imgsz, list | tuple) and len(raw_imgsz) == 2 and all(isinstance(v, int) for v in raw_imgsz):
        imgsz = (int(raw_imgsz[0]), int(raw_imgsz[1]))

    stride = literal("stride")
    end2end = literal("end2end")
    return UltralyticsMetadata(
        names=names,
        imgsz=imgsz,
        stride=stride if isinstance(stride, int) else None,
        task=meta.get("task"),
        version=meta.get("version"),
        end2end=end2end is True,
    )


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """Read an ONNX file's ``metadata_props`` without onnx or onnxruntime (the TensorRT path has neither).

    Walks the top level of the ``ModelProto`` protobuf, skipping the graph by its length, so it costs
    one read of the file and no parsing of the network.

    Raises:
        ValueError: the file is not a protobuf (so not an ONNX model).
    """
    data = memoryview(path.read_bytes())
    props: dict[str, str] = {}
    for field, value in _protobuf_fields(data):
        if field == 14:  # ModelProto.metadata_props: StringStringEntryProto {key = 1; value = 2}
            entry = dict(_protobuf_fields(value))
            props[bytes(entry.get(1, b"")).decode("utf-8", "replace")] = bytes(entry.get(2, b"")).decode(
                "utf-8", "replace"
            )
    return props


def _protobuf_fields(buf: memoryview) -> list[tuple[int, memoryview]]:
    """Length-delimited fields of one protobuf message (other wire types are checked and skipped)."""
    out: list[tuple[int, memoryview]] = []
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated or invalid protobuf varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("invalid protobuf field number 0")
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length = varint()
            if pos + length > end:
                raise ValueError("protobuf field runs past the end of the file")
            out.append((field, buf[pos : pos + length]))
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("protobuf message truncated")
    return out


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a large model is never held in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_version(sha256_hex: str, metadata: UltralyticsMetadata | None = None) -> str:
    """``"<exporter version>+sha256:<12 hex>"``, or ``"sha256:<12 hex>"`` without a version in the metadata.

    The hash identifies the weights; ultralytics' ``version`` is the exporter's version, kept because
    it explains behaviour differences between exports of the same weights.
    """
    digest = f"sha256:{sha256_hex[:12]}"
    return f"{metadata.version}+{digest}" if metadata and metadata.version else digest


def class_names_for(metadata: UltralyticsMetadata, num_classes: int) -> list[str]:
    """Names for ``num_classes`` classes: the metadata's, else ``class{i}``."""
    if metadata.names and len(metadata.names) == num_classes:
        return list(metadata.names)
    return [f"class{i}" for i in range(num_classes)]


def check_output_shape(shape: tuple[int | str | None, ...], metadata: UltralyticsMetadata, where: str) -> int:
    """Validate a detect head's output ``(1, 4 + nc, N)`` and return ``nc``.

    Raises:
        ValueError: the output is not a plain detect head (segmentation/pose extras, end-to-end
            ``(1, N, 6)`` exports, or a class count that disagrees with the metadata's names).
    """
    task = metadata.task
    if task and task != "detect":
        raise ValueError(f"{where} is a {task!r} export; only 'detect' models are supported")
    if metadata.end2end:
        raise ValueError(f"{where} is an end-to-end export (NMS inside, no class scores); export with end2end=False")
    if len(shape) != 3 or not isinstance(shape[1], int) or shape[1] < 5:
        raise ValueError(f"{where} has output shape {list(shape)}; expected (1, 4 + classes, anchors) of a detect head")
    num_classes = shape[1] - 4
    if metadata.names and len(metadata.names) != num_classes:
        raise ValueError(
            f"{where} has output shape {list(shape)}, i.e. {num_classes} classes, but its metadata names "
            f"{len(metadata.names)}; is it a detect export?"
        )
    return num_classes


def letterbox(image: np.ndarray, size: tuple[int, int], pad_value: int = PAD_VALUE) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``image`` into ``size`` ``(height, width)`` keeping its aspect ratio, centred, padding the rest.

    Fixed-shape exports need exactly their input shape (a multiple of the stride), so the pad fills
    it completely, as ultralytics does for non-PyTorch models (``auto=False``). Rounding follows
    ``ultralytics.data.augment.LetterBox`` so the tensor is bit-identical to ultralytics'.

    Raises:
        ValueError: ``image`` is not an ``H x W x 3`` array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an H x W x 3 BGR image, got shape {image.shape}")
    import cv2  # here, not at module level: importing the detectors package stays light

    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (size[1] - new_w) / 2, (size[0] - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return image, LetterboxInfo(orig_shape=(h, w), gain=(new_w / w, new_h / h), pad=(left, top))


def to_input_tensor(image: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Letterboxed BGR ``uint8`` HWC to a contiguous RGB ``(1, 3, H, W)`` tensor in 0..1."""
    # The channel flip rides on the transpose copy; dividing in place avoids a second full-size array.
    tensor = np.ascontiguousarray(image.transpose(2, 0, 1)[::-1][None], dtype=np.float32)
    tensor /= 255.0
    return tensor if np.dtype(dtype) == np.float32 else tensor.astype(dtype)


def preprocess(
    image: np.ndarray, size: tuple[int, int], dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, LetterboxInfo]:
    """Letterbox a BGR frame to ``size`` and turn it into the model's input tensor."""
    boxed, info = letterbox(image, size)
    return to_input_tensor(boxed, dtype), info


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS as torchvision's: indices of kept boxes, by descending score.

    A box is dropped when its IoU with a kept, higher-scored box is *above* ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while order.size:
            i = order[0]
            keep.append(int(i))
            rest = order[1:]
            iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = iw * ih
            iou = inter / (areas[i] + areas[rest] - inter)
            # "not above" rather than "at most": a NaN IoU (two empty boxes) keeps the box, as in torchvision.
            order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-class NMS in one pass: boxes of different classes never suppress each other.

    Shifting each class's boxes by ``class_id * CLASS_OFFSET`` puts classes in disjoint regions, the
    trick ultralytics and torchvision use; boxes must lie within ``CLASS_OFFSET`` pixels.
    """
    offset = class_ids.astype(boxes.dtype)[:, None] * boxes.dtype.type(CLASS_OFFSET)
    return nms(boxes + offset, scores, iou_threshold)


def _to_frame(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map input-pixel boxes back into the frame in place (ultralytics' ``scale_boxes``: unpad, unscale, clip)."""
    boxes[:, [0, 2]] -= info.pad[0]
    boxes[:, [1, 3]] -= info.pad[1]
    boxes[:, [0, 2]] /= np.float32(info.gain[0])
    boxes[:, [1, 3]] /= np.float32(info.gain[1])
    h, w = info.orig_shape
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes


def _xyxy(cand: np.ndarray) -> np.ndarray:
    xy, half_wh = cand[:, :2], cand[:, 2:4] / 2
    return np.concatenate((xy - half_wh, xy + half_wh), axis=1)


def _overlaps_any(boxes: np.ndarray, others: np.ndarray, threshold: float) -> np.ndarray:
    """For each box, whether some box of ``others`` overlaps it with IoU at or above ``threshold``."""
    if len(others) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    iw = np.minimum(boxes[:, None, 2], others[None, :, 2]) - np.maximum(boxes[:, None, 0], others[None, :, 0])
    ih = np.minimum(boxes[:, None, 3], others[None, :, 3]) - np.maximum(boxes[:, None, 1], others[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    return (iou >= threshold).any(axis=1)


def decode(
    output: np.ndarray,
    info: LetterboxInfo,
    class_names: list[str],
    thresholds: YoloThresholds,
) -> list[Detection]:
    """Turn a raw ``(1, 4 + nc, N)`` output into detections in the frame's pixels, best first."""
    return decode_all(output, info, class_names, thresholds)[0]


def decode_all(
    output: np.ndarray,
    info: LetterboxInfo,
    class_names: list[str],
    thresholds: YoloThresholds,
) -> tuple[list[Detection], list[Detection]]:
    """Decode a raw ``(1, 4 + nc, N)`` output into ``(detections, weak candidates)``, both best first.

    Detections follow ultralytics' order of work exactly: confidence filter first (cheap, drops
    almost every anchor), then xywh to xyxy, top class, class-aware NMS, ``max_detections``, mapping
    back and clipping. Weak candidates are what the model half-saw: anchors whose top class score
    lies in ``(weak_threshold, conf_threshold]``, reduced by class-agnostic NMS, minus those that
    overlap a detection (a weaker twin of a detected box is the margin trigger's business). A model
    facing a world it was not trained on often detects nothing but leaves many of them.
    """
    preds = output[0]
    if preds.dtype != np.float32:
        preds = preds.astype(np.float32)
    scores_all = preds[4:]
    best = scores_all.max(axis=0)
    keep = best > thresholds.conf_threshold
    detections: list[Detection] = []
    kept_boxes = np.zeros((0, 4), dtype=np.float32)
    if keep.any():
        cand = preds[:, keep].T  # (k, 4 + nc): only the survivors are transposed
        class_scores = cand[:, 4:]
        class_ids = class_scores.argmax(axis=1)
        conf = class_scores[np.arange(len(cand)), class_ids]
        if len(cand) > MAX_NMS_CANDIDATES:
            top = np.argsort(-conf, kind="stable")[:MAX_NMS_CANDIDATES]
            cand, class_scores, class_ids, conf = cand[top], class_scores[top], class_ids[top], conf[top]
        boxes = _xyxy(cand)
        kept = batched_nms(boxes, conf, class_ids, thresholds.iou_threshold)[: thresholds.max_detections]
        kept_boxes = boxes[kept].copy()
        frame_boxes = _to_frame(boxes[kept], info)
        for row, k in enumerate(kept):
            cid = int(class_ids[k])
            detections.append(
                Detection(
                    box=tuple(float(v) for v in frame_boxes[row]),  # type: ignore[arg-type]
                    class_id=cid,
                    class_name=_name(class_names, cid),
                    confidence=float(conf[k]),
                    class_scores=class_scores[k].copy(),
                )
            )
    return detections, _weak_candidates(preds, best, keep, kept_boxes, info, class_names, thresholds)


def _name(class_names: list[str], cid: int) -> str:
    return class_names[cid] if cid < len(class_names) else f"class{cid}"


def _weak_candidates(
    preds: np.ndarray,
    best: np.ndarray,
    detected: np.ndarray,
    detected_boxes: np.ndarray,
    info: LetterboxInfo,
    class_names: list[str],
    thresholds: YoloThresholds,
) -> list[Detection]:
    if thresholds.weak_threshold <= 0 or thresholds.weak_threshold >= thresholds.conf_threshold:
        return []
    weak = (best > thresholds.weak_threshold) & ~detected
    if not weak.any():
        return []
    cand = preds[:, weak].T
    conf = best[weak]
    if len(cand) > MAX_WEAK_CANDIDATES:  # bounds the NMS loop on a frame full of noise
        top = np.argsort(-conf, kind="stable")[:MAX_WEAK_CANDIDATES]
        cand, conf = cand[top], conf[top]
    boxes = _xyxy(cand)
    kept = nms(boxes, conf, WEAK_NMS_IOU)
    kept = kept[~_overlaps_any(boxes[kept], detected_boxes, WEAK_NMS_IOU)][: thresholds.max_weak]
    class_ids = cand[kept, 4:].argmax(axis=1)
    frame_boxes = _to_frame(boxes[kept], info)
    return [
        Detection(
            box=tuple(float(v) for v in frame_boxes[row]),  # type: ignore[arg-type]
            class_id=int(class_ids[row]),
            class_name=_name(class_names, int(class_ids[row])),
            confidence=float(conf[k]),
        )
        for row, k in enumerate(kept)
    ]


class YoloExportDetector(Detector):
    """A backend that runs an ultralytics detect export on a fixed-size input (ONNX Runtime, TensorRT).

    Subclasses set ``input_size``, ``_input_dtype``, ``class_names`` and ``config`` and implement
    :meth:`infer`; letterboxing and decoding are shared so every backend returns the same boxes.
    """

    input_size: tuple[int, int]
    _input_dtype: np.dtype | type
    config: YoloThresholds

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, LetterboxInfo]:
        """Letterbox a BGR frame into the model's input tensor."""
        return preprocess(image, self.input_size, self._input_dtype)

    @abc.abstractmethod
    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on a prepared tensor; returns the raw ``(1, 4 + nc, N)`` output."""

    def infer_all(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the model; returns the raw output and the raw embedding (``None`` without that output)."""
        return self.infer(tensor), None

    def postprocess(self, output: np.ndarray, info: LetterboxInfo) -> list[Detection]:
        """Decode a raw output into detections in the original frame's pixels."""
        return decode(output, info, self.class_names, self.config)

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detect_all(image).detections

    def detect_all(self, image: np.ndarray) -> DetectorOutput:
        tensor, info = self.preprocess(image)
        output, embedding = self.infer_all(tensor)
        detections, weak = decode_all(output, info, self.class_names, self.config)
        if embedding is not None:
            embedding = np.array(embedding, dtype=np.float32).ravel()  # a copy: TensorRT reuses its buffer
        return DetectorOutput(detections, weak, embedding)


def read_reference(metadata: Mapping[str, str], embedding_dim: int | None, where: str) -> ReferenceStats | None:
    """The model's reference statistics, if it carries usable ones; a broken reference is logged, not fatal.

    A model without them still detects; only the image-novelty trigger loses its comparison with
    the training images.
    """
    try:
        reference = ReferenceStats.from_metadata(metadata)
    except ReferenceError as err:
        logger.warning("%s: ignoring its reference statistics: %s", where, err)
        return None
    if reference is not None and reference.dim != embedding_dim:
        logger.warning(
            "%s: ignoring its reference statistics: %d-dimensional, but the model's embedding has %s values",
            where,
            reference.dim,
            embedding_dim,
        )
        return None
    return reference

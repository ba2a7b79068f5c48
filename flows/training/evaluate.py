"""Evaluate the artifact the edge runs: an ONNX export, through the edge agent's own detector, on a YOLO split.

What ships is what is measured: :func:`evaluate_onnx` loads the model with
:class:`edge_agent.detectors.onnxruntime.OnnxRuntimeDetector` (the same letterbox, decode and NMS a
device runs) at evaluation thresholds, and scores its detections against the split's labels.

Metrics follow the COCO / ultralytics definitions, so the numbers are comparable with
``YOLO(model).val()``:

* Matching: per image, detections in descending confidence each take the best unclaimed
  same-class truth box, separately at each IoU threshold 0.50, 0.55, ..., 0.95
  (:data:`IOU_THRESHOLDS`).
* AP per class and threshold: the precision envelope (precision made monotone from the right)
  integrated over recall by 101-point interpolation (ultralytics' ``compute_ap``).
* mAP50 is the mean over classes of AP at IoU 0.5, mAP50-95 the mean over classes and the ten
  thresholds; the mean runs over the classes that have at least one labelled instance in the split.
* The confusion matrix counts, at confidence :data:`CONFUSION_CONF` and IoU :data:`CONFUSION_IOU`,
  predicted class (rows) against true class (columns); the last row and column are background
  (a false positive is in the background column, a miss in the background row).

Only numpy and the edge agent's detector code: no torch, so evaluation runs where the edge stack is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgeloop.matching import box_iou

logger = logging.getLogger(__name__)

#: IoU thresholds of mAP50-95.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
#: Detection threshold for mAP: everything the model says counts, ranked by confidence (ultralytics' val).
EVAL_CONF = 0.001
#: NMS IoU during evaluation (ultralytics' val default).
EVAL_NMS_IOU = 0.7
#: Detections kept per image during evaluation (ultralytics' val default).
EVAL_MAX_DET = 300
#: Operating point of the confusion matrix (ultralytics' ConfusionMatrix defaults).
CONFUSION_CONF = 0.25
CONFUSION_IOU = 0.45
#: Recall points of the interpolated AP.
_AP_RECALL = np.linspace(0.0, 1.0, 101)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class EvaluationError(Exception):
    """A model or data set cannot be evaluated (unreadable data.yaml, no such split, model fails to load)."""


# -- data sets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A YOLO ``data.yaml``, resolved: the data set root, class names and split locations."""

    root: Path
    names: list[str]
    splits: dict[str, list[Path]]


def read_data_yaml(data_yaml: Path) -> DataSpec:
    """Read a YOLO ``data.yaml``; a relative ``path:`` is taken from the file's folder.

    Raises:
        EvaluationError: the file is unreadable, or has no ``names``.
    """
    try:
        doc = yaml.safe_load(Path(data_yaml).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EvaluationError(f"cannot read {data_yaml}: {err}") from err
    if not isinstance(doc, dict) or "names" not in doc:
        raise EvaluationError(f"{data_yaml} is not a YOLO data.yaml (no 'names')")
    root = Path(doc.get("path") or ".")
    if not root.is_absolute():
        root = (Path(data_yaml).resolve().parent / root).resolve()
    raw = doc["names"]
    names = [str(raw[i]) for i in sorted(raw)] if isinstance(raw, dict) else [str(n) for n in raw]
    splits: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        value = doc.get(split)
        if not value:
            continue
        entries = value if isinstance(value, list) else [value]
        splits[split] = [p if (p := Path(str(e))).is_absolute() else root / p for e in entries]
    return DataSpec(root=root, names=names, splits=splits)


def label_path(image: Path) -> Path:
    """The label file of ``image`` by YOLO's rule: the last ``images`` folder becomes ``labels``, suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def split_images(data_yaml: Path, split: str) -> list[Path]:
    """The images of ``split`` (folders searched recursively, or ``.txt`` lists of paths), sorted.

    Raises:
        EvaluationError: the data set names no such split, or it holds no images.
    """
    spec = read_data_yaml(data_yaml)
    if split not in spec.splits:
        raise EvaluationError(f"{data_yaml} has no {split!r} split (it has {', '.join(spec.splits) or 'none'})")
    images: list[Path] = []
    for entry in spec.splits[split]:
        if entry.is_dir():
            images += [p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif entry.suffix == ".txt" and entry.is_file():
            for line in entry.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else spec.root / p)
    if not images:
        raise EvaluationError(f"the {split!r} split of {data_yaml} holds no images")
    return sorted(images)


def read_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(class ids (n,), xyxy pixel boxes (n, 4))`` of a YOLO label file; a missing file is an empty image."""
    if not path.is_file():
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    data = np.array([[float(v) for v in row[:5]] for row in rows])
    cx, cy, w, h = data[:, 1] * width, data[:, 2] * height, data[:, 3] * width, data[:, 4] * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return data[:, 0].astype(np.int64), boxes


# -- metrics ----------------------------------------------------------------------------------------


def match_predictions(
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    true_boxes: np.ndarray,
    true_classes: np.ndarray,
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """Which predictions (in descending confidence) are true positives at each IoU threshold: ``(n_pred, t)``.

    Each prediction takes the best same-class truth box not yet claimed at that threshold.
    """
    correct = np.zeros((len(pred_boxes), len(thresholds)), dtype=bool)
    if len(pred_boxes) == 0 or len(true_boxes) == 0:
        return correct
    iou = box_iou(true_boxes, pred_boxes) * (true_classes[:, None] == pred_classes[None, :])
    claimed = np.zeros((len(true_boxes), len(thresholds)), dtype=bool)
    for j in np.flatnonzero((iou >= thresholds.min()).any(axis=0)):
        available = np.where(claimed, 0.0, iou[:, j, None])
        best = available.argmax(axis=0)
        correct[j] = available[best, np.arange(len(thresholds))] >= thresholds
        claimed[best, np.arange(len(thresholds))] |= correct[j]
    return correct


def interpolated_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, 101-point interpolated over recall (COCO, ultralytics' compute_ap)."""
    last = recall[-1] if len(recall) else 1.0
    mrec = np.concatenate(([0.0], recall, [last], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(np.trapezoid(np.interp(_AP_RECALL, mrec, mpre), _AP_RECALL))


def average_precision(
    tp: np.ndarray, conf: np.ndarray, pred_classes: np.ndarray, true_classes: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """AP of every class at every IoU threshold, from all the split's predictions pooled.

    Args:
        tp: ``(n_pred, t)`` true-positive flags from :func:`match_predictions`.
        conf: ``(n_pred,)`` confidences.
        pred_classes: ``(n_pred,)`` predicted class ids.
        true_classes: Class id of every labelled instance in the split.
        num_classes: Number of classes.

    Returns:
        ``(ap (num_classes, t), instances (num_classes,))``; a class without instances has AP 0 and
        is left out of the mean by :class:`Evaluation`.
    """
    order = np.argsort(-conf, kind="stable")
    tp, pred_classes = tp[order], pred_classes[order]
    instances = np.bincount(true_classes.astype(np.int64), minlength=num_classes)[:num_classes]
    ap = np.zeros((num_classes, tp.shape[1]))
    for c in range(num_classes):
        mine = pred_classes == c
        if instances[c] == 0 or not mine.any():
            continue
        tpc = tp[mine].cumsum(axis=0)
        fpc = (1 - tp[mine]).cumsum(axis=0)
        recall = tpc / (instances[c] + 1e-16)
        precision = tpc / (tpc + fpc)
        for j in range(tp.shape[1]):
            ap[c, j] = interpolated_ap(recall[:, j], precision[:, j])
    return ap, instances


def confusion_counts(
    matrix: np.ndarray,
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    conf: np.ndarray,
    true_boxes: np.ndarray,
    true_classes: np.ndarray,
) -> None:
    """Add one image to ``matrix`` (``(nc + 1, nc + 1)``: predicted rows, true columns, background last).

    Detections under :data:`CONFUSION_CONF` are ignored; a truth box and a detection pair up when their
    IoU reaches :data:`CONFUSION_IOU` (class-agnostic, best overlap first, each used once).
    """
    bg = matrix.shape[0] - 1
    keep = conf >= CONFUSION_CONF
    pred_boxes, pred_classes = pred_boxes[keep], pred_classes[keep]
    iou = box_iou(true_boxes, pred_boxes)
    pairs = np.argwhere(iou >= CONFUSION_IOU)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")] if len(pairs) else pairs
    used_t, used_p = set(), set()
    for t, p in pairs:
        if t in used_t or p in used_p:
            continue
        used_t.add(t)
        used_p.add(p)
        matrix[pred_classes[p], true_classes[t]] += 1
    for t in range(len(true_boxes)):
        if t not in used_t:
            matrix[bg, true_classes[t]] += 1
    for p in range(len(pred_boxes)):
        if p not in used_p:
            matrix[pred_classes[p], bg] += 1


@dataclass(frozen=True)
class ClassMetrics:
    """One class's result on the split."""

    name: str
    instances: int
    ap50: float
    ap50_95: float


@dataclass(frozen=True)
class Evaluation:
    """A model's result on one split.

    Attributes:
        model: The model file evaluated.
        split: The split's name.
        images: Images evaluated.
        instances: Labelled objects in them.
        map50: Mean AP at IoU 0.5 over the classes with instances.
        map50_95: Mean AP over IoU 0.50:0.95 and those classes.
        precision: At the confusion matrix's operating point, over all classes.
        recall: Likewise.
        per_class: Every class of the data set, in class-id order.
        confusion: ``(nc + 1) x (nc + 1)`` counts, predicted rows, true columns, background last.
    """

    model: str
    split: str
    images: int
    instances: int
    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: list[ClassMetrics] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.per_class]

    def class_ap(self) -> dict[str, float]:
        """AP50-95 of every class that has instances in the split."""
        return {c.name: c.ap50_95 for c in self.per_class if c.instances}

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for the registry: ``map50``, ``map50_95``, ``precision``, ``recall``, ``ap50_95/<class>``."""
        out = {
            f"{prefix}map50": self.map50,
            f"{prefix}map50_95": self.map50_95,
            f"{prefix}precision": self.precision,
            f"{prefix}recall": self.recall,
        }
        out.update({f"{prefix}ap50_95/{name}": ap for name, ap in self.class_ap().items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        per_class = [ClassMetrics(**c) for c in data.get("per_class", [])]
        return cls(**{**data, "per_class": per_class})


def summarize(
    model: str,
    split: str,
    names: Sequence[str],
    per_image: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> Evaluation:
    """Score ``(pred_boxes, pred_classes, conf, true_boxes, true_classes)`` per image into an :class:`Evaluation`."""
    nc = len(names)
    tps, confs, pcls, tcls = [], [], [], []
    matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    images = 0
    for pred_boxes, pred_classes, conf, true_boxes, true_classes in per_image:
        images += 1
        order = np.argsort(-conf, kind="stable")
        pred_boxes, pred_classes, conf = pred_boxes[order], pred_classes[order], conf[order]
        tps.append(match_predictions(pred_boxes, pred_classes, true_boxes, true_classes))
        confs.append(conf)
        pcls.append(pred_classes)
        tcls.append(true_classes)
        confusion_counts(matrix, pred_boxes, pred_classes, conf, true_boxes, true_classes)
    tp = np.concatenate(tps) if tps else np.zeros((0, len(IOU_THRESHOLDS)), dtype=bool)
    ap, instances = average_precision(
        tp,
        np.concatenate(confs) if confs else np.zeros(0),
        np.concatenate(pcls) if pcls else np.zeros(0, dtype=np.int64),
        np.concatenate(tcls) if tcls else np.zeros(0, dtype=np.int64),
        nc,
    )
    present = instances > 0
    hits = int(np.trace(matrix[:nc, :nc]))
    predicted, actual = int(matrix[:nc, :].sum()), int(matrix[:, :nc].sum())
    return Evaluation(
        model=model,
        split=split,
        images=images,
        instances=int(instances.sum()),
        map50=float(ap[present, 0].mean()) if present.any() else 0.0,
        map50_95=float(ap[present].mean()) if present.any() else 0.0,
        precision=hits / predicted if predicted else 0.0,
        recall=hits / actual if actual else 0.0,
        per_class=[
            ClassMetrics(name=str(n), instances=int(instances[i]), ap50=float(ap[i, 0]), ap50_95=float(ap[i].mean()))
            for i, n in enumerate(names)
        ],
        confusion=matrix.tolist(),
    )


# -- the ONNX model on a split -------------------------------------------------------------------------


def evaluate_onnx(
    onnx_path: Path,
    data_yaml: Path,
    split: str = "test",
    *,
    threads: int | None = None,
    max_images: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Run ``onnx_path`` through the edge agent's ONNX Runtime detector on ``split`` of ``data_yaml`` and score it.

    ``max_images`` evaluates an evenly spread, deterministic subset (for a training split read only
    to gauge the train/val gap); the frozen test split is always evaluated whole.

    The model's classes are matched to the data set's by name; detections of a class the data set
    does not have are dropped (they cannot be right or wrong here), and a data set class the model
    does not know gets AP 0.

    Raises:
        EvaluationError: the data set or split is unusable, or the model does not load.
    """
    import cv2

    from edge_agent.detectors.base import DetectorError
    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig

    spec = read_data_yaml(data_yaml)
    images = split_images(data_yaml, split)
    if max_images is not None and len(images) > max_images:
        step = len(images) / max_images
        images = [images[int(i * step)] for i in range(max_images)]
    config = OnnxRuntimeDetectorConfig(
        model=Path(onnx_path),
        conf_threshold=EVAL_CONF,
        iou_threshold=EVAL_NMS_IOU,
        max_detections=EVAL_MAX_DET,
        weak_threshold=0.0,
        intra_op_threads=threads,
    )
    try:
        detector = OnnxRuntimeDetector(config)
    except DetectorError as err:
        raise EvaluationError(str(err)) from err
    index = {name: i for i, name in enumerate(spec.names)}
    to_data = np.array([index.get(name, -1) for name in detector.class_names], dtype=np.int64)
    if (to_data < 0).all():
        raise EvaluationError(
            f"{onnx_path} knows none of the data set's classes ({', '.join(spec.names)}); "
            f"its classes: {', '.join(detector.class_names[:10])}"
        )

    def per_image() -> Iterable[tuple[np.ndarray, ...]]:
        for n, path in enumerate(images):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise EvaluationError(f"cannot read image {path}")
            h, w = image.shape[:2]
            true_classes, true_boxes = read_labels(label_path(path), w, h)
            dets = detector.detect(image)
            boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
            classes = to_data[np.array([d.class_id for d in dets], dtype=np.int64)]
            conf = np.array([d.confidence for d in dets], dtype=np.float64)
            known = classes >= 0
            if progress is not None:
                progress(n + 1, len(images))
            yield boxes[known], classes[known], conf[known], true_boxes, true_classes

    try:
        result = summarize(str(onnx_path), split, spec.names, per_image())
    finally:
        detector.close()
    logger.info(
        "%s on %s/%s: mAP50 %.4f, mAP50-95 %.4f (%d images, %d instances)",
        onnx_path,
        data_yaml,
        split,
        result.map50,
        result.map50_95,
        result.images,
        result.instances,
    )
    return result


__all__ = [
    "ClassMetrics",
    "DataSpec",
    "Evaluation",
    "EvaluationError",
    "average_precision",
    "evaluate_onnx",
    "interpolated_ap",
    "match_predictions",
    "read_data_yaml",
    "split_images",
]

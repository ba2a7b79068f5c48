"""Match a model's predictions to ground truth: which frames hold a detection error, and of what kind.

The yardstick of the trigger benchmark, the tests that check the triggers against known truth, and
the demo's oracle. A prediction that overlaps no unmatched same-class truth box at ``iou`` is a
false positive (``fp``); a truth box no prediction matched is a miss (``miss``); a wrong class is
both. Matching is greedy by descending confidence, as in COCO-style evaluation. Only numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeloop.domain import Detection

#: IoU at which a prediction matches a truth box (the PASCAL / mAP50 criterion).
DEFAULT_IOU = 0.5

Box = tuple[float, float, float, float]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every ``xyxy`` box in ``a`` (n, 4) with every box in ``b`` (m, 4): an (n, m) matrix."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def error_counts(
    predictions: Sequence[Detection], truth: Sequence[tuple[int, Box]], iou: float = DEFAULT_IOU
) -> tuple[int, int]:
    """``(false positives, misses)`` of one frame: predictions no unmatched same-class truth box
    takes at ``iou`` (greedy by descending confidence), and truth boxes no prediction took.

    Args:
        predictions: What the model reported at its operating point.
        truth: ``(class_id, xyxy box)`` of every labelled object, in the predictions' pixels.
        iou: Overlap at which a same-class prediction matches a truth box.
    """
    overlap = box_iou(np.array([d.box for d in predictions]), np.array([b for _, b in truth]))
    same = np.array([[d.class_id == c for c, _ in truth] for d in predictions], dtype=bool).reshape(overlap.shape)
    overlap = np.where(same, overlap, 0.0)
    taken = np.zeros(len(truth), dtype=bool)
    false_positives = 0
    for i in sorted(range(len(predictions)), key=lambda k: -predictions[k].confidence):
        candidates = np.where(~taken & (overlap[i] >= iou), overlap[i], -1.0)
        j = int(np.argmax(candidates)) if len(candidates) else -1
        if j >= 0 and candidates[j] >= iou:
            taken[j] = True
        else:
            false_positives += 1
    return false_positives, int((~taken).sum())


def frame_errors(
    predictions: Sequence[Detection], truth: Sequence[tuple[int, Box]], iou: float = DEFAULT_IOU
) -> set[str]:
    """The error kinds of one frame: a subset of ``{"fp", "miss"}`` (empty: the frame is right).

    Args:
        predictions: What the model reported at its operating point.
        truth: ``(class_id, xyxy box)`` of every labelled object, in the predictions' pixels.
        iou: Overlap at which a same-class prediction matches a truth box.
    """
    false_positives, misses = error_counts(predictions, truth, iou)
    return {kind for kind, n in (("fp", false_positives), ("miss", misses)) if n}

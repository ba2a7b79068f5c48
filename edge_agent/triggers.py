"""Uncertainty scoring: decide which frames the edge agent keeps, rank them, and say why.

Every frame's detector output passes through :class:`UncertaintyScorer`. Each trigger below looks
for one kind of evidence that the detector is wrong about this frame; each is switched on or off
and tuned in :class:`TriggersConfig`, and each that fires adds a :class:`~edgeloop.domain.Reason`
(trigger name, score in [0, 1], readable detail) to the frame. The reasons travel with the frame
and become tags for the curators, so they are written for people ("dog 0.41 in [0.25, 0.60)").

================ ==========================================================================
trigger          fires when
================ ==========================================================================
confidence_band  a detection's confidence lies in ``[low, high)``
margin           top-1 minus top-2 class score is below ``max_margin`` (needs class scores)
entropy          normalised entropy of the class scores is above ``min_entropy`` (needs them)
weak_evidence    the model half-saw objects: candidates under the detection threshold, none
                 overlapping a detection (the model gone blind on a changed world)
image_novelty    the frame's image embedding is far from every training image of the model
                 (reference statistics in the model file), or, in a stream, from the camera's
                 recent frames
novelty          (stream) a confident box has no same-class match in the camera's recent frames
flicker          (stream) a confident object is in frame t-1 and not in frame t, or the reverse
count_jump       (stream) the number of detections moved ``min_jump`` or more from the median
random           a ``rate`` share of frames, drawn independently of everything else
================ ==========================================================================

**What the score means.** Each trigger grades its evidence per item (a box, a candidate, an
object that vanished) in [0, 1], and a trigger's score is the noisy-OR ``1 - prod(1 - w * g_i)``
over its items, ``w`` being the trigger's ``weight``: the chance that one item of full evidence
marks a detection error. The frame's score is the noisy-OR of its triggers' scores (``random``
left out). Read it as an estimate of the probability that the frame holds at least one detection
error (a false positive, a wrong class or a miss), assuming the pieces of evidence independent.
Two consequences: more evidence ranks higher (three uncertain boxes beat one, a large confident
object vanishing beats a small weak one), and no single item reaches 1, so a frame where several
triggers agree outranks one that set off a single trigger. The default weights are the measured
error rates of each trigger's firings on synthetic scenes (``bench/triggers.py``,
``docs/benchmarks.md``); a deployment can refit them.

**Streams and stills.** ``novelty``, ``flicker``, ``count_jump`` and the recent-frames half of
``image_novelty`` compare a frame with its camera's previous frames. That only means something
for a stream (a video, a camera); a folder of unrelated photos is scored with ``stream=False``
unless the user says its images are consecutive frames (``source.sequence: true``).

The scorer keeps a short history per source (camera). Scoring is numpy on small arrays: well
under a millisecond for a few dozen detections (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydantic import Field, model_validator

from edge_agent.keep import AdaptiveKeep, KeepConfig, source_rng
from edgeloop.config_base import StrictModel
from edgeloop.domain import Detection, Reason
from edgeloop.embedding import ReferenceStats, nearest_distance


class Trigger(StrEnum):
    """Trigger names, as they appear in ``Reason.trigger`` and in the config, in the order they run."""

    CONFIDENCE_BAND = "confidence_band"
    MARGIN = "margin"
    ENTROPY = "entropy"
    WEAK_EVIDENCE = "weak_evidence"
    IMAGE_NOVELTY = "image_novelty"
    NOVELTY = "novelty"
    FLICKER = "flicker"
    COUNT_JUMP = "count_jump"
    RANDOM = "random"


# --------------------------------------------------------------------------------------- config


class ConfidenceBandConfig(StrictModel):
    """A detection whose confidence is neither clearly low nor clearly high."""

    enabled: bool = Field(default=True, description="Whether the confidence band trigger runs.")
    weight: float = Field(
        default=0.35,
        gt=0.0,
        le=1.0,
        description="Score of one detection in the middle of the band (the edges score less); several add up "
        "by noisy-OR.",
    )
    low: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Lower edge of the band (inclusive): below it a box is noise.",
    )
    high: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="Upper edge of the band (exclusive): from it on a box is sure.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ConfidenceBandConfig:
        if not self.low < self.high:
            raise ValueError(f"confidence_band.low ({self.low}) must be below high ({self.high})")
        return self


class MarginConfig(StrictModel):
    """A detection whose best class barely beats the runner-up."""

    enabled: bool = Field(default=True, description="Whether the class-margin trigger runs.")
    weight: float = Field(
        default=0.35,
        gt=0.0,
        le=1.0,
        description="Score of one detection whose top two classes tie; several add up by noisy-OR.",
    )
    max_margin: float = Field(
        default=0.15,
        gt=0.0,
        le=1.0,
        description="Fires when top-1 minus top-2 class score is below this (in the detector's score units).",
    )
    min_confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Only detections at or above this confidence count; None means confidence_band.low.",
    )


class EntropyConfig(StrictModel):
    """A detection whose class scores are spread over several classes.

    YOLO-style heads score every class with an independent sigmoid, so the vector does not sum to 1;
    it is normalised to sum 1 before the entropy is taken, and the entropy is divided by ``log(k)``
    so it lies in [0, 1]. Only the ``top_k`` highest scores are used: with 80 classes the tiny
    sigmoid tails of the other 78 classes carry so much entropy that a sure detection and a
    two-way confusion end up close together; the top few scores hold the actual confusion.
    """

    enabled: bool = Field(default=True, description="Whether the class-entropy trigger runs.")
    weight: float = Field(
        default=0.35,
        gt=0.0,
        le=1.0,
        description="Score of one detection with uniform class scores; several add up by noisy-OR.",
    )
    min_entropy: float = Field(
        default=0.4,
        ge=0.0,
        lt=1.0,
        description="Fires when the normalised entropy (0 = one class, 1 = uniform) is above this.",
    )
    top_k: int | None = Field(
        default=5,
        ge=2,
        description="Use the k highest class scores (all when None or when there are fewer classes).",
    )
    min_confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "Only detections at or above this confidence count (noise boxes have flat, meaningless "
            "class scores); None means confidence_band.low."
        ),
    )


class NoveltyConfig(StrictModel):
    """A confident box unlike anything this camera showed recently."""

    enabled: bool = Field(default=True, description="Whether the novelty trigger runs.")
    weight: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Score when every confident box of the frame is new (a share of them scores its share).",
    )
    iou: float = Field(
        default=0.5, gt=0.0, le=1.0, description="A same-class box with IoU at or above this is a match."
    )
    min_confidence: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        description="Only detections at or above this can be novel (noise can't).",
    )
    window_frames: int = Field(default=30, ge=1, description="Compare with at most this many previous frames.")
    window_s: float | None = Field(
        default=60.0,
        gt=0.0,
        description="...and only with frames at most this many seconds old (None: no limit).",
    )
    warmup_frames: int = Field(
        default=5,
        ge=1,
        description="Stay silent until the window holds this many frames (so a camera's first frame isn't all novel).",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> NoveltyConfig:
        if self.warmup_frames > self.window_frames:
            raise ValueError(
                f"novelty.warmup_frames ({self.warmup_frames}) exceeds window_frames ({self.window_frames}): "
                "the trigger could never fire"
            )
        return self


class FlickerConfig(StrictModel):
    """A confident object present in one frame and gone in the next, or the reverse."""

    enabled: bool = Field(default=True, description="Whether the flicker trigger runs.")
    weight: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Score of one large, confident, long-seen object vanishing; weaker evidence scores less.",
    )
    iou: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Same-class boxes of consecutive frames with IoU at or above this are one object "
        "(lower than novelty's, since objects move between frames).",
    )
    min_confidence: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Only an object this confident in one frame counts when it is missing from the other.",
    )
    max_gap_s: float | None = Field(
        default=2.0,
        gt=0.0,
        description="Frames further apart than this are not compared (objects may come and go in between).",
    )
    ignore_border_px: float | None = Field(
        default=4.0,
        ge=0.0,
        description="Ignore boxes within this many pixels of the image border (objects entering or leaving); "
        "needs the image size passed to score(); None disables.",
    )
    persist_frames: int = Field(
        default=3,
        ge=1,
        description="An object seen in this many consecutive frames before it vanished counts in full; one seen "
        "for fewer counts in proportion (a one-frame blip is weak evidence).",
    )
    full_size: float = Field(
        default=0.01,
        gt=0.0,
        le=1.0,
        description="An object covering this share of the image or more counts in full; smaller ones count "
        "by the square root of their share (tiny objects come and go in every detector). Needs the image size.",
    )
    appeared_factor: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Appearing objects count this much of a vanishing one: a vanished object is a likely miss "
        "in this frame, an appeared one a false positive here or a miss in the frame before.",
    )


class WeakEvidenceConfig(StrictModel):
    """Objects the model half-saw: candidates under the detection threshold (a model gone blind)."""

    enabled: bool = Field(default=True, description="Whether the weak-evidence trigger runs.")
    weight: float = Field(
        default=0.15,
        gt=0.0,
        le=1.0,
        description="Score of one candidate just under the detection threshold (weaker ones score less); "
        "many add up by noisy-OR.",
    )
    floor: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="Candidates at or below this score are noise. The detector reports candidates above its own "
        "weak_threshold; this floor can only raise that.",
    )
    min_candidates: int = Field(
        default=2,
        ge=1,
        description="Fires only with at least this many weak candidates (one faint blob is in most frames).",
    )


class ImageNoveltyConfig(StrictModel):
    """A frame unlike the model's training images, or unlike what its camera just showed.

    Needs a model with an image embedding; the comparison with training images also needs the
    reference statistics in the model file (``edgeloop models prepare``). Distances are graded on
    the reference's own scale: ``q50`` and ``q99`` of a training image's distance to its nearest
    other training image.
    """

    enabled: bool = Field(default=True, description="Whether the image-novelty trigger runs.")
    # Novel is not wrong: a frame unlike the training images holds an error less often than one with
    # an uncertain box (bench/triggers.py), so it ranks after concrete evidence, yet is kept.
    weight: float = Field(
        default=0.35,
        gt=0.0,
        le=1.0,
        description="Score of a frame far outside the training images (or a full scene change in a stream).",
    )
    span: float = Field(
        default=1.0,
        gt=0.0,
        description="Past the reference's q99, a distance scores in full after this many (q99 - q50) more.",
    )
    window_frames: int = Field(
        default=30, ge=1, description="In a stream, compare with at most this many previous frames of the camera."
    )
    window_s: float | None = Field(
        default=60.0, gt=0.0, description="...and only with frames at most this many seconds old (None: no limit)."
    )


class CountJumpConfig(StrictModel):
    """The number of detections jumps away from its recent median."""

    enabled: bool = Field(default=True, description="Whether the count-jump trigger runs.")
    weight: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Score of a jump of twice min_jump or more (smaller jumps score less).",
    )
    min_jump: int = Field(default=3, ge=1, description="Fires when |count - recent median| is at least this.")
    min_confidence: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Only detections at or above this are counted."
    )
    window_frames: int = Field(default=10, ge=1, description="The median is over at most this many previous frames.")
    min_history: int = Field(default=3, ge=1, description="Stay silent until this many previous frames are known.")

    @model_validator(mode="after")
    def _history_fits(self) -> CountJumpConfig:
        if self.min_history > self.window_frames:
            raise ValueError(
                f"count_jump.min_history ({self.min_history}) exceeds window_frames ({self.window_frames}): "
                "the trigger could never fire"
            )
        return self


class RandomConfig(StrictModel):
    """A small share of frames kept whatever they show: the server's unbiased sample."""

    enabled: bool = Field(default=True, description="Whether a random share of frames is kept.")
    rate: float = Field(default=0.01, ge=0.0, le=1.0, description="Share of frames kept at random.")


class TriggersConfig(StrictModel):
    """Which uncertainty triggers run, their thresholds, and when a frame is kept."""

    confidence_band: ConfidenceBandConfig = Field(
        default_factory=ConfidenceBandConfig, description="Detections of middling confidence."
    )
    margin: MarginConfig = Field(default_factory=MarginConfig, description="Small top-1 / top-2 class-score margin.")
    entropy: EntropyConfig = Field(default_factory=EntropyConfig, description="High class-score entropy.")
    novelty: NoveltyConfig = Field(default_factory=NoveltyConfig, description="Boxes unlike recent ones.")
    flicker: FlickerConfig = Field(default_factory=FlickerConfig, description="Objects appearing or vanishing.")
    count_jump: CountJumpConfig = Field(
        default_factory=CountJumpConfig, description="Sudden change in the number of detections."
    )
    weak_evidence: WeakEvidenceConfig = Field(
        default_factory=WeakEvidenceConfig, description="Candidates under the detection threshold."
    )
    image_novelty: ImageNoveltyConfig = Field(
        default_factory=ImageNoveltyConfig, description="A frame unlike the training images or the recent frames."
    )
    random: RandomConfig = Field(default_factory=RandomConfig, description="Random share kept for monitoring.")
    # Above 0 so that a trigger that barely fired (a confidence at the band's edge, a margin just
    # under its threshold) does not keep a frame on its own.
    min_score: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="A frame is kept when a trigger fired and the combined score is at least this "
        "(random picks are kept regardless).",
    )
    keep: KeepConfig = Field(
        default_factory=KeepConfig,
        description="And when its score ranks in the top share of its camera's recent frames (edge_agent/keep.py).",
    )


# ------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True, slots=True)
class Verdict:
    """The scorer's answer for one frame.

    Attributes:
        keep: Whether the agent should keep (store and upload) the frame.
        score: Combined uncertainty in [0, 1]; the upload queue's priority. Random picks add
            nothing to it, so a frame kept only at random scores 0 and never outranks a frame
            kept for a real reason.
        reasons: Every trigger that fired, in a fixed order, whether or not the frame is kept.
    """

    keep: bool
    score: float
    reasons: list[Reason]

    @property
    def triggers(self) -> list[str]:
        """Names of the triggers that fired."""
        return [r.trigger for r in self.reasons]


# ------------------------------------------------------------------------------ frame snapshot


@dataclass(slots=True)
class _Snapshot:
    """A frame's detections as arrays: what the history stores and what the triggers read."""

    timestamp: float
    boxes: np.ndarray  # (n, 4) float64, xyxy
    classes: np.ndarray  # (n,) int64
    confs: np.ndarray  # (n,) float64
    names: list[str]
    embedding: np.ndarray | None = None  # projected by `reference`: comparable only under the same one
    reference: ReferenceStats | None = None

    @classmethod
    def of(
        cls,
        detections: Sequence[Detection],
        timestamp: float,
        embedding: np.ndarray | None = None,
        reference: ReferenceStats | None = None,
    ) -> _Snapshot:
        n = len(detections)
        boxes = np.array([d.box for d in detections], dtype=np.float64).reshape(n, 4)
        classes = np.fromiter((d.class_id for d in detections), dtype=np.int64, count=n)
        confs = np.fromiter((d.confidence for d in detections), dtype=np.float64, count=n)
        projected = None
        if embedding is not None and reference is not None and embedding.shape == reference.mean.shape:
            projected = reference.project(embedding)
        names = [d.class_name for d in detections]
        return cls(timestamp, boxes, classes, confs, names, projected, reference if projected is not None else None)

    def __len__(self) -> int:
        return len(self.names)


def _noisy_or(scores: Iterable[float] | np.ndarray) -> float:
    """``1 - prod(1 - s)`` over scores clipped to [0, 1]: the chance that at least one holds."""
    s = np.clip(np.fromiter(scores, dtype=np.float64) if not isinstance(scores, np.ndarray) else scores, 0.0, 1.0)
    return float(1.0 - np.prod(1.0 - s))


def _fmt(value: float, bound: float) -> str:
    """``value`` with enough decimals (2 to 4) that it does not print as equal to ``bound``.

    A confidence of 0.5996 in ``[0.25, 0.60)`` must not read "0.60 in [0.25, 0.60)".
    """
    for digits in (2, 3, 4):
        if round(value, digits) != round(bound, digits):
            return f"{value:.{digits}f}"
    return f"{value:.4f}"


def _recent(history: deque[_Snapshot], now: float, frames: int, seconds: float | None) -> list[_Snapshot]:
    """The newest ``frames`` snapshots no older than ``seconds``, newest first."""
    window: list[_Snapshot] = []
    for past in reversed(history):
        if len(window) >= frames:
            break
        if seconds is not None and now - past.timestamp > seconds:
            break  # older frames are older still
        window.append(past)
    return window


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4): an (n, m) matrix."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    # Column by column: broadcasting whole (n, m, 2) corner arrays is several times slower.
    ax1, ay1, ax2, ay2 = (a[:, k, None] for k in range(4))
    bx1, by1, bx2, by2 = (b[None, :, k] for k in range(4))
    iw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    ih = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    inter = np.maximum(iw, 0.0, out=iw) * np.maximum(ih, 0.0, out=ih)
    area_a = np.maximum(ax2 - ax1, 0.0) * np.maximum(ay2 - ay1, 0.0)
    area_b = np.maximum(bx2 - bx1, 0.0) * np.maximum(by2 - by1, 0.0)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _same_class_iou(
    boxes_a: np.ndarray, classes_a: np.ndarray, boxes_b: np.ndarray, classes_b: np.ndarray
) -> np.ndarray:
    """IoU where the classes agree, 0 where they differ."""
    iou = _iou(boxes_a, boxes_b)
    iou[classes_a[:, None] != classes_b[None, :]] = 0.0
    return iou


_ScoreRows = list[tuple[np.ndarray, np.ndarray]]


def _class_score_rows(detections: Sequence[Detection], min_confidence: float) -> _ScoreRows:
    """Class-score vectors of the detections at or above ``min_confidence``, stacked by length.

    Returns ``(indices into detections, (n, K) scores)`` per vector length K >= 2; a model gives
    all its detections one length, so this is one stack in practice.
    """
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(detections):
        if d.class_scores is not None and d.confidence >= min_confidence and np.size(d.class_scores) >= 2:
            groups.setdefault(int(np.size(d.class_scores)), []).append(i)
    return [
        (
            np.asarray(idx),
            np.stack([np.asarray(detections[i].class_scores, dtype=np.float64).ravel() for i in idx]),
        )
        for idx in groups.values()
    ]


# ------------------------------------------------------------------------------------ triggers


def _confidence_band(cfg: ConfidenceBandConfig, frame: _Snapshot) -> Reason | None:
    in_band = (frame.confs >= cfg.low) & (frame.confs < cfg.high)
    if not in_band.any():
        return None
    # The middle of the band is where the detector is least sure, so it grades highest.
    mid, half = (cfg.low + cfg.high) / 2, (cfg.high - cfg.low) / 2
    grades = np.clip(1.0 - np.abs(frame.confs[in_band] - mid) / half, 0.0, 1.0)
    i = int(np.flatnonzero(in_band)[int(np.argmax(grades))])
    n = int(in_band.sum())
    more = f" (+{n - 1} more)" if n > 1 else ""
    conf = frame.confs[i]
    shown = _fmt(conf, cfg.high if conf > mid else cfg.low)
    detail = f"{frame.names[i]} {shown} in [{cfg.low:.2f}, {cfg.high:.2f}){more}"
    return Reason(Trigger.CONFIDENCE_BAND.value, _noisy_or(cfg.weight * grades), detail)


def _margin(
    cfg: MarginConfig, detections: Sequence[Detection], rows: _ScoreRows, class_names: Sequence[str] = ()
) -> Reason | None:
    best: tuple[float, int, int, float] | None = None  # (grade, detection index, runner-up class, margin)
    grades: list[np.ndarray] = []
    for idx, scores in rows:
        top2 = np.argpartition(-scores, 1, axis=1)[:, :2]
        vals = np.take_along_axis(scores, top2, axis=1)
        order = np.argsort(-vals, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        runner_up = np.take_along_axis(top2, order, axis=1)[:, 1]
        margins = vals[:, 0] - vals[:, 1]
        hit = margins < cfg.max_margin
        if hit.any():
            grades.append(1.0 - margins[hit] / cfg.max_margin)
            j = int(np.argmin(np.where(hit, margins, np.inf)))
            grade = 1.0 - float(margins[j]) / cfg.max_margin
            if best is None or grade > best[0]:
                best = (grade, int(idx[j]), int(runner_up[j]), float(margins[j]))
    if best is None:
        return None
    _, i, runner_up_class, margin = best
    fired = sum(len(g) for g in grades)
    more = f" (+{fired - 1} more)" if fired > 1 else ""
    runner_up = class_names[runner_up_class] if 0 <= runner_up_class < len(class_names) else f"class {runner_up_class}"
    detail = f"{detections[i].class_name} margin {_fmt(margin, cfg.max_margin)} over {runner_up}{more}"
    return Reason(Trigger.MARGIN.value, _noisy_or(cfg.weight * np.concatenate(grades)), detail)


def _normalised_entropy(scores: np.ndarray, top_k: int | None) -> np.ndarray:
    """Entropy of each row (normalised to sum 1) divided by log(k): one value in [0, 1] per row."""
    k = scores.shape[1] if top_k is None else min(top_k, scores.shape[1])
    s = np.clip(scores, 0.0, None)  # logits or rounding can leave tiny negatives
    if k < s.shape[1]:
        s = -np.partition(-s, k - 1, axis=1)[:, :k]
    total = s.sum(axis=1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    h = -plogp.sum(axis=1) / math.log(k)
    # A row of zeros has no distribution at all; call it certain rather than uniform.
    return np.where(total[:, 0] > 0, h, 0.0)


def _entropy(cfg: EntropyConfig, detections: Sequence[Detection], rows: _ScoreRows) -> Reason | None:
    best: tuple[float, int] | None = None  # (entropy, detection index)
    entropies: list[np.ndarray] = []
    for idx, scores in rows:
        h = _normalised_entropy(scores, cfg.top_k)
        hit = h > cfg.min_entropy
        if hit.any():
            entropies.append(h[hit])
            j = int(np.argmax(h))
            if best is None or h[j] > best[0]:
                best = (float(h[j]), int(idx[j]))
    if best is None:
        return None
    h, i = best
    fired = sum(len(e) for e in entropies)
    # Graded so the threshold maps to 0 and a uniform vector to 1.
    grades = (np.concatenate(entropies) - cfg.min_entropy) / (1.0 - cfg.min_entropy)
    more = f" (+{fired - 1} more)" if fired > 1 else ""
    detail = f"{detections[i].class_name} entropy {_fmt(h, cfg.min_entropy)} > {cfg.min_entropy:.2f}{more}"
    return Reason(Trigger.ENTROPY.value, _noisy_or(cfg.weight * grades), detail)


def _weak_evidence(
    cfg: WeakEvidenceConfig, band: ConfidenceBandConfig, frame: _Snapshot, weak: Sequence[Detection]
) -> Reason | None:
    # Detections under the band are noise to the other triggers, so they count here, with the
    # detector's own sub-threshold candidates (which overlap no detection).
    confs = np.concatenate([frame.confs[frame.confs < band.low], [float(d.confidence) for d in weak]])
    names = [frame.names[i] for i in np.flatnonzero(frame.confs < band.low)] + [d.class_name for d in weak]
    above = confs > cfg.floor
    if int(above.sum()) < cfg.min_candidates:
        return None
    grades = np.clip((confs[above] - cfg.floor) / max(band.low - cfg.floor, 1e-9), 0.0, 1.0)
    top = int(np.argmax(confs[above]))
    best_name = [n for n, a in zip(names, above, strict=True) if a][top]
    detail = (
        f"{int(above.sum())} candidates under {band.low:.2f} (best {best_name} {_fmt(confs[above][top], band.low)}, "
        f"mass {float(confs[above].sum()):.2f})"
    )
    return Reason(Trigger.WEAK_EVIDENCE.value, _noisy_or(cfg.weight * grades), detail)


def _ramp(value: float, start: float, width: float) -> float:
    """0 up to ``start``, rising linearly to 1 at ``start + width``."""
    return float(np.clip((value - start) / max(width, 1e-6), 0.0, 1.0))


def _image_novelty(cfg: ImageNoveltyConfig, frame: _Snapshot, history: deque[_Snapshot] | None) -> Reason | None:
    embedding, reference = frame.embedding, frame.reference
    if embedding is None or reference is None:
        # Without the reference's scale, distances mean nothing on their own.
        return None
    parts: list[tuple[float, str]] = []
    width = cfg.span * (reference.q99 - reference.q50)
    d_ref = reference.distance(embedding)
    grade = _ramp(d_ref, reference.q99, width)
    if grade > 0:
        parts.append((grade, f"unlike the training images (distance {d_ref:.2f} > q99 {reference.q99:.2f})"))
    if history is not None:
        recent = _recent(history, frame.timestamp, cfg.window_frames, cfg.window_s)
        # Frames embedded by another model (before a swap) live in another space.
        window = [p.embedding for p in recent if p.embedding is not None and p.reference is reference]
        if window:
            # A stream's consecutive frames are far closer than two different training images; a frame
            # as far from every recent frame as a training image is from its nearest neighbour (q50)
            # starts a new scene.
            d_recent = nearest_distance(embedding, np.stack(window))
            grade = _ramp(d_recent, reference.q50, width)
            if grade > 0:
                parts.append((grade, f"unlike the last {len(window)} frames (distance {d_recent:.2f})"))
    if not parts:
        return None
    grade, detail = max(parts)
    return Reason(Trigger.IMAGE_NOVELTY.value, cfg.weight * grade, detail)


def _novelty(cfg: NoveltyConfig, frame: _Snapshot, history: deque[_Snapshot]) -> Reason | None:
    window = _recent(history, frame.timestamp, cfg.window_frames, cfg.window_s)
    if len(window) < cfg.warmup_frames:
        return None
    eligible = frame.confs >= cfg.min_confidence
    if not eligible.any():
        return None
    # History boxes of any confidence count as seen: an object the detector half-saw a moment ago
    # is not new. The previous frame explains almost every box of a real camera, so it is checked
    # alone first and only the boxes it leaves unmatched are compared with the rest of the window.
    pending = np.flatnonzero(eligible)
    for chunk in (window[:1], window[1:]):
        if len(pending) == 0 or not chunk:
            continue
        boxes = np.concatenate([p.boxes for p in chunk])
        classes = np.concatenate([p.classes for p in chunk])
        iou = _same_class_iou(frame.boxes[pending], frame.classes[pending], boxes, classes)
        pending = pending[~(iou >= cfg.iou).any(axis=1)]
    n_novel = len(pending)
    if n_novel == 0:
        return None
    # Share of the confident boxes that are new: one new car among ten known ones is routine on a
    # street, a scene where everything is new (camera moved, lights on) scores the full weight.
    share = n_novel / int(eligible.sum())
    names = sorted({frame.names[i] for i in pending})
    detail = f"novel {', '.join(names)} ({n_novel} of {int(eligible.sum())})"
    return Reason(Trigger.NOVELTY.value, cfg.weight * share, detail)


def _touches_border(boxes: np.ndarray, size: tuple[int, int], px: float) -> np.ndarray:
    width, height = size
    return (boxes[:, 0] <= px) | (boxes[:, 1] <= px) | (boxes[:, 2] >= width - px) | (boxes[:, 3] >= height - px)


def _match_one_to_one(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by descending IoU; returns matched masks for rows and columns.

    One-to-one rather than "any overlap" so that of two people standing close together, one
    vanishing is still seen: the remaining box can explain only one of them.
    """
    rows = np.zeros(iou.shape[0], dtype=bool)
    cols = np.zeros(iou.shape[1], dtype=bool)
    r, c = np.nonzero(iou >= threshold)
    for k in np.argsort(-iou[r, c], kind="stable"):
        i, j = r[k], c[k]
        if not rows[i] and not cols[j]:
            rows[i] = cols[j] = True
    return rows, cols


def _frames_seen(box: np.ndarray, cls: int, older: list[_Snapshot], iou: float, limit: int) -> int:
    """How many consecutive older frames (newest first) show a same-class box chained to ``box``, up to ``limit``."""
    seen = 0
    for past in older[:limit]:
        overlap = _same_class_iou(box[None], np.array([cls]), past.boxes, past.classes)[0]
        if not len(overlap) or overlap.max() < iou:
            break
        box = past.boxes[int(np.argmax(overlap))]
        seen += 1
    return seen


def _flicker(
    cfg: FlickerConfig, frame: _Snapshot, history: deque[_Snapshot], image_size: tuple[int, int] | None
) -> Reason | None:
    if not history:
        return None
    prev = history[-1]
    if cfg.max_gap_s is not None and frame.timestamp - prev.timestamp > cfg.max_gap_s:
        return None
    prev_matched, cur_matched = _match_one_to_one(
        _same_class_iou(prev.boxes, prev.classes, frame.boxes, frame.classes), cfg.iou
    )
    # An object counts as gone only when nothing of its class is left at its place, whatever its
    # confidence: one that merely dropped from 0.6 to 0.3 is the confidence band's business.
    vanished = (prev.confs >= cfg.min_confidence) & ~prev_matched
    appeared = (frame.confs >= cfg.min_confidence) & ~cur_matched
    if cfg.ignore_border_px is not None and image_size is not None:
        vanished &= ~_touches_border(prev.boxes, image_size, cfg.ignore_border_px)
        appeared &= ~_touches_border(frame.boxes, image_size, cfg.ignore_border_px)
    if not (vanished.any() or appeared.any()):
        return None

    def size_grade(boxes: np.ndarray) -> np.ndarray:
        if image_size is None:
            return np.ones(len(boxes))
        share = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(image_size[0] * image_size[1])
        return np.clip(np.sqrt(np.clip(share, 0.0, None) / cfg.full_size), 0.0, 1.0)

    # Evidence that this frame misses (vanished) or invents (appeared) an object: how sure the model
    # was of it, how large it is, and for vanished objects how long the camera had shown them.
    older = list(reversed(history))[1:]
    seen = np.array(
        [
            _frames_seen(prev.boxes[i], int(prev.classes[i]), older, cfg.iou, cfg.persist_frames - 1) + 1
            for i in np.flatnonzero(vanished)
        ],
        dtype=np.float64,
    )
    gone = prev.confs[vanished] * size_grade(prev.boxes[vanished]) * np.minimum(1.0, seen / cfg.persist_frames)
    new = cfg.appeared_factor * frame.confs[appeared] * size_grade(frame.boxes[appeared])
    parts = _tally((frame.names[i] for i in np.flatnonzero(appeared)), "appeared")
    parts += _tally((prev.names[i] for i in np.flatnonzero(vanished)), "vanished")
    return Reason(Trigger.FLICKER.value, _noisy_or(cfg.weight * np.concatenate([gone, new])), "; ".join(parts))


def _tally(names: Iterable[str], what: str) -> list[str]:
    """``["person x2 appeared", "car appeared"]``: a busy frame's detail stays one short line."""
    return [f"{name} {what}" if n == 1 else f"{name} x{n} {what}" for name, n in Counter(names).items()]


def _count_jump(cfg: CountJumpConfig, frame: _Snapshot, history: deque[_Snapshot]) -> Reason | None:
    recent = list(history)[-cfg.window_frames :]
    if len(recent) < cfg.min_history:
        return None
    counts = [int((p.confs >= cfg.min_confidence).sum()) for p in recent]
    median = float(statistics.median(counts))
    n = int((frame.confs >= cfg.min_confidence).sum())
    jump = abs(n - median)
    if jump < cfg.min_jump:
        return None
    grade = min(1.0, jump / (2 * cfg.min_jump))
    return Reason(Trigger.COUNT_JUMP.value, cfg.weight * grade, f"{n} detections vs median {median:g}")


# -------------------------------------------------------------------------------------- scorer


def combined_score(reasons: Sequence[Reason]) -> float:
    """Noisy-OR of the reasons' scores, ``random`` left out.

    Each reason's score is its trigger's estimate that the frame holds a detection error; the
    noisy-OR is the chance that at least one of them is right, if they were independent. It stays
    in [0, 1], and a further fired trigger never lowers it. ``random`` is left out because a random
    pick says nothing about the frame; counting it would let monitoring frames jump the upload queue.
    """
    return _noisy_or(r.score for r in reasons if r.trigger != Trigger.RANDOM)


def _floor(min_confidence: float | None, cfg: TriggersConfig) -> float:
    return cfg.confidence_band.low if min_confidence is None else min_confidence


class UncertaintyScorer:
    """Scores frames with the configured triggers, keeping a short history per source.

    Not thread-safe: use one scorer per agent loop (sources are independent inside it).

    Args:
        config: The triggers' configuration; copied, so later changes to it have no effect.
        seed: Seed (a non-negative int) for the random share, for reproducible runs; each source
            draws from its own stream derived from the seed and its id, so the picks of one camera
            do not depend on how its frames interleave with another's. None draws fresh entropy.
    """

    def __init__(self, config: TriggersConfig, seed: int | None = None) -> None:
        self._config = config.model_copy(deep=True)
        self._seed = seed
        self._history_len = max(
            config.novelty.window_frames, config.count_jump.window_frames, config.image_novelty.window_frames, 1
        )
        self._history: dict[str, deque[_Snapshot]] = {}
        self._rngs: dict[str, np.random.Generator] = {}
        self._keep = AdaptiveKeep(self._config.keep, seed)

    @property
    def config(self) -> TriggersConfig:
        return self._config

    def _rng(self, source_id: str) -> np.random.Generator:
        rng = self._rngs.get(source_id)
        if rng is None:
            rng = self._rngs[source_id] = source_rng(self._seed, source_id)
        return rng

    def score(
        self,
        source_id: str,
        detections: Sequence[Detection],
        timestamp: float,
        *,
        image_size: tuple[int, int] | None = None,
        class_names: Sequence[str] = (),
        weak: Sequence[Detection] = (),
        embedding: np.ndarray | None = None,
        reference: ReferenceStats | None = None,
        stream: bool = True,
    ) -> Verdict:
        """Score one frame of ``source_id``; in a stream, remember it for the frames that follow.

        Args:
            source_id: The camera (or other source) the frame came from.
            detections: The detector's output for the frame (may be empty).
            timestamp: Capture time in seconds; novelty's and flicker's time windows use it.
            image_size: ``(width, height)`` of the frame the boxes refer to; flicker needs it to
                ignore boxes at the border and to grade objects by size, and without it does not.
            class_names: The model's class names, to name the runner-up class in the margin reason.
            weak: The detector's candidates under its threshold (:class:`DetectorOutput.weak`).
            embedding: The frame's image embedding as the model outputs it (``DetectorOutput.embedding``).
            reference: The running model's reference statistics (``Detector.reference``).
            stream: Whether this frame follows the source's previous one in time (a video, a camera).
                ``False`` (unrelated stills) turns off the triggers that compare with previous frames.
        """
        cfg = self._config
        history: deque[_Snapshot] | None = None
        if stream:
            history = self._history.get(source_id)
            if history is None:
                history = self._history[source_id] = deque(maxlen=self._history_len)
        frame = _Snapshot.of(detections, timestamp, embedding, reference)
        found: list[Reason | None] = []
        if cfg.confidence_band.enabled:
            found.append(_confidence_band(cfg.confidence_band, frame))
        rows: dict[float, _ScoreRows] = {}  # margin and entropy usually share one confidence floor
        if cfg.margin.enabled:
            floor = _floor(cfg.margin.min_confidence, cfg)
            rows[floor] = _class_score_rows(detections, floor)
            found.append(_margin(cfg.margin, detections, rows[floor], class_names))
        if cfg.entropy.enabled:
            floor = _floor(cfg.entropy.min_confidence, cfg)
            if floor not in rows:
                rows[floor] = _class_score_rows(detections, floor)
            found.append(_entropy(cfg.entropy, detections, rows[floor]))
        if cfg.weak_evidence.enabled:
            found.append(_weak_evidence(cfg.weak_evidence, cfg.confidence_band, frame, weak))
        if cfg.image_novelty.enabled:
            found.append(_image_novelty(cfg.image_novelty, frame, history))
        if history is not None:
            if cfg.novelty.enabled:
                found.append(_novelty(cfg.novelty, frame, history))
            if cfg.flicker.enabled:
                found.append(_flicker(cfg.flicker, frame, history, image_size))
            if cfg.count_jump.enabled:
                found.append(_count_jump(cfg.count_jump, frame, history))
        # Drawn for every frame whatever the other triggers said: that is what makes the sample unbiased.
        picked = cfg.random.enabled and self._rng(source_id).random() < cfg.random.rate
        if picked:
            found.append(Reason(Trigger.RANDOM.value, 0.0, f"kept at random (rate {cfg.random.rate:g})"))
        reasons = [r for r in found if r is not None]
        if history is not None:
            history.append(frame)

        score = combined_score(reasons)
        evidence = any(r.trigger != Trigger.RANDOM for r in reasons)
        # Every frame is ranked, kept or not: the share is of what the camera sees.
        top_share = self._keep.admit(source_id, score if evidence else 0.0, evidence and score >= cfg.min_score)
        keep = picked or top_share
        return Verdict(keep=keep, score=score, reasons=reasons)

    def reset(self, source_id: str) -> None:
        """Forget ``source_id``'s history (the camera moved or restarted); its random stream goes on."""
        self._history.pop(source_id, None)
        self._keep.reset(source_id)

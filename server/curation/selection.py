"""Which frames a curator reviews next: pure functions over numpy arrays, no FiftyOne.

:func:`select_batch` picks up to ``size`` frames from a pool of unbatched inbox frames, in steps
that each answer one way a batch wastes labels:

1. **Near-duplicates of what curation already has are skipped**: a pool frame that is a
   near-duplicate (:mod:`server.curation.duplicates`) of a training-set frame, or of a frame in
   another batch, never enters; each kind is counted.
2. **One frame per episode**: on a stream, the frames one camera captured within ``episode_gap_s``
   of the first, each a near-duplicate of the one before, are one episode (one moment of one
   scene; the splits chain such moments,
   :mod:`server.curation.episodes`); only its most informative frame is a candidate, the others
   stay in the inbox for later batches (counted as :data:`SAME_EPISODE`). Ten uncertain frames of
   one car passing are one label's worth of information, not ten.
3. **A calibrated score** (:func:`calibrated_scores`): the edge's frame score is a noisy-OR that
   grows with the number of uncertain boxes, so crowded frames saturate near 1 and outrank
   everything. The batch ranks instead by evidence that does not add up boxes: each kind of
   evidence (the most uncertain box, and each edge trigger's score) is turned into its
   percentile across the whole pool (every camera of the fleet), and a frame's score is the best
   of its percentiles (AL-MDN normalises its uncertainty kinds across the pool the same way before
   combining them). Read it as "this frame is in the top ``1 - score`` of the pool on at least one
   kind of evidence". The edge keeps its noisy-OR as the upload priority.
4. **Allocation by need** (:func:`device_quotas`): each camera's share of the batch follows its
   need, the summed calibrated score of its frames among the pool's best ``size`` (the share a pick
   by score alone would give it), not its frame count; with a floor of one frame for every camera
   when the batch has room (so no camera is starved and every one is checked), and a cap of
   ``device_share_cap`` of the batch so none floods it. What a camera cannot fill goes to the
   others; the cap yields when the others cannot fill the batch.
5. **Coverage**: the candidates are each camera's best ``candidates`` x quota frames by calibrated
   score times ``rarity`` (step 6); the pick is a greedy k-center weighted by score: each step takes
   the candidate with the largest ``score * (1 - exp(-d / s)) * rarity`` where ``d`` is the distance
   to the nearest frame picked or curated and ``s`` the candidates' spacing (the median distance
   between two of them, at least the curation model's q50). A frame as far from everything as two
   candidates typically are gets a factor of 0.63, another frame of a scene already picked a small
   fraction of that, so the batch spreads over the scenes among the candidates before it takes a
   second frame of one. (Scaled by q50 instead, distinct scenes, ~3 q50 apart, all got a factor of
   ~0.95 and the rank among them was the score alone.) After each pick, the pool's near-duplicates
   of the picked frame are dropped (counted).
6. **Class balance on the classes a frame contains**: ``rarity`` is ``1 + rare_class_bonus *
   (1 - n_r / n_max)``, ``n_r`` being the pool's frames holding the frame's rarest predicted class, so
   rare classes come first; a frame whose every class already has ``class_cap * size`` frames in
   the batch waits, and when only such frames are left the cap yields (counted in
   :attr:`Selection.cap_yielded`) rather than leave the batch short. A data set where every frame
   holds the dominant class (cars in traffic, people in a crowd) still fills its batches.

Cost: one pass over the pool per pick (O(size * n * d)), plus the near-duplicate check of the
pool against the curated frames (O(n * m * d), in blocks); see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.curation.duplicates import (
    FrameSet,
    NearDuplicateRule,
    distances,
    hamming,
    hamming_pairs,
    nearest_distances,
)

#: Name under which near-duplicates of frames picked earlier in the same batch are counted.
IN_THIS_BATCH = "this batch"
#: Name under which frames left for a more informative frame of their episode are counted.
SAME_EPISODE = "same episode"
#: The evidence kind read from the predictions: the most uncertain box.
BOX = "box"
#: Edge triggers the calibrated score leaves out: ``random`` is no evidence, and
#: ``confidence_band`` is the noisy-OR over the same boxes :data:`BOX` reads without adding up.
NOT_EVIDENCE = frozenset({"random", "confidence_band"})
#: Breaks ties between frames of equal score (zero, say) in favour of the more diverse one.
_TIE_BREAK = 1e-6


def box_uncertainty(confidences: Iterable[float | None]) -> float:
    """The most uncertain box of a frame: ``max(1 - |2c - 1|)`` over its confidences (0 for none).

    1 for a box at confidence 0.5, 0.2 for one at 0.9. The maximum, not a sum: a crowd of confident
    boxes is no more uncertain than one of them.
    """
    values = [1.0 - abs(2.0 * float(c) - 1.0) for c in confidences if c is not None]
    return max(values, default=0.0)


def frame_evidence(reasons: Iterable[tuple[str, float]], confidences: Iterable[float | None]) -> dict[str, float]:
    """A frame's evidence by kind: :data:`BOX` from its predictions, and each edge trigger's score.

    Args:
        reasons: ``(trigger, score)`` pairs as the edge sent them.
        confidences: Its predicted boxes' confidences.
    """
    out = {BOX: box_uncertainty(confidences)}
    for trigger, score in reasons:
        if trigger and trigger not in NOT_EVIDENCE:
            out[trigger] = max(out.get(trigger, 0.0), float(score or 0.0))
    return out


def frame_classes(labels: Iterable[str | None]) -> frozenset[str]:
    """The classes a frame's predictions contain; a frame with none is the class ``""``."""
    found = frozenset(label for label in labels if label)
    return found or frozenset({""})


@dataclass(frozen=True)
class Pool:
    """Candidate frames, one row each.

    Attributes:
        frames: Their standardised embeddings and dHashes.
        evidence: Evidence kind -> (n,) raw scores >= 0 (see :func:`frame_evidence`); 0 where a kind
            did not fire.
        devices: Device id per frame.
        classes: The predicted classes each frame contains (:func:`frame_classes`).
        captured: (n,) capture times in seconds (NaN unknown), or None: no episodes.
        streams: The camera stream of each frame (device and source), or None: the device.
    """

    frames: FrameSet
    evidence: Mapping[str, np.ndarray]
    devices: Sequence[str]
    classes: Sequence[frozenset[str]]
    captured: np.ndarray | None = None
    streams: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.frames)
        lengths = {len(self.devices), len(self.classes), *(len(v) for v in self.evidence.values())}
        if self.captured is not None:
            lengths.add(len(self.captured))
        if self.streams is not None:
            lengths.add(len(self.streams))
        if lengths - {n}:
            raise ValueError("pool arrays differ in length")

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def from_rows(
        cls,
        frames: FrameSet,
        rows: Sequence[Mapping[str, float]],
        devices: Sequence[str],
        classes: Sequence[frozenset[str]],
        captured: np.ndarray | None = None,
        streams: Sequence[str] | None = None,
    ) -> Pool:
        """A pool from one evidence dict per frame (as :func:`frame_evidence` gives)."""
        kinds = sorted({k for row in rows for k in row})
        evidence = {k: np.array([float(row.get(k, 0.0)) for row in rows], dtype=np.float64) for k in kinds}
        return cls(frames, evidence, devices, classes, captured, streams)


@dataclass(frozen=True)
class SelectionParams:
    """
    Attributes:
        size: Frames wanted.
        class_cap: Share of the batch after which a class stops earning a frame its place (it yields
            when nothing else is left).
        rule: The near-duplicate rule, in the vectors' units.
        scale: The curation model's reference q50: the smallest coverage scale.
        device_share_cap: Largest share of the batch one camera gets while others have candidates.
        candidates: Candidates per slot of a camera's quota, by calibrated score.
        episode_gap_s: Frames of one camera at most this far apart are one episode (0: no episodes).
        rare_class_bonus: How much more a frame whose rarest class is the rarest is worth.
    """

    size: int
    class_cap: float
    rule: NearDuplicateRule
    scale: float
    device_share_cap: float = 0.5
    candidates: float = 3.0
    episode_gap_s: float = 3.0
    rare_class_bonus: float = 0.5

    @property
    def per_class(self) -> int:
        """Frames of one class after which it stops earning a frame its place in a batch of ``size``."""
        return max(1, math.floor(self.class_cap * self.size + 1e-9))

    @property
    def per_device(self) -> int:
        """Most frames of one camera while others have candidates."""
        return max(1, math.ceil(self.device_share_cap * self.size - 1e-9))


@dataclass
class Selection:
    """What :func:`select_batch` picked, why, and what it skipped.

    Attributes:
        picked: Pool rows, in pick order.
        why: One line per picked frame, same order: its score and the evidence behind it, its
            camera's share, the class it covers, how far it is from anything curated.
        skipped: Frames skipped, by why: near-duplicates by what they duplicate (the names of
            ``curated`` and :data:`IN_THIS_BATCH`), and :data:`SAME_EPISODE`.
        quotas: Frames each device was entitled to.
        cap_yielded: Frames taken although all their classes were at the class cap.
        short_reason: Why fewer than ``size`` frames were picked ("" when the batch is full).
    """

    picked: list[int] = field(default_factory=list)
    why: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)
    cap_yielded: int = 0
    short_reason: str = ""


def calibrated_scores(evidence: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, list[str]]:
    """Each frame's calibrated score, and the evidence kind that gave it.

    Every kind is replaced by its percentile in the pool (mid-rank of ties over ``n``), 0 where it
    is 0; a frame's score is its best percentile. Percentiles make kinds on different scales
    comparable (an image-novelty distance, a flicker's noisy-OR) and make no kind saturate.
    """
    names = sorted(evidence)
    best = np.zeros(n)
    which = np.full(n, -1)
    for k, name in enumerate(names):
        x = np.nan_to_num(np.asarray(evidence[name], dtype=np.float64))
        if n == 0 or not (x > 0).any():
            continue
        order = np.argsort(x, kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(n, dtype=np.float64)
        # Mid-rank for ties: the mean rank of each group of equal values.
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=ranks)
        percentile = np.where(x > 0, (sums[inverse] / counts[inverse] + 1.0) / n, 0.0)
        better = percentile > best
        best = np.where(better, percentile, best)
        which = np.where(better, k, which)
    return best, [names[k] if k >= 0 else "" for k in which]


def device_quotas(
    need: Mapping[str, float], available: Mapping[str, int], size: int, per_device: int
) -> dict[str, int]:
    """Each device's share of a batch of ``size``, by need (D'Hondt: proportional, whole frames).

    Every device with a candidate first gets one frame (when the batch has room for all of them,
    neediest first); each further frame goes to the device with the largest ``need / (quota + 1)``
    that has candidates left and is under ``per_device``. When no device under ``per_device`` has
    candidates left, the cap yields.

    Args:
        need: Each device's claim on the batch (summed calibrated score of its best frames).
        available: Candidates each device has.
        size: Frames wanted.
        per_device: Most frames of one device while others can fill the batch.
    """
    devices = sorted(d for d, k in available.items() if k > 0)
    quotas = dict.fromkeys(available, 0)
    size = min(size, sum(available[d] for d in devices))
    weight = {d: max(float(need.get(d, 0.0)), 1e-9) for d in devices}
    if size >= len(devices):
        for d in devices:
            quotas[d] = 1
    else:
        for d in sorted(devices, key=lambda d: (-weight[d], d))[:size]:
            quotas[d] = 1
    while sum(quotas.values()) < size:
        room = [d for d in devices if quotas[d] < min(available[d], per_device)]
        room = room or [d for d in devices if quotas[d] < available[d]]
        d = max(room, key=lambda d: (weight[d] / (quotas[d] + 1), -devices.index(d)))
        quotas[d] += 1
    return quotas


def episode_representatives(
    streams: Sequence[str],
    captured: np.ndarray | None,
    frames: FrameSet,
    scores: np.ndarray,
    eligible: np.ndarray,
    gap_s: float,
    alike: NearDuplicateRule,
) -> np.ndarray:
    """(n,) booleans: the eligible frames that represent their episode (its best calibrated score).

    An episode is a run of one stream's eligible frames, in capture order, at most ``gap_s`` after the
    run's first frame and each ``alike`` the one before (the near-duplicate rule): one moment
    of one scene, not the chain the splits use (a camera uncertain for a minute is a minute of
    episodes, and a folder of unrelated photos read in a second is no episode at all). Frames with
    no capture time are episodes of their own.
    """
    keep = eligible.copy()
    if captured is None or gap_s <= 0:
        return keep
    times = np.asarray(captured, dtype=np.float64)
    by_stream: dict[str, list[int]] = {}
    for i in np.flatnonzero(eligible & np.isfinite(times)):
        by_stream.setdefault(streams[i], []).append(int(i))
    for rows in by_stream.values():
        rows.sort(key=lambda i: times[i])
        after, before = np.asarray(rows[1:], dtype=int), np.asarray(rows[:-1], dtype=int)
        linked = alike.holds(
            np.linalg.norm(frames.vectors[after] - frames.vectors[before], axis=1),
            hamming_pairs(frames.hashes[after], frames.hashes[before]),
        )
        start = 0
        for j in range(1, len(rows) + 1):
            if j == len(rows) or times[rows[j]] - times[rows[start]] > gap_s or not linked[j - 1]:
                run = rows[start:j]
                best = max(run, key=lambda i: (scores[i], -i))
                for i in run:
                    keep[i] = i == best
                start = j
    return keep


def select_batch(pool: Pool, curated: dict[str, FrameSet], params: SelectionParams) -> Selection:
    """Pick a review batch from ``pool`` (see the module docstring for the algorithm).

    Args:
        pool: The candidates.
        curated: Frames curation already has, by a name used in the counts ("training set",
            "other batches"); pool frames near-duplicating any of them are skipped.
        params: Batch size, class cap, near-duplicate rule, coverage scale, allocation.
    """
    n = len(pool)
    result = Selection()
    scores, kinds = calibrated_scores(pool.evidence, n)
    eligible = np.ones(n, dtype=bool)
    nearest = np.full(n, np.inf)
    for name, frames in curated.items():
        dup = params.rule.any_in(pool.frames, frames) & eligible
        result.skipped[name] = int(dup.sum())
        eligible &= ~dup
        nearest = np.minimum(nearest, nearest_distances(pool.frames.vectors, frames.vectors))
    streams = pool.streams if pool.streams is not None else pool.devices
    # Consecutive frames of one moment are near-duplicates by the rule (all 580 measured pairs were:
    # server/curation/duplicates.py); a looser rule merged distinct still scenes a second apart.
    represent = episode_representatives(
        streams, pool.captured, pool.frames, scores, eligible, params.episode_gap_s, params.rule
    )
    result.skipped[SAME_EPISODE] = int((eligible & ~represent).sum())
    eligible = represent
    result.skipped[IN_THIS_BATCH] = 0

    class_names = sorted({c for cs in pool.classes for c in cs})
    class_index = {c: k for k, c in enumerate(class_names)}
    holds = np.zeros((n, len(class_names)), dtype=bool)
    for i, cs in enumerate(pool.classes):
        holds[i, [class_index[c] for c in cs]] = True
    in_pool = holds[eligible].sum(axis=0)
    rarity = np.ones(n)
    if len(class_names) and in_pool.max() > 0:
        rarest = np.where(holds, in_pool[None, :], in_pool.max()).min(axis=1)
        rarity = 1.0 + params.rare_class_bonus * (1.0 - rarest / in_pool.max())
    worth = scores * rarity

    devices = np.asarray(list(pool.devices), dtype=object)
    device_names, device_of = np.unique(devices, return_inverse=True) if n else (np.array([], object), np.zeros(0, int))
    rows = np.flatnonzero(eligible)
    top = rows[np.argsort(-worth[rows], kind="stable")][: params.size]
    counts = np.bincount(device_of[rows], minlength=len(device_names))
    claims = np.bincount(device_of[top], weights=worth[top], minlength=len(device_names))
    available = {str(d): int(c) for d, c in zip(device_names, counts, strict=True) if c}
    need = {str(d): float(w) for d, w in zip(device_names, claims, strict=True) if w}
    result.quotas = quotas = device_quotas(need, available, params.size, params.per_device)
    candidate = _candidates(devices, worth, eligible, quotas, params.candidates)
    scale = max(_spacing(pool.frames.vectors[candidate]), params.scale, 1e-9)

    quota = np.array([quotas.get(str(d), 0) for d in device_names], dtype=int)
    per_device = np.zeros(len(device_names), dtype=int)
    per_class = np.zeros(len(class_names), dtype=int)
    vectors, hashes = pool.frames.vectors, pool.frames.hashes
    while len(result.picked) < params.size and eligible.any():
        candidate &= eligible
        under_quota = eligible & (per_device[device_of] < quota[device_of])
        under_cap = eligible & (holds & (per_class < params.per_class)[None, :]).any(axis=1)
        # Preference when the first is empty: a camera's quota over the candidate list (its
        # candidates may have gone as near-duplicates), the class cap over the quota, and the
        # candidates over the rest; the last tier is everything left, so the batch fills.
        tiers = (
            candidate & under_quota & under_cap,
            under_quota & under_cap,
            candidate & under_cap,
            candidate & under_quota,
            under_quota,
            candidate & eligible,
            under_cap,
            eligible,
        )
        choose = next(t for t in tiers if t.any())
        coverage = 1.0 - np.exp(-nearest / scale)
        gain = np.where(choose, worth * coverage + _TIE_BREAK * coverage, -np.inf)
        i = int(np.argmax(gain))
        yielded = not under_cap[i]
        result.cap_yielded += yielded
        result.picked.append(i)
        result.why.append(
            _why(pool, i, scores[i], kinds[i], quotas, nearest[i] / scale, holds[i], class_names, in_pool, yielded)
        )
        eligible[i] = False
        per_device[device_of[i]] += 1
        per_class[holds[i]] += 1
        to_pick = distances(vectors, vectors[i : i + 1])[:, 0]
        nearest = np.minimum(nearest, to_pick)
        rest = np.flatnonzero(eligible)
        if len(rest):
            dup = params.rule.holds(to_pick[rest], hamming(hashes[rest], hashes[i : i + 1])[:, 0])
            eligible[rest[dup]] = False
            result.skipped[IN_THIS_BATCH] += int(dup.sum())
    if len(result.picked) < params.size:
        result.short_reason = (
            f"the pool ran out: {n} candidates, {sum(result.skipped.values())} skipped "
            f"(near-duplicates, or another frame of the same episode): {result.skipped}"
        )
    return result


def _candidates(
    devices: np.ndarray, worth: np.ndarray, eligible: np.ndarray, quotas: Mapping[str, int], per_slot: float
) -> np.ndarray:
    """Each device's best ``per_slot * quota`` eligible frames by ``worth`` (score x rarity)."""
    out = np.zeros(len(devices), dtype=bool)
    for d, q in quotas.items():
        rows = np.flatnonzero(eligible & (devices == d))
        top = rows[np.argsort(-worth[rows], kind="stable")][: max(1, math.ceil(per_slot * q))] if q else rows[:0]
        out[top] = True
    return out


def _spacing(vectors: np.ndarray) -> float:
    """Median distance between two rows (0 for fewer than two rows): how far apart candidates lie."""
    if len(vectors) < 2:
        return 0.0
    d = distances(vectors, vectors)
    return float(np.median(d[np.triu_indices(len(vectors), k=1)]))


def _why(
    pool: Pool,
    i: int,
    score: float,
    kind: str,
    quotas: Mapping[str, int],
    novelty: float,
    holds: np.ndarray,
    class_names: Sequence[str],
    in_pool: np.ndarray,
    yielded: bool,
) -> str:
    """One line a curator reads in the App: why this frame is in the batch."""
    share = max(1.0 - score, 0.0)
    top = f"top {share:.0%}" if share >= 0.01 else "top 1%"
    evidence = f"{top} of the pool by {kind}" if kind else "no uncertainty evidence"
    rarest = min(np.flatnonzero(holds), key=lambda k: (in_pool[k], class_names[k]), default=None)
    covers = ""
    if rarest is not None:
        name = class_names[rarest] or "no detection"
        covers = f"; rarest class {name!r} ({int(in_pool[rarest])} frames of the pool hold it)"
    far = "nothing curated or picked yet" if math.isinf(novelty) else f"{novelty:.1f}x the candidates' spacing"
    cap = "; taken past the class cap (nothing else left)" if yielded else ""
    device = pool.devices[i]
    return (
        f"score {score:.2f} ({evidence}); {device or 'unknown device'} gets {quotas.get(device, 0)} "
        f"frames by need{covers}; {far} from the nearest curated or picked frame{cap}"
    )

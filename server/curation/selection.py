"""Which frames a curator reviews next: pure functions over numpy arrays, no FiftyOne.

:func:`select_batch` picks up to ``size`` frames from a pool of unbatched inbox frames:

1. **Near-duplicates of what curation already has are skipped**: a pool frame that is a
   near-duplicate (:mod:`server.curation.duplicates`) of a training-set frame, or of a frame in
   another batch, never enters; each kind is counted.
2. **Device quotas**: each device gets a share of the batch proportional to its share of the
   remaining pool (largest remainder, and at least one frame for every device that has one when
   the batch has room), so a chatty camera cannot crowd out a quiet one. A quota a device cannot
   fill (too few frames left) goes to the others.
3. **Greedy, uncertainty times diversity** (a k-center pick weighted by uncertainty): each step
   takes the frame with the largest ``u * (1 - exp(-d / scale))`` where ``u`` is the edge's
   uncertainty score and ``d`` the distance to the nearest frame already picked or already curated
   (training set, other batches). Far from everything the factor is ~1 and the most uncertain frame
   wins; next to a picked frame it falls to ~0, so the batch spreads over the embedding space.
   After each pick, the pool's near-duplicates of the picked frame are dropped (counted).
4. **Class cap**: at most ``floor(class_cap * size)`` frames share a main predicted class (the
   class with the largest summed confidence in the frame's predictions; frames with no prediction
   form a class of their own). The cap is hard: a pool dominated by one class gives a smaller
   batch, and :attr:`Selection.short_reason` says why.

Cost: one pass over the pool per pick (O(size * n * d)), plus the near-duplicate check of the
pool against the curated frames (O(n * m * d), in blocks); see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.curation.duplicates import FrameSet, NearDuplicateRule, distances, hamming, nearest_distances

#: Name under which near-duplicates of frames picked earlier in the same batch are counted.
IN_THIS_BATCH = "this batch"
#: Breaks ties between frames of equal uncertainty (zero, say) in favour of the more diverse one.
_TIE_BREAK = 1e-6


@dataclass(frozen=True)
class Pool:
    """Candidate frames, one row each.

    Attributes:
        frames: Their standardised embeddings and dHashes.
        uncertainty: (n,) the edge's uncertainty score, 0-1.
        devices: Device id per frame.
        classes: Main predicted class per frame ("" when the model predicted nothing).
    """

    frames: FrameSet
    uncertainty: np.ndarray
    devices: Sequence[str]
    classes: Sequence[str]

    def __post_init__(self) -> None:
        n = len(self.frames)
        if not (len(self.uncertainty) == len(self.devices) == len(self.classes) == n):
            raise ValueError("pool arrays differ in length")

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True)
class SelectionParams:
    """
    Attributes:
        size: Frames wanted.
        class_cap: Largest share of the batch with the same main predicted class.
        rule: The near-duplicate rule, in the vectors' units.
        scale: Distance at which a frame counts as mostly new (the curation model's reference q50).
    """

    size: int
    class_cap: float
    rule: NearDuplicateRule
    scale: float

    @property
    def per_class(self) -> int:
        """Most frames of one main predicted class in a batch of ``size``."""
        return max(1, math.floor(self.class_cap * self.size + 1e-9))


@dataclass
class Selection:
    """What :func:`select_batch` picked, and what it skipped.

    Attributes:
        picked: Pool rows, in pick order.
        skipped: Near-duplicates skipped, by what they duplicate (the names of ``curated`` and
            :data:`IN_THIS_BATCH`).
        quotas: Frames each device was entitled to.
        short_reason: Why fewer than ``size`` frames were picked ("" when the batch is full).
    """

    picked: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)
    short_reason: str = ""


def primary_class(labels: Sequence[str], confidences: Sequence[float | None]) -> str:
    """The class with the largest summed confidence among a frame's predictions ("" for none)."""
    totals: dict[str, float] = {}
    for label, conf in zip(labels, confidences, strict=True):
        totals[label] = totals.get(label, 0.0) + (1.0 if conf is None else float(conf))
    return max(sorted(totals), key=lambda k: totals[k]) if totals else ""


def device_quotas(devices: Sequence[str], size: int) -> dict[str, int]:
    """Each device's share of a batch of ``size``, proportional to its frames in ``devices``.

    Largest remainder; then every device that has a frame gets at least one (taken from the device
    whose quota exceeds its exact share the most) when the batch has room for all of them.
    """
    counts: dict[str, int] = {}
    for d in devices:
        counts[d] = counts.get(d, 0) + 1
    total = sum(counts.values())
    size = min(size, total)
    if not counts or size == 0:
        return dict.fromkeys(counts, 0)
    exact = {d: size * c / total for d, c in counts.items()}
    quotas = {d: math.floor(v) for d, v in exact.items()}
    by_remainder = sorted(counts, key=lambda d: (-(exact[d] - quotas[d]), d))
    for d in by_remainder[: size - sum(quotas.values())]:
        quotas[d] += 1
    if size >= len(counts):
        for d in sorted(counts):
            if quotas[d] == 0:
                donor = max(sorted(k for k in quotas if quotas[k] > 1), key=lambda k: quotas[k] - exact[k])
                quotas[donor] -= 1
                quotas[d] = 1
    return quotas


def select_batch(pool: Pool, curated: dict[str, FrameSet], params: SelectionParams) -> Selection:
    """Pick a review batch from ``pool`` (see the module docstring for the algorithm).

    Args:
        pool: The candidates.
        curated: Frames curation already has, by a name used in the counts ("training set",
            "other batches"); pool frames near-duplicating any of them are skipped.
        params: Batch size, class cap, near-duplicate rule, diversity scale.
    """
    n = len(pool)
    result = Selection()
    eligible = np.ones(n, dtype=bool)
    nearest = np.full(n, np.inf)
    for name, frames in curated.items():
        dup = params.rule.any_in(pool.frames, frames) & eligible
        result.skipped[name] = int(dup.sum())
        eligible &= ~dup
        nearest = np.minimum(nearest, nearest_distances(pool.frames.vectors, frames.vectors))
    result.skipped[IN_THIS_BATCH] = 0

    device_names, device_of = np.unique(np.asarray(list(pool.devices), dtype=object), return_inverse=True)
    class_names, class_of = np.unique(np.asarray(list(pool.classes), dtype=object), return_inverse=True)
    quotas = device_quotas([pool.devices[i] for i in np.flatnonzero(eligible)], params.size)
    result.quotas = quotas
    quota = np.array([quotas.get(str(d), 0) for d in device_names])
    per_device = np.zeros(len(device_names), dtype=int)
    per_class = np.zeros(len(class_names), dtype=int)
    uncertainty = np.clip(np.nan_to_num(np.asarray(pool.uncertainty, dtype=np.float64)), 0.0, 1.0)
    vectors, hashes = pool.frames.vectors, pool.frames.hashes

    while len(result.picked) < params.size:
        allowed = eligible & (per_class[class_of] < params.per_class)
        if not allowed.any():
            result.short_reason = (
                f"the pool ran out: {n} candidates, {sum(result.skipped.values())} skipped as near-duplicates"
                if not eligible.any()
                else f"the class cap ({params.class_cap:.0%} of {params.size} = {params.per_class} frames per "
                f"predicted class) leaves no frame of another class"
            )
            break
        under_quota = allowed & (per_device[device_of] < quota[device_of])
        choose = under_quota if under_quota.any() else allowed  # a quota nobody can fill goes to the others
        diversity = 1.0 - np.exp(-nearest / params.scale) if params.scale > 0 else np.ones(n)
        gain = np.where(choose, uncertainty * diversity + _TIE_BREAK * diversity, -np.inf)
        i = int(np.argmax(gain))
        result.picked.append(i)
        eligible[i] = False
        per_device[device_of[i]] += 1
        per_class[class_of[i]] += 1
        to_pick = distances(vectors, vectors[i : i + 1])[:, 0]
        nearest = np.minimum(nearest, to_pick)
        rest = np.flatnonzero(eligible)
        if len(rest):
            similar = hamming(hashes[rest], hashes[i : i + 1])[:, 0] <= params.rule.hash_bits
            dup = (to_pick[rest] < params.rule.distance) & similar
            eligible[rest[dup]] = False
            result.skipped[IN_THIS_BATCH] += int(dup.sum())
    return result

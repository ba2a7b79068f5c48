"""Leaks between splits: a val or test image that is, or nearly is, a training image.

A model scored on an image it trained on (or on a near-twin of one: the next frame of a clip, a
re-encoded copy) scores memory, not generalisation, and a gate that compares on such a split
promotes on noise. :func:`find_leaks` finds two kinds between train and each held-out split:

- **identical**: equal image sha256 (the same bytes, whatever the file names);
- **near-duplicate**: the rule review batches use (:class:`~server.curation.duplicates.NearDuplicateRule`:
  curation-embedding distance *and* dHash), so "near-duplicate" means one thing across the product.

FiftyOne Brain's ``compute_leaky_splits`` (the anchor) does the second with a cosine-distance
threshold on any embedding; it runs offline when given embeddings, but its threshold is not the one
measured for this rule (``server.curation.duplicates``: 580 of 580 consecutive frames, 0 of 171,000
cross-clip pairs), so edgeloop applies its own rule, in the same space as batch selection.

Users: ``edgeloop curate check-leaks`` and the curation report (over the latest dataset version,
with a ``leaks`` saved view in the App), and the retraining gate (over the exported version it
trains and scores on: :func:`leaks_in_export`), which refuses to promote on a leaky test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.episodes import EpisodeFrame, identical_pairs, near_pairs
from server.curation.splits import TRAIN

if TYPE_CHECKING:
    from server.curation.config import NearDuplicateConfig

IDENTICAL = "identical"
NEAR_DUPLICATE = "near-duplicate"
#: Pairs a summary names as examples.
EXAMPLES = 3


@dataclass(frozen=True)
class Leak:
    """One leaking pair: a frame of ``split`` and the training frame it duplicates."""

    split: str
    frame_id: str
    train_frame_id: str
    kind: str


@dataclass
class LeakReport:
    """The leaks found between train and the held-out splits, and what was checked.

    Attributes:
        leaks: Every leaking pair (a held-out frame may leak with several training frames).
        checked: Frames compared per split.
        near_checked: Whether near-duplicates were looked for (it needs the curation model).
        note: Why near-duplicates were not checked, when they were not.
    """

    leaks: list[Leak] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    near_checked: bool = True
    note: str = ""

    def in_split(self, split: str) -> list[Leak]:
        return [leak for leak in self.leaks if leak.split == split]

    def leaked_frames(self, split: str) -> set[str]:
        """Frames of ``split`` that duplicate a training frame."""
        return {leak.frame_id for leak in self.in_split(split)}

    def summary(self, split: str | None = None) -> str:
        """One sentence: how many frames of each held-out split leak, of which kind, with examples."""
        splits = [split] if split else sorted({leak.split for leak in self.leaks})
        parts = []
        for s in splits:
            leaks = self.in_split(s)
            if not leaks:
                continue
            frames = self.leaked_frames(s)
            kinds = {k: len({x.frame_id for x in leaks if x.kind == k}) for k in (IDENTICAL, NEAR_DUPLICATE)}
            shown = ", ".join(f"{x.frame_id} ~ {x.train_frame_id}" for x in leaks[:EXAMPLES])
            parts.append(
                f"{len(frames)} of {self.checked.get(s, 0)} {s} frames duplicate training frames "
                f"({kinds[IDENTICAL]} identical, {kinds[NEAR_DUPLICATE]} near-duplicates; e.g. {shown})"
            )
        if not parts:
            return "no leaks" + ("" if self.near_checked else f" by identical bytes ({self.note})")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {
            "leaks": [leak.__dict__ for leak in self.leaks],
            "checked": self.checked,
            "near_checked": self.near_checked,
            "note": self.note,
        }


def find_leaks(
    frames: Mapping[str, Sequence[EpisodeFrame]],
    vectors: Mapping[str, FrameSet] | None = None,
    rule: NearDuplicateRule | None = None,
) -> LeakReport:
    """Leaks between ``frames[TRAIN]`` and every other split's frames.

    Args:
        frames: Split name to its frames (``frame_id`` and ``sha256`` are used).
        vectors: Split name to the frames' standardised embeddings and dHashes, row for row
            (rows of NaN never match); None checks identical bytes only.
        rule: The near-duplicate rule (with ``vectors``).
    """
    train = list(frames.get(TRAIN, []))
    report = LeakReport(checked={s: len(f) for s, f in frames.items()}, near_checked=vectors is not None)
    for split, held in frames.items():
        if split == TRAIN:
            continue
        pairs = {(i, j): IDENTICAL for i, j in identical_pairs(held, train)}
        if vectors is not None and rule is not None:
            for pair in near_pairs(vectors[split], vectors[TRAIN], rule):
                pairs.setdefault(pair, NEAR_DUPLICATE)
        report.leaks += [
            Leak(split, held[i].frame_id, train[j].frame_id, kind) for (i, j), kind in sorted(pairs.items())
        ]
    return report


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leaks_in_export(
    data_yaml: Path, model: Path | None, near: NearDuplicateConfig, splits: Sequence[str] = ("test",)
) -> LeakReport:
    """Leaks between the train split of an exported YOLO data set and ``splits``, from its files.

    What the retraining gate runs on the dataset version it trains and scores on. Near-duplicates
    are judged in ``model``'s embedding space (the curation model, so the gate and the batches
    agree on what a near-duplicate is); without a model, or one without an embedding output, only
    identical bytes are checked and the report says so.
    """
    from edgeloop.yolo_dataset import load_yolo_dataset
    from server.curation.embeddings import CurationModelError, CurationSpace, RawVectors

    data = load_yolo_dataset(data_yaml)
    paths = {split: [item.image for item in data.splits.get(split, [])] for split in (TRAIN, *splits)}
    frames = {s: [EpisodeFrame(p.stem, file_sha256(p)) for p in items] for s, items in paths.items()}
    if model is None:
        return _identical_only(frames, "no model to embed with")
    try:
        space = CurationSpace(model)
    except CurationModelError as err:
        return _identical_only(frames, str(err))
    raw: dict[str, RawVectors] = {}
    for split, items in paths.items():
        rows, hashes = [], []
        for p in items:
            got = space.embed_file(str(p))
            rows.append(got[0] if got else np.full(space.dim, np.nan, np.float32))
            hashes.append(got[1] if got else 0)
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, space.dim), np.float32)
        raw[split] = RawVectors([p.stem for p in items], matrix, np.array(hashes, dtype=np.uint64), [])
    standardise = space.standardiser(*raw.values())
    rule = NearDuplicateRule(near.distance * standardise.scale, near.hash_bits)
    return find_leaks(frames, {s: standardise(r) for s, r in raw.items()}, rule)


def _identical_only(frames: Mapping[str, Sequence[EpisodeFrame]], why: str) -> LeakReport:
    report = find_leaks(frames)
    report.note = f"near-duplicates not checked: {why}"
    return report


__all__ = ["IDENTICAL", "NEAR_DUPLICATE", "Leak", "LeakReport", "file_sha256", "find_leaks", "leaks_in_export"]

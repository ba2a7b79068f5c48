"""Episodes: frames that show the same moment of the world, so that they must share a split.

Two frames of one scene a second apart are different images, yet a model that trained on one has
as good as seen the other: if a per-frame random split put one in train and the other in the
frozen test split, the test score would measure memory, not generalisation. Curation therefore
splits *episodes*, never single frames of them. Two frames are in one episode when any of these
links them (and episodes are the connected components of the links, so a chain of links joins
a whole scene):

- **the same bytes** (equal image sha256);
- **the same camera, close in time**: the same device and source, captured at most
  ``gap_s`` seconds apart (``CurationConfig.splits.episode_gap_s``);
- **near-duplicates** by the rule review batches use (:class:`~server.curation.duplicates.NearDuplicateRule`:
  curation-embedding distance *and* dHash), when the curation model is at hand.

Frames already in a dataset version keep their split forever; a new frame linked to one of them
joins that frame's episode (:func:`link_to_known`). Pure numpy, no FiftyOne.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.curation.duplicates import CHUNK_ROWS, FrameSet, NearDuplicateRule


@dataclass(frozen=True)
class EpisodeFrame:
    """What links a frame to others: its bytes, where and when it was captured.

    Attributes:
        frame_id: Its identity.
        sha256: Its image's sha256 ("" when unknown: no exact link).
        stream: Device and source (``device/source``); "" for frames of no known camera (no time link).
        captured: Capture time in seconds since the epoch (None: no time link).
    """

    frame_id: str
    sha256: str = ""
    stream: str = ""
    captured: float | None = None


def stream_key(device_id: str, source_id: str) -> str:
    """A frame's stream (``device/source``): "" for a frame of no known device (no time link)."""
    return f"{device_id}/{source_id}" if device_id else ""


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _time_neighbours(a: Sequence[EpisodeFrame], b: Sequence[EpisodeFrame], gap_s: float) -> list[tuple[int, int]]:
    """Pairs (i in a, j in b) of the same stream captured at most ``gap_s`` apart."""
    by_stream: dict[str, list[tuple[float, int]]] = {}
    for j, f in enumerate(b):
        if f.stream and f.captured is not None:
            by_stream.setdefault(f.stream, []).append((f.captured, j))
    for items in by_stream.values():
        items.sort()
    out = []
    for i, f in enumerate(a):
        items = by_stream.get(f.stream) if f.stream and f.captured is not None else None
        if not items:
            continue
        times = [t for t, _ in items]
        lo = int(np.searchsorted(times, f.captured - gap_s, side="left"))
        hi = int(np.searchsorted(times, f.captured + gap_s, side="right"))
        out += [(i, items[k][1]) for k in range(lo, hi)]
    return out


def identical_pairs(a: Sequence[EpisodeFrame], b: Sequence[EpisodeFrame]) -> list[tuple[int, int]]:
    """Pairs (i in a, j in b) of frames with the same image sha256."""
    by_sha: dict[str, list[int]] = {}
    for j, f in enumerate(b):
        if f.sha256:
            by_sha.setdefault(f.sha256, []).append(j)
    return [(i, j) for i, f in enumerate(a) if f.sha256 for j in by_sha.get(f.sha256, [])]


def near_pairs(a: FrameSet, b: FrameSet, rule: NearDuplicateRule) -> list[tuple[int, int]]:
    """Pairs (i in a, j in b) that are near-duplicates by ``rule`` (in chunks of rows)."""
    out: list[tuple[int, int]] = []
    if len(a) == 0 or len(b) == 0:
        return out
    for start in range(0, len(a), CHUNK_ROWS):
        rows, cols = np.nonzero(rule.pairs(a.subset(slice(start, start + CHUNK_ROWS)), b))
        out += [(start + int(i), int(j)) for i, j in zip(rows, cols, strict=True)]
    return out


def links(
    a: Sequence[EpisodeFrame],
    b: Sequence[EpisodeFrame],
    *,
    gap_s: float,
    vectors: tuple[FrameSet, FrameSet] | None = None,
    rule: NearDuplicateRule | None = None,
) -> list[tuple[int, int]]:
    """Every link (i, j) between frame ``a[i]`` and ``b[j]``: same bytes, same camera within
    ``gap_s``, or near-duplicates (when ``vectors`` for ``a`` and ``b`` and a ``rule`` are given).
    With ``a is b`` a frame's link to itself is left out."""
    found = set(identical_pairs(a, b)) | set(_time_neighbours(a, b, gap_s))
    if vectors is not None and rule is not None:
        found |= set(near_pairs(vectors[0], vectors[1], rule))
    if a is b:
        found = {(i, j) for i, j in found if i != j}
    return sorted(found)


def group(
    frames: Sequence[EpisodeFrame],
    *,
    gap_s: float,
    vectors: FrameSet | None = None,
    rule: NearDuplicateRule | None = None,
) -> list[int]:
    """The episode of each frame: a component label (the smallest row index in its component)."""
    uf = _UnionFind(len(frames))
    for i, j in links(frames, frames, gap_s=gap_s, vectors=None if vectors is None else (vectors, vectors), rule=rule):
        uf.union(i, j)
    return [uf.find(i) for i in range(len(frames))]


def link_to_known(
    new: Sequence[EpisodeFrame],
    known: Sequence[EpisodeFrame],
    *,
    gap_s: float,
    vectors: tuple[FrameSet, FrameSet] | None = None,
    rule: NearDuplicateRule | None = None,
) -> list[list[int]]:
    """For each new frame, the rows of ``known`` it is linked to (see :func:`links`)."""
    out: list[list[int]] = [[] for _ in new]
    for i, j in links(new, known, gap_s=gap_s, vectors=vectors, rule=rule):
        out[i].append(j)
    return out


__all__ = ["EpisodeFrame", "stream_key", "group", "identical_pairs", "link_to_known", "links", "near_pairs"]

"""When two frames are near-duplicates: close in the curation model's embedding space *and* alike to a
perceptual hash. Pure numpy, no FiftyOne.

The rule (:class:`NearDuplicateRule`): two frames are near-duplicates when the Euclidean distance
of their standardised embeddings is below ``distance`` (``CurationConfig.near_duplicates.distance``
units of the curation model's reference q50, 0.75 by default) and their 64-bit dHashes differ in
at most ``hash_bits`` bits (12 by default).

Why both, measured on synthetic video (``docs/benchmarks.md``, "Curation: near-duplicates"; 20 clips
of 30 frames over five scenarios, the shapes test model, frames JPEG-encoded as uploaded): the
embedding alone does not separate the two cases cleanly: consecutive frames of a clip lay up to
0.68 q50 apart (an object entering at the border), while frames of two different dark (night)
clips came as close as 0.49 q50, because the model sees little in either. The dHash alone does not
either: consecutive frames differ in at most 9 bits, but frames of different clips of plain scenes
in as few as 5. Together (distance < 0.75 q50 and hash <= 12 bits) every one of the 580
consecutive pairs was a near-duplicate and none of the 171,000 cross-clip pairs was; any distance
between 0.7 and 0.8 with 10-12 bits gave the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeloop.embedding import squared_distances

#: Rows compared at once: keeps an (n, m) distance block under ~64 MB for m up to ~16,000.
CHUNK_ROWS = 1024

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between every 64-bit hash of ``a`` (n,) and of ``b`` (m,): an (n, m) array."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64)[:, None], np.asarray(b, dtype=np.uint64)[None, :])
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int32)


def hamming_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between ``a[i]`` and ``b[i]`` for each ``i``: an (n,) array."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return _POPCOUNT[x.view(np.uint8)].reshape(len(x), 8).sum(axis=-1, dtype=np.int32)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between every row of ``a`` (n, d) and of ``b`` (m, d): an (n, m) array."""
    return np.sqrt(squared_distances(a, b))


def hash_from_hex(text: str) -> int:
    """A dHash as stored on a sample (16 hex digits) back to its integer."""
    return int(text, 16)


def hash_to_hex(value: int) -> str:
    """A 64-bit dHash as 16 hex digits (MongoDB has no unsigned 64-bit integers)."""
    return f"{value:016x}"


@dataclass(frozen=True)
class FrameSet:
    """Frames as curation compares them: standardised embeddings (n, d) and dHashes (n,) as uint64."""

    vectors: np.ndarray
    hashes: np.ndarray

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.hashes):
            raise ValueError(f"{len(self.vectors)} vectors but {len(self.hashes)} hashes")

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def empty(cls, dim: int) -> FrameSet:
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.uint64))

    def subset(self, rows: np.ndarray | list[int]) -> FrameSet:
        return FrameSet(self.vectors[rows], self.hashes[rows])


@dataclass(frozen=True)
class NearDuplicateRule:
    """Near-duplicates: embedding distance below ``distance`` *and* at most ``hash_bits`` differing bits.

    Attributes:
        distance: In the vectors' own units (the caller multiplies the configured fraction by q50).
        hash_bits: Most differing dHash bits.
    """

    distance: float
    hash_bits: int

    def holds(self, distance: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """The rule on distances and differing bits already measured (arrays of one shape)."""
        return (distance < self.distance) & (bits <= self.hash_bits)

    def pairs(self, a: FrameSet, b: FrameSet) -> np.ndarray:
        """(len(a), len(b)) booleans: which frame of ``a`` is a near-duplicate of which of ``b``."""
        return self.holds(distances(a.vectors, b.vectors), hamming(a.hashes, b.hashes))

    def any_in(self, a: FrameSet, b: FrameSet) -> np.ndarray:
        """(len(a),) booleans: which frames of ``a`` have a near-duplicate in ``b`` (in chunks of rows)."""
        out = np.zeros(len(a), dtype=bool)
        if len(a) == 0 or len(b) == 0:
            return out
        for start in range(0, len(a), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            out[rows] = self.pairs(a.subset(rows), b).any(axis=1)
        return out

    def duplicated_within(self, frames: FrameSet) -> np.ndarray:
        """(n,) booleans: which frames have a near-duplicate among the *other* frames of the set."""
        out = np.zeros(len(frames), dtype=bool)
        for start in range(0, len(frames), CHUNK_ROWS):
            rows = np.arange(start, min(start + CHUNK_ROWS, len(frames)))
            block = self.pairs(frames.subset(rows), frames)
            block[np.arange(len(rows)), rows] = False  # a frame is no duplicate of itself
            out[rows] = block.any(axis=1)
        return out


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of ``a``, the distance to its nearest row of ``b`` (inf when ``b`` is empty)."""
    out = np.full(len(a), np.inf, dtype=np.float64)
    if len(b) == 0:
        return out
    for start in range(0, len(a), CHUNK_ROWS):
        out[start : start + CHUNK_ROWS] = distances(a[start : start + CHUNK_ROWS], b).min(axis=1)
    return out

"""The near-duplicate rule: both the embedding distance and the perceptual hash must agree."""

from __future__ import annotations

import numpy as np

from server.curation import duplicates
from server.curation.duplicates import FrameSet, NearDuplicateRule, hamming, hash_from_hex, hash_to_hex


def test_hamming_counts_differing_bits_of_64_bit_hashes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 20, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # use the top bit too
    b = rng.integers(0, 2**63, 30, dtype=np.uint64)
    expected = np.array([[bin(int(x) ^ int(y)).count("1") for y in b] for x in a])
    assert (hamming(a, b) == expected).all()
    assert hamming(np.array([2**64 - 1], np.uint64), np.array([0], np.uint64))[0, 0] == 64


def test_hex_round_trip_keeps_all_64_bits():
    for value in (0, 1, 2**63, 2**64 - 1):
        assert hash_from_hex(hash_to_hex(value)) == value and len(hash_to_hex(value)) == 16


def test_a_pair_needs_both_close_embeddings_and_close_hashes():
    rule = NearDuplicateRule(distance=1.0, hash_bits=4)
    a = FrameSet(np.zeros((1, 3), np.float32), np.array([0], np.uint64))
    b = FrameSet(
        np.array([[0.5, 0, 0], [0.5, 0, 0], [2.0, 0, 0], [2.0, 0, 0]], np.float32),
        np.array([0b1111, 0b11111, 0, 0b1], np.uint64),
    )
    assert rule.pairs(a, b).tolist() == [[True, False, False, False]]
    assert rule.any_in(a, b).tolist() == [True]
    assert rule.any_in(a, FrameSet.empty(3)).tolist() == [False]


def test_blocks_give_the_same_answer_as_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    frames = FrameSet(rng.normal(0, 1, (50, 4)).astype(np.float32), rng.integers(0, 4, 50).astype(np.uint64))
    frames = FrameSet(
        np.concatenate([frames.vectors, frames.vectors[:5] + 0.01]), np.concatenate([frames.hashes, frames.hashes[:5]])
    )
    rule = NearDuplicateRule(distance=0.1, hash_bits=0)
    whole = rule.duplicated_within(frames), rule.any_in(frames, frames.subset(list(range(10))))
    near = duplicates.nearest_distances(frames.vectors, frames.vectors[:7])
    monkeypatch.setattr(duplicates, "CHUNK_ROWS", 7)
    assert (rule.duplicated_within(frames) == whole[0]).all()
    assert (rule.any_in(frames, frames.subset(list(range(10)))) == whole[1]).all()
    assert np.allclose(duplicates.nearest_distances(frames.vectors, frames.vectors[:7]), near)
    dup = whole[0]
    assert dup[:5].all() and dup[50:].all() and dup.sum() == 10, "each planted twin and its original, nothing else"

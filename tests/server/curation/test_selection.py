"""The batch pick as pure functions: uncertainty x diversity, near-duplicates, class cap, device quotas."""

from __future__ import annotations

import numpy as np
import pytest

from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.selection import (
    IN_THIS_BATCH,
    Pool,
    SelectionParams,
    device_quotas,
    primary_class,
    select_batch,
)

DIM = 8
RULE = NearDuplicateRule(distance=0.5, hash_bits=12)


def frames(vectors, hashes=None) -> FrameSet:
    vectors = np.asarray(vectors, dtype=np.float32)
    if hashes is None:
        # Distinct, far-apart hashes (32 differing bits between any two), unless a test says otherwise.
        hashes = [(0xFFFFFFFF << 32 if i % 2 else 0xFFFFFFFF) ^ (i * 0x0101010101) for i in range(len(vectors))]
    return FrameSet(vectors, np.asarray(hashes, dtype=np.uint64))


def spread(n: int, seed: int = 0, scale: float = 10.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, (n, DIM)).astype(np.float32)


def params(size=4, cap=1.0, scale=1.0) -> SelectionParams:
    return SelectionParams(size=size, class_cap=cap, rule=RULE, scale=scale)


def pool(vectors, uncertainty, devices=None, classes=None, hashes=None) -> Pool:
    n = len(vectors)
    return Pool(frames(vectors, hashes), np.asarray(uncertainty, float), devices or ["cam"] * n, classes or ["a"] * n)


def test_far_apart_frames_are_taken_most_uncertain_first():
    u = [0.1, 0.9, 0.5, 0.7, 0.3, 0.8]
    sel = select_batch(pool(spread(6), u), {}, params(size=3))
    assert sel.picked == [1, 5, 3]
    assert sel.short_reason == ""


def test_near_duplicates_of_a_picked_frame_are_skipped_and_counted():
    base = spread(3)
    # Frame 0 has two near-twins (tiny offsets, the same hash); all three are the most uncertain.
    vectors = np.concatenate([base[:1], base[:1] + 0.01, base[:1] - 0.01, base[1:]])
    hashes = [7, 7, 7 ^ 0b11, 1 << 40, 1 << 50]
    sel = select_batch(pool(vectors, [0.9, 0.95, 0.92, 0.2, 0.1], hashes=hashes), {}, params(size=3))
    assert sel.picked[0] == 1 and sorted(sel.picked[1:]) == [3, 4]
    assert sel.skipped[IN_THIS_BATCH] == 2


def test_close_embeddings_with_different_hashes_are_not_duplicates_but_diversity_still_spreads():
    base = spread(2)
    vectors = np.concatenate([base[:1], base[:1] + 0.01, base[1:]])
    hashes = [0, (1 << 64) - 1, 1 << 20]  # 64 and more bits apart: not near-duplicates by the rule
    sel = select_batch(pool(vectors, [0.9, 0.85, 0.5], hashes=hashes), {}, params(size=2, scale=5.0))
    assert sel.skipped[IN_THIS_BATCH] == 0
    assert sel.picked == [0, 2], "the twin of a picked frame loses to a less uncertain but new frame"


def test_near_duplicates_of_curated_frames_are_skipped_by_name():
    vectors = spread(6)
    hashes = [h << 20 for h in range(6)]
    training = frames(vectors[:2] + 0.01, hashes[:2])  # twins of pool frames 0 and 1
    # Close to pool frame 2 in embedding only (its hash is 64 bits away), and a twin of pool frame 3.
    other = frames(np.stack([vectors[2] - 0.01, vectors[3]]), [hashes[2] ^ ((1 << 64) - 1), hashes[3]])
    sel = select_batch(
        pool(vectors, [0.9] * 6, hashes=hashes), {"training set": training, "other batches": other}, params(size=6)
    )
    assert sel.skipped == {"training set": 2, "other batches": 1, IN_THIS_BATCH: 0}
    assert sorted(sel.picked) == [2, 4, 5]
    assert sel.short_reason.startswith("the pool ran out")


def test_class_cap_is_hard_and_the_reason_is_given():
    n = 20
    classes = ["circle"] * 15 + ["square"] * 5
    sel = select_batch(pool(spread(n), np.linspace(1, 0.5, n), classes=classes), {}, params(size=10, cap=0.4))
    picked = [classes[i] for i in sel.picked]
    assert picked.count("circle") == 4 and picked.count("square") == 4
    assert "class cap" in sel.short_reason and len(sel.picked) == 8


def test_device_quotas_follow_the_pool_share_and_unfillable_quota_moves():
    devices = ["cam-a"] * 60 + ["cam-b"] * 30 + ["cam-c"] * 10
    u = np.random.default_rng(1).uniform(0, 1, 100)
    u[60:90] += 1.0  # cam-b's frames are all more uncertain: quotas must still hold
    sel = select_batch(pool(spread(100), np.clip(u, 0, 1), devices=devices), {}, params(size=20))
    got = [devices[i] for i in sel.picked]
    assert sel.quotas == {"cam-a": 12, "cam-b": 6, "cam-c": 2}
    assert {d: got.count(d) for d in sel.quotas} == sel.quotas
    # cam-c has only 1 frame left: its second slot goes to the others.
    devices2 = ["cam-a"] * 60 + ["cam-b"] * 39 + ["cam-c"]
    sel2 = select_batch(pool(spread(100), u.clip(0, 1), devices=devices2), {}, params(size=20))
    assert len(sel2.picked) == 20 and [devices2[i] for i in sel2.picked].count("cam-c") == 1


def test_device_quotas_give_every_device_a_frame_when_there_is_room():
    assert device_quotas(["a"] * 97 + ["b"] * 2 + ["c"], 10) == {"a": 8, "b": 1, "c": 1}
    assert device_quotas(["a"] * 5, 10) == {"a": 5}
    assert device_quotas([], 10) == {}
    assert sum(device_quotas(["a"] * 3 + ["b"] * 3 + ["c"] * 3, 7).values()) == 7


def test_primary_class_is_the_largest_summed_confidence():
    assert primary_class(["a", "b", "b"], [0.9, 0.5, 0.5]) == "b"
    assert primary_class([], []) == ""
    assert primary_class(["a", "b"], [0.5, 0.5]) == "a"  # ties by name: deterministic


def test_selection_beats_random_on_uncertainty_and_never_takes_two_near_duplicates():
    rng = np.random.default_rng(3)
    centers = spread(30, seed=4)
    clip = rng.integers(0, 30, 600)
    vectors = centers[clip] + rng.normal(0, 0.05, (600, DIM)).astype(np.float32)
    hashes = clip.astype(np.uint64) << np.uint64(20)
    u = rng.uniform(0, 1, 600)
    sel = select_batch(
        Pool(FrameSet(vectors, hashes), u, [f"cam-{c % 3}" for c in clip], ["x"] * 600), {}, params(size=25)
    )
    assert len(sel.picked) == 25
    assert len(set(clip[sel.picked])) == 25, "two frames of the same clip"
    random_means = [u[rng.choice(600, 25, replace=False)].mean() for _ in range(200)]
    assert u[sel.picked].mean() > np.quantile(random_means, 0.99)


def test_pool_arrays_must_match():
    with pytest.raises(ValueError):
        Pool(frames(spread(3)), np.zeros(2), ["a"] * 3, ["x"] * 3)

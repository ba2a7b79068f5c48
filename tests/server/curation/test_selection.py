"""The batch pick as pure functions: calibrated score, episodes, allocation by need, coverage, class
balance on the classes a frame contains, near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.selection import (
    BOX,
    IN_THIS_BATCH,
    SAME_EPISODE,
    Pool,
    SelectionParams,
    box_uncertainty,
    calibrated_scores,
    device_quotas,
    episode_representatives,
    frame_classes,
    frame_evidence,
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


def params(size=4, cap=1.0, scale=1.0, **kw) -> SelectionParams:
    return SelectionParams(size=size, class_cap=cap, rule=RULE, scale=scale, **kw)


def pool(vectors, score, devices=None, classes=None, hashes=None, captured=None) -> Pool:
    n = len(vectors)
    return Pool(
        frames(vectors, hashes),
        {"edge": np.asarray(score, float)},
        devices or ["cam"] * n,
        [frozenset(c) if not isinstance(c, str) else frozenset({c}) for c in (classes or ["a"] * n)],
        None if captured is None else np.asarray(captured, float),
    )


# -- the calibrated score ----------------------------------------------------------------------


def test_box_uncertainty_is_the_most_uncertain_box_not_a_sum():
    assert box_uncertainty([0.5]) == pytest.approx(1.0)
    assert box_uncertainty([0.9]) == pytest.approx(0.2)
    assert box_uncertainty([]) == 0.0
    # A crowd of confident boxes is as uncertain as one of them; a noisy-OR would saturate.
    assert box_uncertainty([0.9] * 40) == pytest.approx(box_uncertainty([0.9]))
    assert box_uncertainty([0.9] * 40) < box_uncertainty([0.6])


def test_frame_evidence_leaves_out_random_and_the_box_band_and_keeps_each_trigger():
    ev = frame_evidence([("confidence_band", 0.99), ("random", 1.0), ("flicker", 0.4), ("flicker", 0.6)], [0.7, 0.95])
    assert ev == {BOX: pytest.approx(0.6), "flicker": 0.6}


def test_calibrated_score_is_the_best_percentile_over_kinds():
    # Kind a on a 0-1 scale, kind b on a 0-100 scale and firing on two frames only.
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    b = np.array([0.0, 0.0, 0.0, 5.0, 90.0])
    score, kind = calibrated_scores({"a": a, "b": b}, 5)
    assert score[4] == pytest.approx(1.0) and kind[4] == "b", "the top of a kind scores 1 whatever its scale"
    assert score[3] == pytest.approx(1.0) and kind[3] == "a", "and the top of another kind too"
    assert score[:3] == pytest.approx([0.4, 0.6, 0.8]), "percentiles over all five frames, 0 counted"
    ties, _ = calibrated_scores({"a": np.array([0.5, 0.5, 0.0, 0.0])}, 4)
    assert ties[0] == ties[1] > 0 and ties[2] == ties[3] == 0


def test_a_crowd_does_not_outrank_a_frame_top_of_another_kind_of_evidence():
    crowd = frame_evidence([("confidence_band", 0.999)], [0.35, 0.4, 0.45, 0.3, 0.62] * 5)
    single = frame_evidence([("image_novelty", 0.8)], [0.95])
    rest = [frame_evidence([("image_novelty", 0.1 * k)], [0.9]) for k in range(1, 6)]
    p = Pool.from_rows(frames(spread(7)), [crowd, single, *rest], ["cam"] * 7, [frozenset({"a"})] * 7)
    score, kind = calibrated_scores(p.evidence, 7)
    assert score[1] == pytest.approx(score[0]) == pytest.approx(1.0)
    assert kind[0] == BOX and kind[1] == "image_novelty"


# -- episodes ----------------------------------------------------------------------------------


LOOSE = NearDuplicateRule(distance=1.0, hash_bits=24)


def test_one_frame_per_episode_the_most_informative():
    streams = ["cam-a"] * 6 + ["cam-b"] * 2
    captured = np.array([0.0, 1.0, 2.5, 10.0, 11.0, np.nan, 0.5, 1.0])
    scores = np.array([0.2, 0.9, 0.4, 0.3, 0.1, 0.5, 0.1, 0.8])
    same = frames(np.zeros((8, DIM)), np.zeros(8))  # every frame the same picture
    keep = episode_representatives(streams, captured, same, scores, np.ones(8, bool), 3.0, LOOSE)
    # cam-a: 0-2.5 s is one episode (best 1), 10-11 s another (best 3), no time is its own; cam-b one.
    assert np.flatnonzero(keep).tolist() == [1, 3, 5, 7]
    assert episode_representatives(streams, captured, same, scores, np.ones(8, bool), 0, LOOSE).all()
    # A run longer than the gap is several moments, not one.
    still = frames(np.zeros((10, DIM)), np.zeros(10))
    long = episode_representatives(["c"] * 10, np.arange(10.0), still, np.ones(10), np.ones(10, bool), 3.0, LOOSE)
    assert long.sum() == 3
    # A cut (another picture: far in embedding or in hash) starts a new episode however close in
    # time, as in a folder of photos read in a second.
    t = np.array([0, 0.1, 0.2, 0.3])
    far_hash = frames(np.zeros((4, DIM)), [0, 0, (1 << 40) - 1, (1 << 40) - 1])
    far_vec = frames(np.array([[0.0] * DIM, [0.0] * DIM, [5.0] * DIM, [5.0] * DIM]), np.zeros(4))
    for cut in (far_hash, far_vec):
        assert episode_representatives(["c"] * 4, t, cut, np.ones(4), np.ones(4, bool), 3.0, LOOSE).sum() == 2


def test_select_batch_takes_one_frame_of_an_uncertain_episode_and_counts_the_rest():
    captured = [0, 0.5, 1, 1.5, 2, 2.5, 100, 200, 300, 400, 500, 600]  # the first six are one moment
    u = [0.9, 0.99, 0.95, 0.97, 0.93, 0.91, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55]
    vectors = np.concatenate([np.repeat(spread(1), 6, axis=0), spread(6, seed=1)])  # one moment, then six scenes
    sel = select_batch(
        pool(vectors, u, captured=captured, hashes=[5] * 6 + [1 << (10 * k) for k in range(6)]), {}, params(size=4)
    )
    assert sel.skipped[SAME_EPISODE] == 5
    assert sel.picked[0] == 1 and sum(i < 6 for i in sel.picked) == 1


# -- allocation by need ------------------------------------------------------------------------


def test_quotas_follow_need_with_a_floor_and_a_cap():
    # A chatty camera of low need and a quiet one of high need: shares follow need, not frames.
    q = device_quotas({"chatty": 10.0, "quiet": 30.0}, {"chatty": 100, "quiet": 40}, 20, 20)
    assert q == {"chatty": 5, "quiet": 15}
    # The cap: at most 10 of 20 for one camera while the other has candidates.
    assert device_quotas({"chatty": 10.0, "quiet": 30.0}, {"chatty": 100, "quiet": 40}, 20, 10) == {
        "chatty": 10,
        "quiet": 10,
    }
    # A floor: every camera with a candidate gets one frame when there is room.
    q = device_quotas({"a": 100.0, "b": 0.01, "c": 0.0}, {"a": 50, "b": 5, "c": 1}, 10, 10)
    assert q["b"] == 1 and q["c"] == 1 and sum(q.values()) == 10
    # The cap yields when the others cannot fill the batch; a camera never gets more than it has.
    assert device_quotas({"a": 1.0, "b": 1.0}, {"a": 30, "b": 3}, 20, 5) == {"a": 17, "b": 3}
    assert device_quotas({}, {}, 10, 5) == {}


def test_select_batch_gives_the_needier_camera_more_of_the_batch():
    rng = np.random.default_rng(1)
    devices = ["cam-known"] * 60 + ["cam-shift"] * 20
    u = np.concatenate([rng.uniform(0.0, 0.4, 60), rng.uniform(0.6, 1.0, 20)])
    sel = select_batch(pool(spread(80), u, devices=devices), {}, params(size=20, device_share_cap=1.0))
    got = [devices[i] for i in sel.picked]
    # The pool's best 20 are cam-shift's; cam-known keeps its floor of one. By frame count it
    # would have been 15 to 5 the other way.
    assert sel.quotas == {"cam-known": 1, "cam-shift": 19}
    assert {d: got.count(d) for d in sel.quotas} == sel.quotas
    capped = select_batch(pool(spread(80), u, devices=devices), {}, params(size=20, device_share_cap=0.5))
    assert capped.quotas == {"cam-known": 10, "cam-shift": 10}


# -- coverage ----------------------------------------------------------------------------------


def test_coverage_spreads_the_batch_over_scenes_instead_of_the_best_scored_one():
    rng = np.random.default_rng(2)
    centers = spread(4, seed=5, scale=30.0)  # four distinct scenes, far apart
    member = np.repeat(np.arange(4), 10)
    vectors = centers[member] + rng.normal(0, 2.0, (40, DIM)).astype(np.float32)  # distinct frames of a scene
    u = np.where(member == 0, 0.9, 0.6) + rng.uniform(0, 0.05, 40)  # scene 0 scores best throughout
    sel = select_batch(pool(vectors, u), {}, params(size=8, scale=1.0))
    scenes = member[sel.picked]
    assert sel.skipped[IN_THIS_BATCH] == 0, "no two frames here are near-duplicates"
    assert sorted(scenes[:4].tolist()) == [0, 1, 2, 3], "every scene before a second frame of one"
    assert (scenes == 0).sum() < 8, "by score alone all eight would be scene 0's"


def test_frames_near_curated_ones_come_after_new_ones():
    vectors = spread(4)
    curated = frames(vectors[:2] + 0.6, [1 << 60, 1 << 61])  # close, but not near-duplicates (hash far)
    sel = select_batch(pool(vectors, [0.9, 0.9, 0.8, 0.8]), {"training set": curated}, params(size=2))
    assert sorted(sel.picked) == [2, 3]


# -- class balance -----------------------------------------------------------------------------


def test_a_pool_where_every_frame_holds_the_dominant_class_fills_the_batch():
    n = 200
    rng = np.random.default_rng(4)
    classes = [{"car"} | ({"bus"} if i % 25 == 0 else set()) | ({"bike"} if i % 40 == 1 else set()) for i in range(n)]
    u = rng.uniform(0, 1, n)
    sel = select_batch(pool(spread(n), u, classes=classes), {}, params(size=40, cap=0.4))
    assert len(sel.picked) == 40 and sel.short_reason == ""
    rare = {i for i, c in enumerate(classes) if c != {"car"} and u[i] > np.median(u)}
    assert len(rare) >= 5 and rare <= set(sel.picked), "every fairly uncertain frame of a rare class is in"
    # Under the cap: the first 16 (car's cap), and every frame holding bus or bike after them; the rest yielded.
    late_rare = [i for i in sel.picked[16:] if classes[i] != {"car"}]
    assert sel.cap_yielded == 40 - 16 - len(late_rare) > 0
    assert sum("past the class cap" in w for w in sel.why) == sel.cap_yielded


def test_a_capped_class_waits_while_frames_of_other_classes_are_left():
    n = 40
    classes = ["circle"] * 20 + ["square"] * 10 + ["triangle"] * 10
    u = np.concatenate([np.linspace(1.0, 0.8, 20), np.linspace(0.6, 0.5, 10), np.linspace(0.6, 0.5, 10)])
    sel = select_batch(pool(spread(n), u, classes=classes), {}, params(size=10, cap=0.4))
    got = [classes[i] for i in sel.picked]
    assert got.count("circle") == 4, "the best-scored class stops at the cap while others are left"
    assert sel.cap_yielded == 0 and len(sel.picked) == 10


def test_frames_of_rare_classes_come_first_among_equals():
    n = 30
    classes = [{"car"}] * 27 + [{"car", "bus"}] * 3
    sel = select_batch(pool(spread(n), np.full(n, 0.7), classes=classes), {}, params(size=5, cap=1.0))
    assert set(sel.picked[:3]) == {27, 28, 29}
    assert all("rarest class 'bus'" in w for w in sel.why[:3])


def test_frame_classes_are_the_predicted_classes_or_none():
    assert frame_classes(["car", "car", "bus"]) == {"car", "bus"}
    assert frame_classes([]) == {""}


# -- near-duplicates ---------------------------------------------------------------------------


def test_near_duplicates_of_a_picked_frame_are_skipped_and_counted():
    base = spread(3)
    # Frame 0 has two near-twins (tiny offsets, the same hash); all three are the most uncertain.
    vectors = np.concatenate([base[:1], base[:1] + 0.01, base[:1] - 0.01, base[1:]])
    hashes = [7, 7, 7 ^ 0b11, 1 << 40, 1 << 50]
    sel = select_batch(pool(vectors, [0.9, 0.95, 0.92, 0.2, 0.1], hashes=hashes), {}, params(size=3))
    assert sel.picked[0] == 1 and sorted(sel.picked[1:]) == [3, 4]
    assert sel.skipped[IN_THIS_BATCH] == 2


def test_near_duplicates_of_curated_frames_are_skipped_by_name_and_a_short_batch_says_why():
    vectors = spread(6)
    hashes = [h << 20 for h in range(6)]
    training = frames(vectors[:2] + 0.01, hashes[:2])  # twins of pool frames 0 and 1
    # Close to pool frame 2 in embedding only (its hash is 64 bits away), and a twin of pool frame 3.
    other = frames(np.stack([vectors[2] - 0.01, vectors[3]]), [hashes[2] ^ ((1 << 64) - 1), hashes[3]])
    sel = select_batch(
        pool(vectors, [0.9] * 6, hashes=hashes), {"training set": training, "other batches": other}, params(size=6)
    )
    assert sel.skipped == {"training set": 2, "other batches": 1, SAME_EPISODE: 0, IN_THIS_BATCH: 0}
    assert sorted(sel.picked) == [2, 4, 5]
    assert sel.short_reason.startswith("the pool ran out")


def test_selection_beats_random_on_score_never_takes_two_near_duplicates_and_says_why():
    rng = np.random.default_rng(3)
    centers = spread(30, seed=4)
    clip = rng.integers(0, 30, 600)
    vectors = centers[clip] + rng.normal(0, 0.05, (600, DIM)).astype(np.float32)
    hashes = clip.astype(np.uint64) << np.uint64(20)
    u = rng.uniform(0, 1, 600)
    p = Pool(FrameSet(vectors, hashes), {"edge": u}, [f"cam-{c % 3}" for c in clip], [frozenset({"x"})] * 600)
    sel = select_batch(p, {}, params(size=25))
    assert len(sel.picked) == 25
    assert len(set(clip[sel.picked])) == 25, "two frames of the same clip"
    random_means = [u[rng.choice(600, 25, replace=False)].mean() for _ in range(200)]
    assert u[sel.picked].mean() > np.quantile(random_means, 0.99)
    assert len(sel.why) == 25 and all(w.startswith("score ") and "by need" in w for w in sel.why)


def test_pool_arrays_must_match():
    with pytest.raises(ValueError):
        Pool(frames(spread(3)), {"edge": np.zeros(2)}, ["a"] * 3, [frozenset({"x"})] * 3)

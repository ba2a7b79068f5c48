"""The keep decision that selects: each camera keeps its top share of frames, whatever its scores."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.keep import AdaptiveKeep, KeepConfig
from edge_agent.triggers import TriggersConfig, UncertaintyScorer
from edgeloop.domain import Detection


def kept_share(keep: AdaptiveKeep, source: str, scores) -> float:
    return float(np.mean([keep.admit(source, float(s)) for s in scores]))


@pytest.mark.parametrize(
    "scores",
    [
        np.random.default_rng(0).uniform(0, 1, 3000),
        np.ones(3000) * 0.999,  # a crowded camera: the noisy-OR saturates on every frame
        np.where(np.random.default_rng(1).uniform(0, 1, 3000) < 0.7, 0.95, 0.3),  # two kinds of scene
        np.random.default_rng(2).beta(8, 1, 3000),  # a weak model: nearly every frame scores high
    ],
    ids=["uniform", "saturated", "bimodal", "weak-model"],
)
def test_the_share_holds_whatever_the_scores(scores):
    keep = AdaptiveKeep(KeepConfig(share=0.2, window=600, warmup=20), seed=0)
    share = kept_share(keep, "cam", scores)
    assert share == pytest.approx(0.2, abs=0.03)


def test_it_keeps_the_most_uncertain_frames_and_follows_a_change_of_scene():
    keep = AdaptiveKeep(KeepConfig(share=0.1, window=300, warmup=20), seed=0)
    rng = np.random.default_rng(3)
    calm = rng.uniform(0.0, 0.5, 1000)
    decisions = [keep.admit("cam", float(s)) for s in calm]
    kept = calm[20:][np.asarray(decisions[20:])]
    assert kept.mean() > np.quantile(calm, 0.85), "the kept frames are the top of the camera's scores"
    # The scene changes and every score rises: after one window the share is back at 10%.
    busy = rng.uniform(0.5, 1.0, 1000)
    after = [keep.admit("cam", float(s)) for s in busy]
    assert np.mean(after[300:]) == pytest.approx(0.1, abs=0.03)


def test_cameras_are_ranked_apart_and_warmup_and_no_share_keep_everything():
    keep = AdaptiveKeep(KeepConfig(share=0.2, window=200, warmup=50), seed=0)
    rng = np.random.default_rng(4)
    assert all(keep.admit("new-cam", float(s)) for s in rng.uniform(0, 1, 49)), "warm-up keeps all"
    high, low = rng.uniform(0.8, 1.0, 2000), rng.uniform(0.0, 0.2, 2000)
    shares = [kept_share(keep, "busy", high), kept_share(keep, "quiet", low)]
    assert shares == pytest.approx([0.2, 0.2], abs=0.03), "a busier camera does not upload more"
    off = AdaptiveKeep(KeepConfig(share=None), seed=0)
    assert kept_share(off, "cam", rng.uniform(0, 1, 500)) == 1.0


def test_the_scorer_keeps_at_most_the_share_plus_the_random_rate_on_a_stream_that_always_fires():
    config = TriggersConfig()  # defaults: share 0.2, random 1%
    scorer = UncertaintyScorer(config, seed=0)
    rng = np.random.default_rng(5)
    kept = []
    for t in range(2000):
        # Several boxes in the confidence band on every frame: every frame has evidence.
        n = int(rng.integers(1, 6))
        dets = [
            Detection(box=(10.0 * k, 10.0, 10.0 * k + 8, 18.0), class_id=0, class_name="fish",
                      confidence=float(rng.uniform(0.3, 0.6)))
            for k in range(1, 1 + n)
        ]  # fmt: skip
        kept.append(scorer.score("cam-1", dets, t * 0.2, image_size=(640, 480), stream=True).keep)
    share = np.mean(kept[config.keep.warmup :])
    assert share <= config.keep.share + config.random.rate + 0.02
    assert share >= config.keep.share - 0.03


def test_a_rising_score_cannot_push_the_share_over_its_budget():
    """Every new frame scores higher than the last (a scene getting harder): each ranks first among the
    camera's recent frames, so the quantile alone would keep them all; the budget holds the share."""
    keep = AdaptiveKeep(KeepConfig(share=0.2, window=100, warmup=0), seed=0)
    rising = np.linspace(0.1, 0.9, 1000)
    decisions = [keep.admit("cam", float(s)) for s in rising]
    assert np.mean(decisions) == pytest.approx(0.2, abs=0.01)
    # In every window of 100 frames, at most 20 kept (plus the one that may straddle).
    counts = np.convolve(np.asarray(decisions, float), np.ones(100), mode="valid")
    assert counts.max() <= 21
    # A frame that may not be kept at all (no trigger fired) is recorded and never kept.
    assert not keep.admit("cam", 0.99, candidate=False)

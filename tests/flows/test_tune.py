"""tune's search space: learning rate log-uniform, 1 - momentum log-uniform, best by val mAP50-95."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from flows.training.tune import Trial, best_trial, sample_trials


def test_trials_are_drawn_on_a_log_scale_within_their_ranges():
    pairs = sample_trials(2000, (1e-4, 1e-1), (0.8, 0.99), seed=0)
    lr = np.array([p[0] for p in pairs])
    momentum = np.array([p[1] for p in pairs])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-1 and momentum.min() >= 0.8 and momentum.max() <= 0.99
    # Log-uniform: each decade of the learning rate gets about a third of the draws.
    decades = np.histogram(np.log10(lr), bins=[-4, -3, -2, -1])[0] / len(lr)
    assert np.allclose(decades, 1 / 3, atol=0.05)
    # 1 - momentum log-uniform over [0.01, 0.2]: half the draws above 0.9553 (the geometric midpoint).
    assert np.mean(momentum > 1 - math.sqrt(0.01 * 0.2)) == pytest.approx(0.5, abs=0.05)
    assert sample_trials(4, (1e-4, 1e-1), (0.8, 0.99), seed=3) == sample_trials(4, (1e-4, 1e-1), (0.8, 0.99), seed=3)


def test_bad_ranges_are_refused_and_the_best_trial_wins():
    with pytest.raises(ValueError, match="lr0_range"):
        sample_trials(2, (0.0, 0.1), (0.8, 0.9), seed=0)
    with pytest.raises(ValueError, match="momentum_range"):
        sample_trials(2, (1e-3, 0.1), (0.8, 1.0), seed=0)
    trials = [Trial(i, 0.01, 0.9, v, Path(".")) for i, v in enumerate([0.2, 0.5, 0.5, 0.1])]
    assert best_trial(trials).index == 1
    with pytest.raises(ValueError, match="no trials"):
        best_trial([])

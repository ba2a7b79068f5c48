"""Hyper-parameter search for the learning rate and momentum: random search on a log scale.

Random search beats a grid when few of the knobs matter (Bergstra and Bengio, 2012), and the
learning rate spans orders of magnitude, so it is sampled log-uniformly; momentum matters near 1,
so ``1 - momentum`` is sampled log-uniformly (0.9 and 0.99 are as far apart as 0.99 and 0.999).
Each trial is a short training; the best is the one with the highest val mAP50-95 of any epoch
(the test split stays untouched: it judges the final model, not the search).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.training.config import TrainingConfig
from flows.training.report import read_results
from flows.training.trainer import train_with_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One training of the search and how it did on the val split."""

    index: int
    lr0: float
    momentum: float
    val_map50_95: float
    run_dir: Path


def sample_trials(
    n: int, lr0_range: tuple[float, float], momentum_range: tuple[float, float], seed: int
) -> list[tuple[float, float]]:
    """``n`` (lr0, momentum) pairs: lr0 log-uniform in its range, ``1 - momentum`` log-uniform in its range.

    Raises:
        ValueError: a range is empty, not positive, or momentum reaches 1.
    """
    lo, hi = lr0_range
    mlo, mhi = momentum_range
    if not 0 < lo <= hi:
        raise ValueError(f"lr0_range must satisfy 0 < low <= high, got {lr0_range}")
    if not 0 <= mlo <= mhi < 1:
        raise ValueError(f"momentum_range must satisfy 0 <= low <= high < 1, got {momentum_range}")
    rng = np.random.default_rng(seed)
    lr = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    one_minus = np.exp(rng.uniform(math.log(1 - mhi), math.log(1 - mlo), n))
    return [(float(a), float(1 - b)) for a, b in zip(lr, one_minus, strict=True)]


def run_trial(
    index: int,
    data_yaml: Path,
    work: Path,
    base: TrainingConfig,
    lr0: float,
    momentum: float,
    start: Path | None = None,
) -> Trial:
    """Train once with ``lr0`` and ``momentum`` (everything else from ``base``) and read its best val mAP50-95."""
    config = base.model_copy(update={"lr0": lr0, "momentum": momentum})
    result = train_with_config(data_yaml, work / f"trial-{index}", config, start=start, state_dir=work / "state")
    epochs = read_results(result.results_csv)
    best = max((e.map50_95 for e in epochs if math.isfinite(e.map50_95)), default=0.0)
    logger.info("trial %d: lr0 %.2e momentum %.4f -> val mAP50-95 %.4f", index, lr0, momentum, best)
    return Trial(index, lr0, momentum, best, result.run_dir)


def best_trial(trials: list[Trial]) -> Trial:
    """The trial with the highest val mAP50-95 (the first of equals).

    Raises:
        ValueError: no trials.
    """
    if not trials:
        raise ValueError("no trials to choose from")
    return max(trials, key=lambda t: (t.val_map50_95, -t.index))


__all__ = ["Trial", "best_trial", "run_trial", "sample_trials"]

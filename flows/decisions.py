"""What the scheduled flows decide, as plain functions: whether to retrain now, whether to start a review batch.

:func:`retrain_decision` is the ``trigger`` flow's logic: retrain on the newest dataset version when
it holds at least ``min_new_samples`` samples the production model was not trained on, unless that
version was already trained on (a registered candidate, promoted or rejected, names it: a rejected
candidate is not retried on the same data every hour; a new dataset version is needed).
:func:`curate_decision` is the ``curate`` flow's: ask curation for a review batch once enough new
inbox frames wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flows.curation import Curation
from server.registry.store import ModelRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to retrain, on which dataset version, and why."""

    retrain: bool
    dataset_version: str | None
    new_samples: int
    reason: str


def retrain_decision(
    curation: Curation,
    registry: ModelRegistry,
    *,
    min_new_samples: int,
    stable_channel: str = "stable",
    dataset_version: str | None = None,
) -> RetrainDecision:
    """Decide whether ``dataset_version`` (default: the newest) justifies a retraining now."""
    version = dataset_version or curation.latest_version()
    if version is None:
        return RetrainDecision(False, None, 0, "no dataset version yet")
    production = registry.current(stable_channel)
    trained_on = (registry.get(production).dataset_version or None) if production else None
    tried = [v.version for v in registry.list() if v.dataset_version == version]
    if tried:
        return RetrainDecision(
            False, version, 0, f"dataset version {version} was already trained on (model {', '.join(tried)})"
        )
    new = curation.unconsumed_samples(version, trained_on)
    basis = f"production {production} was trained on {trained_on or 'nothing recorded'}" if production else "no model"
    if new < min_new_samples:
        return RetrainDecision(
            False, version, new, f"{version} has {new} new samples ({basis}); {min_new_samples} needed"
        )
    return RetrainDecision(True, version, new, f"{version} has {new} new samples ({basis})")


def curate_decision(curation: Curation, *, min_new_frames: int) -> str | None:
    """Ask curation for a review batch; its name, or None when too few new frames wait."""
    batch = curation.next_batch(min_new_frames)
    if batch:
        logger.info("review batch %s is ready for the curators", batch)
    return batch


__all__ = ["RetrainDecision", "curate_decision", "retrain_decision"]

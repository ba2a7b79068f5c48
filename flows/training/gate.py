"""The promotion gate: a candidate model ships only when it is better than the one running.

Both models are evaluated on the same frozen test split in the same run
(:func:`flows.training.evaluate.evaluate_onnx`), so the comparison is like for like. The rules
(:class:`GateConfig`):

* With a production model: the candidate's mAP50-95 must beat production's by at least
  ``min_improvement``, and no class may lose more than ``max_class_drop`` AP50-95 (a better
  average that forgets a rare class is not better for the camera that sees that class).
  Classes are compared by name; a class the production model did not know cannot drop.
* A project's first model (nothing in production): its mAP50-95 must reach ``first_model_floor``.
* Either way, never on a **leaky** test split: when test images are identical to, or near-duplicates
  of, images of the candidate's training split (:func:`server.curation.leaks.leaks_in_export`), the
  score measures memory, and the gate refuses whatever the numbers (``refuse_leaks``).

:func:`decide` returns a :class:`GateDecision` whose ``reason`` is one sentence a person can act on;
it is recorded with a rejected candidate in the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from edgeloop.config_base import StrictModel
from flows.training.evaluate import Evaluation
from server.curation.config import NearDuplicateConfig
from server.curation.leaks import LeakReport


class GateConfig(StrictModel):
    """When a candidate model may replace production."""

    min_improvement: float = Field(
        0.005,
        ge=-1.0,
        le=1.0,
        description="mAP50-95 the candidate must gain over production on the test split (0: equal is enough; "
        "negative tolerates a small loss).",
    )
    max_class_drop: float = Field(
        0.05, ge=0.0, le=1.0, description="Largest AP50-95 any one class may lose against production."
    )
    first_model_floor: float = Field(
        0.1, ge=0.0, le=1.0, description="mAP50-95 a project's first model must reach (nothing to compare with)."
    )
    refuse_leaks: bool = Field(
        True,
        description="Refuse to promote when the test split shares images (identical or near-duplicates) with the "
        "training split: the comparison would measure memory. Turn off only to measure a known leak.",
    )
    near_duplicates: NearDuplicateConfig = Field(
        default_factory=NearDuplicateConfig,
        description="What counts as a near-duplicate leak (keep it equal to the server's curation.near_duplicates).",
    )


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: promote or not, why, and the numbers it used."""

    promote: bool
    reason: str
    candidate_map50_95: float
    production_map50_95: float | None = None
    class_drops: dict[str, float] = field(default_factory=dict)
    leaks: int = 0  # test frames that duplicate a training frame

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: Evaluation, production: Evaluation | None, config: GateConfig, leaks: LeakReport | None = None
) -> GateDecision:
    """Judge ``candidate`` against ``production`` (None: the project's first model) on the same split,
    which must not leak (``leaks``: what :func:`~server.curation.leaks.leaks_in_export` found)."""
    cand = candidate.map50_95
    prod_score = production.map50_95 if production is not None else None
    leaked = len(leaks.leaked_frames("test")) if leaks is not None else 0
    if leaked and config.refuse_leaks:
        reason = (
            f"leaky test split: {leaks.summary('test')}; mAP50-95 {cand:.4f} would measure memory, not the "
            "model: fix the splits (edgeloop curate check-leaks) and retrain"
        )
        return GateDecision(False, reason, cand, prod_score, leaks=leaked)
    if production is None:
        if cand >= config.first_model_floor:
            reason = f"first model: mAP50-95 {cand:.4f} reaches the floor {config.first_model_floor:.4f}"
            return GateDecision(True, reason, cand)
        reason = f"first model: mAP50-95 {cand:.4f} is below the floor {config.first_model_floor:.4f}"
        return GateDecision(False, reason, cand)

    prod = production.map50_95
    mine, theirs = candidate.class_ap(), production.class_ap()
    drops = {name: theirs[name] - ap for name, ap in mine.items() if name in theirs and theirs[name] - ap > 0}
    worst = max(drops.items(), key=lambda kv: kv[1], default=None)
    gain = cand - prod
    if gain < config.min_improvement:
        reason = (
            f"mAP50-95 {cand:.4f} vs production {prod:.4f} ({gain:+.4f}): needs at least {config.min_improvement:+.4f}"
        )
        return GateDecision(False, reason, cand, prod, drops)
    if worst is not None and worst[1] > config.max_class_drop:
        name, drop = worst
        reason = (
            f"class {name!r} drops {drop:.4f} AP50-95 ({theirs[name]:.4f} -> {mine[name]:.4f}), more than the "
            f"allowed {config.max_class_drop:.4f}, although mAP50-95 gains {gain:+.4f}"
        )
        return GateDecision(False, reason, cand, prod, drops)
    reason = f"mAP50-95 {cand:.4f} beats production {prod:.4f} by {gain:+.4f}; no class drops more than " + (
        f"{config.max_class_drop:.4f}"
    )
    return GateDecision(True, reason, cand, prod, drops)


__all__ = ["GateConfig", "GateDecision", "decide"]

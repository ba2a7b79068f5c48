"""The gate: only a candidate better than production by the margin, with no class dropping too far, ships."""

from __future__ import annotations

import pytest

from flows.training.evaluate import ClassMetrics, Evaluation
from flows.training.gate import GateConfig, decide


def evaluation(**ap: float) -> Evaluation:
    per_class = [ClassMetrics(name, 10, min(1.0, v + 0.2), v) for name, v in ap.items()]
    mean = sum(ap.values()) / len(ap)
    return Evaluation("m.onnx", "test", 5, 10 * len(ap), min(1.0, mean + 0.2), mean, 0.5, 0.5, per_class)


CONFIG = GateConfig(min_improvement=0.01, max_class_drop=0.05, first_model_floor=0.2)


def test_a_better_candidate_is_promoted():
    decision = decide(evaluation(a=0.6, b=0.5), evaluation(a=0.55, b=0.49), CONFIG)
    assert decision.promote and "beats production" in decision.reason
    assert decision.candidate_map50_95 == pytest.approx(0.55) and decision.production_map50_95 == pytest.approx(0.52)


def test_a_worse_or_barely_better_candidate_is_rejected_with_the_numbers():
    worse = decide(evaluation(a=0.3, b=0.3), evaluation(a=0.5, b=0.5), CONFIG)
    assert not worse.promote and "0.3000 vs production 0.5000" in worse.reason and "-0.2000" in worse.reason
    barely = decide(evaluation(a=0.505, b=0.5), evaluation(a=0.5, b=0.5), CONFIG)
    assert not barely.promote and "needs at least +0.0100" in barely.reason


def test_a_class_that_drops_too_far_blocks_a_better_average():
    decision = decide(evaluation(a=0.9, b=0.2), evaluation(a=0.5, b=0.3), CONFIG)
    assert not decision.promote
    assert "class 'b' drops 0.1000" in decision.reason and decision.class_drops == pytest.approx({"b": 0.1})


def test_a_new_class_counts_for_both_on_the_same_split():
    # Production never learnt 'new': on the same test split it scores 0 there, and cannot drop below it.
    decision = decide(evaluation(a=0.5, new=0.3), evaluation(a=0.52, new=0.0), CONFIG)
    assert decision.promote and decision.class_drops == pytest.approx({"a": 0.02})


def test_a_first_model_must_clear_the_floor():
    assert decide(evaluation(a=0.25), None, CONFIG).promote
    low = decide(evaluation(a=0.1), None, CONFIG)
    assert not low.promote and "below the floor 0.2000" in low.reason

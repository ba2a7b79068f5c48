"""The triggers against known truth: a model trained on the synthetic ``shapes`` world watches
camera streams of that world and of worlds it was not trained for (bench/triggers.py on a small
case; the full run and its tables are in docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from bench.triggers import BLIND, BUDGET, Timing, play, summarise
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
from edge_agent.triggers import TriggersConfig

pytestmark = pytest.mark.slow

# The triggers' own recall: no random share, and no keep quantile (tests/edge_agent/test_keep.py has it).
CONFIG = TriggersConfig.model_validate({"random": {"enabled": False}, "keep": {"share": None}})


@pytest.fixture(scope="module")
def detector(shapes_release) -> OnnxRuntimeDetector:
    return OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=shapes_release.onnx))


def _play(detector: OnnxRuntimeDetector, kind: str) -> dict:
    results = play(kind, detector, CONFIG, clips=8, clip_frames=15, seed=7, timing=Timing())
    return summarise(results)


def test_on_a_camera_whose_world_changes_now_and_then_the_errors_rank_first(detector) -> None:
    s = _play(detector, "mixed:shapes-shifted")
    print(f"mixed stream: {s['error_frames']} of {s['frames']} frames hold an error; recall at {BUDGET:.0%} "
          f"{s['recall_at_budget']:.2f} (random {s['random_recall']:.2f}, ceiling {s['ceiling']:.2f}); "
          f"precision {s['precision_at_budget']:.2f}; AUC {s['auc']:.2f}")  # fmt: skip
    # frames with more evidence of error score higher: the ranking separates error frames from clean ones
    assert s["auc"] >= 0.75
    # the budget is spent on errors: at least twice what random selection catches, nearly all of it errors
    assert s["recall_at_budget"] >= 2 * s["random_recall"]
    assert s["precision_at_budget"] >= 0.8


def test_a_blind_model_still_keeps_the_frames_it_sees_nothing_in(detector) -> None:
    s = _play(detector, BLIND)
    print(f"blind stream: {s['zero_detection_error_frames']} error frames without a single prediction; "
          f"{s['zero_detection_error_frames_kept']:.0%} kept")  # fmt: skip
    assert s["zero_detection_error_frames"] >= 10  # the scenario does blind the model
    # weak evidence and image novelty keep what the detection-based triggers cannot see
    assert s["zero_detection_error_frames_kept"] >= 0.8
    fired = s["triggers"]
    assert fired["image_novelty"]["fired"] > 0


def test_in_the_training_world_the_new_triggers_stay_quiet(detector) -> None:
    s = _play(detector, "shapes")
    # unlike the training images: rare in the world it was trained on
    assert s["triggers"].get("image_novelty", {"fires_on_clean_frames": 0.0})["fires_on_clean_frames"] <= 0.1

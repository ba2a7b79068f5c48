"""Tests for the edge agent's uncertainty triggers (edge_agent.triggers)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from edge_agent.triggers import (
    Trigger,
    TriggersConfig,
    UncertaintyScorer,
    Verdict,
    combined_score,
)
from edgeloop.domain import Detection, Reason
from edgeloop.embedding import ReferenceStats

NAMES = {0: "person", 1: "car", 2: "dog"}
PERSON, CAR, DOG = 0, 1, 2
ALL = [t.value for t in Trigger]


def det(
    box: Sequence[float] = (100, 100, 150, 200),
    cls: int = PERSON,
    conf: float = 0.9,
    scores: Sequence[float] | None = None,
) -> Detection:
    return Detection(
        box=tuple(float(v) for v in box),
        class_id=cls,
        class_name=NAMES[cls],
        confidence=conf,
        class_scores=None if scores is None else np.asarray(scores, dtype=np.float64),
    )


def only(trigger: str, min_score: float = 0.0, **fields: object) -> TriggersConfig:
    """A config with just ``trigger`` enabled (tuned by ``fields``); random off unless it is the one, and no
    keep quantile (``keep`` says what the trigger found; tests/edge_agent/test_keep.py tests the share)."""
    data: dict[str, object] = {name: {"enabled": name == trigger} for name in ALL}
    data[trigger] = {"enabled": True, **fields}
    return TriggersConfig.model_validate({**data, "min_score": min_score, "keep": {"share": None}})


def feed(
    scorer: UncertaintyScorer,
    frames: Sequence[Sequence[Detection]],
    *,
    source: str = "cam",
    t0: float = 0.0,
    dt: float = 0.1,
    image_size: tuple[int, int] | None = None,
    **extra: object,
) -> list[Verdict]:
    """Score ``frames`` in order; ``extra`` goes to every ``score`` call (weak, embedding, reference, stream)."""
    return [scorer.score(source, f, t0 + i * dt, image_size=image_size, **extra) for i, f in enumerate(frames)]


def reason(verdict: Verdict, trigger: str) -> Reason | None:
    found = [r for r in verdict.reasons if r.trigger == trigger]
    assert len(found) <= 1
    return found[0] if found else None


# ---------------------------------------------------------------------------------------- config


def test_defaults_are_the_documented_production_values() -> None:
    cfg = TriggersConfig()
    assert (cfg.confidence_band.low, cfg.confidence_band.high) == (0.25, 0.6)
    assert cfg.margin.max_margin == 0.15
    assert cfg.novelty.iou == 0.5 and cfg.novelty.window_frames == 30
    assert cfg.count_jump.min_jump == 3
    assert cfg.random.rate == 0.01
    assert all(getattr(cfg, name).enabled for name in ALL)


def _all_fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    out = []
    for name, info in model.model_fields.items():
        out.append((f"{model.__name__}.{name}", info))
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_all_fields(ann))
    return out


def test_every_config_field_is_described() -> None:
    fields = _all_fields(TriggersConfig)
    assert len(fields) > 30
    undescribed = [name for name, info in fields if not info.description]
    assert undescribed == []


@pytest.mark.parametrize(
    "data",
    [
        {"confidence_band": {"bogus": 1}},
        {"typo_trigger": {}},
        {"confidence_band": {"low": 0.6, "high": 0.6}},
        {"confidence_band": {"low": 0.7, "high": 0.6}},
        {"novelty": {"window_frames": 3, "warmup_frames": 4}},
        {"count_jump": {"window_frames": 2, "min_history": 3}},
        {"random": {"rate": 1.5}},
        {"entropy": {"top_k": 1}},
        {"min_score": -0.1},
    ],
)
def test_invalid_config_is_rejected(data: dict) -> None:
    with pytest.raises(ValidationError):
        TriggersConfig.model_validate(data)


def test_scorer_copies_its_config() -> None:
    cfg = only("confidence_band")
    scorer = UncertaintyScorer(cfg)
    cfg.confidence_band.enabled = False
    assert reason(scorer.score("cam", [det(conf=0.4)], 0.0), "confidence_band") is not None


# ------------------------------------------------------------------------------- confidence band


@pytest.mark.parametrize(
    ("conf", "fires", "score"),
    [
        (0.2499, False, None),
        (0.25, True, 0.0),  # low edge is inside, but as sure as the band gets
        (0.425, True, 1.0),  # the middle is the most uncertain
        (0.5, True, 1 - 0.075 / 0.175),
        (0.5999, True, 1 - 0.1749 / 0.175),
        (0.6, False, None),  # high edge is outside: sure
        (0.95, False, None),
    ],
)
def test_confidence_band_boundaries(conf: float, fires: bool, score: float | None) -> None:
    # weight 1: the score is the detection's grade itself
    v = UncertaintyScorer(only("confidence_band", weight=1.0)).score("cam", [det(conf=conf)], 0.0)
    r = reason(v, "confidence_band")
    assert (r is not None) == fires
    if r is not None:
        assert r.score == pytest.approx(score)


def test_confidence_band_reports_the_most_uncertain_detection() -> None:
    dets = [det(conf=0.9), det(cls=DOG, conf=0.41), det(cls=CAR, conf=0.27), det(conf=0.1)]
    r = reason(UncertaintyScorer(only("confidence_band", weight=0.4)).score("cam", dets, 0.0), "confidence_band")
    assert r is not None
    assert r.detail == "dog 0.41 in [0.25, 0.60) (+1 more)"
    # both in-band detections count, by noisy-OR of weight x grade
    dog, car = 1 - 0.015 / 0.175, 1 - 0.155 / 0.175
    assert r.score == pytest.approx(1 - (1 - 0.4 * dog) * (1 - 0.4 * car))


def test_confidence_band_detail_never_rounds_onto_a_band_edge() -> None:
    scorer = UncertaintyScorer(only("confidence_band"))
    near_high = reason(scorer.score("cam", [det(cls=DOG, conf=0.5996)], 0.0), "confidence_band")
    near_low = reason(scorer.score("cam", [det(cls=DOG, conf=0.2501)], 0.0), "confidence_band")
    assert near_high is not None and near_high.detail == "dog 0.5996 in [0.25, 0.60)"
    assert near_low is not None and near_low.detail == "dog 0.2501 in [0.25, 0.60)"


def test_more_uncertain_detections_score_higher_but_one_never_reaches_one() -> None:
    scorer = UncertaintyScorer(only("confidence_band"))
    one = scorer.score("cam", [det(conf=0.42)], 0.0).score
    three = scorer.score("cam", [det(conf=0.42), det(cls=CAR, conf=0.45), det(cls=DOG, conf=0.4)], 0.0).score
    edge = scorer.score("cam", [det(conf=0.58)], 0.0).score
    assert edge < one < three < 1.0
    assert one == pytest.approx(TriggersConfig().confidence_band.weight * (1 - 0.005 / 0.175))


# ---------------------------------------------------------------------------------------- margin


def test_margin_fires_below_max_margin_only() -> None:
    scorer = UncertaintyScorer(only("margin", max_margin=0.125, weight=1.0))
    # binary-exact values so the boundary is exact: margin 0.125 == max_margin does not fire
    at = scorer.score("cam", [det(cls=DOG, conf=0.75, scores=[0.0, 0.625, 0.75])], 0.0)
    assert reason(at, "margin") is None
    below = scorer.score("cam", [det(cls=DOG, conf=0.75, scores=[0.0, 0.6875, 0.75])], 0.0)
    r = reason(below, "margin")
    assert r is not None
    assert r.score == pytest.approx(0.5)  # 1 - 0.0625 / 0.125
    assert r.detail == "dog margin 0.06 over class 1"


def test_margin_tie_scores_the_full_weight() -> None:
    v = UncertaintyScorer(only("margin", weight=0.4)).score("cam", [det(conf=0.5, scores=[0.5, 0.5, 0.1])], 0.0)
    r = reason(v, "margin")
    assert r is not None and r.score == pytest.approx(0.4)


def test_margin_ignores_detections_below_the_band_low_by_default() -> None:
    scorer = UncertaintyScorer(only("margin"))
    assert reason(scorer.score("cam", [det(conf=0.2, scores=[0.2, 0.19, 0.0])], 0.0), "margin") is None
    assert reason(scorer.score("cam", [det(conf=0.25, scores=[0.25, 0.2, 0.0])], 0.0), "margin") is not None
    low = UncertaintyScorer(only("margin", min_confidence=0.1))
    assert reason(low.score("cam", [det(conf=0.2, scores=[0.2, 0.19, 0.0])], 0.0), "margin") is not None


# --------------------------------------------------------------------------------------- entropy


def _reference_entropy(scores: Sequence[float]) -> float:
    p = np.asarray(scores, dtype=float) / sum(scores)
    return float(-sum(x * math.log(x) for x in p if x > 0) / math.log(len(p)))


def test_entropy_boundary_is_strictly_above() -> None:
    scores = [0.6, 0.3, 0.1]
    h = _reference_entropy(scores)
    d = [det(conf=0.6, scores=scores)]
    fires = UncertaintyScorer(only("entropy", min_entropy=h - 1e-5, top_k=None)).score("cam", d, 0.0)
    silent = UncertaintyScorer(only("entropy", min_entropy=h + 1e-5, top_k=None)).score("cam", d, 0.0)
    r = reason(fires, "entropy")
    # printed with the decimals it takes to stay above the threshold, never "0.81 > 0.81"
    assert r is not None and r.detail == f"person entropy {h:.4f} > {h - 1e-5:.2f}"
    assert reason(silent, "entropy") is None


def test_entropy_normalises_independent_sigmoid_scores() -> None:
    # Two sigmoids at 0.9 sum to 1.8; normalised they are a perfect two-way split: entropy 1.
    scorer = UncertaintyScorer(only("entropy", min_entropy=0.99, weight=1.0))
    r = reason(scorer.score("cam", [det(conf=0.9, scores=[0.9, 0.9])], 0.0), "entropy")
    assert r is not None and r.score == pytest.approx(1.0)


def test_entropy_of_a_sure_detection_does_not_fire() -> None:
    scores = [0.95] + [0.001] * 79
    v = UncertaintyScorer(only("entropy")).score("cam", [det(conf=0.95, scores=scores)], 0.0)
    assert reason(v, "entropy") is None


def test_entropy_top_k_keeps_sigmoid_tails_from_diluting_a_confusion() -> None:
    scores = [0.45, 0.45] + [0.002] * 78  # a dog/person confusion in an 80-class model
    d = [det(conf=0.45, scores=scores)]
    top2 = UncertaintyScorer(only("entropy", min_entropy=0.9, top_k=2)).score("cam", d, 0.0)
    whole = UncertaintyScorer(only("entropy", min_entropy=0.9, top_k=None)).score("cam", d, 0.0)
    r = reason(top2, "entropy")
    assert r is not None and r.detail == "person entropy 1.00 > 0.90"  # the two top scores, evenly split
    assert reason(whole, "entropy") is None


def test_entropy_ignores_detections_below_the_band_low() -> None:
    scorer = UncertaintyScorer(only("entropy"))
    assert reason(scorer.score("cam", [det(conf=0.2, scores=[0.2, 0.2, 0.2])], 0.0), "entropy") is None
    assert reason(scorer.score("cam", [det(conf=0.3, scores=[0.3, 0.3, 0.3])], 0.0), "entropy") is not None


@pytest.mark.parametrize("trigger", ["margin", "entropy"])
def test_class_score_triggers_are_silent_without_class_scores(trigger: str) -> None:
    scorer = UncertaintyScorer(only(trigger))
    v = scorer.score("cam", [det(conf=0.4), det(cls=CAR, conf=0.5)], 0.0)
    assert v.reasons == [] and not v.keep
    # a one-class vector has no runner-up and no spread either
    assert scorer.score("cam", [det(conf=0.4, scores=[0.4])], 0.1).reasons == []


# --------------------------------------------------------------------------------------- novelty


def novelty(**fields: object) -> UncertaintyScorer:
    return UncertaintyScorer(only("novelty", **fields))


PERSON_AT_HOME = det((100, 100, 150, 200), PERSON)
NEW_CAR = det((300, 300, 400, 360), CAR, conf=0.8)


def test_novelty_waits_for_warmup() -> None:
    # history of 2 frames < warmup 3: silent
    early = feed(novelty(warmup_frames=3), [[PERSON_AT_HOME]] * 2 + [[PERSON_AT_HOME, NEW_CAR]])
    assert all(reason(v, "novelty") is None for v in early)
    # history of 3 frames: fires
    warm = feed(novelty(warmup_frames=3), [[PERSON_AT_HOME]] * 3 + [[PERSON_AT_HOME, NEW_CAR]])
    r = reason(warm[-1], "novelty")
    assert r is not None
    assert r.detail == "novel car (1 of 2)"
    assert r.score == pytest.approx(0.5 * TriggersConfig().novelty.weight)  # half the confident boxes are new


def test_novelty_first_frame_of_a_camera_is_not_novel() -> None:
    v = novelty().score("cam", [PERSON_AT_HOME, NEW_CAR], 0.0)
    assert v.reasons == []


def test_novelty_iou_boundary_and_class() -> None:
    base = [det((0, 0, 10, 10), PERSON)]
    same = feed(novelty(warmup_frames=1), [base, [det((0, 0, 10, 20), PERSON)]])  # IoU 0.5: a match
    assert reason(same[-1], "novelty") is None
    shifted = feed(novelty(warmup_frames=1), [base, [det((0, 0, 10, 21), PERSON)]])  # IoU 0.476
    assert reason(shifted[-1], "novelty") is not None
    other_class = feed(novelty(warmup_frames=1), [base, [det((0, 0, 10, 10), DOG)]])
    r = reason(other_class[-1], "novelty")
    assert r is not None and r.detail == "novel dog (1 of 1)"


def test_novelty_ignores_unconfident_boxes_but_counts_them_as_seen() -> None:
    quiet = feed(novelty(warmup_frames=1), [[PERSON_AT_HOME], [det((300, 300, 400, 360), CAR, conf=0.39)]])
    assert reason(quiet[-1], "novelty") is None
    at_floor = feed(novelty(warmup_frames=1), [[PERSON_AT_HOME], [det((300, 300, 400, 360), CAR, conf=0.4)]])
    assert reason(at_floor[-1], "novelty") is not None
    # a car half-seen at 0.3 a moment ago is not new when it becomes sure
    seen = feed(
        novelty(warmup_frames=1),
        [[det((300, 300, 400, 360), CAR, conf=0.3)], [PERSON_AT_HOME], [NEW_CAR]],
    )
    assert reason(seen[-1], "novelty") is None


def test_novelty_window_expires_by_frames() -> None:
    inside = [[NEW_CAR]] + [[PERSON_AT_HOME]] * 3 + [[NEW_CAR]]  # car 4 frames back: in a window of 4
    assert reason(feed(novelty(window_frames=4, warmup_frames=1), inside)[-1], "novelty") is None
    outside = [[NEW_CAR]] + [[PERSON_AT_HOME]] * 4 + [[NEW_CAR]]  # 5 frames back: forgotten
    assert reason(feed(novelty(window_frames=4, warmup_frames=1), outside)[-1], "novelty") is not None


def test_novelty_window_expires_by_seconds() -> None:
    def run(car_age: float) -> Verdict:
        scorer = novelty(window_s=10.0, warmup_frames=2)
        scorer.score("cam", [NEW_CAR], 100.0 - car_age)
        scorer.score("cam", [PERSON_AT_HOME], 98.0)
        scorer.score("cam", [PERSON_AT_HOME], 99.0)
        return scorer.score("cam", [NEW_CAR], 100.0)

    assert reason(run(10.0), "novelty") is None  # exactly window_s old: still remembered
    assert reason(run(10.5), "novelty") is not None


def test_novelty_rewarms_after_a_long_gap() -> None:
    scorer = novelty(window_s=10.0, warmup_frames=3)
    feed(scorer, [[PERSON_AT_HOME]] * 5)
    # 100 s later the whole history is stale: everything would look new, so stay silent
    assert reason(scorer.score("cam", [NEW_CAR], 100.0), "novelty") is None


# --------------------------------------------------------------------------------------- flicker


def flicker(**fields: object) -> UncertaintyScorer:
    return UncertaintyScorer(only("flicker", **fields))


def test_flicker_fires_on_vanish_and_on_appear() -> None:
    vs = feed(flicker(), [[PERSON_AT_HOME], [], [PERSON_AT_HOME]])
    assert vs[0].reasons == []
    gone = reason(vs[1], "flicker")
    back = reason(vs[2], "flicker")
    assert gone is not None and gone.detail == "person vanished"
    assert back is not None and back.detail == "person appeared"
    # a one-frame sighting is weak evidence; an appearance counts half a vanishing
    w, persist = TriggersConfig().flicker.weight, TriggersConfig().flicker.persist_frames
    assert gone.score == pytest.approx(w * 0.9 / persist)
    assert back.score == pytest.approx(w * 0.5 * 0.9)


def test_flicker_grades_by_confidence_size_and_how_long_the_object_was_seen() -> None:
    size = (640, 480)

    def vanish(box: tuple[float, ...], conf: float, seen: int) -> float:
        frames = [[det(box, conf=conf)]] * seen + [[]]
        r = reason(feed(flicker(), frames, image_size=size)[-1], "flicker")
        assert r is not None
        return r.score

    big = (100, 100, 300, 300)  # 13% of the image
    small = (100, 100, 110, 110)  # 0.03%
    strong = vanish(big, 0.95, seen=5)
    assert strong == pytest.approx(TriggersConfig().flicker.weight * 0.95)  # all evidence, still below 1
    assert vanish(big, 0.55, seen=5) < strong  # less sure the object was there
    assert vanish(small, 0.95, seen=5) < strong  # tiny objects come and go
    assert vanish(big, 0.95, seen=1) < vanish(big, 0.95, seen=2) < strong  # a blip, then a short track
    # two large objects vanishing is more evidence than one
    two = feed(flicker(), [[det(big, conf=0.95), det((350, 100, 550, 300), conf=0.95)]] * 5 + [[]], image_size=size)
    assert reason(two[-1], "flicker").score > strong


def test_flicker_is_silent_for_a_stable_jittering_object() -> None:
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(50):
        dx, dy = rng.uniform(-3, 3, 2)
        frames.append([det((100 + dx, 100 + dy, 150 + dx, 200 + dy), conf=float(rng.uniform(0.55, 0.95)))])
    assert all(v.reasons == [] for v in feed(flicker(), frames))


def test_flicker_needs_a_confident_object_and_a_real_absence() -> None:
    assert reason(feed(flicker(), [[det(conf=0.49)], []])[-1], "flicker") is None
    assert reason(feed(flicker(), [[det(conf=0.5)], []])[-1], "flicker") is not None
    # still there at 0.3: a confidence drop, not a disappearance
    assert reason(feed(flicker(), [[det(conf=0.8)], [det(conf=0.3)]])[-1], "flicker") is None
    # same place but another class: the person is gone and a dog appeared
    r = reason(feed(flicker(), [[det(conf=0.8)], [det(cls=DOG, conf=0.8)]])[-1], "flicker")
    assert r is not None and r.detail == "dog appeared; person vanished"


def test_flicker_iou_boundary() -> None:
    matched = feed(flicker(iou=0.5), [[det((0, 0, 10, 10))], [det((0, 0, 10, 20))]])  # IoU 0.5
    assert reason(matched[-1], "flicker") is None
    moved = feed(flicker(iou=0.5), [[det((0, 0, 10, 10))], [det((0, 0, 10, 21))]])
    r = reason(moved[-1], "flicker")
    assert r is not None and r.detail == "person appeared; person vanished"


def test_flicker_matches_one_to_one() -> None:
    # two people side by side; one leaves, the other's box overlaps both old boxes
    two = [det((100, 100, 150, 200)), det((105, 100, 155, 200))]
    one = [det((102, 100, 152, 200))]
    r = reason(feed(flicker(), [two, one])[-1], "flicker")
    assert r is not None and r.detail == "person vanished"
    r = reason(feed(flicker(), [two, []])[-1], "flicker")
    assert r is not None and r.detail == "person x2 vanished"


def test_flicker_ignores_the_border_when_the_image_size_is_known() -> None:
    edge = [det((0, 100, 40, 200))]  # touching the left border
    near = [det((4, 100, 40, 200))]  # within 4 px
    inside = [det((5, 100, 40, 200))]
    size = (640, 480)
    assert reason(feed(flicker(), [edge, []], image_size=size)[-1], "flicker") is None
    assert reason(feed(flicker(), [[], near], image_size=size)[-1], "flicker") is None
    assert reason(feed(flicker(), [[], inside], image_size=size)[-1], "flicker") is not None
    right = [det((600, 100, 637, 200))]  # 3 px from the right border
    assert reason(feed(flicker(), [right, []], image_size=size)[-1], "flicker") is None
    # unknown size or border check off: fires
    assert reason(feed(flicker(), [edge, []])[-1], "flicker") is not None
    off = flicker(ignore_border_px=None)
    assert reason(feed(off, [edge, []], image_size=size)[-1], "flicker") is not None


def test_flicker_skips_frames_too_far_apart() -> None:
    assert reason(feed(flicker(), [[PERSON_AT_HOME], []], dt=2.0)[-1], "flicker") is not None
    assert reason(feed(flicker(), [[PERSON_AT_HOME], []], dt=2.5)[-1], "flicker") is None


# ------------------------------------------------------------------------------------ count jump


def crowd(n: int, conf: float = 0.8) -> list[Detection]:
    return [det((i * 20, 0, i * 20 + 10, 10), conf=conf) for i in range(n)]


@pytest.mark.parametrize(
    ("history", "n", "fires", "grade"),
    [
        ([2, 2, 2], 5, True, 0.5),
        ([2, 2, 2], 4, False, None),
        ([2, 2, 2], 0, False, None),
        ([5, 5, 5], 2, True, 0.5),
        ([2, 2, 2], 6, True, 4 / 6),
        ([2, 2, 2], 11, True, 1.0),
        ([1, 9, 2, 2], 5, True, 0.5),  # median 2, the outlier 9 does not drag it
        ([2, 2], 9, False, None),  # min_history 3 not reached
    ],
)
def test_count_jump(history: list[int], n: int, fires: bool, grade: float | None) -> None:
    vs = feed(UncertaintyScorer(only("count_jump")), [crowd(k) for k in [*history, n]])
    assert all(v.reasons == [] for v in vs[:-1])
    r = reason(vs[-1], "count_jump")
    assert (r is not None) == fires
    if r is not None:
        assert r.score == pytest.approx(TriggersConfig().count_jump.weight * grade)
        assert r.detail.startswith(f"{n} detections vs median ")


def test_count_jump_counts_only_confident_boxes_and_its_window() -> None:
    low = feed(UncertaintyScorer(only("count_jump")), [crowd(1)] * 3 + [crowd(1) + crowd(5, conf=0.2)])
    assert reason(low[-1], "count_jump") is None
    # window of 3: the old zeros are out of it, so 5 after 5, 5, 5 is no jump
    windowed = feed(
        UncertaintyScorer(only("count_jump", window_frames=3)), [crowd(0)] * 5 + [crowd(5)] * 3 + [crowd(5)]
    )
    assert reason(windowed[-1], "count_jump") is None


# ---------------------------------------------------------------------------------------- random


@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_random_share_matches_rate(rate: float) -> None:
    n = 20_000
    scorer = UncertaintyScorer(only("random", rate=rate), seed=7)
    kept = sum(scorer.score("cam", [], i * 0.1).keep for i in range(n))
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(kept - n * rate) <= 5 * sigma


def test_random_is_reproducible_with_a_seed_and_per_source() -> None:
    def picks(seed: int, interleave: bool) -> list[bool]:
        scorer = UncertaintyScorer(only("random", rate=0.2), seed=seed)
        out = []
        for i in range(500):
            if interleave:
                scorer.score("other", [], float(i))
            out.append(scorer.score("cam", [], float(i)).keep)
        return out

    assert picks(1, False) == picks(1, False)
    assert picks(1, False) != picks(2, False)
    # one camera's picks do not depend on another camera's frames
    assert picks(1, False) == picks(1, True)


def test_random_streams_differ_between_cameras() -> None:
    scorer = UncertaintyScorer(only("random", rate=0.5), seed=1)
    a = [scorer.score("a", [], float(i)).keep for i in range(200)]
    b = [scorer.score("b", [], float(i)).keep for i in range(200)]
    assert a != b  # one seed must not make every camera keep the same frame numbers


def test_random_pick_is_kept_but_scores_nothing() -> None:
    v = UncertaintyScorer(only("random", rate=1.0, min_score=1.0)).score("cam", [], 0.0)
    assert v.keep
    assert v.score == 0.0
    assert v.reasons == [Reason("random", 0.0, "kept at random (rate 1)")]
    never = UncertaintyScorer(only("random", rate=0.0))
    assert not any(never.score("cam", [], float(i)).keep for i in range(1000))


def test_random_draw_does_not_change_the_uncertainty_score() -> None:
    base = TriggersConfig(random={"rate": 0.0})
    with_random = TriggersConfig(random={"rate": 1.0})
    frame = [det(conf=0.4), det(cls=CAR, conf=0.5, scores=[0.1, 0.5, 0.45])]
    a = UncertaintyScorer(base).score("cam", frame, 0.0)
    b = UncertaintyScorer(with_random).score("cam", frame, 0.0)
    assert b.score == a.score
    assert b.triggers == [*a.triggers, "random"]


# -------------------------------------------------------------------------------------- combined


def test_combined_score_is_the_noisy_or_without_random() -> None:
    reasons = [Reason("confidence_band", 0.5), Reason("flicker", 0.2), Reason("random", 0.9)]
    assert combined_score(reasons) == pytest.approx(1 - 0.5 * 0.8)
    assert combined_score([]) == 0.0


def test_combined_score_is_bounded_and_monotone() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        scores = rng.uniform(0, 1, int(rng.integers(0, 6)))
        reasons = [Reason(ALL[i % 6], float(s)) for i, s in enumerate(scores)]
        total = combined_score(reasons)
        assert 0.0 <= total <= 1.0
        extra = Reason("count_jump", float(rng.uniform(0, 1)))
        assert combined_score([*reasons, extra]) >= total


def test_adding_a_fired_trigger_raises_the_frame_score() -> None:
    frames = [crowd(1)] * 3
    band_only = feed(UncertaintyScorer(only("confidence_band")), [*frames, crowd(1, conf=0.5)])[-1]
    cfg = TriggersConfig.model_validate(
        {**{n: {"enabled": n in ("confidence_band", "count_jump")} for n in ALL}, "min_score": 0.0}
    )
    both = feed(UncertaintyScorer(cfg), [*frames, crowd(1, conf=0.5) + crowd(4)[1:]])[-1]
    assert band_only.triggers == ["confidence_band"]
    assert both.triggers == ["confidence_band", "count_jump"]
    assert both.score > band_only.score


def test_score_stays_in_unit_interval_on_random_scenes() -> None:
    rng = np.random.default_rng(11)
    scorer = UncertaintyScorer(TriggersConfig(), seed=0)
    for i in range(300):
        dets = []
        for _ in range(int(rng.integers(0, 25))):
            x, y = rng.uniform(0, 600, 2)
            cls = int(rng.integers(3))
            scores = rng.uniform(0, 1, 3)
            dets.append(det((x, y, x + rng.uniform(1, 80), y + rng.uniform(1, 80)), cls, float(scores.max()), scores))
        v = scorer.score("cam", dets, i * 0.2, image_size=(640, 640))
        assert 0.0 <= v.score <= 1.0
        assert v.score == pytest.approx(combined_score(v.reasons))
        assert all(0.0 <= r.score <= 1.0 and r.detail for r in v.reasons)
        assert v.triggers == [t for t in ALL if t in v.triggers]  # fixed order


def test_min_score_decides_keep_for_weak_evidence() -> None:
    edge = [det(conf=0.25)]  # band fires with score 0
    weak = UncertaintyScorer(only("confidence_band", min_score=0.1)).score("cam", edge, 0.0)
    assert weak.triggers == ["confidence_band"] and not weak.keep
    lax = UncertaintyScorer(only("confidence_band", min_score=0.0)).score("cam", edge, 0.0)
    assert lax.keep
    strong = UncertaintyScorer(only("confidence_band", min_score=0.1)).score("cam", [det(conf=0.42)], 0.0)
    assert strong.keep


def test_nothing_fired_is_not_kept_even_with_min_score_zero() -> None:
    v = UncertaintyScorer(TriggersConfig(min_score=0.0, random={"enabled": False})).score("cam", [det(conf=0.95)], 0.0)
    assert v == Verdict(keep=False, score=0.0, reasons=[])


def test_verdict_is_frozen() -> None:
    v = Verdict(keep=True, score=0.5, reasons=[])
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.keep = False  # type: ignore[misc]


# ------------------------------------------------------------------------- on/off, state, edges


# For each trigger: a sequence of frames whose last one makes it fire when enabled (and the
# detector output beside the detections that it needs).
FIRING = {
    "confidence_band": [[det(conf=0.42)]],
    "margin": [[det(conf=0.7, scores=[0.7, 0.69, 0.0])]],
    "entropy": [[det(conf=0.5, scores=[0.5, 0.5, 0.5])]],
    "weak_evidence": [[det(conf=0.2), det((300, 300, 340, 360), CAR, conf=0.15)]],
    "image_novelty": [[]],
    "novelty": [[PERSON_AT_HOME]] * 5 + [[PERSON_AT_HOME, NEW_CAR]],
    "flicker": [[PERSON_AT_HOME], []],
    "count_jump": [crowd(1)] * 3 + [crowd(6)],
    "random": [[]],
}


def _reference(dim: int = 8, seed: int = 0) -> ReferenceStats:
    """Training images' statistics: standard-normal embeddings around zero."""
    return ReferenceStats.from_embeddings(np.random.default_rng(seed).normal(size=(200, dim)))


REFERENCE = _reference()
FAR = np.full(8, 6.0, np.float32)  # six standard deviations out in every value
NEAR = np.zeros(8, np.float32)  # the training images' mean
EXTRA = {"image_novelty": {"embedding": FAR, "reference": REFERENCE}}


@pytest.mark.parametrize("trigger", ALL)
def test_each_trigger_fires_when_enabled_and_never_when_disabled(trigger: str) -> None:
    fields = {"rate": 1.0} if trigger == "random" else {}
    on = feed(UncertaintyScorer(only(trigger, **fields)), FIRING[trigger], **EXTRA.get(trigger, {}))[-1]
    r = reason(on, trigger)
    assert r is not None and r.trigger == trigger and r.detail
    # everything on but this one, on every scenario: it never shows up
    data: dict[str, object] = {"random": {"rate": 1.0}}  # so random shows up beside the others
    data[trigger] = {"enabled": False}
    cfg = TriggersConfig.model_validate(data)
    for name, frames in FIRING.items():
        for v in feed(UncertaintyScorer(cfg, seed=0), frames, **EXTRA.get(name, {})):
            assert trigger not in v.triggers


def test_cameras_keep_separate_state() -> None:
    scorer = UncertaintyScorer(TriggersConfig(random={"enabled": False}))
    for i in range(6):
        a = scorer.score("a", [PERSON_AT_HOME], float(i))
        b = scorer.score("b", [], float(i))  # interleaved empty frames of another camera
        assert a.reasons == [] and b.reasons == []
    # camera b's first car is not novel (b's history is empty of cars, but its own frames are warm)
    # and camera a's person does not vanish because b showed nothing
    a = scorer.score("a", [PERSON_AT_HOME], 6.0)
    assert a.reasons == []
    b = scorer.score("b", [NEW_CAR], 6.0)
    assert set(b.triggers) == {"novelty", "flicker"}
    fresh = scorer.score("c", [NEW_CAR], 6.0)
    assert fresh.reasons == []


def test_reset_forgets_a_camera() -> None:
    scorer = flicker()
    scorer.score("cam", [PERSON_AT_HOME], 0.0)
    scorer.score("other", [PERSON_AT_HOME], 0.0)
    scorer.reset("cam")
    scorer.reset("never-seen")  # no error
    assert scorer.score("cam", [], 0.1).reasons == []
    assert reason(scorer.score("other", [], 0.1), "flicker") is not None


def test_empty_detection_lists_work_with_everything_on() -> None:
    scorer = UncertaintyScorer(TriggersConfig(random={"enabled": False}))
    vs = feed(scorer, [[]] * 40)
    assert all(v == Verdict(keep=False, score=0.0, reasons=[]) for v in vs)
    # and an empty frame after a busy one is just a vanish plus a count jump
    vs = feed(scorer, [crowd(4)] * 8 + [[]], t0=10.0)  # median of the last 10 counts: 4
    assert vs[-1].triggers == ["flicker", "count_jump"]


def test_margin_reason_names_the_runner_up_class_when_names_are_given():
    scores = np.array([0.45, 0.40, 0.01], np.float32)
    det = Detection((10.0, 10.0, 50.0, 50.0), 0, "dog", 0.45, scores)
    cfg = TriggersConfig(margin={"enabled": True, "max_margin": 0.15})
    named = UncertaintyScorer(cfg, seed=0).score("cam", [det], 0.0, class_names=["dog", "cat", "cow"])
    unnamed = UncertaintyScorer(cfg, seed=0).score("cam", [det], 0.0)
    assert next(r.detail for r in named.reasons if r.trigger == "margin").startswith("dog margin 0.05 over cat")
    assert "over class 1" in next(r.detail for r in unnamed.reasons if r.trigger == "margin")


# --------------------------------------------------------------------------------- weak evidence


def weak_det(conf: float, x: float = 0.0, cls: int = PERSON) -> Detection:
    return det((x, 0, x + 20, 20), cls, conf)


def test_weak_evidence_needs_min_candidates_above_the_floor() -> None:
    scorer = UncertaintyScorer(only("weak_evidence"))
    assert reason(scorer.score("cam", [], 0.0, weak=[weak_det(0.2)]), "weak_evidence") is None  # one faint blob
    assert reason(scorer.score("cam", [], 0.0, weak=[weak_det(0.05), weak_det(0.04, 30)]), "weak_evidence") is None
    r = reason(scorer.score("cam", [], 0.0, weak=[weak_det(0.2), weak_det(0.1, 30, DOG)]), "weak_evidence")
    assert r is not None and r.detail == "2 candidates under 0.25 (best person 0.20, mass 0.30)"


def test_weak_evidence_counts_detections_under_the_band_too() -> None:
    scorer = UncertaintyScorer(only("weak_evidence"))
    r = reason(scorer.score("cam", [det(conf=0.22)], 0.0, weak=[weak_det(0.12, 200)]), "weak_evidence")
    assert r is not None and r.detail.startswith("2 candidates")
    # a sure detection is not weak evidence
    assert reason(scorer.score("cam", [det(conf=0.9)], 0.0, weak=[weak_det(0.12)]), "weak_evidence") is None


def test_weak_evidence_grows_with_more_and_stronger_candidates() -> None:
    scorer = UncertaintyScorer(only("weak_evidence", min_score=0.0))

    def score(confs: list[float]) -> float:
        return scorer.score("cam", [], 0.0, weak=[weak_det(c, 30 * i) for i, c in enumerate(confs)]).score

    assert 0 < score([0.1, 0.1]) < score([0.2, 0.2]) < score([0.2, 0.2, 0.2, 0.2]) < score([0.24] * 12) < 1.0


# --------------------------------------------------------------------------------- image novelty


def test_image_novelty_fires_for_a_frame_unlike_the_training_images() -> None:
    scorer = UncertaintyScorer(only("image_novelty"))
    far = reason(scorer.score("cam", [], 0.0, embedding=FAR, reference=REFERENCE, stream=False), "image_novelty")
    assert far is not None and far.detail.startswith("unlike the training images")
    assert far.score == pytest.approx(TriggersConfig().image_novelty.weight)  # far past q99: full weight
    assert scorer.score("cam", [], 0.0, embedding=NEAR, reference=REFERENCE, stream=False).reasons == []
    # graded: the score grows with the distance, from nothing inside the training images to the full weight
    direction = np.ones(8, np.float32) / math.sqrt(8)
    scores = [
        scorer.score("cam", [], 0.0, embedding=direction * r, reference=REFERENCE, stream=False).score
        for r in np.linspace(0.0, 20.0, 81)
    ]
    assert scores[0] == 0.0 and scores[-1] == pytest.approx(far.score)
    assert all(a <= b + 1e-9 for a, b in zip(scores, scores[1:], strict=False))
    assert any(0.0 < x < far.score for x in scores)


def test_image_novelty_needs_an_embedding_of_the_reference_size_and_a_reference() -> None:
    scorer = UncertaintyScorer(only("image_novelty"))
    assert scorer.score("cam", [], 0.0, embedding=FAR).reasons == []  # no reference: no scale
    assert scorer.score("cam", [], 0.0, reference=REFERENCE).reasons == []  # no embedding
    assert scorer.score("cam", [], 0.0, embedding=np.full(5, 9.0), reference=REFERENCE).reasons == []


def test_image_novelty_in_a_stream_sees_a_scene_change_inside_the_training_world() -> None:
    scorer = UncertaintyScorer(only("image_novelty"))
    rng = np.random.default_rng(1)
    scene_a = rng.normal(size=8).astype(np.float32) * 0.5  # both scenes are ordinary training-world frames
    scene_b = -scene_a
    frames = [scene_a + rng.normal(scale=0.01, size=8).astype(np.float32) for _ in range(10)] + [scene_b]
    verdicts = [
        scorer.score("cam", [], float(i), embedding=e, reference=REFERENCE, stream=True) for i, e in enumerate(frames)
    ]
    assert all(v.reasons == [] for v in verdicts[:-1])
    r = reason(verdicts[-1], "image_novelty")
    assert r is not None and r.detail.startswith("unlike the last 10 frames")
    # the same frame among stills: nothing to compare with, and nothing unlike the training images
    stills = UncertaintyScorer(only("image_novelty"))
    assert stills.score("cam", [], 11.0, embedding=scene_b, reference=REFERENCE, stream=False).reasons == []


def test_image_novelty_does_not_compare_embeddings_of_two_models() -> None:
    scorer = UncertaintyScorer(only("image_novelty"))
    rng = np.random.default_rng(2)
    scene = rng.normal(size=8).astype(np.float32) * 0.5
    for i in range(5):
        scorer.score("cam", [], float(i), embedding=scene, reference=REFERENCE)
    other = _reference(seed=9)  # a new model version after a swap: its own space
    assert scorer.score("cam", [], 5.0, embedding=-scene, reference=other).reasons == []


# ------------------------------------------------------------------------------ streams and stills


def test_stills_never_fire_the_triggers_that_compare_with_previous_frames() -> None:
    scorer = UncertaintyScorer(TriggersConfig(random={"enabled": False}))
    frames = [[PERSON_AT_HOME]] * 6 + [[NEW_CAR] + crowd(6)] + [[]]  # novel, flicker, jump in a stream
    stills = feed(scorer, frames, stream=False, image_size=(640, 480))
    temporal = {"novelty", "flicker", "count_jump"}
    assert not any(temporal & set(v.triggers) for v in stills)
    streamed = feed(UncertaintyScorer(TriggersConfig(random={"enabled": False})), frames, image_size=(640, 480))
    assert temporal <= {t for v in streamed for t in v.triggers}


# -------------------------------------------------------------------- what the combined score ranks


def test_a_single_binary_trigger_no_longer_yields_the_top_score() -> None:
    cfg = TriggersConfig(random={"enabled": False})
    size = (640, 480)
    big = (100, 100, 300, 300)
    # the strongest flicker there is: a large, sure, long-seen object vanishing
    flick = feed(UncertaintyScorer(cfg), [[det(big, conf=0.99)]] * 6 + [[]], image_size=size)[-1]
    assert flick.triggers == ["flicker"] and flick.score < 0.9
    # the same vanishing plus what else the model shows about the frame ranks higher
    unsure = [det((400, 100, 450, 160), DOG, 0.42, [0.05, 0.36, 0.42])]
    richer = feed(UncertaintyScorer(cfg), [[det(big, conf=0.99)] + unsure] * 6 + [unsure], image_size=size)[-1]
    assert "flicker" in richer.triggers and richer.score > flick.score


def test_frames_with_more_evidence_of_error_score_higher() -> None:
    """An ordered ladder of frames: each rung adds evidence that the model is wrong about the frame."""
    cfg = TriggersConfig(random={"enabled": False})
    size = (640, 480)
    sure = [det((100, 100, 200, 200), conf=0.95), det((300, 100, 400, 220), CAR, conf=0.9)]

    def last(frames: list[list[Detection]], **extra: object) -> float:
        return feed(UncertaintyScorer(cfg), frames, image_size=size, **extra)[-1].score

    ladder = [
        last([sure] * 6),  # a calm camera: nothing to see
        last([sure] * 5 + [[*sure, det((450, 300, 520, 380), DOG, conf=0.55)]]),  # one box at the band's top
        last([sure] * 5 + [[*sure, det((450, 300, 520, 380), DOG, conf=0.42)]]),  # ... in its middle
        last([sure] * 5 + [[*sure, det((450, 300, 520, 380), DOG, 0.42, [0.1, 0.38, 0.42])]]),  # and confused
        last([sure] * 5 + [[sure[1], det((450, 300, 520, 380), DOG, 0.42, [0.1, 0.38, 0.42])]]),  # a person gone
        last(
            [sure] * 5 + [[sure[1], det((450, 300, 520, 380), DOG, 0.42, [0.1, 0.38, 0.42])]],
            embedding=FAR,
            reference=REFERENCE,
        ),  # ... in a frame unlike anything the model was trained on
    ]
    assert ladder[0] == 0.0
    assert all(a < b for a, b in zip(ladder, ladder[1:], strict=False)), ladder
    assert ladder[-1] < 1.0

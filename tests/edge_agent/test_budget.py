"""Upload budget (token buckets) and near-duplicate suppression."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_agent.budget import (
    BudgetConfig,
    DedupConfig,
    NearDuplicateFilter,
    UploadBudget,
    boxes_similarity,
    dhash,
)
from edgeloop.domain import Detection
from tests.fakes.clock import FakeClock


def test_frame_budget_caps_and_refills():
    clock = FakeClock()
    budget = UploadBudget(BudgetConfig(frames_per_minute=60, bytes_per_minute=1e9, burst_s=5), clock)
    assert budget.admit([10] * 20) == 5  # burst of 5 s at 1 frame/s
    assert budget.admit([10]) == 0
    assert budget.wait_time(10) == pytest.approx(1.0)
    clock.t += 2.0
    assert budget.admit([10] * 20) == 2


def test_byte_budget_caps():
    clock = FakeClock()
    budget = UploadBudget(BudgetConfig(frames_per_minute=6000, bytes_per_minute=60_000, burst_s=1), clock)
    assert budget.admit([400, 400, 400]) == 2  # 1,000 bytes of burst
    clock.t += 0.4  # 400 bytes more
    assert budget.admit([400, 400]) == 1


def test_oversized_frame_is_not_stuck_forever():
    clock = FakeClock()
    budget = UploadBudget(BudgetConfig(frames_per_minute=60, bytes_per_minute=600, burst_s=1), clock)
    assert budget.admit([1_000_000]) == 1  # bigger than the bucket, but the bucket was full
    assert budget.admit([1_000_000]) == 0


def _scene(seed: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((240, 320, 3), 60, np.uint8)
    for _ in range(6):
        x, y = rng.integers(20, 260), rng.integers(20, 180)
        cv2.rectangle(
            img, (int(x) + shift, int(y)), (int(x) + 40 + shift, int(y) + 40), rng.integers(0, 255, 3).tolist(), -1
        )
    return img


def _det(box, cls=0, conf=0.5):
    return Detection(box=box, class_id=cls, class_name=str(cls), confidence=conf)


def test_dhash_is_stable_under_jpeg_and_different_for_other_scenes():
    a = _scene(1)
    ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 60])
    a_jpeg = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    assert (dhash(a) ^ dhash(a_jpeg)).bit_count() <= 4
    assert (dhash(a) ^ dhash(_scene(2))).bit_count() > 10


def test_boxes_similarity():
    a = [_det((0, 0, 10, 10)), _det((20, 20, 30, 30), cls=1)]
    assert boxes_similarity(a, list(reversed(a))) == pytest.approx(1.0)
    assert boxes_similarity(a, [_det((0, 0, 10, 10))]) == 0.0  # count differs
    assert boxes_similarity(a, [_det((0, 0, 10, 10)), _det((20, 20, 30, 30), cls=2)]) == 0.0  # class differs
    moved = [_det((5, 0, 15, 10)), _det((20, 20, 30, 30), cls=1)]
    assert 0.5 < boxes_similarity(a, moved) < 1.0


def test_near_duplicates_dropped_within_window_only():
    f = NearDuplicateFilter(DedupConfig(window_s=10, max_hash_distance=6, min_box_iou=0.7))
    img, dets = _scene(1), [_det((10, 10, 50, 50))]
    assert not f.is_duplicate("cam", img, dets, now=0.0)
    assert f.is_duplicate("cam", img, dets, now=5.0)
    assert not f.is_duplicate("other-cam", img, dets, now=5.0)  # cameras are independent
    assert not f.is_duplicate("cam", img, [_det((100, 100, 150, 150))], now=6.0)  # new boxes: not a dup
    assert not f.is_duplicate("cam", _scene(7), dets, now=7.0)  # new image: not a dup
    assert not f.is_duplicate("cam", img, dets, now=16.0)  # window expired


def test_dedup_disabled_never_drops():
    f = NearDuplicateFilter(DedupConfig(enabled=False))
    img = _scene(1)
    assert not f.is_duplicate("cam", img, [], 0.0)
    assert not f.is_duplicate("cam", img, [], 0.1)

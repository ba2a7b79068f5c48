"""The split policy: random per sample but reproducible, 10% each, capped at 100, test frozen when full."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from server.curation.config import SplitConfig
from server.curation.splits import assign_splits, draw, is_test_frozen

IDS = [str(uuid.UUID(int=i * 7919 + 13)) for i in range(3000)]


def count(assigned: dict[str, str]) -> dict[str, int]:
    return {s: list(assigned.values()).count(s) for s in ("train", "val", "test")}


def test_caps_are_exact_and_the_rest_goes_to_train():
    got = count(assign_splits(IDS, {}, SplitConfig()))
    assert got == {"train": 2800, "val": 100, "test": 100}


def test_fractions_hold_before_the_caps_and_draws_are_reproducible():
    got = count(assign_splits(IDS[:600], {}, SplitConfig()))
    assert 40 <= got["test"] <= 80 and 40 <= got["val"] <= 80
    assert assign_splits(IDS[:600], {}, SplitConfig()) == assign_splits(reversed(IDS[:600]), {}, SplitConfig())
    assert draw(0, IDS[0]) == draw(0, IDS[0]) != draw(1, IDS[0])


def test_batches_fill_test_to_its_cap_then_freeze_it():
    config = SplitConfig(test_cap=20, val_cap=20)
    counts = {"train": 0, "val": 0, "test": 0}
    test_ids: list[str] = []
    frozen_at = None
    for start in range(0, 1200, 40):  # approvals of 40
        batch = assign_splits(IDS[start : start + 40], counts, config)
        new_test = [f for f, s in batch.items() if s == "test"]
        if frozen_at is not None:
            assert not new_test, "the test split changed after it was full"
        test_ids += new_test
        for s in batch.values():
            counts[s] += 1
        if is_test_frozen(counts, config) and frozen_at is None:
            frozen_at = start
    assert counts["test"] == 20 and counts["val"] == 20 and len(test_ids) == 20
    assert frozen_at is not None and frozen_at < 1200


def test_fractions_must_leave_room_for_train():
    with pytest.raises(ValidationError):
        SplitConfig(val_fraction=0.5, test_fraction=0.5)

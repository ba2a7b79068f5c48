"""Leaks between splits (server.curation.leaks.find_leaks): identical bytes and near-duplicates."""

from __future__ import annotations

import numpy as np

from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.episodes import EpisodeFrame
from server.curation.leaks import IDENTICAL, NEAR_DUPLICATE, find_leaks

RULE = NearDuplicateRule(distance=0.5, hash_bits=4)


def _set(rows: list[list[float]], hashes: list[int]) -> FrameSet:
    return FrameSet(np.array(rows, np.float32), np.array(hashes, np.uint64))


def test_identical_and_near_duplicate_leaks_are_found_and_named():
    frames = {
        "train": [EpisodeFrame("t1", "a"), EpisodeFrame("t2", "b"), EpisodeFrame("t3", "c")],
        "test": [EpisodeFrame("x1", "a"), EpisodeFrame("x2", "z"), EpisodeFrame("x3", "y")],
        "val": [EpisodeFrame("v1", "w")],
    }
    vectors = {
        "train": _set([[0, 0], [5, 5], [9, 9]], [1, 2, 3]),
        "test": _set([[0, 0], [5.1, 5], [20, 20]], [1, 2, 4]),  # x2 near t2; x3 far from all
        "val": _set([[9, 9.1]], [0xFF]),  # close in embedding, 8 bits off in dHash: no leak
    }
    report = find_leaks(frames, vectors, RULE)
    assert {(x.split, x.frame_id, x.train_frame_id, x.kind) for x in report.leaks} == {
        ("test", "x1", "t1", IDENTICAL),
        ("test", "x2", "t2", NEAR_DUPLICATE),
    }
    assert report.leaked_frames("test") == {"x1", "x2"} and report.leaked_frames("val") == set()
    assert "2 of 3 test frames duplicate training frames (1 identical, 1 near-duplicates" in report.summary()


def test_a_clean_set_has_no_leaks_and_identical_bytes_are_checked_without_a_model():
    frames = {"train": [EpisodeFrame("t1", "a")], "test": [EpisodeFrame("x1", "b")]}
    clean = find_leaks(frames, {"train": _set([[0, 0]], [1]), "test": _set([[9, 9]], [1])}, RULE)
    assert clean.leaks == [] and clean.summary() == "no leaks"
    bytes_only = find_leaks({"train": [EpisodeFrame("t1", "a")], "test": [EpisodeFrame("x1", "a")]})
    assert [x.kind for x in bytes_only.leaks] == [IDENTICAL] and not bytes_only.near_checked


def test_rows_without_a_vector_never_match():
    frames = {"train": [EpisodeFrame("t1", "a")], "test": [EpisodeFrame("x1", "b")]}
    nan = _set([[np.nan, np.nan]], [1])
    assert find_leaks(frames, {"train": _set([[0, 0]], [1]), "test": nan}, RULE).leaks == []

"""Episodes (server.curation.episodes) and splitting by episode (server.curation.splits.assign_episodes):
frames of one moment share a split, and a frame whose episode lies in a full split is held out."""

from __future__ import annotations

import numpy as np

from server.curation.config import SplitConfig
from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.episodes import EpisodeFrame, group, link_to_known
from server.curation.splits import assign_episodes, assign_splits

RULE = NearDuplicateRule(distance=0.5, hash_bits=4)


def frames_of_scenes(scenes: int, per_scene: int, seed: int = 0) -> tuple[list[EpisodeFrame], FrameSet, list[int]]:
    """``per_scene`` near-identical frames of each scene, 0.2 s apart, scenes 10 s apart, on one camera."""
    rng = np.random.default_rng(seed)
    frames, vectors, hashes, truth = [], [], [], []
    for s in range(scenes):
        centre = rng.normal(0, 3, 8)
        base = int(rng.integers(0, 2**63))
        for k in range(per_scene):
            frames.append(EpisodeFrame(f"f{s:03d}-{k:02d}", f"sha-{s}-{k}", "cam-1/0", 1000.0 + 10 * s + 0.2 * k))
            vectors.append(centre + rng.normal(0, 0.01, 8))
            hashes.append(base ^ (1 << k % 3))
            truth.append(s)
    return frames, FrameSet(np.array(vectors, np.float32), np.array(hashes, np.uint64)), truth


def test_frames_of_one_scene_are_one_episode_by_time_and_by_near_duplicates():
    frames, vectors, truth = frames_of_scenes(6, 5)
    by_time = group(frames, gap_s=3.0)
    assert len(set(by_time)) == 6 and all((a == b) == (ta == tb) for a, ta in zip(by_time, truth, strict=True)
                                          for b, tb in zip(by_time, truth, strict=True))  # fmt: skip
    # no capture times, other cameras: the near-duplicate rule alone finds the same scenes
    anonymous = [EpisodeFrame(f.frame_id, f.sha256) for f in frames]
    by_look = group(anonymous, gap_s=3.0, vectors=vectors, rule=RULE)
    assert len(set(by_look)) == 6
    # and with neither, every frame is its own episode
    assert len(set(group(anonymous, gap_s=3.0))) == 30


def test_identical_bytes_link_frames_of_different_cameras():
    a = [EpisodeFrame("x", "same", "cam-1/0", 1.0), EpisodeFrame("y", "same", "cam-2/0", 500.0), EpisodeFrame("z", "z")]
    labels = group(a, gap_s=3.0)
    assert labels[0] == labels[1] != labels[2]


def test_a_per_frame_split_would_split_scenes_but_the_episode_split_never_does():
    frames, vectors, truth = frames_of_scenes(40, 5, seed=1)
    config = SplitConfig(val_fraction=0.2, test_fraction=0.2, val_cap=1000, test_cap=1000)
    per_frame = assign_splits([f.frame_id for f in frames], {}, config)
    labels = group(frames, gap_s=3.0, vectors=vectors, rule=RULE)
    episodes: dict[str, list[str]] = {}
    for f, label in zip(frames, labels, strict=True):
        episodes.setdefault(frames[label].frame_id, []).append(f.frame_id)
    placed = assign_episodes(episodes, {}, config)

    def scenes_split(split_of):
        return sum(len({split_of[f.frame_id] for f, t in zip(frames, truth, strict=True) if t == s}) > 1
                   for s in range(40))  # fmt: skip

    assert scenes_split(per_frame) > 10  # the test can fail: frame by frame, most scenes straddle splits
    assert scenes_split(placed.split_of) == 0
    assert set(placed.split_of.values()) == {"train", "val", "test"}


def test_a_new_frame_joins_its_known_episode_or_is_held_out_when_that_split_is_full():
    known = [EpisodeFrame("old-1", "s1", "cam-1/0", 100.0), EpisodeFrame("old-2", "s2", "cam-1/0", 900.0)]
    new = [EpisodeFrame("new-1", "n1", "cam-1/0", 101.0), EpisodeFrame("new-2", "n2", "cam-1/0", 901.5),
           EpisodeFrame("new-3", "n3", "cam-1/0", 5000.0)]  # fmt: skip
    linked = link_to_known(new, known, gap_s=3.0)
    assert linked == [[0], [1], []]
    config = SplitConfig(test_cap=5, val_cap=5)
    placed = assign_episodes(
        {"old-1": ["new-1"], "old-2": ["new-2"], "new-3": ["new-3"]},
        {"train": 50, "val": 2, "test": 5},  # test full: frozen
        config,
        joined={"old-1": {"val"}, "old-2": {"test"}},
    )
    assert placed.split_of["new-1"] == "val"
    assert "new-2" not in placed.split_of and "test split, which is full" in placed.held_out["new-2"]
    assert placed.split_of["new-3"] in {"train", "val"}  # a new episode: drawn, never into the full test


def test_an_episode_linked_to_several_splits_joins_the_strictest():
    placed = assign_episodes({"e": ["a", "b"]}, {}, SplitConfig(), joined={"e": {"train", "val"}})
    assert placed.split_of == {"a": "val", "b": "val"}


def test_an_episode_too_big_for_the_room_left_in_test_goes_to_train_whole():
    config = SplitConfig(test_fraction=0.49, val_fraction=0.0, test_cap=3)
    episodes = {f"e{i}": [f"e{i}-{k}" for k in range(2)] for i in range(20)}
    placed = assign_episodes(episodes, {"test": 2}, config)
    assert sum(s == "test" for s in placed.split_of.values()) == 0  # 2 + 2 > 3: no whole episode fits
    for e, members in episodes.items():
        assert len({placed.split_of[m] for m in members}) == 1, e

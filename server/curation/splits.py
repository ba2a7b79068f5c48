"""Which split an approved sample joins: the seeds' policy, as pure functions.

Samples are split by *episode* (:mod:`server.curation.episodes`: frames of one scene, linked by
their bytes, their camera and capture time, or as near-duplicates), never frame by frame, so that
no test frame has a near-twin in train. :func:`assign_episodes` does it; :func:`assign_splits` is
the special case of one frame per episode.

Each new episode draws a number in [0, 1) from a hash of ``(seed, episode id)``: random
over episodes, yet the same on every run, so re-running an approval (or replaying it in a test)
gives the same splits. Below ``test_fraction`` it joins test, below ``test_fraction +
val_fraction`` val, else train; a split that cannot take the whole episode (``test_cap``,
``val_cap``, 100 each by default) takes none of it and the episode joins train instead. Samples
never move between splits, so once test holds ``test_cap`` samples it is frozen: every later model
version is scored on exactly the same test set.

A new frame of an episode that is already in a dataset version joins that episode's split. When
that split is full (the frozen test split, or a full val), the frame is *held out*: in train it
would leak into the score of the split its episode is in, and the full split takes nothing more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from server.curation.config import SplitConfig

TRAIN, VAL, TEST = "train", "val", "test"
#: Split names in export order.
SPLITS = (TRAIN, VAL, TEST)


def draw(seed: int, frame_id: str) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``frame_id``."""
    digest = hashlib.sha256(f"{seed}:{frame_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


#: The strictest split first: an episode linked to frames of several splits joins the strictest.
STRICTNESS = (TEST, VAL, TRAIN)


@dataclass
class EpisodeSplits:
    """Where the frames of new episodes go.

    Attributes:
        split_of: Frame id to its split, for every frame that joins the version.
        held_out: Frame id to why it was left out (its episode lies in a full split).
    """

    split_of: dict[str, str] = field(default_factory=dict)
    held_out: dict[str, str] = field(default_factory=dict)


def assign_episodes(
    episodes: Mapping[str, Sequence[str]],
    counts: Mapping[str, int],
    config: SplitConfig,
    joined: Mapping[str, Iterable[str]] | None = None,
) -> EpisodeSplits:
    """The split of each new frame, episode by episode.

    Args:
        episodes: Episode id to the new frames of that episode.
        counts: Samples per split before these (missing splits count as empty).
        config: Fractions, caps and seed.
        joined: Episode id to the splits of frames already in the version that the episode is
            linked to (it must join the strictest of them, or be held out).

    Returns:
        The splits, and the frames held out with the reason. The same input in any order gives the
        same result (episodes are taken in sorted order).
    """
    held = {name: int(counts.get(name, 0)) for name in SPLITS}
    caps = {TEST: config.test_cap, VAL: config.val_cap}
    out = EpisodeSplits()
    for episode in sorted(episodes):
        frames = sorted(set(episodes[episode]))
        linked = set((joined or {}).get(episode, ()))
        if linked:
            target = next(s for s in STRICTNESS if s in linked)
            if target != TRAIN and held[target] + len(frames) > caps[target]:
                why = (
                    f"its episode has frames in the {target} split, which is full ({caps[target]}): "
                    f"in train it would leak into the {target} score"
                )
                out.held_out.update(dict.fromkeys(frames, why))
                continue
            split = target
        else:
            r = draw(config.seed, episode)
            if r < config.test_fraction:
                wanted = TEST
            elif r < config.test_fraction + config.val_fraction:
                wanted = VAL
            else:
                wanted = TRAIN
            split = wanted if wanted == TRAIN or held[wanted] + len(frames) <= caps[wanted] else TRAIN
        held[split] += len(frames)
        out.split_of.update(dict.fromkeys(frames, split))
    return out


def assign_splits(frame_ids: Iterable[str], counts: Mapping[str, int], config: SplitConfig) -> dict[str, str]:
    """Split of each new sample when every sample is an episode of its own (see :func:`assign_episodes`)."""
    return assign_episodes({f: [f] for f in frame_ids}, counts, config).split_of


def is_test_frozen(counts: Mapping[str, int], config: SplitConfig) -> bool:
    """Whether the test split is full, and so will never change again."""
    return int(counts.get(TEST, 0)) >= config.test_cap

"""Which split an approved sample joins: the seeds' policy, as a pure function.

Each newly approved sample draws a number in [0, 1) from a hash of ``(seed, frame id)``: random
over samples, yet the same on every run, so re-running an approval (or replaying it in a test)
gives the same splits. Below ``test_fraction`` it joins test, below ``test_fraction +
val_fraction`` val, else train; a split that is full (``test_cap``, ``val_cap``, 100 each by
default) takes nothing more and the sample joins train instead. Samples never move between
splits, so once test holds ``test_cap`` samples it is frozen: every later model version is scored
on exactly the same test set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from server.curation.config import SplitConfig

TRAIN, VAL, TEST = "train", "val", "test"
#: Split names in export order.
SPLITS = (TRAIN, VAL, TEST)


def draw(seed: int, frame_id: str) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``frame_id``."""
    digest = hashlib.sha256(f"{seed}:{frame_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(frame_ids: Iterable[str], counts: Mapping[str, int], config: SplitConfig) -> dict[str, str]:
    """Split of each new sample, given how many samples each split already holds.

    Args:
        frame_ids: The newly approved samples (taken in sorted order, so the result does not depend
            on the order they are given in).
        counts: Samples per split before these (missing splits count as empty).
        config: Fractions, caps and seed.

    Returns:
        Frame id to ``"train"``, ``"val"`` or ``"test"``.
    """
    held = {name: int(counts.get(name, 0)) for name in SPLITS}
    caps = {TEST: config.test_cap, VAL: config.val_cap}
    out: dict[str, str] = {}
    for frame_id in sorted(set(frame_ids)):
        r = draw(config.seed, frame_id)
        if r < config.test_fraction:
            wanted = TEST
        elif r < config.test_fraction + config.val_fraction:
            wanted = VAL
        else:
            wanted = TRAIN
        split = wanted if wanted == TRAIN or held[wanted] < caps[wanted] else TRAIN
        held[split] += 1
        out[frame_id] = split
    return out


def is_test_frozen(counts: Mapping[str, int], config: SplitConfig) -> bool:
    """Whether the test split is full, and so will never change again."""
    return int(counts.get(TEST, 0)) >= config.test_cap

"""The keep decision that selects: each camera keeps its most uncertain ``share`` of frames.

A fixed score threshold keeps what the model happens to score above it: with a weak or new model
that is nearly everything (measured: 86-100% of the frames of every camera, 97% uploaded on
aquarium streams), so the edge saves no bandwidth and leaves all the choosing to the server.
:class:`AdaptiveKeep` instead ranks each frame's score among its camera's recent frames (a running
quantile over ``window`` frames) and keeps it when it is in the top ``share`` and the camera kept
fewer than ``share`` of those frames (a budget, for scores that trend). The share holds
whatever the score's scale on this camera, through a model swap and a change of scene, and a
camera that sees more uncertain frames does not upload more of them (the server's allocation by
need decides whose frames a batch takes).

Ties are broken at random (a noisy-OR saturates near 1 on crowded scenes: without it a camera of
crowds would keep everything or nothing). The draws come from a stream of their own, so the random
trigger's unbiased sample does not depend on them; random picks are kept apart from the share.

Why 0.2 by default: the server picks batches of 30-50 from what the agents upload, and measured on
the active-learning bench, keeping the top 25% by score did as well as uploading everything
(within one SD) while the top 5% did worse than random (the top of the score is crowded scenes);
a fifth leaves the server five frames to choose from for every one it would take from a random
sample, at a fifth of the bandwidth. At 5 fps that is one frame a second per camera. The random
trigger's share (1% by default) comes on top: a camera keeps ``share + random.rate`` of its frames.
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque

import numpy as np
from pydantic import Field

from edgeloop.config_base import StrictModel


def source_rng(seed: int | None, source_id: str, stream: int = 0) -> np.random.Generator:
    """A camera's own random stream: reproducible from ``seed`` and its id (fresh entropy for None),
    independent of how its frames interleave with another camera's; ``stream`` keeps uses apart."""
    entropy = None if seed is None else [seed, zlib.crc32(source_id.encode()), stream]
    return np.random.default_rng(entropy)


class KeepConfig(StrictModel):
    """How many of a camera's frames the agent keeps (random picks aside)."""

    share: float | None = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="Keep a frame when its score is in the top `share` of its camera's recent frames (and a "
        "trigger fired above `min_score`). 0.2 by default: a fifth of the bandwidth, five candidates for each "
        "frame a batch takes (see edge_agent/keep.py). null: keep every frame over `min_score`.",
    )
    window: int = Field(
        default=600,
        ge=10,
        le=100_000,
        description="Recent frames per camera the share is measured over (2 min at 5 fps).",
    )
    warmup: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Keep every frame over `min_score` until a camera has scored this many (0: rank from the "
        "first frame; the newest of n scores ranks uniformly, so the share holds from the start; the frames "
        "kept in warm-up count against the budget after it).",
    )


class AdaptiveKeep:
    """Per camera, whether a frame is in the top ``share`` of the camera's last ``window`` scores.

    Two conditions, both per camera over its last ``window`` frames: the frame's score ranks in the
    top ``share`` (the running quantile: which frames), and fewer than ``share`` of those frames
    were kept (the budget: how many). The rank alone holds the share only for scores that do not
    trend; on a stream whose scores rise (a scene getting harder, a shift arriving) the newest
    frame ranks high more often than ``share`` (measured: 22-26% kept at a 20% share on the
    bench's 90-frame camera streams), and the budget caps it.

    Args:
        config: The share, window and warm-up.
        seed: Seeds the tie-breaking draws (per camera, apart from the random trigger's).
    """

    def __init__(self, config: KeepConfig, seed: int | None = None) -> None:
        self._config = config
        self._seed = seed
        self._order: dict[str, deque[tuple[float, bool]]] = {}
        self._sorted: dict[str, list[float]] = {}
        self._kept: dict[str, int] = {}
        self._rngs: dict[str, np.random.Generator] = {}

    def admit(self, source_id: str, score: float, candidate: bool = True) -> bool:
        """Whether to keep a frame of ``source_id`` scoring ``score``, and record it.

        Args:
            source_id: The camera.
            score: The frame's score (0 for a frame no trigger fired on).
            candidate: Whether it may be kept at all (a trigger fired over ``min_score``); every frame
                is recorded either way, since the share is of what the camera sees.
        """
        cfg = self._config
        order = self._order.setdefault(source_id, deque())
        ranked = self._sorted.setdefault(source_id, [])
        kept = self._kept.get(source_id, 0)
        bisect.insort(ranked, score)
        if len(order) >= cfg.window:
            old, was_kept = order.popleft()
            del ranked[bisect.bisect_left(ranked, old)]
            kept -= was_kept
        keep = candidate
        if keep and cfg.share is not None and len(order) >= cfg.warmup:
            below = bisect.bisect_left(ranked, score)
            equal = bisect.bisect_right(ranked, score) - below
            rank = (below + self._rng(source_id).random() * equal) / len(ranked)
            keep = rank >= 1.0 - cfg.share and kept < cfg.share * (len(order) + 1)
        order.append((score, keep))
        self._kept[source_id] = kept + keep
        return keep

    def _rng(self, source_id: str) -> np.random.Generator:
        rng = self._rngs.get(source_id)
        if rng is None:
            rng = self._rngs[source_id] = source_rng(self._seed, source_id, stream=1)
        return rng

    def reset(self, source_id: str) -> None:
        """Forget a camera's recent scores (it moved, or the model changed what a score means)."""
        self._order.pop(source_id, None)
        self._sorted.pop(source_id, None)
        self._kept.pop(source_id, None)

"""Bandwidth control: what may be uploaded, and what is not worth storing at all.

Two independent mechanisms:

* :class:`UploadBudget` -- a per-device token bucket in frames *and* bytes per minute, applied at
  upload time. The uploader always offers the outbox's highest-scoring frames first, so when the
  budget is tight the most valuable frames go and the rest wait (or are eventually evicted).
* :class:`NearDuplicateFilter` -- applied before a frame enters the outbox: a frame whose
  perceptual hash (64-bit dHash) is within ``max_hash_distance`` bits of a frame kept from the
  same camera in the last ``window_s`` seconds, *and* whose boxes match that frame's (same
  classes, mean IoU >= ``min_box_iou``), adds nothing for a curator and is dropped and counted.
  Both conditions are needed: a static scene with a new object changes the boxes but hardly the
  hash, and a camera pan changes the hash while the boxes may look alike.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.domain import Detection


class DedupConfig(StrictModel):
    enabled: bool = Field(default=True, description="Drop near-duplicates of recently kept frames.")
    window_s: float = Field(default=30.0, gt=0, description="How far back to look for a near-duplicate.")
    max_hash_distance: int = Field(
        default=6, ge=0, le=64, description="dHash Hamming distance (bits of 64) at or below which images match."
    )
    min_box_iou: float = Field(
        default=0.7, ge=0, le=1, description="Mean IoU of matched same-class boxes at or above which boxes match."
    )
    max_remembered: int = Field(default=256, gt=0, description="Kept frames remembered per camera.")


class BudgetConfig(StrictModel):
    """Upload budget and frame encoding."""

    frames_per_minute: float = Field(default=60.0, gt=0, description="Upload at most this many frames a minute.")
    bytes_per_minute: float = Field(default=20e6, gt=0, description="Upload at most this many bytes a minute.")
    burst_s: float = Field(
        default=10.0, gt=0, description="Bucket size in seconds of budget (how much may go at once after idling)."
    )
    jpeg_quality: int = Field(default=90, ge=10, le=100, description="JPEG quality of uploaded frames.")
    max_side: int = Field(
        default=1280, ge=32, description="Longest side of an uploaded frame; larger frames are downscaled."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig)


class _Bucket:
    def __init__(self, per_minute: float, burst_s: float, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        # Never smaller than one unit of one frame, else a large frame could never pass.
        self.capacity = max(self.rate * burst_s, 1.0)
        self.tokens = self.capacity
        self._clock = clock
        self._last = clock()

    def refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self, amount: float) -> float:
        amount = min(amount, self.capacity)
        return 0.0 if self.tokens >= amount else (amount - self.tokens) / self.rate


class UploadBudget:
    """Token buckets for frames and bytes. ``take`` is called by the uploader thread only."""

    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._frames = _Bucket(config.frames_per_minute, config.burst_s, clock)
        self._bytes = _Bucket(config.bytes_per_minute, config.burst_s, clock)

    def admit(self, sizes: Sequence[int]) -> int:
        """How many of the frames (in the order given) fit the budget now; their cost is taken."""
        self._frames.refill()
        self._bytes.refill()
        n = 0
        for size in sizes:
            # A frame larger than the whole byte bucket may still go when the bucket is full,
            # otherwise it would be stuck forever.
            cost = min(float(size), self._bytes.capacity)
            if self._frames.tokens < 1.0 or self._bytes.tokens < cost:
                break
            self._frames.tokens -= 1.0
            self._bytes.tokens -= cost
            n += 1
        return n

    def wait_time(self, next_size: int) -> float:
        """Seconds until a frame of ``next_size`` bytes would fit."""
        self._frames.refill()
        self._bytes.refill()
        return max(self._frames.wait_time(1.0), self._bytes.wait_time(float(next_size)))


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a BGR or grey image (robust to scale, JPEG and small light changes)."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` (N,4) and ``b`` (M,4), xyxy."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def boxes_similarity(a: Sequence[Detection], b: Sequence[Detection]) -> float:
    """Mean IoU after greedily pairing same-class boxes; 0 when the class multisets differ."""
    if len(a) != len(b) or sorted(d.class_id for d in a) != sorted(d.class_id for d in b):
        return 0.0
    if not a:
        return 1.0
    ba = np.array([d.box for d in a], dtype=np.float32)
    bb = np.array([d.box for d in b], dtype=np.float32)
    iou = box_iou_matrix(ba, bb)
    same = np.array([[da.class_id == db.class_id for db in b] for da in a])
    iou = np.where(same, iou, -1.0)
    total = 0.0
    for _ in range(len(a)):
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        total += max(float(iou[i, j]), 0.0)
        iou[i, :] = -1.0
        iou[:, j] = -1.0
    return total / len(a)


@dataclass(slots=True)
class _Seen:
    time: float
    hash: int
    detections: Sequence[Detection]


class NearDuplicateFilter:
    """Remembers recently kept frames per camera and recognises near-duplicates of them."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self._seen: dict[str, deque[_Seen]] = {}
        self._lock = threading.Lock()

    def is_duplicate(self, source_id: str, image: np.ndarray, detections: Sequence[Detection], now: float) -> bool:
        """True when the frame duplicates a recently kept one; otherwise remember it as kept."""
        if not self.config.enabled:
            return False
        h = dhash(image)
        with self._lock:
            seen = self._seen.setdefault(source_id, deque(maxlen=self.config.max_remembered))
            while seen and now - seen[0].time > self.config.window_s:
                seen.popleft()
            for old in reversed(seen):
                if (h ^ old.hash).bit_count() <= self.config.max_hash_distance and (
                    boxes_similarity(detections, old.detections) >= self.config.min_box_iou
                ):
                    return True
            seen.append(_Seen(now, h, list(detections)))
        return False

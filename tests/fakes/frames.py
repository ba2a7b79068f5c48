"""Valid (and deliberately invalid) serialized frames for ingest tests."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from edgeloop.convert import serialize_frame
from edgeloop.domain import Detection, FrameRecord

CLASSES = ("circle", "square", "triangle")


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A real JPEG of noise (noise keeps its size close to width*height bytes)."""
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def photo(seed: int = 0, width: int = 640, height: int = 480, ext: str = ".jpg", params: Sequence[int] = ()) -> bytes:
    """A real image that compresses like a photo: coloured rectangles plus noise, encoded by OpenCV."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    for _ in range(30):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.rectangle(image, p1, p2, color, -1)
    image = cv2.add(image, rng.integers(0, 20, image.shape, dtype=np.uint8))
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def make_frame(
    i: int = 0,
    *,
    device: str,
    image: bytes | None = None,
    width: int = 64,
    height: int = 48,
    boxes: Sequence[tuple[float, float, float, float]] = ((1, 2, 30, 40),),
    class_id: int = 0,
    frame_id: str | None = None,
    classes: Sequence[str] = CLASSES,
) -> tuple[str, bytes]:
    """``(frame_id, serialized FrameUpload)`` for a valid frame unless told otherwise."""
    frame_id = frame_id if frame_id is not None else f"{os.urandom(8).hex()}{i:08d}"
    name = classes[class_id] if 0 <= class_id < len(classes) else "?"
    rec = FrameRecord(
        frame_id=frame_id,
        device_id=device,
        capture_time=1_700_000_000.5 + i,
        sequence=i,
        model_version="m1",
        image=jpeg(width, height, seed=i) if image is None else image,
        media_type="image/jpeg",
        width=width,
        height=height,
        detections=[Detection(box=b, class_id=class_id, class_name=name, confidence=0.4) for b in boxes],
        uncertainty=0.5,
        class_names=list(classes),
    )
    return frame_id, serialize_frame(rec)

"""Camera-like streams made from labelled photos: each photo becomes a short clip of jittered frames.

A fleet camera does not show a data set's photos once each: it shows the same scene frame after
frame (consecutive frames are near-duplicates), mostly what the model already handles and now
and then something it needs. From any YOLO data set this module writes such a stream, so the
demo (``edgeloop demo --data``) and the active-learning benchmark can play real photographs as
a camera would: a photo's clip is its first frame as it is, then frames with a small random shift
and zoom and a little sensor noise, with the labels moved along. Photos holding one of the rarer
classes get short clips, the others long ones, so the rare cases are a minority of the frames.

Output: ``images/<clip>-<k>.jpg`` and ``labels/<clip>-<k>.txt`` (frames in stream order when
sorted by name), readable as a folder source with ``sequence: true``. Only numpy and OpenCV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgeloop.yolo_dataset import YoloItem, YoloLabel

#: Largest shift (share of the image side) and zoom between a clip's frames, and sensor noise (grey levels).
MAX_SHIFT = 0.03
MAX_ZOOM = 1.08
NOISE_SIGMA = 3.0
#: A box that shrinks below this many pixels in a jittered frame is dropped from its labels.
MIN_BOX_PX = 2.0


@dataclass(frozen=True)
class StreamFrame:
    """One written frame: its image and label files and the photo it came from."""

    image: Path
    labels: Path
    photo: Path


def jitter(image: np.ndarray, labels: Sequence[YoloLabel], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The camera's next frame of the same view, and its YOLO label text."""
    h, w = image.shape[:2]
    scale = float(rng.uniform(1.0, MAX_ZOOM))
    dx, dy = (float(v) for v in rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2))
    m = np.array([[scale, 0, (1 - scale) * w / 2 + dx * w], [0, scale, (1 - scale) * h / 2 + dy * h]], np.float32)
    out = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    noise = rng.normal(0, NOISE_SIGMA, out.shape)
    out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    lines = []
    for lab in labels:
        x1, y1, x2, y2 = lab.xyxy(w, h)
        x1, x2 = np.clip(np.array([x1, x2]) * scale + m[0, 2], 0, w)
        y1, y2 = np.clip(np.array([y1, y2]) * scale + m[1, 2], 0, h)
        if x2 - x1 >= MIN_BOX_PX and y2 - y1 >= MIN_BOX_PX:
            moved = YoloLabel(lab.class_id, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
            lines.append(moved.line())
    return out, "".join(line + "\n" for line in lines)


def rare_classes(items: Sequence[YoloItem], num_classes: int) -> set[int]:
    """The less frequent half of the classes, by object count over ``items``."""
    counts = np.bincount([lab.class_id for it in items for lab in it.labels()], minlength=num_classes)
    return set(np.argsort(counts, kind="stable")[: num_classes // 2].tolist())


def write_photo_stream(
    items: Sequence[YoloItem],
    out_dir: Path,
    *,
    num_classes: int,
    seed: int,
    common_clip: int = 8,
    rare_clip: int = 2,
) -> list[StreamFrame]:
    """Write a stream of clips, one per photo (in the given order), under ``out_dir``."""
    rng = np.random.default_rng(seed)
    rare = rare_classes(items, num_classes)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    frames: list[StreamFrame] = []
    for n, item in enumerate(items):
        image = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
        if image is None:
            continue
        labels = item.labels()
        length = rare_clip if rare & {lab.class_id for lab in labels} else common_clip
        for k in range(length):
            if k == 0:
                frame, text = image, "".join(lab.line() + "\n" for lab in labels)
            else:
                frame, text = jitter(image, labels, rng)
            stem = f"{n:05d}-{k:02d}"
            img, lab = out_dir / "images" / f"{stem}.jpg", out_dir / "labels" / f"{stem}.txt"
            cv2.imwrite(str(img), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            lab.write_text(text)
            frames.append(StreamFrame(img, lab, item.image))
    return frames

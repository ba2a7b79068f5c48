"""Encoding a kept frame for upload: downscale to the configured size, JPEG, rescale the boxes.

Boxes on the wire always refer to the uploaded image, so the server never needs to know the
camera's native resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from edgeloop.domain import Detection

JPEG = "image/jpeg"


class EncodingError(Exception):
    """OpenCV could not encode the frame."""


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    data: bytes
    media_type: str
    width: int
    height: int
    detections: list[Detection]


def encode_frame(image: np.ndarray, detections: Sequence[Detection], *, quality: int, max_side: int) -> EncodedFrame:
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = nw / w, nh / h
        detections = [replace(d, box=(d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy)) for d in detections]
        w, h = nw, nh
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise EncodingError(f"JPEG encoding failed for a {w}x{h} frame")
    return EncodedFrame(buf.tobytes(), JPEG, w, h, list(detections))

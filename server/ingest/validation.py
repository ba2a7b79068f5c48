"""Frame validation: every check a frame passes before any byte of it is stored.

:func:`validate` turns wire bytes into a :class:`~edgeloop.domain.FrameRecord` or raises
:class:`~server.ingest.base.FrameRejected` whose code says which check failed and whose message
says what is wrong and what the sender should fix. Checks run cheapest first, so a malformed or
oversized message costs next to nothing, and the image is decoded once, last.

Image check: the declared media type must match the bytes' signature, the header's size (JPEG
SOF / PNG IHDR, read without decoding) must match the declared width and height and stay under
``max_image_pixels`` (so a small message cannot make the server allocate a huge bitmap), and the
file must end where its format says it ends (JPEG EOI, PNG IEND). Then, with
``decode_images: structure`` (the default), a JPEG's whole marker structure is checked the way
libjpeg reads it (:mod:`server.ingest.jpeg_structure`, ~40 us for a 100 KB frame); a fuzz test
holds it to refusing every mutated JPEG that OpenCV's decoder refuses (the decoder only warns
about corrupt entropy-coded data, so decoding catches nothing more). PNG and WebP frames (rare:
agents send JPEG) are decoded in full. With
``decode_images: full`` every image is decoded with OpenCV (``IMREAD_GRAYSCALE``: the whole
bitstream is entropy-decoded, only the colour conversion is skipped), ~0.8-1.2 ms per 640x480
JPEG on the 2-core CI machine: 20-25x the structure check, and most of a stored frame's cost.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
from google.protobuf.message import DecodeError
from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.convert import parse_frame
from edgeloop.domain import FrameRecord
from server.ingest.base import DeviceDirectory, FrameRejected, Identity, RejectCode
from server.ingest.jpeg_structure import JpegStructureError, check_jpeg
from server.store.media import EXTENSIONS, FRAME_ID_PATTERN

#: Largest sequence number a MongoDB integer holds (the wire type is uint64).
MAX_SEQUENCE = 2**63 - 1
#: Capture times a datetime can hold (1970 to the end of year 9999).
MAX_CAPTURE_TIME = 253_402_300_799.0

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class ValidationConfig(StrictModel):
    """Limits a frame must stay within to be stored."""

    max_frame_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest serialized FrameUpload accepted (bytes); larger is too_large."
    )
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="Largest declared or encoded image (width x height) accepted."
    )
    max_detections: int = Field(1000, gt=0, description="Most detections one frame may carry.")
    decode_images: Literal["structure", "full"] = Field(
        "structure",
        description="'structure': check a JPEG's marker structure as libjpeg reads it (~40 us per frame; refuses "
        "every JPEG the decoder refuses), decode PNG and WebP; 'full': decode every image (~1 ms per 640x480 JPEG).",
    )
    box_tolerance_px: float = Field(
        2.0, ge=0, description="How far a box may stray past the image border (rounding after rescaling)."
    )
    require_class_names: bool = Field(
        False,
        description=(
            "Refuse frames with detections but without the model's class_names (then class ids cannot be "
            "checked). The edgeloop agent always sends them."
        ),
    )


def _reject(code: RejectCode, message: str, frame_id: str = "") -> FrameRejected:
    return FrameRejected(code, message, frame_id)


def _media_type_of(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first SOF marker, or None when the header is cut short."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == 0xDA or length < 2:  # scan data before any SOF: not a valid JPEG
            return None
        i += 2 + length
    return None


def _header_size(data: bytes, media_type: str) -> tuple[int, int] | None:
    if media_type == "image/jpeg":
        return _jpeg_size(data)
    if media_type == "image/png" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _complete(data: bytes, media_type: str) -> bool:
    """True when the file ends where its format says (catches truncated uploads libjpeg would pad)."""
    if media_type == "image/jpeg":
        # Some encoders pad after EOI; entropy-coded data cannot hold FFD9 (FF is byte-stuffed).
        return b"\xff\xd9" in data[-1024:]
    if media_type == "image/png":
        return b"IEND" in data[-16:]
    if media_type == "image/webp":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def _unit(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def _check_image(rec: FrameRecord, config: ValidationConfig) -> None:
    fid = rec.frame_id
    media_type = rec.media_type or "image/jpeg"
    if media_type not in EXTENSIONS:
        raise _reject(
            RejectCode.BAD_IMAGE, f"media_type {rec.media_type!r} is not accepted; send {', '.join(EXTENSIONS)}", fid
        )
    data = rec.image
    if not data:
        raise _reject(RejectCode.BAD_IMAGE, "the frame carries no image bytes", fid)
    if rec.width <= 0 or rec.height <= 0:
        raise _reject(RejectCode.BAD_IMAGE, f"declared image size {rec.width}x{rec.height} is empty; send it", fid)
    if rec.width * rec.height > config.max_image_pixels:
        raise _reject(
            RejectCode.BAD_IMAGE,
            f"image is {rec.width}x{rec.height} pixels, above the server's limit of {config.max_image_pixels}; "
            "downscale before upload",
            fid,
        )
    actual_type = _media_type_of(data)
    if actual_type != media_type:
        what = f"look like {actual_type}" if actual_type else "are not a JPEG, PNG or WebP image"
        raise _reject(RejectCode.BAD_IMAGE, f"media_type says {media_type} but the bytes {what}", fid)
    header = _header_size(data, media_type)
    if header is not None and header != (rec.width, rec.height):
        raise _reject(
            RejectCode.BAD_IMAGE,
            f"the image header says {header[0]}x{header[1]} but the frame declares {rec.width}x{rec.height}; "
            "boxes must refer to the uploaded image",
            fid,
        )
    if not _complete(data, media_type):
        raise _reject(RejectCode.BAD_IMAGE, f"the {media_type} data is truncated (no end marker)", fid)
    if media_type == "image/jpeg" and config.decode_images == "structure":
        try:
            check_jpeg(data)
        except JpegStructureError as err:
            raise _reject(RejectCode.BAD_IMAGE, f"the JPEG data does not decode: {err}", fid) from None
        return
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise _reject(RejectCode.BAD_IMAGE, f"the {media_type} data does not decode (corrupt or truncated)", fid)
    h, w = image.shape[:2]
    if (w, h) != (rec.width, rec.height):
        raise _reject(
            RejectCode.BAD_IMAGE,
            f"the image decodes to {w}x{h} but the frame declares {rec.width}x{rec.height}; "
            "boxes must refer to the uploaded image",
            fid,
        )


def _check_detections(rec: FrameRecord, config: ValidationConfig) -> None:
    fid = rec.frame_id
    if len(rec.detections) > config.max_detections:
        raise _reject(
            RejectCode.BAD_VALUE,
            f"{len(rec.detections)} detections, above the limit of {config.max_detections}; raise the "
            "detector's confidence threshold",
            fid,
        )
    names = rec.class_names
    if rec.detections and not names and config.require_class_names:
        raise _reject(
            RejectCode.UNKNOWN_CLASS, "the frame has detections but no class_names; send the model's class names", fid
        )
    tol = config.box_tolerance_px
    for i, det in enumerate(rec.detections):
        where = f"detection {i}"
        if not all(math.isfinite(v) for v in det.box):
            raise _reject(RejectCode.BAD_VALUE, f"{where}: box {det.box} is not finite", fid)
        if not _unit(det.confidence):
            raise _reject(RejectCode.BAD_VALUE, f"{where}: confidence {det.confidence} is outside [0, 1]", fid)
        if det.class_scores is not None and not all(_unit(float(s)) for s in det.class_scores):
            raise _reject(RejectCode.BAD_VALUE, f"{where}: class_scores hold values outside [0, 1]", fid)
        x1, y1, x2, y2 = det.box
        if x2 <= x1 or y2 <= y1:
            raise _reject(RejectCode.BOX_OUTSIDE, f"{where}: box {det.box} is empty (needs x2 > x1 and y2 > y1)", fid)
        if x1 < -tol or y1 < -tol or x2 > rec.width + tol or y2 > rec.height + tol:
            raise _reject(
                RejectCode.BOX_OUTSIDE,
                f"{where}: box {tuple(round(v, 1) for v in det.box)} lies outside the {rec.width}x{rec.height} "
                f"image (tolerance {tol:g} px); boxes must be in pixels of the uploaded image",
                fid,
            )
        if names:
            if not 0 <= det.class_id < len(names):
                raise _reject(
                    RejectCode.UNKNOWN_CLASS,
                    f"{where}: class_id {det.class_id} is not one of the model's {len(names)} classes",
                    fid,
                )
            if det.class_name != names[det.class_id]:
                raise _reject(
                    RejectCode.UNKNOWN_CLASS,
                    f"{where}: class_name {det.class_name!r} does not match class_names[{det.class_id}] = "
                    f"{names[det.class_id]!r}",
                    fid,
                )
        elif det.class_id < 0 or not det.class_name:
            raise _reject(
                RejectCode.UNKNOWN_CLASS, f"{where}: needs a class_id >= 0 and a class_name (or send class_names)", fid
            )


def validate(payload: bytes, identity: Identity, devices: DeviceDirectory, config: ValidationConfig) -> FrameRecord:
    """Parse and check one serialized ``FrameUpload``.

    Returns:
        The frame, with ``media_type`` filled in (``image/jpeg`` when the sender left it empty).

    Raises:
        FrameRejected: the first check that failed (see ``RejectCode``); nothing has been stored.
    """
    if len(payload) > config.max_frame_bytes:
        raise _reject(
            RejectCode.TOO_LARGE,
            f"message is {len(payload)} bytes, above the limit of {config.max_frame_bytes}; lower the upload "
            "size (max_side / JPEG quality) on the device",
        )
    try:
        rec = parse_frame(payload)
    except (DecodeError, ValueError, TypeError, OverflowError) as err:
        raise _reject(RejectCode.MALFORMED, f"not a valid edgeloop.v1.FrameUpload ({err})") from err
    if not rec.frame_id and not rec.device_id and not rec.image and not rec.detections:
        raise _reject(
            RejectCode.MALFORMED,
            "the message holds no FrameUpload fields (empty, or another message type sent to the frames endpoint)",
        )
    fid = rec.frame_id
    if not fid:
        raise _reject(RejectCode.MISSING_ID, "the frame has no frame_id; give every frame a UUID4 hex id")
    if not FRAME_ID_PATTERN.fullmatch(fid):
        raise _reject(
            RejectCode.MISSING_ID,
            f"frame_id {fid[:80]!r} is not a valid id: use 8-64 characters of A-Z a-z 0-9 _ - (a UUID4 hex)",
        )
    if not rec.device_id:
        raise _reject(RejectCode.MISSING_ID, "the frame has no device_id; set the agent's device id", fid)
    if identity.device_id is not None and identity.device_id != rec.device_id:
        raise _reject(
            RejectCode.DEVICE_MISMATCH,
            f"frame says device {rec.device_id!r} but the connection is authenticated as {identity.device_id!r}",
            fid,
        )
    if not devices.is_active(rec.device_id):
        raise _reject(
            RejectCode.UNKNOWN_DEVICE,
            f"device {rec.device_id!r} is not registered or was revoked; register it on the server",
            fid,
        )
    if not math.isfinite(rec.capture_time) or not 0.0 <= rec.capture_time <= MAX_CAPTURE_TIME:
        raise _reject(RejectCode.BAD_VALUE, f"capture_time {rec.capture_time} is not a valid time", fid)
    if rec.sequence > MAX_SEQUENCE:
        raise _reject(RejectCode.BAD_VALUE, f"sequence {rec.sequence} is above {MAX_SEQUENCE}", fid)
    if not _unit(rec.uncertainty):
        raise _reject(RejectCode.BAD_VALUE, f"uncertainty {rec.uncertainty} is outside [0, 1]", fid)
    for reason in rec.reasons:
        if not _unit(reason.score):
            raise _reject(
                RejectCode.BAD_VALUE, f"reason {reason.trigger!r} has score {reason.score} outside [0, 1]", fid
            )
    _check_detections(rec, config)
    _check_image(rec, config)
    if not rec.media_type:
        rec.media_type = "image/jpeg"
    return rec

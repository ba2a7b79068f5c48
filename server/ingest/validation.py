"""Frame validation: every check a frame passes before any byte of it is stored.

:func:`validate` turns wire bytes into a :class:`~edgeloop.domain.FrameRecord` or raises
:class:`~server.ingest.base.FrameRejected` whose code says which check failed and whose message
says what is wrong and what the sender should fix. Checks run cheapest first, so a malformed or
oversized message costs next to nothing, and the image is decoded once, last.

Field limits: every field that can grow has a limit (``ValidationConfig``: string lengths, the
number of reasons, detections, class names, class scores per detection and per frame, embedding
floats; :data:`MAX_DEVICE_ID_CHARS` for device ids), checked before any per-element work. A frame
over one is refused with ``field_limit`` and a message that names the field. Together they bound
the sample's MongoDB document: :meth:`ValidationConfig.max_document_bytes` is the largest
document a valid frame can make, and a configuration whose bound exceeds MongoDB's 16 MiB limit
is refused at start-up, so the database never refuses a valid frame for its size. A class-score
vector must have one score per class name when the frame sends both.

Image check, before anything is decoded: the declared media type must match the bytes'
signature; the image header's own size (JPEG SOF, PNG IHDR, WebP VP8/VP8L/VP8X chunk headers,
read without decoding) must be readable and equal to the declared width and height, and stay
under ``max_image_pixels`` (so a small message cannot make the server allocate a huge bitmap:
a 10 KB WebP can hold a 16383x16383 image); and the file must end where its format says it ends
(JPEG EOI, PNG IEND, WebP RIFF size). Animated WebP is refused. Then, with
``decode_images: structure`` (the default), a JPEG's whole marker structure is checked the way
libjpeg reads it (:mod:`server.ingest.jpeg_structure`, ~40 us for a 100 KB frame); a fuzz test
holds it to refusing every mutated JPEG that OpenCV's decoder refuses (the decoder only warns
about corrupt entropy-coded data, so decoding catches nothing more). PNG and WebP frames (rare:
agents send JPEG) are decoded in full. With
``decode_images: full`` every image is decoded with OpenCV (``IMREAD_GRAYSCALE``: the whole
bitstream is entropy-decoded, only the colour conversion is skipped), ~0.8-1.2 ms per 640x480
JPEG on the 2-core CI machine: 20-25x the structure check, and most of a stored frame's cost.

Decode memory: a decode waits for its share of a process-wide :class:`DecodeBudget` of
``max_decode_pixels`` (first come, first served), so however many streams send images at once,
the pixels being decoded never exceed it. A decode needs at most :data:`DECODE_BYTES_PER_PIXEL`
bytes per pixel (measured with OpenCV 5.1 on 12 MP images: JPEG 2.3 baseline / 3.8 progressive,
PNG 2.3-2.4 whatever the bit depth, WebP 4.3 lossy / 6.4 with alpha / 7.1 lossless), so the
memory decoding takes is at most ``8 * max_decode_pixels`` bytes: 400 MB with the defaults.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import cv2
import numpy as np
from google.protobuf.message import DecodeError
from pydantic import Field, model_validator

from edgeloop.config_base import StrictModel
from edgeloop.convert import parse_frame
from edgeloop.domain import FrameRecord
from server.ingest.base import MAX_DEVICE_ID_CHARS, DeviceDirectory, FrameRejected, Identity, RejectCode, clip
from server.ingest.jpeg_structure import JpegStructureError, check_jpeg
from server.store.media import EXTENSIONS, FRAME_ID_PATTERN

#: Largest sequence number a MongoDB integer holds (the wire type is uint64).
MAX_SEQUENCE = 2**63 - 1
#: Capture times a datetime can hold (1970 to the end of year 9999).
MAX_CAPTURE_TIME = 253_402_300_799.0

#: MongoDB's largest document (``maxBsonObjectSize``); a sample's document must stay below it.
MONGO_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: Bytes a decode needs per pixel, at most (measured: see the module docstring).
DECODE_BYTES_PER_PIXEL = 8

# Bounds of a sample document's parts in BSON bytes (server.store.inbox builds it; a test holds the
# sum to a real worst-case document). A character is up to 4 bytes of UTF-8.
_DOC_FIXED_BYTES = 12_000  # field names, metadata, dates, ids, numbers, a file path of up to 4 KiB
_DOC_PER_REASON_BYTES = 80  # a reason's keys and score, and its trigger's entry in ``tags``
_DOC_PER_DETECTION_BYTES = 400  # a detection's keys, ids, box, confidence, class id
_DOC_PER_FLOAT_BYTES = 16  # one array element: type byte, index key (up to 7 bytes), 8-byte double

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class ValidationConfig(StrictModel):
    """Limits a frame must stay within to be stored."""

    max_frame_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest serialized FrameUpload accepted (bytes); larger is too_large."
    )
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="Largest declared or encoded image (width x height) accepted."
    )
    max_decode_pixels: int = Field(
        50_000_000,
        gt=0,
        description=(
            "Pixels being decoded at once in this process, over all streams (decodes wait their turn beyond it). "
            "Decoding takes at most 8 bytes per pixel, so this bounds decode memory (400 MB by default). Must be "
            "at least max_image_pixels."
        ),
    )
    max_detections: int = Field(1000, gt=0, description="Most detections one frame may carry.")
    max_name_chars: int = Field(
        128,
        gt=0,
        description="Longest source_id, source_name, model_version, class name (class_name, class_names) and "
        "reason trigger.",
    )
    max_detail_chars: int = Field(1024, gt=0, description="Longest reason detail.")
    max_reasons: int = Field(32, gt=0, description="Most reasons one frame may carry.")
    max_classes: int = Field(4096, gt=0, description="Most class names, and most class scores of one detection.")
    max_class_scores: int = Field(
        200_000,
        gt=0,
        description="Most class scores of all detections of one frame together (detections x classes).",
    )
    max_embedding: int = Field(4096, gt=0, description="Most floats in a frame's embedding (all must be finite).")
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

    def max_document_bytes(self) -> int:
        """The largest sample document (BSON bytes) a frame within these limits can make."""
        name = 4 * self.max_name_chars
        strings = 4 * (MAX_DEVICE_ID_CHARS + 3 * self.max_name_chars + 64)  # device, source, name, model, frame id
        reasons = self.max_reasons * (_DOC_PER_REASON_BYTES + 2 * name + 4 * self.max_detail_chars)
        detections = self.max_detections * (_DOC_PER_DETECTION_BYTES + name)
        floats = _DOC_PER_FLOAT_BYTES * (self.max_class_scores + self.max_embedding)
        return _DOC_FIXED_BYTES + strings + reasons + detections + floats

    @model_validator(mode="after")
    def _fits_the_database(self) -> ValidationConfig:
        bound = self.max_document_bytes()
        if bound > MONGO_MAX_DOCUMENT_BYTES:
            raise ValueError(
                f"with these limits a frame's sample could take {bound:,} bytes, above MongoDB's document limit of "
                f"{MONGO_MAX_DOCUMENT_BYTES:,}: lower max_class_scores, max_detections, max_reasons or the string "
                "limits"
            )
        if self.max_decode_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_decode_pixels ({self.max_decode_pixels}) is below max_image_pixels ({self.max_image_pixels}): "
                "the largest image accepted could never be decoded"
            )
        return self


class DecodeBudget:
    """Pixels being decoded at once, shared by every thread of a process; first come, first served.

    A decode reserves its pixels (:meth:`reserve`) and waits while they do not fit next to the decodes
    already running; waiting in order keeps a large image from being overtaken for ever by small ones.

    Args:
        max_pixels: The budget; a single reservation may not exceed it.
    """

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._cond = threading.Condition()
        self._in_use = 0
        self._queue: deque[object] = deque()
        self.peak = 0  #: the most pixels reserved at once so far (tests, benchmarks)

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block (waits until they fit)."""
        if pixels > self.max_pixels:
            raise ValueError(f"{pixels} pixels exceed the decode budget of {self.max_pixels}")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._in_use + pixels > self.max_pixels:
                self._cond.wait()
            self._queue.popleft()
            self._in_use += pixels
            self.peak = max(self.peak, self._in_use)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= pixels
                self._cond.notify_all()


_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def shared_decode_budget(max_pixels: int) -> DecodeBudget:
    """The process's budget of ``max_pixels`` (one per size, for callers that pass none)."""
    with _budgets_lock:
        budget = _budgets.get(max_pixels)
        if budget is None:
            budget = _budgets[max_pixels] = DecodeBudget(max_pixels)
        return budget


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


class _Animated(ValueError):
    """An animated WebP (refused: a frame is one image)."""


def _webp_chunk_size(fourcc: bytes, body: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a VP8 (lossy, key frame) or VP8L (lossless) chunk's header, as libwebp reads it."""
    if fourcc == b"VP8 ":
        # Frame tag (3 bytes, bit 0 clear on a key frame), start code 9D 01 2A, then 14-bit sizes.
        if len(body) < 10 or body[0] & 1 or body[3:6] != b"\x9d\x01\x2a":
            return None
        return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
    if fourcc == b"VP8L":
        # Signature 0x2F, then width-1 and height-1 in 14 bits each, alpha and a version that must be 0.
        if len(body) < 5 or body[0] != 0x2F:
            return None
        bits = int.from_bytes(body[1:5], "little")
        if bits >> 29:
            return None
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a still WebP, or None when its headers are missing or disagree.

    Simple files hold one VP8 or VP8L chunk; extended ones (VP8X) state a canvas size, which the
    image chunk must match (libwebp refuses a still image that does not). Raises :class:`_Animated`.
    """
    pos, end = 12, len(data)
    canvas: tuple[int, int] | None = None
    while pos + 8 <= end:
        fourcc = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + min(size, 16)]
        if fourcc == b"VP8X" and pos == 12:
            if len(body) < 10:
                return None
            if body[0] & 0x02:
                raise _Animated
            canvas = int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
        elif fourcc in (b"VP8 ", b"VP8L"):
            found = _webp_chunk_size(fourcc, body)
            return found if canvas is None or found == canvas else None
        elif canvas is None:
            return None  # a simple file starts with its image chunk
        pos += 8 + size + (size & 1)
    return None


def _header_size(data: bytes, media_type: str) -> tuple[int, int] | None:
    """The image's size as its header states it (without decoding), or None when unreadable."""
    if media_type == "image/jpeg":
        return _jpeg_size(data)
    if media_type == "image/png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if media_type == "image/webp":
        return _webp_size(data)
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


def _all_in_unit_range(values: np.ndarray) -> bool:
    """Every value in [0, 1] (NaN is not): plain Python for the usual few scores (~0.4 us for 3,
    where numpy's comparisons take ~2 us), numpy for long vectors."""
    if values.size <= 64:
        return all(0.0 <= v <= 1.0 for v in values.tolist())
    return bool(values.min() >= 0.0 and values.max() <= 1.0)


def _check_image(rec: FrameRecord, config: ValidationConfig, budget: DecodeBudget) -> None:
    fid = rec.frame_id
    media_type = rec.media_type or "image/jpeg"
    if media_type not in EXTENSIONS:
        raise _reject(
            RejectCode.BAD_IMAGE,
            f"media_type {clip(rec.media_type)} is not accepted; send {', '.join(EXTENSIONS)}",
            fid,
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
    # The header's own size, before anything is decoded: a decoder allocates what the header says.
    try:
        header = _header_size(data, media_type)
    except _Animated:
        raise _reject(RejectCode.BAD_IMAGE, "the WebP is animated; send one still image per frame", fid) from None
    if header is None:
        raise _reject(RejectCode.BAD_IMAGE, f"the {media_type} header is missing or unreadable", fid)
    if header != (rec.width, rec.height):
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
    with budget.reserve(rec.width * rec.height):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        decoded = None if image is None else image.shape[:2]
        del image  # the bitmap goes before the budget is given back
    if decoded is None:
        raise _reject(RejectCode.BAD_IMAGE, f"the {media_type} data does not decode (corrupt or truncated)", fid)
    h, w = decoded
    if (w, h) != (rec.width, rec.height):
        raise _reject(
            RejectCode.BAD_IMAGE,
            f"the image decodes to {w}x{h} but the frame declares {rec.width}x{rec.height}; "
            "boxes must refer to the uploaded image",
            fid,
        )


def _too_long(field: str, value: str, limit: int, fid: str) -> FrameRejected | None:
    if len(value) <= limit:
        return None
    return _reject(
        RejectCode.FIELD_LIMIT, f"{field} is {len(value):,} characters, above the limit of {limit}: {clip(value)}", fid
    )


def _too_many(field: str, count: int, limit: int, fid: str, fix: str = "") -> FrameRejected | None:
    if count <= limit:
        return None
    return _reject(RejectCode.FIELD_LIMIT, f"{field} holds {count:,} entries, above the limit of {limit}{fix}", fid)


def _check_fields(rec: FrameRecord, config: ValidationConfig) -> None:
    """Every field that can grow against its limit, counts before contents (cheap first)."""
    fid = rec.frame_id
    names = config.max_name_chars
    checks = [
        _too_long("source_id", rec.source_id, names, fid),
        _too_long("source_name", rec.source_name, names, fid),
        _too_long("model_version", rec.model_version, names, fid),
        _too_many("reasons", len(rec.reasons), config.max_reasons, fid),
        _too_many("class_names", len(rec.class_names), config.max_classes, fid),
        _too_many(
            "detections", len(rec.detections), config.max_detections, fid, "; raise the detector's confidence threshold"
        ),
        _too_many("embedding", 0 if rec.embedding is None else rec.embedding.size, config.max_embedding, fid),
    ]
    for err in checks:
        if err is not None:
            raise err
    for i, reason in enumerate(rec.reasons):
        err = _too_long(f"reasons[{i}].trigger", reason.trigger, names, fid) or _too_long(
            f"reasons[{i}].detail", reason.detail, config.max_detail_chars, fid
        )
        if err is not None:
            raise err
    for i, name in enumerate(rec.class_names):
        if (err := _too_long(f"class_names[{i}]", name, names, fid)) is not None:
            raise err
    total = 0
    for i, det in enumerate(rec.detections):
        if (err := _too_long(f"detections[{i}].class_name", det.class_name, names, fid)) is not None:
            raise err
        scores = 0 if det.class_scores is None else det.class_scores.size
        if rec.class_names and scores and scores != len(rec.class_names):
            raise _reject(
                RejectCode.FIELD_LIMIT,
                f"detections[{i}].class_scores holds {scores:,} scores but class_names {len(rec.class_names)}: "
                "send one score per class",
                fid,
            )
        if (err := _too_many(f"detections[{i}].class_scores", scores, config.max_classes, fid)) is not None:
            raise err
        total += scores
    if (err := _too_many("class_scores (all detections)", total, config.max_class_scores, fid)) is not None:
        raise err
    if rec.embedding is not None and not np.isfinite(rec.embedding).all():
        raise _reject(RejectCode.BAD_VALUE, "embedding holds values that are not finite (NaN or infinity)", fid)


def _check_detections(rec: FrameRecord, config: ValidationConfig) -> None:
    fid = rec.frame_id
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
        if det.class_scores is not None and not _all_in_unit_range(det.class_scores):
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
                    f"{where}: class_name {clip(det.class_name)} does not match class_names[{det.class_id}] = "
                    f"{clip(names[det.class_id])}",
                    fid,
                )
        elif det.class_id < 0 or not det.class_name:
            raise _reject(
                RejectCode.UNKNOWN_CLASS, f"{where}: needs a class_id >= 0 and a class_name (or send class_names)", fid
            )


def validate(
    payload: bytes,
    identity: Identity,
    devices: DeviceDirectory,
    config: ValidationConfig,
    budget: DecodeBudget | None = None,
) -> FrameRecord:
    """Parse and check one serialized ``FrameUpload``.

    Args:
        budget: Shared by every decode of the process; default: :func:`shared_decode_budget`.

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
        raise _reject(RejectCode.MALFORMED, f"not a valid edgeloop.v1.FrameUpload ({clip(str(err))})") from err
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
            f"frame_id {clip(fid)} is not a valid id: use 8-64 characters of A-Z a-z 0-9 _ - (a UUID4 hex)",
        )
    if not rec.device_id:
        raise _reject(RejectCode.MISSING_ID, "the frame has no device_id; set the agent's device id", fid)
    if identity.device_id is not None and identity.device_id != rec.device_id:
        raise _reject(
            RejectCode.DEVICE_MISMATCH,
            f"frame says device {clip(rec.device_id)} but the connection is authenticated as "
            f"{clip(identity.device_id)}",
            fid,
        )
    if len(rec.device_id) > MAX_DEVICE_ID_CHARS or not devices.is_active(rec.device_id):
        raise _reject(
            RejectCode.UNKNOWN_DEVICE,
            f"device {clip(rec.device_id)} is not registered or was revoked; register it on the server",
            fid,
        )
    if not math.isfinite(rec.capture_time) or not 0.0 <= rec.capture_time <= MAX_CAPTURE_TIME:
        raise _reject(RejectCode.BAD_VALUE, f"capture_time {rec.capture_time} is not a valid time", fid)
    if rec.sequence > MAX_SEQUENCE:
        raise _reject(RejectCode.BAD_VALUE, f"sequence {rec.sequence} is above {MAX_SEQUENCE}", fid)
    if not _unit(rec.uncertainty):
        raise _reject(RejectCode.BAD_VALUE, f"uncertainty {rec.uncertainty} is outside [0, 1]", fid)
    _check_fields(rec, config)
    for reason in rec.reasons:
        if not _unit(reason.score):
            raise _reject(
                RejectCode.BAD_VALUE, f"reason {clip(reason.trigger)} has score {reason.score} outside [0, 1]", fid
            )
    _check_detections(rec, config)
    _check_image(rec, config, budget if budget is not None else shared_decode_budget(config.max_decode_pixels))
    if not rec.media_type:
        rec.media_type = "image/jpeg"
    return rec

"""The contracts between ingest's parts: who sent a frame, why a frame is refused, and the
core every transport hands frames to.

Error mapping (the same checks run for both transports; see ``core.py``):

=======================  ================================  =====================================
problem                  gRPC                              MQTT bridge
=======================  ================================  =====================================
message too large        RESOURCE_EXHAUSTED (stream ends)  log + counter, dropped (no frame id)
malformed / truncated    INVALID_ARGUMENT (stream ends)    log + counter, dropped (no frame id)
no frame or device id    INVALID_ARGUMENT (stream ends)    log + counter, dropped
unknown/revoked device   PERMISSION_DENIED (stream ends)   log + counter + REJECTED ack
device mismatch          PERMISSION_DENIED (stream ends)   log + counter (topic != payload device)
too many streams of one  UNAVAILABLE (stream ends before  (the broker's per-client limits, see
device                   its first frame; agents retry)    ``server/devices.py``)
stream idle too long     UNAVAILABLE (stream ends)         (the broker's keepalive)
image does not decode    FrameAck REJECTED, stream goes on log + counter + REJECTED ack
boxes outside image      FrameAck REJECTED                 same
unknown class            FrameAck REJECTED                 same
a field over its limit   FrameAck REJECTED (names field)   same
frame id of another      FrameAck REJECTED                 same
device
database refuses the     FrameAck REJECTED                 same
sample's content
storage unavailable      FrameAck RETRY                    RETRY ack (the agent resends), message acked
=======================  ================================  =====================================

"Stream ends" problems concern the whole connection (who is talking, or bytes that are not a
frame at all); per-frame problems are answered per frame so one bad frame does not hold back
the good ones queued behind it. Nothing is written for a frame refused by validation:
validation happens before any byte reaches the media store or the database. The last two
per-frame refusals are the core's, after validation: it writes no file for them, or removes the
one it wrote.

What a client sent is never echoed whole: messages, gRPC status details and log lines carry
at most :data:`ECHO_CHARS` characters of any field (:func:`clip`).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from edgeloop.domain import Ack


class RejectCode(StrEnum):
    """Why a frame was refused; also the ``reason`` label of the rejection counter."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    MISSING_ID = "missing_id"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_MISMATCH = "device_mismatch"
    BAD_IMAGE = "bad_image"
    BOX_OUTSIDE = "box_outside"
    UNKNOWN_CLASS = "unknown_class"
    BAD_VALUE = "bad_value"
    #: A field (string, list, vector) over its limit (``ValidationConfig``); the message names it.
    FIELD_LIMIT = "field_limit"
    #: The frame id belongs to another device (answered without saying so).
    ID_NOT_AVAILABLE = "id_not_available"
    #: The database refused the frame's sample for its content (not because it is down).
    STORAGE_REFUSED = "storage_refused"

    @property
    def fatal_for_stream(self) -> bool:
        """True for problems with the connection rather than with one frame."""
        return self in _STREAM_FATAL


_STREAM_FATAL = frozenset(
    {
        RejectCode.TOO_LARGE,
        RejectCode.MALFORMED,
        RejectCode.MISSING_ID,
        RejectCode.UNKNOWN_DEVICE,
        RejectCode.DEVICE_MISMATCH,
    }
)


#: Longest device id (the agent's ``DEVICE_ID_PATTERN``: 1-64 characters).
MAX_DEVICE_ID_CHARS = 64
#: Most characters of a client's value echoed into a message, a gRPC status or a log line.
ECHO_CHARS = 80
#: Longest rejection message (a backstop: messages are built from clipped values).
MAX_MESSAGE_CHARS = 1000


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long the value was when it is cut.

    For echoing what a client sent: a 1 MB device id must not become a 1 MB status detail (which
    the client cannot even receive) or log line.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}...{size}"


class FrameRejected(Exception):
    """A frame failed validation. ``code`` says which check; the message says what to fix."""

    def __init__(self, code: RejectCode, message: str, frame_id: str = "") -> None:
        text = f"{code.value}: {message}"
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(text)
        self.code = code
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a frame, as established by the transport.

    Attributes:
        transport: ``"grpc"`` or ``"mqtt"``.
        device_id: The authenticated device: the client certificate's common name (gRPC mutual
            TLS) or the device segment of the MQTT topic (which the broker's ACL ties to the
            user). ``None`` when the transport authenticates nobody (insecure development setup).
        peer: The network peer, for logs.
    """

    transport: str
    device_id: str | None
    peer: str = ""


class DeviceDirectory(Protocol):
    """Which devices may send frames (implemented by ``server.devices.DeviceRegistry``)."""

    def is_active(self, device_id: str) -> bool:
        """True for a registered device that has not been revoked."""
        ...


class AllowAllDevices:
    """A directory that accepts every device id: for development setups without registration."""

    def is_active(self, device_id: str) -> bool:
        return True


class Ingestor(Protocol):
    """The one storage path every transport uses."""

    def submit(self, payload: bytes, identity: Identity) -> Future[Ack]:
        """Validate and store one serialized ``FrameUpload``.

        Raises ``FrameRejected`` at once for a frame that fails validation (before anything is
        written). Otherwise returns a future that resolves to an ``Ack`` once the frame is
        durable (``STORED``), was already stored (``DUPLICATE``), or could not be stored now
        (``RETRY``).
        """
        ...

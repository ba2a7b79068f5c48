"""Domain types shared by the edge agent and the server.

Plain dataclasses over numpy, free of protobuf: business code works with these and converts
at the wire in exactly one place (``edgeloop.convert``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels of the frame the detector saw.
        class_id: Index into the model's class names.
        class_name: Human-readable class name.
        confidence: Top-class score in [0, 1].
        class_scores: The full per-class score vector (length = number of classes), or ``None``
            when the backend does not expose it.
    """

    box: tuple[float, float, float, float]
    class_id: int
    class_name: str
    confidence: float
    class_scores: np.ndarray | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


#: The trigger names an agent puts in ``Reason.trigger`` (``edge_agent.triggers.Trigger``), in the
#: order it runs them; the server makes a saved view of the inbox for each.
TRIGGER_NAMES = (
    "confidence_band",
    "margin",
    "entropy",
    "weak_evidence",
    "image_novelty",
    "novelty",
    "flicker",
    "count_jump",
    "random",
)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a frame was kept: the trigger that fired, its score in [0, 1] and a readable detail."""

    trigger: str
    score: float
    detail: str = ""


@dataclass(slots=True)
class Frame:
    """A decoded frame as a source produced it (BGR ``uint8``, OpenCV's layout)."""

    image: np.ndarray
    source_id: str
    index: int
    capture_time: float  # seconds since the epoch
    name: str = ""  # file name or stream position, for logs and the dry-run output
    #: Whether this frame follows the source's previous frame in time (a video, a camera); False for
    #: a folder of unrelated photos, where comparing a frame with the one before means nothing.
    stream: bool = True

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(slots=True)
class FrameRecord:
    """A kept frame on its way to the server: what the outbox stores and the transports send.

    ``image`` holds the encoded bytes; boxes in ``detections`` are in pixels of that encoded image
    (the agent rescales them when it shrinks a frame to its upload size).
    """

    frame_id: str
    device_id: str
    capture_time: float
    sequence: int
    model_version: str
    image: bytes
    media_type: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)
    uncertainty: float = 0.0
    reasons: list[Reason] = field(default_factory=list)
    source_id: str = ""
    class_names: list[str] = field(default_factory=list)
    #: The model's image embedding of the frame (``float32``, as the model outputs it), or ``None``
    #: when the model exports none; see :mod:`edgeloop.embedding`.
    embedding: np.ndarray | None = None
    #: Where the frame was at its source: a file name, or ``"<source_id>#<index>"`` in a stream.
    source_name: str = ""


class AckStatus:
    """The receiver's verdict on one frame (mirrors ``edgeloop.v1.AckStatus``)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    RETRY = "retry"

    #: Verdicts after which the agent may forget the frame.
    FINAL = frozenset({STORED, DUPLICATE})


@dataclass(frozen=True, slots=True)
class Ack:
    frame_id: str
    status: str
    message: str = ""

    @property
    def durable(self) -> bool:
        """True when the frame is stored for good at the receiver (stored now or before)."""
        return self.status in AckStatus.FINAL


@dataclass(slots=True)
class DeviceStatus:
    """What a device reports in its heartbeat."""

    device_id: str
    time: float
    model_version: str
    outbox_depth: int
    outbox_bytes: int
    counters: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    agent_version: str = ""
    channel: str = ""


@dataclass(slots=True)
class Release:
    """A model release as the fleet sees it (mirrors ``edgeloop.v1.ModelRelease``).

    ``signature`` is Ed25519 over the fields listed in ``edgeloop.releases`` (channel excluded, so a
    promotion keeps it valid). ``created`` is seconds since the epoch; the registry uses whole
    seconds, which survive the trip through a protobuf ``Timestamp`` exactly and so keep the
    signature verifiable after a round trip.
    """

    version: str
    artifact_sha256: str
    artifact_size: int
    class_names: list[str]
    imgsz: int
    created: float
    signature: bytes = b""
    channel: str = ""
    parent_version: str = ""
    dataset_version: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifact_uri: str = ""

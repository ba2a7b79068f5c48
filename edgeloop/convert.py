"""The one place where protobuf messages and domain objects are converted.

Everything that crosses the network goes through these functions, so a wire change touches one
module. Serialization of an upload is deterministic, which keeps outbox entries and redeliveries
byte-identical.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.domain import Ack, AckStatus, Detection, DeviceStatus, FrameRecord, Reason, Release
from edgeloop.v1 import frames_pb2 as pb
from edgeloop.v1 import models_pb2

_ACK_TO_PB = {
    AckStatus.STORED: pb.ACK_STATUS_STORED,
    AckStatus.DUPLICATE: pb.ACK_STATUS_DUPLICATE,
    AckStatus.REJECTED: pb.ACK_STATUS_REJECTED,
    AckStatus.RETRY: pb.ACK_STATUS_RETRY,
}
_ACK_FROM_PB = {v: k for k, v in _ACK_TO_PB.items()}


def timestamp_from_seconds(seconds: float) -> Timestamp:
    ts = Timestamp()
    whole = int(seconds // 1)
    ts.seconds = whole
    ts.nanos = int(round((seconds - whole) * 1e9)) % 1_000_000_000
    return ts


def seconds_from_timestamp(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def detection_to_pb(det: Detection) -> pb.Detection:
    x1, y1, x2, y2 = det.box
    msg = pb.Detection(
        box=pb.Box(x1=x1, y1=y1, x2=x2, y2=y2),
        class_id=det.class_id,
        class_name=det.class_name,
        confidence=det.confidence,
    )
    if det.class_scores is not None:
        msg.class_scores.extend(np.asarray(det.class_scores, dtype=np.float32).tolist())
    return msg


def detection_from_pb(msg: pb.Detection) -> Detection:
    scores = np.asarray(msg.class_scores, dtype=np.float32) if len(msg.class_scores) else None
    return Detection(
        box=(msg.box.x1, msg.box.y1, msg.box.x2, msg.box.y2),
        class_id=msg.class_id,
        class_name=msg.class_name,
        confidence=msg.confidence,
        class_scores=scores,
    )


def frame_to_pb(rec: FrameRecord) -> pb.FrameUpload:
    return pb.FrameUpload(
        frame_id=rec.frame_id,
        device_id=rec.device_id,
        capture_time=timestamp_from_seconds(rec.capture_time),
        sequence=rec.sequence,
        model_version=rec.model_version,
        image=pb.EncodedImage(data=rec.image, media_type=rec.media_type, width=rec.width, height=rec.height),
        detections=[detection_to_pb(d) for d in rec.detections],
        uncertainty=rec.uncertainty,
        reasons=[pb.Reason(trigger=r.trigger, score=r.score, detail=r.detail) for r in rec.reasons],
        source_id=rec.source_id,
        class_names=rec.class_names,
        embedding=[] if rec.embedding is None else np.asarray(rec.embedding, dtype=np.float32).ravel().tolist(),
        source_name=rec.source_name,
    )


def frame_from_pb(msg: pb.FrameUpload) -> FrameRecord:
    return FrameRecord(
        frame_id=msg.frame_id,
        device_id=msg.device_id,
        capture_time=seconds_from_timestamp(msg.capture_time),
        sequence=msg.sequence,
        model_version=msg.model_version,
        image=msg.image.data,
        media_type=msg.image.media_type,
        width=msg.image.width,
        height=msg.image.height,
        detections=[detection_from_pb(d) for d in msg.detections],
        uncertainty=msg.uncertainty,
        reasons=[Reason(trigger=r.trigger, score=r.score, detail=r.detail) for r in msg.reasons],
        source_id=msg.source_id,
        class_names=list(msg.class_names),
        embedding=np.asarray(msg.embedding, dtype=np.float32) if len(msg.embedding) else None,
        source_name=msg.source_name,
    )


def serialize_frame(rec: FrameRecord) -> bytes:
    """The frame's wire bytes (deterministic, so a resend is byte-identical)."""
    return frame_to_pb(rec).SerializeToString(deterministic=True)


def parse_frame(payload: bytes) -> FrameRecord:
    """Parse wire bytes; raises ``google.protobuf.message.DecodeError`` on malformed input."""
    msg = pb.FrameUpload()
    msg.ParseFromString(payload)
    return frame_from_pb(msg)


def ack_to_pb(ack: Ack) -> pb.FrameAck:
    return pb.FrameAck(frame_id=ack.frame_id, status=_ACK_TO_PB[ack.status], message=ack.message)


def ack_from_pb(msg: pb.FrameAck) -> Ack:
    return Ack(frame_id=msg.frame_id, status=_ACK_FROM_PB.get(msg.status, AckStatus.RETRY), message=msg.message)


def device_status_to_pb(status: DeviceStatus) -> pb.DeviceStatus:
    return pb.DeviceStatus(
        device_id=status.device_id,
        time=timestamp_from_seconds(status.time),
        model_version=status.model_version,
        outbox_depth=status.outbox_depth,
        outbox_bytes=status.outbox_bytes,
        counters=status.counters,
        last_error=status.last_error,
        agent_version=status.agent_version,
        channel=status.channel,
    )


def device_status_from_pb(msg: pb.DeviceStatus) -> DeviceStatus:
    return DeviceStatus(
        device_id=msg.device_id,
        time=seconds_from_timestamp(msg.time),
        model_version=msg.model_version,
        outbox_depth=msg.outbox_depth,
        outbox_bytes=msg.outbox_bytes,
        counters=dict(msg.counters),
        last_error=msg.last_error,
        agent_version=msg.agent_version,
        channel=msg.channel,
    )


def release_to_pb(release: Release) -> models_pb2.ModelRelease:
    return models_pb2.ModelRelease(
        version=release.version,
        channel=release.channel,
        created=timestamp_from_seconds(release.created),
        artifact_size=release.artifact_size,
        artifact_sha256=release.artifact_sha256,
        signature=release.signature,
        class_names=release.class_names,
        imgsz=release.imgsz,
        parent_version=release.parent_version,
        dataset_version=release.dataset_version,
        metrics=release.metrics,
        artifact_uri=release.artifact_uri,
    )


def release_from_pb(msg: models_pb2.ModelRelease) -> Release:
    return Release(
        version=msg.version,
        channel=msg.channel,
        created=seconds_from_timestamp(msg.created),
        artifact_size=msg.artifact_size,
        artifact_sha256=msg.artifact_sha256,
        signature=msg.signature,
        class_names=list(msg.class_names),
        imgsz=msg.imgsz,
        parent_version=msg.parent_version,
        dataset_version=msg.dataset_version,
        metrics=dict(msg.metrics),
        artifact_uri=msg.artifact_uri,
    )


def serialize_release(release: Release) -> bytes:
    """The release's wire bytes (deterministic: the same release is announced byte-identically)."""
    return release_to_pb(release).SerializeToString(deterministic=True)


def parse_release(payload: bytes) -> models_pb2.ModelRelease:
    """Parse an announced release; raises ``google.protobuf.message.DecodeError`` on malformed input.

    Returns the protobuf message, not a :class:`Release`: signatures are verified on the message as
    received (``edgeloop.releases.verify_release``), before anything is converted or acted upon.
    """
    msg = models_pb2.ModelRelease()
    msg.ParseFromString(payload)
    return msg


def peek_frame_id(payload: bytes) -> str:
    """The ``frame_id`` of a serialized ``FrameUpload`` without parsing the rest, or ``""``.

    For answering a message too large to parse: field 1 comes first in the agent's deterministic
    serialization, so only its few bytes are read. Returns ``""`` when the message does not start
    with a short, printable field 1 (any other sender, or garbage).
    """
    if not payload or payload[0] != 0x0A:  # field 1, length-delimited
        return ""
    length, shift, pos = 0, 0, 1
    while pos < min(len(payload), 3):  # a frame id is far shorter than 2**14 bytes
        byte = payload[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    else:
        return ""
    raw = payload[pos : pos + length]
    if not 0 < length <= 128 or len(raw) != length:
        return ""
    try:
        frame_id = raw.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return frame_id if frame_id.isprintable() else ""

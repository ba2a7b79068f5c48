import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_STORED: _ClassVar[AckStatus]
    ACK_STATUS_DUPLICATE: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]
    ACK_STATUS_RETRY: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_STORED: AckStatus
ACK_STATUS_DUPLICATE: AckStatus
ACK_STATUS_REJECTED: AckStatus
ACK_STATUS_RETRY: AckStatus

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "class_id", "class_name", "confidence", "class_scores")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    box: Box
    class_id: int
    class_name: str
    confidence: float
    class_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., confidence: _Optional[float] = ..., class_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data", "media_type", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("trigger", "score", "detail")
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    trigger: str
    score: float
    detail: str
    def __init__(self, trigger: _Optional[str] = ..., score: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class FrameUpload(_message.Message):
    __slots__ = ("frame_id", "device_id", "capture_time", "sequence", "model_version", "image", "detections", "uncertainty", "reasons", "source_id", "class_names", "embedding", "source_name")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    device_id: str
    capture_time: _timestamp_pb2.Timestamp
    sequence: int
    model_version: str
    image: EncodedImage
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    uncertainty: float
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    source_id: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    source_name: str
    def __init__(self, frame_id: _Optional[str] = ..., device_id: _Optional[str] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[EncodedImage, _Mapping]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., uncertainty: _Optional[float] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., source_id: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., embedding: _Optional[_Iterable[float]] = ..., source_name: _Optional[str] = ...) -> None: ...

class FrameAck(_message.Message):
    __slots__ = ("frame_id", "status", "message")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    status: AckStatus
    message: str
    def __init__(self, frame_id: _Optional[str] = ..., status: _Optional[_Union[AckStatus, str]] = ..., message: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "time", "model_version", "outbox_depth", "outbox_bytes", "counters", "last_error", "agent_version", "channel")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    time: _timestamp_pb2.Timestamp
    model_version: str
    outbox_depth: int
    outbox_bytes: int
    counters: _containers.ScalarMap[str, int]
    last_error: str
    agent_version: str
    channel: str
    def __init__(self, device_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[str] = ..., outbox_depth: _Optional[int] = ..., outbox_bytes: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., last_error: _Optional[str] = ..., agent_version: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

"""The gRPC side of ingest: the ``edgeloop.v1.Ingest`` service and the server that hosts it.

``UploadFrames`` is a bidirectional stream. The servicer hands each request's exact wire bytes
to the :class:`~server.ingest.base.Ingestor` (no deserialization here: the core parses, and what
it stores is byte-identical to what left the device) and answers one ``FrameAck`` per frame, in
the order the frames came. Reading runs ahead of storing: a reader thread per stream submits
frames as they arrive while the handler waits for their futures, so the core can store many
frames of one stream in one batch. At most ``max_outstanding_per_stream`` frames of a stream
are waiting for storage at once; past that the reader stops reading and HTTP/2 flow control
slows the sender down.

Errors follow the table in ``base.py``: a per-frame problem (image, boxes, class) is answered
with a ``REJECTED`` ack whose message is ``"<code>: <detail>"`` and the stream goes on; a problem
with the connection itself (bytes that are not a frame, a frame too large, an unknown device,
a device speaking for another) ends the stream with ``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``
or ``PERMISSION_DENIED`` once the acks of the frames before it are sent. Messages above
``max_message_bytes`` never reach the servicer: gRPC itself ends the call with
``RESOURCE_EXHAUSTED`` (after the acks already sent) and they are not counted in
``frames_rejected``: the servicer only sees the call end. Every refusal the servicer sees is
counted as ``frames_rejected{transport="grpc", reason=<code>}`` and logged.

Identity: with mutual TLS the client certificate's common name is the device id; the stream
(and a heartbeat) is refused with ``PERMISSION_DENIED`` before any frame is read when that
device is not active. Without a client certificate the identity names no device and the core
checks the device id each frame claims against the device directory.

Fairness: gRPC serves at most ``max_concurrent_streams`` calls at once, one thread each, so one
device holding them all would lock every other device out. A device may hold at most
``max_streams_per_device`` upload streams at once (counted from the certificate at the start of
the call, or without one from the device id the stream's first frame claims, read from its
first bytes by :func:`peek_device_id`); one more is ended with ``UNAVAILABLE`` (the
agent retries later) before any frame of it is stored. A stream that has no frame waiting for
its ack and receives none for ``stream_idle_timeout_s`` is ended with ``UNAVAILABLE`` too, so
idle streams (which have not sent a frame yet, or stopped half-way without closing) give their
slot back. The timeout must exceed the time a device needs to send its largest frame. Without
certificates the count trusts the device id a frame claims: per-device fairness against a
*hostile* device needs mutual TLS (against one that opens streams and sends nothing, the idle
timeout is what frees the slots).

Heartbeats are held to the limits of :mod:`server.ingest.heartbeats` (``INVALID_ARGUMENT`` or
``RESOURCE_EXHAUSTED`` name the field); what a client sent is clipped in every status detail
and log line (:func:`server.ingest.base.clip`).

:func:`build_grpc_server` makes the ``grpc.Server`` (address, limits, keepalive, TLS) and lets
each caller-supplied adder register its services on it: ingest and the model registry share
one port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from pydantic import Field, model_validator

from edgeloop.config_base import ConfigError, StrictModel
from edgeloop.convert import ack_to_pb, device_status_from_pb, timestamp_from_seconds
from edgeloop.domain import Ack, AckStatus
from edgeloop.v1 import frames_pb2
from server.ingest.base import (
    MAX_DEVICE_ID_CHARS,
    AllowAllDevices,
    DeviceDirectory,
    FrameRejected,
    Identity,
    Ingestor,
    RejectCode,
    clip,
)
from server.ingest.heartbeats import HeartbeatRejected, HeartbeatStore, bound_status, check_heartbeat_size
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_SERVICE = frames_pb2.DESCRIPTOR.services_by_name["Ingest"]
TRANSPORT = "grpc"
_MIB = 1024 * 1024

#: The gRPC status that ends a stream for each stream-fatal rejection (see ``base.py``).
STATUS_FOR_CODE: dict[RejectCode, grpc.StatusCode] = {
    RejectCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectCode.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    RejectCode.MISSING_ID: grpc.StatusCode.INVALID_ARGUMENT,
    RejectCode.UNKNOWN_DEVICE: grpc.StatusCode.PERMISSION_DENIED,
    RejectCode.DEVICE_MISMATCH: grpc.StatusCode.PERMISSION_DENIED,
}


class ServerTLSConfig(StrictModel):
    """TLS for the gRPC server; with ``client_ca_file`` devices authenticate by certificate (mutual TLS)."""

    cert_file: Path = Field(description="The server's certificate chain (PEM), valid for the name devices dial.")
    key_file: Path = Field(description="The private key of cert_file (PEM).")
    client_ca_file: Path | None = Field(
        default=None,
        description=(
            "PEM bundle of the CA(s) that sign device certificates. Set it for mutual TLS: the certificate's "
            "common name is then the device id, and a device may only send frames and heartbeats as itself."
        ),
    )
    require_client_auth: bool = Field(
        default=True,
        description=(
            "With client_ca_file: refuse connections without a valid client certificate (the TLS handshake "
            "fails, devices see UNAVAILABLE). False lets certificate-less clients in, identified by nothing."
        ),
    )


class GrpcServerConfig(StrictModel):
    """The gRPC server that hosts ingest (and the model registry) for the fleet."""

    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on; loopback by default, '0.0.0.0' or '[::]' to serve the network.",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="TCP port; 0 picks a free one (tests).")
    tls: ServerTLSConfig | None = Field(
        default=None, description="TLS settings; without them the server speaks plaintext (trusted networks only)."
    )
    max_message_bytes: int = Field(
        default=16 * _MIB,
        ge=64 * 1024,
        description=(
            "Largest message accepted (one serialized frame). Bigger ones end the stream with RESOURCE_EXHAUSTED "
            "before the server reads them; the agents' own limit must not be lower than their largest frame."
        ),
    )
    max_workers: int = Field(
        default=32,
        ge=2,
        description="Threads serving calls; every open UploadFrames stream holds one (plus a reader thread).",
    )
    max_concurrent_streams: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Calls (streams and heartbeats) served at once across all connections; more are refused with "
            "RESOURCE_EXHAUSTED, which agents retry. Defaults to max_workers, so no call waits for a thread."
        ),
    )
    max_streams_per_device: int = Field(
        default=8,
        ge=1,
        description=(
            "Upload streams one device may hold open at once in this process; one more is ended with "
            "UNAVAILABLE (the agent retries). Keeps one device from taking every stream slot: it is held below "
            "max_concurrent_streams. Must be at least the agents' transport.connections."
        ),
    )
    stream_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "An upload stream with no frame waiting for its ack that receives no frame for this long is ended "
            "with UNAVAILABLE, giving its slot back; must exceed the time a device needs to send its largest frame."
        ),
    )
    max_outstanding_per_stream: int = Field(
        default=256,
        ge=1,
        description=(
            "Frames of one stream read and submitted but not yet acknowledged; past it the server stops "
            "reading until storage catches up (bounds memory per stream, lets the core batch up to it)."
        ),
    )
    min_ping_interval_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Shortest interval between client keepalive pings the server tolerates "
            "(grpc.http2.min_recv_ping_interval_without_data_ms); must not exceed the agents' keepalive_time_s "
            "(60 s by default), or the server closes their connections for 'too many pings'."
        ),
    )
    permit_keepalive_without_calls: bool = Field(
        default=True, description="Accept keepalive pings on connections with no call in flight (idle agents)."
    )
    keepalive_time_s: float = Field(
        default=120.0, gt=0, description="The server pings each connection this often to find dead peers."
    )
    keepalive_timeout_s: float = Field(
        default=20.0, gt=0, description="A server ping unanswered this long closes the connection."
    )
    grace_s: float = Field(
        default=5.0, ge=0, description="On shutdown, how long calls in flight may finish before they are cancelled."
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Close each connection (HTTP/2 GOAWAY) once it is this old; the agent reconnects, and the new "
            "connection may land on another ingest process (workers) or on another server behind a TCP load "
            "balancer, so a few busy devices do not stay stacked on one. None: connections live as long as the "
            "agent keeps them."
        ),
    )
    max_connection_age_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="After max_connection_age_s, how long calls in flight may finish before they are cancelled.",
    )

    @model_validator(mode="after")
    def _streams_fit_workers(self) -> GrpcServerConfig:
        if self.max_concurrent_streams is not None and self.max_concurrent_streams > self.max_workers:
            raise ValueError(
                f"max_concurrent_streams ({self.max_concurrent_streams}) exceeds max_workers ({self.max_workers}): "
                "calls over the thread count would hang instead of being refused"
            )
        return self

    @property
    def concurrent_calls(self) -> int:
        """Calls served at once (``max_concurrent_streams``, default ``max_workers``)."""
        return self.max_concurrent_streams or self.max_workers

    @property
    def streams_per_device(self) -> int:
        """``max_streams_per_device``, but below :attr:`concurrent_calls`: another device always finds a slot."""
        return max(1, min(self.max_streams_per_device, self.concurrent_calls - 1))


class ServerStartError(Exception):
    """The gRPC server could not listen (address in use, bad host, unreadable TLS files)."""


# -- the servicer -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _End:
    """The end of a stream's input: normal (``status is None``) or a status that ends the call."""

    status: grpc.StatusCode | None = None
    message: str = ""


class _Stream:
    """One UploadFrames call: the reader thread appends, the handler pops in order.

    Entries are an ``Ack`` (answered at once), a ``Future[Ack]`` (waiting for storage), or an
    ``_End``. Everything is guarded by one condition, so the handler never polls. The handler is
    woken only when the head entry becomes ready (appended ready to an empty stream, or its
    future completed) or the call ends: the ingest core completes futures in batches, so one
    wake-up answers a whole batch, where waking on every append and every completion cost two
    context switches per frame.
    """

    def __init__(self, max_outstanding: int) -> None:
        self.max_outstanding = max_outstanding
        self.cond = threading.Condition()
        self.entries: deque[Ack | Future[Ack] | _End] = deque()
        self.terminated = False  # the call ended (client cancel, deadline, server stop)
        self.last_activity = time.monotonic()  # last frame read or ack taken
        self.device: str | None = None  # the device whose slot this stream holds

    def claim(self, slots: _DeviceSlots, device: str) -> bool:
        """Take one of ``device``'s stream slots for this stream; False when it has none left or the
        call ended (under the stream's lock, so :meth:`release` cannot miss it)."""
        with self.cond:
            if self.terminated or not slots.acquire(device):
                return False
            self.device = device
            return True

    def release(self, slots: _DeviceSlots) -> None:
        with self.cond:
            device, self.device = self.device, None
        if device is not None:
            slots.release(device)

    def _completed(self, future: Future[Ack]) -> None:
        with self.cond:
            if self.entries and self.entries[0] is future:
                self.cond.notify_all()

    def terminate(self) -> None:
        with self.cond:
            self.terminated = True
            self.cond.notify_all()

    def wait_for_room(self) -> bool:
        """Wait while ``max_outstanding`` entries are queued; False once the call ended."""
        with self.cond:
            while len(self.entries) >= self.max_outstanding and not self.terminated:
                self.cond.wait()
            return not self.terminated

    def append(self, entry: Ack | Future[Ack] | _End) -> None:
        pending = isinstance(entry, Future)
        with self.cond:
            self.last_activity = time.monotonic()
            self.entries.append(entry)
            if len(self.entries) == 1 and not pending:
                self.cond.notify_all()
        if pending:
            entry.add_done_callback(self._completed)  # runs at once if it is already done

    def next_ready(self, idle_timeout: float) -> Ack | Future[Ack] | _End | None:
        """The first entry once it is ready (in order); None once the call ended; :data:`_IDLE`
        when nothing was waiting and nothing came for ``idle_timeout`` seconds."""
        with self.cond:
            while True:
                if self.terminated:
                    return None
                if self.entries:
                    head = self.entries[0]
                    if not isinstance(head, Future) or head.done():
                        self.entries.popleft()
                        self.last_activity = time.monotonic()
                        if len(self.entries) == self.max_outstanding - 1:
                            self.cond.notify_all()  # room for a reader waiting at the bound
                        return head
                    self.cond.wait()
                    continue
                left = self.last_activity + idle_timeout - time.monotonic()
                if left <= 0:
                    return _IDLE
                self.cond.wait(left)


#: What :meth:`_Stream.next_ready` returns for a stream idle too long.
_IDLE = _End(grpc.StatusCode.UNAVAILABLE, "idle")


class _DeviceSlots:
    """Upload streams open per device, capped; thread-safe."""

    def __init__(self, per_device: int) -> None:
        self.per_device = per_device
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, device: str) -> bool:
        with self._lock:
            count = self._open.get(device, 0)
            if count >= self.per_device:
                return False
            self._open[device] = count + 1
            return True

    def release(self, device: str) -> None:
        with self._lock:
            count = self._open.get(device, 0) - 1
            if count > 0:
                self._open[device] = count
            else:
                self._open.pop(device, None)

    def open(self, device: str) -> int:
        """Streams ``device`` holds now."""
        with self._lock:
            return self._open.get(device, 0)


class IngestServicer:
    """``edgeloop.v1.Ingest`` over an :class:`Ingestor`; see the module docstring.

    Args:
        ingestor: Validates and stores frames (``server.ingest.core.IngestCore``).
        metrics: Counts frames received and refused here (transport ``"grpc"``) and heartbeats.
        heartbeats: Where device statuses go.
        devices: Which devices may talk; checked up front for certificate-authenticated streams.
        max_outstanding_per_stream: Frames read ahead of their acks per stream.
        max_streams_per_device: Upload streams one device may hold at once.
        stream_idle_timeout_s: An upload stream idle this long is ended.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        metrics: ServerMetrics,
        heartbeats: HeartbeatStore,
        devices: DeviceDirectory | None = None,
        max_outstanding_per_stream: int = 256,
        max_streams_per_device: int = 8,
        stream_idle_timeout_s: float = 60.0,
    ) -> None:
        self.ingestor = ingestor
        self.metrics = metrics
        self.heartbeats = heartbeats
        self.devices = devices if devices is not None else AllowAllDevices()
        self.max_outstanding_per_stream = max_outstanding_per_stream
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.slots = _DeviceSlots(max_streams_per_device)

    @classmethod
    def from_config(cls, ingestor: Ingestor, config: GrpcServerConfig, **kwargs: object) -> IngestServicer:
        """A servicer with the per-stream limits of ``config`` (``kwargs``: the other arguments)."""
        return cls(
            ingestor,
            max_outstanding_per_stream=config.max_outstanding_per_stream,
            max_streams_per_device=config.streams_per_device,
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            **kwargs,  # type: ignore[arg-type]
        )

    def add_to_server(self, server: grpc.Server) -> None:
        """Register the service (pass this method to :func:`build_grpc_server`)."""
        # UploadFrames' requests stay bytes (no request deserializer): the core parses them
        # itself and stores exactly what the device sent.
        handlers = {
            "UploadFrames": grpc.stream_stream_rpc_method_handler(
                self.UploadFrames,
                request_deserializer=None,
                response_serializer=frames_pb2.FrameAck.SerializeToString,
            ),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self.Heartbeat,
                # Parsed in the handler, which can say what is wrong (gRPC would answer a bare INTERNAL).
                request_deserializer=None,
                response_serializer=frames_pb2.HeartbeatReply.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))

    # -- UploadFrames ------------------------------------------------------------------------

    def UploadFrames(  # noqa: N802 - the RPC's name
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[frames_pb2.FrameAck]:
        identity = self._identity(context)
        self._check_certificate_device(identity, context, count=True)
        stream = _Stream(self.max_outstanding_per_stream)
        if not context.add_callback(stream.terminate):
            return
        try:
            if identity.device_id is not None and not stream.claim(self.slots, identity.device_id):
                self._refuse_stream(identity, context)
            reader = threading.Thread(
                target=self._read,
                args=(request_iterator, identity, stream),
                name=f"grpc-ingest-read-{clip(identity.device_id or identity.peer, 40)}",
                daemon=True,
            )
            reader.start()
            while (entry := stream.next_ready(self.stream_idle_timeout_s)) is not None:
                if entry is _IDLE:
                    idle = self.stream_idle_timeout_s
                    logger.info("gRPC stream from %s idle for %.0f s; ended", _who(identity), idle)
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no frame for {self.stream_idle_timeout_s:g} s: the idle stream was closed; open a new one "
                        "to send more",
                    )
                if isinstance(entry, _End):
                    if entry.status is not None:
                        context.abort(entry.status, entry.message)
                    return
                if isinstance(entry, Future):
                    try:
                        entry = entry.result()
                    except Exception as err:
                        # The core promised an Ack. Without one this frame is not known to be
                        # stored; ending the call keeps it, and every frame after it, in the
                        # agent's outbox for a resend (answered DUPLICATE where it was stored).
                        logger.exception("gRPC: storing a frame from %s failed", _who(identity))
                        context.abort(
                            grpc.StatusCode.INTERNAL,
                            f"server error while storing a frame ({type(err).__name__}); unacknowledged frames "
                            "should be sent again",
                        )
                yield ack_to_pb(entry)
        finally:
            # Also reached when the call is cancelled mid-way: release a reader waiting for room.
            stream.terminate()
            stream.release(self.slots)

    def _refuse_stream(self, identity: Identity, context: grpc.ServicerContext) -> None:
        logger.warning(
            "gRPC stream from %s refused: the device already holds %d upload streams",
            _who(identity),
            self.slots.per_device,
        )
        context.abort(grpc.StatusCode.UNAVAILABLE, self._too_many_streams(identity.device_id or ""))

    def _too_many_streams(self, device: str) -> str:
        return (
            f"device {clip(device)} already holds {self.slots.per_device} upload streams, the most one device may "
            "hold at once: send over fewer connections, or retry once one has finished"
        )

    def _read(self, request_iterator: Iterator[bytes], identity: Identity, stream: _Stream) -> None:
        # Room is awaited *before* reading: a stream at its bound leaves the next frame unread,
        # and HTTP/2 flow control then holds the sender back.
        count = 0
        end = _End()
        requests = iter(request_iterator)
        try:
            while stream.wait_for_room():
                try:
                    payload = next(requests)
                except StopIteration:
                    break
                self.metrics.frames_received.labels(TRANSPORT).inc()
                # No certificate: the stream counts as one of the device its first frame names.
                device = peek_device_id(payload) if count == 0 and identity.device_id is None else ""
                if device and len(device) <= MAX_DEVICE_ID_CHARS and not stream.claim(self.slots, device):
                    end = _End(grpc.StatusCode.UNAVAILABLE, self._too_many_streams(device))
                    logger.warning("gRPC stream from %s refused: too many streams of the device", _who(identity))
                    break
                try:
                    entry: Ack | Future[Ack] = self.ingestor.submit(payload, identity)
                except FrameRejected as err:
                    self.metrics.frames_rejected.labels(TRANSPORT, err.code.value).inc()
                    if err.code.fatal_for_stream:
                        logger.warning("gRPC stream from %s ended: %s", _who(identity), err)
                        end = _End(STATUS_FOR_CODE[err.code], _fatal_message(err, count))
                        break
                    logger.warning("gRPC frame %s from %s rejected: %s", err.frame_id, _who(identity), err)
                    entry = Ack(err.frame_id, AckStatus.REJECTED, str(err))
                count += 1
                stream.append(entry)
        except grpc.RpcError:
            # The call ended under us (client cancelled, deadline, oversized message, shutdown);
            # the handler sees the termination.
            return
        except Exception:
            # A bug in the core must not leave the handler waiting for an end that never comes.
            logger.exception("gRPC stream from %s: unexpected error while submitting", _who(identity))
            end = _End(grpc.StatusCode.INTERNAL, "server error while accepting a frame; send it again later")
        stream.append(end)

    # -- Heartbeat ---------------------------------------------------------------------------

    def Heartbeat(  # noqa: N802 - the RPC's name
        self, payload: bytes, context: grpc.ServicerContext
    ) -> frames_pb2.HeartbeatReply:
        identity = self._identity(context)
        self._check_certificate_device(identity, context)
        try:
            check_heartbeat_size(len(payload))
        except HeartbeatRejected as err:
            self._refuse_heartbeat(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large", f"{err}", identity)
        try:
            request = frames_pb2.DeviceStatus.FromString(payload)
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed heartbeat: send a serialized DeviceStatus")
        device_id = request.device_id
        if not device_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "heartbeat without device_id: set DeviceStatus.device_id")
        if identity.device_id is not None and device_id != identity.device_id:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"heartbeat for device {clip(device_id)} on a connection authenticated as "
                f"{clip(identity.device_id)}: a device may only report for itself",
            )
        unknown = len(device_id) > MAX_DEVICE_ID_CHARS or not self.devices.is_active(device_id)
        if identity.device_id is None and unknown:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"device {clip(device_id)} is not registered or was revoked: register it on the server",
            )
        try:
            status = bound_status(device_status_from_pb(request))
        except HeartbeatRejected as err:
            self._refuse_heartbeat(context, grpc.StatusCode.INVALID_ARGUMENT, "field_limit", str(err), identity)
        self.heartbeats.record(status)
        self.metrics.heartbeats.inc()
        return frames_pb2.HeartbeatReply(server_time=timestamp_from_seconds(time.time()))

    def _refuse_heartbeat(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str, identity: Identity
    ) -> None:
        self.metrics.heartbeats_rejected.labels(TRANSPORT, reason).inc()
        logger.warning("gRPC heartbeat from %s refused: %s", _who(identity), message)
        context.abort(code, f"heartbeat refused: {message}")

    # -- identity ----------------------------------------------------------------------------

    @staticmethod
    def _identity(context: grpc.ServicerContext) -> Identity:
        auth = context.auth_context() or {}
        names = auth.get("x509_common_name") or []
        device_id = names[0].decode("utf-8", "replace") if names else None
        return Identity(transport=TRANSPORT, device_id=device_id or None, peer=context.peer() or "")

    def _check_certificate_device(
        self, identity: Identity, context: grpc.ServicerContext, *, count: bool = False
    ) -> None:
        """Abort with PERMISSION_DENIED when the client certificate names a device that may not send.

        A directory with ``verify_peer`` (``server.devices.DeviceRegistry``) also refuses an
        outdated certificate of an active device id (revoked, then added again); otherwise the
        certificate's common name must be an active device.
        """
        if identity.device_id is None:
            return
        verify_peer = getattr(self.devices, "verify_peer", None)
        if callable(verify_peer):
            allowed = verify_peer(context.auth_context()) == identity.device_id
        else:
            allowed = self.devices.is_active(identity.device_id)
        if allowed:
            return
        if count:
            self.metrics.frames_rejected.labels(TRANSPORT, RejectCode.UNKNOWN_DEVICE.value).inc()
        logger.warning("gRPC call from %s refused: device not active", _who(identity))
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"device {clip(identity.device_id)} (the client certificate's common name) is not registered, was "
            "revoked, or presents an outdated certificate: register the device on the server and install "
            "its current certificate",
        )


def _fatal_message(err: FrameRejected, frames_before: int) -> str:
    return f"{err} (stream closed after {frames_before} frame(s); the frames sent after it were not read)"


def _who(identity: Identity) -> str:
    peer = clip(identity.peer, 60) if identity.peer else "unknown peer"
    return f"{clip(identity.device_id)} ({peer})" if identity.device_id else peer


def peek_device_id(payload: bytes) -> str:
    """The ``device_id`` (field 2) of a serialized ``FrameUpload`` without parsing the message, or ``""``.

    Walks the fields before it (the agent writes fields in number order, so only ``frame_id``),
    skipping each by its length; ``""`` when the bytes are not a well-formed field sequence up to
    a field 2 that is valid UTF-8. Costs microseconds whatever the message's size.
    """
    pos, end = 0, len(payload)
    for _ in range(16):  # field 2 comes second; a few unknown fields before it are tolerated
        tag, pos = _varint(payload, pos)
        if tag is None:
            return ""
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(payload, pos)
            if length is None or pos + length > end:
                return ""
            if field == 2:
                try:
                    return payload[pos : pos + length].decode("utf-8")
                except UnicodeDecodeError:
                    return ""
            pos += length
        elif wire == 0:
            _, pos = _varint(payload, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return ""
        if pos > end:
            return ""
    return ""


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


# -- the server -------------------------------------------------------------------------------

#: Registers services on a server, e.g. ``IngestServicer(...).add_to_server``.
ServicerAdder = Callable[[grpc.Server], None]


def server_options(config: GrpcServerConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The channel arguments :func:`build_grpc_server` uses (message limits, keepalive)."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Acks are tiny; the send limit only matters to services sharing the port (the registry).
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.min_ping_interval_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(config.permit_keepalive_without_calls)),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # without error and silently take half the connections. Only a server's own ingest
        # workers (server.workers) share the port on purpose.
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if config.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)))
    return options


def build_grpc_server(
    config: GrpcServerConfig, servicers: Sequence[ServicerAdder], *, reuse_port: bool = False
) -> tuple[grpc.Server, int]:
    """Make a (not yet started) gRPC server with every service in ``servicers`` and bind its port.

    ``reuse_port`` lets other processes bind the same port (``SO_REUSEPORT``), for ingest workers.

    Returns:
        The server (call ``start()``; stop it with ``stop(config.grace_s)``) and the bound port,
        which differs from ``config.port`` when that is 0.

    Raises:
        ServerStartError: the TLS files cannot be read or the address cannot be bound.
    """
    workers = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc-server")
    server = grpc.server(
        workers,
        options=server_options(config, reuse_port=reuse_port),
        maximum_concurrent_rpcs=config.max_concurrent_streams or config.max_workers,
    )
    for add in servicers:
        add(server)
    host = config.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    address = f"{host}:{config.port}"
    try:
        if config.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, _server_credentials(config.tls))
    except RuntimeError as err:  # grpc raises this when it cannot bind
        workers.shutdown(wait=False)
        raise ServerStartError(f"gRPC server cannot listen on {address}: {err}") from err
    except ConfigError as err:
        workers.shutdown(wait=False)
        raise ServerStartError(str(err)) from err
    if port == 0:
        workers.shutdown(wait=False)
        raise ServerStartError(f"gRPC server cannot listen on {address} (in use, or not an address of this host)")
    logger.info(
        "gRPC server on %s:%d (%s)",
        host,
        port,
        "plaintext" if config.tls is None else "mutual TLS" if config.tls.client_ca_file else "TLS",
    )
    return server, port


def _server_credentials(tls: ServerTLSConfig) -> grpc.ServerCredentials:
    def read(path: Path, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read the gRPC server's TLS {what} {path}: {err}") from err

    client_ca = read(tls.client_ca_file, "client CA file") if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(read(tls.key_file, "key file"), read(tls.cert_file, "certificate file"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None and tls.require_client_auth,
    )

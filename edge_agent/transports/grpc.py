"""The gRPC transport: frames go up an ``Ingest.UploadFrames`` stream, acks come down it.

One channel per transport, reused for every send. Each :meth:`GrpcTransport.send` opens one
bidirectional ``UploadFrames`` call for its batch, streams the outbox's bytes as they are (the
request serializer is the identity, so nothing is parsed or re-serialized on the device) and
collects the receiver's ``FrameAck`` messages until the receiver closes the stream or the
per-send deadline passes.

With ``connections: k`` (> 1) the transport keeps k channels, each on its own TCP connection,
and a send splits its batch into up to k parts, one call per connection, running at once. Why:
a server with several ingest processes (``workers``) or several servers behind a TCP load
balancer spread *connections*, not frames; one device uploading a backlog over one connection
keeps one process busy while the others idle. Over k connections its frames are spread k ways.

Failure policy: acks that arrived before a failure (deadline, dropped connection, receiver
shutdown) are returned and the failure is only logged, because an ack is final and losing it
would only cause a harmless redelivery; :class:`TransportError` is raised when the call failed
before any ack came back. Frames without an ack stay in the outbox either way.

Reachability: calls fail fast (no ``wait_for_ready``), so a send to a receiver that is down
fails at once with gRPC's reason (connection refused, TLS handshake failure, ...), and one that
does not answer fails after ``connect_timeout_s`` (gRPC's minimum connect timeout, 20 s by
default). While the receiver is down the channel retries in the background with a backoff
capped at ``reconnect_backoff_max_s`` (gRPC's own cap is two minutes), so sends succeed again
at most that long after it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field

from edge_agent.transports.base import TLSConfig, Transport, TransportError, register
from edgeloop.config_base import StrictModel
from edgeloop.convert import ack_from_pb
from edgeloop.domain import Ack
from edgeloop.v1 import frames_pb2

logger = logging.getLogger(__name__)

# Method paths come from the descriptor, the same source the generated stubs use.
_SERVICE = frames_pb2.DESCRIPTOR.services_by_name["Ingest"]
UPLOAD_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['UploadFrames'].name}"
HEARTBEAT_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Heartbeat'].name}"

_MIB = 1024 * 1024


class GrpcTransportConfig(StrictModel):
    """Upload frames to an edgeloop receiver over gRPC (HTTP/2), optionally with (mutual) TLS."""

    type: Literal["grpc"] = Field(default="grpc", description="Selects this transport.")
    target: str = Field(
        default="127.0.0.1:50051",
        description="The receiver's address as gRPC understands it: host:port, or a dns:/// URI.",
    )
    tls: TLSConfig | None = Field(
        default=None,
        description="TLS settings; without them the channel is plaintext (trusted networks only).",
    )
    deadline_s: float = Field(
        default=60.0,
        gt=0,
        description="Deadline of one send (one UploadFrames call for a whole batch): size batches to fit it.",
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Longest one connection attempt (TCP, TLS and HTTP/2 handshakes) may take; a send to a peer that "
            "does not answer fails after about this long."
        ),
    )
    heartbeat_timeout_s: float = Field(default=5.0, gt=0, description="Deadline of one Heartbeat call.")
    max_message_bytes: int = Field(
        default=64 * _MIB,
        ge=64 * 1024,
        description="Largest message sent or received (one serialized frame); the receiver must allow it.",
    )
    keepalive_time_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Interval of HTTP/2 keepalive pings, which detect dead connections (NAT timeouts, cut cables). "
            "The receiver must permit pings this often (grpc.http2.min_recv_ping_interval_without_data_ms)."
        ),
    )
    keepalive_timeout_s: float = Field(
        default=20.0, gt=0, description="A ping unanswered this long closes the connection."
    )
    keepalive_permit_without_calls: bool = Field(
        default=False, description="Also ping while no upload is running (keeps idle NAT mappings open)."
    )
    connections: int = Field(
        default=1,
        ge=1,
        le=32,
        description=(
            "TCP connections a send spreads its batch over (one UploadFrames call each, at once). Raise it "
            "(e.g. 4-8) for devices that upload backlogs at full speed to a server running several ingest "
            "processes or several servers behind a TCP load balancer: those balance connections, not frames."
        ),
    )
    reconnect_backoff_max_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest pause between reconnection attempts after an outage (gRPC's default is 120 s).",
    )


def _identity(payload: bytes) -> bytes:
    return payload


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise TransportError(f"cannot read the TLS {what} {path}: {err}") from err


def _channel_options(config: GrpcTransportConfig) -> list[tuple[str, int | str]]:
    backoff_ms = int(config.reconnect_backoff_max_s * 1000)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
        # Despite its name, gRPC core uses this as the minimum *connect timeout* of an attempt.
        ("grpc.min_reconnect_backoff_ms", int(config.connect_timeout_s * 1000)),
    ]
    if config.tls is not None and config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    return options


def _make_channel(config: GrpcTransportConfig) -> grpc.Channel:
    options = _channel_options(config)
    if config.connections > 1:
        # Channels to one target share connections through gRPC's global subchannel pool; a
        # local pool gives each channel its own TCP connection.
        options.append(("grpc.use_local_subchannel_pool", 1))
    if config.tls is None:
        return grpc.insecure_channel(config.target, options=options)
    tls = config.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        raise TransportError("TLS: cert_file and key_file go together (mutual TLS needs both)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "CA file"),
        private_key=_read(tls.key_file, "key file"),
        certificate_chain=_read(tls.cert_file, "certificate file"),
    )
    return grpc.secure_channel(config.target, credentials, options=options)


class GrpcTransport(Transport):
    """Sends batches over reused gRPC channels (``connections``, one by default); see the module
    docstring for the failure policy.

    ``send`` is meant to be called from one uploader thread; ``heartbeat`` may run on another
    (gRPC channels are thread-safe).
    """

    key = "grpc"

    def __init__(self, config: GrpcTransportConfig, device_id: str) -> None:
        self.config = config
        self.device_id = device_id
        self._channels = [_make_channel(config) for _ in range(config.connections)]
        self._uploads = [
            channel.stream_stream(
                UPLOAD_METHOD,
                request_serializer=_identity,
                response_deserializer=frames_pb2.FrameAck.FromString,
            )
            for channel in self._channels
        ]
        self._pool = ThreadPoolExecutor(max(1, config.connections - 1), thread_name_prefix="grpc-acks")
        self._heartbeat = self._channels[0].unary_unary(
            HEARTBEAT_METHOD,
            request_serializer=frames_pb2.DeviceStatus.SerializeToString,
            response_deserializer=frames_pb2.HeartbeatReply.FromString,
        )

    def send(self, payloads: Sequence[tuple[str, bytes]]) -> list[Ack]:
        if not payloads:
            return []
        started = time.monotonic()
        # Contiguous parts, one per connection: each call's acks are a prefix of its part.
        size = -(-len(payloads) // len(self._uploads))
        parts = [payloads[i : i + size] for i in range(0, len(payloads), size)]
        try:
            # All calls start before any is read: their requests flow over the connections at once.
            calls = [
                upload((payload for _, payload in part), timeout=self.config.deadline_s, wait_for_ready=False)
                for upload, part in zip(self._uploads, parts, strict=False)
            ]
        except ValueError as err:  # grpc raises this for a closed channel
            raise TransportError(f"gRPC transport to {self.config.target} is closed") from err
        # Each call's acks are read as they come (every part but the first on a pool thread): an
        # unread response holds its call open, and it would run out of time behind another part.
        reads = [self._pool.submit(_read_acks, call) for call in calls[1:]]
        acks, errors = _read_acks(calls[0])
        for read in reads:
            more, failed = read.result()
            acks += more
            errors += failed
        if errors:
            where = f"gRPC upload to {self.config.target} failed after {time.monotonic() - started:.1f} s"
            if not acks:
                permanent = all(_is_permanent(err) for err in errors)
                raise TransportError(f"{where}: {_describe(errors[0])}", permanent=permanent) from errors[0]
            logger.warning(
                "%s with %d of %d frames acknowledged; the rest stay pending: %s",
                where,
                len(acks),
                len(payloads),
                _describe(errors[0]),
            )
        return acks

    def heartbeat(self, status: frames_pb2.DeviceStatus) -> None:
        try:
            self._heartbeat(status, timeout=self.config.heartbeat_timeout_s, wait_for_ready=False)
        except grpc.RpcError as err:
            raise TransportError(f"gRPC heartbeat to {self.config.target} failed: {_describe(err)}") from err
        except ValueError as err:  # grpc raises this for a closed channel
            raise TransportError(f"gRPC transport to {self.config.target} is closed") from err

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._pool.shutdown(wait=False)


def _read_acks(call: grpc.Call) -> tuple[list[Ack], list[grpc.RpcError]]:
    """A call's acks until it ends, and its error if it failed (the call is then cancelled)."""
    acks: list[Ack] = []
    try:
        for msg in call:
            acks.append(ack_from_pb(msg))
    except grpc.RpcError as err:
        call.cancel()
        return acks, [err]
    return acks, []


def _is_permanent(err: grpc.RpcError) -> bool:
    """Whether the receiver refused what was sent, not the moment it was sent in.

    RESOURCE_EXHAUSTED means either: bytes over the message limit ("... larger than max ...",
    permanent for those bytes), or a server at its concurrent-call limit ("Concurrent RPC limit
    exceeded", gRPC's own status for ``maximum_concurrent_rpcs``), which passes: those frames must be
    retried, not set aside as dead letters.
    """
    if not isinstance(err, grpc.Call):
        return False
    code = err.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (err.details() or "")


def _describe(err: grpc.RpcError) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return str(err)


register("grpc", GrpcTransportConfig, GrpcTransport)

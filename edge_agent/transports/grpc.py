"""The gRPC transport: frames go up an ``Ingest.UploadFrames`` stream, acks come down it.

One channel per transport, reused for every send. Each :meth:`GrpcTransport.send` opens one
bidirectional ``UploadFrames`` call for its batch, streams the outbox's bytes as they are (the
request serializer is the identity, so nothing is parsed or re-serialized on the device) and
collects the receiver's ``FrameAck`` messages until the receiver closes the stream or the
per-send deadline passes.

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
    """Sends batches over one reused gRPC channel; see the module docstring for the failure policy.

    ``send`` is meant to be called from one uploader thread; ``heartbeat`` may run on another
    (gRPC channels are thread-safe).
    """

    key = "grpc"

    def __init__(self, config: GrpcTransportConfig, device_id: str) -> None:
        self.config = config
        self.device_id = device_id
        self._channel = _make_channel(config)
        self._upload = self._channel.stream_stream(
            UPLOAD_METHOD,
            request_serializer=_identity,
            response_deserializer=frames_pb2.FrameAck.FromString,
        )
        self._heartbeat = self._channel.unary_unary(
            HEARTBEAT_METHOD,
            request_serializer=frames_pb2.DeviceStatus.SerializeToString,
            response_deserializer=frames_pb2.HeartbeatReply.FromString,
        )

    def send(self, payloads: Sequence[tuple[str, bytes]]) -> list[Ack]:
        if not payloads:
            return []
        started = time.monotonic()
        try:
            call = self._upload(
                (payload for _, payload in payloads), timeout=self.config.deadline_s, wait_for_ready=False
            )
        except ValueError as err:  # grpc raises this for a closed channel
            raise TransportError(f"gRPC transport to {self.config.target} is closed") from err
        acks: list[Ack] = []
        try:
            for msg in call:
                acks.append(ack_from_pb(msg))
        except grpc.RpcError as err:
            call.cancel()
            where = f"gRPC upload to {self.config.target} failed after {time.monotonic() - started:.1f} s"
            if not acks:
                raise TransportError(f"{where}: {_describe(err)}", permanent=_is_permanent(err)) from err
            logger.warning(
                "%s with %d of %d frames acknowledged; the rest stay pending: %s",
                where,
                len(acks),
                len(payloads),
                _describe(err),
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
        self._channel.close()


#: Statuses with which a receiver refuses what was sent, not the moment it was sent in.
_PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _is_permanent(err: grpc.RpcError) -> bool:
    return isinstance(err, grpc.Call) and err.code() in _PERMANENT


def _describe(err: grpc.RpcError) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return str(err)


register("grpc", GrpcTransportConfig, GrpcTransport)

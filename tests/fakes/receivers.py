"""Minimal frame receivers for transport tests, until the real server exists.

Both store each frame's *raw* wire bytes by frame id (so a test can check that what left the
agent arrived byte-identical), answer ``STORED`` the first time a frame id arrives and
``DUPLICATE`` afterwards, and are started and stopped by the test:

- :class:`GrpcTestReceiver`: a real ``grpc.server`` on a free loopback port implementing the
  ``edgeloop.v1.Ingest`` service, with an optional per-frame delay and optional (mutual) TLS.
  It can be stopped and started again on the same port.
- :class:`MqttTestReceiver`: a paho client on a persistent session subscribed to every
  device's frames topic; it publishes a ``FrameAck`` to the device's ack topic after storing.

"Durable" here means "in a dict" (plus a file when ``store_dir`` is given): these are test
doubles, not the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.convert import ack_to_pb, parse_frame, timestamp_from_seconds
from edgeloop.domain import Ack, AckStatus
from edgeloop.v1 import frames_pb2

logger = logging.getLogger(__name__)

_SERVICE = frames_pb2.DESCRIPTOR.services_by_name["Ingest"]
#: The receivers accept what the agent's transports may send (64 MiB by default).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _FrameStore:
    """Raw frames by id, shared by both receivers; thread-safe."""

    def __init__(self, store_dir: Path | None) -> None:
        self.frames: dict[str, bytes] = {}
        #: Every delivery, duplicates included, in arrival order.
        self.deliveries: list[str] = []
        self.store_dir = store_dir
        self._lock = threading.Lock()
        if store_dir is not None:
            store_dir.mkdir(parents=True, exist_ok=True)

    def store(self, payload: bytes) -> Ack:
        try:
            frame_id = parse_frame(payload).frame_id
        except DecodeError as err:
            # No frame id to answer for: the caller decides how to report it.
            raise ValueError(f"malformed FrameUpload: {err}") from err
        with self._lock:
            self.deliveries.append(frame_id)
            if frame_id in self.frames:
                return Ack(frame_id, AckStatus.DUPLICATE)
            if self.store_dir is not None:
                path = self.store_dir / f"{frame_id}.pb"
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, path)
            self.frames[frame_id] = payload
            return Ack(frame_id, AckStatus.STORED)


@dataclass(frozen=True)
class ServerTLS:
    """PEM material for :class:`GrpcTestReceiver`; with ``client_ca`` clients must present a certificate."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


class GrpcTestReceiver:
    """A real gRPC ``Ingest`` server on ``127.0.0.1``; see the module docstring.

    Attributes:
        frames: Raw serialized ``FrameUpload`` bytes by frame id.
        deliveries: Frame ids in arrival order, duplicates included.
        heartbeats: ``DeviceStatus`` messages received.
        peers: The client address of each UploadFrames call (one per TCP connection it came on).
        delay_s: Sleep before storing each frame (a slow disk); may be changed while running.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        delay_s: float = 0.0,
        store_dir: Path | None = None,
        tls: ServerTLS | None = None,
        max_workers: int = 8,
        max_message_bytes: int | None = None,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        self.port = port
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self.max_message_bytes = max_message_bytes or MAX_MESSAGE_BYTES
        self.delay_s = delay_s
        self.tls = tls
        self.heartbeats: list[frames_pb2.DeviceStatus] = []
        self.peers: list[str] = []
        self._store = _FrameStore(store_dir)
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()

    @property
    def frames(self) -> dict[str, bytes]:
        return self._store.frames

    @property
    def deliveries(self) -> list[str]:
        return self._store.deliveries

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GrpcTestReceiver:
        """Start serving (again); the first start picks a free port, later ones reuse it."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="grpc-test-receiver"),
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers([self._handlers()])
        address = f"127.0.0.1:{self.port}"
        if self.tls is None:
            port = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials(
                [(self.tls.private_key, self.tls.cert_chain)],
                root_certificates=self.tls.client_ca,
                require_client_auth=self.tls.client_ca is not None,
            )
            port = server.add_secure_port(address, creds)
        if port == 0:
            raise RuntimeError(f"could not bind {address}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop now: open streams are cancelled (the client sees UNAVAILABLE or CANCELLED)."""
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in an artificial delay
        self._server.stop(grace=None).wait(5)
        self._server = None

    def restart(self) -> GrpcTestReceiver:
        self.stop()
        return self.start()

    def __enter__(self) -> GrpcTestReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handlers(self) -> grpc.GenericRpcHandler:
        # Requests are left undeserialized so the receiver sees (and stores) the exact wire bytes.
        upload = grpc.stream_stream_rpc_method_handler(
            self._upload_frames,
            request_deserializer=None,
            response_serializer=frames_pb2.FrameAck.SerializeToString,
        )
        heartbeat = grpc.unary_unary_rpc_method_handler(
            self._heartbeat,
            request_deserializer=frames_pb2.DeviceStatus.FromString,
            response_serializer=frames_pb2.HeartbeatReply.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            _SERVICE.full_name, {"UploadFrames": upload, "Heartbeat": heartbeat}
        )

    def _upload_frames(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext):
        self.peers.append(context.peer())
        for payload in request_iterator:
            if self.delay_s > 0 and self._stopping.wait(self.delay_s):
                return
            if not context.is_active():
                return  # the client gave up (deadline, cancel): answer nothing more
            try:
                ack = self._store.store(payload)
            except ValueError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            yield ack_to_pb(ack)

    def _heartbeat(self, request: frames_pb2.DeviceStatus, context: grpc.ServicerContext):
        self.heartbeats.append(request)
        return frames_pb2.HeartbeatReply(server_time=timestamp_from_seconds(time.time()))


class MqttTestReceiver:
    """A paho client that plays the server's side of the MQTT transport; see the module docstring.

    It keeps a persistent session (MQTT 5, ``clean_start=False``), so frames published while
    it is stopped wait at the broker and are stored and acknowledged when it starts again.

    Attributes:
        frames: Raw serialized ``FrameUpload`` bytes by frame id.
        deliveries: Frame ids in arrival order, duplicates included.
        heartbeats: ``(device_id, DeviceStatus)`` pairs received.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topic_prefix: str = "edgeloop/v1",
        client_id: str = "edgeloop-test-receiver",
        username: str | None = None,
        password: str | None = None,
        store_dir: Path | None = None,
        session_expiry_s: int = 3600,
        tls_ca: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_prefix = topic_prefix.rstrip("/")
        self.client_id = client_id
        self.username = username
        self.password = password
        self.session_expiry_s = session_expiry_s
        self.tls_ca = tls_ca
        self.heartbeats: list[tuple[str, frames_pb2.DeviceStatus]] = []
        self._store = _FrameStore(store_dir)
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._pending_acks: list[mqtt.MQTTMessageInfo] = []

    @property
    def frames(self) -> dict[str, bytes]:
        return self._store.frames

    @property
    def deliveries(self) -> list[str]:
        return self._store.deliveries

    def start(self, timeout: float = 5.0) -> MqttTestReceiver:
        """Connect and subscribe; returns once the broker confirmed the subscription."""
        if self._client is not None:
            return self
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls_ca is not None:
            client.tls_set(ca_certs=str(self.tls_ca))
            # The transport under test checks host names; the test double need not, so one
            # broker certificate (with any name) serves both.
            client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # Reconnect fast after a broker restart: tests wait on it.
        client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._subscribed.clear()
        client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError(f"MqttTestReceiver: no SUBACK from {self.host}:{self.port} within {timeout} s")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect once the broker holds every ack published so far; the session (and what
        is queued for it) stays at the broker."""
        if self._client is None:
            return
        deadline = time.monotonic() + timeout
        for info in list(self._pending_acks):
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        self._pending_acks.clear()
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None

    def __enter__(self) -> MqttTestReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish_ack(self, device_id: str, ack: Ack) -> None:
        """Publish an ack as the receiver does after storing (for tests that script acks)."""
        assert self._client is not None, "receiver not started"
        info = self._client.publish(self._ack_topic(device_id), ack_to_pb(ack).SerializeToString(), qos=1)
        info.wait_for_publish(5)

    def _ack_topic(self, device_id: str) -> str:
        return f"{self.topic_prefix}/devices/{device_id}/acks"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("MqttTestReceiver: connection refused: %s", reason_code)
            return
        # Subscribing again on every connect is harmless and covers an expired session.
        client.subscribe(
            [
                (f"{self.topic_prefix}/devices/+/frames", 1),
                (f"{self.topic_prefix}/devices/+/status", 1),
            ]
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            logger.warning("MqttTestReceiver: subscription refused: %s", reason_codes)
            return
        self._subscribed.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        device_id, kind = parts[-2], parts[-1]
        if kind == "status":
            self.heartbeats.append((device_id, frames_pb2.DeviceStatus.FromString(message.payload)))
            return
        try:
            ack = self._store.store(bytes(message.payload))
        except ValueError:
            logger.warning("MqttTestReceiver: dropped a malformed frame from %s", device_id)
            return
        # Runs in paho's network thread: publish() only queues, it does not block.
        info = client.publish(self._ack_topic(device_id), ack_to_pb(ack).SerializeToString(), qos=1)
        self._pending_acks = [i for i in self._pending_acks if not i.is_published()] + [info]

"""The MQTT transport: frames are published to a broker, the receiver answers on an ack topic.

Topics (``{prefix}`` is ``topic_prefix``, ``edgeloop/v1`` by default):

- ``{prefix}/devices/{device_id}/frames``: one serialized ``FrameUpload`` per message, QoS 1,
  the outbox's bytes as they are.
- ``{prefix}/devices/{device_id}/status``: serialized ``DeviceStatus`` heartbeats, QoS 1.
- ``{prefix}/devices/{device_id}/acks``: the receiver publishes one serialized ``FrameAck`` per
  frame (QoS 1) once the frame's fate is durable; the agent subscribes with QoS 1.

A broker's PUBACK only means the broker holds the message; a frame leaves the outbox only on
the receiver's ack. The agent keeps a persistent session (MQTT 5 ``clean_start=False`` with a
``SessionExpiryInterval``; MQTT 3.1.1 ``clean_session=False``), so acks published while it was
offline, or while the broker restarted with persistence on, are delivered when it reconnects.

Late acks: acks arrive on paho's network thread into a thread-safe dict. :meth:`MqttTransport.send`
waits up to ``ack_timeout_s`` for the acks of its own batch, then returns *every* ack collected so
far, including late acks for frames of earlier sends (or of an earlier run of the agent). That is
what the caller wants: any durable ack is final for its frame, whenever it comes.

A lost connection fails the send in flight at once (:class:`TransportError`), whether it was
waiting for the broker's PUBACKs or for the receiver's acks: waiting out the deadline would only
delay the retry, which goes out once paho has reconnected. Acks collected before the loss are kept
and returned by the next send.

Duplicates: if the connection drops between a publish and its PUBACK, paho redelivers the message
itself after reconnecting, and the caller sends the frame again too; receivers are idempotent by
frame id, so this costs bandwidth, never correctness. Publishing only while connected keeps paho's
in-memory queue from growing during an outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Literal

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import Field, SecretStr

from edge_agent.transports.base import TLSConfig, Transport, TransportError, register
from edgeloop import topics
from edgeloop.config_base import StrictModel
from edgeloop.convert import ack_from_pb
from edgeloop.domain import Ack
from edgeloop.mqtt_client import new_client
from edgeloop.pubacks import PubackWaiter
from edgeloop.tls import TLSError, client_ssl_context
from edgeloop.v1 import frames_pb2

logger = logging.getLogger(__name__)


class MqttTransportConfig(StrictModel):
    """Upload frames through an MQTT broker (Mosquitto, EMQX, ...) to the edgeloop receiver."""

    type: Literal["mqtt"] = Field(default="mqtt", description="Selects this transport.")
    host: str = Field(default="127.0.0.1", description="The broker's host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="The broker's port (8883 is usual with TLS).")
    username: str | None = Field(default=None, description="User name for the broker, if it requires one.")
    password: SecretStr | None = Field(default=None, description="Password for the broker (never logged).")
    tls: TLSConfig | None = Field(default=None, description="TLS settings; without them the connection is plaintext.")
    client_id: str = Field(
        default="edgeloop-agent-{device_id}",
        min_length=1,
        description=(
            "MQTT client id; '{device_id}' is replaced by the agent's device id. It names the persistent "
            "session, so it must be stable across restarts and unique per device."
        ),
    )
    protocol: Literal["mqttv5", "mqttv311"] = Field(
        default="mqttv5",
        description="MQTT protocol version; only v5 reports refused publishes (not authorized) in PUBACK.",
    )
    keepalive_s: int = Field(default=60, ge=5, description="MQTT keepalive: how fast a dead connection is noticed.")
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a send waits for the broker connection (and subscription)."
    )
    publish_timeout_s: float = Field(
        default=30.0, gt=0, description="How long a send waits for the broker's PUBACKs of its batch."
    )
    ack_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a send waits for the receiver's acks after the broker took the batch.",
    )
    topic_prefix: str = Field(default="edgeloop/v1", min_length=1, description="Prefix of every edgeloop topic.")
    session_expiry_s: int = Field(
        default=86_400,
        ge=0,
        description=(
            "MQTT 5 session expiry: how long the broker keeps this device's session (and acks queued for it) "
            "while the agent is offline. MQTT 3.1.1 sessions last as long as the broker's own setting."
        ),
    )
    reconnect_min_delay_s: float = Field(default=1.0, gt=0, description="First pause before reconnecting.")
    reconnect_max_delay_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause between reconnection attempts (the pause doubles up to it).",
    )
    max_inflight: int = Field(
        default=20, ge=1, description="QoS 1 messages in flight before paho queues the rest (per connection)."
    )


class MqttTransport(Transport):
    """Publishes frames and heartbeats, collects the receiver's acks; see the module docstring.

    The connection is opened lazily by the first send or heartbeat; after that paho's network
    thread (``loop_start``) keeps it up, reconnecting on its own. ``send`` is meant to be called
    from one uploader thread; ``heartbeat`` may run on another.
    """

    key = "mqtt"

    def __init__(self, config: MqttTransportConfig, device_id: str) -> None:
        self.config = config
        self.device_id = device_id
        prefix = config.topic_prefix.rstrip("/")
        self.frames_topic = topics.frames(prefix, device_id)
        self.status_topic = topics.status(prefix, device_id)
        self.acks_topic = topics.acks(prefix, device_id)
        self.client_id = config.client_id.replace("{device_id}", device_id)

        self._v5 = config.protocol == "mqttv5"
        self._cond = threading.Condition()  # guards everything below, signalled by paho's thread
        self._acks: dict[str, Ack] = {}
        self._pubacks = PubackWaiter()
        self._connected = False  # CONNACK accepted
        self._connection = 0  # counts lost connections: a send fails if it changes under it
        self._ready = False  # connected and subscribed to the ack topic
        self._sub_mid: int | None = None
        self._last_error = ""
        self._refused = False  # the broker's last CONNACK was a refusal (bad credentials, banned id)
        self._started = False
        self._closed = False

        try:
            ssl_context = client_ssl_context(config.tls) if config.tls is not None else None
        except TLSError as err:
            raise TransportError(str(err)) from err
        # A persistent session: acks queued while the agent is away reach it when it is back.
        client = new_client(
            self.client_id,
            mqttv5=self._v5,
            clean_session=False,
            username=config.username,
            password=config.password,
            ssl_context=ssl_context,
        )
        client.connect_timeout = config.connect_timeout_s
        client.reconnect_delay_set(config.reconnect_min_delay_s, config.reconnect_max_delay_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(config.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._pubacks.on_publish
        self._client = client

    # -- the Transport interface -------------------------------------------------------------

    def send(self, payloads: Sequence[tuple[str, bytes]]) -> list[Ack]:
        if not payloads:
            return []
        connection = self._ensure_connected()
        infos = [(frame_id, self._publish(self.frames_topic, payload)) for frame_id, payload in payloads]
        self._wait_pubacks(self.frames_topic, infos, connection)

        wanted = {frame_id for frame_id, _ in payloads}
        deadline = time.monotonic() + self.config.ack_timeout_s
        with self._cond:
            while not wanted.issubset(self._acks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._connection != connection:
                    # The acks collected so far stay in self._acks for the next send.
                    missing = len(wanted.difference(self._acks))
                    raise TransportError(
                        f"MQTT {self._last_error or 'connection lost'} while {missing} of {len(wanted)} frame(s) "
                        "awaited the receiver's ack; they stay pending and go again after reconnecting"
                    )
                self._cond.wait(remaining)
            acks = list(self._acks.values())
            self._acks.clear()
        missing = len(wanted.difference(a.frame_id for a in acks))
        if missing:
            logger.info(
                "%d of %d frames not acknowledged within %g s; they stay pending",
                missing,
                len(wanted),
                self.config.ack_timeout_s,
            )
        return acks

    def heartbeat(self, status: frames_pb2.DeviceStatus) -> None:
        connection = self._ensure_connected()
        info = self._publish(self.status_topic, status.SerializeToString(deterministic=True))
        self._wait_pubacks(self.status_topic, [("heartbeat", info)], connection)

    def close(self) -> None:
        """Disconnect cleanly; the broker keeps the session and queues acks until the next connect."""
        with self._cond:
            self._closed = True
            started, self._started = self._started, False
            self._ready = False
        if started:
            self._client.disconnect()
            self._client.loop_stop()

    # -- connection ---------------------------------------------------------------------------

    def _ensure_connected(self) -> int:
        """Wait until connected and subscribed; returns the connection's number (see ``_lost_since``)."""
        cfg = self.config
        where = f"MQTT broker {cfg.host}:{cfg.port}"
        with self._cond:
            if self._closed:
                raise TransportError(f"MQTT transport to {cfg.host}:{cfg.port} is closed")
            if self._ready:
                return self._connection
            started = self._started
        if not started:
            # The first connection is synchronous so an unreachable broker, a refused TLS
            # handshake or a bad host name fails here with its cause; later reconnects are
            # paho's (loop thread), and sends wait for them below.
            try:
                if self._v5:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = cfg.session_expiry_s
                    self._client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props)
                else:
                    self._client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            except (OSError, ValueError) as err:  # ssl.SSLError and socket.timeout are OSErrors
                raise TransportError(f"cannot connect to {where}: {err}") from err
            self._client.loop_start()
            with self._cond:
                self._started = True
        deadline = time.monotonic() + cfg.connect_timeout_s
        with self._cond:
            while not self._ready:
                remaining = deadline - time.monotonic()
                if self._refused:  # waiting longer would only get the same answer
                    raise TransportError(f"{where} {self._last_error}")
                if remaining <= 0:
                    detail = f": {self._last_error}" if self._last_error else ""
                    raise TransportError(f"not connected to {where} within {cfg.connect_timeout_s:g} s{detail}")
                self._cond.wait(remaining)
            return self._connection

    def _publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # NO_CONN: the connection dropped mid-batch. paho still holds the message and will
            # deliver it after reconnecting; the caller resends anyway (idempotent receiver).
            raise TransportError(f"MQTT publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def _wait_pubacks(self, topic: str, infos: list[tuple[str, mqtt.MQTTMessageInfo]], connection: int) -> None:
        self._pubacks.wait_or_raise(
            infos,
            self.config,
            TransportError,
            lambda fid: f"the publish of {fid} to {topic}",
            lost=lambda: self._lost_since(connection),
        )

    def _lost_since(self, connection: int) -> str | None:
        """Why the connection counted ``connection`` is gone, or None while it is the current one."""
        with self._cond:
            if self._connection == connection:
                return None
            return self._last_error or "connection lost"

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            with self._cond:
                self._last_error = f"refused the connection: {reason_code}"
                self._refused = True
                self._cond.notify_all()
            logger.warning("MQTT %s:%s refused the connection: %s", self.config.host, self.config.port, reason_code)
            return
        # Subscribe on every connect: a resumed session already has the subscription (and
        # re-subscribing keeps its queue), an expired or new one needs it.
        result, mid = client.subscribe(self.acks_topic, qos=1)
        with self._cond:
            self._connected = True
            self._refused = False
            self._sub_mid = mid
            if result != mqtt.MQTT_ERR_SUCCESS:
                self._last_error = f"subscribe failed: {mqtt.error_string(result)}"
        logger.info(
            "MQTT connected to %s:%s as %s (session present: %s)",
            self.config.host,
            self.config.port,
            self.client_id,
            flags.session_present,
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            if mid != self._sub_mid:
                return
            failed = [rc for rc in reason_codes if rc.is_failure]
            if failed:
                self._last_error = f"broker refused the subscription to {self.acks_topic}: {failed[0]}"
                logger.warning("MQTT %s", self._last_error)
            else:
                self._ready = True
                self._last_error = ""
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            # After a refused CONNACK the broker closes the socket too: keep the refusal as the
            # error, and do not report a connection that never was as lost.
            was_connected = self._connected and not self._closed
            if was_connected:
                self._last_error = f"connection lost: {reason_code}"
                self._connection += 1
            self._connected = self._ready = False
            self._cond.notify_all()
        if was_connected:
            logger.warning("MQTT connection to %s:%s lost: %s", self.config.host, self.config.port, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            ack = ack_from_pb(frames_pb2.FrameAck.FromString(message.payload))
        except DecodeError:
            logger.warning("MQTT: ignored a malformed ack on %s", message.topic)
            return
        with self._cond:
            self._acks[ack.frame_id] = ack
            self._cond.notify_all()


def _create(config: MqttTransportConfig, device_id: str) -> MqttTransport:
    return MqttTransport(config, device_id)


register("mqtt", MqttTransportConfig, _create)

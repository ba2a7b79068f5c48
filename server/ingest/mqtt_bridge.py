"""The MQTT side of ingest: frames and heartbeats from a broker into the ingest core, acks back.

Devices publish serialized ``FrameUpload`` messages (QoS 1) to ``{prefix}/devices/{id}/frames``
and ``DeviceStatus`` heartbeats to ``{prefix}/devices/{id}/status`` (see ``edgeloop.topics``).
The bridge runs ``clients`` paho clients in one MQTT 5 shared subscription group, so the broker
hands each message to exactly one of them, across this process and any other bridge process in
the same group (give each process its own ``client_id_prefix``).

Delivery: each client has a persistent session (``clean_start=False`` with a session expiry) and
acknowledges messages itself (paho ``manual_ack``). A frame message is PUBACKed only after the
ingest core's future resolved and the ``FrameAck`` for the device was handed to paho, so a bridge
that dies before a frame is durable leaves the message unacknowledged and the broker delivers it
again when the session reconnects. Frames published while the bridge is down wait in its
session at the broker (up to the broker's ``max_queued_messages``; past that the device's
outbox resends them after its ack timeout). The broker sends each client at most
``max_inflight`` unacknowledged messages (MQTT 5 Receive Maximum): that bounds how many frames
one client has waiting for storage, and is how far the core can batch.

Sessions outlive their clients, and so do their places in the group: Mosquitto keeps handing a
disconnected member its share of the messages (queued for it) until its session expires. While
one of several bridge processes is down, its share waits for it (agents resend what stays
unacknowledged, and part of that lands on the absent member again). Keep ``session_expiry_s``
as short as a restart needs when several processes share the group, and call
:meth:`MqttBridge.retire_sessions` for client ids that will not come back (a process taken out
of service, or ``clients`` lowered); their queued frames are then resent by the agents.

Verdicts, per frame message (the table in ``base.py``):

- ``STORED`` / ``DUPLICATE`` / ``REJECTED`` (a per-frame problem): ``FrameAck`` to
  ``{prefix}/devices/{id}/acks``, then PUBACK.
- ``RETRY`` (storage unavailable now): a ``RETRY`` ack, then PUBACK. Leaving the message
  unacknowledged would not bring it back: an MQTT 5 broker redelivers only on a new connection,
  and each unacknowledged message holds one of the ``max_inflight`` slots until then, so a few
  of them would stall the client. The device's outbox is the durable copy; on ``RETRY`` the
  agent resends later.
- Stream-fatal problems (not a frame, too large, no id, unknown device, device mismatch): a log
  line, ``frames_rejected{transport="mqtt", reason=<code>}``, and PUBACK, because redelivering
  the same bytes cannot fix them. When the frame id is known, the device named by the topic also
  gets a ``REJECTED`` ack, so its agent sets the frame aside instead of resending it forever; a
  payload that is not a frame has no id to answer for.
- Too large (above ``max_payload_bytes``): refused here, unparsed; the frame id is read from the
  message's first bytes (``edgeloop.convert.peek_frame_id``) for the ``REJECTED`` ack. Mosquitto
  passes messages up to 256 MB unless its ``max_packet_size`` is set; with it, the broker drops
  the publisher's connection instead and the bridge never sees the message (but paho on the
  device re-sends it after every reconnect, so that device's connection flaps).
- The core failing unexpectedly: logged with its traceback and PUBACKed without an ack; the
  agent resends the frame after its ack timeout.

The topic's device segment is the sender's identity (the broker's ACL ties each device's topics
to its user), so a payload naming another device is a ``DEVICE_MISMATCH`` (the core checks it).

Heartbeats are held to the limits of :mod:`server.ingest.heartbeats`; one over a limit is
logged, counted (``heartbeats_rejected{transport="mqtt"}``) and dropped. What a client sent
(topics, ids) is clipped in every log line (:func:`server.ingest.base.clip`). Fairness between
devices is the broker's business over MQTT: see the per-client limits in ``server/devices.py``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from concurrent.futures import Future

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, SecretStr

from edge_agent.transports.base import TLSConfig
from edgeloop import topics
from edgeloop.config_base import ConfigError, StrictModel
from edgeloop.convert import ack_to_pb, device_status_from_pb, peek_frame_id
from edgeloop.domain import Ack, AckStatus
from edgeloop.mqtt_client import new_client
from edgeloop.tls import TLSError, client_ssl_context
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

TRANSPORT = "mqtt"
_MIB = 1024 * 1024


class MqttBridgeConfig(StrictModel):
    """The bridge from an MQTT broker to ingest, for devices that upload over MQTT."""

    enabled: bool = Field(default=False, description="Run the bridge (the server then needs the broker below).")
    host: str = Field(default="127.0.0.1", min_length=1, description="The broker's host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="The broker's port (8883 is usual with TLS).")
    username: str | None = Field(
        default=None,
        description="Broker user of the bridge; its ACL must allow reading every device's frames and status "
        "topics and writing every device's acks topic.",
    )
    password: SecretStr | None = Field(default=None, description="The broker user's password (never logged).")
    tls: TLSConfig | None = Field(
        default=None, description="TLS to the broker; without it the connection is plaintext (trusted networks only)."
    )
    topic_prefix: str = Field(
        default=topics.DEFAULT_PREFIX, min_length=1, description="Prefix of every edgeloop topic (as the agents')."
    )
    shared_group: str = Field(
        default="edgeloop-ingest",
        min_length=1,
        pattern=r"^[^/+#]+$",
        description="MQTT 5 shared-subscription group: the broker gives each message to one member of the group.",
    )
    clients: int = Field(
        default=1, ge=1, le=64, description="Bridge clients (connections) in this process, all in shared_group."
    )
    client_id_prefix: str = Field(
        default="edgeloop-ingest",
        min_length=1,
        description=(
            "Client ids are '<prefix>-<n>'. They name the persistent sessions, so they must be stable across "
            "restarts and unique per server process (two processes with one prefix take each other's sessions)."
        ),
    )
    session_expiry_s: int = Field(
        default=86_400,
        ge=0,
        description="How long the broker keeps a bridge client's session, and the frames queued for it, while "
        "the bridge is down.",
    )
    max_inflight: int = Field(
        default=64,
        ge=1,
        le=65_535,
        description=(
            "Unacknowledged messages the broker may send one client at once (MQTT 5 Receive Maximum); frames wait "
            "for storage within this window, so it bounds memory and the core's batch size per client."
        ),
    )
    max_payload_bytes: int = Field(
        default=16 * _MIB,
        ge=64 * 1024,
        description="Largest frame message accepted; bigger ones are dropped (counted as too_large) unparsed.",
    )
    keepalive_s: int = Field(default=30, ge=5, description="MQTT keepalive: how fast a dead connection is noticed.")
    reconnect_min_delay_s: float = Field(default=0.5, gt=0, description="First pause before reconnecting.")
    reconnect_max_delay_s: float = Field(
        default=30.0, gt=0, description="Longest pause between reconnection attempts (the pause doubles up to it)."
    )
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "On stop, how long to wait for frames already handed to the core to be stored and acknowledged; "
            "frames still waiting then stay unacknowledged at the broker and are delivered again on restart."
        ),
    )


class _Client:
    """One paho connection of the bridge and what the bridge tracks about it."""

    def __init__(self, client: mqtt.Client, client_id: str) -> None:
        self.client = client
        self.client_id = client_id
        #: Bumped on every connect and disconnect: a PUBACK is only sent on the connection that
        #: delivered the message (packet ids are per connection; after a reconnect the broker
        #: redelivers the message anyway).
        self.generation = 0
        self.lock = threading.Lock()
        self.ready = False  # connected and the subscriptions granted
        self.sub_mid: int | None = None
        self.closed = False  # the bridge stopped: late completions neither ack nor publish
        self.barriers: dict[int, threading.Event] = {}  # UNSUBSCRIBE mid -> set on its UNSUBACK


class MqttBridge:
    """Bridges frames and heartbeats from a broker to an :class:`Ingestor`; see the module docstring.

    Args:
        config: Broker, topics, group, session and flow-control settings.
        ingestor: Validates and stores frames; called from paho's network threads.
        metrics: Counts frames received and refused (transport ``"mqtt"``) and heartbeats.
        heartbeats: Where device statuses go.
        devices: Which devices may report heartbeats (the core checks frames itself).
    """

    def __init__(
        self,
        config: MqttBridgeConfig,
        ingestor: Ingestor,
        *,
        metrics: ServerMetrics,
        heartbeats: HeartbeatStore,
        devices: DeviceDirectory | None = None,
    ) -> None:
        self.config = config
        self.ingestor = ingestor
        self.metrics = metrics
        self.heartbeats = heartbeats
        self.devices = devices if devices is not None else AllowAllDevices()
        self.prefix = config.topic_prefix.rstrip("/")
        self._cond = threading.Condition()  # guards the fields below and every _Client.ready
        self._clients: list[_Client] = []
        self._pending = 0  # frames handed to the core and not yet acknowledged
        self._stopping = False
        self._started = False

    @property
    def client_ids(self) -> list[str]:
        return [f"{self.config.client_id_prefix}-{i}" for i in range(self.config.clients)]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MqttBridge:
        """Connect every client in the background; paho reconnects on its own after an outage.

        Returns at once, also while the broker is unreachable (logged); :meth:`wait_ready` waits
        for the subscriptions. Does nothing when the config is not ``enabled``.

        Raises:
            ConfigError: the TLS files cannot be loaded.
        """
        if not self.config.enabled:
            logger.info("MQTT bridge disabled in the configuration; not connecting")
            return self
        with self._cond:
            if self._started:
                return self
            self._started = True
            self._stopping = False
        cfg = self.config
        tls_context = _bridge_ssl_context(cfg.tls) if cfg.tls is not None else None
        for client_id in self.client_ids:
            bc = _Client(self._make_paho(client_id, tls_context), client_id)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = cfg.max_inflight
            bc.client.user_data_set(bc)
            bc.client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props)
            bc.client.loop_start()
            self._clients.append(bc)
        logger.info(
            "MQTT bridge: %d client(s) to %s:%d, group %r, topics %s and %s",
            cfg.clients,
            cfg.host,
            cfg.port,
            cfg.shared_group,
            topics.all_frames(self.prefix),
            topics.all_status(self.prefix),
        )
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once every client is connected and subscribed; False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._clients and all(c.ready for c in self._clients)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._started:
                    return False
                self._cond.wait(remaining)
            return True

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking messages, wait up to ``drain_timeout_s`` (default: the config's) for frames being
        stored, then disconnect. The sessions stay at the broker: whatever is unacknowledged or
        arrives meanwhile is delivered at the next start."""
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        with self._cond:
            if not self._started:
                return
            self._stopping = True
            deadline = time.monotonic() + timeout
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning(
                        "MQTT bridge stopping with %d frame(s) not yet stored; the broker delivers them again",
                        self._pending,
                    )
                    break
                self._cond.wait(remaining)
            clients, self._clients = self._clients, []
        for bc in clients:
            with bc.lock:
                bc.closed = True
            if timeout > 0 and bc.ready and not self._flushed(bc, max(0.5, deadline - time.monotonic())):
                logger.warning("MQTT bridge %s: the broker did not confirm the last acks before the stop", bc.client_id)
            bc.client.disconnect()
            bc.client.loop_stop()
        with self._cond:
            self._started = False
            self._cond.notify_all()

    def retire_sessions(self, client_ids: list[str] | None = None, timeout: float = 10.0) -> None:
        """End the broker sessions of ``client_ids`` (default: this bridge's) so that the group
        stops queueing messages for them; call it while those clients are not running.

        Messages queued for a retired session are discarded by the broker: they were never
        acknowledged, so the devices send those frames again.

        Raises:
            ConnectionError: a session could not be ended (broker unreachable or refusing).
        """
        cfg = self.config
        tls_context = _bridge_ssl_context(cfg.tls) if cfg.tls is not None else None
        for client_id in client_ids if client_ids is not None else self.client_ids:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            if cfg.username is not None:
                client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
            if tls_context is not None:
                client.tls_set_context(tls_context)
            connected = threading.Event()
            refused: list[str] = []

            def on_connect(client, userdata, flags, reason_code, properties, refused=refused, connected=connected):
                if reason_code.is_failure:
                    refused.append(str(reason_code))
                connected.set()

            client.on_connect = on_connect
            # A clean start replaces the old session; expiry 0 ends the new one at disconnect.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            try:
                client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=True, properties=props)
            except (OSError, ValueError) as err:
                raise ConnectionError(f"cannot retire MQTT session {client_id}: {err}") from err
            client.loop_start()
            try:
                if not connected.wait(timeout) or refused:
                    raise ConnectionError(
                        f"cannot retire MQTT session {client_id}: {refused[0] if refused else 'no CONNACK'}"
                    )
            finally:
                client.disconnect()
                client.loop_stop()
            logger.info("MQTT bridge: retired session %s", client_id)

    def _flushed(self, bc: _Client, timeout: float) -> bool:
        """Wait until the broker has processed everything this client sent so far.

        Mosquitto (2.0.x before 2.0.22) drops the rest of a client's input when writing to it
        fails, so acks and PUBACKs still in its input buffer when the socket closes would be
        lost: the frames would come back as duplicates. An UNSUBSCRIBE of a topic the bridge
        never subscribed to is a side-effect-free round trip: the broker answers it only after
        the packets before it.
        """
        done = threading.Event()
        with self._cond:
            result, mid = bc.client.unsubscribe(f"{self.prefix}/bridge/{bc.client_id}/flush")
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                return False
            bc.barriers[mid] = done
        return done.wait(timeout)

    def __enter__(self) -> MqttBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_paho(self, client_id: str, tls_context: ssl.SSLContext | None) -> mqtt.Client:
        cfg = self.config
        client = new_client(
            client_id, username=cfg.username, password=cfg.password, ssl_context=tls_context, manual_ack=True
        )
        client.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]
        # Acks are the only publishes, at most one per frame in flight: the same window keeps
        # paho from holding any back (a held-back ack could go out after its frame's PUBACK).
        client.max_inflight_messages_set(cfg.max_inflight)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network threads) -----------------------------------------------------

    def _on_connect(self, client: mqtt.Client, bc: _Client, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("MQTT bridge %s: broker refused the connection: %s", bc.client_id, reason_code)
            return
        with bc.lock:
            bc.generation += 1
        # Subscribing on every connect keeps a resumed session's queue and recreates an expired one.
        options = SubscribeOptions(qos=1)
        result, mid = client.subscribe(
            [
                (topics.shared(self.config.shared_group, topics.all_frames(self.prefix)), options),
                (topics.shared(self.config.shared_group, topics.all_status(self.prefix)), options),
            ]
        )
        with self._cond:
            bc.sub_mid = mid
        if result != mqtt.MQTT_ERR_SUCCESS:
            logger.warning("MQTT bridge %s: subscribe failed: %s", bc.client_id, mqtt.error_string(result))
        logger.info("MQTT bridge %s connected (session present: %s)", bc.client_id, flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, bc: _Client) -> None:
        logger.warning(
            "MQTT bridge %s: cannot connect to %s:%d; retrying", bc.client_id, self.config.host, self.config.port
        )

    def _on_subscribe(self, client: mqtt.Client, bc: _Client, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            logger.error(
                "MQTT bridge %s: broker refused the subscriptions (%s): check the bridge user's ACL",
                bc.client_id,
                failed[0],
            )
            return
        with self._cond:
            if mid == bc.sub_mid:
                bc.ready = True
                self._cond.notify_all()

    def _on_unsubscribe(self, client: mqtt.Client, bc: _Client, mid, reason_codes, properties) -> None:
        with self._cond:
            done = bc.barriers.pop(mid, None)
        if done is not None:
            done.set()

    def _on_disconnect(self, client: mqtt.Client, bc: _Client, flags, reason_code, properties) -> None:
        with bc.lock:
            bc.generation += 1
        with self._cond:
            was_ready, bc.ready = bc.ready, False
            stopping = self._stopping
        if was_ready and not stopping:
            logger.warning("MQTT bridge %s: connection lost (%s); reconnecting", bc.client_id, reason_code)

    def _on_message(self, client: mqtt.Client, bc: _Client, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if self._stopping:
                return  # left unacknowledged: the broker delivers it again at the next start
        with bc.lock:
            generation = bc.generation
        try:
            device_id = topics.device_from_topic(self.prefix, msg.topic)
            kind = msg.topic.rsplit("/", 1)[-1]
            if kind == "frames":
                if self._on_frame(bc, generation, msg, device_id):
                    return  # the core has it: the PUBACK follows its verdict
            elif kind == "status":
                self._on_status(device_id, msg)
            else:
                logger.warning("MQTT bridge: ignored a message on unexpected topic %s", clip(msg.topic))
        except Exception:
            # Whatever this message did, the next one must still be served.
            logger.exception("MQTT bridge: failed to handle a message on %s; dropped", clip(msg.topic))
        self._puback(bc, generation, msg.mid, msg.qos)

    # -- frames ------------------------------------------------------------------------------

    def _on_frame(self, bc: _Client, generation: int, msg: mqtt.MQTTMessage, device_id: str | None) -> bool:
        """Hand a frame to the core; True when it took it, False when it was rejected at once."""
        self.metrics.frames_received.labels(TRANSPORT).inc()
        payload = bytes(msg.payload)
        try:
            if device_id is None or len(device_id) > MAX_DEVICE_ID_CHARS:
                device_id = None  # no ack goes to a topic that names no device
                raise FrameRejected(RejectCode.MISSING_ID, f"topic {clip(msg.topic)} names no device")
            if len(payload) > self.config.max_payload_bytes:
                raise FrameRejected(
                    RejectCode.TOO_LARGE,
                    f"message is {len(payload)} bytes, above the bridge's limit of {self.config.max_payload_bytes}; "
                    "lower the upload size (max_side / JPEG quality) on the device",
                    # Read without parsing the message, so the agent can be told not to resend it.
                    peek_frame_id(payload),
                )
            future = self.ingestor.submit(payload, Identity(TRANSPORT, device_id, peer=msg.topic))
        except FrameRejected as err:
            self._rejected(bc, device_id, msg.topic, err)
            return False
        with self._cond:
            self._pending += 1
        # Only the packet id and QoS are kept, not the message: its payload may be megabytes.
        mid, qos, device = msg.mid, msg.qos, device_id
        future.add_done_callback(lambda f: self._stored(bc, generation, mid, qos, device, f))
        return True

    def _rejected(self, bc: _Client, device_id: str | None, topic: str, err: FrameRejected) -> None:
        frame = err.frame_id or "(no frame id)"
        logger.warning("MQTT frame %s on %s rejected: %s", frame, clip(topic), err)
        # Counted after the log line: whoever sees the counter move can also find the line.
        self.metrics.frames_rejected.labels(TRANSPORT, err.code.value).inc()
        if err.frame_id and device_id is not None:
            # REJECTED tells the agent not to resend what can never be accepted.
            self._publish_ack(bc, device_id, Ack(err.frame_id, AckStatus.REJECTED, str(err)))

    def _stored(self, bc: _Client, generation: int, mid: int, qos: int, device_id: str, future: Future[Ack]) -> None:
        # Runs on the thread that resolved the future (the core's), or inline when it was done.
        try:
            try:
                ack = future.result()
            except Exception:
                logger.exception("MQTT bridge: storing a frame from %s failed; the agent will resend it", device_id)
            else:
                if ack.status == AckStatus.RETRY:
                    logger.info("MQTT frame %s from %s: storage unavailable, RETRY", ack.frame_id, device_id)
                # The FrameAck goes out before the PUBACK on the same connection, so the broker
                # holds the device's ack before it forgets the frame.
                self._publish_ack(bc, device_id, ack)
            self._puback(bc, generation, mid, qos)
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _publish_ack(self, bc: _Client, device_id: str, ack: Ack) -> None:
        if bc.closed:
            return
        info = bc.client.publish(topics.acks(self.prefix, device_id), ack_to_pb(ack).SerializeToString(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # The connection is gone; the frame is redelivered (answered DUPLICATE) or resent.
            logger.info(
                "MQTT bridge %s: ack for %s not sent: %s", bc.client_id, ack.frame_id, mqtt.error_string(info.rc)
            )

    @staticmethod
    def _puback(bc: _Client, generation: int, mid: int, qos: int) -> None:
        with bc.lock:
            if bc.generation == generation and not bc.closed:
                bc.client.ack(mid, qos)

    # -- heartbeats --------------------------------------------------------------------------

    def _on_status(self, device_id: str | None, msg: mqtt.MQTTMessage) -> None:
        topic = clip(msg.topic)
        if device_id is None or len(device_id) > MAX_DEVICE_ID_CHARS:
            logger.warning("MQTT bridge: ignored a heartbeat on %s, which names no device", topic)
            return
        try:
            check_heartbeat_size(len(msg.payload))
            status = device_status_from_pb(frames_pb2.DeviceStatus.FromString(msg.payload))
        except HeartbeatRejected as err:
            self._heartbeat_refused("too_large", topic, err)
            return
        except DecodeError:
            logger.warning("MQTT bridge: ignored a malformed heartbeat on %s", topic)
            return
        if status.device_id != device_id:
            logger.warning(
                "MQTT bridge: ignored a heartbeat for device %s on %s: a device may only report for itself",
                clip(status.device_id),
                topic,
            )
            return
        if not self.devices.is_active(device_id):
            logger.warning("MQTT bridge: ignored a heartbeat from %s: not registered or revoked", clip(device_id))
            return
        try:
            status = bound_status(status)
        except HeartbeatRejected as err:
            self._heartbeat_refused("field_limit", topic, err)
            return
        self.heartbeats.record(status)
        self.metrics.heartbeats.inc()

    def _heartbeat_refused(self, reason: str, topic: str, err: HeartbeatRejected) -> None:
        logger.warning("MQTT bridge: ignored a heartbeat on %s: %s", topic, err)
        self.metrics.heartbeats_rejected.labels(TRANSPORT, reason).inc()

    # -- introspection (tests, health checks) -------------------------------------------------

    @property
    def pending(self) -> int:
        """Frames handed to the core and not yet acknowledged."""
        with self._cond:
            return self._pending


def _bridge_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    try:
        return client_ssl_context(tls)
    except TLSError as err:
        raise ConfigError(f"MQTT bridge: {err}") from err

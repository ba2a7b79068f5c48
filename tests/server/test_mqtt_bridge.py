"""The MQTT bridge between a real Mosquitto broker and a fake ingest core, with the agent's real
MQTT transport on the other side.

What is pinned down: byte-identical hand-over and STORED/DUPLICATE acks; the error mapping of
``server/ingest/base.py`` (counters, log lines, REJECTED acks, the bridge serving on); shared
subscriptions handing each message to one bridge client; persistent sessions keeping frames
while the bridge is down; and the delivery guarantee: no PUBACK before the core's verdict, so a
bridge that dies mid-way gets the message again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.transports import MqttTransport, MqttTransportConfig, Transport, TransportError
from edgeloop import topics
from edgeloop.convert import device_status_to_pb, peek_frame_id
from edgeloop.domain import AckStatus, DeviceStatus
from server.ingest.base import Identity, RejectCode
from server.ingest.heartbeats import HeartbeatStore
from server.ingest.mqtt_bridge import MqttBridge, MqttBridgeConfig
from server.metrics import ServerMetrics
from tests.fixtures.mosquitto import MosquittoBroker
from tests.server.test_grpc_ingest import (
    DEVICE,
    OTHER,
    PER_FRAME_CASES,
    VALIDATIONS,
    FakeIngestor,
    counter,
    frames,
    ingestor_factory,
    make_frame,
    real_core,
    wait_for,
)

PREFIX = topics.DEFAULT_PREFIX


@dataclass
class Rig:
    """A broker, the bridge(s) on it, and the agents talking to it; everything is closed at teardown."""

    broker: MosquittoBroker
    tmp_path: Path
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    bridges: list[MqttBridge] = field(default_factory=list)
    transports: list[Transport] = field(default_factory=list)
    raw_clients: list[mqtt.Client] = field(default_factory=list)
    heartbeats: HeartbeatStore | None = None

    def bridge(self, ingestor: FakeIngestor, *, start: bool = True, devices: object = None, **kw: object) -> MqttBridge:
        if self.heartbeats is None:
            self.heartbeats = HeartbeatStore.in_dir(self.tmp_path / "data", flush_interval_s=0.05)
        settings: dict[str, object] = {
            "enabled": True,
            "host": self.broker.host,
            "port": self.broker.port,
            "reconnect_min_delay_s": 0.1,
            "reconnect_max_delay_s": 0.3,
            "drain_timeout_s": 2.0,
            "session_expiry_s": 600,
        }
        b = MqttBridge(
            MqttBridgeConfig(**{**settings, **kw}),  # type: ignore[arg-type]
            ingestor,
            metrics=self.metrics,
            heartbeats=self.heartbeats,
            devices=devices,  # type: ignore[arg-type]
        )
        self.bridges.append(b)
        if start:
            b.start()
            assert b.wait_ready(5.0), "bridge did not subscribe"
        return b

    def agent(self, device: str = DEVICE, **kw: object) -> MqttTransport:
        settings: dict[str, object] = {
            "host": self.broker.host,
            "port": self.broker.port,
            "connect_timeout_s": 2.0,
            "publish_timeout_s": 10.0,
            "ack_timeout_s": 5.0,
            "reconnect_min_delay_s": 0.1,
            "reconnect_max_delay_s": 0.3,
        }
        t = MqttTransport(MqttTransportConfig(**{**settings, **kw}), device)  # type: ignore[arg-type]
        self.transports.append(t)
        return t

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish raw bytes (QoS 1) as a misbehaving client would."""
        if not self.raw_clients:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-publisher", protocol=mqtt.MQTTv5)
            client.connect(self.broker.host, self.broker.port)
            client.loop_start()
            self.raw_clients.append(client)
        self.raw_clients[0].publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        for t in self.transports:
            t.close()
        for b in self.bridges:
            b.stop(drain_timeout_s=0)
        for c in self.raw_clients:
            c.disconnect()
            c.loop_stop()
        if self.heartbeats is not None:
            self.heartbeats.close()


@pytest.fixture
def rig(mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> Iterator[Rig]:
    r = Rig(mosquitto_factory(), tmp_path)
    yield r
    r.close()


@pytest.fixture(params=VALIDATIONS)
def validator(request: pytest.FixtureRequest) -> Callable[..., FakeIngestor]:
    """Makes a FakeIngestor with the test file's checks or with ``server.ingest.validation``'s."""
    return ingestor_factory(request.param)


def rejected(rig: Rig, reason: str) -> float:
    return counter(rig.metrics, "edgeloop_server_frames_rejected", transport="mqtt", reason=reason)


# -- the good path ---------------------------------------------------------------------------


def test_frames_arrive_byte_identical_and_acks_flow_back_in_order(rig: Rig) -> None:
    ingestor = FakeIngestor()
    rig.bridge(ingestor)
    agent = rig.agent()
    batch = frames(20)
    acks = agent.send(batch)
    assert [(a.frame_id, a.status) for a in acks] == [(fid, AckStatus.STORED) for fid, _ in batch]
    assert ingestor.frames == dict(batch)
    assert {(i.transport, i.device_id) for i in ingestor.identities} == {("mqtt", DEVICE)}

    again = agent.send(batch)
    assert [(a.frame_id, a.status) for a in again] == [(fid, AckStatus.DUPLICATE) for fid, _ in batch]
    assert counter(rig.metrics, "edgeloop_server_frames_received", transport="mqtt") == 40


def test_heartbeats_are_stored_and_checked(rig: Rig) -> None:
    rig.bridge(FakeIngestor(), devices=_Directory({DEVICE, OTHER}))
    status = DeviceStatus(DEVICE, 1_700_000_000.0, "m1", 2, 200, {"frames_read": 5}, channel="stable")
    rig.agent().heartbeat(device_status_to_pb(status))
    assert rig.heartbeats is not None
    wait_for(lambda: rig.heartbeats.latest(DEVICE) == status, what="the heartbeat")  # type: ignore[union-attr]

    # Speaking for another device, garbage, or an unknown device: logged and ignored.
    def status_bytes(device: str) -> bytes:
        return device_status_to_pb(DeviceStatus(device, 9.0, "m", 0, 0)).SerializeToString()

    rig.publish(topics.status(PREFIX, DEVICE), status_bytes(OTHER))
    rig.publish(topics.status(PREFIX, DEVICE), b"\xff\xff\xff")
    rig.publish(topics.status(PREFIX, "ghost"), status_bytes("ghost"))
    rig.agent(OTHER).heartbeat(device_status_to_pb(DeviceStatus(OTHER, 10.0, "m", 0, 0)))
    wait_for(lambda: rig.heartbeats.latest(OTHER) is not None, what="the second heartbeat")  # type: ignore[union-attr]
    assert rig.heartbeats.latest(OTHER).time == 10.0  # type: ignore[union-attr]
    assert set(rig.heartbeats.all()) == {DEVICE, OTHER}  # type: ignore[union-attr]
    assert rig.metrics.registry.get_sample_value("edgeloop_server_heartbeats_total") == 2


class _Directory:
    def __init__(self, active: set[str]) -> None:
        self.active = active

    def is_active(self, device_id: str) -> bool:
        return device_id in self.active


# -- bad input ---------------------------------------------------------------------------------


def test_a_50mb_frame_is_dropped_by_the_bridges_size_check(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto's default max_packet_size lets 50 MB through; the bridge refuses it unparsed."""
    ingestor = FakeIngestor()
    rig.bridge(ingestor)
    agent = rig.agent()
    big = make_frame(0, image=os.urandom(50 * 1024 * 1024))
    acks = agent.send([big])
    # REJECTED, so the agent does not send 50 MB again; its id was read without parsing the rest.
    assert [(a.frame_id, a.status) for a in acks] == [(big[0], AckStatus.REJECTED)]
    assert acks[0].message.startswith("too_large: ")
    assert rejected(rig, "too_large") == 1
    assert ingestor.identities == []  # never handed to the core
    assert any("too_large" in r.getMessage() for r in caplog.records)
    assert [a.status for a in agent.send([make_frame(1)])] == [AckStatus.STORED]
    # Garbage that large gets no ack at all (no id to answer for), and the bridge goes on.
    rig.publish(topics.frames(PREFIX, DEVICE), os.urandom(17 * 1024 * 1024))
    wait_for(lambda: rejected(rig, "too_large") == 2, what="the second too_large")
    assert [a.status for a in agent.send([make_frame(2)])] == [AckStatus.STORED]


def test_peek_frame_id_reads_only_the_first_field() -> None:
    fid, payload = make_frame(0, image=os.urandom(1000))
    assert peek_frame_id(payload) == fid
    assert peek_frame_id(payload[: 2 + len(fid)]) == fid  # nothing after the id is needed
    assert peek_frame_id(make_frame(0, frame_id="x" * 120)[1]) == "x" * 120
    for junk in (b"", b"\x0a", b"\x0a\x05ab", b"\x12\x03abc", b"\x0a\xff\xff\xff\x01", b"\x0a\x02\xff\xfe"):
        assert peek_frame_id(junk) == ""


def test_a_broker_with_max_packet_size_refuses_a_50mb_publish_itself(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    """With ``max_packet_size`` the broker itself drops the connection of a client that publishes
    more: the bridge never sees the frame and keeps serving everyone else.

    The sending agent is worse off: paho keeps the unacknowledged publish and sends it again on
    every reconnect, so that connection flaps until the agent stops sending the frame (the
    agent's MQTT transport has no size limit of its own yet).
    """
    rig = Rig(mosquitto_factory(extra_conf="max_packet_size 1048576"), tmp_path)
    try:
        ingestor = FakeIngestor()
        rig.bridge(ingestor)
        big = make_frame(0, image=os.urandom(50 * 1024 * 1024))
        with pytest.raises(TransportError):
            rig.agent(publish_timeout_s=3.0, ack_timeout_s=0.5).send([big])
        assert ingestor.identities == []
        assert rejected(rig, "too_large") == 0
        assert "disconnected due to oversize packet" in rig.broker.log_text()
        assert [a.status for a in rig.agent(OTHER).send([make_frame(1, device=OTHER)])] == [AckStatus.STORED]
    finally:
        rig.close()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
        pytest.param(make_frame(0)[1][:-100], id="truncated"),
    ],
)
def test_bytes_that_are_not_a_frame_are_logged_counted_and_dropped(
    rig: Rig, validator: Callable[..., FakeIngestor], payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    ingestor = validator()
    bridge = rig.bridge(ingestor)
    rig.publish(topics.frames(PREFIX, DEVICE), payload)
    wait_for(lambda: rejected(rig, "malformed") == 1, what="the malformed counter")
    assert any("malformed" in r.getMessage() and DEVICE in r.getMessage() for r in caplog.records)
    good = make_frame(1)
    assert [a.status for a in rig.agent().send([good])] == [AckStatus.STORED]
    # Dropped means PUBACKed: a restarted bridge does not get the bad message again.
    bridge.stop()
    rig.bridge(ingestor)
    rig.agent().send([make_frame(2)])
    assert rejected(rig, "malformed") == 1


@pytest.mark.parametrize(("bad", "code"), PER_FRAME_CASES)
def test_per_frame_problems_get_a_rejected_ack_a_log_line_and_a_count(
    rig: Rig,
    validator: Callable[..., FakeIngestor],
    bad: dict[str, object],
    code: RejectCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.bridge(validator())
    ok1, wrong, ok2 = make_frame(0), make_frame(1, **bad), make_frame(2)  # type: ignore[arg-type]
    acks = {a.frame_id: a for a in rig.agent().send([ok1, wrong, ok2])}
    assert {fid: a.status for fid, a in acks.items()} == {
        ok1[0]: AckStatus.STORED,
        wrong[0]: AckStatus.REJECTED,
        ok2[0]: AckStatus.STORED,
    }
    assert acks[wrong[0]].message.startswith(f"{code.value}: ")
    assert rejected(rig, code.value) == 1
    assert any(code.value in r.getMessage() and wrong[0] in r.getMessage() for r in caplog.records)


def test_an_unknown_device_gets_a_rejected_ack(rig: Rig, validator: Callable[..., FakeIngestor]) -> None:
    rig.bridge(validator({DEVICE}))
    fid, payload = make_frame(0, device="intruder")
    acks = rig.agent("intruder").send([(fid, payload)])
    assert [(a.frame_id, a.status) for a in acks] == [(fid, AckStatus.REJECTED)]
    assert acks[0].message.startswith("unknown_device: ")
    assert rejected(rig, "unknown_device") == 1
    assert [a.status for a in rig.agent().send([make_frame(1)])] == [AckStatus.STORED]


def test_a_payload_naming_another_device_than_its_topic_is_a_device_mismatch(
    rig: Rig, validator: Callable[..., FakeIngestor], caplog: pytest.LogCaptureFixture
) -> None:
    ingestor = validator()
    rig.bridge(ingestor)
    fid, payload = make_frame(0, device=OTHER)
    acks = rig.agent(DEVICE).send([(fid, payload)])  # published on DEVICE's topic
    assert [(a.frame_id, a.status) for a in acks] == [(fid, AckStatus.REJECTED)]
    assert acks[0].message.startswith("device_mismatch: ")
    assert rejected(rig, "device_mismatch") == 1
    assert ingestor.frames == {}
    assert any("device_mismatch" in r.getMessage() for r in caplog.records)


def test_a_topic_without_a_device_is_missing_id(rig: Rig) -> None:
    rig.bridge(FakeIngestor())
    rig.publish(f"{PREFIX}/devices//frames", make_frame(0)[1])
    wait_for(lambda: rejected(rig, "missing_id") == 1, what="the missing_id counter")


def test_retry_is_answered_retry_and_the_message_is_acknowledged(rig: Rig) -> None:
    ingestor = FakeIngestor(verdict=AckStatus.RETRY)
    bridge = rig.bridge(ingestor)
    batch = frames(3)
    acks = rig.agent().send(batch)
    assert sorted((a.frame_id, a.status) for a in acks) == sorted((fid, AckStatus.RETRY) for fid, _ in batch)
    # RETRY means "the agent resends": the broker must not redeliver as well.
    bridge.stop()
    fresh = FakeIngestor()
    rig.bridge(fresh)
    time.sleep(0.3)
    assert fresh.deliveries == []


def test_the_bridge_serves_on_after_the_core_raises(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(FakeIngestor):
        def submit(self, payload: bytes, identity: Identity):  # type: ignore[override]
            if not getattr(self, "exploded", False):
                self.exploded = True
                raise RuntimeError("boom")
            return super().submit(payload, identity)

    rig.bridge(Exploding())
    first, second = make_frame(0), make_frame(1)
    assert rig.agent(ack_timeout_s=0.5).send([first]) == []
    assert "boom" in caplog.text
    assert [a.status for a in rig.agent().send([second])] == [AckStatus.STORED]


# -- delivery guarantees -----------------------------------------------------------------------


def test_two_bridge_clients_in_a_shared_group_get_each_message_once(rig: Rig) -> None:
    ingestor = FakeIngestor()
    bridge = rig.bridge(ingestor, clients=2)
    assert bridge.client_ids == ["edgeloop-ingest-0", "edgeloop-ingest-1"]
    batch = frames(200)
    acks = rig.agent().send(batch)
    assert sorted(a.frame_id for a in acks) == sorted(fid for fid, _ in batch)
    assert sorted(ingestor.deliveries) == sorted(fid for fid, _ in batch)  # each exactly once
    per_client = Counter(ingestor.threads)
    assert set(per_client) == {f"paho-mqtt-client-{cid}" for cid in bridge.client_ids}
    assert sum(per_client.values()) == 200


def test_two_bridge_processes_share_the_group(rig: Rig) -> None:
    one, two = FakeIngestor(), FakeIngestor()
    rig.bridge(one, client_id_prefix="server-a")
    rig.bridge(two, client_id_prefix="server-b")
    batch = frames(100)
    rig.agent().send(batch)
    assert sorted(one.deliveries + two.deliveries) == sorted(fid for fid, _ in batch)
    assert one.deliveries and two.deliveries


def test_a_departed_group_member_keeps_its_share_until_its_session_is_retired(rig: Rig) -> None:
    """Mosquitto queues a disconnected member's share of the group: retire sessions that will
    not come back, or part of the frames waits for them."""
    gone = rig.bridge(FakeIngestor(), client_id_prefix="server-a")
    gone.stop()
    live = FakeIngestor()
    rig.bridge(live, client_id_prefix="server-b")
    agent = rig.agent(ack_timeout_s=1.0)
    batch = frames(20)
    agent.send(batch)
    assert 0 < len(live.deliveries) < 20  # the rest sits in server-a's session

    gone.retire_sessions()
    retry = [p for p in batch if p[0] not in live.frames]
    acks = agent.send(retry)
    assert sorted(a.frame_id for a in acks) == sorted(fid for fid, _ in retry)
    assert live.frames == dict(batch)


def test_frames_published_while_the_bridge_is_down_arrive_when_it_is_back(rig: Rig) -> None:
    first = FakeIngestor()
    bridge = rig.bridge(first)
    bridge.stop()  # the session (and its subscriptions) stay at the broker
    agent = rig.agent(ack_timeout_s=0.3)
    batch = frames(10)
    assert agent.send(batch) == []  # the broker holds them; nobody acknowledges yet

    second = FakeIngestor()
    rig.bridge(second)
    wait_for(lambda: len(second.frames) == 10, what="the queued frames")
    assert second.frames == dict(batch)
    # Their acks reach the agent too (late acks are collected by its next send).
    late = agent.send([make_frame(99)])
    assert {fid for fid, _ in batch} <= {a.frame_id for a in late}


def test_no_puback_before_the_core_resolved_a_killed_bridge_gets_the_frames_again(rig: Rig) -> None:
    slow = FakeIngestor(hold=True)
    bridge = rig.bridge(slow)
    agent = rig.agent(ack_timeout_s=0.3)
    batch = frames(5)
    assert agent.send(batch) == []
    wait_for(lambda: slow.held == 5, what="the frames to reach the core")
    bridge.stop(drain_timeout_s=0)  # dies before storage finished: nothing was PUBACKed
    slow.release()  # too late: this bridge is gone and must not ack on anyone's behalf

    fresh = FakeIngestor()
    rig.bridge(fresh)
    wait_for(lambda: len(fresh.frames) == 5, what="the broker to redeliver")
    assert fresh.frames == dict(batch)
    late = agent.send([make_frame(50)])  # acks arrive on the agent's own session
    assert {fid for fid, _ in batch} <= {a.frame_id for a in late}


def test_frames_waiting_for_storage_are_bounded_by_max_inflight(rig: Rig) -> None:
    slow = FakeIngestor(hold=True)
    rig.bridge(slow, max_inflight=4)
    rig.agent(ack_timeout_s=0.2).send(frames(10))
    wait_for(lambda: slow.held == 4, what="4 frames at the core")
    time.sleep(0.2)
    assert slow.held == 4  # the broker holds the rest back (MQTT 5 Receive Maximum)
    deadline = time.monotonic() + 5.0
    while len(slow.frames) < 10:
        assert time.monotonic() < deadline, "the held-back frames never came"
        slow.release()
        slow.hold = True
        time.sleep(0.05)
    assert len(slow.deliveries) == 10


def test_stop_drains_frames_being_stored_before_disconnecting(rig: Rig) -> None:
    slow = FakeIngestor(delay_s=0.3)
    bridge = rig.bridge(slow)
    agent = rig.agent(ack_timeout_s=0.05)
    batch = frames(5)
    agent.send(batch)
    wait_for(lambda: len(slow.deliveries) == 5, what="the frames to reach the core")
    bridge.stop()  # waits for the 0.3 s storage, publishes the acks, PUBACKs, then disconnects
    assert bridge.pending == 0
    assert len(slow.frames) == 5

    fresh = FakeIngestor()
    rig.bridge(fresh)
    time.sleep(0.3)
    assert fresh.deliveries == []  # acknowledged before the stop: nothing comes back
    got = agent.send([make_frame(9)])
    assert {fid for fid, _ in batch} <= {a.frame_id for a in got}


def test_the_bridge_rides_out_a_broker_restart(rig: Rig) -> None:
    ingestor = FakeIngestor()
    bridge = rig.bridge(ingestor)
    rig.broker.restart()
    assert bridge.wait_ready(10.0)
    assert [a.status for a in rig.agent().send([make_frame(0)])] == [AckStatus.STORED]


def test_bridge_behind_an_acl_with_users(mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    """The bridge's broker user needs read on every device's frames/status and write on acks
    (the ACL ``server/devices.py`` writes); a device only its own topics."""
    acl = "\n".join(
        [
            "user bridge",
            f"topic read {PREFIX}/devices/+/frames",
            f"topic read {PREFIX}/devices/+/status",
            f"topic write {PREFIX}/devices/+/acks",
            f"user {DEVICE}",
            f"topic write {PREFIX}/devices/{DEVICE}/frames",
            f"topic write {PREFIX}/devices/{DEVICE}/status",
            f"topic read {PREFIX}/devices/{DEVICE}/acks",
            "",
        ]
    )
    rig = Rig(mosquitto_factory(users={"bridge": "bpw", DEVICE: "dpw"}, acl=acl), tmp_path)
    try:
        ingestor = FakeIngestor()
        rig.bridge(ingestor, username="bridge", password="bpw")
        acks = rig.agent(username=DEVICE, password="dpw").send(frames(3))
        assert [a.status for a in acks] == [AckStatus.STORED] * 3
        assert {i.device_id for i in ingestor.identities} == {DEVICE}
    finally:
        rig.close()


# -- configuration -----------------------------------------------------------------------------


def test_every_config_field_is_described() -> None:
    missing = [name for name, f in MqttBridgeConfig.model_fields.items() if not f.description]
    assert missing == []


def test_a_disabled_bridge_does_not_connect(caplog: pytest.LogCaptureFixture) -> None:
    bridge = MqttBridge(
        MqttBridgeConfig(port=1), FakeIngestor(), metrics=ServerMetrics(), heartbeats=HeartbeatStore(None)
    )
    with caplog.at_level(logging.INFO):
        bridge.start()
    assert "disabled" in caplog.text
    assert not bridge.wait_ready(0.1)
    bridge.stop()


def test_the_password_is_never_shown() -> None:
    cfg = MqttBridgeConfig(password="hunter2")  # type: ignore[arg-type]
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.model_dump())


def test_the_bridge_starts_while_the_broker_is_down_and_connects_when_it_is_up(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    broker = mosquitto_factory(start=False)
    rig = Rig(broker, tmp_path)
    try:
        bridge = rig.bridge(FakeIngestor(), start=False)
        bridge.start()
        assert not bridge.wait_ready(0.3)
        broker.start()
        assert bridge.wait_ready(10.0)
    finally:
        rig.close()


# -- the real core -----------------------------------------------------------------------------


def test_through_the_real_core_frames_are_stored_and_outages_answered_retry(rig: Rig, tmp_path: Path) -> None:
    core, inbox = real_core(tmp_path, rig.metrics)
    try:
        rig.bridge(core)
        agent = rig.agent()
        batch = frames(20)
        acks = agent.send(batch)
        assert sorted((a.frame_id, a.status) for a in acks) == sorted((fid, AckStatus.STORED) for fid, _ in batch)
        assert set(inbox.samples) == {fid for fid, _ in batch}
        assert [a.status for a in agent.send(batch[:3])] == [AckStatus.DUPLICATE] * 3

        inbox.down = True
        more = frames(3)
        assert [a.status for a in agent.send(more)] == [AckStatus.RETRY] * 3
        inbox.down = False
        assert [a.status for a in agent.send(more)] == [AckStatus.STORED] * 3
    finally:
        for b in rig.bridges:
            b.stop()
        core.close()

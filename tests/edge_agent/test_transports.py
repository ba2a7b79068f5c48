"""The gRPC and MQTT transports against real receivers: a gRPC server and a Mosquitto broker.

The shared behaviour (byte-identical delivery, STORED then DUPLICATE, fast failure while the
other side is down, recovery after it comes back, heartbeats) runs for every transport; MQTT's
persistent sessions and gRPC's deadlines and TLS have tests of their own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from edge_agent.transports import (
    GrpcTransport,
    GrpcTransportConfig,
    MqttTransport,
    MqttTransportConfig,
    TLSConfig,
    Transport,
    TransportConfig,
    TransportError,
    create_transport,
)
from edge_agent.transports.grpc import HEARTBEAT_METHOD, UPLOAD_METHOD
from edgeloop.convert import serialize_frame
from edgeloop.domain import Ack, AckStatus, FrameRecord
from edgeloop.v1 import frames_pb2
from tests.fakes.receivers import GrpcTestReceiver, MqttTestReceiver, ServerTLS
from tests.fixtures.mosquitto import BrokerTLS

DEVICE = "dev-1"
# Generous against CI noise, tight enough to catch a send that hangs on a dead peer.
FAIL_FAST_S = 4.0


def frame(i: int, size: int = 2_000, device: str = DEVICE) -> tuple[str, bytes]:
    """A serialized FrameUpload with ``size`` random image bytes."""
    frame_id = f"{os.urandom(8).hex()}-{i}"
    rec = FrameRecord(
        frame_id=frame_id,
        device_id=device,
        capture_time=1_700_000_000.25 + i,
        sequence=i,
        model_version="test-model",
        image=os.urandom(size),
        media_type="image/jpeg",
        width=640,
        height=480,
        uncertainty=0.5,
        class_names=["a", "b"],
    )
    return frame_id, serialize_frame(rec)


def by_id(acks: Sequence[Ack]) -> dict[str, str]:
    return {a.frame_id: a.status for a in acks}


def send_until_acked(transport: Transport, payloads: Sequence[tuple[str, bytes]], timeout: float) -> dict[str, str]:
    """Send like the uploader does: retry pending frames until each has a durable ack."""
    pending = dict(payloads)
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"frames still pending after {timeout} s: {sorted(pending)}"
        try:
            acks = transport.send(list(pending.items()))
        except TransportError:
            time.sleep(0.1)
            continue
        for ack in acks:
            if ack.durable and ack.frame_id in pending:
                got[ack.frame_id] = ack.status
                del pending[ack.frame_id]
    return got


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- a receiver behind each transport ---------------------------------------------------------


@dataclass
class Backend:
    """A transport kind wired to a running receiver; ``down()``/``up()`` cut and restore the path."""

    kind: str
    receiver: GrpcTestReceiver | MqttTestReceiver
    make: Callable[..., Transport]
    down: Callable[[], None]
    up: Callable[[], None]
    unreachable_config: Callable[[], object]


@pytest.fixture(params=["grpc", "mqtt", "mqtt311"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    transports: list[Transport] = []

    def keep(t: Transport) -> Transport:
        transports.append(t)
        return t

    if request.param == "grpc":
        receiver = GrpcTestReceiver().start()

        def make(**kw: object) -> Transport:
            cfg = GrpcTransportConfig(
                target=receiver.target,
                connect_timeout_s=1.0,
                deadline_s=10.0,
                reconnect_backoff_max_s=0.3,
                **kw,
            )
            return keep(create_transport(cfg, DEVICE))

        yield Backend(
            "grpc",
            receiver,
            make,
            down=receiver.stop,
            up=receiver.start,
            unreachable_config=lambda: GrpcTransportConfig(target=f"127.0.0.1:{_closed_port()}", connect_timeout_s=1.0),
        )
        receiver.stop()
    else:
        # Asked for here, not in the signature, so the gRPC cases run where mosquitto is missing.
        broker = request.getfixturevalue("mosquitto_factory")()
        receiver = MqttTestReceiver(broker.host, broker.port).start()
        protocol = "mqttv5" if request.param == "mqtt" else "mqttv311"

        def make(**kw: object) -> Transport:
            cfg = MqttTransportConfig(**{**_mqtt_test_settings(broker.port, protocol), **kw})
            return keep(create_transport(cfg, DEVICE))

        def up() -> None:
            broker.start()

        yield Backend(
            request.param,
            receiver,
            make,
            down=broker.stop,
            up=up,
            unreachable_config=lambda: MqttTransportConfig(
                **{**_mqtt_test_settings(_closed_port(), protocol), "connect_timeout_s": 1.0}
            ),
        )
        receiver.stop(timeout=1.0)
    for t in transports:
        t.close()


def _mqtt_test_settings(port: int, protocol: str = "mqttv5") -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "protocol": protocol,
        "connect_timeout_s": 1.0,
        "publish_timeout_s": 2.0,
        "ack_timeout_s": 3.0,
        "reconnect_min_delay_s": 0.1,
        "reconnect_max_delay_s": 0.3,
    }


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- shared behaviour -------------------------------------------------------------------------


def test_frames_arrive_byte_identical_and_are_stored(backend: Backend) -> None:
    transport = backend.make()
    payloads = [frame(0, size=1_000_000), frame(1), frame(2, size=0)]

    acks = transport.send(payloads)

    assert by_id(acks) == {fid: AckStatus.STORED for fid, _ in payloads}
    for fid, payload in payloads:
        assert backend.receiver.frames[fid] == payload  # the very bytes the outbox held


def test_resending_gives_duplicate_and_is_stored_once(backend: Backend) -> None:
    transport = backend.make()
    payloads = [frame(0), frame(1)]
    assert set(by_id(transport.send(payloads)).values()) == {AckStatus.STORED}

    again = transport.send(payloads)

    assert by_id(again) == {fid: AckStatus.DUPLICATE for fid, _ in payloads}
    assert sorted(backend.receiver.frames) == sorted(fid for fid, _ in payloads)
    assert sorted(backend.receiver.deliveries) == sorted([fid for fid, _ in payloads] * 2)


def test_unreachable_receiver_fails_fast(backend: Backend) -> None:
    transport = create_transport(backend.unreachable_config(), DEVICE)
    try:
        started = time.monotonic()
        with pytest.raises(TransportError):
            transport.send([frame(0)])
        assert time.monotonic() - started < FAIL_FAST_S
    finally:
        transport.close()


def test_down_then_back_the_same_frames_go_through(backend: Backend) -> None:
    transport = backend.make()
    first = [frame(0)]
    assert by_id(transport.send(first)) == {first[0][0]: AckStatus.STORED}

    backend.down()
    later = [frame(1), frame(2, size=300_000)]
    started = time.monotonic()
    with pytest.raises(TransportError):
        transport.send(later)
    assert time.monotonic() - started < FAIL_FAST_S

    backend.up()
    got = send_until_acked(transport, later, timeout=15.0)

    # STORED, or DUPLICATE where the failed send's message still reached the receiver.
    assert set(got) == {fid for fid, _ in later}
    for fid, payload in later:
        assert backend.receiver.frames[fid] == payload
    assert len(backend.receiver.frames) == 3


def test_heartbeat_reaches_the_receiver(backend: Backend) -> None:
    transport = backend.make()
    status = frames_pb2.DeviceStatus(device_id=DEVICE, model_version="m1", outbox_depth=3, counters={"kept": 7})

    transport.heartbeat(status)

    if isinstance(backend.receiver, GrpcTestReceiver):
        assert backend.receiver.heartbeats == [status]
    else:
        wait_for(lambda: bool(backend.receiver.heartbeats), what="the heartbeat")
        assert backend.receiver.heartbeats == [(DEVICE, status)]


def test_empty_send_does_not_touch_the_network(backend: Backend) -> None:
    transport = create_transport(backend.unreachable_config(), DEVICE)
    try:
        assert transport.send([]) == []
    finally:
        transport.close()


# -- configuration ----------------------------------------------------------------------------


def test_transport_config_is_discriminated_by_type() -> None:
    adapter = TypeAdapter(TransportConfig)
    assert isinstance(adapter.validate_python({"type": "grpc", "target": "h:1"}), GrpcTransportConfig)
    mqtt_cfg = adapter.validate_python({"type": "mqtt", "host": "broker", "password": "s3cret"})
    assert isinstance(mqtt_cfg, MqttTransportConfig)
    assert "s3cret" not in repr(mqtt_cfg)
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "carrier-pigeon"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "grpc", "tagret": "typo:1"})


@pytest.mark.parametrize("config_cls", [GrpcTransportConfig, MqttTransportConfig])
def test_every_config_field_is_described(config_cls: type) -> None:
    undocumented = [name for name, f in config_cls.model_fields.items() if not f.description]
    assert undocumented == []


def test_create_transport_builds_each_kind_without_connecting() -> None:
    grpc_t = create_transport(GrpcTransportConfig(target="127.0.0.1:1"), DEVICE)
    mqtt_t = create_transport(MqttTransportConfig(port=1, client_id="agent-{device_id}-x"), DEVICE)
    try:
        assert isinstance(grpc_t, GrpcTransport)
        assert isinstance(mqtt_t, MqttTransport)
        assert mqtt_t.client_id == f"agent-{DEVICE}-x"
        assert mqtt_t.frames_topic == f"edgeloop/v1/devices/{DEVICE}/frames"
        assert mqtt_t.acks_topic == f"edgeloop/v1/devices/{DEVICE}/acks"
    finally:
        grpc_t.close()
        mqtt_t.close()


def test_grpc_method_paths_match_the_generated_stub() -> None:
    assert UPLOAD_METHOD == "/edgeloop.v1.Ingest/UploadFrames"
    assert HEARTBEAT_METHOD == "/edgeloop.v1.Ingest/Heartbeat"


# -- gRPC: deadlines, message size, TLS -------------------------------------------------------


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcTestReceiver]:
    receiver = GrpcTestReceiver().start()
    yield receiver
    receiver.stop()


def test_grpc_deadline_returns_the_acks_received_so_far(grpc_receiver: GrpcTestReceiver) -> None:
    grpc_receiver.delay_s = 0.2
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target, deadline_s=1.0), DEVICE)
    payloads = [frame(i) for i in range(20)]
    try:
        started = time.monotonic()
        acks = transport.send(payloads)
        elapsed = time.monotonic() - started

        assert 1.0 <= elapsed < 2.0
        assert 1 <= len(acks) < len(payloads)
        assert all(a.status == AckStatus.STORED for a in acks)
        assert [a.frame_id for a in acks] == [fid for fid, _ in payloads[: len(acks)]]

        # The rest goes through once the receiver is fast again; nothing is stored twice.
        grpc_receiver.delay_s = 0.0
        rest = send_until_acked(transport, payloads[len(acks) :], timeout=5.0)
        assert len(rest) == len(payloads) - len(acks)
        assert len(grpc_receiver.frames) == len(payloads)
    finally:
        transport.close()


def test_grpc_deadline_without_any_ack_raises(grpc_receiver: GrpcTestReceiver) -> None:
    grpc_receiver.delay_s = 3.0
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target, deadline_s=0.5), DEVICE)
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match="DEADLINE_EXCEEDED"):
            transport.send([frame(0)])
        assert time.monotonic() - started < 1.5
    finally:
        transport.close()


def test_grpc_peer_that_never_answers_fails_after_the_connect_timeout() -> None:
    with socket.socket() as silent:  # accepts TCP (the kernel does) but never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        transport = GrpcTransport(GrpcTransportConfig(target=target, connect_timeout_s=1.0, deadline_s=30.0), DEVICE)
        try:
            started = time.monotonic()
            with pytest.raises(TransportError):
                transport.send([frame(0)])
            assert time.monotonic() - started < FAIL_FAST_S
        finally:
            transport.close()


def test_grpc_send_after_close_is_a_transport_error(grpc_receiver: GrpcTestReceiver) -> None:
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target), DEVICE)
    transport.close()
    with pytest.raises(TransportError, match="closed"):
        transport.send([frame(0)])


def test_grpc_connections_spread_one_send_over_that_many_tcp_connections(grpc_receiver: GrpcTestReceiver) -> None:
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target, connections=4), DEVICE)
    try:
        payloads = [frame(i) for i in range(10)]
        acks = transport.send(payloads)
        assert by_id(acks) == {fid: AckStatus.STORED for fid, _ in payloads}
        assert grpc_receiver.frames == dict(payloads)
        # Parts of 3, 3, 3 and 1 frames, one call each, from four client ports.
        assert len(grpc_receiver.peers) == 4
        assert len(set(grpc_receiver.peers)) == 4, grpc_receiver.peers

        # A batch smaller than the connections uses as many calls as it has frames.
        grpc_receiver.peers.clear()
        assert len(transport.send([frame(100), frame(101)])) == 2
        assert len(grpc_receiver.peers) == 2
    finally:
        transport.close()


def test_grpc_connections_return_the_acks_of_parts_that_got_through(grpc_receiver: GrpcTestReceiver) -> None:
    """One part's call runs out of time, the other part's acks still count; the rest goes later."""
    grpc_receiver.delay_s = 0.5
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target, connections=2, deadline_s=0.8), DEVICE)
    try:
        # Parts: frames 0-1 (the second would be answered at ~1.0 s, past the deadline) and frame 2.
        payloads = [frame(i) for i in range(3)]
        acked = by_id(transport.send(payloads))
        assert acked == {payloads[0][0]: AckStatus.STORED, payloads[2][0]: AckStatus.STORED}

        grpc_receiver.delay_s = 0.0
        rest = send_until_acked(transport, [payloads[1]], timeout=5.0)
        assert rest == {payloads[1][0]: AckStatus.STORED}
        assert set(grpc_receiver.frames) == {fid for fid, _ in payloads}
    finally:
        transport.close()


def test_grpc_sends_frames_above_grpc_default_4mb_limit(grpc_receiver: GrpcTestReceiver) -> None:
    transport = GrpcTransport(GrpcTransportConfig(target=grpc_receiver.target), DEVICE)
    payload = frame(0, size=8 * 1024 * 1024)
    try:
        assert by_id(transport.send([payload])) == {payload[0]: AckStatus.STORED}
        assert grpc_receiver.frames[payload[0]] == payload[1]
    finally:
        transport.close()


def test_grpc_too_large_is_permanent_but_a_saturated_server_is_not() -> None:
    """RESOURCE_EXHAUSTED covers both: the agent sets aside bytes the receiver can never take, and
    retries frames a busy server turned away (gRPC's "Concurrent RPC limit exceeded")."""
    with GrpcTestReceiver(max_message_bytes=64 * 1024) as small:
        transport = GrpcTransport(GrpcTransportConfig(target=small.target), DEVICE)
        try:
            with pytest.raises(TransportError) as too_large:
                transport.send([frame(0, size=256 * 1024)])
        finally:
            transport.close()
    assert too_large.value.permanent and "RESOURCE_EXHAUSTED" in str(too_large.value)

    with GrpcTestReceiver(max_concurrent_rpcs=1, delay_s=1.5) as busy:
        holder = GrpcTransport(GrpcTransportConfig(target=busy.target), DEVICE)
        other = GrpcTransport(GrpcTransportConfig(target=busy.target, deadline_s=5), DEVICE)
        try:
            slow = threading.Thread(target=holder.send, args=([frame(1)],))
            slow.start()
            time.sleep(0.5)  # the first call holds the only slot
            with pytest.raises(TransportError) as saturated:
                other.send([frame(2)])
            slow.join()
        finally:
            holder.close()
            other.close()
    assert "RESOURCE_EXHAUSTED" in str(saturated.value) and not saturated.value.permanent


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_ip: tuple[Path, Path]  # (cert, key) valid for 127.0.0.1 and localhost
    server_named: tuple[Path, Path]  # valid for receiver.test only
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, an unrelated CA, two server certificates and a client certificate, made now."""
    pytest.importorskip("cryptography.x509")
    from tests.fakes.pki import CLIENT_AUTH, SERVER_AUTH, TestCA, loopback_names, x509

    out = tmp_path_factory.mktemp("pki")
    ca = TestCA(out, "edgeloop-test-ca")
    return Pki(
        ca=ca.path,
        other_ca=TestCA(out, "unrelated-ca").path,
        server_ip=ca.issue("server-ip", loopback_names(), SERVER_AUTH),
        server_named=ca.issue("server-named", [x509.DNSName("receiver.test")], SERVER_AUTH),
        client=ca.issue("device-1", [x509.DNSName(DEVICE)], CLIENT_AUTH),
    )


def _server_tls(cert_key: tuple[Path, Path], client_ca: Path | None = None) -> ServerTLS:
    return ServerTLS(
        cert_chain=cert_key[0].read_bytes(),
        private_key=cert_key[1].read_bytes(),
        client_ca=client_ca.read_bytes() if client_ca else None,
    )


def _tls_send(receiver: GrpcTestReceiver, tls: TLSConfig) -> list[Ack]:
    cfg = GrpcTransportConfig(target=receiver.target, tls=tls, connect_timeout_s=1.0)
    transport = GrpcTransport(cfg, DEVICE)
    try:
        return transport.send([frame(0)])
    finally:
        transport.close()


def test_grpc_tls_verifies_the_server_and_rejects_an_unknown_ca(pki: Pki) -> None:
    with GrpcTestReceiver(tls=_server_tls(pki.server_ip)) as receiver:
        acks = _tls_send(receiver, TLSConfig(ca_file=pki.ca))
        assert [a.status for a in acks] == [AckStatus.STORED]

        started = time.monotonic()
        with pytest.raises(TransportError):
            _tls_send(receiver, TLSConfig(ca_file=pki.other_ca))
        assert time.monotonic() - started < FAIL_FAST_S
        assert len(receiver.frames) == 1


def test_grpc_tls_server_name_override(pki: Pki) -> None:
    with GrpcTestReceiver(tls=_server_tls(pki.server_named)) as receiver:
        with pytest.raises(TransportError):  # the certificate is not valid for 127.0.0.1
            _tls_send(receiver, TLSConfig(ca_file=pki.ca))
        acks = _tls_send(receiver, TLSConfig(ca_file=pki.ca, server_name="receiver.test"))
        assert [a.status for a in acks] == [AckStatus.STORED]


def test_grpc_mutual_tls(pki: Pki) -> None:
    cert, key = pki.client
    with GrpcTestReceiver(tls=_server_tls(pki.server_ip, client_ca=pki.ca)) as receiver:
        with pytest.raises(TransportError):  # no client certificate
            _tls_send(receiver, TLSConfig(ca_file=pki.ca))
        acks = _tls_send(receiver, TLSConfig(ca_file=pki.ca, cert_file=cert, key_file=key))
        assert [a.status for a in acks] == [AckStatus.STORED]


def test_grpc_missing_tls_file_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot read"):
        GrpcTransport(GrpcTransportConfig(tls=TLSConfig(ca_file=tmp_path / "nope.pem")), DEVICE)


# -- MQTT: persistent sessions, authorization, TLS --------------------------------------------


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_mqtt_acks_published_while_the_agent_is_offline_arrive_after_reconnect(mosquitto_factory, protocol) -> None:
    broker = mosquitto_factory()
    receiver = MqttTestReceiver(broker.host, broker.port).start()
    settings = {**_mqtt_test_settings(broker.port, protocol), "ack_timeout_s": 0.5}
    agent = MqttTransport(MqttTransportConfig(**settings), DEVICE)
    try:
        receiver.stop()  # its session keeps collecting frames at the broker
        early = frame(0)
        assert agent.send([early]) == []  # the broker took it; nobody acknowledged it yet
        agent.close()

        receiver.start()
        wait_for(lambda: early[0] in receiver.frames, what="the queued frame to reach the receiver")
        receiver.stop()  # the ack now waits in the agent's session

        agent = MqttTransport(MqttTransportConfig(**settings), DEVICE)
        receiver.start()
        later = frame(1)
        acks = by_id(agent.send([later]))

        # The late ack of the earlier run comes back with this send's own.
        assert acks == {early[0]: AckStatus.STORED, later[0]: AckStatus.STORED}
        assert receiver.frames[early[0]] == early[1]
    finally:
        agent.close()
        receiver.stop(timeout=1.0)


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_mqtt_connection_lost_fails_the_batch_in_flight_at_once(mosquitto_factory, protocol) -> None:
    """Finding 10: a batch waiting for the receiver's acks when the connection dropped waited out its
    whole ack deadline although paho had seen the loss. Now the send fails as soon as the loss is
    seen, and the same frames go through once the broker is back."""
    broker = mosquitto_factory()
    receiver = MqttTestReceiver(broker.host, broker.port).start()
    receiver.stop()  # its session queues the frames at the broker; no ack comes meanwhile
    settings = {**_mqtt_test_settings(broker.port, protocol), "ack_timeout_s": 120.0, "publish_timeout_s": 120.0}
    agent = MqttTransport(MqttTransportConfig(**settings), DEVICE)
    payloads = [frame(0), frame(1)]
    outcome: dict[str, object] = {}

    def send() -> None:
        try:
            outcome["acks"] = agent.send(payloads)
        except TransportError as err:
            outcome["error"] = str(err)
        outcome["done"] = time.monotonic()

    sender = threading.Thread(target=send)
    try:
        agent.heartbeat(frames_pb2.DeviceStatus(device_id=DEVICE))  # connected before the batch goes
        sender.start()
        time.sleep(0.5)  # published and PUBACKed on loopback by now; the send waits for acks
        assert sender.is_alive()
        lost_at = time.monotonic()
        broker.stop()
        sender.join(30)
        assert not sender.is_alive()
        assert "connection lost" in str(outcome.get("error")), outcome
        assert outcome["done"] - lost_at < FAIL_FAST_S  # not the 120 s ack deadline

        broker.start()
        receiver.start()
        got = send_until_acked(agent, payloads, timeout=15.0)
        assert set(got) == {fid for fid, _ in payloads}
        assert {fid: receiver.frames[fid] for fid, _ in payloads} == dict(payloads)
    finally:
        agent.close()
        receiver.stop(timeout=1.0)


@pytest.mark.slow
def test_mqtt_session_survives_a_broker_restart(mosquitto_factory) -> None:
    broker = mosquitto_factory()
    receiver = MqttTestReceiver(broker.host, broker.port).start()
    settings = {**_mqtt_test_settings(broker.port), "ack_timeout_s": 0.5}
    agent = MqttTransport(MqttTransportConfig(**settings), DEVICE)
    try:
        receiver.stop()
        early = frame(0)
        assert agent.send([early]) == []
        agent.close()
        broker.restart()  # the frame queued for the receiver must survive this

        receiver.start()
        wait_for(lambda: early[0] in receiver.frames, what="the frame queued before the restart")
        receiver.stop()
        broker.restart()  # and the ack queued for the agent must survive this one

        agent = MqttTransport(MqttTransportConfig(**settings), DEVICE)
        acks = by_id(agent.send([frame(1)]))
        assert acks.get(early[0]) == AckStatus.STORED
    finally:
        agent.close()
        receiver.stop(timeout=1.0)


def test_mqtt_connected_agent_rides_out_a_broker_restart(mosquitto_factory) -> None:
    broker = mosquitto_factory()
    receiver = MqttTestReceiver(broker.host, broker.port).start()
    agent = MqttTransport(MqttTransportConfig(**_mqtt_test_settings(broker.port)), DEVICE)
    try:
        assert len(agent.send([frame(0)])) == 1
        broker.restart()
        payloads = [frame(1), frame(2)]
        got = send_until_acked(agent, payloads, timeout=10.0)
        assert set(got.values()) <= AckStatus.FINAL and len(got) == 2
    finally:
        agent.close()
        receiver.stop(timeout=1.0)


def test_mqtt_publish_denied_by_acl_is_a_clear_error(mosquitto_factory) -> None:
    acl = (
        f"user {DEVICE}\n"
        f"topic read edgeloop/v1/devices/{DEVICE}/acks\n"
        f"topic write edgeloop/v1/devices/{DEVICE}/status\n"
    )
    broker = mosquitto_factory(users={DEVICE: "pw"}, acl=acl)
    settings = _mqtt_test_settings(broker.port)
    agent = MqttTransport(MqttTransportConfig(**settings, username=DEVICE, password="pw"), DEVICE)
    try:
        with pytest.raises(TransportError, match="refused the publish.*Not authorized"):
            agent.send([frame(0)])
        agent.heartbeat(frames_pb2.DeviceStatus(device_id=DEVICE))  # allowed by the ACL
    finally:
        agent.close()


def test_mqtt_wrong_password_is_a_clear_error(mosquitto_factory) -> None:
    broker = mosquitto_factory(users={DEVICE: "pw"})
    settings = _mqtt_test_settings(broker.port)
    agent = MqttTransport(MqttTransportConfig(**settings, username=DEVICE, password="wrong"), DEVICE)
    try:
        started = time.monotonic()
        with pytest.raises(TransportError, match="refused the connection"):
            agent.send([frame(0)])
        assert time.monotonic() - started < FAIL_FAST_S
    finally:
        agent.close()


def test_mqtt_tls(mosquitto_factory, pki: Pki) -> None:
    cert, key = pki.server_named
    broker = mosquitto_factory(tls=BrokerTLS(ca_file=pki.ca, cert_file=cert, key_file=key))
    receiver = MqttTestReceiver(broker.host, broker.port, tls_ca=pki.ca).start()
    settings = _mqtt_test_settings(broker.port)

    def send(tls: TLSConfig) -> list[Ack]:
        agent = MqttTransport(MqttTransportConfig(**settings, tls=tls), DEVICE)
        try:
            return agent.send([frame(0)])
        finally:
            agent.close()

    try:
        assert [a.status for a in send(TLSConfig(ca_file=pki.ca, server_name="receiver.test"))] == [AckStatus.STORED]
        with pytest.raises(TransportError, match="(?i)certificate"):
            send(TLSConfig(ca_file=pki.ca))  # not valid for 127.0.0.1
        with pytest.raises(TransportError, match="(?i)certificate"):
            send(TLSConfig(ca_file=pki.other_ca, server_name="receiver.test"))
    finally:
        receiver.stop(timeout=1.0)

"""Device credentials: the CA and certificates, the registry's state, and the credentials at work.

The MQTT tests run a real Mosquitto with the password and ACL files the registry writes; the
gRPC tests run a real mutual-TLS gRPC server with the registry's server credentials.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edge_agent.config import load_agent_config
from edge_agent.transports import GrpcTransportConfig, MqttTransport, MqttTransportConfig
from edgeloop import topics
from edgeloop.v1 import frames_pb2
from server.devices import (
    AlreadyRevoked,
    DeviceExists,
    DeviceRegistry,
    DevicesConfig,
    InvalidDeviceId,
    UnknownDevice,
    mosquitto_hash,
    verify_mosquitto_hash,
)
from server.devices_cli import devices_app
from server.ingest.base import DeviceDirectory
from tests.fixtures.mosquitto import MOSQUITTO_PASSWD, BrokerTLS, MosquittoBroker

P = topics.DEFAULT_PREFIX
WAIT_S = 5.0
QUIET_S = 0.7  # how long "nothing arrives" is watched for
# The rest of an agent config, for loading a bundle's transport snippet as part of one.
AGENT_REST = "source: {uri: frames}\ndetector: {type: onnxruntime, model: m.onnx}\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    return DeviceRegistry(DevicesConfig(root=tmp_path / "devices"))


# -- certificates ---------------------------------------------------------------------------------


def test_device_certificate_names_the_device_and_chains_to_the_ca(registry: DeviceRegistry) -> None:
    creds = registry.add("cam-a", group="dock")
    ca = load_cert(registry.ca_file)
    cert = load_cert(creds.cert_file)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-a"
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert load_cert(creds.ca_file) == ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key = load_pem_private_key(creds.key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert creds.device.cert_serial == cert.serial_number
    assert creds.device.cert_expires == cert.not_valid_after_utc

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert mode(registry.ca_key_file) == 0o600
    # The CA is created once: a second registry (another process) signs with the same one.
    other = DeviceRegistry(registry.config).add("cam-b")
    load_cert(other.cert_file).verify_directly_issued_by(ca)
    assert load_cert(registry.ca_file) == ca


def test_server_certificate_covers_names_and_ips_and_is_issued_once(tmp_path: Path) -> None:
    cfg = DevicesConfig(root=tmp_path / "d", server_names=["ingest.example", "localhost", "10.1.2.3"])
    reg = DeviceRegistry(cfg)
    creds = reg.server_credentials()
    cert = load_cert(creds.cert_file)
    cert.verify_directly_issued_by(load_cert(creds.ca_file))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"ingest.example", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert mode(creds.key_file) == 0o600

    assert load_cert(reg.server_credentials().cert_file).serial_number == cert.serial_number
    # Changed names: a new certificate for them.
    renamed = DeviceRegistry(DevicesConfig(root=cfg.root, server_names=["other.example"]))
    new = load_cert(renamed.server_credentials().cert_file)
    assert new.serial_number != cert.serial_number
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["other.example"]


# -- bundle, ids, state ---------------------------------------------------------------------------


def test_bundle_holds_working_agent_settings_and_private_files(registry: DeviceRegistry) -> None:
    creds = registry.add("cam-a")
    bundle = creds.bundle_dir
    assert bundle == registry.root / "bundles" / "cam-a"
    assert {p.name for p in bundle.iterdir()} == {
        "ca.pem",
        "device.pem",
        "device.key",
        "transport-grpc.yaml",
        "transport-mqtt.yaml",
    }
    assert mode(bundle) == 0o700
    assert mode(creds.key_file) == 0o600
    assert mode(creds.mqtt_config) == 0o600  # it holds the password

    # Each snippet is a valid agent transport section whose relative paths resolve into the bundle.
    for snippet, model in ((creds.grpc_config, GrpcTransportConfig), (creds.mqtt_config, MqttTransportConfig)):
        doc = yaml.safe_load(snippet.read_text())
        assert doc["device_id"] == "cam-a"
        cfg = model.model_validate(doc["transport"])
        assert cfg.tls is not None and cfg.tls.ca_file == Path("ca.pem")
    # Merged into an agent config beside the bundle files, they load and point at those files.
    for snippet in (creds.grpc_config, creds.mqtt_config):
        agent_yaml = bundle / "edge.yaml"
        agent_yaml.write_text(snippet.read_text() + AGENT_REST)
        agent = load_agent_config(agent_yaml)
        assert agent.device_id == "cam-a" and agent.transport is not None and agent.transport.tls is not None
        tls = agent.transport.tls
        assert (tls.ca_file, tls.cert_file, tls.key_file) == (creds.ca_file, creds.cert_file, creds.key_file)
    assert isinstance(agent.transport, MqttTransportConfig)
    assert agent.transport.username == "cam-a"
    assert agent.transport.password is not None
    assert agent.transport.password.get_secret_value() == creds.mqtt_password

    # The registry keeps only a hash of the password.
    state_text = registry.state_path.read_text()
    assert creds.mqtt_password not in state_text
    assert creds.mqtt_password not in registry.password_file.read_text()
    assert creds.mqtt_password not in repr(creds)
    stored = json.loads(state_text)["devices"]["cam-a"]["password_hash"]
    assert verify_mosquitto_hash(stored, creds.mqtt_password)
    assert not verify_mosquitto_hash(stored, creds.mqtt_password + "x")
    assert mode(registry.state_path) == 0o600


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "has space", "-lead", "x" * 65, "caf\u00e9"])
def test_invalid_ids_are_refused(registry: DeviceRegistry, bad: str) -> None:
    with pytest.raises(InvalidDeviceId):
        registry.add(bad)
    assert registry.list() == []


def test_duplicate_active_id_and_service_names_are_refused(registry: DeviceRegistry) -> None:
    first = registry.add("cam-a")
    with pytest.raises(DeviceExists, match="already exists"):
        registry.add("cam-a")
    with pytest.raises(DeviceExists, match="service user"):
        registry.add("edgeloop-bridge")
    with pytest.raises(InvalidDeviceId):
        registry.add("cam-c", group="a/b")
    # The refused add changed nothing.
    assert [d.cert_serial for d in registry.list()] == [first.device.cert_serial]


def test_state_is_shared_between_instances_and_revoke_is_seen_without_restart(tmp_path: Path) -> None:
    cfg = DevicesConfig(root=tmp_path / "devices")
    server_side, cli_side = DeviceRegistry(cfg), DeviceRegistry(cfg)
    directory: DeviceDirectory = server_side  # what ingest is given
    assert not directory.is_active("cam-a")  # unknown

    a = cli_side.add("cam-a", group="north")
    cli_side.add("cam-b")
    assert server_side.is_active("cam-a") and server_side.is_active("cam-b")
    listed = {d.device_id: d for d in server_side.list()}
    assert listed["cam-a"].group == "north" and listed["cam-a"].active and listed["cam-a"].revoked is None

    result = cli_side.revoke("cam-a")
    assert result.device.revoked is not None and result.broker_reloaded is False
    assert not server_side.is_active("cam-a")  # picked up from devices.json, no restart
    assert server_side.is_active("cam-b")
    assert server_side.is_certificate_revoked(a.device.cert_serial)
    assert not server_side.is_certificate_revoked(cli_side.get("cam-b").cert_serial)
    assert not a.bundle_dir.exists()  # the dead key and password are not left lying around
    assert not DeviceRegistry(cfg).get("cam-a").active

    with pytest.raises(AlreadyRevoked):
        cli_side.revoke("cam-a")
    with pytest.raises(UnknownDevice):
        cli_side.revoke("nobody")

    # A revoked id may be issued again; the old certificate stays revoked.
    again = cli_side.add("cam-a")
    assert again.device.cert_serial != a.device.cert_serial
    assert server_side.is_active("cam-a")
    assert server_side.is_certificate_revoked(a.device.cert_serial)
    assert not server_side.is_certificate_revoked(again.device.cert_serial)


def test_require_registered_off_accepts_unknown_but_not_revoked(tmp_path: Path) -> None:
    reg = DeviceRegistry(DevicesConfig(root=tmp_path / "d", require_registered=False))
    assert reg.is_active("anyone")
    reg.add("cam-a")
    reg.revoke("cam-a")
    assert not reg.is_active("cam-a")


def test_concurrent_adds_from_threads_all_land(registry: DeviceRegistry) -> None:
    other = DeviceRegistry(registry.config)
    errors: list[BaseException] = []

    def add(reg: DeviceRegistry, i: int) -> None:
        try:
            reg.add(f"cam-{i}")
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=add, args=(registry if i % 2 else other, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [d.device_id for d in registry.list()] == sorted(f"cam-{i}" for i in range(8))
    users = {line.split(":", 1)[0] for line in registry.password_file.read_text().splitlines()}
    assert users >= {f"cam-{i}" for i in range(8)}


# -- Mosquitto files ------------------------------------------------------------------------------


def test_hash_format_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text("")
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(pwfile), "u", "s3cret"], check=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$")
    assert verify_mosquitto_hash(theirs, "s3cret") and not verify_mosquitto_hash(theirs, "s3cre")
    salt = base64.b64decode(theirs.split("$")[3])
    assert mosquitto_hash("s3cret", iterations=int(theirs.split("$")[2]), salt=salt) == theirs


def test_acl_rules_as_written(registry: DeviceRegistry) -> None:
    registry.add("cam-a")
    registry.add("cam-b")
    registry.add("cam-g", group="dock")
    registry.revoke("cam-b")
    acl = registry.acl_file.read_text()
    block = acl[acl.index("user cam-a") : acl.index("user cam-g")].strip().splitlines()
    assert block == [
        "user cam-a",
        f"topic write {P}/devices/cam-a/frames",
        f"topic write {P}/devices/cam-a/status",
        f"topic read {P}/devices/cam-a/acks",
        f"topic read {P}/releases/devices/cam-a",
        f"topic read {P}/releases/channels/+",
    ]
    grouped = acl[acl.index("user cam-g") :].strip().splitlines()
    assert grouped[-1] == f"topic read {P}/releases/groups/dock/+"
    assert len(grouped) == len(block) + 1
    assert "cam-b" not in acl
    assert "user edgeloop-bridge" in acl and f"topic read {P}/devices/+/frames" in acl
    users = [line.split(":", 1)[0] for line in registry.password_file.read_text().splitlines()]
    assert users == ["edgeloop-announcer", "edgeloop-bridge", "cam-a", "cam-g"]
    # Service passwords are generated once and kept.
    assert registry.service_password("edgeloop-bridge") == DeviceRegistry(registry.config).service_password(
        "edgeloop-bridge"
    )
    assert mode(registry.service_dir / "edgeloop-bridge.password") == 0o600
    before = registry.password_file.read_text()
    registry.write_mosquitto_files()
    assert registry.password_file.read_text() == before  # hashes are stable when nothing changed


class Client:
    """A small synchronous wrapper around a paho MQTT 5 client for the assertions below."""

    def __init__(self, port: int, user: str | None, password: str | None, *, tls_ca: Path | None = None) -> None:
        self.cond = threading.Condition()
        self.connack: mqtt.ReasonCode | None = None
        self.pubacks: dict[int, mqtt.ReasonCode] = {}
        self.subacks: dict[int, list] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.disconnected = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{id(self)}", protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        with self.cond:
            if self.connack is None or rc.is_failure:
                self.connack = rc
            if rc.is_failure:
                client.disconnect()  # no reconnect loop with refused credentials
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc, props) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert self.wait(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def subscribe(self, topic_filter: str) -> None:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert self.wait(lambda: mid in self.subacks), f"no SUBACK for {topic_filter}"

    def received(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> list[Client]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def start_broker(
    factory: Callable[..., MosquittoBroker], registry: DeviceRegistry, pid_file: Path, tls: BrokerTLS | None = None
) -> MosquittoBroker:
    files = registry.write_mosquitto_files()
    # The fixture writes allow_anonymous true when it manages no users; the later line wins.
    return factory(extra_conf=files.conf_lines() + f"pid_file {pid_file}", tls=tls)


def test_mqtt_acl_keeps_devices_to_their_own_topics_and_revoke_locks_out(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], clients: list[Client]
) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    reg = DeviceRegistry(DevicesConfig(root=tmp_path / "devices", mosquitto_pid_file=pid_file))
    a, b = reg.add("cam-a", group="dock"), reg.add("cam-b", group="yard")
    broker = start_broker(mosquitto_factory, reg, pid_file)
    port = broker.port

    def connect(user: str | None, password: str | None) -> Client:
        c = Client(port, user, password)
        clients.append(c)
        return c

    assert connect(None, None).connack.is_failure  # anonymous refused
    wrong = connect("cam-a", b.mqtt_password)
    assert wrong.connack.is_failure and wrong.connack.getName() == "Not authorized"
    bridge = connect("edgeloop-bridge", reg.service_password("edgeloop-bridge"))
    announcer = connect("edgeloop-announcer", reg.service_password("edgeloop-announcer"))
    dev_a = connect("cam-a", a.mqtt_password)
    dev_b = connect("cam-b", b.mqtt_password)
    for c in (bridge, announcer, dev_a, dev_b):
        assert not c.connack.is_failure, c.connack

    bridge.subscribe(topics.shared("ingest", topics.all_frames(P)))
    bridge.subscribe(topics.shared("ingest", topics.all_status(P)))
    dev_a.subscribe(topics.acks(P, "cam-a"))
    dev_a.subscribe(topics.acks(P, "cam-b"))  # granted by the broker, but nothing may arrive
    dev_a.subscribe(f"{P}/releases/#")

    # Publishing: own topics go through; another device's topic is refused in the PUBACK (MQTT 5).
    assert not dev_a.publish(topics.frames(P, "cam-a"), b"frame-a").is_failure
    assert not dev_a.publish(topics.status(P, "cam-a"), b"status-a").is_failure
    refused = dev_a.publish(topics.frames(P, "cam-b"), b"forged")
    assert refused.is_failure and refused.getName() == "Not authorized"
    assert dev_a.publish(topics.acks(P, "cam-a"), b"self-ack").is_failure
    assert dev_a.publish(topics.channel_release(P, "stable"), b"fake release").is_failure

    # The bridge's shared subscription gets what devices may send, never the forged frame.
    assert bridge.wait(lambda: bridge.received(topics.frames(P, "cam-a")) == [b"frame-a"])
    assert bridge.wait(lambda: bridge.received(topics.status(P, "cam-a")) == [b"status-a"])

    # Reading: A gets its own acks and the releases meant for it, not B's.
    assert not bridge.publish(topics.acks(P, "cam-b"), b"ack-for-b").is_failure
    assert not bridge.publish(topics.acks(P, "cam-a"), b"ack-for-a").is_failure
    assert not announcer.publish(topics.channel_release(P, "stable"), b"rel-stable", retain=True).is_failure
    assert not announcer.publish(topics.device_release(P, "cam-a"), b"rel-a", retain=True).is_failure
    assert not announcer.publish(topics.device_release(P, "cam-b"), b"rel-b", retain=True).is_failure
    assert not announcer.publish(topics.group_release(P, "dock", "stable"), b"rel-dock", retain=True).is_failure
    assert not announcer.publish(topics.group_release(P, "yard", "stable"), b"rel-yard", retain=True).is_failure
    assert dev_a.wait(lambda: dev_a.received(topics.acks(P, "cam-a")) == [b"ack-for-a"])
    assert dev_a.wait(lambda: dev_a.received(topics.device_release(P, "cam-a")) == [b"rel-a"])
    assert dev_a.wait(lambda: dev_a.received(topics.channel_release(P, "stable")) == [b"rel-stable"])
    assert dev_a.wait(lambda: dev_a.received(topics.group_release(P, "dock", "stable")) == [b"rel-dock"])
    time.sleep(QUIET_S)
    assert dev_a.received(topics.acks(P, "cam-b")) == []
    assert dev_a.received(topics.device_release(P, "cam-b")) == []
    assert dev_a.received(topics.group_release(P, "yard", "stable")) == []
    assert bridge.received(topics.frames(P, "cam-b")) == []

    # Revoke: the broker reloads (SIGHUP via the pid file), drops A's connection and refuses it.
    assert pid_file.exists()
    assert reg.revoke("cam-a").broker_reloaded
    assert dev_a.wait(lambda: dev_a.disconnected)
    dev_a.client.loop_stop()
    assert connect("cam-a", a.mqtt_password).connack.getName() == "Not authorized"
    # Others carry on.
    assert not dev_b.publish(topics.frames(P, "cam-b"), b"frame-b").is_failure
    assert bridge.wait(lambda: bridge.received(topics.frames(P, "cam-b")) == [b"frame-b"])

    # A device added while the broker runs can connect after the automatic reload.
    c = reg.add("cam-c")
    assert c.broker_reloaded
    deadline = time.monotonic() + WAIT_S
    while True:  # the reload is asynchronous to the signal
        late = connect("cam-c", c.mqtt_password)
        if not late.connack.is_failure or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not late.connack.is_failure


def test_agent_mqtt_transport_works_from_the_bundle_over_tls(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], clients: list[Client]
) -> None:
    """The bundle's MQTT settings, as written, get a real agent transport through a TLS broker."""
    cfg = DevicesConfig(root=tmp_path / "devices", mqtt_host="127.0.0.1", mqtt_port=1)
    reg = DeviceRegistry(cfg)
    server = reg.server_credentials()
    broker = mosquitto_factory(
        extra_conf=reg.write_mosquitto_files().conf_lines(),
        tls=BrokerTLS(ca_file=server.ca_file, cert_file=server.cert_file, key_file=server.key_file),
        start=False,
    )
    creds = reg.add("cam-a")  # after write_mosquitto_files: the broker must see it at start
    broker.start()
    bridge = Client(broker.port, "edgeloop-bridge", reg.service_password("edgeloop-bridge"), tls_ca=server.ca_file)
    clients.append(bridge)
    bridge.subscribe(topics.shared("ingest", topics.all_status(P)))

    # The bundle names port 1: the test broker's port is only known now and comes as an override.
    agent_yaml = creds.bundle_dir / "edge.yaml"
    agent_yaml.write_text(creds.mqtt_config.read_text() + AGENT_REST)
    agent = load_agent_config(agent_yaml, env={"EDGELOOP_AGENT__TRANSPORT__PORT": str(broker.port)})
    assert isinstance(agent.transport, MqttTransportConfig)
    transport = MqttTransport(agent.transport, "cam-a")
    try:
        transport.heartbeat(frames_pb2.DeviceStatus(device_id="cam-a"))
        assert bridge.wait(lambda: len(bridge.received(topics.status(P, "cam-a"))) == 1)
    finally:
        transport.close()


# -- gRPC mutual TLS ------------------------------------------------------------------------------


@pytest.fixture
def grpc_server(registry: DeviceRegistry):
    seen: list[dict] = []

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        ctx = context.auth_context()
        seen.append(ctx)
        verified = registry.verify_peer(ctx)
        return json.dumps({"cn": [v.decode() for v in ctx.get("x509_common_name", [])], "verified": verified}).encode()

    handler = grpc.method_handlers_generic_handler(
        "edgeloop.test.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", registry.grpc_server_credentials())
    server.start()
    yield port, seen
    server.stop(None)


def call_who(port: int, ca: Path, cert: Path | None, key: Path | None) -> dict:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return json.loads(channel.unary_unary("/edgeloop.test.Who/Who")(b"", timeout=WAIT_S))


def test_grpc_mutual_tls_shows_the_device_identity(registry: DeviceRegistry, grpc_server, tmp_path: Path) -> None:
    port, seen = grpc_server
    a = registry.add("cam-a")
    registry.add("cam-b")
    answer = call_who(port, a.ca_file, a.cert_file, a.key_file)
    assert answer == {"cn": ["cam-a"], "verified": "cam-a"}
    assert seen[-1]["x509_common_name"] == [b"cam-a"]

    # A certificate from another CA, or none at all, does not get through the handshake.
    foreign = DeviceRegistry(DevicesConfig(root=tmp_path / "elsewhere")).add("cam-a")
    for cert, key in ((foreign.cert_file, foreign.key_file), (None, None)):
        with pytest.raises(grpc.RpcError) as err:
            call_who(port, a.ca_file, cert, key)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # gRPC has no revocation lists: a revoked certificate still handshakes, and the receiver
    # refuses it by asking the registry; a re-issued id does not revive the old certificate.
    saved = {n: Path(tmp_path / n) for n in ("a.pem", "a.key")}
    saved["a.pem"].write_bytes(a.cert_file.read_bytes())
    saved["a.key"].write_bytes(a.key_file.read_bytes())
    registry.revoke("cam-a")
    assert call_who(port, registry.ca_file, saved["a.pem"], saved["a.key"]) == {"cn": ["cam-a"], "verified": None}
    new_a = registry.add("cam-a")
    assert call_who(port, registry.ca_file, saved["a.pem"], saved["a.key"])["verified"] is None
    assert call_who(port, registry.ca_file, new_a.cert_file, new_a.key_file)["verified"] == "cam-a"


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_add_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    root = str(tmp_path / "devices")

    added = runner.invoke(devices_app, ["add", "cam-a", "--group", "dock", "--root", root])
    assert added.exit_code == 0, added.output
    reg = DeviceRegistry(DevicesConfig(root=Path(root)))
    password = next(line.split(": ", 1)[1] for line in added.stdout.splitlines() if line.startswith("MQTT password"))
    assert verify_mosquitto_hash(json.loads(reg.state_path.read_text())["devices"]["cam-a"]["password_hash"], password)
    assert str(reg.bundles_dir / "cam-a") in added.stdout
    assert "reload the broker yourself" in added.stdout

    listed = runner.invoke(devices_app, ["list", "--json", "--root", root])
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.stdout)
    assert entry["id"] == "cam-a" and entry["group"] == "dock" and entry["active"] is True
    assert int(entry["cert_serial"], 16) == reg.get("cam-a").cert_serial

    table = runner.invoke(devices_app, ["list", "--root", root])
    assert table.exit_code == 0 and "cam-a" in table.stdout and "active" in table.stdout

    revoked = runner.invoke(devices_app, ["revoke", "cam-a", "--root", root])
    assert revoked.exit_code == 0, revoked.output
    assert not reg.is_active("cam-a")
    assert json.loads(runner.invoke(devices_app, ["list", "--json", "--root", root]).stdout)[0]["active"] is False

    cert = runner.invoke(devices_app, ["server-cert", "--root", root])
    assert cert.exit_code == 0, cert.output
    paths = dict(line.split(": ", 1) for line in cert.stdout.splitlines())
    assert Path(paths["cert_file"]).is_file() and Path(paths["key_file"]).is_file()
    assert Path(paths["ca_file"]) == reg.ca_file


def test_cli_reads_the_devices_section_of_a_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "server.yaml"
    conf.write_text(yaml.safe_dump({"devices": {"root": "reg", "topic_prefix": "plant/v2"}, "other": {"x": 1}}))
    result = CliRunner().invoke(devices_app, ["add", "cam-a", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    acl = (tmp_path / "reg" / "mosquitto" / "acl").read_text()
    assert "topic write plant/v2/devices/cam-a/frames" in acl


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "bad/id"], "invalid device id"),
        (["add", "cam-a"], "already exists"),
        (["revoke", "nobody"], "no device 'nobody'"),
        (["revoke", "gone"], "already revoked"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    root = tmp_path / "devices"
    reg = DeviceRegistry(DevicesConfig(root=root))
    reg.add("cam-a")
    reg.add("gone")
    reg.revoke("gone")
    result = CliRunner().invoke(devices_app, [*args, "--root", str(root)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("devices:\n  cert_days: -1\n  nonsense: 1\n")
    result = CliRunner().invoke(devices_app, ["list", "--config", str(conf)])
    assert result.exit_code == 2
    assert "cert_days" in result.stderr and "nonsense" in result.stderr
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(devices_app, ["list", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read" in missing.stderr


def test_the_broker_config_lines_carry_per_client_limits_mosquitto_accepts(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    """What ``mosquitto-files`` prints bounds what one client may cost the broker, and a real
    Mosquitto starts with it (an unknown option would stop it)."""
    reg = DeviceRegistry(DevicesConfig(root=tmp_path / "devices"))
    lines = reg.write_mosquitto_files().conf_lines()
    for option in ("max_packet_size 16842752", "max_queued_messages 10000", "max_keepalive 300"):
        assert option in lines
    assert "persistent_client_expiration 7d" in lines and "max_queued_bytes" in lines
    broker = mosquitto_factory(extra_conf=lines)
    assert broker.running

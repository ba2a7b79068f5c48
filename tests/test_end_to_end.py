"""The server end to end, as a user runs it: ``edgeloop server run`` in its own process with
mutual-TLS gRPC, an MQTT bridge on a real Mosquitto with a generated password file and ACL,
FiftyOne on a real MongoDB and the FiftyOne App; real edge agents with the ONNX Runtime detector
on COCO images upload into it.

One deployment serves several checks (starting it costs ~30 s on 2 cores):
ingest over both transports, bad input, and access control.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.app import Agent
from edge_agent.config import AgentConfig
from edge_agent.sources import SourceConfig, open_source
from edge_agent.transports import TransportError, create_transport
from edgeloop import topics
from edgeloop.convert import ack_from_pb
from edgeloop.domain import AckStatus
from edgeloop.v1 import frames_pb2
from server.devices import DeviceRegistry, DevicesConfig
from server.ingest.heartbeats import read_fleet
from tests.fakes.frames import make_frame
from tests.fixtures.server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"
COCO = SHARED / "data" / "coco8" / "images"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} missing (../shared beside the checkout)"),
]

UPLOAD_PATH = "/edgeloop.v1.Ingest/UploadFrames"


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, fiftyone_env):
    """Devices registered, broker and server running; yields a namespace of handles."""
    from tests.fixtures.mosquitto import MosquittoBroker, _free_port

    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "server"
    pid_file = tmp / "mosquitto.pid"
    devices = DeviceRegistry(DevicesConfig(root=data / "devices", mosquitto_pid_file=pid_file))
    creds = {name: devices.add(name) for name in ("cam-grpc", "cam-mqtt", "cam-other")}
    # Read now: a revoke deletes the device's bundle, and the test still plays the device afterwards.
    pem = {n: (c.ca_file.read_bytes(), c.key_file.read_bytes(), c.cert_file.read_bytes()) for n, c in creds.items()}
    server_tls = devices.server_credentials()
    broker_dir = tmp / "mosquitto"
    broker_dir.mkdir()
    broker = MosquittoBroker(
        workdir=broker_dir,
        port=_free_port(),
        extra_conf=devices.write_mosquitto_files().conf_lines() + f"pid_file {pid_file}\n",
    ).start()
    dataset = f"e2e-{uuid.uuid4().hex[:8]}"
    app_port = free_port()
    config = {
        "data_dir": str(data),
        "grpc": {
            "port": free_port(),
            "tls": {
                "cert_file": str(server_tls.cert_file),
                "key_file": str(server_tls.key_file),
                "client_ca_file": str(server_tls.ca_file),
            },
        },
        "mqtt": {
            "enabled": True,
            "port": broker.port,
            "username": "edgeloop-bridge",
            "password": devices.service_password("edgeloop-bridge"),
        },
        "mongo": {"uri": fiftyone_env},
        "inbox": {"dataset": dataset},
        "devices": {"mosquitto_pid_file": str(pid_file)},
        "app": {"enabled": True, "port": app_port},
        "metrics": {"enabled": True, "port": free_port()},
    }
    try:
        server = ServerProcess(tmp, config).start()
    except BaseException:
        broker.stop()  # the broker must not outlive a deployment that never came up
        raise
    ns = type("Deployment", (), {})()
    ns.tmp, ns.data, ns.devices, ns.creds, ns.broker, ns.server = tmp, data, devices, creds, broker, server
    ns.dataset, ns.app_url, ns.server_tls, ns.pem = dataset, f"http://127.0.0.1:{app_port}", server_tls, pem
    ns.metrics_url = f"http://127.0.0.1:{config['metrics']['port']}/metrics"
    try:
        yield ns
    finally:
        server.stop()
        broker.stop()
        print(server.log_tail(200))


def _tls(cred) -> dict:
    return {"ca_file": str(cred.ca_file), "cert_file": str(cred.cert_file), "key_file": str(cred.key_file)}


def _agent_config(d, device: str, transport: dict, tmp: Path) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": device,
            "source": {"uri": str(COCO / "train")},
            "detector": {"type": "onnxruntime", "model": str(MODEL)},
            "triggers": {"random": {"enabled": True, "rate": 1.0}},
            "budget": {"dedup": {"enabled": False}, "frames_per_minute": 1e6, "bytes_per_minute": 1e12},
            "outbox": {"path": str(tmp / f"{device}-outbox.sqlite3")},
            "transport": transport,
            "upload": {"backoff_initial_s": 0.1, "backoff_max_s": 1.0, "heartbeat_s": 1.0},
            "metrics": {"enabled": False},
            "drain_on_exit_s": 90,
            "seed": 0,
        }
    )


def _coco_frames():
    for split in ("train", "val"):
        yield from open_source(SourceConfig(uri=str(COCO / split), source_id="coco"))


def _samples(dataset: str):
    import fiftyone as fo

    ds = fo.load_dataset(dataset)
    ds.reload()
    return ds


def _media_files(d) -> list[Path]:
    return [p for p in (d.data / "media").rglob("*") if p.is_file() and not p.parent.name.startswith(".")]


def test_agents_upload_over_grpc_and_mqtt_into_fiftyone(deployment):
    d = deployment
    grpc_cfg = _agent_config(
        d, "cam-grpc", {"type": "grpc", "target": d.server.grpc_target, "tls": _tls(d.creds["cam-grpc"])}, d.tmp
    )
    mqtt_cfg = _agent_config(
        d,
        "cam-mqtt",
        {
            "type": "mqtt",
            "port": d.broker.port,
            "username": "cam-mqtt",
            "password": d.creds["cam-mqtt"].mqtt_password,
            "ack_timeout_s": 5,
        },
        d.tmp,
    )
    sent: dict[str, set[str]] = {}
    for cfg in (grpc_cfg, mqtt_cfg):
        agent = Agent(cfg)
        try:
            counters = agent.run(_coco_frames())
            assert counters["frames_enqueued"] == 8, counters
            assert counters["frames_uploaded"] == 8, f"{cfg.device_id}: {counters}"
            assert agent.outbox.depth == 0
        finally:
            agent.close()

    ds = _samples(d.dataset)
    ids = ds.values("frame_id")
    assert len(ids) == 16 == len(set(ids)), "every frame exactly once"
    for device in ("cam-grpc", "cam-mqtt"):
        sent[device] = set(ds.match({"device_id": device}).values("frame_id"))
        assert len(sent[device]) == 8
    labels = {det.label for dets in ds.values("predictions") if dets for det in dets.detections}
    assert {"giraffe", "zebra", "person"} <= labels
    for sample in ds:
        assert "random" in sample.tags  # the reasons became tags
        assert sample.reasons and sample.model_version.startswith("8.4.115+sha256:")
        assert Path(sample.filepath).is_file()
    assert len(_media_files(d)) == 16

    # Heartbeats reported each device's running model.
    def reported() -> dict:
        return read_fleet(d.data)

    wait_for(lambda: {"cam-grpc", "cam-mqtt"} <= set(reported()), 10, "heartbeats from both devices")
    for entry in reported().values():
        assert entry.status.model_version.startswith("8.4.115+sha256:")


def test_fiftyone_app_serves_the_inbox(deployment):
    d = deployment
    page = urllib.request.urlopen(d.app_url + "/", timeout=30).read().decode()
    assert "<html" in page.lower()
    query = {"query": f'query {{ dataset(name: "{d.dataset}") {{ name estimatedSampleCount }} }}'}
    req = urllib.request.Request(
        d.app_url + "/graphql", data=json.dumps(query).encode(), headers={"Content-Type": "application/json"}
    )
    answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert answer["data"]["dataset"]["name"] == d.dataset
    assert answer["data"]["dataset"]["estimatedSampleCount"] == len(_samples(d.dataset))


def _grpc_channel(d, device: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(*d.pem[device])
    return grpc.secure_channel(d.server.grpc_target, creds, options=[("grpc.max_send_message_length", 64 << 20)])


def _upload_raw(channel: grpc.Channel, payloads: list[bytes]):
    call = channel.stream_stream(
        UPLOAD_PATH, request_serializer=lambda b: b, response_deserializer=frames_pb2.FrameAck.FromString
    )
    return [ack_from_pb(a) for a in call(iter(payloads), timeout=30)]


def test_bad_input_over_grpc_gets_the_right_error_and_stores_nothing(deployment):
    d = deployment
    before, files_before = len(_samples(d.dataset)), len(_media_files(d))
    with _grpc_channel(d, "cam-grpc") as channel:
        for payload, status in [
            (os.urandom(4096), grpc.StatusCode.INVALID_ARGUMENT),  # random bytes
            (make_frame(device="cam-grpc")[1][:-40], grpc.StatusCode.INVALID_ARGUMENT),  # truncated
            (make_frame(device="cam-grpc", image=os.urandom(50 << 20))[1], grpc.StatusCode.RESOURCE_EXHAUSTED),
            (make_frame(device="cam-mqtt")[1], grpc.StatusCode.PERMISSION_DENIED),  # speaks for another device
        ]:
            with pytest.raises(grpc.RpcError) as err:
                _upload_raw(channel, [payload])
            assert err.value.code() == status, err.value.details()
        per_frame = [
            make_frame(device="cam-grpc", image=b"\xff\xd8 not a jpeg")[1],
            make_frame(device="cam-grpc", boxes=((1, 2, 500, 40),))[1],  # outside the 64x48 image
            make_frame(device="cam-grpc", class_id=7)[1],  # no such class
        ]
        good_id, good = make_frame(device="cam-grpc")
        acks = _upload_raw(channel, [*per_frame, good])
    assert [a.status for a in acks] == [AckStatus.REJECTED] * 3 + [AckStatus.STORED]
    assert [a.message.split(":")[0] for a in acks[:3]] == ["bad_image", "box_outside", "unknown_class"]
    assert len(_samples(d.dataset)) == before + 1  # the good frame, nothing else
    assert len(_media_files(d)) == files_before + 1  # no orphan file


def test_bad_input_over_mqtt_is_logged_counted_and_stores_nothing(deployment):
    d = deployment
    before = len(_samples(d.dataset))
    files_before = len(_media_files(d))
    acks: list = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-cam-mqtt", protocol=mqtt.MQTTv5)
    client.username_pw_set("cam-mqtt", d.creds["cam-mqtt"].mqtt_password)
    client.on_message = lambda c, u, m: acks.append(ack_from_pb(frames_pb2.FrameAck.FromString(m.payload)))
    client.connect("127.0.0.1", d.broker.port)
    client.loop_start()
    try:
        client.subscribe(topics.acks(topics.DEFAULT_PREFIX, "cam-mqtt"), qos=1)
        topic = topics.frames(topics.DEFAULT_PREFIX, "cam-mqtt")
        for payload in (os.urandom(4096), make_frame(device="cam-mqtt")[1][:-40], make_frame(device="cam-grpc")[1]):
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        bad = [
            make_frame(device="cam-mqtt", image=b"\xff\xd8 not a jpeg"),
            make_frame(device="cam-mqtt", boxes=((1, 2, 500, 40),)),
            make_frame(device="cam-mqtt", class_id=7),
            # Just over the bridge's 16 MiB: refused unparsed, by its id. (The broker's generated
            # max_packet_size, 64 KiB above, lets it through; a larger one would disconnect us.)
            make_frame(device="cam-mqtt", image=os.urandom(16 << 20)),
        ]
        good = make_frame(device="cam-mqtt")
        for _fid, payload in [*bad, good]:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_for(lambda: any(a.frame_id == good[0] for a in acks), 30, "the good frame's ack")
    finally:
        client.loop_stop()
        client.disconnect()
    status = {a.frame_id: a for a in acks}
    assert status[good[0]].status == AckStatus.STORED
    assert [status[f].status for f, _ in bad] == [AckStatus.REJECTED] * 4
    assert status[bad[3][0]].message.startswith("too_large")
    assert len(_samples(d.dataset)) == before + 1
    assert len(_media_files(d)) == files_before + 1
    metrics = urllib.request.urlopen(d.metrics_url, timeout=10).read().decode()
    for reason in ("malformed", "device_mismatch", "bad_image", "box_outside", "unknown_class", "too_large"):
        pattern = rf'^edgeloop_server_frames_rejected_total{{reason="{reason}",transport="mqtt"}} (\S+)$'
        line = re.search(pattern, metrics, re.M)
        assert line and float(line[1]) >= 1, reason


def test_access_control_and_revocation(deployment, tmp_path):
    d = deployment
    before = len(_samples(d.dataset))
    # gRPC: cam-other's certificate cannot send frames as cam-grpc.
    with _grpc_channel(d, "cam-other") as channel, pytest.raises(grpc.RpcError) as err:
        _upload_raw(channel, [make_frame(device="cam-grpc")[1]])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # MQTT: cam-other cannot publish on cam-grpc's topic (the ACL; MQTT 5 says so in the PUBACK).
    forged = create_transport(
        AgentConfig.model_validate(
            {
                "device_id": "cam-grpc",
                "source": {"uri": "x"},
                "detector": {"type": "onnxruntime", "model": "x.onnx"},
                "transport": {
                    "type": "mqtt",
                    "port": d.broker.port,
                    "username": "cam-other",
                    "password": d.creds["cam-other"].mqtt_password,
                    "ack_timeout_s": 2,
                },
            }
        ).transport,
        "cam-grpc",
    )
    with pytest.raises(TransportError, match="(?i)not authori"):
        forged.send([make_frame(device="cam-grpc")])
    forged.close()
    # A legitimate frame from cam-other still works, until it is revoked.
    with _grpc_channel(d, "cam-other") as channel:
        assert _upload_raw(channel, [make_frame(device="cam-other")[1]])[0].status == AckStatus.STORED
    revocation = d.devices.revoke("cam-other")
    assert revocation.broker_reloaded
    with _grpc_channel(d, "cam-other") as channel, pytest.raises(grpc.RpcError) as err:
        _upload_raw(channel, [make_frame(device="cam-other")[1]])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    outcome: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="revoked", protocol=mqtt.MQTTv5)
    client.username_pw_set("cam-other", d.creds["cam-other"].mqtt_password)
    client.on_connect = lambda c, u, f, rc, p: outcome.append("refused" if rc.is_failure else "connected")
    client.connect("127.0.0.1", d.broker.port)
    client.loop_start()
    try:
        wait_for(lambda: outcome, 10, "the broker's CONNACK")
    finally:
        client.loop_stop()
        client.disconnect()
    assert outcome[0] == "refused", "a revoked device connected to the broker"
    assert len(_samples(d.dataset)) == before + 1  # only cam-other's legitimate frame

"""``workers: 2`` runs ingest in two processes: gRPC connections and MQTT messages are spread over
both, every frame is stored once, each process counts its own share, and the workers go away with
the main process -- on a stop, and on a ``kill -9`` of the main process."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.transports import (
    GrpcTransport,
    GrpcTransportConfig,
    MqttTransport,
    MqttTransportConfig,
    Transport,
)
from edge_agent.transports.grpc import UPLOAD_METHOD
from edgeloop.convert import ack_from_pb
from edgeloop.domain import AckStatus
from edgeloop.v1 import frames_pb2
from tests.fakes.frames import make_frame
from tests.fixtures.mosquitto import MosquittoBroker
from tests.fixtures.server_process import ServerProcess, free_port

pytestmark = pytest.mark.slow

CONNECTIONS = 16  # gRPC connections; the kernel hashes each to one of the 2 processes
PER_CONNECTION = 8
MQTT_FRAMES = 64
AGENT_CONNECTIONS = 16  # one device's `connections`: its batch is split over that many
AGENT_FRAMES = 64


def _worker_metrics_port(log: str, pid: int) -> int:
    """Worker 1's own (loopback) metrics port, from the main process's log line about it."""
    found = re.findall(rf"ingest worker 1 \(pid {pid}\) serving gRPC on port \d+, metrics on (\d+)", log)
    assert found, f"no start line for worker pid {pid}"
    return int(found[-1])


def _stored(metrics_port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "edgeloop_server_frames_stored":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no frames_stored counter")


def _upload_on_own_connection(target: str, frames: list[tuple[str, bytes]]) -> list[AckStatus]:
    # A local subchannel pool: every channel opens its own TCP connection, as separate devices do.
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.stream_stream(
            UPLOAD_METHOD, request_serializer=lambda b: b, response_deserializer=frames_pb2.FrameAck.FromString
        )(iter(payload for _, payload in frames), timeout=60.0)
        return [ack_from_pb(ack).status for ack in call]


def _upload_as_an_agent_would(target: str, frame: tuple[str, bytes], attempts: int = 10) -> AckStatus:
    """Upload one frame, resending on UNAVAILABLE as the agent's uploader does: a connection the
    kernel queued on a worker's listener just as that worker died is reset, and a resend opens a
    new one (handled by a live process)."""
    for _ in range(attempts - 1):
        try:
            return _upload_on_own_connection(target, [frame])[0]
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.2)
    return _upload_on_own_connection(target, [frame])[0]


def _send_and_close(transport: Transport, frames: list[tuple[str, bytes]]) -> list[AckStatus]:
    """One send of every frame as an agent's transport does it; the acks' statuses, sorted."""
    try:
        return sorted(a.status for a in transport.send(frames))
    finally:
        transport.close()


def _worker_pids(main_pid: int) -> list[int]:
    """The spawned workers (not multiprocessing's resource tracker)."""
    children = psutil.Process(main_pid).children()
    return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_two_ingest_processes_share_the_load_store_each_frame_once_and_die_with_the_main_process(
    tmp_path: Path, fiftyone_env: str, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    import fiftyone as fo

    broker = mosquitto_factory()
    dataset = f"workers-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    config = {
        "data_dir": str(tmp_path / "server"),
        "workers": 2,
        # The agent below splits its batches over AGENT_CONNECTIONS streams: allow one device that many.
        "grpc": {"port": free_port(), "max_streams_per_device": AGENT_CONNECTIONS},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port},
        "mongo": {"uri": fiftyone_env},
        "inbox": {"dataset": dataset},
        "devices": {"require_registered": False},
        "metrics": {"enabled": True, "port": metrics_port},
    }
    server = ServerProcess(tmp_path, config).start()
    try:
        assert len(_worker_pids(server.proc.pid)) == 1, "worker 1 is not running"
        assert "ingest worker 1 (pid" in server.log_path.read_text()

        sent: set[str] = set()
        first = make_frame(0, device="cam-0")
        for c in range(CONNECTIONS):
            frames = [make_frame(c * PER_CONNECTION + i, device=f"cam-{c}") for i in range(PER_CONNECTION)]
            frames[0] = first if c == 0 else frames[0]
            assert _upload_on_own_connection(server.grpc_target, frames) == [AckStatus.STORED] * PER_CONNECTION
            sent |= {fid for fid, _ in frames}

        mqtt_frames = [make_frame(1000 + i, device="cam-mqtt") for i in range(MQTT_FRAMES)]
        transport = MqttTransport(MqttTransportConfig(host="127.0.0.1", port=broker.port), "cam-mqtt")
        assert _send_and_close(transport, mqtt_frames) == [AckStatus.STORED] * MQTT_FRAMES
        sent |= {fid for fid, _ in mqtt_frames}

        # Each process stored a share (gRPC: 16 connections hashed over 2 listeners; MQTT: the
        # shared subscription alternates), and metrics.port shows their sum: exactly what was sent.
        (worker,) = _worker_pids(server.proc.pid)
        worker_share = _stored(_worker_metrics_port(server.log_path.read_text(), worker))
        total = _stored(metrics_port)
        assert total == len(sent)
        assert 0 < worker_share < total, f"one process stored nothing: worker 1 {worker_share} of {total}"

        # One device with `connections: 16` splits a batch over 16 connections, which the kernel
        # hashes over both processes: one device's frames are stored by both (all 16 landing on
        # one process has a chance of 2 in 65,536).
        agent_frames = [make_frame(2000 + i, device="cam-backlog") for i in range(AGENT_FRAMES)]
        agent = GrpcTransport(
            GrpcTransportConfig(target=server.grpc_target, connections=AGENT_CONNECTIONS), "cam-backlog"
        )
        assert _send_and_close(agent, agent_frames) == [AckStatus.STORED] * AGENT_FRAMES
        sent |= {fid for fid, _ in agent_frames}
        worker_part = _stored(_worker_metrics_port(server.log_path.read_text(), worker)) - worker_share
        assert _stored(metrics_port) == len(sent)
        assert 0 < worker_part < AGENT_FRAMES, f"worker 1 stored {worker_part} of the device's {AGENT_FRAMES} frames"
        ds = fo.load_dataset(dataset)
        ds.reload()
        stored = ds.values("frame_id")
        assert sorted(stored) == sorted(sent)
        assert all(Path(p).is_file() for p in ds.values("filepath"))

        # A worker that dies is started again; the server serves throughout.
        (dead,) = _worker_pids(server.proc.pid)
        psutil.Process(dead).kill()
        more = [make_frame(500 + i, device=f"cam-after-{i}") for i in range(4)]
        for frame in more:  # each on its own connection, while worker 1 is down or starting
            assert _upload_as_an_agent_would(server.grpc_target, frame) in (AckStatus.STORED, AckStatus.DUPLICATE)
        sent |= {fid for fid, _ in more}
        deadline = time.monotonic() + 120
        while _worker_pids(server.proc.pid) in ([], [dead]) and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_for_text = f"ingest worker 1 (pid {_worker_pids(server.proc.pid)[0]}) serving"
        while wait_for_text not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wait_for_text in server.log_path.read_text(), server.log_tail()
        assert f"ingest worker 1 (pid {dead}) exited with code -9" in server.log_path.read_text()

        # kill -9 of the main process: its workers notice (their pipe closes) and stop on their own.
        worker_pids = _worker_pids(server.proc.pid)
        server.kill()
        gone, alive = psutil.wait_procs([psutil.Process(p) for p in worker_pids if psutil.pid_exists(p)], timeout=60)
        assert not alive, f"workers outlived the main process: {alive}"

        # The port is free again: a restarted server binds it and stores a resend once.
        server.start()
        resend = _upload_on_own_connection(server.grpc_target, [first])
        assert resend == [AckStatus.DUPLICATE]
        ds.reload()
        assert ds.count() == len(sent)
        worker_pids = _worker_pids(server.proc.pid)
        assert len(worker_pids) == 1
    finally:
        server.stop()
    # A stop (SIGTERM) ends the workers too, each after draining.
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in worker_pids if psutil.pid_exists(p)], timeout=60)
    assert not alive
    assert server.proc.returncode == 0, server.log_tail()

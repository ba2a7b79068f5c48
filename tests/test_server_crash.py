"""Crash test: ``kill -9`` the server in the middle of a 2,000-frame upload. After a restart every
frame it had acknowledged is in the FiftyOne dataset and the media store, and once the agent's
outbox has drained every frame is there exactly once. Run with one server process and with two
ingest processes (``workers: 2``), every process killed at once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from edge_agent.budget import BudgetConfig, UploadBudget
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox, OutboxConfig
from edge_agent.transports.grpc import GrpcTransport, GrpcTransportConfig
from edge_agent.uploader import UploadConfig, Uploader
from tests.fakes.frames import make_frame
from tests.fixtures.server_process import ServerProcess, free_port

N_FRAMES = 2000
DEVICE = "cam-crash"

pytestmark = pytest.mark.slow


def _dataset(name: str):
    import fiftyone as fo

    ds = fo.load_dataset(name)
    ds.reload()
    return ds


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-ingest-processes"])
def test_kill_9_during_a_2000_frame_upload_loses_no_acknowledged_frame(
    tmp_path: Path, fiftyone_env: str, workers: int
) -> None:
    dataset = f"crash-{uuid.uuid4().hex[:8]}"
    config = {
        "workers": workers,
        "data_dir": str(tmp_path / "server"),
        "grpc": {"port": free_port()},
        "mongo": {"uri": fiftyone_env},
        "inbox": {"dataset": dataset},
        "devices": {"require_registered": False},
        "metrics": {"enabled": False},
    }
    server = ServerProcess(tmp_path, config).start()

    outbox = Outbox(OutboxConfig(path=tmp_path / "outbox.sqlite3"))
    all_ids = set()
    for i in range(N_FRAMES):
        frame_id, payload = make_frame(i, device=DEVICE)
        outbox.put(frame_id, payload, score=0.5)
        all_ids.add(frame_id)
    transport = GrpcTransport(
        GrpcTransportConfig(target=server.grpc_target, deadline_s=10, connect_timeout_s=1), DEVICE
    )
    uploader = Uploader(
        outbox,
        transport,
        UploadBudget(BudgetConfig(frames_per_minute=1e9, bytes_per_minute=1e15)),
        UploadConfig(batch_size=64, backoff_initial_s=0.1, backoff_max_s=0.5),
        AgentMetrics(),
    )
    try:
        uploader.start()
        deadline = time.monotonic() + 300
        while outbox.depth > N_FRAMES - 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Mid-upload: batches are in flight, in the core's queue and half-written. Every process
        # at once: the one holding the device's connection may be a worker.
        server.kill_all()
        uploader.stop()
        acked = all_ids - outbox.ids()
        assert 500 <= len(acked) < N_FRAMES, f"the kill came at the wrong moment ({len(acked)} acked)"

        server.start()
        ds = _dataset(dataset)
        stored = ds.values("frame_id")
        assert acked <= set(stored), f"{len(acked - set(stored))} acknowledged frame(s) lost"
        assert len(stored) == len(set(stored)), "a frame was stored twice"
        for path in ds.select_by("frame_id", list(acked)).values("filepath"):
            assert Path(path).is_file(), f"acknowledged frame without its image: {path}"

        # The agent resumes: redelivered frames (stored but unacknowledged before the kill) are not duplicated.
        assert uploader.drain(timeout=300), f"{outbox.depth} frame(s) never acknowledged"
        ds = _dataset(dataset)
        stored = ds.values("frame_id")
        assert len(stored) == N_FRAMES == len(set(stored))
        assert set(stored) == all_ids
        assert all(Path(p).is_file() for p in ds.values("filepath"))
    finally:
        uploader.stop()
        transport.close()
        outbox.close()
        server.stop()

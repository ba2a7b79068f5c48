"""The agent as a whole, against real receivers: a real gRPC server and a real Mosquitto broker
on loopback, the real ONNX Runtime detector on COCO images, the real outbox on disk."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge_agent.app import Agent
from edge_agent.budget import UploadBudget
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox, OutboxConfig
from edge_agent.transports import create_transport
from edge_agent.triggers import UncertaintyScorer
from edge_agent.uploader import UploadConfig, Uploader
from edgeloop.convert import parse_frame, serialize_frame
from edgeloop.domain import Frame, FrameRecord
from edgeloop.v1 import frames_pb2
from tests.fakes.detectors import ScriptedDetector
from tests.fakes.receivers import GrpcTestReceiver, MqttTestReceiver

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"
COCO_VAL = SHARED / "data" / "coco8" / "images" / "val"
COCO_TRAIN = SHARED / "data" / "coco8" / "images" / "train"

needs_shared = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} missing (../shared beside the checkout)")

KEEP_ALL = {"random": {"enabled": True, "rate": 1.0}}  # every frame kept: deterministic counts
#: No random share and no keep quantile: every frame a trigger fired on is kept (the scripted scores decide).
EVERY_SCORED_FRAME = {"random": {"enabled": False}, "keep": {"share": None}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, transport: dict | None = None, **extra) -> AgentConfig:
    data = {
        "device_id": "cam-test",
        "source": {"uri": str(COCO_TRAIN)},
        "detector": {"type": "onnxruntime", "model": str(MODEL)},
        "triggers": KEEP_ALL,
        "budget": {"frames_per_minute": 1e6, "bytes_per_minute": 1e12, "dedup": {"enabled": False}},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "upload": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "idle_poll_s": 0.02},
        "metrics": {"enabled": False},
        "transport": transport,
        "seed": 0,
    }
    data.update(extra)
    return AgentConfig.model_validate(data)


def _grpc_transport(target: str) -> dict:
    return {"type": "grpc", "target": target, "deadline_s": 5, "connect_timeout_s": 0.5}


def _mqtt_transport(port: int) -> dict:
    return {"type": "mqtt", "host": "127.0.0.1", "port": port, "connect_timeout_s": 1, "ack_timeout_s": 2}


@needs_shared
@pytest.mark.parametrize("kind", ["grpc", "mqtt"])
def test_offline_frames_wait_on_disk_then_arrive_byte_identical(kind, tmp_path, mosquitto_factory):
    """Receiver down: every kept frame waits in the outbox. Receiver back: every one arrives, with
    the exact bytes the outbox holds, and leaves the outbox only after the receiver's ack."""
    if kind == "grpc":
        port = _free_port()
        transport = _grpc_transport(f"127.0.0.1:{port}")
        broker = None
    else:
        broker = mosquitto_factory()
        transport = _mqtt_transport(broker.port)
        broker.stop()  # the whole MQTT path is down
    agent = Agent(_config(tmp_path, transport))
    try:
        counters = agent.run()
        assert counters["frames_read"] == 4 and counters["frames_enqueued"] == 4
        assert counters["frames_uploaded"] == 0 and counters["upload_errors"] >= 1
        stored = {p.frame_id: p.payload for p in agent.outbox.peek(100)}
        assert len(stored) == 4

        if kind == "grpc":
            receiver = GrpcTestReceiver(port=port).start()
        else:
            broker.start()
            receiver = MqttTestReceiver("127.0.0.1", broker.port).start()
        try:
            assert agent.uploader.drain(timeout=30), "outbox did not drain after the receiver came back"
            assert receiver.frames == stored  # byte-identical, each exactly once
            assert agent.outbox.depth == 0
            snapshot = agent.metrics.snapshot()
            assert snapshot["frames_uploaded"] == 4
            assert snapshot["bytes_uploaded"] == sum(len(p) for p in stored.values())
        finally:
            receiver.stop()
    finally:
        agent.close()
    rec = parse_frame(next(iter(stored.values())))
    assert rec.device_id == "cam-test" and rec.model_version and rec.class_names[0] == "person"
    assert any(r.trigger == "random" for r in rec.reasons)
    assert cv2.imdecode(np.frombuffer(rec.image, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (
        rec.height,
        rec.width,
    )


@needs_shared
def test_mqtt_frames_stay_until_the_receiver_acks(tmp_path, mosquitto_broker):
    """The broker's PUBACK is not enough: with the broker up but no receiver, frames stay in the
    outbox; the receiver's persistent session then gets them and its acks empty the outbox."""
    receiver = MqttTestReceiver("127.0.0.1", mosquitto_broker.port).start()
    receiver.stop()  # subscribed once: the broker now queues for its persistent session
    agent = Agent(_config(tmp_path, _mqtt_transport(mosquitto_broker.port)))
    try:
        agent.run()
        assert agent.outbox.depth == 4
        stored = {p.frame_id: p.payload for p in agent.outbox.peek(100)}
        receiver.start()
        try:
            assert agent.uploader.drain(timeout=30)
            assert receiver.frames == stored
        finally:
            receiver.stop()
    finally:
        agent.close()


def test_mqtt_connection_loss_fails_the_batch_in_flight_and_it_goes_again_after_reconnecting(
    tmp_path, mosquitto_factory
):
    """Finding 10 through the agent: its uploader's batch waits for the receiver's acks (deadline
    120 s) when the broker goes away. The round fails at once, counted and reported, with the
    frames kept; after the broker and the receiver are back they all arrive."""
    broker = mosquitto_factory()
    receiver = MqttTestReceiver("127.0.0.1", broker.port).start()
    receiver.stop()  # subscribed once: the broker queues frames for it, nobody acks yet
    transport = {
        **_mqtt_transport(broker.port),
        "ack_timeout_s": 120,
        "reconnect_min_delay_s": 0.1,
        "reconnect_max_delay_s": 0.3,
    }
    agent = Agent(_config(tmp_path, transport), detector=ScriptedDetector())
    rng = np.random.default_rng(2)
    try:
        for frame in _frames([rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(4)]):
            agent.process(frame, agent.detector.detect(frame.image))
        stored = {p.frame_id: p.payload for p in agent.outbox.peek(100)}
        assert len(stored) == 4
        result: dict[str, float] = {}

        def one_round() -> None:
            result["delay"] = agent.uploader.step()
            result["done"] = time.monotonic()

        uploading = threading.Thread(target=one_round)
        agent.transport.heartbeat(frames_pb2.DeviceStatus(device_id="cam-test"))  # connected before the batch
        uploading.start()
        time.sleep(0.5)  # the batch is with the broker; the uploader waits for the receiver's acks
        assert uploading.is_alive()
        lost_at = time.monotonic()
        broker.stop()
        uploading.join(30)
        assert not uploading.is_alive()
        assert result["done"] - lost_at < 10, "the round waited for its ack deadline"
        assert agent.metrics.snapshot()["upload_errors"] == 1
        assert "connection lost" in agent.uploader.last_error
        assert agent.outbox.depth == 4  # nothing left the outbox without an ack

        broker.start()
        receiver.start()
        try:
            assert agent.uploader.drain(timeout=30), "the frames did not go again after reconnecting"
            assert receiver.frames == stored
        finally:
            receiver.stop()
    finally:
        agent.close()


def _seed_outbox(outbox: Outbox, scores: list[float]) -> None:
    for i, s in enumerate(scores):
        rec = FrameRecord(
            frame_id=f"frame-{i:02d}",
            device_id="cam-test",
            capture_time=1000.0 + i,
            sequence=i,
            model_version="v1",
            image=b"\xff\xd8" + bytes(500),
            media_type="image/jpeg",
            width=64,
            height=48,
            uncertainty=s,
        )
        outbox.put(rec.frame_id, serialize_frame(rec), s)


def test_budget_sends_highest_scores_first(tmp_path):
    """Under a tight budget the most valuable frames go first, and no more than the budget."""

    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()
    scores = [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2]
    with GrpcTestReceiver() as receiver, Outbox(_config(tmp_path).outbox) as outbox:
        _seed_outbox(outbox, scores)
        cfg = _config(tmp_path, budget={"frames_per_minute": 60, "bytes_per_minute": 1e9, "burst_s": 3})
        transport = create_transport(_config(tmp_path, _grpc_transport(receiver.target)).transport, "cam-test")
        up = Uploader(outbox, transport, UploadBudget(cfg.budget, clock), UploadConfig(), AgentMetrics())
        up.step()
        assert set(receiver.frames) == {"frame-01", "frame-05", "frame-03"}  # scores 0.9, 0.8, 0.7
        assert up.step() > 0 and len(receiver.frames) == 3  # budget spent: it waits
        clock.t += 2.0  # two more frames' worth
        up.step()
        assert set(receiver.frames) - {"frame-01", "frame-05", "frame-03"} == {"frame-02", "frame-04"}
        transport.close()


def _frames(images: list[np.ndarray]) -> list[Frame]:
    return [Frame(image=im, source_id="cam", index=i, capture_time=1000.0 + i) for i, im in enumerate(images)]


def _random_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(n)]


def _capped_agent(tmp_path: Path, max_frames: int, **extra) -> Agent:
    """The scripted detector, no random share, an outbox capped at ``max_frames``."""
    outbox = {"path": str(tmp_path / "ob.sqlite3"), "max_frames": max_frames}
    cfg = _config(tmp_path, triggers=EVERY_SCORED_FRAME, outbox=outbox, **extra)
    return Agent(cfg, detector=ScriptedDetector())


def test_eviction_and_dedup_as_configured(tmp_path):
    distinct = _random_images(8, seed=0)
    agent = _capped_agent(tmp_path, 3, budget={"dedup": {"enabled": True, "window_s": 60}})
    cfg = agent.config
    try:
        counters = agent.run(_frames(distinct))
        assert counters["frames_kept"] == 8 and counters["frames_deduplicated"] == 0
        assert counters["frames_evicted"] == 5 and agent.outbox.depth == 3
        assert agent.outbox.counter("evicted") == 5
        # the three survivors are the three highest-scoring of the eight frames
        scorer = UncertaintyScorer(cfg.triggers, seed=0)
        det = ScriptedDetector()
        all_scores = [
            scorer.score("cam", det.detect(im), 1000.0 + i, image_size=(160, 120)).score
            for i, im in enumerate(distinct)
        ]
        kept_scores = sorted(p.score for p in agent.outbox.peek(10))
        assert kept_scores == pytest.approx(sorted(all_scores)[-3:])
    finally:
        agent.close()

    same = [distinct[0]] * 5
    cfg2 = _config(
        tmp_path,
        triggers=EVERY_SCORED_FRAME,
        outbox={"path": str(tmp_path / "ob2.sqlite3")},
        budget={"dedup": {"enabled": True, "window_s": 60}},
    )
    agent = Agent(cfg2, detector=ScriptedDetector(lambda i, im: ScriptedDetector.default_script(0, im)))
    try:
        counters = agent.run(_frames(same))
        assert counters["frames_kept"] == 5
        assert counters["frames_deduplicated"] == 4 and counters["frames_enqueued"] == 1
    finally:
        agent.close()


def test_every_eviction_leaves_a_log_line_that_accounts_for_the_counter(tmp_path, caplog):
    """Finding 9: frames evicted on arrival (276 of 330 in one run) were counted but never logged.
    Now each kept frame leaves either "enqueued frame <id>" or "evicted frame <id> ... on arrival",
    each held frame evicted later leaves "evicted frame <id>", and the counts agree."""
    caplog.set_level(logging.INFO)
    agent = _capped_agent(tmp_path, 3)
    try:
        counters = agent.run(_frames(_random_images(20, seed=1)))
        held = agent.outbox.ids()
    finally:
        agent.close()
    lines = [r.getMessage() for r in caplog.records]
    enqueued = {m.split()[2] for m in lines if m.startswith("enqueued frame ")}
    evicted = [m for m in lines if m.startswith("evicted frame ")]
    on_arrival = {m.split()[2] for m in evicted if "on arrival" in m}
    later = {m.split()[2] for m in evicted if "on arrival" not in m}
    assert len(evicted) == counters["frames_evicted"] > 0
    assert on_arrival, "the scripted scores were meant to evict some frames on arrival"
    assert len(enqueued) + len(on_arrival) == counters["frames_kept"] == 20
    assert not on_arrival & enqueued and later <= enqueued
    assert held == enqueued - later


def test_metrics_endpoint_reports_counters(tmp_path):
    cfg = _config(tmp_path, metrics={"enabled": True, "host": "127.0.0.1", "port": 0})
    agent = Agent(cfg, detector=ScriptedDetector())
    try:
        agent.run(_frames([np.zeros((64, 64, 3), np.uint8)] * 3))
        body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.server_port}/metrics", timeout=5).read()
        text = body.decode()
        assert re.search(r"^edgeloop_agent_frames_read_total 3\.0$", text, re.M)
        assert re.search(r"^edgeloop_agent_frames_enqueued_total 3\.0$", text, re.M)
        assert "edgeloop_agent_inference_seconds_count 3.0" in text
        assert re.search(r"^edgeloop_agent_outbox_depth ", text, re.M)
    finally:
        agent.close()


@needs_shared
def test_score_cli_prints_json_per_image():
    """Acceptance: `edgeloop agent score coco8/val --model yolov8n_int8.onnx --json`."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeloop.cli",
            "agent",
            "score",
            str(COCO_VAL),
            "--model",
            str(MODEL),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["frame"] for r in rows] == sorted(p.name for p in COCO_VAL.iterdir())
    names = {d["class"] for r in rows for d in r["detections"]}
    assert {"giraffe", "zebra"} <= names or {"person"} <= names
    for r in rows:
        assert set(r) >= {"detections", "score", "keep", "reasons"}
        assert 0.0 <= r["score"] <= 1.0
        for reason in r["reasons"]:
            assert reason["trigger"] and isinstance(reason["detail"], str)
    assert any(r["reasons"] for r in rows), "no trigger fired on any COCO image"
    # the closing summary (on stderr: stdout stays one JSON object per line) adds up the rows
    kept = sum(r["keep"] for r in rows)
    fired: dict[str, int] = {}
    for r in rows:
        for reason in r["reasons"]:
            fired[reason["trigger"]] = fired.get(reason["trigger"], 0) + 1
    summary = res.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"kept {kept} of {len(rows)} frames; triggers fired: ")
    assert all(f"{name} {n}" in summary for name, n in fired.items())
    # unrelated photos are not a stream: nothing compares a photo with the one before
    assert not {"novelty", "flicker", "count_jump"} & set(fired)


def test_bad_config_gives_a_clear_cli_error(tmp_path):
    bad = tmp_path / "edge.yaml"
    bad.write_text(yaml.safe_dump({"device_id": "cam", "source": {"uri": "x"}, "detectr": {}}))
    res = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "agent", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "detectr" in res.stderr and "config-schema" in res.stderr
    assert "Traceback" not in res.stderr


@needs_shared
def test_a_finite_run_whose_uploads_all_failed_says_where_the_frames_wait(tmp_path):
    cfg = tmp_path / "edge.yaml"
    outbox = tmp_path / "outbox" / "outbox.sqlite3"
    cfg.write_text(
        yaml.safe_dump(
            {
                "device_id": "cam-x",
                "source": {"uri": str(COCO_VAL)},
                "detector": {"type": "onnxruntime", "model": str(MODEL)},
                "triggers": KEEP_ALL,
                "outbox": {"path": str(outbox)},
                "transport": {"type": "grpc", "target": f"127.0.0.1:{_free_port()}", "connect_timeout_s": 0.2},
                "metrics": {"enabled": False},
            }
        )
    )
    res = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    warning = [ln for ln in res.stderr.splitlines() if "WARNING" in ln and "were not uploaded" in ln]
    assert len(warning) == 1, res.stderr
    assert "4 kept frame(s)" in warning[0] and str(outbox) in warning[0]
    assert Outbox(OutboxConfig(path=outbox)).depth == 4  # and they are there


def test_config_env_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": "cam",
                "source": {"uri": "frames"},
                "detector": {"type": "onnxruntime", "model": "models/m.onnx"},
                "outbox": {"path": "state/outbox.sqlite3"},
            }
        )
    )
    cfg = load_agent_config(
        path,
        env={"EDGELOOP_AGENT__DEVICE_ID": "cam-9", "EDGELOOP_AGENT__BUDGET__FRAMES_PER_MINUTE": "12"},
    )
    assert cfg.device_id == "cam-9" and cfg.budget.frames_per_minute == 12
    assert cfg.detector.model == tmp_path / "models" / "m.onnx"
    assert cfg.outbox.path == tmp_path / "state" / "outbox.sqlite3"


ENQUEUED = re.compile(r"enqueued frame ([0-9a-f]{32})")


@needs_shared
@pytest.mark.slow
def test_kill_9_mid_upload_loses_no_enqueued_frame(tmp_path):
    """An agent process uploads to a slow receiver and is killed with SIGKILL mid-upload. A new
    agent process on the same outbox delivers every frame the first one had enqueued."""
    # Slower than the agent enqueues (~15-25 frames/s here), so a backlog is certain at the kill.
    receiver = GrpcTestReceiver(delay_s=0.2).start()
    cfg = {
        "device_id": "cam-kill",
        "source": {"uri": str(COCO_TRAIN), "loop": True},
        "detector": {"type": "onnxruntime", "model": str(MODEL), "intra_op_threads": 1},
        "triggers": KEEP_ALL,
        "budget": {"dedup": {"enabled": False}, "frames_per_minute": 1e6, "bytes_per_minute": 1e12},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "transport": _grpc_transport(receiver.target),
        "upload": {"batch_size": 4},
        "metrics": {"enabled": False},
    }
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeloop.cli", "agent", "run", "--config", str(cfg_path)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    enqueued: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = ENQUEUED.search(line)
            if m:
                enqueued.append(m.group(1))
            # kill once uploads are under way and frames are still queued behind them
            if len(enqueued) >= 24 and receiver.frames or time.monotonic() > deadline:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    enqueued += ENQUEUED.findall(rest or "")
    delivered_before = set(receiver.frames)
    assert enqueued and delivered_before, "the kill came too early to test anything"
    assert set(enqueued) - delivered_before, "nothing was left to deliver after the kill"

    # A fresh agent on the same outbox: no new frames (limit 1 frame, random off), just drain.
    cfg["source"] = {"uri": str(COCO_VAL), "limit": 1}
    cfg["triggers"] = {
        "random": {"enabled": False},
        "confidence_band": {"enabled": False},
        "margin": {"enabled": False},
        "entropy": {"enabled": False},
    }
    cfg["drain_on_exit_s"] = 60
    cfg_path.write_text(yaml.safe_dump(cfg))
    receiver.delay_s = 0.0
    subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "agent", "run", "--config", str(cfg_path)],
        check=True,
        timeout=180,
        capture_output=True,
    )
    receiver.stop()
    assert set(enqueued) <= set(receiver.frames), "frames that entered the outbox were lost"
    with Outbox(AgentConfig.model_validate(cfg).outbox) as ob:
        assert ob.depth == 0


def test_a_frame_the_receiver_cannot_take_is_isolated_and_set_aside(tmp_path):
    """A frame larger than the receiver's message limit fails its whole batch with
    RESOURCE_EXHAUSTED; the uploader halves the batch until that frame stands alone, moves it to
    the dead-letter table, and every other frame still arrives."""
    receiver = GrpcTestReceiver(max_message_bytes=64 * 1024).start()
    try:
        with Outbox(_config(tmp_path).outbox) as outbox:
            _seed_outbox(outbox, [0.5] * 6)
            big = FrameRecord(
                frame_id="frame-big",
                device_id="cam-test",
                capture_time=1.0,
                sequence=99,
                model_version="v1",
                image=b"\xff\xd8" + bytes(200_000),
                media_type="image/jpeg",
                width=64,
                height=48,
                uncertainty=0.9,
            )
            outbox.put(big.frame_id, serialize_frame(big), 0.9)  # highest score: first in every batch
            transport = create_transport(_config(tmp_path, _grpc_transport(receiver.target)).transport, "cam-test")
            cfg = _config(tmp_path)
            up = Uploader(outbox, transport, UploadBudget(cfg.budget), UploadConfig(batch_size=8), AgentMetrics())
            assert up.drain(timeout=20)
            assert outbox.rejected_ids() == {"frame-big"}
            assert set(receiver.frames) == {f"frame-{i:02d}" for i in range(6)}
            transport.close()
    finally:
        receiver.stop()


def _kept_records(cfg: AgentConfig) -> list[FrameRecord]:
    """Run an agent without a transport over its source; what its outbox holds afterwards."""
    agent = Agent(cfg)
    try:
        agent.run()
        return [parse_frame(p.payload) for p in agent.outbox.peek(100)]
    finally:
        agent.close()


@needs_shared
@pytest.mark.parametrize("sequence", [False, True])
def test_a_folder_of_unrelated_photos_is_not_a_stream_unless_the_user_says_so(tmp_path, sequence):
    """coco8's photos have nothing to do with each other: comparing one with the one before would
    see objects vanish and appear between them (what a user saw as 'flicker: horse vanished')."""
    records = _kept_records(_config(tmp_path, source={"uri": str(COCO_TRAIN), "sequence": sequence}, seed=0))
    assert len(records) == 4  # all kept (random share 1.0), each with every reason that fired
    fired = {r.trigger for rec in records for r in rec.reasons}
    temporal = {"novelty", "flicker", "count_jump"}
    if sequence:
        assert temporal & fired, fired  # told it is a sequence, the agent compares frames
    else:
        assert not temporal & fired, fired
        assert "confidence_band" in fired  # the per-frame triggers still run


@needs_shared
def test_the_model_embedding_travels_with_each_kept_frame(tmp_path):
    from server.registry.prepare import prepare_model

    model = prepare_model(MODEL, tmp_path / "embed.onnx", [COCO_TRAIN]) and tmp_path / "embed.onnx"
    records = _kept_records(_config(tmp_path, detector={"type": "onnxruntime", "model": str(model)}))
    assert len(records) == 4
    assert all(r.embedding is not None and r.embedding.shape == (448,) for r in records)
    # each frame says where it was at its source: here, the file name in the folder
    assert sorted(r.source_name for r in records) == sorted(p.name for p in COCO_TRAIN.glob("*.jpg"))
    # same image, same embedding: the detector is deterministic
    direct = Agent(_config(tmp_path / "b", detector={"type": "onnxruntime", "model": str(model)}))
    try:
        image = cv2.imread(str(sorted(COCO_TRAIN.glob("*.jpg"))[0]))
        emb = direct.detector.detect_all(image).embedding
    finally:
        direct.close()
    assert any(np.allclose(r.embedding, emb, atol=1e-6) for r in records)


def test_heartbeats_carry_each_cameras_keep_share_and_the_default_keeps_a_fifth(tmp_path):
    """Two cameras, default triggers (keep share 0.2, random 1%): each keeps about a fifth of what it
    scores, and the heartbeat says so per camera (frames_kept/<source> over frames_scored/<source>)."""
    cfg = _config(tmp_path, triggers={})  # the defaults
    agent = Agent(cfg, detector=ScriptedDetector())
    images = _random_images(300, seed=4)
    frames = [Frame(image=im, source_id=f"cam-{i % 2}", index=i // 2, capture_time=1000.0 + i / 2)
              for i, im in enumerate(images)]  # fmt: skip
    try:
        agent.run(frames)
        counters = agent.status().counters
    finally:
        agent.close()
    for cam in ("cam-0", "cam-1"):
        scored, kept = counters[f"frames_scored/{cam}"], counters[f"frames_kept/{cam}"]
        warmup = cfg.triggers.keep.warmup  # a camera's first frames are all kept: no quantile yet
        assert scored == 150
        assert 0.1 < (kept - warmup) / (scored - warmup) <= cfg.triggers.keep.share + cfg.triggers.random.rate + 0.05
    assert counters["frames_kept"] == counters["frames_kept/cam-0"] + counters["frames_kept/cam-1"]

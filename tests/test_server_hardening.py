"""What a broken or hostile device can still do to the server (issue 9): each finding reproduced
against the real server (``edgeloop server run`` in a subprocess, TLS gRPC and the MQTT bridge
behind a real Mosquitto, a real MongoDB), with the fixed behaviour; then the mutation fuzzer of
``bench/fuzz_ingest.py`` with a fixed budget, and the consistency check after everything.

One server serves the whole module (starting one costs ~20 s). Tests leave it consistent: the
last one checks that no file lacks its sample and no sample its file, over everything the module
sent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from bench.fuzz_ingest import DEVICES as FUZZ_DEVICES
from bench.fuzz_ingest import Fuzzer, Mutator, bomb_image, check, load_corpus
from edgeloop.convert import device_status_to_pb, serialize_frame
from edgeloop.domain import AckStatus, DeviceStatus, FrameRecord, Reason
from tests.fixtures.hardened_server import UPLOAD_METHOD, ServerStack
from tests.server.test_validation import jpeg_bytes, make_record

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
A, B = "cam-a", "cam-b"
MEMORY_DEVICES = tuple(f"mem-{i}" for i in range(10))
#: Stream slots per device, and how long an idle stream may live (short, for the tests).
STREAMS_PER_DEVICE = 4
IDLE_TIMEOUT_S = 3.0
#: Pixels decoded at once (the decode budget) in this server: 16 MP.
DECODE_PIXELS = 16_000_000
#: What decoding may add to the server's peak memory: the budget at 8 bytes per pixel, plus
#: 64 MB for everything else ten concurrent calls allocate (messages, threads, parsing).
DECODE_BOUND = 8 * DECODE_PIXELS + 64 * 1024 * 1024
#: Inputs the CI fuzz run sends (a few seconds per hundred).
FUZZ_INPUTS = 240
DAY = 24 * 3600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fiftyone_env: str) -> Iterator[ServerStack]:
    s = ServerStack(
        tmp_path_factory.mktemp("hardening"),
        fiftyone_env,
        devices=(A, B, "cam-c", *MEMORY_DEVICES, *FUZZ_DEVICES),
        overrides={
            "grpc": {"max_streams_per_device": STREAMS_PER_DEVICE, "stream_idle_timeout_s": IDLE_TIMEOUT_S},
            "validation": {"max_image_pixels": DECODE_PIXELS, "max_decode_pixels": DECODE_PIXELS},
        },
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


def frame(device: str = A, **changes) -> FrameRecord:
    """A valid 640x480 JPEG frame of ``device`` with a fresh id, with ``changes`` applied."""
    return make_record(uuid.uuid4().hex, **{"device_id": device, **changes})


def payload(record: FrameRecord) -> bytes:
    return serialize_frame(record)


def statuses(acks) -> list[str]:
    return [a.status for a in acks]


def mqtt_send(stack: ServerStack, records: list[FrameRecord], device: str | None = None) -> dict:
    for r in records:
        stack.mqtt.publish(device or r.device_id, payload(r))
    return stack.mqtt.wait_acks([r.frame_id for r in records])


def send_over(stack: ServerStack, transport: str, records: list[FrameRecord]) -> list:
    """The acks of ``records``, in order, sent in one gRPC stream or as MQTT publishes."""
    if transport == "grpc":
        return stack.upload([payload(r) for r in records], device=records[0].device_id).acks
    acks = mqtt_send(stack, records)
    return [acks[r.frame_id] for r in records]


# -- 1. frames too big for a MongoDB document ----------------------------------------------------


def _oversized(device: str) -> tuple[FrameRecord, FrameRecord, FrameRecord]:
    """The issue's two frames (an 8.5 MB trigger; 1.3 M class scores) and one with a score count
    that does not match class_names."""
    trigger = frame(device, reasons=[Reason("x" * 8_500_000, 0.5, "")], detections=0)
    scores = frame(device, detections=1)
    det = dataclasses.replace(scores.detections[0], class_scores=np.full(1_300_000, 0.01, np.float32))
    scores = dataclasses.replace(scores, detections=[det])
    mismatch = frame(device, detections=1)
    det = dataclasses.replace(mismatch.detections[0], class_scores=np.full(5, 0.1, np.float32))
    return trigger, scores, dataclasses.replace(mismatch, detections=[det])


def test_1_oversized_frames_are_rejected_naming_the_field_and_good_frames_in_the_batch_store(
    stack: ServerStack,
) -> None:
    retries = stack.metric("edgeloop_server_frames_retry_total")
    for transport in ("grpc", "mqtt"):
        good1, good2 = frame(A), frame(A)
        trigger, scores, mismatch = _oversized(A)
        batch = [good1, trigger, scores, mismatch, good2]
        if transport == "grpc":
            result = stack.upload([payload(r) for r in batch], device=A)
            assert result.error is None, result.details
            acks = {a.frame_id: a for a in result.acks}
        else:
            acks = mqtt_send(stack, batch)
        assert [acks[r.frame_id].status for r in batch] == [
            AckStatus.STORED,
            AckStatus.REJECTED,
            AckStatus.REJECTED,
            AckStatus.REJECTED,
            AckStatus.STORED,
        ], transport
        assert acks[trigger.frame_id].message.startswith("field_limit: reasons[0].trigger is 8,500,000 characters")
        assert "detections[0].class_scores holds 1,300,000 scores but class_names 3" in acks[scores.frame_id].message
        assert "class_scores holds 5 scores but class_names 3" in acks[mismatch.frame_id].message
        assert all(len(acks[r.frame_id].message) < 1000 for r in batch)
        # Nothing written for the refused frames; the good ones have their sample and file.
        assert [stack.files_of(r.frame_id) for r in (trigger, scores, mismatch)] == [[], [], []]
        samples = stack.samples([r.frame_id for r in batch])
        assert set(samples) == {good1.frame_id, good2.frame_id}
        assert all(Path(samples[r.frame_id]["filepath"]).read_bytes() == r.image for r in (good1, good2))
    # Refusals are not storage outages: no RETRY, and the refusals are counted as field_limit.
    assert stack.metric("edgeloop_server_frames_retry_total") == retries
    assert stack.metric("edgeloop_server_frames_rejected_total", transport="grpc", reason="field_limit") >= 3
    assert stack.metric("edgeloop_server_frames_rejected_total", transport="mqtt", reason="field_limit") >= 3


# -- 2. a frame id resent with another media type ---------------------------------------------------


def _as(record: FrameRecord, ext: str, media_type: str) -> FrameRecord:
    """The same frame id with the image in another format (and no boxes: the size changes)."""
    image = jpeg_bytes(5, 320, 240, ext)
    return dataclasses.replace(record, image=image, media_type=media_type, width=320, height=240, detections=[])


def test_2_a_resend_with_another_media_type_writes_no_file_and_the_sweep_finds_strays(stack: ServerStack) -> None:
    for transport in ("grpc", "mqtt"):
        first = frame(A)
        assert statuses(send_over(stack, transport, [first])) == [AckStatus.STORED]
        for ext, media_type in ((".png", "image/png"), (".webp", "image/webp")):
            again = send_over(stack, transport, [_as(first, ext, media_type)])
            assert statuses(again) == [AckStatus.DUPLICATE], transport
        assert [p.suffix for p in stack.files_of(first.frame_id)] == [".jpg"], transport
        # Within one stream: JPEG, then the same id as PNG, in one batch.
        twin = frame(A)
        if transport == "grpc":
            acks = stack.upload([payload(twin), payload(_as(twin, ".png", "image/png"))], device=A).acks
        else:
            stack.mqtt.publish(A, payload(twin))
            stack.mqtt.publish(A, payload(_as(twin, ".png", "image/png")))
            acks = [stack.mqtt.wait_acks([twin.frame_id])[twin.frame_id]]
            acks.append(stack.mqtt.wait_acks([twin.frame_id])[twin.frame_id])
        assert sorted(statuses(acks)) == [AckStatus.DUPLICATE, AckStatus.STORED]
        assert [p.suffix for p in stack.files_of(twin.frame_id)] == [".jpg"]
        assert stack.samples([twin.frame_id])[twin.frame_id]["filepath"].endswith(".jpg")
    # A stray of another extension beside a stored frame's file (what earlier versions left): the
    # sweep compares each file with the one its sample points at, not only the frame id.
    stored = frame(A)
    assert statuses(stack.upload([payload(stored)], device=A).acks) == [AckStatus.STORED]
    jpg = stack.files_of(stored.frame_id)[0]
    stray = jpg.with_suffix(".png")
    stray.write_bytes(jpeg_bytes(5, 320, 240, ".png"))
    old = time.time() - 2 * DAY
    os.utime(stray, (old, old))
    sweep = subprocess.run(
        [sys.executable, "-m", "edgeloop.cli", "server", "media", "sweep", "-c", str(stack.server.config_path)]
        + ["--grace-s", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert sweep.returncode == 0, sweep.stderr
    assert f"removed {stray}" in sweep.stdout and "1 without a sample removed" in sweep.stdout
    assert not stray.exists() and jpg.read_bytes() == stored.image


# -- 3. decompression bombs -------------------------------------------------------------------------


def _concurrently(stack: ServerStack, records: list[FrameRecord]) -> list:
    """Send each frame on its own stream (its device's connection), all at once."""
    results: list = [None] * len(records)
    start = threading.Barrier(len(records))

    def send(i: int) -> None:
        channel = stack.channel(records[i].device_id)
        start.wait()
        results[i] = stack.upload([payload(records[i])], channel=channel)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(records))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_3_ten_webp_bombs_at_once_are_refused_from_their_header(stack: ServerStack) -> None:
    """The issue's bomb: ~10 KB declaring 160x120, holding a 16383x16383 WebP (1.7 GB per decode
    before). Refused from the header, before any decode; the peak memory barely moves."""
    bomb = bomb_image()
    assert len(bomb) < 11_000
    bombs = [frame(d, image=bomb, media_type="image/webp", width=160, height=120, detections=0) for d in MEMORY_DEVICES]
    stack.reset_peak_rss()
    base = stack.rss()
    results = _concurrently(stack, bombs)
    peak = stack.peak_rss() - base
    for result in results:
        assert statuses(result.acks) == [AckStatus.REJECTED]
        assert "header says 16383x16383 but the frame declares 160x120" in result.acks[0].message
    assert peak < 64 * 1024 * 1024, f"ten bombs raised the peak RSS by {peak / 1e6:.0f} MB"
    # The same over MQTT; and in other formats, whose header size is checked the same way.
    ack = mqtt_send(stack, [bombs[0]])[bombs[0].frame_id]
    assert ack.status == AckStatus.REJECTED and "header says 16383x16383" in ack.message
    png = frame(A, image=jpeg_bytes(1, 320, 240, ".png"), media_type="image/png", width=160, height=120, detections=0)
    assert "header says 320x240" in stack.upload([payload(png)], device=A).acks[0].message
    assert all(stack.files_of(r.frame_id) == [] for r in [*bombs, png])


def test_3_ten_large_honest_images_at_once_decode_within_the_budget(stack: ServerStack) -> None:
    """Ten 4000x4000 WebPs (16 MP each, true to their declared size) sent at once: each is
    decoded to check it, but the decode budget lets one at a time, so the peak memory stays
    under the budget's bound (without it: ten decodes of ~50-110 MB each at once)."""
    ok, buf = cv2.imencode(".webp", np.zeros((4000, 4000, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert ok
    images = [
        frame(d, image=buf.tobytes(), media_type="image/webp", width=4000, height=4000, detections=0)
        for d in MEMORY_DEVICES
    ]
    stack.reset_peak_rss()
    base = stack.rss()
    results = _concurrently(stack, images)
    peak = stack.peak_rss() - base
    assert [statuses(r.acks) for r in results] == [[AckStatus.STORED]] * 10
    print(f"ten 16 MP WebPs at once: peak RSS +{peak / 1e6:.0f} MB (bound {DECODE_BOUND / 1e6:.0f} MB)")
    assert peak < DECODE_BOUND, f"peak RSS rose by {peak / 1e6:.0f} MB, above {DECODE_BOUND / 1e6:.0f} MB"


# -- 4. one device locking the others out ---------------------------------------------------------


def _open_idle_streams(stack: ServerStack, n: int, device: str, first: bytes | None) -> list:
    """``n`` upload streams on one channel that send ``first`` (or nothing) and then stay open."""
    channel = stack.channel(device)
    calls, gates = [], []
    for _ in range(n):
        gate: queue.Queue[bytes | None] = queue.Queue()
        if first is not None:
            gate.put(first)
        gates.append(gate)
        requests = iter(gate.get, None)
        call = channel.stream_stream(UPLOAD_METHOD, request_serializer=lambda b: b)(requests, timeout=60)
        # Acks are read as they come: a call's status shows only once the messages before it are read.
        threading.Thread(target=_drain, args=(call,), daemon=True).start()
        calls.append(call)
    return list(zip(calls, gates, strict=True))


def _drain(call: grpc.Call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass


def _ended(calls: list, wait_s: float) -> tuple[list, list]:
    """``(ended, open)`` after ``wait_s``: the calls that finished, with their status."""
    time.sleep(wait_s)
    ended = [(c, c.code()) for c, _ in calls if c.done()]
    return ended, [c for c, _ in calls if not c.done()]


def _others_still_work(stack: ServerStack) -> None:
    good = frame(B)
    assert statuses(stack.upload([payload(good)], device=B).acks) == [AckStatus.STORED]
    status = DeviceStatus(B, time.time(), "m1", 0, 0)
    assert stack.heartbeat(device_status_to_pb(status).SerializeToString(), device=B) is None


def test_4_one_device_cannot_take_every_stream_and_idle_streams_are_closed(stack: ServerStack) -> None:
    # With its certificate: 40 idle streams, of which the server keeps STREAMS_PER_DEVICE.
    calls = _open_idle_streams(stack, 40, A, None)
    ended, still_open = _ended(calls, 1.0)
    assert len(still_open) == STREAMS_PER_DEVICE
    # Refused by the per-device cap (UNAVAILABLE), or by gRPC's own limit while 32 were in flight.
    assert {code for _, code in ended} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any("already holds 4 upload streams" in c.details() for c, _ in ended)
    _others_still_work(stack)
    # Idle streams give their slot back after the idle timeout.
    ended, still_open = _ended(calls, IDLE_TIMEOUT_S + 2.0)
    assert still_open == [] and {code for _, code in ended} == {grpc.StatusCode.UNAVAILABLE}
    assert any("idle stream was closed" in c.details() for c, _ in ended)
    # Streams that send a frame, then nothing, are closed once idle too; so are streams that
    # sent nothing at all (without certificates, tests/server/test_grpc_ingest.py).
    calls = _open_idle_streams(stack, 2, A, payload(frame(A)))
    ended, still_open = _ended(calls, IDLE_TIMEOUT_S + 2.0)
    assert still_open == [] and {code for _, code in ended} == {grpc.StatusCode.UNAVAILABLE}
    _others_still_work(stack)


# -- 5. heartbeats --------------------------------------------------------------------------------


def test_5_heartbeats_are_bounded_and_stored_without_rewriting_a_file(stack: ServerStack) -> None:
    now = time.time()
    huge = DeviceStatus(A, now, "m1", 0, 0, last_error="e" * 12_000_000)
    err = stack.heartbeat(device_status_to_pb(huge).SerializeToString(), device=A)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 65,536" in err.details()
    counters = DeviceStatus(A, now, "m1", 0, 0, counters={f"c{i}": i for i in range(200)})
    err = stack.heartbeat(device_status_to_pb(counters).SerializeToString(), device=A)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "counters" in err.details()
    long_error = DeviceStatus(A, now + 1, "m2", 3, 300, last_error="model load failed: " + "x" * 50_000)
    assert stack.heartbeat(device_status_to_pb(long_error).SerializeToString(), device=A) is None
    # Over MQTT: the oversized one is ignored, the long error cut.
    stack.mqtt.publish(B, device_status_to_pb(dataclasses.replace(huge, device_id=B)).SerializeToString(), "status")
    mqtt_error = DeviceStatus(B, now + 1, "m3", 1, 10, last_error="y" * 50_000)
    stack.mqtt.publish(B, device_status_to_pb(mqtt_error).SerializeToString(), "status")
    fleet = _fleet(stack, lambda f: f.get(B, {}).get("model_version") == "m3" and A in f)
    assert fleet[A]["model_version"] == "m2" and fleet[A]["last_error"].startswith("model load failed: xxx")
    assert len(fleet[A]["last_error"]) <= 2048 and "cut by the server" in fleet[A]["last_error"]
    assert len(fleet[B]["last_error"]) <= 2048
    assert stack.metric("edgeloop_server_heartbeats_rejected_total", transport="mqtt", reason="too_large") == 1
    database = stack.data_dir / "heartbeats.sqlite3"
    assert database.is_file() and not (stack.data_dir / "heartbeats.json").exists()
    assert database.stat().st_size < 1_000_000


def _fleet(stack: ServerStack, ready, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            [sys.executable, "-m", "edgeloop.cli", "server", "fleet", "--json", "-c", str(stack.server.config_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        fleet = json.loads(out.stdout)
        if ready(fleet) or time.monotonic() > deadline:
            return fleet
        time.sleep(1.0)


# -- 6. echoes ------------------------------------------------------------------------------------


def test_6_what_a_client_sent_is_clipped_in_statuses_acks_and_log_lines(stack: ServerStack) -> None:
    long_id = "d" * 1_000_000
    result = stack.upload([payload(frame(long_id))], device=A)
    assert result.code == grpc.StatusCode.PERMISSION_DENIED, result.details
    assert "authenticated as 'cam-a'" in result.details and len(result.details) < 1000
    odd_type = frame(A, media_type="image/" + "x" * 1_000_000, detections=0)
    ack = stack.upload([payload(odd_type)], device=A).acks[0]
    assert ack.status == AckStatus.REJECTED and "is not accepted" in ack.message and len(ack.message) < 1000
    mqtt_ack = mqtt_send(stack, [dataclasses.replace(odd_type, frame_id=uuid.uuid4().hex)])
    assert all(a.status == AckStatus.REJECTED and len(a.message) < 1000 for a in mqtt_ack.values())
    mismatch = frame(long_id)  # over MQTT: topic cam-a, a 1 MB id in the payload
    ack = mqtt_send(stack, [mismatch], device=A)[mismatch.frame_id]
    assert ack.status == AckStatus.REJECTED and ack.message.startswith("device_mismatch") and len(ack.message) < 1000
    heartbeat = device_status_to_pb(DeviceStatus(long_id[:60_000], time.time(), "m", 0, 0)).SerializeToString()
    err = stack.heartbeat(heartbeat, device=A)
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED and len(err.details()) < 1000
    longest = max(len(line) for line in stack.log_text().splitlines())
    assert longest < 2000, f"a log line of {longest} characters"


# -- 7. frame ids across devices ------------------------------------------------------------------


def test_7_a_frame_id_belongs_to_the_device_that_stored_it(stack: ServerStack) -> None:
    for transport in ("grpc", "mqtt"):
        owned = frame(A)
        never = frame(B)  # an id nobody stored, for comparison

        def send(records: list[FrameRecord], transport: str = transport) -> list:
            return send_over(stack, transport, records)

        assert statuses(send([owned])) == [AckStatus.STORED]
        squatter = dataclasses.replace(owned, device_id=B)
        other_type = dataclasses.replace(_as(owned, ".png", "image/png"), device_id=B)
        for ack in send([squatter]) + send([other_type]):
            assert ack.status == AckStatus.REJECTED, transport
            assert ack.message.startswith("id_not_available: ")
            # Nothing says the id exists, nor whose it is.
            assert not any(word in ack.message for word in ("already", "stored", "duplicate", A))
        assert statuses(send([owned])) == [AckStatus.DUPLICATE]  # the owner's resend
        assert statuses(send([never])) == [AckStatus.STORED]
        assert stack.samples([owned.frame_id])[owned.frame_id]["device_id"] == A
        assert [p.suffix for p in stack.files_of(owned.frame_id)] == [".jpg"]
    assert stack.metric("edgeloop_server_frames_rejected_total", transport="grpc", reason="id_not_available") >= 2


# -- the fuzzer, and what must hold after everything ------------------------------------------------


def test_fuzz_both_transports_then_everything_is_consistent(stack: ServerStack) -> None:
    rng = random.Random(9)
    started = time.monotonic()
    outcomes = Fuzzer(stack, Mutator(load_corpus(), rng, huge=False), rng, mqtt_share=0.3).run(FUZZ_INPUTS)
    report = check(stack, outcomes)
    report.seconds = time.monotonic() - started
    print(report.table(f"CI fuzz run: {FUZZ_INPUTS} inputs"))
    assert report.problems == [] and report.frames_lost == 0
    assert sum(report.inputs.values()) == FUZZ_INPUTS and report.inputs["mqtt"] > 0
    results = {result for _, result in report.outcomes}
    # The run reached the interesting verdicts, not only one kind of refusal.
    assert {"stored", "duplicate", "rejected:field_limit", "rejected:bad_image"} <= results
    assert stack.server.proc.poll() is None
    assert stack.inconsistencies() == {"files_without_sample": [], "samples_without_file": []}

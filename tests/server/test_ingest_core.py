"""The ingest core end to end on a real mongod: validate, store durably in batches, acknowledge.

Covers the acknowledgement contract (STORED only when the image is fsync'd and the sample
journaled; DUPLICATE for a stored frame id; RETRY when storage is down), that refused frames
write nothing, and a ``kill -9`` of a process in the middle of an upload.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC
from pathlib import Path

import pytest

from edgeloop.convert import frame_to_pb
from edgeloop.domain import Ack, AckStatus
from server.ingest.base import AllowAllDevices, FrameRejected, Identity, RejectCode
from server.ingest.core import IngestCore
from server.ingest.validation import ValidationConfig
from server.metrics import ServerMetrics
from server.store.inbox import Inbox
from server.store.media import LocalMediaStore
from server.store.mongo import MongoManager
from tests.server.test_validation import Devices, jpeg_bytes, make_record, payload_of, with_detection

REPO = Path(__file__).resolve().parents[2]
GRPC = Identity(transport="grpc", device_id=None, peer="test")
ACK_TIMEOUT_S = 20.0


def _stored_count(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"edgeloop_server_frames_{name}_total") or 0.0


def _media_files(store: LocalMediaStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file() and ".tmp" not in p.parts]


@pytest.fixture
def media(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path / "media")


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics()


@pytest.fixture
def core(media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics) -> Iterator[IngestCore]:
    with IngestCore(
        media, inbox, AllowAllDevices(), ValidationConfig(), metrics, batch_size=16, max_wait_s=0.01
    ) as core:
        yield core


def _ack(future: Future[Ack]) -> Ack:
    return future.result(ACK_TIMEOUT_S)


def test_valid_frame_is_stored_durably(
    core: IngestCore, media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_record()
    real_insert = inbox.insert_records
    seen_at_insert: list[bool] = []

    def insert_records_checking_media(items, **kwargs):
        items = list(items)
        # The order of effects: every image is on disk before its sample is written.
        seen_at_insert.extend(path.read_bytes() == rec.image for rec, path in items)
        return real_insert(items, **kwargs)

    monkeypatch.setattr(inbox, "insert_records", insert_records_checking_media)
    ack = _ack(core.submit(payload_of(record), GRPC))
    assert ack == Ack(record.frame_id, AckStatus.STORED, "stored") and ack.durable
    assert seen_at_insert == [True]
    sample = inbox.sample_for(record.frame_id)
    assert Path(sample.filepath).read_bytes() == record.image
    assert Path(sample.filepath) == media.path_for(record.frame_id, "jpg")
    assert sorted(sample.tags) == ["confidence_band", "margin"]
    x1, y1, x2, y2 = record.detections[2].box
    assert sample.predictions.detections[2].bounding_box == pytest.approx(
        [x1 / 640, y1 / 480, (x2 - x1) / 640, (y2 - y1) / 480]
    )
    assert sample.capture_time.replace(tzinfo=UTC).timestamp() == pytest.approx(record.capture_time, abs=1e-3)
    assert _stored_count(metrics, "stored") == 1


def _bad_payloads() -> list:
    unknown = frame_to_pb(make_record())
    unknown.frame_id = "../../../etc/passwd"
    return [
        pytest.param(b"\x00garbage\xff", RejectCode.MALFORMED, id="malformed"),
        pytest.param(payload_of(make_record(image=jpeg_bytes(0)[:20_000])), RejectCode.BAD_IMAGE, id="bad-image"),
        pytest.param(
            payload_of(with_detection(make_record(), 0, box=(0.0, 0.0, 900.0, 10.0))),
            RejectCode.BOX_OUTSIDE,
            id="box-outside",
        ),
        pytest.param(payload_of(with_detection(make_record(), 0, class_id=9)), RejectCode.UNKNOWN_CLASS, id="class"),
        pytest.param(payload_of(make_record(uncertainty=3.0)), RejectCode.BAD_VALUE, id="bad-value"),
        pytest.param(unknown.SerializeToString(), RejectCode.MISSING_ID, id="traversal-id"),
        pytest.param(payload_of(make_record(device_id="cam-99")), RejectCode.UNKNOWN_DEVICE, id="unknown-device"),
    ]


@pytest.mark.parametrize(("payload", "code"), _bad_payloads())
def test_refused_frames_write_nothing(
    payload: bytes, code: RejectCode, media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics
) -> None:
    with IngestCore(media, inbox, Devices("cam-01"), ValidationConfig(), metrics, batch_size=4, max_wait_s=0) as core:
        with pytest.raises(FrameRejected) as info:
            core.submit(payload, GRPC)
        assert info.value.code is code
        # The service keeps serving after a refusal.
        assert _ack(core.submit(payload_of(make_record()), GRPC)).status == AckStatus.STORED
    assert inbox.count() == 1
    assert len(_media_files(media)) == 1


def test_too_large_and_device_mismatch_write_nothing(media: LocalMediaStore, inbox: Inbox) -> None:
    cfg = ValidationConfig(max_frame_bytes=20_000)
    with IngestCore(media, inbox, AllowAllDevices(), cfg, ServerMetrics(), batch_size=1, max_wait_s=0) as core:
        with pytest.raises(FrameRejected) as info:
            core.submit(payload_of(make_record()), GRPC)
        assert info.value.code is RejectCode.TOO_LARGE
        with pytest.raises(FrameRejected) as info:
            small = make_record(image=jpeg_bytes(1, 64, 48), width=64, height=48, detections=0)
            core.submit(payload_of(small), Identity("mqtt", device_id="cam-02"))
        assert info.value.code is RejectCode.DEVICE_MISMATCH
    assert _media_files(media) == []
    assert inbox.count() == 0


def test_redelivered_frame_is_duplicate_and_stored_once(
    core: IngestCore, media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics
) -> None:
    payload = payload_of(make_record())
    assert _ack(core.submit(payload, GRPC)).status == AckStatus.STORED
    again = _ack(core.submit(payload, GRPC))
    assert again.status == AckStatus.DUPLICATE and again.durable
    assert inbox.count() == 1 and len(_media_files(media)) == 1
    assert _stored_count(metrics, "duplicate") == 1


def test_a_crash_leftover_file_is_replaced_whole_and_a_stored_image_never_rewritten(
    core: IngestCore, media: LocalMediaStore, inbox: Inbox
) -> None:
    """A crash between writing an image and storing its sample leaves a (maybe partial) file and
    no sample: the resend finds the name taken, and the core replaces the file whole before the
    sample is written. A frame that is stored keeps its file untouched when it comes again."""
    record = make_record()
    path = media.path_for(record.frame_id, "jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.image[:100])  # what a crash mid-write leaves
    assert _ack(core.submit(payload_of(record), GRPC)).status == AckStatus.STORED
    assert Path(inbox.sample_for(record.frame_id).filepath).read_bytes() == record.image
    before = path.stat()
    assert _ack(core.submit(payload_of(record), GRPC)).status == AckStatus.DUPLICATE
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_same_id_twice_in_one_batch(media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics) -> None:
    payload = payload_of(make_record())
    with IngestCore(media, inbox, AllowAllDevices(), ValidationConfig(), metrics, batch_size=8, max_wait_s=0.3) as c:
        futures = [c.submit(payload, GRPC) for _ in range(2)] + [c.submit(payload_of(make_record()), GRPC)]
        statuses = [_ack(f).status for f in futures]
    assert statuses == [AckStatus.STORED, AckStatus.DUPLICATE, AckStatus.STORED]
    assert inbox.count() == 2
    assert metrics.batch_seconds.collect()[0].samples[-1].value >= 0  # one batch observed


def test_concurrent_submits_all_resolve(core: IngestCore, inbox: Inbox, media: LocalMediaStore) -> None:
    results: list[Ack] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        futures = [core.submit(payload_of(make_record(seed=i % 4)), GRPC) for i in range(n)]
        acks = [_ack(f) for f in futures]
        with lock:
            results.extend(acks)

    threads = [threading.Thread(target=client, args=(20,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 160 and {a.status for a in results} == {AckStatus.STORED}
    assert inbox.count() == 160 and len(_media_files(media)) == 160


def test_close_drains_the_queue_and_later_submits_get_retry(media: LocalMediaStore, inbox: Inbox) -> None:
    metrics = ServerMetrics()
    core = IngestCore(media, inbox, AllowAllDevices(), ValidationConfig(), metrics, batch_size=4, max_wait_s=0.01)
    futures = [core.submit(payload_of(make_record()), GRPC) for _ in range(10)]
    core.close()
    assert all(f.done() and f.result().status == AckStatus.STORED for f in futures)
    late = _ack(core.submit(payload_of(make_record()), GRPC))
    assert late.status == AckStatus.RETRY and not late.durable
    assert inbox.count() == 10


def test_media_failure_answers_retry_for_that_frame_only(
    core: IngestCore, media: LocalMediaStore, inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = make_record(), make_record()
    real_write = media.write_new  # what submit() writes each new image with

    def write(frame_id: str, data: bytes, ext: str) -> Path | None:
        if frame_id == bad.frame_id:
            raise OSError(28, "No space left on device")
        return real_write(frame_id, data, ext)

    monkeypatch.setattr(media, "write_new", write)
    futures = [core.submit(payload_of(good), GRPC), core.submit(payload_of(bad), GRPC)]
    acks = [_ack(f) for f in futures]
    assert [a.status for a in acks] == [AckStatus.STORED, AckStatus.RETRY]
    assert "No space left" in acks[1].message
    assert inbox.existing_ids([good.frame_id, bad.frame_id]) == {good.frame_id}


def test_database_outage_answers_retry_then_recovers(
    mongo_manager: MongoManager, fiftyone_env: str, core: IngestCore, inbox: Inbox, metrics: ServerMetrics
) -> None:
    before, after = make_record(), make_record()
    assert _ack(core.submit(payload_of(before), GRPC)).status == AckStatus.STORED
    mongo_manager.stop()
    try:
        ack = _ack(core.submit(payload_of(after), GRPC))
        assert ack.status == AckStatus.RETRY and "retry later" in ack.message
        assert _stored_count(metrics, "retry") == 1
    finally:
        # The session's database comes back on the same port: FiftyOne's client reconnects.
        assert mongo_manager.ensure_running() == fiftyone_env
    assert inbox.existing_ids([after.frame_id]) == set()
    assert _ack(core.submit(payload_of(after), GRPC)).status == AckStatus.STORED
    assert _ack(core.submit(payload_of(before), GRPC)).status == AckStatus.DUPLICATE
    assert inbox.count() == 2


# -- kill -9 in the middle of an upload -----------------------------------------------------

CHILD_FRAMES = 600
KILL_AFTER_ACKS = 80

_CHILD = r"""
import sys
from concurrent.futures import FIRST_COMPLETED, wait

from server.store.mongo import configure_fiftyone

uri, state_dir, dataset, media_root, count = sys.argv[1:6]
configure_fiftyone(uri, state_dir)

from server.ingest.base import AllowAllDevices, Identity
from server.ingest.core import IngestCore
from server.ingest.validation import ValidationConfig
from server.metrics import ServerMetrics
from server.store.inbox import Inbox, InboxConfig
from server.store.media import LocalMediaStore
from tests.server.test_ingest_core import child_payload

inbox = Inbox(InboxConfig(dataset=dataset))
inbox.dataset  # open before the clock starts
core = IngestCore(LocalMediaStore(media_root), inbox, AllowAllDevices(), ValidationConfig(), ServerMetrics(),
                  batch_size=16, max_wait_s=0.01)
print("READY", flush=True)
pending = set()
identity = Identity("grpc", None)

def report(done):
    for f in done:
        ack = f.result()
        print("ACK", ack.frame_id, ack.status, flush=True)

for i in range(int(count)):
    pending.add(core.submit(child_payload(i), identity))
    if len(pending) >= 48:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        report(done)
report(wait(pending)[0])
print("DONE", flush=True)
"""


def child_frame_id(i: int) -> str:
    return f"{i:032x}"


def child_payload(i: int) -> bytes:
    """Frame ``i`` of the kill test: the same bytes in the child and in the test."""
    return payload_of(make_record(child_frame_id(i), seed=i % 8))


@pytest.mark.slow
def test_kill_9_during_upload_loses_no_acknowledged_frame(
    fiftyone_env: str, inbox: Inbox, media: LocalMediaStore, tmp_path: Path
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, fiftyone_env, str(tmp_path / "fo-state"), inbox.name, str(media.root)]
        + [str(CHILD_FRAMES)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:  # type: ignore[union-attr]
            if line.startswith("ACK "):
                _, frame_id, status = line.split()
                assert status in AckStatus.FINAL
                acked.append(frame_id)
            if len(acked) >= KILL_AFTER_ACKS or line.startswith("DONE") or time.monotonic() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # Only whole lines: the kill can cut the child's last line short (an ack the "agent" never got).
    for line in rest.split("\n")[:-1]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ACK":
            assert parts[2] in AckStatus.FINAL
            acked.append(parts[1])
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    assert len(acked) >= KILL_AFTER_ACKS, err[-2000:]

    # Every acknowledged frame is in the dataset once and has its image; no sample lacks its image.
    collection = inbox.dataset._sample_collection
    docs = list(collection.find({}, {"frame_id": 1, "filepath": 1, "metadata.size_bytes": 1}))
    per_id = Counter(d["frame_id"] for d in docs)
    assert set(acked) <= set(per_id)
    assert max(per_id.values()) == 1
    for doc in docs:
        path = Path(doc["filepath"])
        assert path.is_file() and path.stat().st_size == doc["metadata"]["size_bytes"]
    stored_before_restart = len(docs)
    assert stored_before_restart < CHILD_FRAMES, "the child finished before it was killed: raise CHILD_FRAMES"

    # The restarted server gets every frame again (the agents resend what was not acknowledged).
    with IngestCore(media, inbox, AllowAllDevices(), ValidationConfig(), ServerMetrics(), batch_size=64) as core:
        futures = [core.submit(child_payload(i), GRPC) for i in range(CHILD_FRAMES)]
        acks = {a.frame_id: a.status for a in (_ack(f) for f in futures)}
    assert all(acks[fid] == AckStatus.DUPLICATE for fid in acked)
    assert Counter(acks.values())[AckStatus.DUPLICATE] == stored_before_restart
    assert inbox.count() == CHILD_FRAMES
    assert len(_media_files(media)) == CHILD_FRAMES
    assert media.path_for(child_frame_id(5), "jpg").read_bytes() == make_record(seed=5).image


# -- refused samples, other devices' ids, resends with another media type (issue 9) -----------------


def _as_png(record, frame_id: str | None = None, device: str | None = None):
    import dataclasses

    image = jpeg_bytes(3, 320, 240, ".png")
    return dataclasses.replace(
        record,
        frame_id=frame_id or record.frame_id,
        device_id=device or record.device_id,
        image=image,
        media_type="image/png",
        width=320,
        height=240,
        detections=[],
    )


def test_a_sample_the_database_refuses_is_rejected_its_file_removed_and_the_batch_stored(
    media: LocalMediaStore, inbox: Inbox, metrics: ServerMetrics
) -> None:
    """Validation's limits keep valid frames far from MongoDB's 16 MB; with them lifted (built
    without checks), a 1.3 M-score detection makes a 21 MB document. The database refuses it: that
    frame is REJECTED and its image removed, the frames batched with it are stored."""
    import dataclasses

    import numpy as np

    loose = ValidationConfig.model_construct(
        **{**ValidationConfig().model_dump(), "max_classes": 10**7, "max_class_scores": 10**7}
    )
    good, good2 = make_record(), make_record()
    big = make_record(class_names=[])
    big = with_detection(big, 0, class_scores=np.full(1_300_000, 0.01, np.float32))
    big = dataclasses.replace(big, detections=big.detections[:1])
    with IngestCore(media, inbox, AllowAllDevices(), loose, metrics, batch_size=8, max_wait_s=0.3) as core:
        futures = [core.submit(payload_of(r), GRPC) for r in (good, big, good2)]
        acks = [_ack(f) for f in futures]
    assert [a.status for a in acks] == [AckStatus.STORED, AckStatus.REJECTED, AckStatus.STORED]
    assert acks[1].message.startswith("storage_refused: the database refused the sample")
    assert inbox.existing_ids([good.frame_id, big.frame_id, good2.frame_id]) == {good.frame_id, good2.frame_id}
    assert not media.exists(big.frame_id, "jpg") and len(_media_files(media)) == 2
    assert _stored_count(metrics, "retry") == 0
    labels = {"transport": "grpc", "reason": "storage_refused"}
    assert metrics.registry.get_sample_value("edgeloop_server_frames_rejected_total", labels) == 1


def test_a_frame_id_of_another_device_is_refused_and_writes_nothing(core: IngestCore, media: LocalMediaStore) -> None:
    import dataclasses

    owned = make_record()
    assert _ack(core.submit(payload_of(owned), GRPC)).status == AckStatus.STORED
    for squat in (dataclasses.replace(owned, device_id="cam-02"), _as_png(owned, device="cam-02")):
        ack = _ack(core.submit(payload_of(squat), GRPC))
        assert ack.status == AckStatus.REJECTED and ack.message.startswith("id_not_available: ")
        assert "already" not in ack.message and "cam-01" not in ack.message
    assert _ack(core.submit(payload_of(owned), GRPC)).status == AckStatus.DUPLICATE
    assert [p.suffix for p in _media_files(media)] == [".jpg"]


def test_a_resend_with_another_media_type_writes_no_file(core: IngestCore, media: LocalMediaStore) -> None:
    first = make_record()
    assert _ack(core.submit(payload_of(first), GRPC)).status == AckStatus.STORED
    assert _ack(core.submit(payload_of(_as_png(first)), GRPC)).status == AckStatus.DUPLICATE
    assert [p.suffix for p in _media_files(media)] == [".jpg"]
    # Both at once (one batch): the copy follows the first and writes nothing.
    twin = make_record()
    acks = [_ack(f) for f in [core.submit(payload_of(twin), GRPC), core.submit(payload_of(_as_png(twin)), GRPC)]]
    assert [a.status for a in acks] == [AckStatus.STORED, AckStatus.DUPLICATE]
    assert sorted(p.suffix for p in _media_files(media)) == [".jpg", ".jpg"]


def test_a_copy_stored_meanwhile_by_another_process_leaves_no_file_behind(
    tmp_path: Path, inbox: Inbox, metrics: ServerMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ingest processes (workers) get one frame id at once, as JPEG and as PNG: each writes its
    file before either sample exists; the unique index lets one insert, and the other removes its
    file (the same id from another device is refused the same way)."""
    first = make_record()
    with IngestCore(LocalMediaStore(tmp_path / "media"), inbox, AllowAllDevices(), ValidationConfig(), metrics) as one:
        assert _ack(one.submit(payload_of(first), GRPC)).status == AckStatus.STORED
    other = LocalMediaStore(tmp_path / "media")
    monkeypatch.setattr(other, "exists", lambda frame_id, ext: False)  # the JPEG not yet visible to it
    with IngestCore(other, inbox, AllowAllDevices(), ValidationConfig(), metrics) as two:
        late = _ack(two.submit(payload_of(_as_png(first)), GRPC))
        squat = _ack(two.submit(payload_of(_as_png(make_record(), frame_id=first.frame_id, device="cam-9")), GRPC))
    assert late.status == AckStatus.DUPLICATE
    assert squat.status == AckStatus.REJECTED and squat.message.startswith("id_not_available")
    assert [p.suffix for p in _media_files(other)] == [".jpg"]

"""The FiftyOne inbox and the MongoDB behind it, on a real bundled mongod.

The inbox writes sample documents itself (one ``insert_many``, for throughput); the guard test
here holds its documents next to the ones FiftyOne's own ``add_samples`` writes.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import pymongo
import pytest

from server.store.inbox import Inbox, InboxConfig
from server.store.mongo import (
    FiftyOneAlreadyConfigured,
    MongoConfig,
    MongoError,
    MongoManager,
    configure_fiftyone,
    durable_uri,
)
from tests.server.test_validation import make_record


def _stored(inbox: Inbox, records, tmp_path: Path):
    return inbox.add_records([(r, tmp_path / f"{r.frame_id}.jpg") for r in records])


def test_add_records_stores_samples_with_all_fields(inbox: Inbox, tmp_path: Path) -> None:
    import fiftyone as fo

    record = make_record()
    path = tmp_path / "a.jpg"
    stored, duplicates = inbox.add_records([(record, path)])
    assert (stored, duplicates) == ([record.frame_id], [])
    sample = inbox.sample_for(record.frame_id)
    assert sample is not None
    assert sample.filepath == str(path)
    assert sample.device_id == "cam-01" and sample.source_id == "front" and sample.model_version == "yolov8n-3"
    assert sample.source_name == "front#1041"
    assert sample.sequence == 42
    assert sample.uncertainty == pytest.approx(0.7)
    assert sample.capture_time == datetime(2025, 11, 22, 8, 26, 40, 250000)  # UTC, millisecond precision
    assert sample.ingested_at is not None
    assert sorted(sample.tags) == ["confidence_band", "margin"]
    assert [r["trigger"] for r in sample.reasons] == ["margin", "confidence_band"]
    assert sample.reasons[0]["detail"] == "car vs dog 0.05"
    assert isinstance(sample.metadata, fo.ImageMetadata)
    assert (sample.metadata.width, sample.metadata.height) == (640, 480)
    assert sample.metadata.size_bytes == len(record.image) and sample.metadata.mime_type == "image/jpeg"
    dets = sample.predictions.detections
    assert isinstance(sample.predictions, fo.Detections) and len(dets) == 5
    first = record.detections[0]
    x1, y1, x2, y2 = first.box
    assert dets[0].bounding_box == pytest.approx([x1 / 640, y1 / 480, (x2 - x1) / 640, (y2 - y1) / 480])
    assert dets[0].label == "person" and dets[0].class_id == 0
    assert dets[0].confidence == pytest.approx(first.confidence)
    assert dets[0].class_scores == pytest.approx([0.1, 0.2, 0.3])
    assert inbox.count() == 1 == len(inbox.dataset)
    assert sample.embedding is None  # the record's model exports no embedding


def test_embedding_is_stored_as_a_float_list(inbox: Inbox, tmp_path: Path) -> None:
    import numpy as np

    record = make_record()
    record.embedding = np.array([0.6, 0.0, -0.8], np.float32)
    _stored(inbox, [record], tmp_path)
    assert inbox.sample_for(record.frame_id).embedding == pytest.approx([0.6, 0.0, -0.8])
    assert inbox.dataset.get_field_schema()["embedding"].field.__class__.__name__ == "FloatField"


def test_documents_match_what_fiftyone_writes(inbox: Inbox, tmp_path: Path) -> None:
    """Guard against FiftyOne changing its document layout under the inbox's direct inserts."""
    import fiftyone as fo

    record = make_record()
    _stored(inbox, [record], tmp_path)
    ours = inbox.dataset._sample_collection.find_one({"frame_id": record.frame_id})
    theirs_sample = fo.Sample(
        filepath=str(tmp_path / "x.jpg"),
        frame_id="theirs-000001",
        tags=["margin"],
        metadata=fo.ImageMetadata(width=640, height=480, size_bytes=1, mime_type="image/jpeg"),
        predictions=fo.Detections(
            detections=[fo.Detection(label="car", bounding_box=[0.1, 0.1, 0.2, 0.2], confidence=0.5, class_id=1)]
        ),
    )
    inbox.dataset.add_sample(theirs_sample, expand_schema=False)
    theirs = inbox.dataset._sample_collection.find_one({"frame_id": "theirs-000001"})
    fo_keys = {"_id", "_dataset_id", "_media_type", "_rand", "filepath", "tags", "metadata", "created_at"}
    fo_keys |= {"last_modified_at"}
    assert fo_keys <= set(ours) and fo_keys <= set(theirs)
    for key in fo_keys:
        assert type(ours[key]) is type(theirs[key]), key
    assert ours["_dataset_id"] == theirs["_dataset_id"] and ours["_media_type"] == theirs["_media_type"]
    assert 0.999 <= ours["_rand"] < 1.0 and 0.999 <= theirs["_rand"] < 1.0
    assert set(ours["metadata"]) == set(theirs["metadata"])
    ours_det, theirs_det = ours["predictions"]["detections"][0], theirs["predictions"]["detections"][0]
    assert set(theirs_det) <= set(ours_det)
    assert ours["predictions"]["_cls"] == theirs["predictions"]["_cls"] == "Detections"
    # FiftyOne reads ours back as a sample, with every schema field typed as declared.
    sample = inbox.dataset.one(fo.ViewField("frame_id") == record.frame_id)
    assert sample.to_dict()["predictions"]["detections"][0]["label"] == "person"
    assert inbox.dataset.count_sample_tags() == {"margin": 2, "confidence_band": 1}
    assert inbox.dataset.bounds("uncertainty") == (pytest.approx(0.7), pytest.approx(0.7))


def test_schema_index_and_persistence(inbox: Inbox) -> None:
    import fiftyone as fo

    dataset = inbox.dataset
    assert dataset.persistent and dataset.media_type == "image"
    schema = dataset.get_field_schema(flat=True)
    assert isinstance(schema["capture_time"], fo.DateTimeField)
    assert isinstance(schema["uncertainty"], fo.FloatField)
    assert isinstance(schema["predictions.detections.class_scores"], fo.ListField)
    index = dataset.get_index_information()["frame_id"]
    assert index["unique"] and index["sparse"]
    # A second Inbox on the same dataset (a restarted server) finds it as it is.
    assert Inbox(InboxConfig(dataset=inbox.name)).dataset.get_field_schema().keys() == dataset.get_field_schema().keys()


def test_writes_are_journaled(inbox: Inbox, fiftyone_env: str) -> None:
    import fiftyone.core.odm as foo

    assert "journal=true" in fiftyone_env
    assert foo.get_db_conn().write_concern.document.get("j") is True
    assert inbox.dataset._sample_collection.write_concern.document.get("j") is True


def test_redelivered_and_repeated_ids_are_stored_once(inbox: Inbox, tmp_path: Path) -> None:
    a, b, c = make_record(), make_record(), make_record()
    assert _stored(inbox, [a, b], tmp_path) == ([a.frame_id, b.frame_id], [])
    stored, duplicates = _stored(inbox, [b, c, c], tmp_path)
    assert stored == [c.frame_id]
    assert sorted(duplicates) == sorted([b.frame_id, c.frame_id])
    assert inbox.count() == 3
    assert inbox.existing_ids([a.frame_id, "nope-00000000"]) == {a.frame_id}
    assert inbox.existing_ids([]) == set()


def test_racing_writer_duplicate_is_reported_not_raised(
    inbox: Inbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_record(), make_record()
    _stored(inbox, [a], tmp_path)
    # Another server process inserted `a` between our existence check and our insert.
    monkeypatch.setattr(inbox, "existing_ids", lambda ids: set())
    stored, duplicates = _stored(inbox, [a, b], tmp_path)
    assert stored == [b.frame_id] and duplicates == [a.frame_id]
    assert inbox.count() == 2


def test_without_the_existence_check_the_unique_index_still_stores_an_id_once(inbox: Inbox, tmp_path: Path) -> None:
    a, b = make_record(), make_record()
    _stored(inbox, [a], tmp_path)
    looked_up: list[list[str]] = []
    real_existing = inbox.existing_ids
    inbox.existing_ids = lambda ids: looked_up.append(list(ids)) or real_existing(ids)  # type: ignore[method-assign]
    items = [(r, tmp_path / f"{r.frame_id}.jpg") for r in (a, b)]
    assert inbox.add_records(items, check_existing=False) == ([b.frame_id], [a.frame_id])
    assert looked_up == [] and inbox.count() == 2


def test_sample_for_unknown_id(inbox: Inbox) -> None:
    assert inbox.sample_for("unknown-0000") is None


# -- the database ---------------------------------------------------------------------------


def test_durable_uri() -> None:
    assert durable_uri("mongodb://h:1") == "mongodb://h:1/?journal=true"
    assert durable_uri("mongodb://h:1/db") == "mongodb://h:1/db?journal=true"
    assert (
        durable_uri("mongodb://h/?replicaSet=rs", 500)
        == "mongodb://h/?replicaSet=rs&journal=true&serverSelectionTimeoutMS=500"
    )
    assert durable_uri("mongodb://h/?w=majority&journal=true") == "mongodb://h/?w=majority&journal=true"
    for bad in ("mongodb://h/?journal=false", "mongodb://h/?w=0", "http://h/"):
        with pytest.raises(MongoError):
            durable_uri(bad)


def test_external_uri_is_passed_through(tmp_path: Path) -> None:
    manager = MongoManager(MongoConfig(uri="mongodb://db.example:27017/?replicaSet=rs0", db_dir=tmp_path))
    assert (
        manager.ensure_running()
        == "mongodb://db.example:27017/?replicaSet=rs0&journal=true&serverSelectionTimeoutMS=5000"
    )
    assert not manager.stop()


def test_configure_fiftyone_refuses_another_database_once_imported(fiftyone_env: str, tmp_path: Path) -> None:
    configure_fiftyone(fiftyone_env, tmp_path)  # same URI: fine
    with pytest.raises(FiftyOneAlreadyConfigured, match="before anything imports fiftyone"):
        configure_fiftyone("mongodb://127.0.0.1:1/?journal=true", tmp_path)


def _ping(uri: str) -> dict:
    client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000)
    try:
        return client.admin.command("ping")
    finally:
        client.close()


@pytest.mark.slow
def test_bundled_mongod_is_reused_survives_its_own_kill_and_stops(tmp_path: Path) -> None:
    config = MongoConfig(db_dir=tmp_path / "db", cache_size_gb=0.25, server_selection_timeout_ms=2000)
    first = MongoManager(config)
    try:
        uri = first.ensure_running()
        pid = first.running_pid()
        assert pid and _ping(uri)["ok"] == 1
        assert "127.0.0.1" in uri and "journal=true" in uri
        # Its own session: a signal to the server's process group does not reach it.
        assert os.getsid(pid) == pid != os.getsid(0)

        # A restarted server (a new manager on the same directory) reuses the running mongod.
        second = MongoManager(config)
        assert second.ensure_running() == uri and second.running_pid() == pid

        client: pymongo.MongoClient = pymongo.MongoClient(uri)
        client.edgeloop_test.t.insert_one({"_id": 1, "v": "durable"})
        client.close()

        # kill -9 of the database: the next ensure_running starts a fresh one on the same port,
        # which recovers from its journal.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while second.running_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        third = MongoManager(config)
        assert third.ensure_running() == uri
        assert third.running_pid() not in (None, pid)
        client = pymongo.MongoClient(uri)
        assert client.edgeloop_test.t.find_one({"_id": 1})["v"] == "durable"
        client.close()

        assert first.stop()
        assert first.running_pid() is None and not first.stop()
        with pytest.raises(pymongo.errors.PyMongoError):
            _ping(uri.replace("serverSelectionTimeoutMS=2000", "serverSelectionTimeoutMS=300"))
    finally:
        MongoManager(config).stop()
    # The first manager's own child: reaped, no zombie left behind.
    if first._proc is not None:
        assert first._proc.poll() is not None


def test_mongod_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "mongod"
    fake.write_text("#!/bin/sh\necho 'exception in initAndListen: simulated failure' >&2\nexit 100\n")
    fake.chmod(0o755)
    manager = MongoManager(MongoConfig(db_dir=tmp_path / "db", mongod_path=fake, start_timeout_s=5))
    with pytest.raises(MongoError, match="(?s)exit code 100.*simulated failure"):
        manager.ensure_running()


def test_the_app_opens_on_views_sorted_by_uncertainty_one_per_trigger(inbox: Inbox, tmp_path: Path) -> None:
    from edgeloop.domain import Reason
    from server.store.inbox import MOST_UNCERTAIN_VIEW, reason_view_name, review_url

    records = []
    for uncertainty, trigger in [(0.2, "margin"), (0.9, "weak_evidence"), (0.5, "margin")]:
        rec = make_record()
        rec.frame_id = uuid.uuid4().hex
        rec.uncertainty = uncertainty
        rec.reasons = [Reason(trigger, uncertainty, "x")]
        records.append(rec)
    _stored(inbox, records, tmp_path)
    ds = inbox.dataset
    assert ds.load_saved_view(MOST_UNCERTAIN_VIEW).values("uncertainty") == pytest.approx([0.9, 0.5, 0.2])
    assert ds.load_saved_view(reason_view_name("margin")).values("uncertainty") == pytest.approx([0.5, 0.2])
    assert len(ds.load_saved_view(reason_view_name("image_novelty"))) == 0  # every trigger has its view
    assert ds.app_config.active_fields.paths == ["tags", "predictions", "uncertainty"]
    assert (
        review_url("http://127.0.0.1:5151/", ds.name) == f"http://127.0.0.1:5151/datasets/{ds.name}?view=most-uncertain"
    )
    # a second process opening the dataset keeps one of each
    assert Inbox(InboxConfig(dataset=ds.name)).dataset.name == ds.name
    assert sorted(ds.list_saved_views()).count(MOST_UNCERTAIN_VIEW) == 1


def test_trigger_names_known_to_the_server_are_the_agents() -> None:
    from edge_agent.triggers import Trigger
    from edgeloop.domain import TRIGGER_NAMES

    assert [t.value for t in Trigger] == list(TRIGGER_NAMES)


# -- documents the database refuses ----------------------------------------------------------------


def _worst_case(config) -> object:
    """A frame at every limit of ``config`` at once, with 4-byte UTF-8 characters in every string."""
    import dataclasses

    import numpy as np

    from edgeloop.domain import Detection, Reason

    wide = "\U0001f600"  # 4 bytes in UTF-8
    names = [wide * config.max_name_chars] * 3
    per_detection = config.max_class_scores // config.max_detections
    scores = np.full(per_detection, 0.123456789, np.float64)
    det = Detection((1.0, 1.0, 600.0, 400.0), 0, names[0], 0.5, scores)
    return dataclasses.replace(
        make_record(),
        device_id="d" * 64,
        source_id=wide * config.max_name_chars,
        model_version=wide * config.max_name_chars,
        reasons=[
            Reason(wide * config.max_name_chars + str(i), 0.5, wide * config.max_detail_chars)
            for i in range(config.max_reasons)
        ],
        detections=[det] * config.max_detections,
        class_names=names,
        embedding=np.full(config.max_embedding, 0.5, np.float32),
    )


def test_the_largest_valid_frame_makes_a_document_within_the_bound() -> None:
    """``ValidationConfig.max_document_bytes`` holds for a real document of a frame at every limit."""
    import bson
    from bson import ObjectId

    from server.ingest.validation import MONGO_MAX_DOCUMENT_BYTES, ValidationConfig

    config = ValidationConfig()
    record = _worst_case(config)
    doc = Inbox()._document(record, Path("/" + "p" * 4000 + "/x.jpg"), ObjectId(), datetime.now())
    size = len(bson.encode(doc))
    assert 0.5 * config.max_document_bytes() < size <= config.max_document_bytes() < MONGO_MAX_DOCUMENT_BYTES


def test_a_batch_with_a_document_the_database_refuses_is_split_and_the_others_stored(
    inbox: Inbox, tmp_path: Path
) -> None:
    from edgeloop.domain import Reason
    from server.store.inbox import SamplesRefused

    good, good2 = make_record(), make_record()
    big = make_record(reasons=[Reason("x" * 8_500_000, 0.5)])  # stored twice (reasons, tags): 17 MB
    items = [(r, tmp_path / f"{r.frame_id}.jpg") for r in (good, big, good2)]
    result = inbox.insert_records(items)
    assert sorted(result.stored) == sorted([good.frame_id, good2.frame_id]) and result.duplicates == []
    assert list(result.refused) == [big.frame_id] and "code 10334" in result.refused[big.frame_id]
    assert inbox.existing_ids([good.frame_id, big.frame_id, good2.frame_id]) == {good.frame_id, good2.frame_id}
    assert inbox.stored([good.frame_id])[good.frame_id].device_id == good.device_id
    other = make_record(reasons=[Reason("y" * 8_500_000, 0.5)])
    with pytest.raises(SamplesRefused) as info:
        inbox.add_records([(other, tmp_path / "o.jpg")])
    assert list(info.value.result.refused) == [other.frame_id]

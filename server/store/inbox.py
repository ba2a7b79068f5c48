"""The FiftyOne inbox: the persistent dataset every ingested frame lands in, for curators to review.

One sample per frame id (a unique index on ``frame_id`` makes redelivery harmless even when two
writers race). Each sample holds the frame's image path in the media store, the edge model's
``predictions`` as ``fo.Detections`` (relative ``[x, y, w, h]`` boxes, ``confidence``, and the
per-class score vector as ``class_scores`` when the detector exposed it), who sent it and when
(``device_id``, ``source_id``, ``model_version``, ``capture_time`` in UTC, ``sequence``,
``ingested_at``), the model's image ``embedding`` when it exports one (curation's diversity), why the
edge kept it (``uncertainty``; ``reasons`` as ``{trigger, score,
detail}`` dicts; the trigger names as sample ``tags``, so the App's tag filter shows "all margin
frames"), and ``metadata`` (``fo.ImageMetadata``).

Writes are batched and go straight to the dataset's sample collection as one ``insert_many``
with documents shaped exactly like the ones ``Dataset.add_samples`` writes (a test holds the
two side by side). Measured on this project's 2-core CI machine (5 detections per sample),
``add_samples`` spends ~3 ms of Python per sample (building ``fo.Sample`` objects, validating
them, re-reading them after the insert) and tops out at 290-420 samples/s; the direct insert
reaches 4,000-10,000 samples/s at 64 per batch (~700 at 1 per batch: each insert waits for a
journal commit), so the database is not what limits ingest.

A document the database refuses for its content (over MongoDB's 16 MiB, say) does not fail the
others: :meth:`Inbox.insert_records` keeps the per-document errors of the unordered insert, and
when the database refuses a whole batch for one document's content it splits the batch in
halves until the culprit stands alone, so only that frame is refused. Validation's limits keep
valid frames far below the size limit (``ValidationConfig.max_document_bytes``); this is the
backstop. Refusals for any other reason (database down, write concern) raise, to be retried.
The schema is declared once when the dataset is created, so FiftyOne (App, views, curation)
sees typed fields. ``fiftyone`` is imported lazily: configure it first
(``server.store.mongo.configure_fiftyone``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.domain import TRIGGER_NAMES, FrameRecord

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

#: MongoDB's duplicate-key error code (the unique ``frame_id`` index).
DUPLICATE_KEY = 11000
#: MongoDB error codes that refuse a document for what it holds: retrying cannot help.
#: BadValue (2, e.g. "object to insert too large"), InvalidBSON (22), DollarPrefixedFieldName
#: (52), InvalidDBRef (55), EmptyFieldName (56), DottedFieldName (57), BSONObjectTooLarge (10334),
#: KeyTooLong (17280), document too large after an update (17419).
CONTENT_ERROR_CODES = frozenset({2, 22, 52, 55, 56, 57, 10334, 17280, 17419})


class StoredSample(NamedTuple):
    """Who stored a frame id and where its image is (for ownership and orphan checks)."""

    device_id: str
    filepath: str


@dataclasses.dataclass
class InsertResult:
    """What :meth:`Inbox.insert_records` did with each frame id."""

    stored: list[str] = dataclasses.field(default_factory=list)
    #: Already in the dataset (or inserted by another writer meanwhile, or repeated in the batch).
    duplicates: list[str] = dataclasses.field(default_factory=list)
    #: Refused by the database for the sample's content: frame id -> the database's reason.
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


class SamplesRefused(ValueError):
    """The database refused some samples for their content (:meth:`Inbox.add_records`)."""

    def __init__(self, result: InsertResult) -> None:
        super().__init__(f"{len(result.refused)} sample(s) refused by the database: {sorted(result.refused)[:5]}")
        self.result = result


def is_content_error(err: BaseException) -> bool:
    """True when the database (or the driver, encoding it) refused a write for the document itself."""
    from bson.errors import InvalidDocument
    from pymongo.errors import BulkWriteError, OperationFailure

    if isinstance(err, InvalidDocument):  # includes pymongo's DocumentTooLarge
        return True
    return isinstance(err, OperationFailure) and not isinstance(err, BulkWriteError) and err.code in CONTENT_ERROR_CODES


class InboxConfig(StrictModel):
    """The FiftyOne dataset frames are stored in, and how writes to it are batched."""

    dataset: str = Field("edgeloop-inbox", min_length=1, description="Name of the persistent FiftyOne dataset.")
    batch_size: int = Field(64, ge=1, le=10_000, description="Most frames stored per database round trip.")
    max_wait_s: float = Field(
        0.005,
        ge=0,
        le=5,
        description="How long the writer waits for the next frame before it stores the batch it has (latency cost).",
    )


class InboxSchemaError(RuntimeError):
    """The dataset exists with a field whose type the inbox cannot write into."""


def _utc_naive(seconds: float) -> datetime:
    # FiftyOne (without fo.config.timezone) stores and returns naive datetimes that mean UTC.
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def _rand() -> float:
    # The distribution of FiftyOne's own `_rand` (fiftyone.core.odm.sample._generate_rand), used by take().
    return random.random() * 0.001 + 0.999


def _relative_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """Pixel ``(x1, y1, x2, y2)`` to FiftyOne's relative ``[x, y, w, h]``, clamped to the image.

    Validation lets boxes stray a couple of pixels past the border; FiftyOne expects [0, 1].
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height]


#: The saved view a curator opens first: every frame, the most uncertain first.
MOST_UNCERTAIN_VIEW = "most-uncertain"


def reason_view_name(trigger: str) -> str:
    """The saved view of the frames one trigger kept: ``reason-weak-evidence``."""
    return "reason-" + trigger.replace("_", "-")


def review_url(app_url: str, dataset: str, view: str = MOST_UNCERTAIN_VIEW) -> str:
    """The App's address of a saved view of ``dataset``."""
    return f"{app_url.rstrip('/')}/datasets/{dataset}?view={view}"


def _ensure_review_views(dataset: fo.Dataset) -> None:
    """What the App shows a curator first: saved views sorted by uncertainty (all frames, and one per
    trigger reason), with the trigger tags and the predictions visible on the grid."""
    import fiftyone as fo

    wanted = {MOST_UNCERTAIN_VIEW: dataset.sort_by("uncertainty", reverse=True)}
    for trigger in TRIGGER_NAMES:
        wanted[reason_view_name(trigger)] = dataset.match_tags(trigger).sort_by("uncertainty", reverse=True)
    existing = set(dataset.list_saved_views())
    for name, view in wanted.items():
        if name in existing:
            continue
        with contextlib.suppress(ValueError):  # another ingest process saved it meanwhile
            dataset.save_view(name, view, description=f"edgeloop: {name.replace('-', ' ')}, most uncertain first")
    config = dataset.app_config
    if config.active_fields is None:
        config.active_fields = fo.ActiveFields(paths=["tags", "predictions", "uncertainty"])
        dataset.save()


def _reason(code: object, message: str) -> str:
    """A database refusal for an ack: its code and the start of its message (which may quote the document)."""
    return f"{message[:160]} (code {code})"


def _tags(record: FrameRecord) -> list[str]:
    return list(dict.fromkeys(r.trigger for r in record.reasons if r.trigger))


class Inbox:
    """The inbox dataset, created on first use if missing.

    Thread-safety: meant for one writer thread (the ingest core's); reads from other threads
    (``count``, ``existing_ids``, ``sample_for``) are fine.
    """

    def __init__(self, config: InboxConfig | None = None) -> None:
        self.config = config or InboxConfig()
        self._dataset: fo.Dataset | None = None

    @property
    def name(self) -> str:
        return self.config.dataset

    @property
    def dataset(self) -> fo.Dataset:
        """The FiftyOne dataset (loaded or created, schema and index ensured, on first access)."""
        if self._dataset is None:
            self._dataset = self._open()
        return self._dataset

    def add_records(
        self, items: Iterable[tuple[FrameRecord, Path]], *, check_existing: bool = True
    ) -> tuple[list[str], list[str]]:
        """Insert one sample per ``(record, media_path)`` in one batch; frame ids already stored are skipped.

        ``check_existing=False`` skips the look-up of stored ids for a caller that has just made
        it (the ingest core): an id stored meanwhile is still caught by the unique index and
        reported as a duplicate.

        Returns:
            ``(stored_ids, duplicate_ids)``: frame ids inserted now, and ids that were already in
            the dataset (or repeated within ``items``).

        Raises:
            SamplesRefused: the database refused some samples for their content; the others were
                stored (the exception's ``result`` says which).
            pymongo.errors.PyMongoError: the database is unreachable or refused a write for another
                reason than a duplicate; samples that were inserted before the error stay (a retry
                then finds them and reports them as duplicates).
        """
        result = self.insert_records(items, check_existing=check_existing)
        if result.refused:
            raise SamplesRefused(result)
        return result.stored, result.duplicates

    def insert_records(self, items: Iterable[tuple[FrameRecord, Path]], *, check_existing: bool = True) -> InsertResult:
        """Like :meth:`add_records`, but a sample refused for its content is reported, not raised.

        Raises:
            pymongo.errors.PyMongoError: the database is unreachable or refused a write for another
                reason than a duplicate or the content of a sample.
        """
        result = InsertResult()
        batch: dict[str, tuple[FrameRecord, Path]] = {}
        for record, path in items:
            if record.frame_id in batch:
                result.duplicates.append(record.frame_id)
            else:
                batch[record.frame_id] = (record, path)
        if not batch:
            return result
        existing = self.existing_ids(batch) if check_existing else set()
        result.duplicates.extend(fid for fid in batch if fid in existing)
        dataset_id = self.dataset._doc.id
        now = datetime.now(UTC).replace(tzinfo=None)
        new = [
            (record.frame_id, self._document(record, path, dataset_id, now))
            for fid, (record, path) in batch.items()
            if fid not in existing
        ]
        if new:
            self._insert(new, result)
        return result

    def _insert(self, new: list[tuple[str, dict[str, Any]]], result: InsertResult) -> None:
        """Insert ``(frame_id, document)`` pairs; split the batch when one document makes the
        database refuse all of them."""
        from bson.errors import InvalidDocument
        from pymongo.errors import BulkWriteError, OperationFailure

        try:
            # ordered=False: every document is tried, so one racing duplicate costs only itself.
            self.dataset._sample_collection.insert_many([doc for _, doc in new], ordered=False)
        except BulkWriteError as err:
            details = err.details or {}
            if details.get("writeConcernErrors"):
                raise  # inserted but not known to be journaled: not durable, so not stored
            failed = {e["index"]: e for e in details.get("writeErrors", [])}
            if any(e.get("code") not in CONTENT_ERROR_CODES | {DUPLICATE_KEY} for e in failed.values()):
                raise
            raced = [new[i][0] for i, e in sorted(failed.items()) if e.get("code") == DUPLICATE_KEY]
            if raced:
                logger.info("%d frame(s) were inserted by another writer meanwhile: %s", len(raced), raced[:5])
            result.duplicates.extend(raced)
            for i, e in sorted(failed.items()):
                if e.get("code") != DUPLICATE_KEY:
                    result.refused[new[i][0]] = _reason(e.get("code"), e.get("errmsg", ""))
            result.stored.extend(fid for i, (fid, _) in enumerate(new) if i not in failed)
            return
        except (OperationFailure, InvalidDocument) as err:
            if not is_content_error(err):
                raise
            if len(new) == 1:
                result.refused[new[0][0]] = _reason(getattr(err, "code", None), str(err))
                return
            logger.warning("the database refused a batch of %d samples (%s); splitting it", len(new), err)
            half = len(new) // 2
            self._insert(new[:half], result)
            self._insert(new[half:], result)
            return
        result.stored.extend(fid for fid, _ in new)

    def existing_ids(self, frame_ids: Iterable[str]) -> set[str]:
        """Which of ``frame_ids`` already have a sample (one indexed query)."""
        ids = list(frame_ids)
        if not ids:
            return set()
        cursor = self.dataset._sample_collection.find({"frame_id": {"$in": ids}}, {"frame_id": 1, "_id": 0})
        return {doc["frame_id"] for doc in cursor}

    def stored(self, frame_ids: Iterable[str]) -> dict[str, StoredSample]:
        """Device and image path of those of ``frame_ids`` that have a sample (one indexed query)."""
        ids = list(frame_ids)
        if not ids:
            return {}
        cursor = self.dataset._sample_collection.find(
            {"frame_id": {"$in": ids}}, {"frame_id": 1, "device_id": 1, "filepath": 1, "_id": 0}
        )
        return {doc["frame_id"]: StoredSample(doc.get("device_id") or "", doc.get("filepath") or "") for doc in cursor}

    def sample_files(self, frame_ids: Iterable[str]) -> dict[str, str]:
        """The image path of each of ``frame_ids`` that has a sample (for the orphan sweep)."""
        return {fid: sample.filepath for fid, sample in self.stored(frame_ids).items()}

    def count(self) -> int:
        return self.dataset._sample_collection.count_documents({})

    def sample_for(self, frame_id: str) -> fo.Sample | None:
        """The frame's sample, or None."""
        from fiftyone import ViewField as F

        view = self.dataset.match(F("frame_id") == frame_id)
        return view.first() if len(view) else None

    # -- internals --------------------------------------------------------------------------

    def _document(self, record: FrameRecord, path: Path, dataset_id: Any, now: datetime) -> dict[str, Any]:
        """The sample's MongoDB document, in the shape ``Dataset.add_samples`` gives it."""
        from bson import ObjectId

        w, h = record.width, record.height
        detections = []
        for det in record.detections:
            d: dict[str, Any] = {
                "_id": ObjectId(),
                "_cls": "Detection",
                "tags": [],
                "attributes": {},
                "label": det.class_name,
                "bounding_box": _relative_box(det.box, w, h),
                "confidence": float(det.confidence),
                "class_id": int(det.class_id),
            }
            if det.class_scores is not None:
                d["class_scores"] = [float(s) for s in det.class_scores]
            detections.append(d)
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "filepath": str(path),
            "tags": _tags(record),
            "metadata": {
                "_cls": "ImageMetadata",
                "size_bytes": len(record.image),
                "mime_type": record.media_type or "image/jpeg",
                "width": w,
                "height": h,
            },
            "created_at": now,
            "last_modified_at": now,
            "_media_type": "image",
            "_rand": _rand(),
            "_dataset_id": dataset_id,
            "frame_id": record.frame_id,
            "device_id": record.device_id,
            "source_id": record.source_id,
            "source_name": record.source_name,
            "model_version": record.model_version,
            "capture_time": _utc_naive(record.capture_time),
            "sequence": int(record.sequence),
            "uncertainty": float(record.uncertainty),
            "reasons": [{"trigger": r.trigger, "score": float(r.score), "detail": r.detail} for r in record.reasons],
            "predictions": {"_cls": "Detections", "detections": detections},
            "ingested_at": now,
        }
        if record.embedding is not None:
            # Plain floats: curation reads them back as one numpy matrix per batch.
            doc["embedding"] = [float(v) for v in record.embedding]
        return doc

    def _open(self) -> fo.Dataset:
        import fiftyone as fo

        name = self.config.dataset
        if fo.dataset_exists(name):
            dataset = fo.load_dataset(name)
        else:
            try:
                dataset = fo.Dataset(name, persistent=True)
                logger.info("created FiftyOne dataset %r", name)
            except ValueError:
                dataset = fo.load_dataset(name)  # another process created it meanwhile
        self._ensure_schema(dataset)
        return dataset

    @staticmethod
    def _ensure_schema(dataset: fo.Dataset) -> None:
        import fiftyone as fo

        if dataset.media_type is None:
            dataset.media_type = "image"  # also types `metadata` as fo.ImageMetadata
        elif dataset.media_type != "image":
            raise InboxSchemaError(f"dataset {dataset.name!r} holds {dataset.media_type} samples, not images")
        wanted: list[tuple[str, Any, dict[str, Any]]] = [
            ("frame_id", fo.StringField, {}),
            ("device_id", fo.StringField, {}),
            ("source_id", fo.StringField, {}),
            ("source_name", fo.StringField, {}),
            ("model_version", fo.StringField, {}),
            ("capture_time", fo.DateTimeField, {}),
            ("sequence", fo.IntField, {}),
            ("uncertainty", fo.FloatField, {}),
            ("reasons", fo.ListField, {"subfield": fo.DictField}),
            ("predictions", fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Detections}),
            ("ingested_at", fo.DateTimeField, {}),
            ("embedding", fo.ListField, {"subfield": fo.FloatField}),
        ]
        schema = dataset.get_field_schema()
        for field, ftype, kwargs in wanted:
            existing = schema.get(field)
            if existing is None:
                dataset.add_sample_field(field, ftype, **kwargs)
            elif not isinstance(existing, ftype):
                raise InboxSchemaError(
                    f"dataset {dataset.name!r} has field {field!r} of type {type(existing).__name__}, "
                    f"expected {ftype.__name__}; use another inbox dataset name"
                )
        # Declared (not dynamic) so the App can filter on them.
        det_schema = dataset.get_field_schema(flat=True)
        if "predictions.detections.class_id" not in det_schema:
            dataset.add_sample_field("predictions.detections.class_id", fo.IntField)
        if "predictions.detections.class_scores" not in det_schema:
            dataset.add_sample_field("predictions.detections.class_scores", fo.ListField, subfield=fo.FloatField)
        # Sparse: a sample added by hand without a frame id does not collide with others.
        dataset.create_index("frame_id", unique=True, sparse=True)
        _ensure_review_views(dataset)

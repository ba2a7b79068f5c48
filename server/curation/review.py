"""What curators see and edit in the FiftyOne App: the inbox's review fields, each batch's saved view,
the pre-annotation, the label schema that turns on the App's Annotate tab, and reading back their
decision when a batch is approved.

On the inbox dataset curation adds:

- ``batch``: the batch a frame was picked into (``batch-001``);
- ``ground_truth`` (``fo.Detections``): created from the edge model's ``predictions`` when the
  batch is made (labels and boxes, fresh label ids, no confidences), so curators correct rather
  than draw from nothing. A label schema for it (type ``detections``, the training classes as a
  dropdown) is set and activated: FiftyOne's open-source App (1.13 and later) then edits its boxes
  and classes in the sample view's **Annotate** tab and writes every change to the database;
- a saved view per batch (``batch-001``: the batch's frames, most uncertain first) whose
  description and colour carry its status (to review: orange, approved: green, rejected: red).

Curators mark frames with the sample tags ``approved`` and ``reject``. Approving a batch takes the
``approved`` frames (a frame tagged both is an error, not a guess); untagged frames follow
``CurationConfig.untagged`` (by default they stay out of the training set, and out of any later
batch). Rejected frames never enter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import cv2

from server.curation.embeddings import sample_fields
from server.curation.store import BatchRecord, BatchStatus, CurationError
from server.curation.versions import Box

if TYPE_CHECKING:
    import fiftyone as fo

BATCH_FIELD = "batch"
#: Why the selection put a frame in its batch (its score and evidence, its camera's share, the class it
#: covers): a curator reads it in the sample's panel.
PICKED_BECAUSE = "picked_because"
GROUND_TRUTH = "ground_truth"
PREDICTIONS = "predictions"
APPROVED_TAG = "approved"
REJECT_TAG = "reject"
#: How far (in fractions of the image side) a box may stray past the border and still be taken,
#: clamped: the App's box tools can leave a float rounding error at the edge, nothing more.
BOX_TOLERANCE = 1e-4
#: Problems listed at most in an approval error (the count says how many more).
MAX_PROBLEMS_SHOWN = 10
#: Saved-view colours by batch status.
STATUS_COLORS = {BatchStatus.TO_REVIEW: "#FF6D04", BatchStatus.APPROVED: "#2EA043", BatchStatus.REJECTED: "#D1242F"}


class ApprovalError(CurationError):
    """A batch cannot be approved as it stands (bad labels, conflicting tags, nothing approved);
    nothing was changed and the message lists what to fix."""


def ensure_inbox_fields(dataset: fo.Dataset) -> None:
    """Declare curation's fields on the inbox (once; typed, so the App can show and filter them)."""
    import fiftyone as fo

    schema = dataset.get_field_schema()
    wanted = [
        (BATCH_FIELD, fo.StringField, {}),
        (PICKED_BECAUSE, fo.StringField, {}),
        (GROUND_TRUTH, fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Detections}),
        *sample_fields(),
    ]
    for name, ftype, kwargs in wanted:
        if name not in schema:
            dataset.add_sample_field(name, ftype, **kwargs)
        elif not isinstance(schema[name], ftype):
            raise CurationError(
                f"dataset {dataset.name!r} has a field {name!r} of type {type(schema[name]).__name__}; "
                f"curation needs {ftype.__name__}"
            )


def label_schema(classes: Sequence[str]) -> dict[str, Any]:
    """The App's label schema for ``ground_truth``: boxes with one of ``classes``, picked from a dropdown."""
    return {"type": "detections", "component": "dropdown", "classes": list(classes)}


def ensure_label_schema(dataset: fo.Dataset, classes: Sequence[str]) -> None:
    """Set and activate ``ground_truth``'s label schema, keeping other fields' schemas as they are."""
    schemas = dataset.label_schemas
    wanted = label_schema(classes)
    if schemas.get(GROUND_TRUTH) != wanted:
        schemas[GROUND_TRUTH] = wanted
        dataset.set_label_schemas(schemas)
    if GROUND_TRUTH not in dataset.active_label_schemas:
        dataset.activate_label_schemas(GROUND_TRUTH, prepend=True)
    # Shown on the grid beside the predictions: what a curator approves is what they see.
    active = dataset.app_config.active_fields
    missing = [f for f in (GROUND_TRUTH, PICKED_BECAUSE) if active is not None and f not in active.paths]
    if active is not None and not active.exclude and missing:
        active.paths.extend(missing)
        dataset.save()


def batch_view(dataset: fo.Dataset, name: str) -> fo.DatasetView:
    """A batch's frames, the most uncertain first (what its saved view stores)."""
    from fiftyone import ViewField as F

    return dataset.match(F(BATCH_FIELD) == name).sort_by("uncertainty", reverse=True)


def _view_info(record: BatchRecord) -> dict[str, str]:
    text = {
        BatchStatus.TO_REVIEW: f"to_review: {len(record.sample_ids)} frames; fix ground_truth in the Annotate tab, "
        "tag `approved` / `reject`, then approve the batch",
        BatchStatus.APPROVED: f"approved into {record.version}: {len(record.approved)} frames taken, "
        f"{len(record.rejected)} rejected, {len(record.excluded)} left out",
        BatchStatus.REJECTED: f"rejected: its {len(record.sample_ids)} frames never enter the training set",
    }[record.status]
    return {"description": f"edgeloop {text}", "color": STATUS_COLORS[record.status]}


def show_batch(dataset: fo.Dataset, record: BatchRecord) -> None:
    """Make the batch visible in the App: members marked, pre-annotated, saved view with its status.

    Idempotent (a repair after a crash calls it again): frames that already have ``ground_truth``
    keep it, so a curator's edits are never overwritten.
    """
    import fiftyone as fo

    members = dataset.select(record.sample_ids)
    dataset.set_values(BATCH_FIELD, dict.fromkeys(record.sample_ids, record.name), key_field="id")
    if record.why:
        dataset.set_values(PICKED_BECAUSE, dict(zip(record.sample_ids, record.why, strict=True)), key_field="id")
    todo = members.exists(GROUND_TRUTH, False)
    if len(todo):
        ids, predicted = todo.values(["id", PREDICTIONS])
        truth = {
            sid: fo.Detections(
                detections=[
                    fo.Detection(label=d.label, bounding_box=list(d.bounding_box))
                    for d in (pred.detections if pred is not None else [])
                ]
            )
            for sid, pred in zip(ids, predicted, strict=True)
        }
        dataset.set_values(GROUND_TRUTH, truth, key_field="id")
    info = _view_info(record)
    if record.name not in dataset.list_saved_views():
        dataset.save_view(record.name, batch_view(dataset, record.name), **info)
        return
    current = dataset.get_saved_view_info(record.name)
    if current.get("description") != info["description"] or current.get("color") != info["color"]:
        dataset.update_saved_view_info(record.name, info)


@dataclass(frozen=True)
class Approved:
    """A frame a curator approved, with its corrected labels, checked."""

    sample_id: str
    frame_id: str
    filepath: str
    width: int
    height: int
    device_id: str
    boxes: tuple[Box, ...]
    source_id: str = ""
    captured: float | None = None  # capture time, seconds since the epoch (UTC)


@dataclass(frozen=True)
class Decision:
    """What approving a batch would do: frames taken, rejected, left out (frame ids)."""

    approved: list[Approved]
    rejected: list[str]
    excluded: list[str]


def check_box(label: Any, box: Any, classes: Sequence[str]) -> tuple[Box | None, str]:
    """A ``ground_truth`` box as the training set takes it, or ``(None, what is wrong)``.

    Boxes are FiftyOne's relative ``[x, y, w, h]``; within :data:`BOX_TOLERANCE` of the border
    they are clamped into the image, beyond it they are refused.
    """
    if label not in classes:
        return None, f"unknown class {label!r} (classes: {', '.join(classes)})"
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, f"{label} box {box!r} is not four numbers"
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None, f"{label} box {[x, y, w, h]} has no area"
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > 1 + tol or y + h > 1 + tol:
        return None, f"{label} box [x={x:.4f}, y={y:.4f}, w={w:.4f}, h={h:.4f}] lies outside the image"
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, 1.0), min(y + h, 1.0)
    return Box(label=label, box=(x1, y1, x2 - x1, y2 - y1)), ""


def epoch_seconds(when: datetime | None) -> float | None:
    """A capture time as FiftyOne returns it (naive UTC) in seconds since the epoch."""
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _image_size(width: int | None, height: int | None, path: str) -> tuple[int, int] | None:
    if not os.path.isfile(path):
        return None
    if width and height:
        return int(width), int(height)
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return None if image is None else (int(image.shape[1]), int(image.shape[0]))


def decide(dataset: fo.Dataset, record: BatchRecord, classes: Sequence[str], untagged: str) -> Decision:
    """Read a batch's tags and ``ground_truth`` and check them; nothing is written.

    Raises:
        ApprovalError: a frame tagged both ``approved`` and ``reject``, a box outside its image or of
            an unknown class, a frame gone from the inbox or without a readable image, or no frame
            approved at all. The message lists the problems.
    """
    members = dataset.select(record.sample_ids)
    fields = [
        "id",
        "frame_id",
        "filepath",
        "tags",
        "metadata.width",
        "metadata.height",
        "device_id",
        f"{GROUND_TRUTH}.detections.label",
        f"{GROUND_TRUTH}.detections.bounding_box",
        "source_id",
        "capture_time",
    ]
    rows = {row[0]: row for row in zip(*members.values(fields), strict=True)}
    problems = [f"sample {sid} is no longer in the inbox" for sid in record.sample_ids if sid not in rows]
    approved: list[Approved] = []
    rejected: list[str] = []
    excluded: list[str] = []
    for sid in record.sample_ids:
        if sid not in rows:
            continue
        _, frame_id, path, tags, width, height, device, labels, boxes, source, captured = rows[sid]
        tags = set(tags or [])
        name = frame_id or sid
        if APPROVED_TAG in tags and REJECT_TAG in tags:
            problems.append(f"{name}: tagged both `{APPROVED_TAG}` and `{REJECT_TAG}`; remove one")
            continue
        if REJECT_TAG in tags:
            rejected.append(name)
            continue
        if APPROVED_TAG not in tags and untagged != "approve":
            excluded.append(name)
            continue
        checked: list[Box] = []
        for label, box in zip(labels or [], boxes or [], strict=True):
            ok, why = check_box(label, box, classes)
            if ok is None:
                problems.append(f"{name}: {why}")
            else:
                checked.append(ok)
        size = _image_size(width, height, path)
        if size is None:
            problems.append(f"{name}: its image {path} cannot be read")
            continue
        approved.append(
            Approved(
                sid, name, path, size[0], size[1], device or "", tuple(checked), source or "", epoch_seconds(captured)
            )
        )
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise ApprovalError(f"{record.name} cannot be approved; nothing was changed. Fix in the App:\n{shown}{more}")
    if not approved:
        raise ApprovalError(
            f"{record.name} has no approved frame ({len(rejected)} rejected, {len(excluded)} untagged); "
            f"tag the frames to keep `{APPROVED_TAG}` in the App, or reject the batch; nothing was changed"
        )
    return Decision(approved, rejected, excluded)

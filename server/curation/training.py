"""The training set as a FiftyOne dataset: a browsable mirror of the latest dataset version.

The dataset (``CurationConfig.training_dataset``, ``edgeloop-train`` by default) holds one sample
per approved frame: its image (the content-addressed copy under the curation root), the approved
``ground_truth``, its ``split`` (also a sample tag and a saved view ``split-train`` etc.), the
``batch`` and ``dataset_version`` it came in with, and the embedding fields curation uses to keep
near-duplicates of the training set out of later batches. ``dataset.info["edgeloop_version"]``
names the version it mirrors.

The versions are the truth (:mod:`server.curation.versions`); this dataset follows them, and
:func:`sync_training_dataset` brings it level (it only adds samples: versions only add). Edits made
to it in the App change no version; correct labels in a new batch instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from server.curation.embeddings import sample_fields
from server.curation.review import BATCH_FIELD, GROUND_TRUTH
from server.curation.splits import SPLITS
from server.curation.versions import VersionStore

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

#: The dataset.info key naming the version the dataset mirrors.
VERSION_INFO_KEY = "edgeloop_version"
SPLIT_FIELD = "split"
FRAME_ID = "frame_id"
#: Per sample, the frames of other splits it leaks with ("test:<frame id> (near-duplicate)"), set by
#: ``edgeloop curate check-leaks``; the saved view :data:`LEAKS_VIEW` shows both sides of every pair.
LEAK_FIELD = "leaks"
LEAKS_VIEW = "leaks"


def open_training_dataset(name: str) -> fo.Dataset:
    """The persistent training dataset, created with its fields if missing."""
    import fiftyone as fo

    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
    else:
        try:
            dataset = fo.Dataset(name, persistent=True)
            dataset.media_type = "image"
        except ValueError:
            dataset = fo.load_dataset(name)  # another process created it meanwhile
    schema = dataset.get_field_schema()
    wanted = [
        (FRAME_ID, fo.StringField, {}),
        (SPLIT_FIELD, fo.StringField, {}),
        (BATCH_FIELD, fo.StringField, {}),
        ("device_id", fo.StringField, {}),
        ("dataset_version", fo.StringField, {}),
        (GROUND_TRUTH, fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Detections}),
        (LEAK_FIELD, fo.ListField, {"subfield": fo.StringField}),
        *sample_fields(),
    ]
    for field, ftype, kwargs in wanted:
        if field not in schema:
            dataset.add_sample_field(field, ftype, **kwargs)
    return dataset


def mirrored_version(dataset: fo.Dataset) -> str | None:
    """The version the training dataset mirrors (None before the first approval)."""
    return dataset.info.get(VERSION_INFO_KEY)


def sync_training_dataset(
    dataset: fo.Dataset, versions: VersionStore, vid: str, extras: Mapping[str, Mapping[str, Any]] | None = None
) -> int:
    """Add the samples of version ``vid`` the dataset lacks; returns how many were added.

    Args:
        dataset: The training dataset (:func:`open_training_dataset`).
        versions: Where the version records and images live.
        vid: The version to mirror (the latest).
        extras: Optional field values by frame id to copy onto new samples (the inbox sample's
            embedding fields, so near-duplicate checks need not recompute them).
    """
    import fiftyone as fo
    from fiftyone import ViewField as F

    record = versions.load(vid)
    present = set(dataset.values(FRAME_ID))
    new = []
    for version in versions.chain(vid):
        for s in version.added:
            if s.frame_id in present:
                continue
            sample = fo.Sample(
                filepath=str(versions.image_path(s)),
                tags=[s.split],
                metadata=fo.ImageMetadata(width=s.width, height=s.height),
                ground_truth=fo.Detections(
                    detections=[fo.Detection(label=b.label, bounding_box=list(b.box)) for b in s.boxes]
                ),
                frame_id=s.frame_id,
                split=s.split,
                batch=s.batch,
                device_id=s.device_id,
                dataset_version=version.id,
            )
            for key, value in (extras or {}).get(s.frame_id, {}).items():
                if value is not None:
                    sample[key] = value
            new.append(sample)
    if new:
        dataset.add_samples(new)
    existing_views = set(dataset.list_saved_views())
    for split in SPLITS:
        if f"split-{split}" not in existing_views:
            dataset.save_view(
                f"split-{split}", dataset.match(F(SPLIT_FIELD) == split), description=f"the {split} split"
            )
    dataset.info[VERSION_INFO_KEY] = record.id
    dataset.save()
    logger.info("training dataset %s now mirrors %s (+%d samples)", dataset.name, record.id, len(new))
    return len(new)


def show_leaks(dataset: fo.Dataset, partners: Mapping[str, list[str]]) -> int:
    """Write each sample's leak partners (frame id to "split:frame (kind)" strings; others cleared) and
    save the ``leaks`` view of every sample in a pair, pairs side by side; returns how many samples."""
    ids, frames = dataset.values(["id", FRAME_ID])
    values = {sid: partners.get(f) or None for sid, f in zip(ids, frames, strict=True)}
    dataset.set_values(LEAK_FIELD, values, key_field="id")
    view = dataset.exists(LEAK_FIELD).sort_by(FRAME_ID)
    if LEAKS_VIEW in dataset.list_saved_views():
        dataset.delete_saved_view(LEAKS_VIEW)
    dataset.save_view(
        LEAKS_VIEW,
        view,
        description="Samples that are (or nearly are) a sample of another split: each lists its partners in `leaks`",
    )
    return len(view)

"""Dataset versions: immutable records of the training set, and their export as a YOLO directory.

FiftyOne's own dataset versioning is not in its open-source edition, so edgeloop keeps its own.
Every approval writes one version, ``ds-0001``, ``ds-0002``, ..., each naming its ``parent``. A
record holds the samples that approval *added*, each with a snapshot of its labels (classes and
boxes), its image's sha256 and size and its split; plus, for the whole version, the frame ids per
split, the samples and boxes per split and class, whether the test split is frozen, and
``labels_sha256``. A version's
samples are its own plus its ancestors' (approval only adds; samples never change split), so
:meth:`VersionStore.samples` walks the chain.

``labels_sha256`` chains: the sha256 of the parent's hash, the class list and the canonical JSON
of the added samples. Equal hashes mean equal labels, images and splits across the whole chain;
:meth:`VersionStore.load` recomputes it (and checks the splits against the parent's plus the added
samples), so a hand-edited or truncated record is refused.

Immutability: a record is written once (``versions/ds-NNNN.json``, fsync-ed, renamed into place,
read-only), never rewritten; the images it names live content-addressed under the curation root
(``images/ab/<sha256>.jpg``) and are never modified either. Nothing a curator does in the App
later (an edit of ``ground_truth`` in the inbox or in the training dataset) reaches an existing
version: export reads only the records and the images, so two exports of a version are
byte-identical.

The export (:func:`export_yolo`) is what the retraining flows train from::

    OUT/data.yaml                 names, train/val/test relative to the file's folder (no `path:`)
    OUT/images/<split>/<frame id>.<ext>
    OUT/labels/<split>/<frame id>.txt   "class cx cy w h" per box, 6 decimals
    OUT/edgeloop-version.json     id, parent, labels_sha256, counts (lineage for the registry)

``data.yaml`` has no ``path:`` key, so ultralytics takes the file's own folder as the root and the
export can be moved or copied anywhere. A version without val samples points ``val:`` at the train
images (ultralytics requires a val split), and one without test samples has no ``test:`` key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeloop.durable import fsync_dir, write_atomic
from edgeloop.synth.scenes import YoloLabel
from server.curation.episodes import stream_key
from server.curation.splits import SPLITS, TEST, TRAIN, VAL

logger = logging.getLogger(__name__)

#: Bumped when the record changes shape; a reader refuses a format it does not know.
FORMAT = 1
VERSIONS_DIR = "versions"
IMAGES_DIR = "images"
#: The lineage file an export carries beside data.yaml.
LINEAGE_FILE = "edgeloop-version.json"
_ID = re.compile(r"^ds-(\d{4,})$")


class VersionError(Exception):
    """A dataset version is unknown, unreadable or inconsistent; the message says which and why."""


class ExportError(VersionError):
    """An export could not be written (the target is not empty, an image is missing or changed)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Box(_Frozen):
    """One labelled box: class name and FiftyOne's relative ``[x, y, w, h]`` (top-left, size)."""

    label: str
    box: tuple[float, float, float, float]


class VersionSample(_Frozen):
    """One sample of a version, with a snapshot of its labels."""

    frame_id: str = Field(description="The frame's id (the edge's UUID): the sample's identity across datasets.")
    split: str
    image: str = Field(description="Image path relative to the curation root (content-addressed).")
    image_sha256: str
    width: int
    height: int
    device_id: str = ""
    batch: str = Field(description="The review batch it was approved in.")
    boxes: tuple[Box, ...] = ()
    # Added after format 1's first records: left out of the chain hash while unset, so older
    # records keep their hash (see _LATER_FIELDS).
    episode: str = Field("", description="The episode it shares a split with (server.curation.episodes).")
    source_id: str = Field("", description="The device's camera it came from.")
    captured: float | None = Field(None, description="Capture time, seconds since the epoch (UTC).")

    @property
    def stream(self) -> str:
        """Device and source: frames of one stream captured close in time are one episode."""
        return stream_key(self.device_id, self.source_id)


class DatasetVersion(_Frozen):
    """One immutable dataset version (see the module docstring)."""

    format: int = FORMAT
    id: str
    parent: str | None
    created: str = Field(description="When it was approved, ISO 8601 UTC.")
    batch: str
    classes: tuple[str, ...]
    added: tuple[VersionSample, ...]
    splits: dict[str, list[str]] = Field(description="Frame ids per split, whole version, sorted.")
    counts: dict[str, int] = Field(description="Samples per split, whole version.")
    class_counts: dict[str, dict[str, int]] = Field(description="Boxes per split and class, whole version.")
    test_frozen: bool
    labels_sha256: str
    # Added after format 1's first records (defaults for older ones); not part of the chain hash.
    splits_from: str = Field(
        "",
        description="How the added samples were split: `episodes` (the policy, by episode), `declared` (an "
        "imported data set's own splits), `` (older records: the policy, frame by frame).",
    )
    held_out: dict[str, str] = Field(
        default_factory=dict,
        description="Approved frames left out, with why (their episode lies in a full split: in train they "
        "would leak into its score).",
    )

    @property
    def size(self) -> int:
        return sum(self.counts.values())


def version_id(number: int) -> str:
    return f"ds-{number:04d}"


def version_number(vid: str) -> int:
    """The number of ``ds-NNNN``.

    Raises:
        VersionError: not a version id.
    """
    m = _ID.match(vid)
    if not m:
        raise VersionError(f"{vid!r} is not a dataset version id (ds-0001, ds-0002, ...)")
    return int(m.group(1))


#: Sample fields added after the first records, with their unset value: hashed only when set.
_LATER_FIELDS = {"episode": "", "source_id": "", "captured": None}


def _canonical(sample: VersionSample) -> dict:
    doc = sample.model_dump(mode="json")
    for key, unset in _LATER_FIELDS.items():
        if doc.get(key) == unset:
            del doc[key]
    return doc


def chain_hash(parent_hash: str, classes: Sequence[str], added: Iterable[VersionSample]) -> str:
    """``labels_sha256`` of a version: its parent's, its classes and its added samples, canonically."""
    items = sorted((_canonical(s) for s in added), key=lambda d: d["frame_id"])
    canonical = json.dumps({"parent": parent_hash, "classes": list(classes), "added": items}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def grow_splits(parent: dict[str, list[str]], added: Iterable[VersionSample]) -> dict[str, list[str]]:
    """A version's frame ids per split: its parent's plus the samples it added, sorted."""
    out = {split: set(parent.get(split, [])) for split in SPLITS}
    for s in added:
        out[s.split].add(s.frame_id)
    return {split: sorted(ids) for split, ids in out.items()}


def tally(samples: Iterable[VersionSample], classes: Sequence[str]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Samples per split, and boxes per split and class."""
    counts = dict.fromkeys(SPLITS, 0)
    boxes = {split: dict.fromkeys(classes, 0) for split in SPLITS}
    for s in samples:
        counts[s.split] += 1
        for b in s.boxes:
            boxes[s.split][b.label] = boxes[s.split].get(b.label, 0) + 1
    return counts, boxes


class VersionStore:
    """The version records under ``root/versions`` and the images under ``root/images``.

    Not locked by itself: callers that write hold the curation lock (:mod:`server.curation.store`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / VERSIONS_DIR
        self._cache: dict[str, DatasetVersion] = {}

    def ids(self) -> list[str]:
        """Every version id, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p.stem for p in self.dir.glob("ds-*.json") if _ID.match(p.stem)]
        return sorted(found, key=version_number)

    def latest(self) -> DatasetVersion | None:
        ids = self.ids()
        return self.load(ids[-1]) if ids else None

    def next_id(self) -> str:
        ids = self.ids()
        return version_id(version_number(ids[-1]) + 1 if ids else 1)

    def load(self, vid: str) -> DatasetVersion:
        """The record of ``vid``, its chain hash checked (and its ancestors', once per store).

        Raises:
            VersionError: unknown id, unreadable record, or a hash that does not match its content.
        """
        unchecked: list[DatasetVersion] = []
        current: str | None = vid
        while current is not None and current not in self._cache:  # a loop, not recursion: chains grow long
            record = self._read(current)
            unchecked.append(record)
            current = record.parent
        for record in reversed(unchecked):
            parent = self._cache[record.parent] if record.parent else None
            where = f"{self.dir / record.id}.json"
            if chain_hash(parent.labels_sha256 if parent else "", record.classes, record.added) != record.labels_sha256:
                raise VersionError(f"{where}: labels_sha256 does not match its content (the record was altered)")
            if record.splits != grow_splits(parent.splits if parent else {}, record.added):
                raise VersionError(f"{where}: its splits are not its parent's plus the samples it added")
            self._cache[record.id] = record
        return self._cache[vid]

    def _read(self, vid: str) -> DatasetVersion:
        version_number(vid)
        path = self.dir / f"{vid}.json"
        try:
            record = DatasetVersion.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            known = ", ".join(self.ids()) or "none yet"
            raise VersionError(f"unknown dataset version {vid} (known: {known})") from None
        except (OSError, ValidationError) as err:
            raise VersionError(f"dataset version record {path} is unreadable: {err}") from err
        if record.format != FORMAT or record.id != vid:
            raise VersionError(f"{path} holds format {record.format} / id {record.id}, expected {FORMAT} / {vid}")
        if record.parent is not None and version_number(record.parent) >= version_number(vid):
            raise VersionError(f"{path} names parent {record.parent}, which is not older")
        return record

    def chain(self, vid: str) -> list[DatasetVersion]:
        """Version ``vid`` and its ancestors, oldest first."""
        chain: list[DatasetVersion] = []
        current: str | None = vid
        while current is not None:
            record = self.load(current)
            chain.append(record)
            current = record.parent
        return chain[::-1]

    def samples(self, vid: str) -> list[VersionSample]:
        """Every sample of version ``vid`` (its own and its ancestors'), oldest approval first."""
        return [s for record in self.chain(vid) for s in record.added]

    def splits(self, vid: str) -> dict[str, list[str]]:
        """Frame ids per split of version ``vid`` (sorted)."""
        return {split: list(ids) for split, ids in self.load(vid).splits.items()}

    def write(self, record: DatasetVersion) -> Path:
        """Write a new record, read-only; never replaces one.

        Raises:
            VersionError: a record with this id exists already.
        """
        path = self.dir / f"{record.id}.json"
        if path.exists():
            raise VersionError(f"dataset version {record.id} exists already; versions are never rewritten")
        write_atomic(path, record.model_dump_json(indent=1) + "\n", mode=0o444)
        self._cache[record.id] = record
        logger.info("recorded dataset version %s (%d samples, batch %s)", record.id, record.size, record.batch)
        return path

    # -- images ------------------------------------------------------------------------------

    def keep_image(self, source: Path) -> tuple[str, str]:
        """Copy an image into the content-addressed store (once); returns (relative path, sha256).

        Raises:
            OSError: the source cannot be read or the copy written.
        """
        data = source.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        suffix = source.suffix.lower() or ".jpg"
        rel = f"{IMAGES_DIR}/{sha[:2]}/{sha}{suffix}"
        path = self.root / rel
        if not path.exists():
            write_atomic(path, data, mode=0o444)
        return rel, sha

    def image_path(self, sample: VersionSample) -> Path:
        return self.root / sample.image


def _yolo_line(box: Box, class_index: dict[str, int]) -> str:
    x, y, w, h = box.box
    return YoloLabel(class_index[box.label], x + w / 2, y + h / 2, w, h).to_line()


def data_yaml(classes: Sequence[str], counts: dict[str, int]) -> str:
    """The ``data.yaml`` text of an export (see the module docstring)."""
    data: dict[str, object] = {
        "train": f"images/{TRAIN}",
        "val": f"images/{VAL}" if counts.get(VAL) else f"images/{TRAIN}",
    }
    if counts.get(TEST):
        data["test"] = f"images/{TEST}"
    data["names"] = dict(enumerate(classes))
    return yaml.safe_dump(data, sort_keys=False)


def export_yolo(store: VersionStore, vid: str, out: Path) -> Path:
    """Write version ``vid`` as a YOLO directory at ``out``; returns the path of its ``data.yaml``.

    Reads only the version records and the content-addressed images, and checks every image's
    sha256 on the way, so two exports of a version are byte-identical. Written beside ``out`` and
    renamed into place: ``out`` is complete or absent.

    Raises:
        VersionError: unknown or damaged version.
        ExportError: ``out`` exists and is not empty, or an image is missing or changed.
    """
    record = store.load(vid)
    samples = store.samples(vid)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; export into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    class_index = {name: i for i, name in enumerate(record.classes)}
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        for s in samples:
            try:
                data = store.image_path(s).read_bytes()
            except OSError as err:
                raise ExportError(f"image of {s.frame_id} ({store.image_path(s)}) is unreadable: {err}") from err
            if hashlib.sha256(data).hexdigest() != s.image_sha256:
                raise ExportError(f"image of {s.frame_id} ({store.image_path(s)}) changed since {vid} was recorded")
            suffix = Path(s.image).suffix
            (tmp / "images" / s.split / f"{s.frame_id}{suffix}").write_bytes(data)
            lines = "".join(_yolo_line(b, class_index) + "\n" for b in s.boxes)
            (tmp / "labels" / s.split / f"{s.frame_id}.txt").write_text(lines)
        lineage = {
            "id": record.id,
            "parent": record.parent,
            "labels_sha256": record.labels_sha256,
            "classes": list(record.classes),
            "counts": record.counts,
            "class_counts": record.class_counts,
            "test_frozen": record.test_frozen,
        }
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
        (tmp / "data.yaml").write_text(data_yaml(record.classes, record.counts))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%d samples) to %s", vid, len(samples), out)
    return out / "data.yaml"

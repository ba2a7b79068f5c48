"""The curation workflow in one object: next batch, status, approve, reject, versions, export, report.

:class:`Curation` is what the ``edgeloop curate`` commands, the FiftyOne plugin and the retraining
flows call. It needs FiftyOne configured first (``server.store.mongo.configure_fiftyone``; the CLI
and the App do it), except for :meth:`Curation.versions`, :meth:`~Curation.version` and
:meth:`~Curation.export`, which read only files.

Every change takes the curation lock and starts with :meth:`Curation.repair`, which finishes what
a crash cut short (see :mod:`server.curation.store` for the commit points), so a batch is made or
not, and an approval happens whole or not at all.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.curation.config import MAX_BATCH, MIN_BATCH, WHY_30_TO_50, CurationConfig
from server.curation.duplicates import FrameSet, NearDuplicateRule
from server.curation.embeddings import (
    CURATION_EMBEDDING,
    CURATION_MODEL,
    DHASH,
    EDGE_EMBEDDING,
    MODEL_VERSION,
    CurationModelError,
    CurationSpace,
    RawVectors,
)
from server.curation.episodes import EpisodeFrame, group, link_to_known, stream_key
from server.curation.leaks import LeakReport, find_leaks
from server.curation.report import NearDuplicateCount, Report, build_report
from server.curation.review import (
    APPROVED_TAG,
    GROUND_TRUTH,
    PREDICTIONS,
    REJECT_TAG,
    Approved,
    decide,
    ensure_inbox_fields,
    ensure_label_schema,
    epoch_seconds,
    show_batch,
)
from server.curation.selection import Pool, SelectionParams, frame_classes, frame_evidence, select_batch
from server.curation.splits import SPLITS, STRICTNESS, TEST, TRAIN, EpisodeSplits, assign_episodes, is_test_frozen
from server.curation.store import BatchRecord, BatchStatus, CurationError, CurationStore, now_iso
from server.curation.training import (
    FRAME_ID,
    mirrored_version,
    open_training_dataset,
    show_leaks,
    sync_training_dataset,
)
from server.curation.versions import Box, DatasetVersion, VersionSample, chain_hash, export_yolo, grow_splits

if TYPE_CHECKING:
    import fiftyone as fo

    from server.config import ServerConfig
    from server.registry.store import ModelRegistry

logger = logging.getLogger(__name__)

#: The ``batch`` of a version made by :meth:`Curation.import_labelled` starts with this.
IMPORTED = "import:"

#: Names under which skipped near-duplicates are counted.
TRAINING_SET = "training set"
OTHER_BATCHES = "other batches"
_COPIED_FIELDS = (EDGE_EMBEDDING, MODEL_VERSION, CURATION_EMBEDDING, CURATION_MODEL, DHASH)


@dataclass
class BatchResult:
    """A new batch and how it was picked.

    Attributes:
        batch: Its record (name, members, selection facts).
        pool: Unbatched frames considered.
        skipped: Near-duplicates skipped, by what they duplicate.
        warnings: Things the caller should show (a size outside 30-50, a short batch).
    """

    batch: BatchRecord
    pool: int
    skipped: dict[str, int]
    warnings: list[str] = field(default_factory=list)


@dataclass
class ApprovalResult:
    """What approving a batch did.

    Attributes:
        version: The dataset version the approval recorded (the existing one when ``already``).
        batch: The batch's record after approval.
        already: True when the batch had been approved before: nothing changed.
        held_out: Approved frames left out of the version, with why (their episode lies in a full
            split: see :mod:`server.curation.splits`).
    """

    version: DatasetVersion
    batch: BatchRecord
    already: bool = False

    @property
    def held_out(self) -> dict[str, str]:
        return dict(self.version.held_out) if not self.already else {}


@dataclass
class BatchReport:
    """A batch's record, and where its review stands in the App now.

    Attributes:
        batch: The record.
        tagged_approved: Frames tagged ``approved`` (and not ``reject``).
        tagged_reject: Frames tagged ``reject``.
        untagged: Frames tagged neither.
        edited: Frames whose ``ground_truth`` differs from the model's predictions.
    """

    batch: BatchRecord
    tagged_approved: int
    tagged_reject: int
    untagged: int
    edited: int


def check_batch_size(size: int, any_size: bool) -> list[str]:
    """Warnings for a batch size; refuses one outside 30-50 unless ``any_size``.

    Raises:
        CurationError: ``size`` below 1, or outside 30-50 without ``any_size``.
    """
    if size < 1:
        raise CurationError(f"a batch needs at least one frame, not {size}")
    if MIN_BATCH <= size <= MAX_BATCH:
        return []
    if not any_size:
        raise CurationError(
            f"batch size {size} is outside {MIN_BATCH}-{MAX_BATCH}: {WHY_30_TO_50}. Pass --any-size to make it anyway"
        )
    return [f"batch size {size} is outside {MIN_BATCH}-{MAX_BATCH}: {WHY_30_TO_50}"]


class Curation:
    """Curation of one server's inbox into its training set.

    Args:
        config: The ``curation:`` section.
        inbox_dataset: The inbox's FiftyOne dataset name.
        registry: Where the curation model comes from when ``config.model.path`` is unset.
        space: An already loaded curation model (tests, benchmarks); built lazily otherwise.
    """

    def __init__(
        self,
        config: CurationConfig,
        *,
        inbox_dataset: str,
        registry: ModelRegistry | None = None,
        space: CurationSpace | None = None,
    ) -> None:
        self.config = config
        self.inbox_name = inbox_dataset
        self.registry = registry
        self.store = CurationStore(config.root)
        if space is not None:
            self.__dict__["space"] = space

    @classmethod
    def from_server_config(cls, cfg: ServerConfig) -> Curation:
        """Curation as the server at ``cfg`` is set up (FiftyOne must be configured for its database)."""
        from server.registry.store import ModelRegistry

        return cls(cfg.curation, inbox_dataset=cfg.inbox.dataset, registry=ModelRegistry(cfg.registry))

    # -- parts, loaded on first use ------------------------------------------------------------

    @cached_property
    def space(self) -> CurationSpace:
        """The curation model (see :mod:`server.curation.embeddings`)."""
        return CurationSpace.from_config(self.config.model, self.registry)

    @cached_property
    def inbox(self) -> fo.Dataset:
        from server.store.inbox import Inbox, InboxConfig

        dataset = Inbox(InboxConfig(dataset=self.inbox_name)).dataset
        ensure_inbox_fields(dataset)
        return dataset

    @cached_property
    def training(self) -> fo.Dataset:
        return open_training_dataset(self.config.training_dataset)

    @property
    def classes(self) -> list[str]:
        """The training set's classes: configured, else the curation model's."""
        return list(self.config.classes) if self.config.classes else self.space.class_names

    # -- batches -----------------------------------------------------------------------------

    def next_batch(self, size: int | None = None, *, any_size: bool = False, dry_run: bool = False) -> BatchResult:
        """Pick the next review batch from the unbatched inbox frames and show it in the App.

        Args:
            size: Frames wanted (default ``config.batch_size``).
            any_size: Allow a size outside 30-50 (with a warning).
            dry_run: Only say what the batch would be: nothing is saved or shown, no frame is
                taken (whoever waits for enough frames to fill a batch asks this way).

        Raises:
            CurationError: a size outside 30-50 without ``any_size``; no frame left to review.
            CurationModelError: no usable curation model.
        """
        size = self.config.batch_size if size is None else size
        warnings = check_batch_size(size, any_size)
        space, inbox = self.space, self.inbox
        ensure_label_schema(inbox, self.classes)
        # Embeddings first, outside the lock: computing them may take a while, and they are cached.
        # Read once (at 100k frames reading them is most of a batch's time): frames that arrive
        # after this line wait for the next batch.
        inbox_raw = space.vectors(inbox)
        training_raw = space.vectors(self.training)
        with self.store.lock():
            self._repair_locked()
            batched = self.store.batched_sample_ids()
            pool_raw, batched_raw = inbox_raw.split(set(batched))
            curated_raw = {TRAINING_SET: training_raw, OTHER_BATCHES: batched_raw}
            standardise = space.standardiser(pool_raw, *curated_raw.values())
            pool = self._pool(inbox, pool_raw, standardise(pool_raw))
            params = SelectionParams(
                size=size,
                class_cap=self.config.class_cap,
                rule=self._rule(standardise.scale),
                scale=standardise.scale,
                device_share_cap=self.config.device_share_cap,
                candidates=self.config.candidates_per_slot,
                episode_gap_s=self.config.splits.episode_gap_s,
                rare_class_bonus=self.config.rare_class_bonus,
            )
            selection = select_batch(pool, {k: standardise(v) for k, v in curated_raw.items()}, params)
            if not selection.picked:
                raise CurationError(
                    f"no frame to review: {len(pool)} unbatched frames in {self.inbox_name}, "
                    f"skipped: {selection.skipped} ({selection.short_reason})"
                )
            if selection.short_reason:
                warnings.append(f"the batch has {len(selection.picked)} of {size} frames: {selection.short_reason}")
            ids = [pool_raw.ids[i] for i in selection.picked]
            frame_ids = dict(zip(*inbox.select(ids).values(["id", "frame_id"]), strict=True))
            record = BatchRecord(
                name=self.store.next_batch_name(),
                created=now_iso(),
                sample_ids=ids,
                frame_ids=[frame_ids[i] or "" for i in ids],
                model_version=space.model_version,
                why=selection.why,
                selection={
                    "pool": len(pool),
                    "skipped": selection.skipped,
                    "device_quotas": selection.quotas,
                    "class_cap": params.per_class,
                    "cap_yielded": selection.cap_yielded,
                    "short_reason": selection.short_reason,
                },
            )
            if dry_run:
                return BatchResult(record, len(pool), selection.skipped, warnings)
            self.store.save_batch(record)  # the commit point: the batch exists from here on
            show_batch(inbox, record)
        logger.info("%s: %d frames from a pool of %d (skipped %s)", record.name, len(ids), len(pool), selection.skipped)
        return BatchResult(record, len(pool), selection.skipped, warnings)

    def _pool(self, inbox: fo.Dataset, raw: RawVectors, frames: FrameSet) -> Pool:
        # Only the fields the selection reads: a whole sample is ~10x the bytes at 10k frames.
        fields = [
            "device_id",
            "source_id",
            "capture_time",
            "reasons",
            f"{PREDICTIONS}.detections.label",
            f"{PREDICTIONS}.detections.confidence",
        ]
        devices, sources, captured, reasons, labels, confidences = inbox.select(raw.ids, ordered=True).values(fields)
        rows = [
            frame_evidence(((r.get("trigger", ""), r.get("score", 0.0)) for r in rs or []), conf or [])
            for rs, conf in zip(reasons, confidences, strict=True)
        ]
        times = np.array([np.nan if t is None else epoch_seconds(t) for t in captured], dtype=np.float64)
        return Pool.from_rows(
            frames,
            rows,
            [d or "" for d in devices],
            [frame_classes(lab or []) for lab in labels],
            times,
            [stream_key(d or "", src or "") for d, src in zip(devices, sources, strict=True)],
        )

    def unbatched_count(self) -> int:
        """Inbox frames in no batch yet: what the next batch is picked from."""
        batched = self.store.batched_sample_ids()
        return len(self.inbox.exclude(list(batched))) if batched else len(self.inbox)

    def batches(self) -> list[BatchRecord]:
        """Every batch, oldest first."""
        return self.store.batches()

    def status(self, name: str) -> BatchReport:
        """A batch's record and the state of its review (tags, edits) in the App.

        Raises:
            UnknownBatch: no such batch.
        """
        record = self.store.batch(name)
        members = self.inbox.select(record.sample_ids)
        tags, truth, predicted = members.values(["tags", GROUND_TRUTH, PREDICTIONS])
        approved = reject = untagged = edited = 0
        for t, gt, pred in zip(tags, truth, predicted, strict=True):
            t = set(t or [])
            if REJECT_TAG in t:
                reject += 1
            elif APPROVED_TAG in t:
                approved += 1
            else:
                untagged += 1
            edited += _boxes(gt) != _boxes(pred)
        return BatchReport(record, approved, reject, untagged, edited)

    def reject(self, name: str) -> BatchRecord:
        """Reject a whole batch: none of its frames ever enters the training set (or another batch).

        Raises:
            UnknownBatch: no such batch.
            CurationError: the batch was approved already.
        """
        with self.store.lock():
            self._repair_locked()
            record = self.store.batch(name)
            if record.status == BatchStatus.REJECTED:
                return record
            if record.status == BatchStatus.APPROVED:
                raise CurationError(f"{name} was approved into {record.version}; versions are never undone")
            record.status, record.decided = BatchStatus.REJECTED, now_iso()
            self.store.save_batch(record)
            show_batch(self.inbox, record)
        return record

    def approve(self, name: str) -> ApprovalResult:
        """Move a batch's approved frames, with their corrected ``ground_truth``, into the training set.

        Records a new dataset version (the commit point), marks the batch approved and adds the
        frames to the training dataset. Approving an approved batch changes nothing.

        Raises:
            UnknownBatch: no such batch.
            ApprovalError: bad labels, conflicting tags or no approved frame (nothing changed).
            CurationError: the batch was rejected, or the classes changed since the last version.
        """
        with self.store.lock():
            self._repair_locked()
            record = self.store.batch(name)
            if record.status == BatchStatus.APPROVED and record.version:
                return ApprovalResult(self.store.versions.load(record.version), record, already=True)
            if record.status == BatchStatus.REJECTED:
                raise CurationError(f"{name} was rejected: its frames never enter the training set")
            classes = self.classes
            decision = decide(self.inbox, record, classes, self.config.untagged)
            version = self._new_version(name, decision.approved, classes)
            self.store.versions.write(version)  # the commit point: the approval has happened from here on
            record.status, record.decided, record.version = BatchStatus.APPROVED, version.created, version.id
            record.approved = [a.frame_id for a in decision.approved if a.frame_id not in version.held_out]
            record.rejected, record.excluded = decision.rejected, decision.excluded
            record.held_out = sorted(version.held_out)
            self.store.save_batch(record)
            self._follow_versions(copy_from={a.frame_id: a.sample_id for a in decision.approved})
            show_batch(self.inbox, record)
        logger.info("%s approved into %s: %d frames", name, version.id, len(version.added))
        return ApprovalResult(version, record)

    def _new_version(
        self,
        batch: str,
        approved: Sequence[Approved],
        classes: list[str],
        *,
        declared: dict[str, str] | None = None,
    ) -> DatasetVersion:
        """The next dataset version: the parent's samples plus ``approved`` (those not in it yet).

        The new samples are split by episode (:meth:`_place`), or, for an imported data set with its
        own splits, as ``declared`` (frame id to split). Keeps their images; writes no record (the
        caller's commit point does).
        """
        versions = self.store.versions
        parent = versions.latest()
        if parent is not None and list(parent.classes) != classes:
            raise CurationError(
                f"the training set's classes {list(parent.classes)} differ from {classes}: set curation.classes "
                "to the training set's (a new class needs a new training set)"
            )
        known = {f for ids in parent.splits.values() for f in ids} if parent else set()
        fresh = sorted((a for a in approved if a.frame_id not in known), key=lambda a: a.frame_id)
        counts = {s: parent.counts.get(s, 0) if parent else 0 for s in SPLITS}
        before = parent.class_counts if parent else {}
        class_counts = {s: {c: before.get(s, {}).get(c, 0) for c in classes} for s in SPLITS}
        kept = {a.frame_id: versions.keep_image(Path(a.filepath)) for a in fresh}
        if declared is not None:
            placed = EpisodeSplits(split_of={a.frame_id: declared[a.frame_id] for a in fresh})
            episode_of = {a.frame_id: a.frame_id for a in fresh}
        else:
            placed, episode_of = self._place(fresh, kept, parent, counts)
        added = []
        for a in fresh:
            if a.frame_id not in placed.split_of:
                continue
            image, sha = kept[a.frame_id]
            sample = VersionSample(
                frame_id=a.frame_id,
                split=placed.split_of[a.frame_id],
                image=image,
                image_sha256=sha,
                width=a.width,
                height=a.height,
                device_id=a.device_id,
                batch=batch,
                boxes=a.boxes,
                episode=episode_of[a.frame_id],
                source_id=a.source_id,
                captured=a.captured,
            )
            added.append(sample)
            counts[sample.split] += 1
            for b in sample.boxes:
                class_counts[sample.split][b.label] += 1
        if placed.held_out:
            logger.warning(
                "%s: %d approved frame(s) held out, e.g. %s: %s",
                batch,
                len(placed.held_out),
                next(iter(placed.held_out)),
                next(iter(placed.held_out.values())),
            )
        return DatasetVersion(
            id=versions.next_id(),
            parent=parent.id if parent else None,
            created=now_iso(),
            batch=batch,
            classes=tuple(classes),
            added=tuple(added),
            splits=grow_splits(parent.splits if parent else {}, added),
            counts=counts,
            class_counts=class_counts,
            test_frozen=is_test_frozen(counts, self.config.splits),
            labels_sha256=chain_hash(parent.labels_sha256 if parent else "", classes, added),
            splits_from="declared" if declared is not None else "episodes",
            held_out=dict(placed.held_out),
        )

    def _place(
        self,
        fresh: Sequence[Approved],
        kept: dict[str, tuple[str, str]],
        parent: DatasetVersion | None,
        counts: dict[str, int],
    ) -> tuple[EpisodeSplits, dict[str, str]]:
        """Group the new frames into episodes, link them to the parent's, and split episode by episode.

        Returns the splits (and the frames held out) and each placed frame's episode id.
        """
        gap = self.config.splits.episode_gap_s
        new = [
            EpisodeFrame(a.frame_id, kept[a.frame_id][1], stream_key(a.device_id, a.source_id), a.captured)
            for a in fresh
        ]
        old = self.store.versions.samples(parent.id) if parent else []
        old_frames = [EpisodeFrame(s.frame_id, s.image_sha256, s.stream, s.captured) for s in old]
        near = self._episode_vectors(fresh, old)
        if near is None:
            new_vectors = old_vectors = rule = None
        else:
            new_vectors, old_vectors, rule = near
        labels = group(new, gap_s=gap, vectors=new_vectors, rule=rule)
        linked = link_to_known(
            new, old_frames, gap_s=gap, vectors=None if near is None else (new_vectors, old_vectors), rule=rule
        )
        # A component's episode: the (smallest) episode of the known frames it links to, else its smallest frame id.
        members: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label, []).append(i)
        episodes: dict[str, list[str]] = {}
        joined: dict[str, set[str]] = {}
        episode_of: dict[str, str] = {}
        for rows in members.values():
            known_rows = sorted({j for i in rows for j in linked[i]})
            known_episodes = [old[j].episode or old[j].frame_id for j in known_rows]
            eid = min(known_episodes) if known_episodes else min(new[i].frame_id for i in rows)
            episodes.setdefault(eid, []).extend(new[i].frame_id for i in rows)
            joined.setdefault(eid, set()).update(old[j].split for j in known_rows)
            episode_of.update((new[i].frame_id, eid) for i in rows)
        placed = assign_episodes(episodes, counts, self.config.splits, joined)
        return placed, episode_of

    def _episode_vectors(
        self, fresh: Sequence[Approved], old: Sequence[VersionSample]
    ) -> tuple[FrameSet, FrameSet, NearDuplicateRule] | None:
        """Standardised curation vectors of the new frames and the parent's, row for row (NaN rows where
        none), and the near-duplicate rule; None without a curation model (a project's first import:
        episodes then link by identical bytes and capture time only)."""
        try:
            space = self.space
        except CurationModelError as err:
            logger.warning("episodes link by identical images and capture time only: %s", err)
            return None
        by_frame: dict[str, tuple[np.ndarray, int]] = {}
        for a in fresh:
            if not a.sample_id:  # an imported image: not in the inbox
                got = space.embed_file(a.filepath)
                if got is not None:
                    by_frame[a.frame_id] = got
        sample_ids = [a.sample_id for a in fresh if a.sample_id]
        if sample_ids:
            by_frame.update(_vectors_by_frame(space, self.inbox.select(sample_ids)))
        if old:
            by_frame.update(_vectors_by_frame(space, self.training))
        new_raw = _rows(by_frame, [a.frame_id for a in fresh], space.dim)
        old_raw = _rows(by_frame, [s.frame_id for s in old], space.dim)
        standardise = space.standardiser(new_raw, old_raw)
        return standardise(new_raw), standardise(old_raw), self._rule(standardise.scale)

    def _rule(self, scale: float) -> NearDuplicateRule:
        """The configured near-duplicate rule in standardised units of ``scale``."""
        near = self.config.near_duplicates
        return NearDuplicateRule(near.distance * scale, near.hash_bits)

    def import_labelled(self, data_yaml: Path, *, name: str = "labelled") -> DatasetVersion:
        """Seed the training set with an existing labelled YOLO data set: a new version.

        For a project's first model (nothing has been uploaded or curated yet) or a labelled set
        bought in. A data set with its own splits keeps them: each image joins the split it is
        declared in (train, val, test), so a user's held-out test photos are never trained on; an
        image found in two declared splits joins the stricter (test, then val). A data set with a
        train split only is split by the policy, episode by episode, as approved batches are. Each
        image gets the frame id ``import-<sha256 prefix>``, so importing the same images again adds
        nothing.

        Raises:
            DatasetError: the data set cannot be read.
            CurationError: its class names differ from the training set's; an image is declared in
                another split than the one it already has; new test images while the test split is
                frozen.
        """
        import cv2

        from edgeloop.yolo_dataset import load_yolo_dataset

        data = load_yolo_dataset(data_yaml)
        train_images = {item.image for item in data.splits[TRAIN]}
        # ultralytics needs a val split, so a data set without one points val: at its train images: not a split
        splits = {k: v for k, v in data.splits.items() if k == TRAIN or {i.image for i in v} != train_images}
        has_splits = len(splits) > 1
        entries: dict[str, Approved] = {}
        declared: dict[str, str] = {}
        crossing = 0
        for split in STRICTNESS:  # test first: an image in two splits stays out of train
            for item in splits.get(split, []):
                image = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
                if image is None:
                    logger.warning("import: skipping unreadable image %s", item.image)
                    continue
                frame_id = "import-" + hashlib.sha256(item.image.read_bytes()).hexdigest()[:24]
                if frame_id in entries:
                    crossing += declared[frame_id] != split
                    continue
                declared[frame_id] = split
                boxes = tuple(
                    Box(label=data.names[lab.class_id], box=_relative_xywh(lab.cx, lab.cy, lab.w, lab.h))
                    for lab in item.labels()
                    if 0 <= lab.class_id < len(data.names)
                )
                height, width = image.shape[:2]
                entries[frame_id] = Approved("", frame_id, str(item.image), width, height, "", boxes)
        if crossing:
            logger.warning(
                "import: %d image(s) of %s appear in two of its splits (a leak in the data set): each kept in "
                "the stricter split only",
                crossing,
                data_yaml,
            )
        with self.store.lock():
            self._repair_locked()
            parent = self.store.versions.latest()
            known = {f: split for split, ids in parent.splits.items() for f in ids} if parent else {}
            if has_splits:
                self._check_declared(declared, known, parent, data_yaml)
            if parent is not None and all(f in known for f in entries):
                logger.info("import: every image of %s is in %s already", data_yaml, parent.id)
                return parent
            version = self._new_version(
                f"{IMPORTED}{name}:{data_yaml.parent.name}",
                list(entries.values()),
                list(data.names),
                declared=declared if has_splits else None,
            )
            self.store.versions.write(version)  # the commit point
            self._follow_versions()
        logger.info(
            "imported %d labelled images from %s into %s (%s splits)",
            len(version.added),
            data_yaml,
            version.id,
            "its own" if has_splits else "the policy's",
        )
        return version

    def _check_declared(
        self, declared: dict[str, str], known: dict[str, str], parent: DatasetVersion | None, data_yaml: Path
    ) -> None:
        """Refuse an import whose declared splits disagree with the training set's."""
        moved = [(f, known[f], s) for f, s in declared.items() if f in known and known[f] != s]
        if moved:
            f, have, want = moved[0]
            raise CurationError(
                f"{data_yaml} declares {len(moved)} image(s) in another split than the training set holds them "
                f"(e.g. {f}: {want} there, {have} in {parent.id}); samples never change split, and one image in "
                "two splits would leak: fix the data set's splits to match, or import it into a new training set"
            )
        new_test = [f for f, s in declared.items() if s == TEST and f not in known]
        if parent is not None and parent.test_frozen and new_test:
            raise CurationError(
                f"the training set's test split is frozen ({parent.counts.get(TEST, 0)} samples in {parent.id}) and "
                f"{data_yaml}'s test split has {len(new_test)} image(s) not in it: every model is scored on the "
                "frozen split, so it cannot change; import the data set without its test: line, or into a new "
                "training set"
            )

    # -- versions (files only) ------------------------------------------------------------------

    def versions(self) -> list[DatasetVersion]:
        """Every dataset version, oldest first."""
        return [self.store.versions.load(vid) for vid in self.store.versions.ids()]

    def version(self, vid: str) -> DatasetVersion:
        """One dataset version.

        Raises:
            VersionError: unknown or damaged.
        """
        return self.store.versions.load(vid)

    def latest_version(self) -> DatasetVersion | None:
        return self.store.versions.latest()

    def export(self, vid: str, out: Path) -> Path:
        """Write version ``vid`` as a YOLO directory; returns its ``data.yaml`` (see :func:`export_yolo`)."""
        return export_yolo(self.store.versions, vid, out)

    def report(self) -> Report:
        """Class balance per version and split, leaks between the splits, and the seeds' warnings."""
        versions = self.versions()
        near: NearDuplicateCount | None = None
        leaks: LeakReport | None = None
        note = ""
        if versions:
            leaks = self.check_leaks()
            try:
                near = self._near_duplicates_in_training()
            except CurationError as err:
                note = str(err)
        report = build_report(versions, near, leaks)
        report.near_duplicates_note = note
        return report

    def check_leaks(self) -> LeakReport:
        """Leaks between the latest version's train split and its val and test splits (see
        :mod:`server.curation.leaks`): identical images always, near-duplicates in the curation
        model's space when there is one. Marks each leaking sample of the training dataset with its
        partners and saves the ``leaks`` view in the App."""
        latest = self.store.versions.latest()
        if latest is None:
            return LeakReport()
        with self.store.lock():
            self._repair_locked()
        samples = self.store.versions.samples(latest.id)
        frames = {s: [EpisodeFrame(x.frame_id, x.image_sha256) for x in samples if x.split == s] for s in SPLITS}
        try:
            space = self.space
        except CurationModelError as err:
            report = find_leaks(frames)
            report.note = f"near-duplicates not checked: {err}"
        else:
            by_frame = _vectors_by_frame(space, self.training)
            raw = {split: _rows(by_frame, [x.frame_id for x in items], space.dim) for split, items in frames.items()}
            standardise = space.standardiser(*raw.values())
            vectors = {split: standardise(r) for split, r in raw.items()}
            report = find_leaks(frames, vectors, self._rule(standardise.scale))
        partners: dict[str, list[str]] = {}
        for leak in report.leaks:
            partners.setdefault(leak.frame_id, []).append(f"{TRAIN}:{leak.train_frame_id} ({leak.kind})")
            partners.setdefault(leak.train_frame_id, []).append(f"{leak.split}:{leak.frame_id} ({leak.kind})")
        show_leaks(self.training, partners)
        logger.info("leaks in %s: %s", latest.id, report.summary())
        return report

    def _near_duplicates_in_training(self) -> NearDuplicateCount:
        with self.store.lock():
            self._repair_locked()
        raw = self.space.vectors(self.training)
        standardise = self.space.standardiser(raw)
        dup = self._rule(standardise.scale).duplicated_within(standardise(raw))
        return NearDuplicateCount(int(dup.sum()), len(raw.ids))

    # -- crash repair ----------------------------------------------------------------------------

    def repair(self) -> None:
        """Finish what a crash cut short: batch records behind their version, the training dataset
        behind the latest version, a batch's App state behind its record."""
        with self.store.lock():
            self._repair_locked()

    def _repair_locked(self) -> None:
        # Other processes (the CLI, the App's plugin) change these datasets: start from the database.
        self.inbox.reload()
        self.training.reload()
        versions = self.store.versions
        for vid in versions.ids():
            v = versions.load(vid)
            if v.batch.startswith(IMPORTED):
                continue  # an imported data set has no batch record to bring up to date
            record = self.store.batch(v.batch)
            if record.status != BatchStatus.APPROVED or record.version != v.id:
                logger.warning("%s: recorded in %s but not marked approved (a crash?): marking it", v.batch, vid)
                taken = {s.frame_id for s in v.added}
                record.status, record.decided, record.version = BatchStatus.APPROVED, v.created, v.id
                record.approved = [f for f in record.frame_ids if f in taken]
                record.held_out = sorted(v.held_out)
                record.excluded = [
                    f for f in record.frame_ids if f not in taken and f not in record.rejected and f not in v.held_out
                ]
                self.store.save_batch(record)
        self._follow_versions()
        for record in self.store.batches():
            members = self.inbox.select(record.sample_ids)
            marked = len(members.match({"batch": record.name}))
            if marked != len(record.sample_ids) or record.name not in self.inbox.list_saved_views():
                logger.warning("%s: its App state is incomplete (a crash?): restoring it", record.name)
                show_batch(self.inbox, record)

    def _follow_versions(self, copy_from: dict[str, str] | None = None) -> None:
        latest = self.store.versions.latest()
        if latest is None or mirrored_version(self.training) == latest.id:
            return
        extras = {}
        if copy_from:
            rows = self.inbox.select(list(copy_from.values())).values(["frame_id", *_COPIED_FIELDS])
            extras = {row[0]: dict(zip(_COPIED_FIELDS, row[1:], strict=True)) for row in zip(*rows, strict=True)}
        sync_training_dataset(self.training, self.store.versions, latest.id, extras)


def _vectors_by_frame(space: CurationSpace, collection: fo.SampleCollection) -> dict[str, tuple[np.ndarray, int]]:
    """Each sample's raw curation embedding and dHash by its frame id (computed where missing)."""
    raw = space.vectors(collection)
    frame_of = dict(zip(*collection.select(raw.ids).values(["id", FRAME_ID]), strict=True))
    return {frame_of[sid]: (raw.raw[k], int(raw.hashes[k])) for k, sid in enumerate(raw.ids)}


def _rows(by_frame: dict[str, tuple[np.ndarray, int]], frame_ids: Sequence[str], dim: int) -> RawVectors:
    """The vectors of ``frame_ids`` row for row; a frame without one gets a NaN row (never a near-duplicate)."""
    missing = (np.full(dim, np.nan, np.float32), 0)
    got = [by_frame.get(f, missing) for f in frame_ids]
    matrix = np.stack([g[0] for g in got]).astype(np.float32) if got else np.zeros((0, dim), np.float32)
    return RawVectors(list(frame_ids), matrix, np.array([g[1] for g in got], dtype=np.uint64), [])


def _boxes(labels: fo.Detections | None) -> list[tuple[str, tuple[float, ...]]]:
    if labels is None:
        return []
    return sorted((d.label, tuple(round(v, 6) for v in d.bounding_box)) for d in labels.detections)


def _relative_xywh(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    """A YOLO box (centre, size) as FiftyOne's relative ``[x, y, w, h]``, clipped into the image."""
    x1, y1 = min(max(cx - w / 2, 0.0), 1.0), min(max(cy - h / 2, 0.0), 1.0)
    x2, y2 = min(max(cx + w / 2, 0.0), 1.0), min(max(cy + h / 2, 0.0), 1.0)
    return x1, y1, x2 - x1, y2 - y1

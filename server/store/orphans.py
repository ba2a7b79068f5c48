"""Media files that no sample points at: find them and remove them safely.

How they arise: the ingest core writes a frame's image before it inserts the sample (so that no
sample ever lacks its image). A crash in between, or a database outage (the frame is answered
RETRY), leaves the file without a sample. Normally the agent resends the frame and the file is
adopted; a frame that never comes back (its device was wiped, or its outbox evicted it) leaves
the file behind for good. ``edgeloop server media sweep`` removes those.

A file is kept only when its frame id has a sample *and* that sample points at this very file
(by name): a frame resent with another media type after a failed attempt leaves a file of the
first type beside the one its sample points at, and that one goes too.

Safety with a running server: only files older than ``min_age_s`` are considered (a frame is
between its write and its insert for milliseconds). Each candidate is first *moved* into
``<root>/.orphans`` (atomic), then, after ``grace_s``, the database is asked again: a sample that
appeared meanwhile (a resend adopted the file just before the move) gets its file moved back;
only the others are deleted. The grace period outlasts the ingest core's write-to-insert window,
so a resend that replaced the file before the move has inserted its sample by the re-check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgeloop.durable import fsync_dir
from server.store.media import FRAME_ID_PATTERN, LocalMediaStore

logger = logging.getLogger(__name__)

#: Where candidates wait for the re-check, inside the media root (same file system: atomic moves).
QUARANTINE = ".orphans"
_BATCH = 500

#: Which of the given frame ids have a sample, and the path of each one's image (``Inbox.sample_files``).
SampleFiles = Callable[[Iterable[str]], Mapping[str, str]]


@dataclass
class SweepResult:
    scanned: int = 0
    orphans: list[Path] = field(default_factory=list)  #: removed (or, in a dry run, that would be)
    adopted: list[Path] = field(default_factory=list)  #: got a sample during the grace period: kept


def media_files(store: LocalMediaStore, min_age_s: float) -> Iterator[tuple[str, Path]]:
    """``(frame_id, path)`` of every stored image last written more than ``min_age_s`` ago."""
    cutoff = time.time() - min_age_s
    for top in os.scandir(store.root):
        if not top.is_dir() or top.name.startswith("."):
            continue  # .tmp, .orphans
        for leaf in os.scandir(top.path):
            if not leaf.is_dir():
                continue
            for entry in os.scandir(leaf.path):
                stem, dot, _ext = entry.name.rpartition(".")
                if dot and FRAME_ID_PATTERN.fullmatch(stem) and entry.is_file() and entry.stat().st_mtime < cutoff:
                    yield stem, Path(entry.path)


def sweep_orphans(
    store: LocalMediaStore,
    sample_files: SampleFiles,
    *,
    min_age_s: float = 24 * 3600.0,
    grace_s: float = 30.0,
    dry_run: bool = False,
) -> SweepResult:
    """Remove the images older than ``min_age_s`` that no sample points at.

    Args:
        store: The media store.
        sample_files: Which of the given frame ids have a sample, and its image's path.
        min_age_s: Files written more recently are left alone.
        grace_s: Time between moving candidates aside and asking the database again.
        dry_run: Only report what would be removed.

    Raises:
        pymongo.errors.PyMongoError: the database is unreachable; nothing was deleted (files
            already moved aside stay in ``.orphans`` until the next sweep, which restores or
            removes them).
    """
    result = SweepResult()
    quarantine = store.root / QUARANTINE
    quarantine.mkdir(exist_ok=True)
    # A sweep that stopped half-way left files in quarantine: they are candidates again.
    moved: dict[str, tuple[str, Path, Path]] = {}  # file name -> (frame id, where it waits, its home)
    for aside in quarantine.iterdir():
        stem, _, ext = aside.name.rpartition(".")
        try:
            moved[aside.name] = (stem, aside, store.path_for(stem, ext))
        except ValueError:  # not a file a sweep put there: leave it
            logger.warning("ignoring %s: not a media file name", aside)
    batch: list[tuple[str, Path]] = []
    for item in media_files(store, min_age_s):
        result.scanned += 1
        batch.append(item)
        if len(batch) >= _BATCH:
            _set_aside(batch, sample_files, quarantine, moved, result, dry_run)
            batch = []
    _set_aside(batch, sample_files, quarantine, moved, result, dry_run)
    if dry_run or not moved:
        return result
    fsync_dir(quarantine)
    time.sleep(grace_s)
    ids = sorted({frame_id for frame_id, _, _ in moved.values()})
    adopted: dict[str, str] = {}
    for i in range(0, len(ids), _BATCH):
        adopted.update(sample_files(ids[i : i + _BATCH]))
    for name, (frame_id, aside, home) in sorted(moved.items()):
        if _points_at(adopted.get(frame_id), name):
            if not home.exists():
                os.replace(aside, home)
                fsync_dir(home.parent)
                logger.warning("kept %s: its sample appeared during the sweep", home)
            else:
                aside.unlink()  # the resend wrote a fresh copy at home
            result.adopted.append(home)
        else:
            aside.unlink()
            result.orphans.append(home)
    fsync_dir(quarantine)
    return result


def _points_at(filepath: str | None, name: str) -> bool:
    # By name, not by whole path: the media root may have been moved or mounted elsewhere since.
    return filepath is not None and Path(filepath).name == name


def _set_aside(
    batch: list[tuple[str, Path]],
    sample_files: SampleFiles,
    quarantine: Path,
    moved: dict[str, tuple[str, Path, Path]],
    result: SweepResult,
    dry_run: bool,
) -> None:
    if not batch:
        return
    stored = sample_files(sorted({fid for fid, _ in batch}))
    for frame_id, path in batch:
        if _points_at(stored.get(frame_id), path.name):
            continue
        if dry_run:
            result.orphans.append(path)
            continue
        aside = quarantine / path.name
        os.replace(path, aside)
        moved[path.name] = (frame_id, aside, path)

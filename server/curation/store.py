"""Curation's durable state: review batches, dataset versions and approved images, in files under
``CurationConfig.root``::

    curation.lock                 fcntl lock: one writer at a time (the CLI, the App's plugin)
    batches/batch-NNN.json        one record per batch: members, status, what approval decided
    versions/ds-NNNN.json         immutable dataset versions (server.curation.versions)
    images/ab/<sha256>.<ext>      approved images, content-addressed, read-only

Why files and not a MongoDB collection: a version record holds a snapshot of labels and must
never change, which a read-only file written once states plainly; the export of a version needs
no database at all; records have no 16 MB document limit; and every write is crash-safe the same
way as the registry's (temporary file, fsync, rename, :func:`edgeloop.durable.write_atomic`).
The lock serialises every change across processes.

Commit points, so that a crash leaves whole operations or none:

- a batch exists once its record is written; its members' ``batch`` field, their pre-annotation
  and its saved view follow and are restored by :meth:`server.curation.service.Curation.repair`
  if a crash cut them short;
- an approval happens once its version record is written; the batch record's status and the
  training dataset follow and are brought in line from the versions on the next call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeloop.durable import LockTimeout, file_lock, write_atomic
from server.curation.versions import VersionStore

logger = logging.getLogger(__name__)

LOCK_FILE = "curation.lock"
BATCHES_DIR = "batches"
#: How long a change waits for another process (a next-batch computing embeddings, say).
LOCK_TIMEOUT_S = 120.0
_NAME = re.compile(r"^batch-(\d{3,})$")


class CurationError(Exception):
    """A curation request that cannot be done as asked; the message says why and what to do."""


class UnknownBatch(CurationError):
    """No batch of that name."""


class BatchStatus(StrEnum):
    TO_REVIEW = "to_review"
    APPROVED = "approved"
    REJECTED = "rejected"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def batch_name(number: int) -> str:
    return f"batch-{number:03d}"


def batch_number(name: str) -> int:
    """The number of ``batch-NNN``.

    Raises:
        UnknownBatch: not a batch name.
    """
    m = _NAME.match(name)
    if not m:
        raise UnknownBatch(f"{name!r} is not a batch name (batch-001, batch-002, ...)")
    return int(m.group(1))


class BatchRecord(BaseModel):
    """One review batch."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: BatchStatus = BatchStatus.TO_REVIEW
    created: str
    sample_ids: list[str] = Field(description="Inbox sample ids, in pick order.")
    frame_ids: list[str] = Field(description="Their frame ids, same order.")
    model_version: str = Field("", description="The curation model whose embedding space picked them.")
    selection: dict = Field(
        default_factory=dict, description="Pool size, frames skipped and why, device quotas, the class cap."
    )
    why: list[str] = Field(default_factory=list, description="Why each frame was picked, in pick order.")
    decided: str | None = Field(None, description="When it was approved or rejected.")
    version: str | None = Field(None, description="The dataset version its approval recorded.")
    approved: list[str] = Field(default_factory=list, description="Frame ids that entered the training set.")
    rejected: list[str] = Field(default_factory=list, description="Frame ids tagged `reject`.")
    excluded: list[str] = Field(default_factory=list, description="Untagged frame ids left out (`untagged: exclude`).")
    held_out: list[str] = Field(
        default_factory=list,
        description="Approved frame ids left out because their episode lies in a full split (see the version).",
    )


class CurationStore:
    """Batch records and versions under one root, and the lock that guards changes to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = VersionStore(root)

    @contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the curation lock (exclusive across processes).

        Raises:
            CurationError: another process held it for more than ``timeout`` seconds.
        """
        try:
            with file_lock(self.root / LOCK_FILE, timeout):
                yield
        except LockTimeout as err:
            raise CurationError(f"curation is busy in another process ({err}); try again") from err

    def batch_names(self) -> list[str]:
        folder = self.root / BATCHES_DIR
        if not folder.is_dir():
            return []
        return sorted((p.stem for p in folder.glob("batch-*.json") if _NAME.match(p.stem)), key=batch_number)

    def batches(self) -> list[BatchRecord]:
        return [self.batch(name) for name in self.batch_names()]

    def batch(self, name: str) -> BatchRecord:
        """The record of batch ``name``.

        Raises:
            UnknownBatch: no such batch.
            CurationError: the record is unreadable.
        """
        batch_number(name)
        path = self.root / BATCHES_DIR / f"{name}.json"
        try:
            return BatchRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            known = ", ".join(self.batch_names()) or "none yet: edgeloop curate next-batch"
            raise UnknownBatch(f"unknown batch {name} (known: {known})") from None
        except (OSError, ValidationError) as err:
            raise CurationError(f"batch record {path} is unreadable: {err}") from err

    def save_batch(self, record: BatchRecord) -> None:
        write_atomic(self.root / BATCHES_DIR / f"{record.name}.json", record.model_dump_json(indent=1) + "\n")

    def next_batch_name(self) -> str:
        names = self.batch_names()
        return batch_name(batch_number(names[-1]) + 1 if names else 1)

    def batched_sample_ids(self) -> set[str]:
        """Inbox sample ids that are in any batch (whatever its status): never offered again."""
        return {sid for record in self.batches() for sid in record.sample_ids}

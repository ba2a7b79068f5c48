"""The durable on-disk outbox: kept frames wait here until the receiver acknowledges them.

Storage is one SQLite database in WAL mode with ``synchronous=FULL``: a ``put`` returns only
after the transaction is on disk, so a frame that entered the outbox survives ``kill -9`` and
power loss. A frame leaves only through :meth:`Outbox.ack` (the receiver stored it) or
:meth:`Outbox.reject` (the receiver refused it for good: it moves to a dead-letter table, is
counted and kept for inspection, never silently dropped).

Limits (from :class:`OutboxConfig`):
    * ``max_bytes`` / ``max_frames`` cap the pending payloads. When a ``put`` would exceed either,
      the *lowest-scoring* frames are evicted first (ties: the oldest first), the new frame
      included if it is the least valuable; every eviction is counted in the persistent
      ``evicted`` counter.
    * ``max_rejected`` caps the dead-letter table, oldest first.

Frame ids are primary keys, so enqueuing the same id twice stores it once, and since receivers
are idempotent by id, a frame sent twice (ack lost in a crash) is stored once there too.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from edgeloop.config_base import StrictModel

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    frame_id TEXT PRIMARY KEY,
    score REAL NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_priority ON frames (score DESC, created ASC);
CREATE TABLE IF NOT EXISTS rejected (
    frame_id TEXT PRIMARY KEY,
    rejected_at REAL NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxConfig(StrictModel):
    """Where kept frames wait for upload, and how much of the disk they may take."""

    path: Path = Field(default=Path("edgeloop-outbox.sqlite3"), description="SQLite file of the outbox.")
    max_bytes: int = Field(default=2 * 1024**3, gt=0, description="Cap on pending payload bytes.")
    max_frames: int = Field(default=100_000, gt=0, description="Cap on pending frames.")
    max_rejected: int = Field(default=1_000, ge=0, description="Frames kept in the dead-letter table.")


@dataclass(frozen=True, slots=True)
class PendingFrame:
    frame_id: str
    score: float
    size: int
    payload: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: bool  #: False when the id was already there or the frame itself was evicted at once
    evicted: tuple[str, ...]  #: ids evicted to make room (may include the new frame's)


class Outbox:
    """A priority queue of serialized frames on disk. Thread-safe (one connection, one lock)."""

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so each put is one transaction.
        self._db = sqlite3.connect(str(config.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so a committed put survives power loss.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._depth, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM frames").fetchone()

    # -- writing ---------------------------------------------------------------------------
    def put(self, frame_id: str, payload: bytes, score: float) -> PutResult:
        """Store one frame durably (committed and fsync'd when this returns)."""
        size = len(payload)
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(
                    "INSERT OR IGNORE INTO frames (frame_id, score, created, size, payload) VALUES (?, ?, ?, ?, ?)",
                    (frame_id, float(score), time.time(), size, sqlite3.Binary(payload)),
                )
                inserted = cur.rowcount == 1
                depth, total = self._depth + inserted, self._bytes + (size if inserted else 0)
                evicted: list[str] = []
                while depth > self.config.max_frames or total > self.config.max_bytes:
                    row = cur.execute(
                        "SELECT frame_id, size FROM frames ORDER BY score ASC, created ASC LIMIT 1"
                    ).fetchone()
                    if row is None:
                        break
                    cur.execute("DELETE FROM frames WHERE frame_id = ?", (row[0],))
                    evicted.append(row[0])
                    depth -= 1
                    total -= row[1]
                if evicted:
                    self._bump(cur, "evicted", len(evicted))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._depth, self._bytes = depth, total
        if evicted:
            logger.warning("outbox full: evicted %d lowest-scoring frame(s)", len(evicted))
        return PutResult(stored=inserted and frame_id not in evicted, evicted=tuple(evicted))

    def ack(self, frame_ids: list[str]) -> int:
        """Remove frames the receiver stored; returns how many were removed."""
        if not frame_ids:
            return 0
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            removed = 0
            freed = 0
            for fid in frame_ids:
                row = cur.execute("SELECT size FROM frames WHERE frame_id = ?", (fid,)).fetchone()
                if row is None:
                    continue
                cur.execute("DELETE FROM frames WHERE frame_id = ?", (fid,))
                removed += 1
                freed += row[0]
            cur.execute("COMMIT")
            self._depth -= removed
            self._bytes -= freed
        return removed

    def reject(self, frame_id: str, reason: str) -> bool:
        """Move a frame the receiver refused for good into the dead-letter table."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            row = cur.execute("SELECT size, payload FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
            if row is None:
                cur.execute("ROLLBACK")
                return False
            cur.execute("DELETE FROM frames WHERE frame_id = ?", (frame_id,))
            cur.execute(
                "INSERT OR REPLACE INTO rejected (frame_id, rejected_at, reason, payload) VALUES (?, ?, ?, ?)",
                (frame_id, time.time(), reason, row[1]),
            )
            cur.execute(
                "DELETE FROM rejected WHERE frame_id IN (SELECT frame_id FROM rejected "
                "ORDER BY rejected_at DESC LIMIT -1 OFFSET ?)",
                (self.config.max_rejected,),
            )
            self._bump(cur, "rejected", 1)
            cur.execute("COMMIT")
            self._depth -= 1
            self._bytes -= row[0]
        logger.error("receiver rejected frame %s: %s (kept in the outbox's dead-letter table)", frame_id, reason)
        return True

    def reserve_sequence(self, n: int) -> int:
        """Reserve ``n`` frame sequence numbers; returns the first. Persistent, so sequence
        numbers keep increasing across restarts (a crash leaves a gap, never a repeat)."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            start = cur.execute("SELECT value FROM counters WHERE name = 'sequence'").fetchone()
            self._bump(cur, "sequence", n)
            cur.execute("COMMIT")
        return int(start[0]) if start else 0

    def mark_attempt(self, frame_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE frames SET attempts = attempts + 1 WHERE frame_id = ?", [(f,) for f in frame_ids]
            )

    @staticmethod
    def _bump(cur: sqlite3.Cursor, name: str, n: int) -> None:
        cur.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    # -- reading ---------------------------------------------------------------------------
    def peek(self, limit: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[PendingFrame]:
        """The ``limit`` most valuable pending frames (highest score first, then oldest)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT frame_id, score, size, payload, attempts FROM frames ORDER BY score DESC, created ASC LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        frames = [PendingFrame(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows if r[0] not in exclude]
        return frames[:limit]

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT frame_id FROM frames")}

    def rejected_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT frame_id FROM rejected")}

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

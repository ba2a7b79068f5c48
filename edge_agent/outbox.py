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
      ``evicted`` counter and logged (one INFO line per frame, and a WARNING summary at most
      once a minute, see :class:`~edgeloop.log_throttle.LogThrottle`).
    * ``min_free_bytes`` is a reserve on the outbox's volume: a ``put`` that could leave less free
      space than that (counting what the frame may take in the database and the write-ahead log
      at its bound) raises :class:`OutboxFull` and writes nothing. Frames already held are not
      evicted for it: they keep uploading, and ``put`` succeeds again once the volume has room.
      A disk that fills anyway (another program) gives the same :class:`OutboxFull`.
    * ``max_rejected`` caps the dead-letter table, oldest first.
    * The write-ahead log is checkpointed once it holds :data:`WAL_CHECKPOINT_BYTES` and cut back
      to that size afterwards, so it stays under that plus one transaction.

A full disk: SQLite cannot even delete a row without writing pages to the write-ahead log. An
acknowledged frame whose removal fails for lack of space is remembered in memory as settled: it is
not offered again (:meth:`peek`), no longer counted in :attr:`depth`, and removed by a later call
once there is room (:meth:`retry_removals`). After a restart such a frame is sent again and the
receiver answers DUPLICATE, which removes it.

Frame ids are primary keys, so enqueuing the same id twice stores it once, and since receivers
are idempotent by id, a frame sent twice (ack lost in a crash) is stored once there too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.log_throttle import LogThrottle

logger = logging.getLogger(__name__)

#: The write-ahead log is checkpointed into the database once it holds this many bytes of pages,
#: and truncated back to this size after a checkpoint (kept, not deleted: overwriting it needs
#: no new disk space).
WAL_CHECKPOINT_BYTES = 1024 * 1024
#: Default of ``outbox.min_free_bytes``: room left on the volume for the system and its logs.
DEFAULT_MIN_FREE_BYTES = 256 * 1024 * 1024
#: Failed removals of acknowledged frames (disk full) are retried at most this often by
#: :meth:`Outbox.retry_removals`.
RETRY_REMOVALS_S = 1.0
#: Frame ids per ``IN (...)`` query (SQLite's default limit on parameters is 999 before 3.32).
_IDS_PER_QUERY = 500
#: A WAL frame is a page plus a 24-byte header; the file starts with a 32-byte header.
_WAL_FRAME_HEADER, _WAL_FILE_HEADER = 24, 32

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
    min_free_bytes: int = Field(
        default=DEFAULT_MIN_FREE_BYTES,
        ge=0,
        description=(
            "Free space to leave on the outbox's volume. No new frame is enqueued while storing it could "
            "leave less (the agent warns and counts them in frames_dropped_disk_full); frames already held "
            "keep uploading, and enqueueing resumes by itself once the volume has room."
        ),
    )


class OutboxError(Exception):
    """The outbox's database cannot be opened or written for a reason other than a full disk."""


class OutboxFull(OutboxError):
    """No room on the outbox's volume: the free-space reserve (``outbox.min_free_bytes``) would be
    crossed, or the disk is full. Nothing was written; the same call can succeed once space frees."""


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
        self._wal_path = Path(f"{config.path}-wal")
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so each put is one transaction.
            self._db = sqlite3.connect(str(config.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a committed put survives power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # Builds with SECURE_DELETE (Debian's, for one) zero every freed page, so removing an
            # uploaded frame wrote its whole payload through the log again: twice the flash wear,
            # and a removal that needs as much free space as the frame. FAST zeroes only what costs
            # no extra I/O; a removed frame's bytes stay in free pages until a new frame reuses them.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._wal_pages = max(1, WAL_CHECKPOINT_BYTES // self._page_size)
            self._db.execute(f"PRAGMA wal_autocheckpoint={self._wal_pages}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")
            self._db.executescript(_SCHEMA)
            self._depth, self._bytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM frames"
            ).fetchone()
        except sqlite3.Error as err:
            raise OutboxError(f"cannot open the outbox {config.path}: {err}") from err
        try:
            # A crash may have left a long log behind: fold it into the database and start small.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as err:
            logger.warning("outbox: cannot checkpoint its write-ahead log at start (%s); trying again later", err)
        # Acknowledged (None) or rejected (the reason) frames whose removal waits for disk space.
        self._settled: dict[str, str | None] = {}
        self._next_removal_retry = 0.0
        self._removal_waits = False  # the last removal failed for lack of space
        self._removal_log = LogThrottle()
        self._eviction_log = LogThrottle()
        self._eviction_on_arrival = 0  # of the evictions not summarised yet
        self._full_log = LogThrottle()
        self._full_since: float | None = None
        self._full_count = 0
        self.full_reason = ""  #: why the last put found no room; "" while puts succeed

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Cursor]:
        """One write transaction. A failure rolls back and re-raises the *first* error: SQLite rolls
        a transaction back by itself on some errors (a full disk), and a ROLLBACK then would fail
        with "no transaction is active" and hide the cause. A full disk raises :class:`OutboxFull`."""
        cur = self._db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            yield cur
            cur.execute("COMMIT")
        except BaseException as err:
            if self._db.in_transaction:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error as rollback_err:
                    logger.error("outbox: rollback after a failed %s failed too: %s", what, rollback_err)
            if isinstance(err, sqlite3.Error) and self._is_disk_full(err):
                raise OutboxFull(f"the disk is full ({what}: {err})") from err
            raise

    def _is_disk_full(self, err: sqlite3.Error) -> bool:
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return True
        # ENOSPC from fsync or from growing the WAL index comes back as an I/O error.
        return code == sqlite3.SQLITE_IOERR and self.free_bytes() < WAL_CHECKPOINT_BYTES

    # -- room on the volume ------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes free on the outbox's volume (for unprivileged users)."""
        st = os.statvfs(self.config.path.parent)
        return st.f_bavail * st.f_frsize

    def _room_needed(self, size: int) -> int:
        """Bytes of the volume a frame of ``size`` bytes may take, at most: the write-ahead log's
        growth up to its bound (the frame goes there first), and the database's growth beyond its
        free pages when a checkpoint copies in the frame and whatever else the log holds."""
        page = self._page_size
        pages = -(-size // (page - 4)) + 2  # overflow pages (4-byte link each), plus the row's and index's share
        free_pages = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        database = max(0, pages + self._wal_pages - free_pages) * page
        try:
            wal_now = self._wal_path.stat().st_size
        except FileNotFoundError:
            wal_now = 0
        wal_bound = (self._wal_pages + pages) * (page + _WAL_FRAME_HEADER) + _WAL_FILE_HEADER
        return database + max(0, wal_bound - wal_now)

    def _check_room(self, size: int) -> None:
        free, needed = self.free_bytes(), self._room_needed(size)
        if free - needed < self.config.min_free_bytes:
            raise OutboxFull(
                f"{free / 1e6:.1f} MB free on the outbox's volume; storing a {size / 1e3:.0f} kB frame may take "
                f"up to {needed / 1e6:.1f} MB with the database's write-ahead log, and outbox.min_free_bytes "
                f"keeps {self.config.min_free_bytes / 1e6:.1f} MB free"
            )

    def note_full(self, err: OutboxFull, frame_id: str = "") -> None:
        """Record a frame not enqueued for lack of room (``put`` does it itself; a caller that could
        not even get as far as ``put`` calls this), for the log lines below."""
        with self._lock:
            self._note_full(frame_id, err)

    def _note_full(self, frame_id: str, err: OutboxFull) -> None:
        """Log a refused put: at once when the volume fills, then a summary at most once a minute."""
        now = time.monotonic()
        first = self._full_since is None
        if first:
            self._full_since = now
            self._full_count = 0
        self._full_count += 1
        self.full_reason = str(err)
        logger.debug("frame %s not enqueued: %s", frame_id or "(unnamed)", err)
        due = self._full_log.add()
        if not due:
            return
        if first:
            logger.warning(
                "outbox: not enqueueing new frames: %s. The %d frame(s) held keep uploading; enqueueing resumes "
                "by itself once the volume has room",
                err,
                self._depth,
            )
        else:
            logger.warning(
                "outbox: still not enqueueing (%s): %d frame(s) not enqueued since the last report, %d in %.0f s",
                err,
                due,
                self._full_count,
                now - self._full_since,
            )

    def _note_room(self) -> None:
        if self._full_since is None:
            return
        unreported = self._full_log.flush()
        logger.warning(
            "outbox: the volume has room again (%.1f MB free): enqueueing resumed; %d frame(s) were not "
            "enqueued in %.0f s (%d since the last report)",
            self.free_bytes() / 1e6,
            self._full_count,
            time.monotonic() - self._full_since,
            unreported,
        )
        self._full_since = None
        self.full_reason = ""

    # -- writing ---------------------------------------------------------------------------
    def put(self, frame_id: str, payload: bytes, score: float) -> PutResult:
        """Store one frame durably (committed and fsync'd when this returns).

        Raises:
            OutboxFull: the volume has no room for it (see ``min_free_bytes``); nothing was written.
        """
        size = len(payload)
        with self._lock:
            try:
                self._apply_settled()
                self._check_room(size)
                with self._transaction("put") as cur:
                    cur.execute(
                        "INSERT OR IGNORE INTO frames (frame_id, score, created, size, payload) VALUES (?, ?, ?, ?, ?)",
                        (frame_id, float(score), time.time(), size, sqlite3.Binary(payload)),
                    )
                    inserted = cur.rowcount == 1
                    depth = self._depth + inserted
                    total = self._bytes + (size if inserted else 0)
                    evicted: list[tuple[str, float]] = []
                    while depth > self.config.max_frames or total > self.config.max_bytes:
                        row = self._lowest(cur)
                        if row is None:
                            break
                        cur.execute("DELETE FROM frames WHERE frame_id = ?", (row[0],))
                        evicted.append((row[0], row[2]))
                        depth -= 1
                        total -= row[1]
                    if evicted:
                        self._bump(cur, "evicted", len(evicted))
            except OutboxFull as err:
                self._note_full(frame_id, err)
                raise
            self._depth, self._bytes = depth, total
            self._note_room()
            if evicted:
                self._log_evictions(frame_id, score, evicted)
        ids = tuple(fid for fid, _ in evicted)
        return PutResult(stored=inserted and frame_id not in ids, evicted=ids)

    def _lowest(self, cur: sqlite3.Cursor) -> tuple[str, int, float] | None:
        """The least valuable pending frame (settled ones are on their way out already)."""
        skip = len(self._settled)
        rows = cur.execute(
            "SELECT frame_id, size, score FROM frames ORDER BY score ASC, created ASC LIMIT ?", (skip + 1,)
        ).fetchall()
        return next((r for r in rows if r[0] not in self._settled), None)

    def _log_evictions(self, frame_id: str, score: float, evicted: list[tuple[str, float]]) -> None:
        """One INFO line per evicted frame, and a WARNING summary at most once a minute: together
        they account for the ``evicted`` counter."""
        on_arrival = 0
        for fid, fscore in evicted:
            if fid == frame_id:
                on_arrival += 1
                logger.info("evicted frame %s score=%.3f on arrival: the outbox is full of higher scores", fid, fscore)
            else:
                logger.info(
                    "evicted frame %s score=%.3f to make room for frame %s score=%.3f", fid, fscore, frame_id, score
                )
        self._eviction_on_arrival += on_arrival
        due = self._eviction_log.add(len(evicted))
        if due:
            self._log_eviction_summary(due)

    def _log_eviction_summary(self, n: int) -> None:
        on_arrival, self._eviction_on_arrival = self._eviction_on_arrival, 0
        logger.warning(
            "outbox full (max_frames=%d, max_bytes=%d): evicted %d lowest-scoring frame(s) since the last report, "
            "%d of them on arrival; %d in all since start",
            self.config.max_frames,
            self.config.max_bytes,
            n,
            on_arrival,
            self._eviction_log.total,
        )

    def ack(self, frame_ids: list[str]) -> int:
        """Remove frames the receiver stored; returns how many of them were pending.

        On a full disk the removal waits (see the module docstring); the frames count as gone.
        """
        if not frame_ids:
            return 0
        with self._lock:
            found = self._pending_sizes(frame_ids)
            for fid in found:
                self._settled[fid] = None
            self._depth -= len(found)
            self._bytes -= sum(found.values())
            self._apply_settled()
        return len(found)

    def reject(self, frame_id: str, reason: str) -> bool:
        """Move a frame the receiver refused for good into the dead-letter table.

        Returns False if the frame was not pending. On a full disk the move waits, like removals.
        """
        with self._lock:
            found = self._pending_sizes([frame_id])
            if not found:
                return False
            self._settled[frame_id] = reason
            self._depth -= 1
            self._bytes -= found[frame_id]
            self._apply_settled()
        logger.error("receiver rejected frame %s: %s (kept in the outbox's dead-letter table)", frame_id, reason)
        return True

    def _pending_sizes(self, frame_ids: list[str]) -> dict[str, int]:
        ids = [fid for fid in dict.fromkeys(frame_ids) if fid not in self._settled]
        found: dict[str, int] = {}
        for i in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[i : i + _IDS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT frame_id, size FROM frames WHERE frame_id IN ({marks})", chunk))
        return found

    def _apply_settled(self) -> bool:
        """Remove settled frames (moving rejected ones to the dead-letter table); False if the disk
        is still too full, in which case they stay settled and the caller carries on."""
        if not self._settled:
            return True
        settled = dict(self._settled)
        try:
            with self._transaction("removal of acknowledged frames") as cur:
                for fid, reason in settled.items():
                    if reason is not None:
                        cur.execute(
                            "INSERT OR REPLACE INTO rejected (frame_id, rejected_at, reason, payload) "
                            "SELECT frame_id, ?, ?, payload FROM frames WHERE frame_id = ?",
                            (time.time(), reason, fid),
                        )
                    cur.execute("DELETE FROM frames WHERE frame_id = ?", (fid,))
                rejected = sum(reason is not None for reason in settled.values())
                if rejected:
                    cur.execute(
                        "DELETE FROM rejected WHERE frame_id IN (SELECT frame_id FROM rejected "
                        "ORDER BY rejected_at DESC LIMIT -1 OFFSET ?)",
                        (self.config.max_rejected,),
                    )
                    self._bump(cur, "rejected", rejected)
        except OutboxFull as err:
            due = self._removal_log.add()
            if due:
                logger.warning(
                    "outbox: %d acknowledged or rejected frame(s) cannot leave the database yet (%s); they are not "
                    "sent again and leave once the volume has room (after a restart they are sent again and "
                    "answered DUPLICATE)",
                    len(settled),
                    err,
                )
            self._removal_waits = True
            self._next_removal_retry = time.monotonic() + RETRY_REMOVALS_S
            return False
        for fid in settled:
            del self._settled[fid]
        if self._removal_waits:
            self._removal_waits = False
            self._removal_log.flush()
            logger.warning("outbox: removed %d frame(s) whose removal had waited for disk space", len(settled))
        return True

    def retry_removals(self) -> bool:
        """Retry removals a full disk held back (at most every :data:`RETRY_REMOVALS_S`); True when
        none is left waiting."""
        with self._lock:
            if not self._settled:
                return True
            if time.monotonic() < self._next_removal_retry:
                return False
            return self._apply_settled()

    def reserve_sequence(self, n: int) -> int:
        """Reserve ``n`` frame sequence numbers; returns the first. Persistent, so sequence
        numbers keep increasing across restarts (a crash leaves a gap, never a repeat).

        Raises:
            OutboxFull: the disk is too full to record the reservation.
        """
        with self._lock, self._transaction("sequence reservation") as cur:
            start = cur.execute("SELECT value FROM counters WHERE name = 'sequence'").fetchone()
            self._bump(cur, "sequence", n)
        return int(start[0]) if start else 0

    def mark_attempt(self, frame_ids: list[str]) -> None:
        """Count a failed delivery attempt (diagnostics only: skipped on a full disk)."""
        with self._lock:
            try:
                with self._transaction("attempt count") as cur:
                    cur.executemany(
                        "UPDATE frames SET attempts = attempts + 1 WHERE frame_id = ?", [(f,) for f in frame_ids]
                    )
            except OutboxFull as err:
                logger.debug("outbox: attempt count not updated: %s", err)

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
            skip = set(exclude) | self._settled.keys()
            rows = self._db.execute(
                "SELECT frame_id, score, size, payload, attempts FROM frames ORDER BY score DESC, created ASC LIMIT ?",
                (limit + len(skip),),
            ).fetchall()
        frames = [PendingFrame(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows if r[0] not in skip]
        return frames[:limit]

    def ids(self) -> set[str]:
        """Ids of the pending frames."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT frame_id FROM frames")} - self._settled.keys()

    def rejected_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT frame_id FROM rejected")}

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def depth(self) -> int:
        """Frames waiting for upload."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Payload bytes waiting for upload."""
        return self._bytes

    @property
    def unremoved(self) -> int:
        """Acknowledged or rejected frames still in the database, waiting for disk space to leave it."""
        return len(self._settled)

    def close(self) -> None:
        with self._lock:
            if self._settled and not self._apply_settled():
                logger.warning(
                    "outbox: closing with %d acknowledged frame(s) not removed (disk full); they are sent again "
                    "at the next start and answered DUPLICATE",
                    len(self._settled),
                )
            unreported = self._eviction_log.flush()
            if unreported:
                self._log_eviction_summary(unreported)
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The ingest core: the one validation and storage path behind every transport.

``submit`` runs in the caller's (transport's) thread: it validates the frame (a refused frame
raises at once and nothing is written), writes its image under its final name in the media
store if that name is new and the frame id has no file under another extension (not yet
durable), and queues it. A copy of a frame id that is already on its way through the core
(a resend, or the same id twice in one stream) is not written nor queued: it follows the first
copy and gets its verdict (``DUPLICATE`` once that is stored). Two threads then store frames
in batches, as a pipeline (while one batch's samples are inserted, the next batch is committed):

the media thread
  1. takes up to ``batch_size`` queued frames, sleeping ``max_wait_s`` at a time while more come;
  2. for the frames whose file name was taken (a resend, a crash leftover, or a file of the id
     under another media type), asks the inbox which are stored: those are ``DUPLICATE`` when the
     same device stored them and ``REJECTED`` (``id_not_available``) when another device did, and
     nothing is written for them; the others' images are replaced atomically;
  3. makes the batch's images durable with one group commit (``MediaStore.commit``: ``syncfs``);
  4. hands the batch to the database thread (at most one batch waits between the two);

the database thread
  5. inserts all their samples in one ``insert_many``, journaled before it returns; a sample the
     database refuses for its content is ``REJECTED`` (``storage_refused``) and its image removed,
     while the others are stored (``Inbox.insert_records`` splits a refused batch);
  6. resolves each frame's future: ``STORED``, ``DUPLICATE`` (or ``REJECTED`` for an id another
     device stored meanwhile; a file this frame wrote under another name is removed), or
     ``RETRY`` when the database (or the media store) is unavailable; both threads log and carry
     on with the next batch.

A frame id belongs to the device that first stored it: another device sending it is refused
without being told that the id exists (the message is the same whatever the owner). Every file
the core writes is either pointed at by the frame's sample, removed by the core, or left by a
crash or an outage (``RETRY``) for the resend to adopt or for ``edgeloop server media sweep``,
which compares each file's name with its sample's.

Why an acknowledgement means durable: a future resolves ``STORED`` only after step 6 returned,
and step 6 returns only after MongoDB journaled the sample (write concern ``j: true``, see
``server.store.mongo``), which starts only after step 4's commit returned, i.e. after the image
files and their names were flushed to disk. ``DUPLICATE`` is answered only for a frame id whose
sample is in the database, and a sample is only ever inserted after its image was durable. A
crash (``kill -9``, power cut) at any point therefore leaves, for each frame, either nothing, an
image file (maybe partial) without a sample (the agent gets no ack and resends; the resend finds
the name taken and replaces the file whole), or both -- never a sample without its image -- and
a resent frame id is stored once (stored ids are answered DUPLICATE, and the inbox's unique index
stops the copy of an id whose first copy was still being inserted in another process).

Why images are written in ``submit`` and not by the media thread: on a 2-core machine the
media thread writing every file was the ingest bottleneck (~490 us of wall time per frame, the
file writes ~285 us of it for ~130 us of CPU: the rest was waiting to get the GIL back after each
system call while the transport threads parsed frames); written by the transport threads, files
of several streams are written in parallel and the media thread's work per frame shrinks to its
share of one ``syncfs``.

Throughput: see ``bench/ingest.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from pymongo.errors import PyMongoError

from edgeloop.domain import Ack, AckStatus, FrameRecord
from server.ingest.base import DeviceDirectory, FrameRejected, Identity, RejectCode
from server.ingest.validation import DecodeBudget, ValidationConfig, validate
from server.metrics import ServerMetrics
from server.store.inbox import Inbox, StoredSample
from server.store.media import EXTENSIONS, MediaStore, extension_for

logger = logging.getLogger(__name__)

#: Frames that may wait for the writer; ``submit`` blocks beyond this (back-pressure on transports).
DEFAULT_MAX_QUEUE = 4096


@dataclass(slots=True)
class _Pending:
    record: FrameRecord
    future: Future[Ack]
    #: Where ``submit`` wrote the image (a new name, not yet durable); None: the name was taken.
    path: Path | None
    transport: str = ""


@dataclass
class _Prepared:
    """A batch between the two stages: its images are durable (or failed), its samples not yet written."""

    batch: Sequence[_Pending]
    started: float
    items: dict[str, _Pending] = field(default_factory=dict)
    acks: dict[str, Ack] = field(default_factory=dict)
    #: Images written for the batch (new or replaced), by frame id.
    paths: dict[str, Path] = field(default_factory=dict)
    written: list[tuple[FrameRecord, Path]] = field(default_factory=list)
    #: Why each REJECTED frame was refused (the counter's reason label).
    codes: dict[str, RejectCode] = field(default_factory=dict)

    def reject(self, frame_id: str, code: RejectCode, ack: Ack) -> None:
        self.acks[frame_id] = ack
        self.codes[frame_id] = code


def id_not_available(frame_id: str, device_id: str) -> Ack:
    """The answer to a frame id that belongs to another device: the same words whoever the owner,
    and nothing that says the id is stored."""
    return Ack(
        frame_id,
        AckStatus.REJECTED,
        str(
            FrameRejected(
                RejectCode.ID_NOT_AVAILABLE,
                f"frame_id {frame_id} cannot be used by device {device_id}; give every frame a new UUID4 "
                "(a frame id is never reused)",
                frame_id,
            )
        ),
    )


class IngestCore:
    """Implements :class:`server.ingest.base.Ingestor`: validate, store durably in batches, acknowledge.

    Args:
        media: Where images go (fsync'd before their samples are written).
        inbox: The FiftyOne dataset samples go into.
        devices: Which devices may send frames.
        validation: Validation limits.
        metrics: Counts stored, duplicate and retried frames, batch time and queue depth here;
            transports count what they receive and refuse.
        batch_size: Most frames stored per batch.
        max_wait_s: How long the writer waits for the next frame before storing what it has.
        max_queue: Frames that may wait before ``submit`` blocks.
    """

    def __init__(
        self,
        media: MediaStore,
        inbox: Inbox,
        devices: DeviceDirectory,
        validation: ValidationConfig,
        metrics: ServerMetrics,
        batch_size: int = 64,
        max_wait_s: float = 0.005,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.media = media
        self.inbox = inbox
        self.devices = devices
        self.validation = validation
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.decode_budget = DecodeBudget(validation.max_decode_pixels)
        self._queue: queue.Queue[_Pending | None] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._closed = False
        # Frame ids on their way through the core: their future and device. Guarded by _lock.
        self._inflight: dict[str, tuple[Future[Ack], str]] = {}
        # One batch may wait between the stages: enough to overlap them, and back-pressure beyond.
        self._handoff: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)
        self._writer = threading.Thread(target=self._run, name="ingest-media", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="ingest-db", daemon=True)
        self._writer.start()
        self._committer.start()

    def submit(self, payload: bytes, identity: Identity) -> Future[Ack]:
        """Validate now, store later; see :meth:`server.ingest.base.Ingestor.submit`.

        Raises:
            FrameRejected: the frame failed validation; nothing was written.
        """
        record = validate(payload, identity, self.devices, self.validation, self.decode_budget)
        future: Future[Ack] = Future()
        if self._closed:
            return self._answer_retry(future, record.frame_id, "the server is shutting down; retry later")
        fid = record.frame_id
        with self._lock:
            leader = self._inflight.get(fid)
            if leader is None:
                self._inflight[fid] = (future, record.device_id)
        if leader is not None:
            return self._follow(leader, record, future, identity.transport)
        future.add_done_callback(lambda _done: self._landed(fid, future))
        try:
            path = self._write_new(record)
        except Exception as err:  # disk full, I/O error: the frame is fine, the server is not
            logger.error("media store failed for frame %s: %s", fid, err)
            return self._answer_retry(future, fid, f"media store failed: {err}")
        with self._lock:
            if not self._closed:
                self._queue.put(_Pending(record, future, path, identity.transport))
                self.metrics.queue_depth.inc()
                return future
        # Closed meanwhile: the file stays without a sample, like after a crash; the resend replaces it.
        return self._answer_retry(future, fid, "the server is shutting down; retry later")

    def _answer_retry(self, future: Future[Ack], frame_id: str, message: str) -> Future[Ack]:
        self.metrics.frames_retry.inc()
        future.set_result(Ack(frame_id, AckStatus.RETRY, message))
        return future

    def _write_new(self, record: FrameRecord) -> Path | None:
        """Write the image under its final name if the frame id has no file yet, under any
        extension; None (nothing written) when it has one: the media thread decides."""
        ext = extension_for(record.media_type)
        if any(self.media.exists(record.frame_id, other) for other in EXTENSIONS.values() if other != ext):
            return None
        return self.media.write_new(record.frame_id, record.image, ext)

    def _landed(self, frame_id: str, future: Future[Ack]) -> None:
        with self._lock:
            if self._inflight.get(frame_id, (None,))[0] is future:
                del self._inflight[frame_id]

    def _follow(
        self, leader: tuple[Future[Ack], str], record: FrameRecord, future: Future[Ack], transport: str
    ) -> Future[Ack]:
        """Answer a copy of a frame id already on its way once the first copy's fate is known."""
        first, owner = leader
        fid, device = record.frame_id, record.device_id

        def answer(done: Future[Ack]) -> None:
            ack = done.result()
            if ack.durable and owner != device:
                self.metrics.frames_rejected.labels(transport, RejectCode.ID_NOT_AVAILABLE.value).inc()
                future.set_result(id_not_available(fid, device))
            elif ack.durable:
                self.metrics.frames_duplicate.inc()
                future.set_result(Ack(fid, AckStatus.DUPLICATE, "sent twice"))
            else:
                # The first copy was not stored (or was refused); this copy may differ: let it come again.
                self.metrics.frames_retry.inc()
                future.set_result(Ack(fid, AckStatus.RETRY, "another copy of this frame id was not stored; resend"))

        first.add_done_callback(answer)
        return future

    def close(self, timeout: float | None = 60.0) -> None:
        """Store what is queued, then stop the writer. Later submits are answered RETRY."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._writer, self._committer):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.error("the ingest thread %s did not finish within %s s", thread.name, timeout)

    def __enter__(self) -> IngestCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self.metrics.queue_depth.dec(len(batch))
            try:
                self._handoff.put(self._prepare(batch))
            except Exception as err:
                logger.exception("storing a batch of %d frames failed", len(batch))
                self._resolve_unresolved(batch, f"storage error: {err}; retry later")
        self._handoff.put(None)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """Adaptive group commit: the batch grows while frames keep coming, up to ``batch_size``.

        Take what is queued, then sleep ``max_wait_s`` and take what came meanwhile, until a
        sleep brings nothing or the batch is full: a burst fills a batch, a lone frame (or the
        tail of a burst) waits ``max_wait_s`` at most. Sleeping and then draining, rather than
        waiting for each next frame, wakes this thread once per ``max_wait_s`` instead of once
        per frame: at ~1,500 frames/s the per-frame wake-ups (and the GIL hand-overs they cause)
        cost more CPU than storing the frames. Returns the batch and whether ``close()`` was seen.
        """
        batch = [first]
        while True:
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # everything queued before close() is in this batch or earlier ones
                    return batch, True
                batch.append(item)
            if len(batch) >= self.batch_size or self.max_wait_s <= 0:
                return batch, False
            time.sleep(self.max_wait_s)
            if self._queue.empty():
                return batch, False  # nothing came during the sleep: the burst is over

    def _commit_loop(self) -> None:
        while (prepared := self._handoff.get()) is not None:
            try:
                self._commit(prepared)
            except Exception as err:
                logger.exception("storing a batch of %d frames failed", len(prepared.batch))
                self._resolve_unresolved(prepared.batch, f"storage error: {err}; retry later")

    def _prepare(self, batch: Sequence[_Pending]) -> _Prepared:
        """Steps 2-3 (the media thread): sort out names that were taken, commit the images."""
        prepared = _Prepared(batch=batch, started=time.perf_counter())
        for item in batch:
            prepared.items[item.record.frame_id] = item  # one per id: copies follow the first (submit)
        paths = prepared.paths
        paths.update((fid, item.path) for fid, item in prepared.items.items() if item.path is not None)
        taken = [item.record for item in prepared.items.values() if item.path is None]
        if taken:
            try:
                stored = self.inbox.stored(r.frame_id for r in taken)
            except PyMongoError as err:
                logger.warning("database unavailable, %d frame(s) answered RETRY: %s", len(taken), err)
                prepared.acks.update((r.frame_id, _retry(r.frame_id, err)) for r in taken)
            else:
                for record in taken:
                    self._replace_taken(record, stored, prepared)
        if paths:
            try:
                self.media.commit()
            except OSError as err:
                logger.error("media store commit failed, %d frame(s) answered RETRY: %s", len(paths), err)
                for fid in paths:
                    prepared.acks[fid] = Ack(fid, AckStatus.RETRY, f"media store failed: {err}")
                return prepared
        prepared.written = [(prepared.items[fid].record, path) for fid, path in paths.items()]
        return prepared

    def _replace_taken(self, record: FrameRecord, stored: dict[str, StoredSample], prepared: _Prepared) -> None:
        """A frame whose file name was taken: a duplicate if its device stored it, refused if another
        device did (nothing written either way); else (a resend of a frame never stored, or a crash
        leftover) its file is replaced whole."""
        fid = record.frame_id
        sample = stored.get(fid)
        if sample is not None:
            if sample.device_id == record.device_id:
                prepared.acks[fid] = Ack(fid, AckStatus.DUPLICATE, "already stored")
            else:
                prepared.reject(fid, RejectCode.ID_NOT_AVAILABLE, id_not_available(fid, record.device_id))
            return
        try:
            prepared.paths[fid] = self.media.replace(fid, record.image, extension_for(record.media_type))
        except Exception as err:
            logger.error("media store failed for frame %s: %s", fid, err)
            prepared.acks[fid] = Ack(fid, AckStatus.RETRY, f"media store failed: {err}")

    def _commit(self, prepared: _Prepared) -> None:
        """Steps 5-6 (the database thread): insert the samples of durable images, answer every frame."""
        acks = prepared.acks
        # Only now, with every image durable, may their samples exist.
        if prepared.written:
            try:
                # No second look-up: a new file name means no sample yet (samples are written only
                # after their files), the media thread looked up the names that were taken, and the
                # unique index catches a copy inserted meanwhile (by another process).
                result = self.inbox.insert_records(prepared.written, check_existing=False)
            except PyMongoError as err:
                logger.warning("database unavailable, %d frame(s) answered RETRY: %s", len(prepared.written), err)
                for record, _ in prepared.written:
                    acks[record.frame_id] = _retry(record.frame_id, err)
            else:
                for fid in result.stored:
                    acks[fid] = Ack(fid, AckStatus.STORED, "stored")
                for fid, reason in result.refused.items():
                    logger.warning("the database refused the sample of frame %s: %s", fid, reason)
                    refusal = FrameRejected(RejectCode.STORAGE_REFUSED, f"the database refused the sample: {reason}")
                    prepared.reject(fid, RejectCode.STORAGE_REFUSED, Ack(fid, AckStatus.REJECTED, str(refusal)))
                    self._remove(prepared.paths[fid])
                if result.duplicates:
                    self._settle_races(prepared, result.duplicates)
        self.metrics.batch_seconds.observe(time.perf_counter() - prepared.started)
        answers = [(item, acks[fid]) for fid, item in prepared.items.items()]
        # Counted before answered: whoever holds an ack finds the frame in the counters.
        counts = Counter(ack.status for _, ack in answers)
        self.metrics.frames_stored.inc(counts[AckStatus.STORED])
        self.metrics.frames_duplicate.inc(counts[AckStatus.DUPLICATE])
        self.metrics.frames_retry.inc(counts[AckStatus.RETRY])
        for fid, code in prepared.codes.items():
            self.metrics.frames_rejected.labels(prepared.items[fid].transport, code.value).inc()
        for item, ack in answers:
            item.future.set_result(ack)

    def _settle_races(self, prepared: _Prepared, duplicates: list[str]) -> None:
        """Frame ids another process inserted while this one wrote them: DUPLICATE for the same
        device, REJECTED for another; the file written here goes unless the sample points at it."""
        acks = prepared.acks
        try:
            stored = self.inbox.stored(duplicates)
        except PyMongoError as err:
            for fid in duplicates:
                acks[fid] = _retry(fid, err)
            return
        for fid in duplicates:
            record, sample = prepared.items[fid].record, stored.get(fid)
            if sample is None:  # removed meanwhile: let the agent send it again
                acks[fid] = Ack(fid, AckStatus.RETRY, "the frame id changed hands while it was stored; resend")
                continue
            if sample.device_id == record.device_id:
                acks[fid] = Ack(fid, AckStatus.DUPLICATE, "already stored")
            else:
                prepared.reject(fid, RejectCode.ID_NOT_AVAILABLE, id_not_available(fid, record.device_id))
            path = prepared.paths[fid]
            if Path(sample.filepath).name != path.name:
                self._remove(path)

    def _remove(self, path: Path) -> None:
        """Remove a file this core wrote and no sample points at (best effort: the sweep finds it otherwise)."""
        frame_id, _, ext = path.name.rpartition(".")
        try:
            self.media.delete(frame_id, ext)
        except Exception as err:
            logger.warning("could not remove %s (no sample points at it; the media sweep will): %s", path, err)

    def _resolve_unresolved(self, batch: Sequence[_Pending], message: str) -> None:
        for item in batch:
            if not item.future.done():
                self.metrics.frames_retry.inc()
                item.future.set_result(Ack(item.record.frame_id, AckStatus.RETRY, message))


def _retry(frame_id: str, err: Exception) -> Ack:
    return Ack(frame_id, AckStatus.RETRY, f"storage unavailable ({type(err).__name__}); retry later")

"""Wiring of the running agent: source -> detector -> triggers -> dedup -> encode -> outbox,
with the uploader draining the outbox in the background.

Threads, so that scoring, JPEG encoding and the outbox's fsyncs run *beside* inference instead
of after it (the detector releases the GIL while ONNX Runtime computes):

* the caller's thread reads frames and runs the detector;
* one worker thread scores, deduplicates, encodes and enqueues (a bounded queue between the two
  applies back-pressure rather than dropping frames silently);
* the uploader thread (see :mod:`edge_agent.uploader`) sends what the outbox holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.budget import NearDuplicateFilter, UploadBudget
from edge_agent.config import AgentConfig
from edge_agent.detectors import Detector, DetectorError, create_detector
from edge_agent.detectors.base import DetectorOutput
from edge_agent.encoding import encode_frame
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox, OutboxFull
from edge_agent.sources import open_source
from edge_agent.transports import Transport, create_transport
from edge_agent.triggers import UncertaintyScorer, Verdict
from edge_agent.updater import Updater
from edge_agent.uploader import Uploader
from edgeloop import __version__
from edgeloop.convert import device_status_to_pb, serialize_frame
from edgeloop.domain import Detection, DeviceStatus, Frame, FrameRecord
from edgeloop.embedding import ReferenceStats

logger = logging.getLogger(__name__)

#: Sequence numbers are reserved from the outbox in blocks, so numbering costs one write per block.
SEQUENCE_BLOCK = 1024

_STOP = object()


def _prefetch(frames: Iterable[Frame], depth: int, stop: threading.Event) -> Iterator[Frame]:
    """Read (decode) frames in a thread of their own, so reading overlaps inference."""
    buf: queue.Queue[object] = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []

    def read() -> None:
        try:
            for frame in frames:
                while not stop.is_set():
                    try:
                        buf.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # re-raised in the consumer's thread
            failure.append(err)
        finally:
            while True:  # tell the consumer; give up if it has stopped listening
                try:
                    buf.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set():
                        break

    reader = threading.Thread(target=read, name="edgeloop-reader", daemon=True)
    reader.start()
    while True:
        item = buf.get()
        if item is _STOP:
            break
        yield item  # type: ignore[misc]
    if failure:
        raise failure[0]


@dataclass(slots=True)
class _Scored:
    frame: Frame
    output: DetectorOutput
    model_version: str
    class_names: list[str]  # of the model that detected it: a swap may happen before the worker gets to it
    reference: ReferenceStats | None


class Agent:
    """One edge agent. ``run()`` processes the source until it ends or ``stop()`` is called."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        detector: Detector | None = None,
        transport: Transport | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or AgentMetrics()
        self.detector, self.model_version = self._initial_detector(detector)
        # Held while a frame is detected, so a model swap happens between frames, never inside one.
        self._detector_lock = threading.Lock()
        self._recent: deque[np.ndarray] = deque(maxlen=config.update.smoke_frames)
        self.scorer = UncertaintyScorer(config.triggers, seed=config.seed)
        self.dedup = NearDuplicateFilter(config.budget.dedup)
        self.outbox = Outbox(config.outbox)
        if transport is None and config.transport is not None:
            transport = create_transport(config.transport, config.device_id)
        self.transport = transport
        self.uploader: Uploader | None = None
        if transport is not None:
            self.uploader = Uploader(
                self.outbox,
                transport,
                UploadBudget(config.budget),
                config.upload,
                self.metrics,
                heartbeat=self._send_heartbeat,
            )
        self.updater: Updater | None = None
        if config.update.enabled:
            self.updater = Updater(config.update, config.device_id, self, self._build_detector)
        self._stop = threading.Event()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_size)
        self._seq_next = 0
        self._seq_end = 0
        self._seq_error: OutboxFull | None = None  # why no sequence numbers could be reserved
        self._worker_error: BaseException | None = None

    # -- the model -------------------------------------------------------------------------
    def _initial_detector(self, given: Detector | None) -> tuple[Detector, str]:
        if given is not None:
            return given, given.model_version
        update = self.config.update
        current = Updater.current_model(update.models_dir) if update.enabled else None
        if current is not None:
            version, artifact = current
            try:
                # The last model an update installed wins over the configured (factory) one.
                return self._build_detector(artifact), version
            except DetectorError as err:
                logger.error("installed model %s does not load (%s); using the configured one", version, err)
        detector = create_detector(self.config.detector)
        return detector, detector.model_version

    def _build_detector(self, model_path: Path) -> Detector:
        return create_detector(self.config.detector.model_copy(update={"model": model_path}))

    def swap_detector(self, detector: Detector, version: str) -> Detector:
        """Make ``detector`` the running model from the next frame on; returns the previous one."""
        with self._detector_lock:
            old, self.detector = self.detector, detector
            self.model_version = version
        return old

    def recent_frames(self) -> list[np.ndarray]:
        """The last few frames seen (the smoke test of a new model runs on them)."""
        return list(self._recent)

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, frames: Iterable[Frame] | None = None) -> dict[str, int]:
        """Process ``frames`` (default: the configured source); returns the counters."""
        if self.config.metrics.enabled and self.metrics.server_port is None:
            self.metrics.serve(self.config.metrics)
        if self.uploader is not None:
            self.uploader.start()
        if self.updater is not None:
            self.updater.start()
        worker = threading.Thread(target=self._work, name="edgeloop-scorer", daemon=True)
        worker.start()
        source = frames if frames is not None else open_source(self.config.source)
        reading_done = threading.Event()
        try:
            for frame in _prefetch(source, self.config.queue_size, reading_done):
                if self._stop.is_set() or self._worker_error is not None:
                    break
                self.metrics.inc("frames_read")
                t0 = time.perf_counter()
                with self._detector_lock:
                    output = self.detector.detect_all(frame.image)
                    version = self.model_version
                    class_names = list(self.detector.class_names)
                    reference = self.detector.reference
                self.metrics.inference_seconds.observe(time.perf_counter() - t0)
                self._recent.append(frame.image)
                self._queue.put(_Scored(frame, output, version, class_names, reference))
                self.metrics.frame_done()
        finally:
            reading_done.set()
            self._queue.put(_STOP)
            worker.join()
            if self.updater is not None:
                self.updater.stop()
            if self.uploader is not None:
                if self.config.drain_on_exit_s and not self._stop.is_set():
                    self.uploader.stop()
                    self.uploader.drain(self.config.drain_on_exit_s)
                self.uploader.stop()
        if self._worker_error is not None:
            raise RuntimeError("the scoring worker failed") from self._worker_error
        return self.metrics.snapshot()

    def close(self) -> None:
        self.stop()
        if self.uploader is not None:
            self.uploader.stop()
        if self.updater is not None:
            self.updater.stop()
        if self.transport is not None:
            self.transport.close()
        self.detector.close()
        self.outbox.close()
        self.metrics.close()

    # -- the scoring worker --------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Scored)
            try:
                self.process(item.frame, item.output, item.model_version, item.class_names, item.reference)
            except BaseException as err:  # surfaced by run(); the loop must not hang the reader
                logger.exception("scoring worker failed on frame %s", item.frame.name)
                self._worker_error = err
                self._drain_queue()
                return

    def _drain_queue(self) -> None:
        while True:
            try:
                if self._queue.get_nowait() is _STOP:
                    return
            except queue.Empty:
                time.sleep(0.01)

    def process(
        self,
        frame: Frame,
        output: DetectorOutput | list[Detection],
        model_version: str | None = None,
        class_names: list[str] | None = None,
        reference: ReferenceStats | None = None,
    ) -> Verdict:
        """Score one detected frame and, if it is worth it, store it in the outbox.

        ``output`` is what the detector said (or just its detections); ``model_version``,
        ``class_names`` and ``reference`` describe the model that produced it (default: the running
        one's names; no reference).
        """
        if not isinstance(output, DetectorOutput):
            output = DetectorOutput(list(output))
        detections = output.detections
        seq = self._next_sequence()
        if class_names is None:
            class_names = list(self.detector.class_names)
        verdict = self.scorer.score(
            frame.source_id,
            detections,
            frame.capture_time,
            image_size=(frame.width, frame.height),
            class_names=class_names,
            weak=output.weak,
            embedding=output.embedding,
            reference=reference,
            stream=frame.stream,
        )
        self.metrics.inc("frames_scored")
        self.metrics.inc_source("frames_scored", frame.source_id)
        if not verdict.keep:
            return verdict
        self.metrics.inc("frames_kept")
        self.metrics.inc_source("frames_kept", frame.source_id)
        if self.dedup.is_duplicate(frame.source_id, frame.image, detections, frame.capture_time):
            self.metrics.inc("frames_deduplicated")
            return verdict
        if seq is None:  # the disk is too full even to reserve sequence numbers
            assert self._seq_error is not None
            self.outbox.note_full(self._seq_error)
            return self._drop_disk_full(verdict)
        budget = self.config.budget
        enc = encode_frame(frame.image, detections, quality=budget.jpeg_quality, max_side=budget.max_side)
        record = FrameRecord(
            frame_id=uuid.uuid4().hex,
            device_id=self.config.device_id,
            capture_time=frame.capture_time,
            sequence=seq,
            model_version=model_version or self.model_version,
            image=enc.data,
            media_type=enc.media_type,
            width=enc.width,
            height=enc.height,
            detections=enc.detections,
            uncertainty=verdict.score,
            reasons=list(verdict.reasons),
            source_id=frame.source_id,
            class_names=class_names,
            embedding=output.embedding,
            source_name=frame.name,
        )
        try:
            result = self.outbox.put(record.frame_id, serialize_frame(record), verdict.score)
        except OutboxFull:  # the outbox logs it: at once, then a summary a minute, and when room is back
            return self._drop_disk_full(verdict)
        self.metrics.inc("frames_evicted", len(result.evicted))
        if result.stored:
            self.metrics.inc("frames_enqueued")
            # The crash tests rely on this line meaning "durably in the outbox".
            logger.info(
                "enqueued frame %s seq=%d score=%.3f reasons=%s",
                record.frame_id,
                seq,
                verdict.score,
                ",".join(r.trigger for r in verdict.reasons),
            )
        return verdict

    def _drop_disk_full(self, verdict: Verdict) -> Verdict:
        """A kept frame the outbox's volume has no room for: counted, not stored; the agent goes on
        reading, scoring and uploading, and enqueues again once there is room."""
        self.metrics.inc("frames_dropped_disk_full")
        return verdict

    def _next_sequence(self) -> int | None:
        """The next frame sequence number; None while the disk is too full to reserve a block (no
        frame can be enqueued then anyway, and a number not reserved durably could repeat)."""
        if self._seq_next >= self._seq_end:
            try:
                self._seq_next = self.outbox.reserve_sequence(SEQUENCE_BLOCK)
            except OutboxFull as err:
                self._seq_error = err
                return None
            self._seq_end = self._seq_next + SEQUENCE_BLOCK
        seq = self._seq_next
        self._seq_next += 1
        return seq

    # -- heartbeat -----------------------------------------------------------------------
    def status(self) -> DeviceStatus:
        return DeviceStatus(
            device_id=self.config.device_id,
            time=time.time(),
            model_version=self.model_version,
            outbox_depth=self.outbox.depth,
            outbox_bytes=self.outbox.size_bytes,
            counters={**self.metrics.snapshot(), **self.metrics.source_snapshot()},
            last_error=(self.updater.last_error if self.updater else "")
            or self.outbox.full_reason
            or (self.uploader.last_error if self.uploader else ""),
            channel=self.config.update.channel if self.updater else "",
            agent_version=__version__,
        )

    def _send_heartbeat(self) -> None:
        if self.transport is not None:
            self.transport.heartbeat(device_status_to_pb(self.status()))

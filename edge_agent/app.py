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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from edge_agent.budget import NearDuplicateFilter, UploadBudget
from edge_agent.config import AgentConfig
from edge_agent.detectors import Detector, create_detector
from edge_agent.encoding import encode_frame
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox
from edge_agent.sources import open_source
from edge_agent.transports import Transport, create_transport
from edge_agent.triggers import UncertaintyScorer, Verdict
from edge_agent.uploader import Uploader
from edgeloop import __version__
from edgeloop.convert import device_status_to_pb, serialize_frame
from edgeloop.domain import Detection, DeviceStatus, Frame, FrameRecord

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
    detections: list[Detection]


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
        self.detector = detector or create_detector(config.detector)
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
        self._stop = threading.Event()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_size)
        self._seq_next = 0
        self._seq_end = 0
        self._worker_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, frames: Iterable[Frame] | None = None) -> dict[str, int]:
        """Process ``frames`` (default: the configured source); returns the counters."""
        if self.config.metrics.enabled and self.metrics.server_port is None:
            self.metrics.serve(self.config.metrics)
        if self.uploader is not None:
            self.uploader.start()
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
                detections = self.detector.detect(frame.image)
                self.metrics.inference_seconds.observe(time.perf_counter() - t0)
                self._queue.put(_Scored(frame, detections))
                self.metrics.frame_done()
        finally:
            reading_done.set()
            self._queue.put(_STOP)
            worker.join()
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
                self.process(item.frame, item.detections)
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

    def process(self, frame: Frame, detections: list[Detection]) -> Verdict:
        """Score one detected frame and, if it is worth it, store it in the outbox."""
        seq = self._next_sequence()
        verdict = self.scorer.score(
            frame.source_id, detections, frame.capture_time, image_size=(frame.width, frame.height)
        )
        self.metrics.inc("frames_scored")
        if not verdict.keep:
            return verdict
        self.metrics.inc("frames_kept")
        if self.dedup.is_duplicate(frame.source_id, frame.image, detections, frame.capture_time):
            self.metrics.inc("frames_deduplicated")
            return verdict
        budget = self.config.budget
        enc = encode_frame(frame.image, detections, quality=budget.jpeg_quality, max_side=budget.max_side)
        record = FrameRecord(
            frame_id=uuid.uuid4().hex,
            device_id=self.config.device_id,
            capture_time=frame.capture_time,
            sequence=seq,
            model_version=self.detector.model_version,
            image=enc.data,
            media_type=enc.media_type,
            width=enc.width,
            height=enc.height,
            detections=enc.detections,
            uncertainty=verdict.score,
            reasons=list(verdict.reasons),
            source_id=frame.source_id,
            class_names=list(self.detector.class_names),
        )
        result = self.outbox.put(record.frame_id, serialize_frame(record), verdict.score)
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

    def _next_sequence(self) -> int:
        if self._seq_next >= self._seq_end:
            self._seq_next = self.outbox.reserve_sequence(SEQUENCE_BLOCK)
            self._seq_end = self._seq_next + SEQUENCE_BLOCK
        seq = self._seq_next
        self._seq_next += 1
        return seq

    # -- heartbeat -----------------------------------------------------------------------
    def status(self) -> DeviceStatus:
        return DeviceStatus(
            device_id=self.config.device_id,
            time=time.time(),
            model_version=self.detector.model_version,
            outbox_depth=self.outbox.depth,
            outbox_bytes=self.outbox.size_bytes,
            counters=self.metrics.snapshot(),
            last_error=self.uploader.last_error if self.uploader else "",
            agent_version=__version__,
        )

    def _send_heartbeat(self) -> None:
        if self.transport is not None:
            self.transport.heartbeat(device_status_to_pb(self.status()))

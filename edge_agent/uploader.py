"""The upload loop: outbox -> budget -> transport -> acknowledgements -> outbox.

Runs in its own thread. Each round it offers the highest-scoring pending frames that fit the
upload budget, sends them, and removes from the outbox exactly those the receiver acknowledged
as durably stored (or as already stored). Frames the receiver rejects for good go to the
outbox's dead-letter table. On a transport failure it backs off exponentially (with jitter, so a
fleet does not reconnect in lock-step) and tries again; the frames never leave the disk meanwhile.
On a full disk it keeps uploading: acknowledged frames the outbox could not remove yet are not
sent again, and each round retries their removal (:meth:`Outbox.retry_removals`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from pydantic import Field

from edge_agent.budget import UploadBudget
from edge_agent.metrics import AgentMetrics
from edge_agent.outbox import Outbox
from edge_agent.transports.base import Transport, TransportError
from edgeloop.config_base import StrictModel
from edgeloop.domain import AckStatus

logger = logging.getLogger(__name__)


class UploadConfig(StrictModel):
    batch_size: int = Field(default=16, gt=0, description="Frames per send.")
    idle_poll_s: float = Field(default=0.2, gt=0, description="Sleep when the outbox is empty.")
    backoff_initial_s: float = Field(default=0.5, gt=0, description="First retry delay after a failure.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest retry delay.")
    heartbeat_s: float = Field(default=30.0, gt=0, description="Seconds between heartbeats.")


class Backoff:
    """Exponential backoff with full jitter, reset on success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial, self.maximum = initial, maximum
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self._attempt))
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class Uploader:
    """Moves frames from the outbox to the receiver until stopped."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        budget: UploadBudget,
        config: UploadConfig,
        metrics: AgentMetrics,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.budget = budget
        self.config = config
        self.metrics = metrics
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        self._thread: threading.Thread | None = None
        self._next_heartbeat = 0.0
        # Shrinks while the receiver refuses a batch's bytes, to isolate the one bad frame.
        self._batch_limit = config.batch_size
        self.last_error: str = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeloop-uploader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.step()
            except Exception:  # the loop must survive anything; the frames are safe on disk
                logger.exception("upload round failed")
                delay = self._backoff.next_delay()
            if delay:
                self._stop.wait(delay)

    def maybe_heartbeat(self) -> None:
        if self._heartbeat is None or time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_s
        try:
            self._heartbeat()
        except TransportError as err:
            logger.debug("heartbeat failed: %s", err)

    def step(self) -> float:
        """One upload round; returns how long to wait before the next."""
        self.maybe_heartbeat()
        self.outbox.retry_removals()
        self._publish_gauges()
        pending = self.outbox.peek(self._batch_limit)
        if not pending:
            return self.config.idle_poll_s
        n = self.budget.admit([p.size for p in pending])
        if n == 0:
            return max(self.budget.wait_time(pending[0].size), 0.01)
        batch = pending[:n]
        try:
            acks = self.transport.send([(p.frame_id, p.payload) for p in batch])
        except TransportError as err:
            self.metrics.inc("upload_errors")
            if err.permanent:
                return self._isolate(batch, err)
            self.outbox.mark_attempt([p.frame_id for p in batch])
            delay = self._backoff.next_delay()
            self.last_error = str(err)
            logger.warning("upload failed (%s); %d frame(s) stay in the outbox, retry in %.1fs", err, len(batch), delay)
            return delay
        self._backoff.reset()
        self._batch_limit = min(self.config.batch_size, self._batch_limit * 2)
        durable = [a.frame_id for a in acks if a.durable]
        self.metrics.inc("frames_uploaded", self.outbox.ack(durable))
        stored = set(durable)
        self.metrics.inc("bytes_uploaded", sum(p.size for p in batch if p.frame_id in stored))
        for ack in acks:
            if ack.status == AckStatus.REJECTED and self.outbox.reject(ack.frame_id, ack.message):
                self.metrics.inc("frames_rejected")
        self._publish_gauges()
        answered = {a.frame_id for a in acks}
        if any(p.frame_id not in answered for p in batch) or any(a.status == AckStatus.RETRY for a in acks):
            # The receiver is alive but did not store everything: give it a moment.
            return self._backoff.next_delay()
        return 0.0

    def _isolate(self, batch: list, err: TransportError) -> float:
        """The receiver refused the bytes of this batch: halve it until the bad frame stands alone,
        then set that frame aside in the dead-letter table (it would block the queue forever)."""
        if len(batch) > 1:
            self._batch_limit = max(1, len(batch) // 2)
            logger.warning("receiver refused a batch of %d (%s); retrying in halves", len(batch), err)
            return 0.0
        frame = batch[0]
        if self.outbox.reject(frame.frame_id, f"refused by the receiver: {err}"):
            self.metrics.inc("frames_rejected")
        self._batch_limit = self.config.batch_size
        return 0.0

    def _publish_gauges(self) -> None:
        self.metrics.outbox_depth.set(self.outbox.depth)
        self.metrics.outbox_bytes.set(self.outbox.size_bytes)
        self.metrics.outbox_free_bytes.set(self.outbox.free_bytes())

    def drain(self, timeout: float) -> bool:
        """Upload in the caller's thread until the outbox is empty or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            delay = self.step()
            if delay:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        return self.outbox.depth == 0

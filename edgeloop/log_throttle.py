"""Logging a recurring event without flooding the log, and without losing count of it.

A disk that stays full, or an outbox that evicts a frame on every arrival, produces the same event
many times a second. :class:`LogThrottle` counts such events and says when a line is due: the
first event at once, then at most one line per interval carrying the count since the previous
line, and :meth:`LogThrottle.flush` hands over what is left (at shutdown, or when the condition
ends), so the counts in the lines add up to the events that happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Default seconds between two summary lines of one kind of event.
DEFAULT_INTERVAL_S = 60.0


class LogThrottle:
    """Counts one kind of event; the caller logs a line whenever :meth:`add` returns a count.

    Thread-safe. The first event after a quiet interval is due at once, so a problem's first
    occurrence is always logged when it happens.
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._last: float | None = None
        self.total = 0  #: every event counted so far

    def add(self, n: int = 1) -> int:
        """Count ``n`` events; returns how many a line logged now must report (0: no line due yet)."""
        with self._lock:
            self._pending += n
            self.total += n
            now = self._clock()
            if self._last is not None and now - self._last < self.interval_s:
                return 0
            self._last = now
            due, self._pending = self._pending, 0
            return due

    def flush(self) -> int:
        """The events not reported yet (0 if none); the next :meth:`add` is due at once."""
        with self._lock:
            due, self._pending = self._pending, 0
            self._last = None
            return due

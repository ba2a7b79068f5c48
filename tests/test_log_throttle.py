"""edgeloop.log_throttle: the first event at once, then one line per interval, counts that add up."""

from __future__ import annotations

from edgeloop.log_throttle import LogThrottle
from tests.fakes.clock import FakeClock


def test_first_event_at_once_then_one_line_per_interval_and_nothing_lost():
    clock = FakeClock()
    throttle = LogThrottle(interval_s=60, clock=clock)
    reported = [throttle.add()]  # due at once
    for _ in range(9):
        clock.t += 1
        reported.append(throttle.add())
    assert reported == [1] + [0] * 9
    clock.t += 60
    assert throttle.add(5) == 14  # the nine held back plus these five
    clock.t += 1
    throttle.add(3)
    assert throttle.flush() == 3 and throttle.flush() == 0
    assert throttle.total == 1 + 9 + 5 + 3
    assert throttle.add() == 1  # after a flush the next event is due at once

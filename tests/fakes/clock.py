"""A clock the test moves by hand, for code that takes ``clock=`` (budgets, log throttles)."""

from __future__ import annotations


class FakeClock:
    """Call it for the time; set or add to ``t`` to move it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

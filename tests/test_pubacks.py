"""edgeloop.pubacks: the PUBACK bookkeeping the agent's MQTT transport and the announcer share
(both are also exercised against a real Mosquitto in their own tests)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edgeloop.pubacks import PubackWaiter


@dataclass
class Code:
    name: str
    is_failure: bool

    def __str__(self) -> str:
        return self.name


@dataclass
class Info:
    """The part of paho's MQTTMessageInfo the waiter uses."""

    mid: int
    published: bool = True
    error: Exception | None = None

    def wait_for_publish(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error

    def is_published(self) -> bool:
        return self.published


@dataclass
class Broker:
    host: str = "broker"
    port: int = 8883
    username: str | None = "cam-1"
    publish_timeout_s: float = 0.5


def test_accepted_publishes_give_no_problem_and_leave_nothing_behind():
    waiter = PubackWaiter()
    waiter.on_publish(None, None, 1, Code("Success", False), None)
    assert waiter.wait([("a", Info(1)), ("b", Info(2))], 1.0) is None
    assert waiter._refused == {}


def test_a_refusal_is_reported_for_its_message_only():
    waiter = PubackWaiter()
    waiter.on_publish(None, None, 2, Code("Not authorized", True), None)
    problem = waiter.wait([("a", Info(1)), ("b", Info(2)), ("c", Info(3))], 1.0)
    assert (problem.label, problem.kind, problem.detail) == ("b", "refused", "Not authorized")
    assert waiter._refused == {}  # popped: a later wait does not see it again
    with pytest.raises(RuntimeError, match=r"broker:8883 refused the publish of b: Not authorized .*'cam-1'"):
        waiter.on_publish(None, None, 2, Code("Not authorized", True), None)
        waiter.wait_or_raise([("b", Info(2))], Broker(), RuntimeError, lambda label: f"the publish of {label}")


def test_timeout_and_failure():
    waiter = PubackWaiter()
    problem = waiter.wait([("a", Info(1)), ("b", Info(2, published=False))], 0.5)
    assert (problem.label, problem.kind, problem.detail) == ("b", "timeout", "0.5 s")
    assert "did not acknowledge the release on b within 0.5 s" in problem.message("the release on b", "h:1", None)
    problem = waiter.wait([("a", Info(1, error=RuntimeError("message dropped")))], 0.5)
    assert (problem.kind, problem.detail) == ("failed", "message dropped")
    waiter.wait_or_raise([("a", Info(1))], Broker(), RuntimeError, str)  # no problem: no raise


def test_a_lost_connection_ends_the_wait_at_once():
    waiter = PubackWaiter()
    checks = []

    def lost() -> str | None:
        checks.append(1)
        return "connection lost: broker going down" if len(checks) >= 3 else None

    problem = waiter.wait([("a", Info(1)), ("b", Info(2, published=False))], 60.0, lost)
    assert (problem.label, problem.kind, problem.detail) == ("b", "lost", "connection lost: broker going down")
    assert "lost before it acknowledged the publish of b" in problem.message("the publish of b", "h:1", None)
    assert waiter.wait([("a", Info(1))], 60.0, lambda: "gone") is None  # acknowledged already: no problem

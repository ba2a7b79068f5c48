"""Waiting for the broker's PUBACKs of QoS 1 publishes, as the agent's MQTT transport and the
server's release announcer both do: which messages reached the broker and which it refused.

paho reports a refusal (MQTT 5 reason code, e.g. "Not authorized" from an ACL) only through the
``on_publish`` callback, on its network thread; ``MQTTMessageInfo`` says only whether a PUBACK
came. :class:`PubackWaiter` joins the two. Only refusals are kept (and popped by :meth:`wait`),
so a PUBACK that arrives after its sender gave up leaves nothing behind in the common case.
MQTT 3.1.1 brokers never refuse a publish: they drop a denied one silently.

paho keeps waiting for a PUBACK across a lost connection (it resends after reconnecting); a
caller that wants to give up as soon as the connection drops passes ``lost``, checked every
:data:`LOST_POLL_S` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

#: How often a wait with a ``lost`` check looks at the connection.
LOST_POLL_S = 0.1


class BrokerConfig(Protocol):
    """What the MQTT configs of the agent and of the announcer both have."""

    host: str
    port: int
    username: str | None
    publish_timeout_s: float


@dataclass(frozen=True)
class PubackProblem:
    """Why one of the awaited messages is not known to be with the broker."""

    label: str  #: the caller's name for the message (a frame id, a topic)
    kind: Literal["failed", "timeout", "refused", "lost"]
    detail: str  #: paho's error, the time waited, the broker's reason code, or why the connection was lost

    def message(self, what: str, broker: str, username: str | None) -> str:
        """A log/exception line: ``what`` names the message, e.g. "the publish of <id> to <topic>"."""
        if self.kind == "failed":
            return f"MQTT {what} failed: {self.detail}"
        if self.kind == "timeout":
            return f"MQTT broker {broker} did not acknowledge {what} within {self.detail}"
        if self.kind == "lost":
            return f"MQTT connection to broker {broker} lost before it acknowledged {what}: {self.detail}"
        return f"MQTT broker {broker} refused {what}: {self.detail} (check the broker's ACL for user {username!r})"


class PubackWaiter:
    """Set :meth:`on_publish` as the client's ``on_publish``; call :meth:`wait` after publishing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: dict[int, Any] = {}

    def on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._refused[mid] = reason_code

    def wait(
        self,
        infos: Sequence[tuple[str, mqtt.MQTTMessageInfo]],
        timeout_s: float,
        lost: Callable[[], str | None] | None = None,
    ) -> PubackProblem | None:
        """Wait up to ``timeout_s`` in all for the PUBACK of every ``(label, info)``; None when the
        broker accepted them all, else the first problem (later messages are not waited for).

        Args:
            lost: Returns why the connection the messages went out on was lost, or None while it is
                up; the wait stops at once when it says so.
        """
        deadline = time.monotonic() + timeout_s
        for label, info in infos:
            while True:
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    info.wait_for_publish(remaining if lost is None else min(remaining, LOST_POLL_S))
                except (RuntimeError, ValueError) as err:  # the message was dropped, or never queued
                    return PubackProblem(label, "failed", str(err))
                if info.is_published() or remaining <= 0 or lost is None:
                    break
                why = lost()
                if why:
                    return PubackProblem(label, "lost", why)
            if not info.is_published():
                return PubackProblem(label, "timeout", f"{timeout_s:g} s")
            with self._lock:
                code = self._refused.pop(info.mid, None)
            if code is not None:
                return PubackProblem(label, "refused", str(code))
        return None

    def wait_or_raise(
        self,
        infos: Sequence[tuple[str, mqtt.MQTTMessageInfo]],
        config: BrokerConfig,
        error: type[Exception],
        what: Callable[[str], str],
        lost: Callable[[], str | None] | None = None,
    ) -> None:
        """:meth:`wait` up to ``config.publish_timeout_s``; on a problem raise ``error`` with
        :meth:`PubackProblem.message`, naming the message ``what(label)``."""
        problem = self.wait(infos, config.publish_timeout_s, lost)
        if problem is not None:
            raise error(problem.message(what(problem.label), f"{config.host}:{config.port}", config.username))

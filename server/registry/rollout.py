"""Canary-first rollout: a new version goes to the canary channel, and to stable only once the canary
devices have run it healthily for a while, as their heartbeats tell.

A **canary device** is one whose latest heartbeat says it follows the canary channel
(``DeviceStatus.channel``). It is **healthy on the version** when its heartbeat reports that version
running (``model_version``), no ``last_error``, a heartbeat no older than ``max_heartbeat_age_s``,
and frames flowing: its ``frames_read`` counter grew since it was first seen healthy. The version
is **confirmed** when at least ``min_devices`` canary devices report and every one of them has been
continuously healthy on it for ``healthy_for_s`` (one unhealthy heartbeat restarts that device's
clock). It has **failed** when a canary device reports an error naming it (the updater refused or
could not load it: ``refused model vN ...``). :class:`CanaryWatch` holds this logic over successive
looks at the fleet; :func:`watch_canary` polls until confirmed, failed or ``timeout_s``.

On confirmation the version is promoted to stable. On failure the canary channel is rolled back
and the version marked rejected with the reason (stable was never touched). On timeout nothing
changes: the version stays on canary and the result says how to promote it by hand.

Heartbeats are read through :func:`server.ingest.heartbeats.read_fleet` (or any callable giving
the same mapping), the server's own record of each device's latest status.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.domain import DeviceStatus
from server.registry.store import ModelRegistry, RegistryError

logger = logging.getLogger(__name__)

#: The heartbeat counter that shows frames flowing through the model.
FRAMES_COUNTER = "frames_read"


class FleetEntryLike(Protocol):
    """What :func:`server.ingest.heartbeats.read_fleet` returns per device."""

    status: DeviceStatus
    received_at: float


class RolloutPolicy(StrictModel):
    """How a new version reaches the fleet."""

    canary_channel: str = Field("canary", description="Channel a new version is released to first.")
    stable_channel: str = Field("stable", description="Channel it is promoted to once the canary confirms it.")
    straight_to_stable: bool = Field(
        False, description="Release to stable at once, without a canary phase (small fleets, lab setups)."
    )
    healthy_for_s: float = Field(
        3600.0, ge=0.0, description="How long every canary device must report the version healthy, continuously."
    )
    min_devices: int = Field(1, ge=1, description="Canary devices that must report before the version can pass.")
    max_heartbeat_age_s: float = Field(
        300.0, gt=0.0, description="A device whose last heartbeat is older than this counts as unhealthy (silent)."
    )
    poll_s: float = Field(30.0, gt=0.0, description="How often the heartbeats are read while waiting.")
    timeout_s: float = Field(
        86400.0, gt=0.0, description="Give up waiting after this long; the version then stays on canary."
    )


@dataclass(frozen=True)
class DeviceHealth:
    """One canary device as last seen."""

    device_id: str
    healthy: bool
    reason: str
    healthy_for_s: float = 0.0


@dataclass(frozen=True)
class CanaryVerdict:
    """What the canary devices say about the version right now."""

    state: Literal["waiting", "confirmed", "failed"]
    reason: str
    devices: list[DeviceHealth] = field(default_factory=list)


class CanaryWatch:
    """Follows the canary devices' heartbeats for one version over successive looks (see the module docstring)."""

    def __init__(self, version: str, policy: RolloutPolicy) -> None:
        self.version = version
        self.policy = policy
        # device -> (server time it was first seen healthy in this streak, its frames_read then)
        self._since: dict[str, tuple[float, int]] = {}
        self._refused = re.compile(rf"\bmodel {re.escape(version)}\b")

    def observe(self, fleet: Mapping[str, FleetEntryLike], now: float) -> CanaryVerdict:
        """Judge the fleet as it is at ``now`` (server clock, seconds since the epoch)."""
        policy = self.policy
        devices: list[DeviceHealth] = []
        canary = {d: e for d, e in fleet.items() if e.status.channel == policy.canary_channel}
        for device_id, entry in sorted(canary.items()):
            status = entry.status
            frames = int(status.counters.get(FRAMES_COUNTER, 0))
            if status.last_error and self._refused.search(status.last_error) and status.model_version != self.version:
                reason = f"device {device_id} refused {self.version}: {status.last_error}"
                return CanaryVerdict("failed", reason, devices)
            problem = ""
            if now - entry.received_at > policy.max_heartbeat_age_s:
                problem = f"silent for {now - entry.received_at:.0f} s"
            elif status.model_version != self.version:
                problem = f"runs {status.model_version or 'nothing'}, not {self.version} yet"
            elif status.last_error:
                problem = f"reports an error: {status.last_error}"
            since = self._since.get(device_id)
            if since is not None and frames < since[1]:  # the agent restarted: a new streak
                problem = problem or "restarted"
            if problem:
                self._since.pop(device_id, None)
                devices.append(DeviceHealth(device_id, False, problem))
                continue
            if since is None:
                since = self._since[device_id] = (now, frames)
            held = now - since[0]
            if frames <= since[1]:
                devices.append(DeviceHealth(device_id, False, "no new frames since it started the version", held))
            elif held < policy.healthy_for_s:
                devices.append(DeviceHealth(device_id, False, f"healthy for {held:.0f} s", held))
            else:
                devices.append(DeviceHealth(device_id, True, f"healthy for {held:.0f} s", held))
        for gone in set(self._since) - set(canary):
            del self._since[gone]
        if len(devices) < policy.min_devices:
            reason = f"{len(devices)} canary device(s) report, {policy.min_devices} needed"
            return CanaryVerdict("waiting", reason, devices)
        waiting = [d for d in devices if not d.healthy]
        if waiting:
            reason = "; ".join(f"{d.device_id}: {d.reason}" for d in waiting)
            return CanaryVerdict("waiting", reason, devices)
        reason = (
            f"{len(devices)} canary device(s) ran {self.version} healthy for at least {policy.healthy_for_s:g} s "
            "(no errors, frames flowing)"
        )
        return CanaryVerdict("confirmed", reason, devices)


@dataclass(frozen=True)
class RolloutResult:
    """Where a rollout ended: ``stable`` (promoted), ``canary`` (left there: timed out), ``rolled-back``."""

    version: str
    outcome: Literal["stable", "canary", "rolled-back"]
    reason: str
    devices: list[DeviceHealth] = field(default_factory=list)


def release_to_canary(registry: ModelRegistry, version: str, policy: RolloutPolicy) -> str:
    """Release ``version`` on the canary channel, or on stable with ``straight_to_stable``; return the channel."""
    channel = policy.stable_channel if policy.straight_to_stable else policy.canary_channel
    registry.promote(version, channel)
    return channel


def watch_canary(
    registry: ModelRegistry,
    version: str,
    policy: RolloutPolicy,
    fleet: Callable[[], Mapping[str, FleetEntryLike]],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    on_verdict: Callable[[CanaryVerdict], None] | None = None,
) -> RolloutResult:
    """Follow the canary devices until ``version`` is confirmed (promoted to stable), fails (canary rolled
    back, version rejected) or ``policy.timeout_s`` passes (left on canary)."""
    watch = CanaryWatch(version, policy)
    deadline = clock() + policy.timeout_s
    verdict = CanaryVerdict("waiting", "not looked yet")
    last_reason = ""
    while True:
        verdict = watch.observe(fleet(), clock())
        if on_verdict is not None:
            on_verdict(verdict)
        if verdict.reason != last_reason:
            logger.info("canary %s: %s (%s)", version, verdict.state, verdict.reason)
            last_reason = verdict.reason
        if verdict.state == "confirmed":
            registry.promote(version, policy.stable_channel)
            return RolloutResult(version, "stable", verdict.reason, verdict.devices)
        if verdict.state == "failed":
            if registry.current(policy.canary_channel) == version:
                try:
                    registry.rollback(policy.canary_channel)
                except RegistryError as err:  # no earlier canary release: nothing to return to
                    logger.warning("canary %s failed and cannot be rolled back: %s", version, err)
                    return RolloutResult(version, "canary", f"{verdict.reason}; rollback impossible: {err}")
            registry.reject(version, f"canary failed: {verdict.reason}")
            return RolloutResult(version, "rolled-back", verdict.reason, verdict.devices)
        if clock() >= deadline:
            reason = (
                f"not confirmed within {policy.timeout_s:g} s ({verdict.reason}); it stays on "
                f"{policy.canary_channel}: promote it by hand with `edgeloop models promote {version} "
                f"--channel {policy.stable_channel}`"
            )
            return RolloutResult(version, "canary", reason, verdict.devices)
        sleep(policy.poll_s)


__all__ = [
    "CanaryVerdict",
    "CanaryWatch",
    "DeviceHealth",
    "RolloutPolicy",
    "RolloutResult",
    "release_to_canary",
    "watch_canary",
]

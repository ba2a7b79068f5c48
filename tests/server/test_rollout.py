"""Canary first: a version reaches stable only after every canary device ran it healthily for the set time,
as its heartbeats say; a device that refuses it rolls the canary back; silence leaves it on canary."""

from __future__ import annotations

import pytest

from edgeloop.domain import DeviceStatus
from server.ingest.heartbeats import FleetEntry
from server.registry.rollout import CanaryWatch, RolloutPolicy, watch_canary
from server.registry.store import ModelRegistry, RegistryConfig, RegistryError
from tests.fakes.clock import FakeClock
from tests.server.test_registry import INT8_ONNX, with_metadata


def advance(clock: FakeClock):
    def sleep(seconds: float) -> None:
        clock.t += seconds

    return sleep


POLICY = RolloutPolicy(healthy_for_s=60, min_devices=2, max_heartbeat_age_s=30, poll_s=10, timeout_s=600)


def entry(device: str, version: str, frames: int, at: float, *, channel="canary", error="") -> FleetEntry:
    status = DeviceStatus(
        device_id=device,
        time=at,
        model_version=version,
        outbox_depth=0,
        outbox_bytes=0,
        counters={"frames_read": frames},
        last_error=error,
        channel=channel,
    )
    return FleetEntry(status, at)


def fleet_at(now: float, frames: int, **overrides) -> dict[str, FleetEntry]:
    fleet = {
        "cam-1": entry("cam-1", "v2", frames, now),
        "cam-2": entry("cam-2", "v2", frames, now),
        "cam-stable": entry("cam-stable", "v1", frames, now, channel="stable"),  # not a canary device
    }
    fleet.update(overrides)
    return fleet


def test_confirmed_only_after_every_canary_device_is_healthy_for_the_whole_time():
    watch = CanaryWatch("v2", POLICY)
    assert watch.observe(fleet_at(0, 10), 0).state == "waiting"  # first sight starts the clock
    verdict = watch.observe(fleet_at(59, 20), 59)
    assert verdict.state == "waiting" and "healthy for 59 s" in verdict.reason
    verdict = watch.observe(fleet_at(61, 30), 61)
    assert verdict.state == "confirmed" and [d.device_id for d in verdict.devices] == ["cam-1", "cam-2"]


def test_an_error_or_a_silent_or_idle_device_restarts_its_clock():
    watch = CanaryWatch("v2", POLICY)
    watch.observe(fleet_at(0, 10), 0)
    errored = watch.observe(fleet_at(30, 20, **{"cam-2": entry("cam-2", "v2", 20, 30, error="disk full")}), 30)
    assert errored.state == "waiting" and "cam-2: reports an error: disk full" in errored.reason
    assert watch.observe(fleet_at(70, 30), 70).state == "waiting"  # cam-2's streak began at 70
    assert watch.observe(fleet_at(131, 40), 131).state == "confirmed"

    silent = CanaryWatch("v2", POLICY)
    silent.observe(fleet_at(0, 10), 0)
    late = fleet_at(100, 20, **{"cam-1": entry("cam-1", "v2", 20, 50)})  # last heartbeat 50 s ago
    assert "cam-1: silent for 50 s" in silent.observe(late, 100).reason

    idle = CanaryWatch("v2", POLICY)
    idle.observe(fleet_at(0, 10), 0)
    verdict = idle.observe(fleet_at(100, 10), 100)  # running v2 and no errors, but no frame read since
    assert verdict.state == "waiting" and "no new frames" in verdict.reason


def test_too_few_canary_devices_or_one_on_the_old_version_keeps_waiting():
    watch = CanaryWatch("v2", POLICY)
    lonely = {"cam-1": entry("cam-1", "v2", 10, 0)}
    assert "1 canary device(s) report, 2 needed" in watch.observe(lonely, 0).reason
    behind = fleet_at(0, 10, **{"cam-2": entry("cam-2", "v1", 10, 0)})
    assert "cam-2: runs v1, not v2 yet" in watch.observe(behind, 0).reason


def test_a_device_that_refuses_the_version_fails_the_canary():
    watch = CanaryWatch("v2", POLICY)
    refused = entry("cam-2", "v1", 10, 0, error="refused model v2: model does not load: bad graph")
    verdict = watch.observe(fleet_at(0, 10, **{"cam-2": refused}), 0)
    assert verdict.state == "failed" and "cam-2 refused v2" in verdict.reason
    other = entry("cam-2", "v1", 10, 0, error="refused model v21: signature check failed")
    assert CanaryWatch("v2", POLICY).observe(fleet_at(0, 10, **{"cam-2": other}), 0).state == "waiting"


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    if not INT8_ONNX.is_file():
        pytest.skip(f"{INT8_ONNX} (shared model) not found")
    reg = ModelRegistry(RegistryConfig(root=tmp_path / "registry"))
    reg.publish(INT8_ONNX)
    reg.publish(with_metadata(INT8_ONNX, tmp_path / "v2.onnx", edgeloop_test="2"), parent="v1")
    reg.promote("v1", "stable")
    reg.promote("v1", "canary")
    reg.promote("v2", "canary")
    return reg


def test_watch_promotes_to_stable_once_confirmed(registry):
    clock = FakeClock(1000.0)
    frames = iter(range(10, 10_000, 10))
    result = watch_canary(
        registry,
        "v2",
        POLICY,
        lambda: fleet_at(clock(), next(frames)),
        clock=clock,
        sleep=advance(clock),
    )
    assert result.outcome == "stable" and registry.current("stable") == "v2"
    assert clock() - 1000.0 == pytest.approx(60)  # looks every 10 s: healthy from the first, 60 s held at the 7th


def test_a_failed_canary_is_rolled_back_and_the_version_rejected(registry):
    clock = FakeClock(0.0)
    refused = entry("cam-2", "v1", 10, 0, error="refused model v2: artifact check failed")
    result = watch_canary(
        registry, "v2", POLICY, lambda: fleet_at(clock(), 10, **{"cam-2": refused}), clock=clock, sleep=advance(clock)
    )
    assert result.outcome == "rolled-back"
    assert registry.current("canary") == "v1" and registry.current("stable") == "v1"
    assert registry.get("v2").rejected.startswith("canary failed: device cam-2 refused v2")
    with pytest.raises(RegistryError, match="rejected"):
        registry.promote("v2", "stable")


def test_no_confirmation_before_the_timeout_leaves_the_version_on_canary(registry):
    clock = FakeClock(0.0)
    policy = POLICY.model_copy(update={"timeout_s": 100})
    result = watch_canary(registry, "v2", policy, lambda: {}, clock=clock, sleep=advance(clock))
    assert result.outcome == "canary" and "edgeloop models promote v2 --channel stable" in result.reason
    assert registry.current("canary") == "v2" and registry.current("stable") == "v1"

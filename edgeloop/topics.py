"""MQTT topic names, in one place for the agent, the server's bridge, the registry and the ACLs.

``prefix`` is ``edgeloop/v1`` unless configured otherwise. A device may publish only to its own
``frames`` and ``status`` topics and read its own ``acks`` and the release topics (see
``server/devices.py`` for the ACL that enforces this).
"""

from __future__ import annotations

DEFAULT_PREFIX = "edgeloop/v1"


def _p(prefix: str) -> str:
    return prefix.rstrip("/")


def frames(prefix: str, device_id: str) -> str:
    """Where a device publishes its FrameUpload messages (QoS 1)."""
    return f"{_p(prefix)}/devices/{device_id}/frames"


def status(prefix: str, device_id: str) -> str:
    """Where a device publishes its DeviceStatus heartbeats."""
    return f"{_p(prefix)}/devices/{device_id}/status"


def acks(prefix: str, device_id: str) -> str:
    """Where the server publishes FrameAck messages once a frame is stored durably."""
    return f"{_p(prefix)}/devices/{device_id}/acks"


def all_frames(prefix: str) -> str:
    """Subscription filter for every device's frames (the bridge shares it, see shared())."""
    return f"{_p(prefix)}/devices/+/frames"


def all_status(prefix: str) -> str:
    return f"{_p(prefix)}/devices/+/status"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker hands each message to one member of ``group``."""
    return f"$share/{group}/{topic_filter}"


def channel_release(prefix: str, channel: str) -> str:
    """Retained ModelRelease message announcing a channel's current release."""
    return f"{_p(prefix)}/releases/channels/{channel}"


def group_release(prefix: str, group: str, channel: str) -> str:
    """Retained ModelRelease targeted at one device group on one channel; wins over the channel's own."""
    return f"{_p(prefix)}/releases/groups/{group}/{channel}"


def device_release(prefix: str, device_id: str) -> str:
    """Retained ModelRelease for one device (a pin or a device-targeted release); wins over its channel's."""
    return f"{_p(prefix)}/releases/devices/{device_id}"


def device_from_topic(prefix: str, topic: str) -> str | None:
    """The device id in ``{prefix}/devices/{id}/...``, or None for any other topic."""
    head = f"{_p(prefix)}/devices/"
    if not topic.startswith(head):
        return None
    device_id, _, _rest = topic[len(head) :].partition("/")
    return device_id or None

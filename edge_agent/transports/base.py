"""The transport seam: gRPC and MQTT look the same to the agent.

A transport takes already-serialized ``edgeloop.v1.FrameUpload`` payloads straight from the
outbox (so what leaves the device is byte-identical to what was stored) and returns the
receiver's acknowledgements. Only an acknowledgement from the receiver itself counts: an MQTT
broker's PUBACK means the broker holds the message, not that it is stored for good.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar

from edgeloop.config_base import StrictModel
from edgeloop.domain import Ack
from edgeloop.tls import TLSConfig  # noqa: F401 - re-exported: transports' configs use it
from edgeloop.v1 import frames_pb2


class TransportError(Exception):
    """The receiver could not be reached or the exchange broke off; the frames stay in the outbox.

    ``permanent`` is True when the receiver refused the bytes themselves (a frame it cannot parse
    or too large for it): sending the same batch again would fail the same way, so the uploader
    narrows the batch down to the offending frame and sets it aside instead of retrying forever.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Transport(abc.ABC):
    """Sends frames and heartbeats to the receiver."""

    key: ClassVar[str]

    @abc.abstractmethod
    def send(self, payloads: Sequence[tuple[str, bytes]]) -> list[Ack]:
        """Send ``(frame_id, serialized FrameUpload)`` pairs; return the acks that came back in time.

        Frames without an ack in the returned list are simply still pending: the caller keeps
        them and sends them again later (receivers are idempotent by frame id).

        Raises:
            TransportError: the receiver is unreachable or the exchange failed part-way.
        """

    def heartbeat(self, status: frames_pb2.DeviceStatus) -> None:  # noqa: B027 - optional
        """Report the device's status; best effort (a failure raises TransportError)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Close connections."""


_REGISTRY: dict[str, tuple[type[StrictModel], Callable[..., Transport]]] = {}


def register(key: str, config_cls: type[StrictModel], factory: Callable[..., Transport]) -> None:
    """Register a transport under ``key`` (the value of its config's ``type`` field)."""
    _REGISTRY[key] = (config_cls, factory)


def create_transport(config: StrictModel, device_id: str) -> Transport:
    key = getattr(config, "type", None)
    if key not in _REGISTRY:
        raise TransportError(f"unknown transport type {key!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[key][1](config, device_id)

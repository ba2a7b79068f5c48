"""The detector seam: one small interface, backends registered by key, chosen by config.

A backend module declares a pydantic config with ``type: Literal["<key>"]`` and a
:class:`Detector` subclass, and registers both with :func:`register`. Heavy imports
(onnxruntime, tensorrt, ultralytics) happen inside the backend's constructor, never at module
import, so the agent starts fast and a device without TensorRT can still import the package.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgeloop.config_base import StrictModel
from edgeloop.domain import Detection

if TYPE_CHECKING:
    from edgeloop.embedding import ReferenceStats

logger = logging.getLogger(__name__)


class DetectorError(Exception):
    """A model could not be loaded or run (missing file, wrong format, runtime not installed)."""


@dataclass(frozen=True, slots=True)
class DetectorOutput:
    """Everything a detector says about one frame.

    Attributes:
        detections: What the model detected (confidence above its threshold), best first.
        weak: Candidates below the detection threshold, not overlapping a detection: what the model
            half-saw (empty when the backend cannot tell).
        embedding: The frame's image embedding as the model outputs it, when it exports one
            (see :mod:`edgeloop.embedding`).
    """

    detections: list[Detection]
    weak: list[Detection] = field(default_factory=list)
    embedding: np.ndarray | None = None


class Detector(abc.ABC):
    """A loaded model that turns BGR frames into detections.

    Attributes:
        class_names: Class names indexed by class id.
        model_version: A version string for the loaded model (from metadata, else the file's sha256 prefix).
        reference: The training images' embedding statistics that travel in the model file, if any.
    """

    key: ClassVar[str]
    class_names: list[str]
    model_version: str
    reference: ReferenceStats | None = None

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detect objects in one BGR ``uint8`` image of any size; boxes in that image's pixels."""

    def detect_all(self, image: np.ndarray) -> DetectorOutput:
        """Detections plus what the backend can add: weak candidates and the image embedding."""
        return DetectorOutput(self.detect(image))

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need nothing
        """Release the runtime's resources."""

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[str, tuple[type[StrictModel], Callable[[StrictModel], Detector]]] = {}


def register(key: str, config_cls: type[StrictModel], factory: Callable[[StrictModel], Detector]) -> None:
    """Register a backend under ``key`` (the value of its config's ``type`` field)."""
    _REGISTRY[key] = (config_cls, factory)


def create_detector(config: StrictModel) -> Detector:
    """Build the backend that ``config.type`` names.

    Raises:
        DetectorError: unknown type, or the backend failed to load.
    """
    key = getattr(config, "type", None)
    if key not in _REGISTRY:
        raise DetectorError(f"unknown detector type {key!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[key][1](config)

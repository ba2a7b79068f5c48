"""Detector backends of the edge agent, chosen by the ``type`` of the ``detector`` config section.

Importing this package registers every backend; none imports its runtime (onnxruntime, tensorrt,
ultralytics, torch) until a detector of that type is created, so a device without TensorRT or
torch imports it fine and fails only, with a clear :class:`DetectorError`, when configured for one.

``DetectorConfig`` validates any backend's config by its ``type``::

    detector:
      type: onnxruntime            # or tensorrt, ultralytics
      model: /var/lib/edgeloop/models/current.onnx
      intra_op_threads: 2
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from edge_agent.detectors.base import Detector, DetectorError, create_detector, register
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetectorConfig
from edge_agent.detectors.tensorrt import TensorRTDetectorConfig
from edge_agent.detectors.ultralytics import UltralyticsDetectorConfig

DetectorConfig = Annotated[
    OnnxRuntimeDetectorConfig | TensorRTDetectorConfig | UltralyticsDetectorConfig,
    Field(discriminator="type"),
]

__all__ = [
    "Detector",
    "DetectorConfig",
    "DetectorError",
    "OnnxRuntimeDetectorConfig",
    "TensorRTDetectorConfig",
    "UltralyticsDetectorConfig",
    "create_detector",
    "register",
]

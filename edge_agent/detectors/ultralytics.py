"""ultralytics backend: any model that ``ultralytics.YOLO`` loads (.pt, .onnx, .engine...), via ``predict``.

For development machines and servers that already have the ``train`` extra: no export step, the
checkpoint a training run just wrote can be tried at once. Devices use the ONNX Runtime or TensorRT
backends, which are smaller to install, faster, and expose the full class-score vector; ultralytics'
``Results`` keep only the top class's confidence, so detections here carry ``class_scores=None``
and score-vector triggers (margin, entropy) see nothing from this backend.

ultralytics reaches out on its own (DNS probes, pip installs, settings under ``~/.config``): the
backend puts :func:`edgeloop.offline.offline_environment` in force before it imports ultralytics,
with its settings in ``state_dir``. ultralytics reads them once, at import: a process that imported
it before with other settings keeps those.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.detectors import yolo
from edge_agent.detectors.base import Detector, DetectorError, register
from edgeloop.domain import Detection
from edgeloop.offline import offline_environment

logger = logging.getLogger(__name__)

KEY = "ultralytics"


class UltralyticsDetectorConfig(yolo.YoloThresholds):
    """Run a model through ``ultralytics.YOLO(...).predict``."""

    type: Literal["ultralytics"] = Field(KEY, description="Selects this backend.")
    model: Path = Field(description="Path to a detect model ultralytics can load (.pt, .onnx, .engine...).")
    device: str = Field("cpu", description="Torch device for predict: 'cpu', 'cuda:0', '0', 'mps'.")
    imgsz: int | None = Field(
        None, ge=32, description="Inference size in pixels; None uses the model's own (640 for exports)."
    )
    state_dir: Path | None = Field(
        None,
        description="Where ultralytics keeps its settings and font (never ~/.config); None: a folder in the "
        "system's temporary directory.",
    )


class UltralyticsDetector(Detector):
    """A model loaded with ``ultralytics.YOLO``; detections without class-score vectors."""

    key = KEY

    def __init__(self, config: UltralyticsDetectorConfig) -> None:
        self.config = config
        path = config.model
        if not path.is_file():
            raise DetectorError(f"model {path} does not exist (or is not a file)")
        state = config.state_dir or Path(tempfile.gettempdir()) / f"edgeloop-ultralytics-{os.getuid()}"
        for key, value in offline_environment(state).items():
            os.environ.setdefault(key, value)  # an operator's own setting wins
        try:
            from ultralytics import YOLO
        except ImportError as err:
            raise DetectorError("ultralytics is not installed: pip install 'edgeloop[train]'") from err
        try:
            self._model = YOLO(str(path), task="detect")
        # ultralytics passes on whatever its loaders raise (TypeError for a corrupt .pt, ORT's errors...).
        except Exception as err:
            raise DetectorError(f"ultralytics cannot load {path}: {err}") from err
        if self._model.task != "detect":
            raise DetectorError(f"{path} is a {self._model.task!r} model; only 'detect' models are supported")
        names = self._model.names
        self.class_names = [str(names[i]) for i in range(len(names))]
        self.model_version = yolo.model_version(yolo.file_sha256(path))
        logger.info("loaded %s with ultralytics (%s, %d classes)", path, self.model_version, len(names))

    def detect(self, image: np.ndarray) -> list[Detection]:
        kwargs = {"imgsz": self.config.imgsz} if self.config.imgsz else {}
        result = self._model.predict(
            image,
            conf=self.config.conf_threshold,
            iou=self.config.iou_threshold,
            max_det=self.config.max_detections,
            device=self.config.device,
            verbose=False,
            **kwargs,
        )[0]
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy()
        conf = boxes.conf.cpu().numpy()
        cls = boxes.cls.cpu().numpy().astype(int)
        return [
            Detection(
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                class_id=int(c),
                class_name=self.class_names[c] if c < len(self.class_names) else f"class{c}",
                confidence=float(s),
                class_scores=None,
            )
            for b, s, c in zip(xyxy, conf, cls, strict=True)
        ]

    def close(self) -> None:
        self._model = None


def _create(config: UltralyticsDetectorConfig) -> UltralyticsDetector:
    return UltralyticsDetector(config)


register(KEY, UltralyticsDetectorConfig, _create)

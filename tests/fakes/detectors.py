"""A scripted detector for tests where the model is not the point (budget, eviction, dedup)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_agent.detectors.base import Detector
from edgeloop.domain import Detection


class ScriptedDetector(Detector):
    """Returns ``script(call_index, image)``; by default one box whose confidence cycles through the band."""

    key = "scripted"

    def __init__(self, script: Callable[[int, np.ndarray], list[Detection]] | None = None) -> None:
        self.class_names = ["circle", "square", "triangle"]
        self.model_version = "scripted-1"
        self.calls = 0
        self._script = script or self.default_script

    @staticmethod
    def default_script(i: int, image: np.ndarray) -> list[Detection]:
        conf = 0.26 + 0.03 * (i % 10)  # always inside the default confidence band [0.25, 0.6)
        return [Detection((10.0, 10.0, 60.0, 60.0), 0, "circle", conf, np.array([conf, 0.1, 0.05], np.float32))]

    def detect(self, image: np.ndarray) -> list[Detection]:
        out = self._script(self.calls, image)
        self.calls += 1
        return out

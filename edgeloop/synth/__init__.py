"""Synthetic scenes of simple shapes with exact YOLO labels: a product feature and the project's test data.

``render_scene`` / ``iter_scenes`` give still images, ``iter_video_frames`` a temporally coherent
camera stream, ``write_dataset`` a YOLO / ultralytics data set on disk; ``get_scenario`` names the
baseline world and its domain shifts (night, blur, shifted, crowded). Needs only numpy, OpenCV,
pydantic and PyYAML, so it runs on edge devices too.
"""

from edgeloop.synth.scenarios import SCENARIOS, UnknownScenarioError, get_scenario, scenario_names
from edgeloop.synth.scenes import (
    Scene,
    SceneParams,
    SynthError,
    YoloLabel,
    format_labels,
    iter_scenes,
    iter_video_frames,
    render_scene,
    write_dataset,
    write_video,
)

__all__ = [
    "SCENARIOS",
    "Scene",
    "SceneParams",
    "SynthError",
    "UnknownScenarioError",
    "YoloLabel",
    "format_labels",
    "get_scenario",
    "iter_scenes",
    "iter_video_frames",
    "render_scene",
    "scenario_names",
    "write_dataset",
    "write_video",
]

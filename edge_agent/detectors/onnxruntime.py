"""ONNX Runtime backend: runs an ultralytics YOLO detect export (``.onnx``) on CPU or any ORT provider.

The default backend of the edge agent: ``onnxruntime`` is a small install on every platform. The
steps are exposed separately (:meth:`OnnxRuntimeDetector.preprocess`, :meth:`~OnnxRuntimeDetector.infer`,
:meth:`~OnnxRuntimeDetector.postprocess`) so a benchmark can time ``session.run`` alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.detectors import yolo
from edge_agent.detectors.base import DetectorError, register
from edgeloop.embedding import EMBEDDING_OUTPUT

logger = logging.getLogger(__name__)

KEY = "onnxruntime"


class OnnxRuntimeDetectorConfig(yolo.YoloThresholds):
    """Run an ONNX detect export with ONNX Runtime."""

    type: Literal["onnxruntime"] = Field(KEY, description="Selects this backend.")
    model: Path = Field(description="Path to an ultralytics YOLO detect export (.onnx, exported with nms=False).")
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="Threads ORT uses inside one operator; None lets ORT choose (all physical cores). "
        "Set it on shared devices so inference leaves cores for capture and upload.",
    )
    allow_spinning: bool = Field(
        False,
        description="Let ORT's worker threads busy-wait between operators. Off by default: on a small device "
        "the spinning threads steal the cores that frame reading, scoring and encoding run on.",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ORT execution providers in order of preference, e.g. ['CUDAExecutionProvider', "
        "'CPUExecutionProvider']. Ones this ORT build lacks are skipped with a warning.",
    )


class OnnxRuntimeDetector(yolo.YoloExportDetector):
    """A YOLO detect export loaded in an ``onnxruntime.InferenceSession``.

    Attributes:
        input_size: ``(height, width)`` of the model input.
        providers: The execution providers the session actually uses.
    """

    key = KEY

    def __init__(self, config: OnnxRuntimeDetectorConfig) -> None:
        self.config = config
        path = config.model
        if not path.is_file():
            raise DetectorError(f"ONNX model {path} does not exist (or is not a file)")
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise DetectorError(
                "onnxruntime is not installed: pip install 'edgeloop[edge]' (or onnxruntime-gpu)"
            ) from err

        available = ort.get_available_providers()
        providers = [p for p in config.providers if p in available]
        if missing := [p for p in config.providers if p not in available]:
            logger.warning("ONNX Runtime here lacks %s (available: %s)", missing, available)
        if not providers:
            raise DetectorError(f"none of the providers {config.providers} is available; this ORT has {available}")

        options = ort.SessionOptions()
        if config.intra_op_threads is not None:
            options.intra_op_num_threads = config.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        # ORT's pybind errors (InvalidProtobuf, Fail, InvalidGraph...) share no base class but Exception.
        except Exception as err:
            raise DetectorError(f"{path} is not a loadable ONNX model: {err}") from err

        metadata = self._session.get_modelmeta().custom_metadata_map
        self._metadata = yolo.parse_ultralytics_metadata(metadata)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise DetectorError(f"{path} has {len(inputs)} inputs; a YOLO detect export has exactly one image input")
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        # An edgeloop release adds the image embedding as a named output (edgeloop.embedding).
        embedding = next((o for o in outputs[1:] if o.name == EMBEDDING_OUTPUT), None)
        self._outputs = [self._output_name] + ([EMBEDDING_OUTPUT] if embedding is not None else [])
        embedding_dim = embedding.shape[-1] if embedding is not None and isinstance(embedding.shape[-1], int) else None
        self.reference = yolo.read_reference(metadata, embedding_dim, str(path)) if embedding is not None else None
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.input_size = self._input_size(inputs[0].shape, path)
        try:
            num_classes = yolo.check_output_shape(tuple(outputs[0].shape), self._metadata, str(path))
        except ValueError as err:
            raise DetectorError(str(err)) from err
        self.class_names = yolo.class_names_for(self._metadata, num_classes)
        self.model_version = yolo.model_version(yolo.file_sha256(path), self._metadata)
        self.providers = self._session.get_providers()
        logger.info(
            "loaded %s (%s, %d classes, input %dx%d, embedding %s, reference %s) on %s",
            path,
            self.model_version,
            num_classes,
            self.input_size[1],
            self.input_size[0],
            embedding_dim or "none",
            f"of {len(self.reference.vectors)} images" if self.reference else "none",
            self.providers,
        )

    def _input_size(self, shape: list[int | str | None], path: Path) -> tuple[int, int]:
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise DetectorError(f"{path} has input shape {shape}; expected (1, 3, height, width)")
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int):
            return h, w
        # Dynamic axes: the export's own imgsz is what it was trained and exported for.
        size = self._metadata.imgsz or yolo.DEFAULT_IMGSZ
        logger.info("%s has a dynamic input shape; using imgsz %s", path, size)
        return size

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Run the session on a prepared tensor; returns the raw ``(1, 4 + nc, N)`` output."""
        return self._session.run([self._output_name], {self._input_name: tensor})[0]

    def infer_all(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        results = self._session.run(self._outputs, {self._input_name: tensor})
        return results[0], (results[1] if len(results) > 1 else None)

    def close(self) -> None:
        # ORT frees the session's arenas when the last reference goes.
        self._session = None  # type: ignore[assignment]


def _create(config: OnnxRuntimeDetectorConfig) -> OnnxRuntimeDetector:
    return OnnxRuntimeDetector(config)


register(KEY, OnnxRuntimeDetectorConfig, _create)

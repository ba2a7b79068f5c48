"""int8 models for CPU devices: ONNX Runtime static quantization calibrated on training images.

:func:`quantize_int8` turns a float ultralytics export into a QDQ int8 model: weights per channel,
activations with ranges measured on up to :data:`MAX_CALIBRATION_IMAGES` training images fed
through the edge agent's own preprocessing (letterbox, RGB, 0..1), so calibration sees exactly
what a device feeds the model.

The detection head's decoding stays in float. Its last nodes turn the conv outputs into box
coordinates in input pixels (0..imgsz) and class probabilities (0..1) and concatenate them into
one tensor: one int8 scale for both would round every class score to 0 or to a few pixels, so the
nodes of the last layer that are not convolutions are excluded from quantization (the convs
themselves, where the time goes, are quantized).

The ultralytics metadata (class names, imgsz, stride) is copied over, so the registry and the
agent read the int8 model as they read the float one; run
:func:`server.registry.prepare.prepare_model` on the result to give it the embedding output (its
reference statistics are then those of the int8 model that ships).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Calibration images used at most (evenly spread over the ones given): more adds time, not accuracy.
MAX_CALIBRATION_IMAGES = 200
_LAYER = re.compile(r"^/model\.(\d+)/")


class QuantizationError(Exception):
    """The model cannot be quantized (unreadable, no calibration images, ONNX Runtime failed)."""


def head_decode_nodes(model: Any) -> list[str]:
    """Names of the nodes of the last ``/model.N/`` layer that are not convolutions: the head's decoding."""
    layers = [int(m.group(1)) for node in model.graph.node if (m := _LAYER.match(node.name))]
    if not layers:
        raise QuantizationError("the graph has no '/model.N/' node names: is it an ultralytics export?")
    head = f"/model.{max(layers)}/"
    return [n.name for n in model.graph.node if n.name.startswith(head) and n.op_type != "Conv"]


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over image files (duck-typed: get_next / rewind)."""

    def __init__(self, input_name: str, size: tuple[int, int], images: Sequence[Path]) -> None:
        self.input_name, self.size, self.images = input_name, size, list(images)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        import cv2

        from edge_agent.detectors.yolo import preprocess

        while self._next < len(self.images):
            path = self.images[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                logger.warning("skipping unreadable calibration image %s", path)
                continue
            tensor, _ = preprocess(image, self.size)
            return {self.input_name: tensor}
        return None

    def rewind(self) -> None:
        self._next = 0


def calibration_images(folders: Sequence[Path], limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``limit`` images from ``folders`` (recursively), evenly spread and in a stable order."""
    from flows.training.evaluate import IMAGE_SUFFIXES

    paths: list[Path] = []
    for folder in folders:
        paths += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) > limit:
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths


def quantize_int8(float_onnx: Path, out: Path, images: Sequence[Path]) -> Path:
    """Write a static int8 (QDQ) quantization of ``float_onnx`` to ``out``, calibrated on ``images``.

    Args:
        float_onnx: A float ultralytics detect export.
        out: Where the int8 model goes.
        images: Calibration images (files; see :func:`calibration_images`).

    Raises:
        QuantizationError: no images, an unreadable model, or ONNX Runtime failed.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise QuantizationError("int8 export needs onnx and onnxruntime: pip install 'edgeloop[train]'") from err
    if not images:
        raise QuantizationError("int8 quantization needs calibration images; none given")
    try:
        model = onnx.load(str(float_onnx))
    except Exception as err:  # onnx raises DecodeError, OSError...
        raise QuantizationError(f"{float_onnx} is not a readable ONNX model: {err}") from err
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise QuantizationError(f"{float_onnx} has {len(inputs)} inputs; a YOLO export has one image input")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] <= 0 or dims[3] <= 0:
        raise QuantizationError(f"{float_onnx} has input shape {dims}; int8 calibration needs a fixed (1, 3, H, W)")
    exclude = head_decode_nodes(model)
    metadata = {p.key: p.value for p in model.metadata_props}

    with tempfile.TemporaryDirectory(prefix="edgeloop-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        qdq = Path(tmp) / "int8.onnx"
        try:
            # Shape inference and graph clean-up first, as ONNX Runtime recommends for static quantization.
            quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(qdq),
                _Calibration(inputs[0].name, (dims[2], dims[3]), images),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=exclude,
            )
            quantized = onnx.load(str(qdq))
        except Exception as err:  # ORT's quantization tools raise anything from ValueError to RuntimeError
            raise QuantizationError(f"int8 quantization of {float_onnx} failed: {err}") from err
        del quantized.metadata_props[:]
        for key, value in metadata.items():
            entry = quantized.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(quantized, str(qdq))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(qdq), out)
    logger.info("wrote int8 %s from %s (%d calibration images)", out, float_onnx, len(images))
    return out


__all__ = ["MAX_CALIBRATION_IMAGES", "QuantizationError", "calibration_images", "quantize_int8"]

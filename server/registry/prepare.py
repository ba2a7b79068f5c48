"""Prepare an ultralytics ONNX export for the fleet: add the image-embedding output and attach the
reference statistics of the images it was trained on.

Both changes live inside the model file, so the release's sha256 and signature cover them and a
device needs nothing else to use them (see :mod:`edgeloop.embedding`):

* :func:`add_embedding_output` adds an output named ``embedding``: each input feature map of the
  detection head (the last ``/model.N/`` layer of an ultralytics export), average-pooled over
  space and L2-normalised, then concatenated. For a dynamically quantized export the head reads
  quantized tensors; the pooling then reads the float tensor before the quantization.
* :func:`attach_reference` runs the model on reference images (its training images) through the
  edge agent's own detector code and stores a sample of their embeddings with their
  nearest-neighbour distance quantiles as ONNX metadata.

``onnx`` is imported lazily (the ``server`` and ``train`` extras have it; devices never run this).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.embedding import EMBEDDING_OUTPUT, MAX_REFERENCE_VECTORS, REFERENCE_METADATA_KEY, ReferenceStats

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^/model\.(\d+)/")
#: Ops whose output is a quantized copy of their first input: pool the float input instead.
_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})
#: At most this many reference images are run through the model (more adds time, not information).
MAX_REFERENCE_IMAGES = 1000


class PrepareError(ValueError):
    """The model cannot be prepared (not an ultralytics detect export, no images, unreadable file)."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise PrepareError("preparing a model needs the onnx package: pip install 'edgeloop[server]'") from err
    return onnx


def _layer(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def head_inputs(model: Any) -> list[str]:
    """Names of the float feature maps the detection head reads, in the order it first reads them.

    Raises:
        PrepareError: the graph does not have ultralytics' ``/model.N/`` node names.
    """
    graph = model.graph
    layers = [n for n in (_layer(node.name) for node in graph.node) if n is not None]
    if not layers:
        raise PrepareError("the graph has no '/model.N/' node names: is it an ultralytics export?")
    head = max(layers)
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    for node in graph.node:
        if _layer(node.name) != head:
            continue
        for name in node.input:
            src = producer.get(name)
            src_layer = None if src is None else _layer(src.name)
            if src is None or src_layer is None or src_layer >= head:
                continue  # a weight, a folded constant, or the head's own intermediate
            if src.op_type in _QUANTIZERS:
                name = src.input[0]
            if name not in found:
                found.append(name)
    if not found:
        raise PrepareError(f"found no inputs of the detection head (layer {head})")
    return found


def add_embedding_output(model: Any) -> Any:
    """Return ``model`` with an ``embedding`` output added (unchanged when it already has one)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    if any(o.name == EMBEDDING_OUTPUT for o in model.graph.output):
        return model
    features = head_inputs(model)
    nodes, pooled = [], []
    for i, name in enumerate(features):
        gap, flat, norm = f"/edgeloop/embed/gap{i}", f"/edgeloop/embed/flat{i}", f"/edgeloop/embed/norm{i}"
        nodes += [
            helper.make_node("GlobalAveragePool", [name], [gap], name=gap),
            helper.make_node("Flatten", [gap], [flat], name=flat, axis=1),
            # Each scale normalised on its own, so the 256-channel P5 does not drown the 64-channel P3.
            helper.make_node("LpNormalization", [flat], [norm], name=norm, axis=1, p=2),
        ]
        pooled.append(norm)
    nodes.append(helper.make_node("Concat", pooled, [EMBEDDING_OUTPUT], name="/edgeloop/embed/concat", axis=1))
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, None))
    inferred = onnx.shape_inference.infer_shapes(model)
    shape = next(o for o in inferred.graph.output if o.name == EMBEDDING_OUTPUT).type.tensor_type.shape
    dims = [d.dim_value for d in shape.dim]
    if len(dims) == 2 and dims[1] > 0:
        out = next(o for o in model.graph.output if o.name == EMBEDDING_OUTPUT)
        out.CopyFrom(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, [dims[0] or 1, dims[1]]))
    onnx.checker.check_model(model)
    return model


def set_metadata(model: Any, key: str, value: str) -> None:
    """Set (or replace) one ``metadata_props`` entry."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def _image_paths(images: Iterable[Path]) -> list[Path]:
    from edge_agent.sources import IMAGE_SUFFIXES, list_images

    paths: list[Path] = []
    for item in images:
        if item.is_dir():
            paths += list_images(item)
        elif item.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(item)
    return paths


def reference_embeddings(model_path: Path, images: Sequence[Path], *, limit: int = MAX_REFERENCE_IMAGES) -> np.ndarray:
    """Embeddings of ``images`` (files or folders) as the edge agent's ONNX Runtime detector computes them.

    Raises:
        PrepareError: the model has no embedding output, or no image could be read.
    """
    import cv2

    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig

    paths = _image_paths(images)
    if len(paths) > limit:
        step = len(paths) / limit  # evenly spread, deterministic
        paths = [paths[int(i * step)] for i in range(limit)]
    detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=model_path))
    rows = []
    try:
        for path in paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                logger.warning("skipping unreadable reference image %s", path)
                continue
            embedding = detector.detect_all(image).embedding
            if embedding is None:
                raise PrepareError(f"{model_path} has no '{EMBEDDING_OUTPUT}' output: add it first")
            rows.append(embedding)
    finally:
        detector.close()
    if not rows:
        raise PrepareError(f"no readable reference images among {len(paths)} files")
    return np.stack(rows)


def attach_reference(
    model_path: Path, images: Sequence[Path], out: Path, *, max_vectors: int = MAX_REFERENCE_VECTORS
) -> ReferenceStats:
    """Compute reference statistics from ``images`` and write ``model_path`` with them to ``out``."""
    onnx = _onnx()
    embeddings = reference_embeddings(model_path, images)
    source = f"{len(embeddings)} images of {', '.join(str(p) for p in images)}"
    stats = ReferenceStats.from_embeddings(embeddings, source=source, max_vectors=max_vectors)
    model = onnx.load(str(model_path))
    set_metadata(model, REFERENCE_METADATA_KEY, stats.to_json())
    _save(onnx, model, out)
    return stats


def _save(onnx: Any, model: Any, out: Path) -> None:
    from edgeloop.durable import write_atomic

    write_atomic(out, model.SerializeToString())


def prepare_model(model_path: Path, out: Path, reference_images: Sequence[Path] = ()) -> ReferenceStats | None:
    """Add the embedding output to ``model_path`` and, given reference images, their statistics; write ``out``.

    Raises:
        PrepareError: see :func:`head_inputs` and :func:`reference_embeddings`.
    """
    onnx = _onnx()
    try:
        model = onnx.load(str(model_path))
    except Exception as err:  # onnx raises DecodeError, OSError...: all mean "not a model we can read"
        raise PrepareError(f"{model_path} is not a readable ONNX model: {err}") from err
    _save(onnx, add_embedding_output(model), out)
    if not reference_images:
        return None
    return attach_reference(out, reference_images, out)

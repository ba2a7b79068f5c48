"""TensorRT backend: builds an engine from the published ONNX export, caches it, runs it on the GPU.

The server publishes ``.onnx`` only: a TensorRT engine is specific to the GPU, its compute
capability and the TensorRT version, so each device builds its own on first use (minutes on a
Jetson) and caches it under a name keyed by all of these plus the ONNX's sha256 and the precision
(:func:`engine_cache_key`). A model swap, a JetPack upgrade or a different GPU therefore builds a
fresh engine instead of loading a stale or incompatible one.

Needs TensorRT >= 8.6 (the name-based tensor API: ``set_tensor_address`` / ``execute_async_v3``)
and device memory from cuda-python (``cuda.bindings`` or the older ``cuda.cudart``), or else from
torch's CUDA allocator. Pre- and post-processing are :mod:`edge_agent.detectors.yolo`'s, so results
match the ONNX Runtime backend up to the GPU's arithmetic (fp16 moves scores in the third decimal).

Engines are built for dynamically quantized ONNX (``ConvInteger``) only after re-export: TensorRT
parses float or Q/DQ models, not ORT's dynamic int8 operators.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.detectors import yolo
from edge_agent.detectors.base import DetectorError, register
from edgeloop.durable import write_atomic
from edgeloop.embedding import EMBEDDING_OUTPUT

logger = logging.getLogger(__name__)

KEY = "tensorrt"

TENSORRT_MISSING = (
    "TensorRT is not installed: on Jetson use JetPack's python3-libnvinfer, on x86 an NVIDIA container "
    "(nvcr.io/nvidia/tensorrt) or NVIDIA's pip index; or use type: onnxruntime"
)


class TensorRTDetectorConfig(yolo.YoloThresholds):
    """Run an ONNX detect export through a TensorRT engine built and cached on this device."""

    type: Literal["tensorrt"] = Field(KEY, description="Selects this backend.")
    model: Path = Field(description="Path to the published ultralytics YOLO detect export (.onnx, float weights).")
    fp16: bool = Field(
        True,
        description="Let TensorRT use fp16 kernels (about 2x faster on Jetson; scores shift ~1e-3).",
    )
    workspace_mb: int = Field(
        1024, ge=16, description="Scratch memory TensorRT may use while building and running, in MiB."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where built engines are kept; None means a 'trt_engines' folder beside the model.",
    )


def engine_cache_key(
    onnx_sha256: str, gpu_name: str, compute_capability: tuple[int, int], trt_version: str, fp16: bool
) -> str:
    """File name of the engine built from one ONNX file for one GPU, TensorRT version and precision.

    An engine is only valid for the exact combination it was built for, so every input goes into the
    name; the name stays readable so an operator can tell cached engines apart.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    major, minor = compute_capability
    precision = "fp16" if fp16 else "fp32"
    return f"{onnx_sha256[:16]}-{gpu}-sm{major}{minor}-trt{version}-{precision}.engine"


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    # A half-installed TensorRT (PyPI's placeholder wheel, missing libnvinfer) fails with OSError.
    except (ImportError, OSError) as err:
        raise DetectorError(f"{TENSORRT_MISSING} ({err})") from err
    if not hasattr(trt.IExecutionContext, "execute_async_v3"):
        raise DetectorError(f"TensorRT {trt.__version__} is too old: this backend needs >= 8.6")
    return trt


class _CudaPython:
    """Device buffers and a stream through cuda-python's runtime bindings (no torch on the device)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self._rt = cudart
        if self._check(cudart.cudaGetDeviceCount()) < 1:
            raise DetectorError("no CUDA device found")
        self._device = self._check(cudart.cudaGetDevice())
        self._stream = self._check(cudart.cudaStreamCreate())
        self._allocations: list[int] = []

    def _check(self, result: tuple) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise DetectorError(f"CUDA call failed: {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else tuple(values)

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def device(self) -> tuple[str, tuple[int, int]]:
        props = self._check(self._rt.cudaGetDeviceProperties(self._device))
        name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return name, (int(props.major), int(props.minor))

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._check(self._rt.cudaMalloc(nbytes)))
        self._allocations.append(ptr)
        return ptr

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self._stream))

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self._stream))

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        for ptr in self._allocations:
            self._rt.cudaFree(ptr)
        self._allocations.clear()
        self._rt.cudaStreamDestroy(self._stream)


class _TorchCuda:
    """The same operations through torch's CUDA allocator, for boxes that have torch but not cuda-python."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise DetectorError("no CUDA device visible to torch")
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        self._buffers: dict[int, Any] = {}

    @property
    def stream_handle(self) -> int:
        return int(self._stream.cuda_stream)

    def device(self) -> tuple[str, tuple[int, int]]:
        props = self._torch.cuda.get_device_properties(self._device)
        return str(props.name), (int(props.major), int(props.minor))

    def alloc(self, nbytes: int) -> int:
        buf = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
        self._buffers[buf.data_ptr()] = buf
        return buf.data_ptr()

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        with self._torch.cuda.stream(self._stream):
            self._buffers[ptr].copy_(self._torch.from_numpy(array.reshape(-1).view(np.uint8)))

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        with self._torch.cuda.stream(self._stream):
            host = self._buffers[ptr].cpu()  # blocking: waits for the work queued on this stream
        np.copyto(array.reshape(-1).view(np.uint8), host.numpy())

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self._buffers.clear()


def _open_cuda() -> _CudaPython | _TorchCuda:
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _TorchCuda()
    except ImportError as err:
        raise DetectorError(
            "TensorRT needs cuda-python (pip install cuda-python) or torch with CUDA for device memory"
        ) from err


class TensorRTDetector(yolo.YoloExportDetector):
    """A TensorRT engine for a YOLO detect export, built on first use and cached.

    Attributes:
        engine_path: The cached engine file this detector runs.
        input_size: ``(height, width)`` of the model input.
    """

    key = KEY

    def __init__(self, config: TensorRTDetectorConfig) -> None:
        self.config = config
        trt = _import_tensorrt()
        path = config.model
        if not path.is_file():
            raise DetectorError(f"ONNX model {path} does not exist (or is not a file)")
        try:
            self._raw_metadata = yolo.read_onnx_metadata(path)
            self._metadata = yolo.parse_ultralytics_metadata(self._raw_metadata)
        except ValueError as err:
            raise DetectorError(f"{path} is not an ONNX model: {err}") from err
        sha256 = yolo.file_sha256(path)
        self.model_version = yolo.model_version(sha256, self._metadata)

        self._cuda = _open_cuda()
        try:
            gpu_name, capability = self._cuda.device()
            cache_dir = config.cache_dir or path.parent / "trt_engines"
            self.engine_path = cache_dir / engine_cache_key(sha256, gpu_name, capability, trt.__version__, config.fp16)
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._trt_logger)  # must outlive the engine
            self._engine = self._load_or_build(trt)
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise DetectorError("TensorRT could not create an execution context (out of GPU memory?)")
            self._bind(trt)
        except BaseException:
            self._cuda.close()
            raise
        logger.info(
            "TensorRT %s engine %s ready on %s (%d classes, input %dx%d)",
            trt.__version__,
            self.engine_path.name,
            gpu_name,
            len(self.class_names),
            self.input_size[1],
            self.input_size[0],
        )

    def _load_or_build(self, trt: Any) -> Any:
        if self.engine_path.is_file():
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is not None:
                logger.info("loaded cached TensorRT engine %s", self.engine_path)
                return engine
            logger.warning("cached engine %s does not deserialize; rebuilding it", self.engine_path)
        start = time.monotonic()
        logger.info(
            "building a TensorRT engine for %s (fp16=%s); minutes on a Jetson",
            self.config.model,
            self.config.fp16,
        )
        blob = self._build(trt)
        logger.info("built %s in %.0f s", self.engine_path.name, time.monotonic() - start)
        try:
            write_atomic(self.engine_path, blob)
        except OSError as err:
            # Serving beats caching: run the engine from memory and rebuild next start.
            logger.warning("cannot cache the engine at %s (%s); it will be rebuilt next time", self.engine_path, err)
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise DetectorError(f"TensorRT could not load the engine it just built for {self.config.model}")
        return engine

    def _build(self, trt: Any) -> bytes:
        builder = trt.Builder(self._trt_logger)
        # TensorRT 10 networks are always explicit-batch (the flag is gone); 8.x must ask for it.
        flags = 0
        if int(trt.__version__.split(".", 1)[0]) < 10:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._trt_logger)
        if not parser.parse_from_file(str(self.config.model)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise DetectorError(
                f"TensorRT cannot parse {self.config.model}: {errors or 'no details'}. Dynamically quantized "
                "(ConvInteger) exports are not supported: publish a float ONNX for TensorRT devices"
            )
        build_config = builder.create_builder_config()
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.config.workspace_mb << 20)
        if self.config.fp16:
            build_config.set_flag(trt.BuilderFlag.FP16)
        # Dynamic-axis exports need a profile; pin it to the one shape the agent feeds.
        profile, dynamic = builder.create_optimization_profile(), False
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if any(d < 0 for d in tensor.shape):
                shape = (1, 3, *self._default_size())
                profile.set_shape(tensor.name, shape, shape, shape)
                dynamic = True
        if dynamic:
            build_config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, build_config)
        if serialized is None:
            raise DetectorError(f"TensorRT failed to build an engine for {self.config.model} (see its log above)")
        return bytes(serialized)

    def _default_size(self) -> tuple[int, int]:
        return self._metadata.imgsz or yolo.DEFAULT_IMGSZ

    def _bind(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        # An edgeloop release adds the image embedding as a named output (edgeloop.embedding).
        detect_outputs = [n for n in outputs if n != EMBEDDING_OUTPUT]
        if len(inputs) != 1 or not detect_outputs:
            raise DetectorError(f"{self.config.model} has inputs {inputs}; a YOLO detect export has one image input")
        self._input_name, self._output_name = inputs[0], detect_outputs[0]
        self._embedding_name = EMBEDDING_OUTPUT if EMBEDDING_OUTPUT in outputs else None
        in_shape = tuple(engine.get_tensor_shape(self._input_name))
        if any(d < 0 for d in in_shape):
            in_shape = (1, 3, *self._default_size())
            self._context.set_input_shape(self._input_name, in_shape)
        if len(in_shape) != 4 or in_shape[1] != 3:
            raise DetectorError(f"{self.config.model} has input shape {list(in_shape)}; expected (1, 3, h, w)")
        self.input_size = (int(in_shape[2]), int(in_shape[3]))
        self._input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input_name)))

        # TensorRT wants an address for every I/O tensor, including outputs the decoder ignores.
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, int] = {}
        for name in names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._host[name] = np.empty(shape, dtype=dtype)
            self._device[name] = self._cuda.alloc(max(self._host[name].nbytes, 1))
            self._context.set_tensor_address(name, self._device[name])
        try:
            num_classes = yolo.check_output_shape(
                self._host[self._output_name].shape, self._metadata, str(self.config.model)
            )
        except ValueError as err:
            raise DetectorError(str(err)) from err
        self.class_names = yolo.class_names_for(self._metadata, num_classes)
        if self._embedding_name is not None:
            dim = int(self._host[self._embedding_name].shape[-1])
            self.reference = yolo.read_reference(self._raw_metadata, dim, str(self.config.model))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Copy in, run the engine, copy out; the returned array is reused by the next call."""
        return self.infer_all(tensor)[0]

    def infer_all(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self._cuda.to_device(self._device[self._input_name], np.ascontiguousarray(tensor, dtype=self._input_dtype))
        if not self._context.execute_async_v3(self._cuda.stream_handle):
            raise DetectorError("TensorRT failed to enqueue inference")
        output = self._host[self._output_name]
        self._cuda.to_host(output, self._device[self._output_name])
        embedding = None
        if self._embedding_name is not None:
            embedding = self._host[self._embedding_name]
            self._cuda.to_host(embedding, self._device[self._embedding_name])
        self._cuda.synchronize()
        return output, embedding

    def close(self) -> None:
        # Context before engine before runtime, then the memory they referenced; safe to call twice.
        self._context = self._engine = self._runtime = None
        cuda, self._cuda = getattr(self, "_cuda", None), None
        if cuda is not None:
            cuda.close()


def _create(config: TensorRTDetectorConfig) -> TensorRTDetector:
    return TensorRTDetector(config)


register(KEY, TensorRTDetectorConfig, _create)

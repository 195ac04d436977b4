"""Native TensorRT back end: builds (and caches) engines from ONNX, or loads ``.engine`` files.

Why a native back end next to ONNX Runtime's TensorRT execution provider:
it loads Ultralytics ``.engine`` files, does INT8 calibration with the
operator's own images, and reports exactly what runs (TensorRT version, GPU,
compute capability, precision) without ONNX Runtime's silent CPU fallback.

Design rules:

* ``tensorrt`` and the CUDA binding (pycuda, else cuda-python) are imported
  only when an engine is created, so ``import engines.tensorrt`` works on any
  machine and a missing library is one :class:`EngineError` that says what to
  install.
* One code path for TensorRT 8.5, 8.6, 10.x (and 11 where it still applies):
  the named-tensor API only (``num_io_tensors``, ``get_tensor_name``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), and
  features are detected with ``hasattr`` - never by parsing version strings.
* The steps are plain functions that take the ``trt`` module as an argument
  (:func:`build_plan`, :func:`apply_precision`, :func:`deserialize_plan`), so
  the logic is unit-tested with fake modules on machines without a GPU.
* The CUDA primary context is retained once and pushed/popped around every
  build and inference call, so the engine may be built on one thread and run
  on another (the pipeline's inference worker).  ``pycuda.autoinit`` is never
  used: it creates a private context bound to the importing thread.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgelabel.engines.base import DeviceError, Engine, EngineError, EngineInfo, TensorSpec
from edgelabel.engines.calibration import CalibrationBatcher, calibration_hash, make_entropy_calibrator, resolve_images
from edgelabel.engines.models.base import PreprocessSpec
from edgelabel.engines.models.detect import DEFAULT_IMGSZ
from edgelabel.engines.select import ENGINE_SUFFIXES
from edgelabel.engines.trtcache import (
    CacheKey,
    OnnxSummary,
    engine_filename,
    load_or_build,
    load_timing_cache,
    metadata_to_strings,
    read_engine_file,
    read_onnx_summary,
    read_sidecar,
    remove_stale_temps,
    save_timing_cache,
    sha256_file,
    timing_cache_path,
    write_sidecar,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

INSTALL_TENSORRT = (
    "install the TensorRT Python bindings: on a Jetson `sudo apt install python3-libnvinfer` (JetPack) and use a venv "
    "created with --system-site-packages; on an x86 GPU machine `pip install tensorrt` matching its CUDA; "
    "or set model.engine: onnxruntime"
)
INSTALL_CUDA = (
    "install a CUDA binding for the engine's GPU buffers: `pip install pycuda` (on a Jetson with "
    "PATH=/usr/local/cuda/bin:$PATH so it finds nvcc) or `pip install cuda-python`"
)

#: ONNX Runtime's own quantized operators, which TensorRT's ONNX parser does not implement
_ORT_ONLY_QUANT_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


# -- lazy imports ----------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or :class:`EngineError` saying how to install it."""
    try:
        import tensorrt as trt  # lazy: only machines that select this engine need it
    except ImportError as exc:
        raise EngineError(f"the tensorrt engine needs TensorRT, which is not importable ({exc}); {INSTALL_TENSORRT}") from None
    except OSError as exc:  # the bindings are there but libnvinfer is not
        raise EngineError(f"TensorRT's libraries failed to load ({exc}); {INSTALL_TENSORRT}") from None
    if not hasattr(trt, "Runtime"):
        raise EngineError(f"the module 'tensorrt' at {getattr(trt, '__file__', '?')} is not NVIDIA TensorRT; {INSTALL_TENSORRT}")
    return trt


def trt_version(trt: Any) -> str:
    return str(getattr(trt, "__version__", "unknown"))


# -- CUDA helpers ------------------------------------------------------------------


class DeviceBuffer:
    """One device allocation: ``int(buf)`` is the pointer TensorRT wants; :meth:`free` releases it once."""

    def __init__(self, ptr: int, nbytes: int, release: Any) -> None:
        self.ptr = int(ptr)
        self.nbytes = int(nbytes)
        self._release = release

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class CudaApi:
    """The few CUDA calls the engine needs, over pycuda or cuda-python.

    Subclasses set ``name`` (GPU name), ``compute_capability`` ((major, minor))
    and ``backend``.  Every method except :meth:`activate` and :meth:`close`
    must be called inside ``with api.activate():``.
    """

    backend = ""
    name = ""
    compute_capability: tuple[int, int] = (0, 0)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:  # pragma: no cover - interface
        """Make the device's primary context current on this thread for the block."""
        yield

    def alloc(self, nbytes: int) -> DeviceBuffer:  # pragma: no cover - interface
        raise NotImplementedError

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # pragma: no cover - interface
        """Page-locked host array (needed for truly asynchronous copies)."""
        raise NotImplementedError

    def free_pinned(self, array: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def create_stream(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def destroy_stream(self, stream: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def copy_htod(self, dst: DeviceBuffer, src: np.ndarray) -> None:  # pragma: no cover - interface
        """Synchronous copy (calibration batches)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the context reference taken at start."""

    @property
    def sm(self) -> str:
        """``sm_87`` style compute capability."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


class PyCudaApi(CudaApi):  # pragma: no cover - needs an NVIDIA GPU
    """pycuda: retains the device's primary context (shared with TensorRT and the CUDA runtime)."""

    backend = "pycuda"

    def __init__(self, device_id: int) -> None:
        import pycuda.driver as drv  # lazy; never pycuda.autoinit (private, thread-bound context)

        self._drv = drv
        try:
            drv.init()
            count = drv.Device.count()
        except Exception as exc:  # pycuda._driver.Error and friends share no public base
            raise EngineError(f"CUDA is not usable here ({exc}); is the NVIDIA driver installed and a GPU visible?") from None
        if count == 0:
            raise EngineError("no CUDA device found (nvidia-smi / tegrastats should list one)")
        if not 0 <= device_id < count:
            raise EngineError(f"model.device_id {device_id} does not exist: this machine has {count} CUDA device(s)")
        self._device = drv.Device(device_id)
        self._ctx = self._device.retain_primary_context()
        self.name = str(self._device.name())
        major, minor = self._device.compute_capability()
        self.compute_capability = (int(major), int(minor))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self._drv.Context.pop()

    def alloc(self, nbytes: int) -> DeviceBuffer:
        mem = self._drv.mem_alloc(max(1, int(nbytes)))
        return DeviceBuffer(int(mem), nbytes, mem.free)

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self._drv.pagelocked_empty(shape, dtype)

    def free_pinned(self, array: np.ndarray) -> None:
        base = getattr(array, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()

    def create_stream(self) -> Any:
        return self._drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def destroy_stream(self, stream: Any) -> None:
        del stream  # pycuda destroys the stream when the object goes (inside the active context)

    def htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        self._drv.memcpy_htod_async(int(dst), src, stream)

    def dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        self._drv.memcpy_dtoh_async(dst, int(src), stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def copy_htod(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        self._drv.memcpy_htod(int(dst), np.ascontiguousarray(src))

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.detach()  # releases the primary-context reference taken by retain_primary_context()


class CudaPythonApi(CudaApi):  # pragma: no cover - needs an NVIDIA GPU
    """cuda-python's runtime API: ``cudaSetDevice`` binds the primary context to the calling thread."""

    backend = "cuda-python"

    def __init__(self, device_id: int) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 layout
        except ImportError:
            from cuda import cudart  # older layout (deprecated alias)
        self._rt = cudart
        self.device_id = int(device_id)
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA is not usable here ({self._error_text(err)}); is the NVIDIA driver installed and a GPU visible?")
        if count == 0:
            raise EngineError("no CUDA device found (nvidia-smi / tegrastats should list one)")
        if not 0 <= self.device_id < count:
            raise EngineError(f"model.device_id {device_id} does not exist: this machine has {count} CUDA device(s)")
        self._check(cudart.cudaSetDevice(self.device_id), "cudaSetDevice")
        (prop,) = self._check(cudart.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        raw = prop.name
        self.name = (raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)).split("\x00")[0].strip()
        self.compute_capability = (int(prop.major), int(prop.minor))
        self._pinned: dict[int, int] = {}

    def _error_text(self, err: Any) -> str:
        try:
            _, text = self._rt.cudaGetErrorString(err)
            return text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # the error text is a nicety
            return str(err)

    def _check(self, result: Any, what: str) -> tuple[Any, ...]:
        err, rest = result[0], tuple(result[1:])
        if err != self._rt.cudaError_t.cudaSuccess:
            raise EngineError(f"{what} failed: {self._error_text(err)}")
        return rest

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._check(self._rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        yield

    def alloc(self, nbytes: int) -> DeviceBuffer:
        (ptr,) = self._check(self._rt.cudaMalloc(max(1, int(nbytes))), "cudaMalloc")
        return DeviceBuffer(int(ptr), nbytes, lambda: self._rt.cudaFree(ptr))

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
        (ptr,) = self._check(self._rt.cudaMallocHost(nbytes), "cudaMallocHost")
        raw = (ctypes.c_ubyte * nbytes).from_address(int(ptr))
        array = np.frombuffer(raw, dtype=np.uint8, count=int(np.prod(shape)) * dt.itemsize).view(dt).reshape(shape)
        self._pinned[array.ctypes.data] = int(ptr)
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        ptr = self._pinned.pop(array.ctypes.data, None)
        if ptr is not None:
            self._rt.cudaFreeHost(ptr)

    def create_stream(self) -> Any:
        (stream,) = self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")
        return stream

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def destroy_stream(self, stream: Any) -> None:
        self._rt.cudaStreamDestroy(stream)

    def htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(int(dst), src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, int(src), dst.nbytes, kind, stream), "cudaMemcpyAsync")

    def synchronize(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def copy_htod(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        host = np.ascontiguousarray(src)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpy(int(dst), host.ctypes.data, host.nbytes, kind), "cudaMemcpy")


def load_cuda(device_id: int = 0) -> CudaApi:
    """pycuda if importable, else cuda-python; :class:`EngineError` naming both when neither is."""
    errors: list[str] = []
    try:
        import pycuda.driver  # noqa: F401  (probe only; PyCudaApi imports it again)
    except ImportError as exc:
        errors.append(f"pycuda: {exc}")
    else:
        try:
            return PyCudaApi(device_id)
        except Exception as exc:  # pycuda built against another CUDA, no driver: cuda-python may still work
            errors.append(f"pycuda: {type(exc).__name__}: {exc}")
    try:
        try:
            from cuda.bindings import runtime  # noqa: F401
        except ImportError:
            from cuda import cudart  # noqa: F401
    except ImportError as exc:
        errors.append(f"cuda-python: {exc}")
    else:
        try:
            return CudaPythonApi(device_id)
        except EngineError:
            raise
        except Exception as exc:
            errors.append(f"cuda-python: {type(exc).__name__}: {exc}")
    raise EngineError(f"the tensorrt engine found no CUDA binding ({'; '.join(errors)}); {INSTALL_CUDA}")


# -- TensorRT logger -------------------------------------------------------------------

# keyed by the tensorrt module itself (weakly, so test doubles do not pin each other's ids)
_LOGGERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt: Any) -> Any:
    """One ``trt.ILogger`` per process that forwards to Python logging and remembers recent errors.

    TensorRT wants a single logger for all builders and runtimes of a process.
    INFO messages (dozens per build) go to DEBUG, VERBOSE ones are dropped
    before formatting, and the last errors are kept so a failed build can put
    them in its exception.
    """
    with _LOGGER_LOCK:
        existing = _LOGGERS.get(trt)
        if existing is not None:
            return existing
        severity = trt.ILogger.Severity if hasattr(trt.ILogger, "Severity") else trt.ILogger
        levels = {
            severity.INTERNAL_ERROR: logging.ERROR,
            severity.ERROR: logging.ERROR,
            severity.WARNING: logging.WARNING,
            severity.INFO: logging.DEBUG,
        }
        trt_log = logging.getLogger("edgelabel.engines.tensorrt.trt")

        class _Bridge(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: deque[str] = deque(maxlen=20)

            def log(self, sev: Any, msg: str) -> None:
                level = levels.get(sev)
                if level is None:
                    return  # VERBOSE
                if level >= logging.ERROR:
                    self.errors.append(str(msg))
                if trt_log.isEnabledFor(level):
                    trt_log.log(level, "TensorRT: %s", msg)

        bridge = _Bridge()
        _LOGGERS[trt] = bridge
        return bridge


_PLUGINS_READY: weakref.WeakSet[Any] = weakref.WeakSet()


def init_plugins(trt: Any, logger: Any) -> None:
    """Register TensorRT's bundled plugins (EfficientNMS_TRT, ...) once per process.

    Both the ONNX parser and ``deserialize_cuda_engine`` look plugins up in
    the registry, so a model ending in EfficientNMS fails to parse or load
    without this.  A failure is a warning: plain detectors need no plugin.
    """
    if trt in _PLUGINS_READY or not hasattr(trt, "init_libnvinfer_plugins"):
        return
    _PLUGINS_READY.add(trt)
    try:
        ok = trt.init_libnvinfer_plugins(logger, "")
    except Exception as exc:  # a binding that cannot take a Python logger, or a missing libnvinfer_plugin
        log.warning("TensorRT plugins could not be registered (%s); models with plugin layers will not load", exc)
        return
    if not ok:
        log.warning("TensorRT plugins could not be registered; models with plugin layers (EfficientNMS_TRT) will not load")


def _recent_errors(logger: Any) -> str:
    errors = list(getattr(logger, "errors", []))[-5:]
    return ("; TensorRT said: " + " | ".join(errors)) if errors else "; see the TensorRT errors in the log"


# -- build ------------------------------------------------------------------------------


@dataclass
class BuildOutput:
    """A serialized plan and what the build really did."""

    plan: bytes
    precision: str  # effective: fp16 asked on a GPU without fast fp16 builds fp32
    input_name: str
    input_shape: tuple[int, ...]
    timing_cache: bytes = b""


def normalize_input_size(value: Any) -> tuple[int, int] | None:
    """``640``, ``[480, 640]``, ``(480, 640)`` or ``"480x640"`` -> ``(480, 640)``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            nums = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise EngineError(f"input_size {value!r} is not HxW (e.g. 640x640)") from None
    elif isinstance(value, int):
        nums = [value, value]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise EngineError(f"input_size {value!r} must be one or two positive ints (height, width)")
    return nums[0], nums[1]


def _dynamic_hw(summary: OnnxSummary) -> bool:
    """True when the ONNX input's height or width is not fixed."""
    dims = tuple(summary.inputs[0].shape) if summary.inputs else ()
    return len(dims) == 4 and (dims[2] is None or dims[3] is None)


def resolve_input_shape(spec: TensorSpec, input_size: tuple[int, int] | None, source: str = "model") -> tuple[int, int, int, int]:
    """The NCHW shape to build and run: static dims as given, dynamic ones filled in.

    Dynamic batch -> 1, dynamic channels -> 3, dynamic H/W -> ``input_size``,
    else 640 (the size Ultralytics models are trained at).  A static H/W always
    wins over ``input_size`` (the model cannot run at another size), with a
    warning so the operator knows the setting was not used.
    """
    dims = tuple(spec.shape)
    if len(dims) != 4:
        raise EngineError(f"{source}: input {spec.name!r} has shape {list(dims)}; expected one NCHW image input [1,3,H,W]")
    n, c, h, w = dims
    want_h, want_w = input_size if input_size else (DEFAULT_IMGSZ, DEFAULT_IMGSZ)
    if input_size and h is not None and w is not None and (h, w) != tuple(input_size):
        log.warning("%s: input is fixed at %dx%d; input_size %dx%d ignored", source, h, w, input_size[0], input_size[1])
    return (1 if n is None else n, 3 if c is None else c, want_h if h is None else h, want_w if w is None else w)


def apply_precision(trt: Any, builder: Any, config: Any, requested: str, *, calibrator: Any = None, qdq: bool = False) -> str:
    """Set the builder flags for ``requested`` precision; return the precision the engine will have.

    * fp16 only where the GPU has fast fp16 (``platform_has_fast_fp16``), else
      fp32 with a warning.
    * int8 sets INT8 (and FP16, so layers without an INT8 kernel do not fall
      back to fp32); a QDQ model carries its own scales, anything else needs
      ``calibrator``.  A GPU without fast INT8 falls back to the fp16 rule.
    * TensorRT 11 has no FP16/INT8 builder flags: networks are strongly typed
      and the precision comes from the ONNX itself.  There fp16 of an fp32 model
      builds fp32 with a warning, and int8 needs a QDQ model.
    """
    flags = trt.BuilderFlag
    version = trt_version(trt)
    fast_fp16 = bool(getattr(builder, "platform_has_fast_fp16", True))
    fast_int8 = bool(getattr(builder, "platform_has_fast_int8", True))
    if requested not in PRECISIONS:
        raise EngineError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if qdq and requested != "int8":
        # Q/DQ nodes fix the precision of the quantized layers; TensorRT 8/10 refuse them without the INT8 flag
        log.info("the model is QDQ-quantized: building int8 (requested %s)", requested)
        requested = "int8"

    if requested == "int8":
        if not hasattr(flags, "INT8"):
            if qdq:
                return "int8"  # strongly typed: the Q/DQ nodes decide
            raise EngineError(
                f"TensorRT {version} removed implicit INT8 calibration (strongly typed networks only); "
                "use precision fp16, or a pre-quantized (QDQ) ONNX model"
            )
        if fast_int8:
            config.set_flag(flags.INT8)
            if fast_fp16 and hasattr(flags, "FP16"):
                config.set_flag(flags.FP16)
            if not qdq:
                if calibrator is None:
                    raise EngineError("precision int8 needs calibration images (calib_images) or a QDQ-quantized ONNX model")
                config.int8_calibrator = calibrator
            return "int8"
        log.warning("this GPU has no fast INT8 support; building with fp16/fp32 instead of int8")
        requested = "fp16"

    if requested == "fp16":
        if not hasattr(flags, "FP16"):
            log.warning(
                "TensorRT %s builds strongly typed networks: the precision comes from the ONNX's own types, so an fp32 "
                "ONNX builds fp32 (export the model in fp16 for fp16 kernels)",
                version,
            )
            return "int8" if qdq else "fp32"
        if fast_fp16:
            config.set_flag(flags.FP16)
            return "fp16"
        log.warning("this GPU has no fast fp16 support; building an fp32 engine")
        return "fp32"
    return "int8" if qdq else "fp32"


def _as_bytes(buffer: Any) -> bytes:
    """IHostMemory (buffer protocol) or bytes -> bytes."""
    return bytes(memoryview(buffer))


def network_flags(trt: Any, builder: Any) -> int:
    """``create_network`` flags for this TensorRT, found by feature tests.

    * TensorRT 8.x (the builder still has ``max_batch_size``): implicit batch
      is the default, so EXPLICIT_BATCH must be set for ONNX models.  10.x
      ignores that flag and 11 removed it.
    * A TensorRT without ``BuilderFlag.FP16`` (11) only builds strongly typed
      networks: STRONGLY_TYPED is set where it exists.  It is not set on 10.x,
      where weak typing is what lets the FP16/INT8 flags choose kernels.
    """
    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    explicit = getattr(creation, "EXPLICIT_BATCH", None)
    if explicit is not None and hasattr(builder, "max_batch_size"):
        flags |= 1 << int(explicit)
    strongly = getattr(creation, "STRONGLY_TYPED", None)
    if strongly is not None and not hasattr(trt.BuilderFlag, "FP16"):
        flags |= 1 << int(strongly)
    return flags


def build_plan(
    trt: Any,
    onnx_path: str | Path,
    input_shape: tuple[int, ...],
    precision: str = "fp16",
    *,
    workspace_bytes: int = 1 << 30,
    calibrator: Any = None,
    qdq: bool = False,
    timing_cache: bytes = b"",
    logger: Any = None,
) -> BuildOutput:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build a serialized plan.

    One optimisation profile with min = opt = max = ``input_shape`` is added
    when the model's input has dynamic dimensions: the detector always feeds
    one size, and a single-shape profile gives the fastest kernels.  Parser
    errors are reported one per line in the :class:`EngineError`.
    """
    path = Path(onnx_path)
    logger = logger if logger is not None else trt_logger(trt)
    init_plugins(trt, logger)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # pybind11 reports TensorRT's null builder (no usable GPU) as a TypeError
        builder = None
    if builder is None:
        raise EngineError(f"{path}: TensorRT could not create a builder (is the GPU usable?){_recent_errors(logger)}")
    flags = network_flags(trt, builder)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if hasattr(parser, "parse_from_file"):
        parsed = parser.parse_from_file(str(path))  # also resolves external weight files next to the model
    else:
        parsed = parser.parse(path.read_bytes())
    if not parsed:
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        lines = "\n".join(f"  {e}" for e in errors) or "  (the parser gave no error text)"
        raise EngineError(f"{path}: TensorRT's ONNX parser rejected the model ({len(errors)} error(s)):\n{lines}")

    if network.num_inputs != 1:
        raise EngineError(f"{path}: the network has {network.num_inputs} inputs; only single-input image detectors are supported")
    tensor = network.get_input(0)
    dims = tuple(int(d) for d in tensor.shape)
    if len(dims) != len(input_shape) or any(d >= 0 and d != s for d, s in zip(dims, input_shape, strict=True)):
        raise EngineError(f"{path}: input {tensor.name!r} is {list(dims)} in TensorRT, cannot build it for {list(input_shape)}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    else:
        config.max_workspace_size = int(workspace_bytes)
    effective = apply_precision(trt, builder, config, precision, calibrator=calibrator, qdq=qdq)
    if any(d < 0 for d in dims):
        profile = builder.create_optimization_profile()
        shape = tuple(int(s) for s in input_shape)
        profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        if calibrator is not None and effective == "int8" and hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)

    cache = None
    if hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(timing_cache or b"")
        if cache is None or not config.set_timing_cache(cache, False):
            if timing_cache:
                log.warning("the TensorRT timing cache does not match this GPU/version; starting an empty one")
            cache = config.create_timing_cache(b"")
            if cache is not None:
                config.set_timing_cache(cache, False)

    log.info("%s: building a TensorRT %s engine for %s (this can take minutes)", path.name, effective, list(input_shape))
    if hasattr(builder, "build_serialized_network"):
        plan = builder.build_serialized_network(network, config)
    else:  # pragma: no cover - TensorRT < 8.0, which lacks the named-tensor API anyway
        engine = builder.build_engine(network, config)
        plan = engine.serialize() if engine is not None else None
    if plan is None:
        raise EngineError(f"{path}: TensorRT failed to build the engine{_recent_errors(logger)}")
    out_cache = b""
    if cache is not None:
        try:
            out_cache = _as_bytes(cache.serialize())
        except Exception as exc:  # losing the timing cache only costs time on the next build
            log.warning("cannot serialize the TensorRT timing cache: %s", exc)
    return BuildOutput(
        plan=_as_bytes(plan),
        precision=effective,
        input_name=str(tensor.name),
        input_shape=tuple(int(s) for s in input_shape),
        timing_cache=out_cache,
    )


def _create_runtime(trt: Any, logger: Any) -> Any:
    """``trt.Runtime(logger)``, with TensorRT's null result (no usable GPU) as an :class:`EngineError`."""
    try:
        runtime = trt.Runtime(logger)
    except TypeError:  # pybind11: "factory function returned nullptr"
        runtime = None
    if runtime is None:
        raise EngineError(f"TensorRT {trt_version(trt)} could not create a runtime (is the GPU usable?){_recent_errors(logger)}")
    return runtime


def deserialize_plan(runtime: Any, plan: bytes) -> Any | None:
    """``runtime.deserialize_cuda_engine(plan)``; None (not an exception) when TensorRT rejects the plan."""
    try:
        return runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # some versions raise instead of returning None
        log.warning("TensorRT could not deserialize the engine: %s", exc)
        return None


def engine_io(trt: Any, engine: Any) -> list[dict[str, Any]]:
    """Every I/O tensor of a deserialized engine: name, mode, shape (-1 = dynamic), numpy dtype, in engine order."""
    if not hasattr(engine, "num_io_tensors"):
        raise EngineError(
            f"TensorRT {trt_version(trt)} has no named-tensor API (num_io_tensors); TensorRT 8.5 or newer is needed (JetPack 5.1+)"
        )
    out: list[dict[str, Any]] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = [int(d) for d in engine.get_tensor_shape(name)]
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        out.append({"name": str(name), "mode": "input" if is_input else "output", "shape": shape, "dtype": dtype})
    return out


def _spec(entry: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=entry["name"], shape=tuple(d if d >= 0 else None for d in entry["shape"]), dtype=entry["dtype"])


def default_cache_dir() -> Path:
    """Where engines go when no cache_dir is given (the daemon passes ``<state_dir>/engines``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgelabel" / "engines"


def _refuse_unbuildable(path: Path, summary: OnnxSummary) -> None:
    """ONNX Runtime's dynamic quantization (ConvInteger, ...) has no TensorRT equivalent: say so before parsing."""
    ort_ops = sorted(summary.op_types & _ORT_ONLY_QUANT_OPS)
    if ort_ops:
        raise EngineError(
            f"{path}: is quantized for ONNX Runtime ({', '.join(ort_ops)}), which TensorRT cannot build; give the fp32 ONNX "
            "with precision fp16 or int8 (TensorRT calibrates it), or a QDQ-quantized ONNX"
        )
    if len(summary.inputs) != 1:
        names = ", ".join(s.name for s in summary.inputs)
        raise EngineError(f"{path}: has {len(summary.inputs)} inputs ({names}); only single-input image detectors are supported")


def _calibration_spec(summary: OnnxSummary, family: str, input_hw: tuple[int, int]) -> PreprocessSpec:
    """The decoder's preprocessing for this model, so calibration sees pixels exactly as inference does."""
    from edgelabel.engines.models.detect import DECODERS, detect_family  # lazy: only INT8 builds need it

    try:
        found = detect_family(
            [s.shape for s in summary.outputs],
            summary.metadata,
            family,
            input_hw=input_hw,
            output_names=[s.name for s in summary.outputs],
        )
        return DECODERS[found].preprocess
    except EngineError as exc:
        log.warning("cannot tell the model family for INT8 calibration (%s); using Ultralytics preprocessing", exc)
        return PreprocessSpec()


# -- the engine -----------------------------------------------------------------------


class TensorRTEngine(Engine):
    """A TensorRT engine on one GPU, built from ONNX (and cached) or loaded from a ``.engine``/``.plan`` file."""

    type_name = "tensorrt"

    def __init__(
        self,
        model_path: str | Path,
        precision: str = "fp16",
        workspace_mb: int = 1024,
        cache_dir: str | Path | None = None,
        device_id: int = 0,
        calib_images: str | Path | Sequence[str | Path] | None = None,
        calib_cache: str | Path | None = None,
        input_size: Any = None,
        family: str = "auto",
        **ignored: Any,
    ) -> None:
        super().__init__(model_path)
        if ignored:
            log.debug("tensorrt engine: ignoring options %s", ", ".join(sorted(ignored)))
        self.precision_requested = str(precision).lower()
        if self.precision_requested not in PRECISIONS:
            raise EngineError(f"{self.model_path}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.workspace_mb = int(workspace_mb)
        self.device_id = int(device_id)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.input_size = normalize_input_size(input_size)
        self.family = family
        self.engine_file: Path | None = None
        self.cache_hit = False
        self.build_seconds = 0.0
        self._metadata: dict[str, str] = {}
        self._precision = self.precision_requested
        self._closed = False
        self._lock = threading.Lock()
        self._engine: Any = None
        self._context: Any = None
        self._runtime: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[np.ndarray, DeviceBuffer]] = {}
        self._io: list[dict[str, Any]] = []

        suffix = self.model_path.suffix.lower()
        if suffix != ".onnx" and suffix not in ENGINE_SUFFIXES:
            raise EngineError(f"{self.model_path}: the tensorrt engine takes an .onnx model or a serialized .engine/.plan file")
        self._trt = import_tensorrt()
        self._logger = trt_logger(self._trt)
        self._logger.errors.clear()  # errors of an earlier model must not be reported as this one's
        self._cuda = load_cuda(self.device_id)
        started = time.perf_counter()
        try:
            with self._cuda.activate():
                init_plugins(self._trt, self._logger)
                self._runtime = _create_runtime(self._trt, self._logger)
                if suffix == ".onnx":
                    self._load_onnx(calib_images, calib_cache)
                else:
                    self._load_plan_file()
                self._setup_io()
        except EngineError:
            self.close()
            raise
        except Exception as exc:  # CUDA binding errors (pycuda/cuda-python: out of memory, ...) must not
            # escape as their own types: load_detector falls back to ONNX Runtime only on EngineError
            self.close()
            raise DeviceError(f"{self.model_path}: TensorRT/CUDA failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - started
        log.info(
            "%s: TensorRT %s engine ready on %s %s (%s, %.1f s)",
            self.model_path.name,
            self._precision,
            self._cuda.name,
            self._cuda.sm,
            "cached" if self.cache_hit else ("built" if self.build_seconds else "loaded"),
            self.load_seconds,
        )

    # -- loading -----------------------------------------------------------------

    def _load_onnx(self, calib_images: Any, calib_cache: str | Path | None) -> None:
        trt, cuda = self._trt, self._cuda
        summary = read_onnx_summary(self.model_path)
        _refuse_unbuildable(self.model_path, summary)
        self._metadata = dict(summary.metadata)
        wanted = self.input_size
        if wanted is None:  # a dynamic-size export runs at its training size (metadata imgsz), as on ONNX Runtime
            from edgelabel.engines.models.detect import input_size as model_input_size

            wanted = model_input_size(summary.inputs, summary.metadata)
        shape = resolve_input_shape(summary.inputs[0], wanted if self.input_size or _dynamic_hw(summary) else None,
                                    str(self.model_path))

        calib_paths: list[Path] = []
        calib_digest: str | None = None
        calib_cache_path = Path(calib_cache) if calib_cache else None
        needs_calibration = self.precision_requested == "int8" and not summary.has_qdq
        if needs_calibration:
            if calib_images:
                calib_paths = resolve_images(calib_images)
                if not calib_paths:
                    raise EngineError(f"{self.model_path}: precision int8: no images found in calib_images {calib_images!r}")
                calib_digest = calibration_hash(calib_paths)
            elif calib_cache_path is not None and calib_cache_path.is_file():
                calib_digest = "cache:" + sha256_file(calib_cache_path)
            else:
                raise EngineError(
                    f"{self.model_path}: precision int8 needs calib_images (a folder or list of representative images), "
                    "an existing calib_cache, or a QDQ-quantized ONNX"
                )
        key = CacheKey(
            onnx_sha256=self.sha256,
            trt_version=trt_version(trt),
            gpu_name=cuda.name,
            compute_capability=f"{cuda.compute_capability[0]}.{cuda.compute_capability[1]}",
            precision=self.precision_requested,
            input_shape=tuple(shape),
            calib_hash=calib_digest,
        )
        self.engine_file = self.cache_dir / engine_filename(self.model_path.stem, key)
        remove_stale_temps(self.cache_dir)
        if calib_cache_path is None:
            calib_cache_path = self.engine_file.with_suffix(".calib")
        timing_path = timing_cache_path(self.cache_dir, key.trt_version, key.gpu_name, key.compute_capability)
        built: dict[str, Any] = {}

        def build() -> bytes:
            calibrator = None
            if needs_calibration:
                spec = _calibration_spec(summary, self.family, (shape[2], shape[3]))
                in_dtype = summary.inputs[0].dtype if summary.inputs[0].dtype in ("float16", "float32") else "float32"
                batcher = CalibrationBatcher(calib_paths, (shape[2], shape[3]), spec, batch_size=shape[0], dtype=in_dtype)
                calibrator = make_entropy_calibrator(batcher, calib_cache_path, trt=trt, cuda=cuda)
            try:
                out = build_plan(
                    trt,
                    self.model_path,
                    shape,
                    self.precision_requested,
                    workspace_bytes=self.workspace_mb << 20,
                    calibrator=calibrator,
                    qdq=summary.has_qdq,
                    timing_cache=load_timing_cache(timing_path),
                    logger=self._logger,
                )
            finally:
                if calibrator is not None:
                    calibrator.free()
            save_timing_cache(timing_path, out.timing_cache)
            built["out"] = out
            return out.plan

        result = load_or_build(self.engine_file, lambda plan: deserialize_plan(self._runtime, plan), build)
        self._engine = result.engine
        self.cache_hit = not result.built
        self.build_seconds = result.build_seconds
        if result.built:
            self._precision = built["out"].precision
            try:
                write_sidecar(
                    self.engine_file,
                    key,
                    source=self.model_path,
                    build_seconds=result.build_seconds,
                    precision=self._precision,
                    io=engine_io(trt, self._engine),
                    extra={
                        "workspace_mb": self.workspace_mb,
                        "calibration_images": len(calib_paths),
                        "cuda": cuda.backend,
                        "replaced_stale_engine": result.rebuilt_stale,
                    },
                )
            except OSError as exc:
                log.warning("%s: cannot write the engine sidecar (%s)", self.engine_file, exc)
        else:
            sidecar = read_sidecar(self.engine_file) or {}
            self._precision = str(sidecar.get("precision", self.precision_requested))

    def _load_plan_file(self) -> None:
        meta, plan = read_engine_file(self.model_path)
        self.engine_file = self.model_path
        self.cache_hit = True
        if meta is not None:
            self._metadata = metadata_to_strings(meta)
            args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
            self._precision = "int8" if args.get("int8") else "fp16" if args.get("half") else "fp32"
        else:
            sidecar = read_sidecar(self.model_path) or {}
            self._precision = str(sidecar.get("precision", "unknown"))
        engine = deserialize_plan(self._runtime, plan)
        if engine is None:
            raise EngineError(
                f"{self.model_path}: TensorRT {trt_version(self._trt)} cannot load this engine on {self._cuda.name} "
                f"({self._cuda.sm}): engines only run on the TensorRT version and GPU they were built with; "
                f"give the ONNX model instead and edgelabel builds and caches an engine for this device{_recent_errors(self._logger)}"
            )
        self._engine = engine

    def _setup_io(self) -> None:
        trt, engine = self._trt, self._engine
        self._io = engine_io(trt, engine)
        inputs = [e for e in self._io if e["mode"] == "input"]
        if len(inputs) != 1:
            raise EngineError(f"{self.model_path}: engine has {len(inputs)} inputs; only single-input image detectors are supported")
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(
                f"{self.model_path}: TensorRT could not create an execution context (out of GPU memory?){_recent_errors(self._logger)}"
            )
        self._stream = self._cuda.create_stream()
        entry = inputs[0]
        shape = tuple(entry["shape"])
        if any(d < 0 for d in shape):
            shape = self._profile_shape(entry["name"], shape)
        self._bind(shape)

    def _profile_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A concrete shape for a dynamic input: the profile's opt, with input_size for H/W where allowed."""
        lo, opt, hi = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
        chosen = list(opt)
        if shape and shape[0] < 0 and lo[0] <= 1:
            chosen[0] = 1  # the detector feeds one frame at a time, whatever batch the profile was tuned for
        if self.input_size and len(shape) == 4:
            for axis, want in ((2, self.input_size[0]), (3, self.input_size[1])):
                if shape[axis] < 0 and lo[axis] <= want <= hi[axis]:
                    chosen[axis] = want
                elif shape[axis] < 0:
                    log.warning(
                        "%s: input_size %d outside the engine's profile [%d, %d]; using %d",
                        self.model_path.name,
                        want,
                        lo[axis],
                        hi[axis],
                        opt[axis],
                    )
        return tuple(chosen)

    def _bind(self, input_shape: tuple[int, ...]) -> None:
        """(Re)allocate pinned host + device buffers for ``input_shape`` and register their addresses."""
        trt, ctx, cuda = self._trt, self._context, self._cuda
        in_entry = next(e for e in self._io if e["mode"] == "input")
        if any(d < 0 for d in in_entry["shape"]) and not ctx.set_input_shape(in_entry["name"], tuple(input_shape)):
            raise EngineError(
                f"{self.model_path}: the engine does not accept input shape {list(input_shape)}{_recent_errors(self._logger)}"
            )
        self._free_buffers()
        self._in_shape = None  # until every tensor has its new buffer: a half-bound engine must not run
        try:
            for entry in self._io:
                name = entry["name"]
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(
                        f"{self.model_path}: output {name!r} has a data-dependent shape {list(shape)}, which is not supported"
                    )
                try:
                    dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                except TypeError as exc:  # BF16, FP8, INT4 have no numpy type
                    raise EngineError(f"{self.model_path}: tensor {name!r} has a type numpy cannot hold ({exc})") from None
                host = cuda.pinned(shape, dtype)
                device = cuda.alloc(host.nbytes)
                self._buffers[name] = (host, device)
                if not ctx.set_tensor_address(name, int(device)):
                    raise EngineError(f"{self.model_path}: TensorRT refused the buffer for tensor {name!r}")
                entry["bound"] = list(shape)
        except BaseException:
            self._free_buffers()
            raise
        self._in_name = in_entry["name"]
        self._in_shape = tuple(int(d) for d in input_shape)
        self._out_names = [e["name"] for e in self._io if e["mode"] == "output"]

    def _free_buffers(self) -> None:
        for host, device in self._buffers.values():
            device.free()
            self._cuda.free_pinned(host)
        self._buffers.clear()

    # -- Engine API -----------------------------------------------------------------

    @property
    def inputs(self) -> list[TensorSpec]:
        """The input as bound: dynamic engines report the concrete shape they run at."""
        return [self._bound_spec(e) for e in self._io if e["mode"] == "input"]

    @property
    def outputs(self) -> list[TensorSpec]:
        """Outputs in the engine's order (the order :meth:`infer` returns them)."""
        return [self._bound_spec(e) for e in self._io if e["mode"] == "output"]

    @staticmethod
    def _bound_spec(entry: dict[str, Any]) -> TensorSpec:
        return _spec({**entry, "shape": entry.get("bound", entry["shape"])})

    @property
    def metadata(self) -> dict[str, str]:
        """The ONNX metadata_props, or the Ultralytics .engine header, as str values."""
        return dict(self._metadata)

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Copy in, run, copy out, synchronize; one array per output in engine order (copies, safe to keep)."""
        with self._lock:
            if self._closed:  # checked under the lock: close() may have run while this call waited
                raise EngineError(f"{self.model_path}: engine is closed")
            with self._cuda.activate():
                if self._in_shape is None or tuple(tensor.shape) != self._in_shape:
                    self._rebind_for(tensor)
                host_in, dev_in = self._buffers[self._in_name]
                try:
                    np.copyto(host_in, tensor, casting="same_kind")
                except TypeError as exc:
                    raise EngineError(f"{self.model_path}: input is {tensor.dtype}, the engine expects {host_in.dtype} ({exc})") from None
                cuda, stream = self._cuda, self._stream
                try:
                    cuda.htod_async(dev_in, host_in, stream)
                    if not self._context.execute_async_v3(cuda.stream_handle(stream)):
                        raise EngineError(f"{self.model_path}: TensorRT inference failed{_recent_errors(self._logger)}")
                    for name in self._out_names:
                        host, dev = self._buffers[name]
                        cuda.dtoh_async(host, dev, stream)
                finally:
                    cuda.synchronize(stream)  # also on failure: no copy may still target the pinned buffers
                return [self._buffers[name][0].copy() for name in self._out_names]

    def _rebind_for(self, tensor: np.ndarray) -> None:
        entry = next(e for e in self._io if e["mode"] == "input")
        declared = entry["shape"]
        if self._in_shape is None and all(d >= 0 for d in declared):
            self._bind(tuple(int(d) for d in declared))  # a failed bind is retried with the static shape
            if tuple(tensor.shape) == self._in_shape:
                return
        fits = len(declared) == tensor.ndim and all(d < 0 or d == s for d, s in zip(declared, tensor.shape, strict=True))
        if not fits or all(d >= 0 for d in declared):
            expected = list(self._in_shape or declared)
            raise EngineError(f"{self.model_path}: input shape {list(tensor.shape)} does not match the engine's {expected}")
        self._bind(tuple(int(s) for s in tensor.shape))

    def info(self) -> EngineInfo:
        """``TensorRT <version> on <GPU> sm_XY`` and the precision the engine really has."""
        return EngineInfo(
            backend=self.type_name,
            provider=f"TensorRT {trt_version(self._trt)} on {self._cuda.name} {self._cuda.sm}",
            precision=self._precision,
            extra={
                "tensorrt": trt_version(self._trt),
                "gpu": self._cuda.name,
                "compute_capability": ".".join(str(v) for v in self._cuda.compute_capability),
                "cuda_binding": self._cuda.backend,
                "device_id": self.device_id,
                "engine_file": str(self.engine_file) if self.engine_file else None,
                "cache_hit": self.cache_hit,
                "build_seconds": round(self.build_seconds, 3),
                "load_seconds": round(getattr(self, "load_seconds", 0.0), 3),
                "precision_requested": self.precision_requested,
                "input_shape": list(getattr(self, "_in_shape", None) or ()),
            },
        )

    def __del__(self) -> None:
        # a model reload drops the old engine without closing it (a worker may still be inside infer());
        # free its GPU and pinned memory when the last reference goes, from whichever thread that is
        try:
            self.close()
        except Exception:  # noqa: S110 - nothing useful can be done in a finalizer
            pass

    def close(self) -> None:
        """Free buffers, stream, context, engine and runtime inside the CUDA context, then release it."""
        if self._closed:
            return
        self._closed = True
        cuda = getattr(self, "_cuda", None)
        if cuda is None:
            return
        try:
            with self._lock, cuda.activate():
                self._free_buffers()
                if self._stream is not None:
                    cuda.destroy_stream(self._stream)
                # TensorRT objects free device memory when destroyed: drop them while the context is current
                self._context = None
                self._engine = None
                self._runtime = None
                self._stream = None
        except Exception as exc:  # closing must not raise during shutdown
            log.warning("%s: error while releasing the TensorRT engine: %s", self.model_path.name, exc)
        finally:
            cuda.close()


# -- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engines.tensorrt build MODEL ...``: build (or load from the cache) and print a JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m engines.tensorrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or load an engine and print what it is")
    build.add_argument("model", help=".onnx model, or a .engine/.plan file to inspect")
    build.add_argument("--precision", default="fp16", choices=PRECISIONS)
    build.add_argument("--cache-dir", default=None, help="engine cache folder (default: ~/.cache/edgelabel/engines)")
    build.add_argument("--input-size", default=None, help="HxW for models with a dynamic input (default 640x640)")
    build.add_argument("--calib", default=None, help="folder of calibration images (precision int8)")
    build.add_argument("--calib-cache", default=None)
    build.add_argument("--workspace-mb", type=int, default=1024)
    build.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = TensorRTEngine(
            args.model,
            precision=args.precision,
            workspace_mb=args.workspace_mb,
            cache_dir=args.cache_dir,
            device_id=args.device,
            calib_images=args.calib,
            calib_cache=args.calib_cache,
            input_size=args.input_size,
        )
    except EngineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        info = engine.info()
        doc = {
            "provider": info.provider,
            "precision": info.precision,
            **info.extra,
            "inputs": [[s.name, list(s.shape), s.dtype] for s in engine.inputs],
            "outputs": [[s.name, list(s.shape), s.dtype] for s in engine.outputs],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which back end runs the model: ``engine: auto | tensorrt | onnxruntime``.

``auto`` takes native TensorRT when its Python bindings import and a CUDA GPU
answers, because that is where a Jetson's speed comes from; otherwise ONNX
Runtime, which itself prefers its TensorRT and CUDA providers and ends on the
CPU.  The decision and its reason are kept together (:class:`Choice`) so the
log line, the status page and the record's model fields all say the same.

Probing never initialises CUDA in this process through pycuda or TensorRT:
it asks the driver library (``libcuda``) directly with ctypes, which is cheap
and leaves the context to the engine's own worker thread.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: file suffixes of serialized TensorRT engines (ONNX Runtime cannot read them)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
BACKENDS = ("auto", "tensorrt", "onnxruntime")


@dataclass(frozen=True)
class Choice:
    """The back end to use and, in one line, why."""

    engine: str  # "tensorrt" or "onnxruntime"
    reason: str


def is_serialized_engine(path: str | Path) -> bool:
    """True for a TensorRT plan file (by suffix: plans have no portable magic number)."""
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def tensorrt_importable() -> bool:
    """True when the ``tensorrt`` Python package is installed (without importing it)."""
    return importlib.util.find_spec("tensorrt") is not None


def cuda_gpu_count() -> int:
    """Number of CUDA devices the driver reports; 0 without a driver or a GPU.

    Uses the driver API (``cuInit`` + ``cuDeviceGetCount``) through ctypes, the
    same library every CUDA program loads, so it works on a Jetson (no
    ``nvidia-smi`` there) and on a desktop alike.  Not cached: a GPU that was
    not ready at boot is found by the next model load (SIGHUP).
    """
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def choose_engine(requested: str, model_path: str | Path) -> Choice:
    """Resolve ``engine`` from the config into a concrete back end, with the reason."""
    requested = (requested or "auto").strip().lower()
    if requested not in BACKENDS:
        raise ValueError(f"unknown engine type {requested!r} (use {', '.join(BACKENDS)})")
    serialized = is_serialized_engine(model_path)
    if requested == "onnxruntime":
        return Choice("onnxruntime", "model.engine is onnxruntime")
    if requested == "tensorrt":
        return Choice("tensorrt", "model.engine is tensorrt")
    if serialized:
        return Choice("tensorrt", f"{Path(model_path).name} is a serialized TensorRT engine")
    if not tensorrt_importable():
        return Choice("onnxruntime", "auto: TensorRT's Python bindings are not installed")
    gpus = cuda_gpu_count()
    if gpus == 0:
        return Choice("onnxruntime", "auto: TensorRT is installed but no CUDA GPU answers")
    return Choice("tensorrt", f"auto: TensorRT is installed and {gpus} CUDA GPU(s) answer")

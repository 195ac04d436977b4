"""The engine interface every inference back end implements.

An engine owns one loaded model and runs it: it takes the preprocessed input
tensor(s) and returns the raw output arrays, nothing more.  Turning raw
outputs into boxes is the decoder's job (``engines.models``).
"""

from __future__ import annotations

import abc
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class EngineError(RuntimeError):
    """A model cannot be loaded or run; the message names the file and the cause."""


class DeviceError(EngineError):
    """The accelerator failed (CUDA error, out of GPU memory, driver not ready), not the model or the config.

    Worth a retry: the command line exits 1 for it (systemd restarts the
    service), where a bad model or config exits 2 (no restart).
    """


@dataclass(frozen=True)
class Detection:
    """One object found in one frame, in the frame's own pixel coordinates."""

    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

    def box_norm(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box divided by the frame size (0..1), same corner order."""
        x1, y1, x2, y2 = self.box
        return (x1 / width, y1 / height, x2 / width, y2 / height)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or None for a dynamic axis) and numpy dtype of a tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"


@dataclass
class EngineInfo:
    """What the engine reports about itself (shown on status pages and in records)."""

    backend: str
    provider: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """A loaded model that maps input arrays to output arrays.

    :meth:`infer` may be called from at most ``max_concurrency`` threads at
    once; the default, 1, suits back ends bound to one context and stream.
    """

    #: the ``type`` key that selects this back end in the config
    type_name: str = ""
    #: how many threads may be inside :meth:`infer` at the same time
    max_concurrency: int = 1

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: model file not found")
        self._sha256: str | None = None

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]:
        """The model's input tensors."""

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]:
        """The model's output tensors."""

    @property
    def metadata(self) -> dict[str, str]:
        """Free-form string metadata stored in the model file (may be empty)."""
        return {}

    @abc.abstractmethod
    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the model on one input batch and return its outputs in order."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """The back end, the provider actually running, and the precision."""

    def close(self) -> None:
        """Release the model's resources."""

    @property
    def sha256(self) -> str:
        """sha256 of the model file, computed once."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with self.model_path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256


# type key -> "module:Class"; modules are imported only when selected
ENGINE_TYPES: dict[str, str] = {
    "onnxruntime": "edgelabel.engines.onnxruntime:OnnxRuntimeEngine",
    "tensorrt": "edgelabel.engines.tensorrt:TensorRTEngine",
}


def create_engine(type_name: str, model_path: str | Path, **options: Any) -> Engine:
    """Instantiate the back end registered under ``type_name``."""
    target = ENGINE_TYPES.get(type_name)
    if target is None:
        allowed = ", ".join(sorted(ENGINE_TYPES))
        raise EngineError(f"unknown engine type {type_name!r} (use {allowed})")
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    return cls(model_path, **options)

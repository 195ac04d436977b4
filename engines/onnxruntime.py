"""ONNX Runtime back end (CPU, CUDA and TensorRT execution providers).

ONNX Runtime quietly falls back to the next provider - usually the CPU - when
CUDA or TensorRT libraries fail to load.  A daemon that believes it runs on
the GPU while it runs on the CPU is the most common "why is it slow" report,
so this engine reads back which provider the session actually uses, warns
when it is not the one asked for, and reports the real one in :meth:`info`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort

from edgelabel.engines.base import Engine, EngineError, EngineInfo, TensorSpec

log = logging.getLogger(__name__)

#: config short names -> ONNX Runtime provider names
PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU = "CPUExecutionProvider"

#: node types that only appear in quantized (int8/uint8) graphs
_QUANT_OPS = {
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}

#: ORT type strings -> numpy dtype names
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}

_EXPECTED = "expected an ONNX detector exported by Ultralytics, YOLOv5 or YOLOX"

ProviderEntry = Union[str, tuple[str, dict[str, Any]]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(name=node.name, shape=shape, dtype=_ORT_DTYPES.get(node.type, node.type))


def _graph_ops_precision(model_path: Path) -> str | None:
    """Precision from the graph's node types and weights, if the optional ``onnx`` package is present.

    Returns None when ``onnx`` is not installed or cannot read the file; the
    caller then falls back to cheaper hints.  ``onnx`` is deliberately not a
    dependency: it is large and only refines a status-page field.
    """
    try:
        import onnx  # optional: imported here so the engine works without it
    except ImportError:
        return None
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # any parse problem just disables this hint
        log.debug("onnx could not read %s for precision inspection: %s", model_path, exc)
        return None
    graph = model.graph
    nodes = list(graph.node)
    for fn in model.functions:
        nodes.extend(fn.node)
    if any(n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear") for n in nodes):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


class OnnxRuntimeEngine(Engine):
    """One ONNX model in one ``onnxruntime.InferenceSession``."""

    type_name = "onnxruntime"
    #: ``InferenceSession.run`` is thread-safe; concurrent calls each run on their caller's thread
    #: (plus the intra-op pool), which is how one session serves several CPU workers
    max_concurrency = 16

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] = ("tensorrt", "cuda", "cpu"),
        threads: int = 0,
        device_id: int = 0,
        fp16: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(model_path)
        requested = list(providers) or ["cpu"]
        self.device_id = int(device_id)
        self.fp16 = bool(fp16)
        self.threads = int(threads)
        self.cache_dir = cache_dir
        self.requested_providers = [self._full_name(p) for p in requested]
        entries = self._provider_entries(self.requested_providers)

        options = ort.SessionOptions()
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=entries)
        except Exception as exc:  # ORT's exception types share no base
            raise self._load_error(exc) from None

        self.active_providers: list[str] = list(self._session.get_providers())
        self.provider = self.active_providers[0] if self.active_providers else CPU
        wanted = self._provider_name(entries[0])
        if self.provider != wanted:
            log.warning(
                "%s: asked for %s but ONNX Runtime is running on %s (its libraries failed to load?)",
                self.model_path.name,
                wanted,
                self.provider,
            )
        else:
            log.info("%s: running on %s", self.model_path.name, self.provider)

        self._inputs = [_spec(i) for i in self._session.get_inputs()]
        self._outputs = [_spec(o) for o in self._session.get_outputs()]
        if not self._inputs:
            raise EngineError(f"{self.model_path}: model has no inputs ({_EXPECTED})")
        self._input_name = self._inputs[0].name
        self._output_names = [o.name for o in self._outputs]
        meta = self._session.get_modelmeta()
        self._metadata: dict[str, str] = dict(meta.custom_metadata_map)
        self._producer = meta.producer_name or ""
        self._model_precision = self._detect_precision()
        self._closed = False

    # -- providers ---------------------------------------------------------

    @staticmethod
    def _full_name(name: str) -> str:
        """Short config name (or a full ORT provider name) -> ORT provider name."""
        key = name.strip()
        if key.lower() in PROVIDER_NAMES:
            return PROVIDER_NAMES[key.lower()]
        if key.endswith("ExecutionProvider"):
            return key
        allowed = ", ".join(PROVIDER_NAMES)
        raise EngineError(f"unknown ONNX Runtime provider {name!r} (use {allowed}, or a full *ExecutionProvider name)")

    @staticmethod
    def _provider_name(entry: ProviderEntry) -> str:
        return entry if isinstance(entry, str) else entry[0]

    def _provider_entries(self, names: list[str]) -> list[ProviderEntry]:
        """Requested providers that this ORT build has, with their options, CPU last.

        ``get_available_providers()`` lists what is compiled in; whether the
        CUDA/TensorRT libraries actually load is only known after the session
        exists (see ``__init__``).
        """
        available = set(ort.get_available_providers())
        missing = [n for n in names if n not in available]
        if missing:
            log.info("ONNX Runtime providers not available in this build: %s", ", ".join(missing))
        entries: list[ProviderEntry] = []
        seen: set[str] = set()
        for name in names:
            if name == CPU:
                break  # CPU runs every node, so anything listed after it would never be used
            if name not in available or name in seen:
                continue
            seen.add(name)
            if name == "TensorrtExecutionProvider":
                trt: dict[str, Any] = {"device_id": self.device_id, "trt_fp16_enable": self.fp16}
                if self.cache_dir:
                    cache = Path(self.cache_dir)
                    cache.mkdir(parents=True, exist_ok=True)
                    trt.update(
                        trt_engine_cache_enable=True,
                        trt_engine_cache_path=str(cache),
                        trt_timing_cache_enable=True,
                    )
                entries.append((name, trt))
            elif name == "CUDAExecutionProvider":
                entries.append((name, {"device_id": self.device_id}))
            else:
                entries.append(name)
        entries.append(CPU)  # always last: the provider every build has
        return entries

    # -- loading -----------------------------------------------------------

    def _load_error(self, exc: Exception) -> EngineError:
        """One line that names the file and says what was expected."""
        kind = type(exc).__name__
        detail = _first_line(exc)
        # garbage bytes fail to parse; an empty or unrelated protobuf parses but has no graph
        if kind in ("InvalidProtobuf", "InvalidGraph") or "protobuf" in detail.lower():
            return EngineError(f"{self.model_path}: is not a valid ONNX model ({_EXPECTED})")
        return EngineError(f"{self.model_path}: ONNX Runtime cannot load the model: {detail}")

    def _detect_precision(self) -> str:
        """int8 / fp16 / fp32 of the model file (see module docs for the order of hints)."""
        graph = _graph_ops_precision(self.model_path)
        if graph is not None:
            return graph
        if self._metadata.get("onnx.infer") == "onnxruntime.quant" or self._producer == "onnx.quantize":
            return "int8"
        if self._inputs[0].dtype == "float16":
            return "fp16"
        return "fp32"

    # -- Engine API --------------------------------------------------------

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Feed ``tensor`` to the first input; return every output in model order."""
        if self._closed:
            raise EngineError(f"{self.model_path}: engine is closed")
        try:
            return list(self._session.run(self._output_names, {self._input_name: tensor}))
        except Exception as exc:  # surface ORT failures with context
            raise EngineError(
                f"{self.model_path}: inference failed for input {list(tensor.shape)} {tensor.dtype} "
                f"(model expects {list(self._inputs[0].shape)} {self._inputs[0].dtype}): {_first_line(exc)}"
            ) from None

    def info(self) -> EngineInfo:
        """Active provider and precision; TensorRT with fp16 on an fp32 graph runs fp16."""
        precision = self._model_precision
        if self.provider == "TensorrtExecutionProvider" and self.fp16 and precision == "fp32":
            precision = "fp16"
        return EngineInfo(
            backend=self.type_name,
            provider=self.provider,
            precision=precision,
            extra={
                "providers": list(self.active_providers),
                "requested_providers": list(self.requested_providers),
                "model_precision": self._model_precision,
                "onnxruntime": ort.__version__,
                "device_id": self.device_id,
                "threads": self.threads,
            },
        )

    def close(self) -> None:
        """Drop the session so its memory (GPU included) is released now, not at GC time."""
        self._closed = True
        self.__dict__.pop("_session", None)

"""A detector = one engine + the decoder for its model family.

Preprocessing, inference and decoding are separate methods so a pipeline can
run them on different threads (CPU letterbox of frame N+1 while the
accelerator runs frame N); :meth:`Detector.detect` chains them for simple
callers and times each stage, because "which stage is slow" is the first
question on a slow device.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelabel.engines.base import Detection, Engine, EngineError, create_engine
from edgelabel.engines.models.base import Decoder, LetterboxInfo
from edgelabel.engines.models.detect import DECODERS, UnsupportedModelError, detect_family, input_size
from edgelabel.engines.models.names import resolve_names
from edgelabel.engines.models.preprocess import letterbox
from edgelabel.engines.select import choose_engine, is_serialized_engine

log = logging.getLogger(__name__)

# class-count offset of each layout's channel axis (None: the layout does not tell)
_NC_OFFSET = {"yolov8": (1, 4), "yolov5": (2, 5), "yolox": (2, 5)}
_TENSOR_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class DetectResult:
    """Detections of one frame and how long each stage took (milliseconds)."""

    detections: list[Detection] = field(default_factory=list)
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.inference_ms + self.decode_ms


def _num_classes(family: str, shape: tuple[int | None, ...]) -> int | None:
    spec = _NC_OFFSET.get(family)
    if spec is None or len(shape) != 3:
        return None
    axis, offset = spec
    dim = shape[axis]
    return None if dim is None else dim - offset


def _check_image_input(engine: Engine) -> None:
    """The first input must take an image batch [N, 3, H, W]: the preprocessing makes nothing else.

    A model with a detector-shaped output but another input (an Identity of [1, 84, 8400]) passed every
    output check; ``run`` then failed on every frame and ended a job of zero labels with exit 0.
    """
    if not engine.inputs:
        raise UnsupportedModelError(f"{engine.model_path}: the model has no input; a detector takes an image [1, 3, H, W]")
    first = engine.inputs[0]
    shape = tuple(first.shape)
    if len(shape) != 4 or shape[1] not in (3, None):
        shown = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
        raise UnsupportedModelError(
            f"{engine.model_path}: input {first.name!r} has shape {shown}, not an image [N, 3, H, W]; "
            "export the detector with an image input (e.g. yolo export format=onnx)")


def _static_input(engine: Engine) -> bool:
    """True when the first input has a fixed H and W (then the grid size is known for sure)."""
    if not engine.inputs:
        return False
    shape = engine.inputs[0].shape
    return len(shape) == 4 and shape[2] is not None and shape[3] is not None


class Detector:
    """Turns BGR frames into :class:`Detection` lists with one engine and one decoder."""

    def __init__(
        self,
        engine: Engine,
        family: str = "auto",
        labels_file: str | Path | None = None,
        conf: float = 0.25,
        iou: float = 0.45,
    ) -> None:
        self.engine = engine
        #: which back end runs the model and why (set by :func:`load_detector`)
        self.engine_reason = f"engine {engine.type_name or engine.info().backend} given directly"
        #: the INT8 accuracy gate's verdict (an edge.int8gate.GateResult) when one was run
        self.int8_gate: Any = None
        self._infer_lock = threading.Lock() if int(getattr(engine, "max_concurrency", 1)) <= 1 else None
        self.conf = float(conf)
        self.iou = float(iou)
        path = engine.model_path
        metadata = engine.metadata
        out_shapes = [o.shape for o in engine.outputs]
        self.input_size: tuple[int, int] = input_size(engine.inputs, metadata)
        static_hw = self.input_size if _static_input(engine) else None
        try:
            self.family = detect_family(out_shapes, metadata, family, input_hw=static_hw,
                                        output_names=[o.name for o in engine.outputs])
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{path}: {exc}") from None
        _check_image_input(engine)  # after the outputs: "not a detector" says more than "not an image input"
        in_dtype = engine.inputs[0].dtype if engine.inputs else "float32"
        if in_dtype not in _TENSOR_DTYPES:
            raise UnsupportedModelError(
                f"{path}: input {engine.inputs[0].name!r} is {in_dtype}; only float32/float16 image inputs are supported"
            )
        self.input_dtype = _TENSOR_DTYPES[in_dtype]
        names = resolve_names(metadata, labels_file, _num_classes(self.family, out_shapes[0]))
        self.decoder: Decoder = DECODERS[self.family](names, self.input_size)
        set_names = getattr(self.decoder, "set_output_names", None)
        if set_names is not None:  # decoders of multi-output models find their tensors by name
            set_names([o.name for o in engine.outputs])
        self._check_decoder(out_shapes[0])
        log.info(
            "%s: family %s, input %dx%d, %d class names",
            path.name,
            self.family,
            self.input_size[0],
            self.input_size[1],
            len(names),
        )

    def _check_decoder(self, shape: tuple[int | None, ...]) -> None:
        """Catch a YOLOX grid/size mismatch at load time rather than on the first frame."""
        strides_for = getattr(self.decoder, "strides_for", None)
        if strides_for is not None and len(shape) == 3 and shape[1] is not None:
            try:
                strides_for(shape[1])
            except EngineError as exc:
                raise UnsupportedModelError(f"{self.engine.model_path}: {exc}") from None

    @property
    def names(self) -> list[str]:
        """Class names, index = class id."""
        return self.decoder.names

    # -- stages --------------------------------------------------------------

    def preprocess(self, image_bgr: np.ndarray) -> tuple[np.ndarray, LetterboxInfo]:
        """Letterbox a frame into the model's input tensor (thread-safe, CPU only)."""
        return letterbox(image_bgr, self.input_size, self.decoder.preprocess, dtype=self.input_dtype)

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the engine; serialised here when the engine allows one caller at a time."""
        if self._infer_lock is None:
            return self.engine.infer(tensor)
        with self._infer_lock:
            return self.engine.infer(tensor)

    def warmup(self) -> float:
        """One inference on a blank frame, so the first real frame does not pay for lazy allocations.

        ONNX Runtime sizes its memory arena and TensorRT its execution context on
        the first run; without this the first label of each worker arrives tens
        of milliseconds late.  Returns the seconds it took.
        """
        t0 = time.perf_counter()
        blank = np.full((self.input_size[0], self.input_size[1], 3), 114, np.uint8)
        tensor, _ = self.preprocess(blank)
        self.infer(tensor)
        return time.perf_counter() - t0

    def decode(self, outputs: list[np.ndarray], info: LetterboxInfo) -> list[Detection]:
        """Raw outputs -> detections in frame pixels, with this detector's thresholds."""
        return self.decoder.decode(outputs, info, self.conf, self.iou)

    def detect(self, image_bgr: np.ndarray) -> DetectResult:
        """All three stages in sequence, each timed."""
        t0 = time.perf_counter()
        tensor, info = self.preprocess(image_bgr)
        t1 = time.perf_counter()
        outputs = self.infer(tensor)
        t2 = time.perf_counter()
        detections = self.decode(outputs, info)
        t3 = time.perf_counter()
        return DetectResult(
            detections=detections,
            preprocess_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
            decode_ms=(t3 - t2) * 1000.0,
        )

    # -- reporting -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Model facts for records and status pages (sha256 is computed once, then cached)."""
        info = self.engine.info()
        return {
            "name": self.engine.model_path.stem,
            "sha256": self.engine.sha256,
            "family": self.family,
            "engine": self.engine.type_name or info.backend,
            "provider": info.provider,
            "precision": info.precision,
            "input_size": [self.input_size[0], self.input_size[1]],
            "engine_reason": self.engine_reason,
        }

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()


#: options each back end takes (``cache_dir`` and ``device_id`` are shared)
ORT_OPTIONS = frozenset({"providers", "threads", "device_id", "fp16", "cache_dir"})
TRT_OPTIONS = frozenset({"precision", "workspace_mb", "cache_dir", "device_id", "calib_images", "calib_cache",
                         "input_size", "family"})


def _make_engine(backend: str, model_path: str | Path, options: dict[str, Any]) -> Engine:
    allowed = ORT_OPTIONS if backend == "onnxruntime" else TRT_OPTIONS
    try:
        return create_engine(backend, model_path, **{k: v for k, v in options.items() if k in allowed})
    except EngineError:
        raise
    except TypeError as exc:
        raise EngineError(f"{model_path}: bad options for engine {backend!r}: {exc}") from None


def load_detector(
    model_path: str | Path,
    engine: str = "auto",
    family: str = "auto",
    labels: str | Path | None = None,
    conf: float = 0.25,
    iou: float = 0.45,
    fallback: bool = True,
    **engine_options: Any,
) -> Detector:
    """Choose and create the engine, then the detector; every failure is one line naming the file.

    ``engine`` is ``auto``, ``tensorrt`` or ``onnxruntime`` (see
    :mod:`engines.select`).  When native TensorRT cannot build or load an ONNX
    model, ONNX Runtime takes over with a warning: an appliance that labels on
    a slower path beats one that is down (``fallback=False`` raises instead,
    for callers with a better plan B).  The choice and its reason end up in
    :attr:`Detector.engine_reason`.

    Errors are :class:`EngineError` (file missing, not a model, back end
    failure) or its subclass :class:`UnsupportedModelError` (loads, but is not
    a detector layout we decode).
    """
    unknown = set(engine_options) - ORT_OPTIONS - TRT_OPTIONS
    if unknown:
        raise EngineError(f"{model_path}: unknown engine option(s) {', '.join(sorted(unknown))}")
    try:
        choice = choose_engine(engine, model_path)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    reason = choice.reason
    if choice.engine == "tensorrt":
        engine_options = {**engine_options, "family": family}  # INT8 calibration prepares images like the decoder
    try:
        backend = _make_engine(choice.engine, model_path, engine_options)
    except UnsupportedModelError:
        raise
    except EngineError as exc:
        if (not fallback or choice.engine != "tensorrt" or is_serialized_engine(model_path)
                or not Path(model_path).is_file()):
            raise
        log.warning("%s; falling back to ONNX Runtime", exc)
        reason = f"{reason}, but TensorRT failed ({exc}); fell back to ONNX Runtime"
        backend = _make_engine("onnxruntime", model_path, engine_options)
    log.info("%s: engine %s (%s)", Path(model_path).name, backend.type_name, reason)
    try:
        detector = Detector(backend, family=family, labels_file=labels, conf=conf, iou=iou)
    except EngineError:
        backend.close()
        raise
    except Exception as exc:
        backend.close()
        raise EngineError(f"{model_path}: cannot set up the detector: {exc}") from exc
    detector.engine_reason = reason
    return detector

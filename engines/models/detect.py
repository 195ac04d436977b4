"""Work out which decoder a model needs from its output shape and metadata.

Operators drop in ONNX files from Ultralytics, YOLOv5 and YOLOX without
saying which is which, so ``family: auto`` must pick the right decoder - and
must refuse, with a message that says what to set, when the shape alone cannot
tell (YOLOv5 and YOLOX both emit ``[1, N, 5+nc]``).  A wrong guess would not
crash: it would silently produce garbage boxes, which is worse.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from typing import Optional

from edgelabel.engines.base import EngineError, TensorSpec
from edgelabel.engines.models.base import Decoder
from edgelabel.engines.models.efficientnms import EfficientNMSDecoder, order_from_names, shapes_fit
from edgelabel.engines.models.end2end import EndToEndDecoder
from edgelabel.engines.models.names import names_from_metadata
from edgelabel.engines.models.yolov5 import YoloV5Decoder
from edgelabel.engines.models.yolov8 import YoloV8Decoder
from edgelabel.engines.models.yolox import STRIDES_P5, STRIDES_P6, YoloxDecoder, expected_cells

log = logging.getLogger(__name__)

Shape = Sequence[Optional[int]]


class UnsupportedModelError(EngineError):
    """The model loads but its outputs are not a detector layout this package decodes."""


#: family key (config ``model.family``) -> decoder class
DECODERS: dict[str, type[Decoder]] = {
    cls.family: cls for cls in (YoloV8Decoder, YoloV5Decoder, YoloxDecoder, EndToEndDecoder, EfficientNMSDecoder)
}

#: end2end heads emit a fixed top-K (300 by default); larger K means a dense head
END2END_MAX_K = 1000
DEFAULT_IMGSZ = 640
_NON_DETECT_TASKS = {"classify", "segment", "pose", "obb"}

SUPPORTED_LAYOUTS = "[1,4+nc,N] (yolov8: YOLOv8/YOLO11), [1,N,5+nc] (yolov5 or yolox), [1,K,6] (end2end: YOLOv10/YOLO26)"
EFFICIENTNMS_LAYOUT = "num_detections [B,1], detection_boxes [B,K,4], detection_scores [B,K], detection_classes [B,K]"


def _fmt(shapes: Sequence[Shape]) -> str:
    return ", ".join("[" + ",".join("?" if d is None else str(d) for d in s) + "]" for s in shapes)


def _fits(family: str, shape: Shape) -> str | None:
    """None when ``shape`` can be this family's output, else the reason it cannot.

    Unknown (dynamic) dimensions are given the benefit of the doubt: only the
    known ones are checked.
    """
    if len(shape) != 3:
        return f"a {family} output has 3 dimensions, this one has {len(shape)}"
    _, d1, d2 = shape
    if family == "end2end":
        if d2 is not None and d2 != 6:
            return "an end2end output is [1,K,6] (x1,y1,x2,y2,score,class)"
        return None
    if family == "yolov8":
        if d1 is not None and d1 < 5:
            return "a yolov8 output is [1,4+nc,N] with at least one class"
        if d1 is not None and d2 is not None and d1 >= d2:
            return "a yolov8 output is [1,4+nc,N] with 4+nc < N (this looks transposed: try yolov5 or yolox)"
        return None
    # yolov5 / yolox share [1, N, 5+nc]
    if d2 is not None and d2 < 6:
        return f"a {family} output is [1,N,5+nc] with at least one class"
    if d1 is not None and d2 is not None and d1 <= d2:
        return f"a {family} output is [1,N,5+nc] with N > 5+nc (this looks like [1,4+nc,N]: try yolov8)"
    return None


def _check_task(metadata: dict[str, str], shapes: Sequence[Shape]) -> None:
    """Refuse Ultralytics models whose metadata says they are not plain detectors."""
    task = metadata.get("task", "").strip().lower()
    if task in _NON_DETECT_TASKS or "kpt_shape" in metadata:
        kind = task or "pose"
        raise UnsupportedModelError(
            f"model is an Ultralytics {kind} model (outputs {_fmt(shapes)}); only detection models are supported: {SUPPORTED_LAYOUTS}"
        )


def _check_class_count(family: str, shape: Shape, metadata: dict[str, str]) -> None:
    """A names list that disagrees with the channel count means extra channels (masks, keypoints)."""
    names = names_from_metadata(metadata)
    if names is None or family == "end2end" or len(shape) != 3:
        return
    channels = shape[1] if family == "yolov8" else shape[2]
    if channels is None:
        return
    nc = channels - (4 if family == "yolov8" else 5)
    if nc != len(names):
        raise UnsupportedModelError(
            f"output {_fmt([shape])} has {nc} class channels for the {family} layout but the metadata names "
            f"{len(names)} classes; extra channels usually mean a segmentation or pose head, which is not "
            f"supported (supported: {SUPPORTED_LAYOUTS})"
        )


def _grid_family(num_rows: int, input_hw: tuple[int, int] | None) -> str | None:
    """Tell YOLOX from YOLOv5 by how many rows the head emits at this input size.

    YOLOX is anchor-free: one row per grid cell over strides 8/16/32 (or up
    to 64).  YOLOv5 has three anchors per cell, so three times as many rows.
    The shapes are identical otherwise, so this count is the only signal a
    metadata-less export carries.
    """
    if input_hw is None:
        return None
    for strides in (STRIDES_P5, STRIDES_P6):
        cells = expected_cells(input_hw, strides)
        if num_rows == cells:
            return "yolox"
        if num_rows == 3 * cells:
            return "yolov5"
    return None


def _efficientnms(shapes: list[tuple], hint: str, output_names: Sequence[str] | None) -> str | None:
    """``"efficientnms"`` for four EfficientNMS_TRT outputs, None when the outputs are something else.

    Auto-detection needs the output names (four unnamed 2-3D outputs could be
    anything); an explicit ``model.family: efficientnms`` is checked against
    the names when given, else against the shapes in the plugin's order.
    """
    order = order_from_names(output_names) if output_names is not None else None
    if hint == "efficientnms":
        if output_names is not None and order is None:
            raise UnsupportedModelError(
                f"model.family is 'efficientnms' but the output names {list(output_names)} are not the four EfficientNMS "
                f"outputs ({EFFICIENTNMS_LAYOUT})"
            )
        reason = shapes_fit(shapes, order or (0, 1, 2, 3))
        if reason is not None:
            raise UnsupportedModelError(f"model.family is 'efficientnms' but the outputs are {_fmt(shapes)}: {reason}")
        return "efficientnms"
    if hint == "auto" and order is not None and shapes_fit(shapes, order) is None:
        return "efficientnms"
    return None


def detect_family(
    output_shapes: list[tuple],
    metadata: dict[str, str],
    hint: str = "auto",
    input_hw: tuple[int, int] | None = None,
    output_names: Sequence[str] | None = None,
) -> str:
    """Return the decoder family for a model, or raise :class:`UnsupportedModelError`.

    With ``hint`` set, it is validated against the output shape so a wrong
    ``model.family`` fails at load time instead of producing nonsense boxes.
    ``input_hw`` (the static model input size, optional) lets ``auto`` tell a
    metadata-less YOLOX from a YOLOv5 by the row count of ``[1, N, 5+nc]``.
    ``output_names`` (optional, in the same order as ``output_shapes``) lets
    ``auto`` recognise the four outputs of TensorRT's EfficientNMS plugin.
    """
    shapes = [tuple(s) for s in output_shapes]
    hint = (hint or "auto").strip().lower()
    if hint != "auto" and hint not in DECODERS:
        raise UnsupportedModelError(f"unknown model family {hint!r} (use auto, {', '.join(sorted(DECODERS))})")
    if not shapes:
        raise UnsupportedModelError("model has no outputs")
    _check_task(metadata, shapes)
    nms_family = _efficientnms(shapes, hint, output_names)
    if nms_family is not None:
        return nms_family
    if len(shapes) != 1:
        extra = f"; four outputs named like {EFFICIENTNMS_LAYOUT} are the efficientnms family" if len(shapes) == 4 else ""
        raise UnsupportedModelError(
            f"model has {len(shapes)} outputs {_fmt(shapes)}; detectors with one output are supported: "
            f"{SUPPORTED_LAYOUTS} (two outputs usually mean a segmentation model){extra}"
        )
    shape = shapes[0]

    if hint != "auto":
        reason = _fits(hint, shape)
        if reason is not None:
            raise UnsupportedModelError(f"model.family is {hint!r} but the output is {_fmt(shapes)}: {reason}")
        _check_class_count(hint, shape, metadata)
        return hint

    if len(shape) != 3:
        raise UnsupportedModelError(f"output {_fmt(shapes)} is not a detector layout (a classifier?); supported: {SUPPORTED_LAYOUTS}")
    _, d1, d2 = shape
    if metadata.get("end2end", "").strip() == "True" and _fits("end2end", shape) is None:
        return "end2end"
    if d2 == 6 and d1 is not None and d1 <= END2END_MAX_K:
        return "end2end"
    if d1 is not None and _fits("yolov8", shape) is None:
        _check_class_count("yolov8", shape, metadata)
        return "yolov8"
    if _fits("yolov5", shape) is None and d2 is not None:
        if "stride" in metadata or "names" in metadata:
            _check_class_count("yolov5", shape, metadata)
            return "yolov5"
        by_grid = _grid_family(d1, input_hw) if d1 is not None else None
        if by_grid is not None:
            return by_grid
        raise UnsupportedModelError(
            f"output {_fmt(shapes)} is [1,N,5+nc], which YOLOv5 and YOLOX both produce and the model has no "
            "metadata (and no row count matching a known grid) to tell them apart; set model.family to yolov5 or yolox"
        )
    raise UnsupportedModelError(
        f"output {_fmt(shapes)} is not a supported detector layout; supported: {SUPPORTED_LAYOUTS} "
        "(set model.family if the shape is dynamic)"
    )


def input_size(engine_inputs: list[TensorSpec], metadata: dict[str, str]) -> tuple[int, int]:
    """Model input (height, width): static input shape, else metadata ``imgsz``, else 640.

    Dynamic-shape exports carry the training size in ``imgsz``; running them
    at that size keeps results comparable with the exporter's own numbers.
    """
    if engine_inputs:
        shape = engine_inputs[0].shape
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0:
            return int(shape[2]), int(shape[3])
    raw = metadata.get("imgsz")
    if raw:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, int) and value > 0:
            return value, value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
            return int(value[0]), int(value[1])
        log.warning("model metadata imgsz=%r is not understood; using %d", raw, DEFAULT_IMGSZ)
    return DEFAULT_IMGSZ, DEFAULT_IMGSZ

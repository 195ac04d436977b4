"""Class names for a model: labels file, model metadata, or the COCO default.

Labels end up in every record, so a wrong list silently mislabels a data set.
The order of preference is therefore "what the operator said" (a labels
file), then "what the model says" (Ultralytics/YOLOv5 ``names`` metadata),
and only then a guess (COCO-80 when the model has exactly 80 classes).
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

from edgelabel.engines.base import EngineError

log = logging.getLogger(__name__)

#: the 80 COCO detection classes in the order every COCO-trained YOLO uses
COCO80: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]  # fmt: skip


def _names_from_value(value: Any) -> list[str] | None:
    """Turn a parsed ``names`` value (dict id->name or list) into a dense list."""
    if isinstance(value, dict):
        try:
            table = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if not table or min(table) < 0:
            return None
        return [table.get(i, f"class_{i}") for i in range(max(table) + 1)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value] or None
    return None


def names_from_metadata(meta: dict[str, str]) -> list[str] | None:
    """Class names from Ultralytics/YOLOv5 ONNX metadata, or None if absent/unreadable.

    Exporters store ``str(dict)`` (a Python literal, single quotes), not JSON,
    so the value is parsed with :func:`ast.literal_eval` - never ``eval``,
    because model files come from outside and must not run code.
    """
    raw = meta.get("names")
    if not raw:
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        log.warning("model metadata 'names' is not a Python literal; ignoring it")
        return None
    names = _names_from_value(value)
    if names is None:
        log.warning("model metadata 'names' has an unexpected form (%s); ignoring it", type(value).__name__)
    return names


def load_labels_file(path: str | Path) -> list[str]:
    """Read one class name per line (blank lines ignored, surrounding space stripped).

    Errors name the file, because a labels path typo is the most common
    configuration mistake and the message is all the operator sees.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineError(f"{p}: labels file not found") from None
    except UnicodeDecodeError:
        raise EngineError(f"{p}: labels file is not UTF-8 text (expected one class name per line)") from None
    except OSError as exc:
        raise EngineError(f"{p}: labels file cannot be read ({exc.strerror or exc})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise EngineError(f"{p}: labels file is empty (expected one class name per line)")
    return names


def resolve_names(
    meta: dict[str, str],
    labels_file: str | Path | None,
    num_classes: int | None,
) -> list[str]:
    """Pick the class names: labels file > metadata > COCO-80 (if nc == 80) > ``class_<i>``.

    ``num_classes`` is None when the output layout does not reveal it
    (end-to-end models); then no count check is possible and, without a
    labels file or metadata, the list is empty (decoders fall back to ids).
    """
    source = ""
    names: list[str] | None = None
    if labels_file:
        names, source = load_labels_file(labels_file), f"labels file {labels_file}"
    if names is None:
        names = names_from_metadata(meta)
        source = "model metadata"
    if names is None:
        if num_classes == 80:
            return list(COCO80)
        if num_classes is None:
            log.warning("model has no class names and its output does not tell the class count; using class ids")
            return []
        log.warning("model has no class names; using class_0..class_%d (set model.labels)", num_classes - 1)
        return [f"class_{i}" for i in range(num_classes)]
    if num_classes is not None and len(names) != num_classes:
        log.warning(
            "%s lists %d class names but the model outputs %d classes; labels may be wrong",
            source,
            len(names),
            num_classes,
        )
        if len(names) < num_classes:
            names = names + [f"class_{i}" for i in range(len(names), num_classes)]
    return names

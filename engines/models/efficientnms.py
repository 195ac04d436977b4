"""Decoder for models that end in TensorRT's EfficientNMS_TRT plugin (NMS on the GPU).

Such models (YOLOv8/YOLOv7 "end2end" exports for TensorRT) have four outputs:

* ``num_detections``    ``[B, 1]`` int32 - how many rows below are valid,
* ``detection_boxes``   ``[B, K, 4]`` x1, y1, x2, y2 in model-input pixels,
* ``detection_scores``  ``[B, K]``,
* ``detection_classes`` ``[B, K]`` (int32 in the plugin; some exports cast to float).

Rows past ``num_detections`` are padding (zeros or stale values) and must be
ignored.  The model already suppressed overlaps, so only the confidence
threshold is applied here.  Exporters name and order the outputs differently
(``num_dets``/``det_boxes``/``det_scores``/``det_classes``, ``labels``, ...),
so the decoder finds them by name when names are known
(:meth:`EfficientNMSDecoder.set_output_names`), and otherwise by shape and
dtype: the only ``[B, K, 4]`` output is the boxes, an integer ``[B, 1]`` the
count, and of the two ``[B, K]`` outputs the integer one holds the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Optional

import numpy as np

from edgelabel.engines.base import Detection, EngineError
from edgelabel.engines.models.base import Decoder, LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.nms import to_detections

Shape = Sequence[Optional[int]]
#: (num, boxes, scores, classes) output indices
Order = tuple[int, int, int, int]

ROLES = ("num", "boxes", "scores", "classes")
DEFAULT_ORDER: Order = (0, 1, 2, 3)

# substrings that identify each output; checked on the lower-cased name
_ROLE_WORDS: dict[str, tuple[str, ...]] = {
    "num": ("num",),
    "boxes": ("box",),
    "scores": ("score",),
    "classes": ("class", "label"),
}


def order_from_names(names: Sequence[str]) -> Order | None:
    """Indices of (num, boxes, scores, classes) among ``names``, or None when they are not EfficientNMS outputs.

    Each role must match exactly one of exactly four names (``num_detections``
    / ``num_dets``, ``detection_boxes`` / ``det_boxes`` / ``bboxes``,
    ``*score*``, ``*class*`` / ``*label*``); anything ambiguous returns None so
    the caller can refuse with a clear message rather than guess.
    """
    if len(names) != 4:
        return None
    lowered = [str(n).lower() for n in names]
    found: list[int] = []
    for role in ROLES:
        hits = [i for i, name in enumerate(lowered) if any(word in name for word in _ROLE_WORDS[role])]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    if len(set(found)) != 4:
        return None
    return (found[0], found[1], found[2], found[3])


def shapes_fit(shapes: Sequence[Shape], order: Order) -> str | None:
    """None when the shapes fit EfficientNMS's outputs in ``order``, else the reason they do not.

    Unknown (dynamic) dimensions are accepted; K must agree between boxes,
    scores and classes where it is known.
    """
    if len(shapes) != 4:
        return f"EfficientNMS models have 4 outputs, this one has {len(shapes)}"
    num, boxes, scores, classes = (tuple(shapes[i]) for i in order)
    if len(num) != 2 or num[1] not in (None, 1):
        return f"num_detections should be [B,1], got {list(num)}"
    if len(boxes) != 3 or boxes[2] not in (None, 4):
        return f"detection_boxes should be [B,K,4], got {list(boxes)}"
    if len(scores) != 2 or len(classes) != 2:
        return f"detection_scores and detection_classes should be [B,K], got {list(scores)} and {list(classes)}"
    ks = {k for k in (boxes[1], scores[1], classes[1]) if k is not None}
    if len(ks) > 1:
        return f"boxes, scores and classes disagree on K: {list(boxes)}, {list(scores)}, {list(classes)}"
    return None


def order_from_arrays(outputs: Sequence[np.ndarray]) -> Order:
    """Work out (num, boxes, scores, classes) from the arrays themselves when no names were given."""
    if len(outputs) != 4:
        raise EngineError(f"efficientnms decoder expects 4 outputs, got {len(outputs)}")
    boxes = [i for i, a in enumerate(outputs) if a.ndim == 3 and a.shape[2] == 4]
    rest = [i for i in range(4) if i not in boxes]
    pairs = [i for i in rest if outputs[i].ndim == 2]
    if len(boxes) != 1 or len(pairs) != 3:
        raise EngineError(f"efficientnms outputs {[list(a.shape) for a in outputs]} are not [B,1], [B,K,4], [B,K], [B,K]")
    k = outputs[boxes[0]].shape[1]
    nums = [i for i in pairs if outputs[i].shape[1] == 1 and np.issubdtype(outputs[i].dtype, np.integer)]
    if len(nums) != 1:
        nums = [i for i in pairs if outputs[i].shape[1] == 1 and k != 1]
    if len(nums) != 1:
        raise EngineError("efficientnms: cannot tell num_detections from the other outputs; set the output names")
    per_row = [i for i in pairs if i != nums[0]]
    ints = [i for i in per_row if np.issubdtype(outputs[i].dtype, np.integer)]
    if len(ints) == 1:
        classes = ints[0]
        scores = next(i for i in per_row if i != classes)
    else:  # both float: take them in the plugin's order (scores before classes)
        scores, classes = per_row
    return (nums[0], boxes[0], scores, classes)


class EfficientNMSDecoder(Decoder):
    """Four EfficientNMS_TRT outputs -> detections; thresholds only, no host NMS."""

    family: ClassVar[str] = "efficientnms"
    # the usual source is an Ultralytics YOLOv8/YOLO11 model: centred letterbox, RGB, /255
    preprocess: ClassVar[PreprocessSpec] = PreprocessSpec(center=True, pad_value=114, rgb=True, scale=1.0 / 255.0)

    def __init__(self, names: list[str], input_size: tuple[int, int], output_order: Order | None = None) -> None:
        super().__init__(names, input_size)
        #: indices of (num, boxes, scores, classes) in the outputs list; None = work it out from the arrays
        self.output_order: Order | None = output_order

    def set_output_names(self, names: Sequence[str]) -> None:
        """Fix :attr:`output_order` from the engine's output names (any order of the four)."""
        order = order_from_names(names)
        if order is None:
            raise EngineError(
                f"output names {list(names)} are not the four EfficientNMS outputs (num_detections, detection_boxes, "
                "detection_scores, detection_classes)"
            )
        self.output_order = order

    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Valid rows (first ``num_detections``) above ``conf``, best first, in frame pixels; ``iou`` is unused."""
        if len(outputs) != 4:
            raise EngineError(f"efficientnms decoder expects 4 outputs, got {len(outputs)}")
        if self.output_order is None:
            self.output_order = order_from_arrays(outputs)
        i_num, i_boxes, i_scores, i_classes = self.output_order
        boxes = np.asarray(outputs[i_boxes])
        if boxes.ndim != 3 or boxes.shape[2] != 4:
            raise EngineError(f"efficientnms decoder expects detection_boxes [B,K,4], got {list(boxes.shape)}")
        k = boxes.shape[1]
        count = int(np.asarray(outputs[i_num]).reshape(-1)[0]) if np.asarray(outputs[i_num]).size else 0
        count = max(0, min(count, k))
        if count == 0:
            return []
        scores = np.asarray(outputs[i_scores]).reshape(boxes.shape[0], -1)[0, :count].astype(np.float32)
        classes = np.asarray(outputs[i_classes]).reshape(boxes.shape[0], -1)[0, :count]
        rows = boxes[0, :count].astype(np.float32)
        keep = scores > conf
        if not keep.any():
            return []
        rows, scores, classes = rows[keep], scores[keep], classes[keep]
        order = np.argsort(-scores, kind="stable")
        class_ids = np.rint(classes[order].astype(np.float64)).astype(np.int64)
        return to_detections(info.to_frame(rows[order]), scores[order], class_ids, self.label)

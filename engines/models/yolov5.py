"""YOLOv5 (ultralytics/yolov5 export) decoder.

Output ``[1, N, 5+nc]``: per anchor ``cx, cy, w, h`` in model-input pixels,
a sigmoid objectness, then ``nc`` sigmoid class probabilities; the graph has
already applied the grid/anchor decode.  Score = objectness x class prob.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgelabel.engines.base import Detection, EngineError
from edgelabel.engines.models.base import Decoder, LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.nms import MAX_DET, batched_nms, cxcywh_to_xyxy, to_detections


class YoloV5Decoder(Decoder):
    """Anchor-based head with objectness, boxes already in input pixels."""

    family: ClassVar[str] = "yolov5"
    preprocess: ClassVar[PreprocessSpec] = PreprocessSpec(center=True, pad_value=114, rgb=True, scale=1.0 / 255.0)
    agnostic: ClassVar[bool] = False
    max_det: ClassVar[int] = MAX_DET

    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Objectness pre-filter, then obj*cls best class, NMS per class, map to frame."""
        out = outputs[0]
        if out.ndim != 3 or out.shape[2] < 6:
            raise EngineError(f"yolov5 decoder expects an output of shape [1, N, 5+nc], got {list(out.shape)}")
        pred = out[0]
        # cheap first cut on objectness alone, as YOLOv5's own NMS does: obj*cls <= obj
        pred = pred[pred[:, 4] > conf]
        if pred.shape[0] == 0:
            return []
        return decode_objectness_rows(self, pred, info, conf, iou)


def decode_objectness_rows(
    decoder: Decoder,
    pred: np.ndarray,
    info: LetterboxInfo,
    conf: float,
    iou: float,
) -> list[Detection]:
    """Shared tail of YOLOv5 and YOLOX: rows of ``cx, cy, w, h, obj, cls...`` in input px.

    Kept as one function so both families score and suppress identically.
    """
    cls_scores = pred[:, 5:] * pred[:, 4:5]
    class_ids = cls_scores.argmax(axis=1)
    scores = np.take_along_axis(cls_scores, class_ids[:, None], axis=1)[:, 0]
    keep = scores > conf
    if not keep.any():
        return []
    boxes = cxcywh_to_xyxy(pred[keep, :4].astype(np.float32))
    scores, class_ids = scores[keep], class_ids[keep]
    agnostic = bool(getattr(decoder, "agnostic", False))
    max_det = int(getattr(decoder, "max_det", MAX_DET))
    idx = batched_nms(boxes, scores, class_ids, iou, agnostic=agnostic, max_det=max_det)
    return to_detections(info.to_frame(boxes[idx]), scores[idx], class_ids[idx], decoder.label)

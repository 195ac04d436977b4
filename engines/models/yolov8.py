"""YOLOv8 / YOLO11 (Ultralytics, non-end-to-end) decoder.

Output ``[1, 4+nc, N]``: per anchor ``cx, cy, w, h`` in model-input pixels
(DFL already decoded) followed by ``nc`` sigmoid class scores, with no
objectness column.  The score of an anchor is its best class score.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgelabel.engines.base import Detection, EngineError
from edgelabel.engines.models.base import Decoder, LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.nms import MAX_DET, batched_nms, cxcywh_to_xyxy, to_detections

#: candidates kept for NMS after the confidence filter (Ultralytics' max_nms)
MAX_NMS = 30000


class YoloV8Decoder(Decoder):
    """Transposed, objectness-free YOLO head (YOLOv8, YOLO11 and Ultralytics' YOLOv5u)."""

    family: ClassVar[str] = "yolov8"
    preprocess: ClassVar[PreprocessSpec] = PreprocessSpec(center=True, pad_value=114, rgb=True, scale=1.0 / 255.0)
    #: class-aware NMS, as Ultralytics' predict() does by default
    agnostic: ClassVar[bool] = False
    max_det: ClassVar[int] = MAX_DET

    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Filter anchors by best class score, NMS per class, map to frame pixels."""
        out = outputs[0]
        if out.ndim != 3 or out.shape[1] < 5:
            raise EngineError(f"yolov8 decoder expects an output of shape [1, 4+nc, N], got {list(out.shape)}")
        pred = out[0]  # (4+nc, N): rows are fields, columns anchors; no transpose copy needed
        cls_scores = pred[4:]
        # max first (one pass over nc x N), argmax only for the few survivors
        best = cls_scores.max(axis=0)
        keep = np.flatnonzero(best > conf)
        if keep.size == 0:
            return []
        if keep.size > MAX_NMS:
            keep = keep[np.argsort(-best[keep], kind="stable")[:MAX_NMS]]
        scores = best[keep].astype(np.float32)
        class_ids = cls_scores[:, keep].argmax(axis=0)
        boxes = cxcywh_to_xyxy(pred[:4, keep].T.astype(np.float32))
        idx = batched_nms(boxes, scores, class_ids, iou, agnostic=self.agnostic, max_det=self.max_det)
        return to_detections(info.to_frame(boxes[idx]), scores[idx], class_ids[idx], self.label)

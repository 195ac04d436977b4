"""Non-maximum suppression and small box helpers in plain numpy.

The families that need NMS (YOLOv8/11, YOLOv5, YOLOX) emit thousands of
candidates; after the confidence filter only tens remain, so a greedy numpy
loop is fast enough and keeps the package free of torch/torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np

from edgelabel.engines.base import Detection

#: default cap on the detections kept per image (Ultralytics uses the same)
MAX_DET = 300


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (continuous coordinates, as in :func:`nms`); 0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou: float, max_det: int = MAX_DET) -> np.ndarray:
    """Greedy NMS; returns the indices of the kept boxes, highest score first.

    Boxes are continuous xyxy coordinates (no ``+1`` on widths, as in
    torchvision), so results match what Ultralytics reports.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if boxes.shape[0] == 0 or max_det <= 0:
        return np.empty(0, dtype=np.int64)

    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    # stable sort so equal scores keep their input order (deterministic output)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0 and len(keep) < max_det:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if rest.size == 0:
            break
        iw = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = iw * ih
        union = areas[best] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou: float,
    agnostic: bool = False,
    max_det: int = MAX_DET,
) -> np.ndarray:
    """Per-class NMS in one pass; returns kept indices, highest score first.

    Class awareness uses the usual coordinate-offset trick: each class's boxes
    are shifted by ``class_id * (max coordinate + 1)`` so boxes of different
    classes can never overlap, and one NMS call does the work of one per class.
    ``agnostic=True`` lets a strong box of one class suppress another class.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    if agnostic:
        return nms(boxes, scores, iou, max_det=max_det)
    offset = float(np.abs(boxes).max()) + 1.0
    shifted = boxes + (np.asarray(class_ids, dtype=np.float32).reshape(-1, 1) * offset)
    return nms(shifted, scores, iou, max_det=max_det)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre/size boxes (YOLO heads) to corner boxes (NMS, records)."""
    out = np.empty_like(boxes, dtype=np.float32)
    half_w = boxes[:, 2] / 2.0
    half_h = boxes[:, 3] / 2.0
    out[:, 0] = boxes[:, 0] - half_w
    out[:, 1] = boxes[:, 1] - half_h
    out[:, 2] = boxes[:, 0] + half_w
    out[:, 3] = boxes[:, 1] + half_h
    return out


def to_detections(
    boxes_frame: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    label: Callable[[int], str],
) -> list[Detection]:
    """Package final arrays as :class:`Detection` objects with plain Python numbers.

    Plain floats/ints (not numpy scalars) so records serialise to JSON as-is.
    """
    result: list[Detection] = []
    for box, score, cls in zip(boxes_frame.tolist(), scores.tolist(), class_ids.tolist(), strict=True):
        cid = int(cls)
        result.append(Detection(class_id=cid, label=label(cid), score=float(score), box=(box[0], box[1], box[2], box[3])))
    return result

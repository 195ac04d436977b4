"""End-to-end (NMS-free) decoder: YOLOv10, YOLO26, and Ultralytics ``nms=True`` exports.

Output ``[1, K, 6]`` rows of ``x1, y1, x2, y2, score, class`` in model-input
pixels, already suppressed by the model; only the confidence threshold is
applied here (running NMS again would only drop valid overlapping objects).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgelabel.engines.base import Detection, EngineError
from edgelabel.engines.models.base import Decoder, LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.nms import to_detections


class EndToEndDecoder(Decoder):
    """Boxes come out final; threshold, map to the frame, done."""

    family: ClassVar[str] = "end2end"
    preprocess: ClassVar[PreprocessSpec] = PreprocessSpec(center=True, pad_value=114, rgb=True, scale=1.0 / 255.0)

    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Keep rows above ``conf`` (``iou`` is unused: the model did its own NMS)."""
        out = outputs[0]
        if out.ndim != 3 or out.shape[2] != 6:
            raise EngineError(f"end2end decoder expects an output of shape [1, K, 6], got {list(out.shape)}")
        rows = out[0]
        rows = rows[rows[:, 4] > conf]
        if rows.shape[0] == 0:
            return []
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        class_ids = np.rint(rows[:, 5]).astype(np.int64)
        return to_detections(info.to_frame(rows[:, :4]), rows[:, 4], class_ids, self.label)

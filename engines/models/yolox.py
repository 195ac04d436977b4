"""YOLOX (Megvii) decoder for exports without ``--decode_in_inference`` (the default).

Output ``[1, N, 5+nc]`` holds raw regressions per grid cell: ``dx, dy`` and
``log w, log h`` relative to the cell and stride, then objectness and class
scores that are already sigmoid.  ``N`` is the number of cells over strides
8/16/32 (plus 64 for P6 models) at the model input size, which is how the
grids are reconstructed here.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgelabel.engines.base import Detection, EngineError
from edgelabel.engines.models.base import Decoder, LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.nms import MAX_DET
from edgelabel.engines.models.yolov5 import decode_objectness_rows

STRIDES_P5 = (8, 16, 32)
STRIDES_P6 = (8, 16, 32, 64)


def grid_cells(input_size: tuple[int, int], strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Cell origins ``(N, 2)`` as x, y and per-cell stride ``(N, 1)`` in YOLOX's output order.

    For each stride the cells run row by row (x fastest), strides in ascending
    order, exactly as the head flattens its feature maps.
    """
    height, width = input_size
    grids: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    for stride in strides:
        rows, cols = height // stride, width // stride
        xs, ys = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
        grids.append(np.stack((xs, ys), axis=2).reshape(-1, 2))
        steps.append(np.full((rows * cols, 1), stride, dtype=np.float32))
    return np.concatenate(grids), np.concatenate(steps)


def expected_cells(input_size: tuple[int, int], strides: tuple[int, ...]) -> int:
    """How many rows a YOLOX head with these strides emits at this input size."""
    height, width = input_size
    return sum((height // s) * (width // s) for s in strides)


class YoloxDecoder(Decoder):
    """Grid decode on the host, then the same obj*cls scoring and NMS as YOLOv5."""

    family: ClassVar[str] = "yolox"
    # YOLOX preproc: top-left, pad 114, BGR, raw 0-255 (no /255, no mean/std)
    preprocess: ClassVar[PreprocessSpec] = PreprocessSpec(center=False, pad_value=114, rgb=False, scale=1.0)
    agnostic: ClassVar[bool] = False
    max_det: ClassVar[int] = MAX_DET

    def __init__(self, names: list[str], input_size: tuple[int, int]) -> None:
        super().__init__(names, input_size)
        self._grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def strides_for(self, num_cells: int) -> tuple[int, ...]:
        """The stride set whose cell count matches the output, or EngineError explaining."""
        for strides in (STRIDES_P5, STRIDES_P6):
            if expected_cells(self.input_size, strides) == num_cells:
                return strides
        p5, p6 = expected_cells(self.input_size, STRIDES_P5), expected_cells(self.input_size, STRIDES_P6)
        raise EngineError(
            f"yolox output has {num_cells} rows but a {self.input_size[0]}x{self.input_size[1]} input gives "
            f"{p5} (strides 8/16/32) or {p6} (with 64); is this a YOLOX model exported without "
            "--decode_in_inference, or a YOLOv5 model (set model.family: yolov5)?"
        )

    def _grid(self, num_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """Grids are computed once per output size and reused for every frame."""
        cached = self._grids.get(num_cells)
        if cached is None:
            cached = grid_cells(self.input_size, self.strides_for(num_cells))
            self._grids[num_cells] = cached
        return cached

    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Objectness pre-filter, grid decode of the survivors, obj*cls, NMS per class."""
        out = outputs[0]
        if out.ndim != 3 or out.shape[2] < 6:
            raise EngineError(f"yolox decoder expects an output of shape [1, N, 5+nc], got {list(out.shape)}")
        pred = out[0]
        grid, stride = self._grid(pred.shape[0])
        keep = np.flatnonzero(pred[:, 4] > conf)
        if keep.size == 0:
            return []
        rows = pred[keep].astype(np.float32)  # fancy indexing already copies; decode in place
        rows[:, 0:2] = (rows[:, 0:2] + grid[keep]) * stride[keep]
        rows[:, 2:4] = np.exp(rows[:, 2:4]) * stride[keep]
        return decode_objectness_rows(self, rows, info, conf, iou)

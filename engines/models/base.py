"""Decoder interface: per-family preprocessing (as data) and output decoding."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgelabel.engines.base import Detection


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model family wants its input image prepared.

    Families differ only in these values, so one letterbox function serves all.
    """

    center: bool = True  # True: pad evenly on both sides; False: image at top-left
    pad_value: int = 114
    rgb: bool = True  # True: swap BGR (OpenCV) to RGB
    scale: float = 1.0 / 255.0  # multiply pixel values by this


@dataclass(frozen=True)
class LetterboxInfo:
    """What the letterbox did, so boxes can be mapped back to the frame."""

    ratio: float
    pad_x: float
    pad_y: float
    width: int  # original frame width
    height: int  # original frame height

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[N,4]`` xyxy boxes from model-input pixels to frame pixels, clipped."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.ratio
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.ratio
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out


class Decoder(abc.ABC):
    """Turns one model family's raw outputs into detections in frame pixels."""

    #: the ``family`` key in the config
    family: ClassVar[str]
    #: preprocessing this family expects
    preprocess: ClassVar[PreprocessSpec]

    def __init__(self, names: list[str], input_size: tuple[int, int]) -> None:
        self.names = names
        self.input_size = input_size  # (height, width) of the model input

    @abc.abstractmethod
    def decode(
        self,
        outputs: list[np.ndarray],
        info: LetterboxInfo,
        conf: float,
        iou: float,
    ) -> list[Detection]:
        """Detections above ``conf`` after NMS (where the family needs it)."""

    def label(self, class_id: int) -> str:
        if 0 <= class_id < len(self.names):
            return self.names[class_id]
        return str(class_id)

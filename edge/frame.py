"""The frame record that flows from a source to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    """One decoded image from a source.

    ``key`` identifies the frame stably across restarts (a file path for a
    folder, ``<uri>#<index>`` for a video file, ``<uri>@<capture ns>`` for a
    live camera); record ids are derived from it.
    """

    source: str  # source name from the config
    index: int  # 0-based position in the source's stream
    image: np.ndarray  # HxWx3 uint8, BGR
    captured_at: float  # epoch seconds (UTC)
    key: str
    path: str | None = None  # original file for image sources
    live: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

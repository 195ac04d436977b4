"""The frame record that flows from a source to the pipeline."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    """One decoded image from a source.

    ``key`` identifies the frame stably across restarts (a file path for a
    folder, ``<uri>#<index>`` for a video file, ``<uri>@<capture ns>`` for a
    live camera and a looped video); record ids are derived from it.

    ``captured_at`` is the clock the tracker, track events and capture rate
    limits run on, so it must advance like the scene did, not like our
    processing: a live source stamps the capture time; a video file its media
    time (the start of the recording plus the frame's position, see
    ``edge.sources.video``); an image file its modification time.
    ``media_time`` is the position in the file (seconds from its start, video
    files only).  ``read_at`` is the wall-clock time the source returned the
    frame, for status pages and latency figures.
    """

    source: str  # source name from the config
    index: int  # 0-based position in the source's stream
    image: np.ndarray  # HxWx3 uint8, BGR
    captured_at: float  # epoch seconds (UTC): capture, media or file time (see above)
    key: str
    path: str | None = None  # original file for image sources
    live: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    media_time: float | None = None  # seconds from the start of the video file
    read_at: float = field(default_factory=time.time)  # wall clock when the source returned it

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def text_path(path: str) -> str:
    """A file path as text every sink can store: UTF-8 names unchanged, other bytes as ``\\xNN``.

    Names from SMB shares and USB sticks are often Latin-1; Python hands them over with surrogate escapes,
    which SQLite, JSON over MQTT and UTF-8 files all refuse.  The escaped form is stable (the same bytes give
    the same text, so frame keys and record ids do not change between runs) and cannot collide with a real
    UTF-8 name.  The file itself is still opened by its real path.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path

"""Storage inputs that used to stall or lose work silently: oversized video frames, reused file names,
copies that pause half-way, videos still being written, and reads that make no progress.

Every fault is made for real in tmp_path (a real MJPG written by OpenCV, real JPEG bytes cut and appended).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.imageio import MAX_IMAGE_PIXELS
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.edge.sources.video import VideoSource


def cfg(uri: str, name: str = "src", **kw: Any) -> SourceConfig:
    return SourceConfig(uri=uri, name=name, **kw)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


# --------------------------------------------------------------------------- video frames over the pixel limit

#: a side whose square is over the 100 MP limit (a multiple of 16, so the MJPG encoder pads nothing)
BIG_SIDE = 10016


class _CountingCapture:
    """Delegates to a real capture and counts the calls that decode or demux a frame."""

    def __init__(self, cap: cv2.VideoCapture) -> None:
        self._cap = cap
        self.decodes = 0

    def read(self) -> tuple[bool, Any]:
        self.decodes += 1
        return self._cap.read()

    def grab(self) -> bool:
        self.decodes += 1
        return self._cap.grab()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cap, name)


@pytest.fixture(scope="module")
def huge_mjpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two all-black 10016x10016 MJPG frames (~1.5 MB on disk), written by a child process so the ~0.5 GB the
    encoder needs is not kept by the test process."""
    path = tmp_path_factory.mktemp("huge") / "huge.avi"
    code = (
        "import sys, cv2, numpy as np\n"
        f"w = cv2.VideoWriter(sys.argv[1], cv2.VideoWriter_fourcc(*'MJPG'), 5, ({BIG_SIDE}, {BIG_SIDE}))\n"
        f"f = np.zeros(({BIG_SIDE}, {BIG_SIDE}, 3), np.uint8)\n"
        "w.write(f); w.write(f); w.release()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    assert BIG_SIDE * BIG_SIDE > MAX_IMAGE_PIXELS
    return path


def test_a_video_whose_frames_exceed_the_pixel_limit_is_rejected_before_decoding(huge_mjpg: Path) -> None:
    src = VideoSource("v", cfg(str(huge_mjpg), name="v"), str(huge_mjpg))
    rejects: list[tuple[str, str]] = []
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert src._cap is not None
    counting = _CountingCapture(src._cap)
    src._cap = counting  # type: ignore[assignment]
    assert src.read() is None
    assert counting.decodes == 0  # refused on the declared size: no frame was decoded
    assert src.total() == 0
    assert len(rejects) == 1 and rejects[0][0] == str(huge_mjpg)
    assert f"{BIG_SIDE}x{BIG_SIDE} exceeds limit (100 MP)" in rejects[0][1]
    assert src.read() is None and len(rejects) == 1  # listed once
    src.close()


def test_the_runner_finishes_an_oversized_video_with_one_rejection(huge_mjpg: Path) -> None:
    hub, stop = FrameHub(), threading.Event()
    seen: list[str] = []
    reported: list[tuple[str, str, str]] = []
    src = VideoSource("v", cfg(str(huge_mjpg), name="v"), str(huge_mjpg))
    runner = SourceRunner(src, hub, lambda n, s: seen.append(s), stop, on_reject=lambda *a: reported.append(a))
    runner.start()
    assert runner.join(20)
    stats = runner.stats()
    assert stats.status == "finished" and stats.frames_in == 0 and stats.rejected == 1
    assert reported and "exceeds limit" in reported[0][2]
    assert hub.get(timeout=0) is None

"""A USB/V4L2 camera through OpenCV's own V4L2 backend (no GStreamer needed).

MJPG is requested because most USB cameras only reach their full frame rate
at HD sizes in MJPG (raw YUYV saturates USB 2), and a one-frame driver buffer
keeps latency low.  The two mistakes people actually make — the wrong device
node and a user outside the ``video`` group — are checked before OpenCV is
asked, because OpenCV only answers "not opened".
"""

from __future__ import annotations

import logging
import os

import cv2

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.sources.base import SourceError
from edgelabel.edge.sources.imageio import CaptureSource

logger = logging.getLogger(__name__)


def device_path(target: str) -> tuple[str, int | None]:
    """(/dev path, camera index or None) for ``0``, ``video0`` or ``/dev/video0`` style targets."""
    t = target.strip()
    if t.isdigit():
        return f"/dev/video{int(t)}", int(t)
    if not t.startswith("/"):
        t = "/dev/" + t
    return t, None


class V4l2Source(CaptureSource):
    """A V4L2 camera by index or device path."""

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.device, self.device_index = device_path(target)

    def display(self) -> str:
        return f"camera {self.device}"

    def key_base(self) -> str:
        return f"v4l2://{self.device}"

    def open_failed_hint(self) -> str:
        return "is another program using it? check `v4l2-ctl --list-devices`"

    def _open_capture(self) -> cv2.VideoCapture:
        if not os.path.exists(self.device):
            raise SourceError(f"camera {self.device} not found; check the cable and `ls /dev/video*`")
        if not os.access(self.device, os.R_OK | os.W_OK):
            raise SourceError(
                f"camera {self.device} exists but this user cannot open it; add the user to the `video` group "
                "(sudo usermod -aG video $USER, then log in again) or run the container with --device"
            )
        cap = cv2.VideoCapture(self.device_index if self.device_index is not None else self.device, cv2.CAP_V4L2)
        if cap.isOpened():
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self.cfg.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
            if self.cfg.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
            logger.info(
                "%s: %dx%d requested, %dx%d delivered",
                self.display(), self.cfg.width, self.cfg.height,
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            )
        return cap

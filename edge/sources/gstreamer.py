"""GStreamer sources: a raw pipeline (``gst://...``) and a Jetson CSI camera (``csi://N``).

Both need an OpenCV built with GStreamer, which the PyPI wheels never are; we
check ``cv2.getBuildInformation()`` first so the operator gets the fix instead
of OpenCV's silent "not opened".  The CSI pipeline is built by a pure function
(``csi_pipeline``) so it can be tested and printed for ``gst-launch-1.0``.
"""

from __future__ import annotations

import functools
import logging
import os
from fractions import Fraction

import cv2

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.sources.base import SourceError
from edgelabel.edge.sources.imageio import CaptureSource, build_info_has
from edgelabel.edge.sources.rtsp import mask_credentials

logger = logging.getLogger(__name__)

NO_GSTREAMER = (
    "this OpenCV has no GStreamer support: on Jetson use JetPack's OpenCV (see README: 'Jetson install'); "
    "pip's opencv-python wheels are built without it (check: python3 -c \"import cv2; "
    "print(cv2.getBuildInformation())\" | grep GStreamer)"
)
APPSINK = "video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
DEFAULT_CSI = (1280, 720, 30.0)


@functools.lru_cache(maxsize=1)
def gstreamer_available() -> bool:
    """Whether this cv2 can open GStreamer pipelines (the answer cannot change in a process)."""
    return build_info_has("GStreamer")


def _framerate(fps: float) -> str:
    """GStreamer caps fraction: 30 -> 30/1, 29.97 -> 30000/1001 (the NTSC rates sensors report)."""
    if abs(fps - round(fps)) < 1e-6:
        return f"{round(fps)}/1"
    ntsc = round(fps * 1001 / 1000)
    if abs(ntsc * 1000 / 1001 - fps) < 0.005:
        return f"{ntsc * 1000}/1001"
    frac = Fraction(fps).limit_denominator(1000)
    return f"{frac.numerator}/{frac.denominator}"


def csi_pipeline(sensor_id: int, width: int = 0, height: int = 0, fps: float = 0.0, flip_method: int = 0) -> str:
    """The nvarguscamerasrc pipeline for one CSI sensor; 0 means the default 1280x720@30.

    Argus captures NV12 into NVMM memory; ``nvvidconv`` scales and converts in
    hardware but cannot emit 3-channel BGR, hence BGRx then ``videoconvert``.
    The appsink keeps only the newest buffer so a slow consumer never queues.
    """
    w = width or DEFAULT_CSI[0]
    h = height or DEFAULT_CSI[1]
    rate = _framerate(fps if fps > 0 else DEFAULT_CSI[2])
    return (
        f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
        f"video/x-raw(memory:NVMM),width={w},height={h},format=NV12,framerate={rate} ! "
        f"nvvidconv flip-method={int(flip_method)} ! "
        f"video/x-raw,width={w},height={h},format=BGRx ! videoconvert ! {APPSINK}"
    )


class GstSource(CaptureSource):
    """A user-written GStreamer pipeline ending in an appsink."""

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.pipeline = target.strip()

    def display(self) -> str:
        return f"GStreamer pipeline '{mask_credentials(self.pipeline)}'"

    def key_base(self) -> str:
        return "gst://" + mask_credentials(self.pipeline, replacement=None)

    def open_failed_hint(self) -> str:
        return "try it with `gst-launch-1.0 <pipeline minus the appsink> ! fakesink` to see GStreamer's error"

    def _open_capture(self) -> cv2.VideoCapture:
        if not gstreamer_available():
            raise SourceError(NO_GSTREAMER)
        return cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)


class CsiSource(GstSource):
    """A Jetson CSI camera through nvarguscamerasrc (target: the sensor id)."""

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        sensor = int(target.strip().strip("/") or 0)
        super().__init__(name, cfg, csi_pipeline(sensor, cfg.width, cfg.height, cfg.fps))
        self.sensor_id = sensor
        self.target = target

    def display(self) -> str:
        return f"CSI camera {self.sensor_id}"

    def key_base(self) -> str:
        return f"csi://{self.sensor_id}"

    def open_failed_hint(self) -> str:
        hints = ["is nvargus-daemon running? (sudo systemctl restart nvargus-daemon)"]
        if not os.path.exists("/tmp/argus_socket"):
            hints.append(
                "/tmp/argus_socket is not visible here: no PrivateTmp=/DynamicUser= in the systemd unit, "
                "and -v /tmp/argus_socket:/tmp/argus_socket for containers"
            )
        return "; ".join(hints)

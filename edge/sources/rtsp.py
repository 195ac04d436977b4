"""An RTSP(S) stream through OpenCV's FFmpeg backend, with timeouts that actually apply.

OpenCV honours ``CAP_PROP_OPEN_TIMEOUT_MSEC``/``CAP_PROP_READ_TIMEOUT_MSEC``
only when ``CAP_FFMPEG`` is named explicitly (opencv#23207), so we do that.
TCP transport is forced through ``OPENCV_FFMPEG_CAPTURE_OPTIONS``: UDP loses
packets behind NAT and on Wi-Fi and gives smeared frames.  That variable is
process-wide and read during the open, so it is set under a lock and put back
afterwards; a value the operator set that already chooses ``rtsp_transport``
wins.  The runner still guards every call with its own watchdog thread,
because a read can block past these timeouts on some builds.

Credentials never appear in logs, errors or frame keys: ``mask_credentials``
replaces the password with ``***`` for messages, and keys use the URL without
any user info (so they also survive a password change).
"""

from __future__ import annotations

import logging
import os
import re
import threading

import cv2

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.redact import redact
from edgelabel.edge.sources.base import SourceError
from edgelabel.edge.sources.imageio import CaptureSource, build_info_has

logger = logging.getLogger(__name__)

OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_env_lock = threading.Lock()


def mask_credentials(text: str, replacement: str | None = "***") -> str:
    """Every credential in ``text`` masked (``edge.redact.redact``: user info, credential parameters,
    GStreamer properties, percent-encoded forms); ``replacement=None`` drops URL user info entirely."""
    return redact(text, replacement)


def host_port(url: str) -> tuple[str, int | None]:
    """(host, port or None) of a URL, with user info taken up to its last ``@`` as ``redact`` does.

    ``urllib`` ends the authority at the first ``#``, ``?`` or ``/``, so a raw ``#`` in a camera password
    (``rtsp://admin:ab#c@cam/``) made it read a piece of the password as the port, and put it in an error.
    """
    rest = url.split("://", 1)[1] if "://" in url else url
    at = rest.rfind("@")
    if at >= 0 and not ("/" in rest[:at] and ":" not in rest[:at].split("/", 1)[0]):
        rest = rest[at + 1:]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if authority.startswith("["):  # [IPv6]:port
        host, _, tail = authority[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = authority.partition(":")
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
    return host, port


def capture_options(existing: str | None) -> str:
    """The FFmpeg options string to use: TCP transport unless the operator chose a transport."""
    if existing and "rtsp_transport" in existing:
        return existing
    return "rtsp_transport;tcp" + (f"|{existing}" if existing else "")


class RtspSource(CaptureSource):
    """A network camera or RTSP server."""

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.url = target

    def display(self) -> str:
        return f"stream {mask_credentials(self.url)}"

    def key_base(self) -> str:
        return mask_credentials(self.url, replacement=None)

    def open_failed_hint(self) -> str:
        return (
            f"no answer within {self.cfg.read_timeout:g} s over TCP: check host, port, path and credentials, "
            "e.g. with `ffprobe -rtsp_transport tcp <url>`"
        )

    def _open_capture(self) -> cv2.VideoCapture:
        if not build_info_has("FFMPEG"):
            raise SourceError("this OpenCV has no FFmpeg backend, so it cannot read RTSP; install opencv-python(-headless)")
        ms = max(100, int(self.cfg.read_timeout * 1000))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        # An open abandoned by the runner's watchdog may still hold the lock; then
        # open without forcing TCP rather than wait forever.
        locked = _env_lock.acquire(timeout=self.cfg.read_timeout)
        if not locked:
            logger.warning("%s: another stream's open is stuck; opening with FFmpeg's default transport", self.display())
            return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        previous = os.environ.get(OPTIONS_ENV)
        try:
            os.environ[OPTIONS_ENV] = capture_options(previous)
            logger.debug("%s: opening (FFmpeg, %s, timeout %d ms)", self.display(), os.environ[OPTIONS_ENV], ms)
            return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        finally:
            if previous is None:
                os.environ.pop(OPTIONS_ENV, None)
            else:
                os.environ[OPTIONS_ENV] = previous
            _env_lock.release()

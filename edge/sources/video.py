"""A video file decoded with ``cv2.VideoCapture`` (FFmpeg in the pip wheels).

Keys are ``<absolute path>#<index>``; with ``loop`` the file starts again at the
end and the index keeps counting, so every key stays unique.  ``skip(key)`` is
honoured with ``grab()`` (no colour conversion or copy to Python), which makes
resuming a half-labeled file cheaper than labeling it again.

A corrupt or cut-off file can make ``read()`` fail before the frame count the
container declares: we retry a couple of times (FFmpeg often resyncs on the
next packet) and otherwise finish that pass with a WARNING naming the frame,
instead of spinning or hanging.  ``frame.path`` stays None: the video is not
the frame's image, and sinks use ``path`` to reference the original picture.

Time: a file is read much faster (or slower) than it was recorded, so the
read time says nothing about the scene.  A frame's ``media_time`` is its
position in the file (index / the container's frame rate; FFmpeg's position
when the rate is unknown) and its ``captured_at`` is the start of the
recording plus that position.  The start of the recording is taken as the
file's modification time minus its duration (a recorder last writes the file
when the recording ends; the time is reproducible, so a frame labeled again
after a restart gets the same record).  The tracker, track events and capture
rate limits therefore see the clip's 10.5 s as 10.5 s whatever the speed of
labeling.

A file still being written (a recorder, a copy in progress) is followed to
its real end.  Such a file declares no frame count (the recorder writes it
last): at the end of what is there, the file is watched; when it grows, the
capture is reopened at the next frame (``grab()`` up to it) and reading goes
on; the end is real once the file has gone ``GROW_GRACE`` (10 s) unwritten,
or declares its frame count.  Its frames are read one ahead, so the last,
possibly half-written frame is only handed out once it is known complete.  A
file that declares its count ends there at once.

A stream whose declared frame size is over ``MAX_IMAGE_PIXELS`` (the image
limit, 100 MP) is rejected at open, before any frame is decoded.

``loop: true`` turns the file into a stand-in camera: it is read at its own
frame rate (unless ``fps`` is set), its frames are live frames stamped with the
wall-clock time they were read and keyed ``<path>@<capture ns>`` (unique across
passes and restarts; no job ledger), and the dataset applies the live capture
policy to them.  Unlike a camera it never drops a frame.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import cv2

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.sources import imageio
from edgelabel.edge.sources.base import Source, SourceError
from edgelabel.edge.sources.imageio import MAX_IMAGE_PIXELS, ensure_bgr, over_budget
from edgelabel.edge.sources.pathguard import PathGuard

logger = logging.getLogger(__name__)

#: extra read attempts after a failure before the declared end of the file
READ_RETRIES = 2
#: seconds a video file must have gone unwritten before its end is taken as the real end (a recorder or a copy
#: still writing it is followed instead: see the module docstring)
GROW_GRACE = 10.0
#: how often a followed file is looked at while it is being written
_GROW_POLL = 0.2


class VideoSource(Source):
    """Frames of one video file, optionally looped."""

    live = False
    grow_grace = GROW_GRACE

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.path = os.path.abspath(os.path.expanduser(target))
        #: set by the runner to its stop event, so waiting on a growing file ends at shutdown
        self.stop_event: threading.Event | None = None
        self._open_sig: tuple[int, int] | None = None  # (size, mtime_ns) when the capture was (re)opened
        self._followed = 0  # times the file had grown at its end and was read further
        self._ahead: tuple[bool, object] | None = None  # the frame read ahead of ``_pos`` (see ``_take``)
        self.current_input = self.path
        self._cap: cv2.VideoCapture | None = None
        self._frame_count: int | None = None
        self.fps: float | None = None
        self._index = 0  # across loops
        self._pos = 0  # within the current pass
        self._pass = 0
        self._start = 0.0  # epoch seconds of media time 0 (see the module docstring)
        self._announced = False  # the INFO line about the file was logged
        self._reported_corrupt = False  # the rejected-inputs report lists a corrupt file once, not once per loop
        #: why the file is not decoded at all (declared frame size over the pixel limit), reported on first read
        self._refused: str | None = None
        self._reported_refused = False
        self._announced_given_up = False  # the pipeline opens a file twice (count, then read): say it once

    def describe(self) -> str:
        return f"VideoSource({self.path}{', loop' if self.cfg.loop else ''})"

    def _open_capture(self) -> cv2.VideoCapture:
        try:
            cap = cv2.VideoCapture(self.path)
        except cv2.error as exc:
            raise SourceError(f"cannot open video {self.path} ({str(exc).strip()[:200]})") from None
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video {self.path} (not a video, or a codec this OpenCV cannot decode)")
        return cap

    def open(self) -> None:
        if not os.path.isfile(self.path):
            raise SourceError(f"video {self.path} not found")
        if not os.access(self.path, os.R_OK):
            raise SourceError(f"video {self.path}: permission denied")
        why = PathGuard(os.path.dirname(self.path), True, self.protected).protected_reason(os.path.realpath(self.path))
        if why is not None:  # the configured file may be a symlink anywhere, but never into the daemon's own files
            raise SourceError(f"video {self.path} {why}")
        self.close()
        self._open_sig = self._file_sig()
        self._followed = 0
        self._ahead = None
        self._cap = self._open_capture()
        self._refused = self._check_size(self._cap)
        if self._refused is None and not self.cfg.loop and self.given_up(self.path):
            # a previous run gave this file up (a frame over the decode budget): listed, not decoded again
            self._refused, self._reported_refused = "given up before", True
            (logger.debug if self._announced_given_up else logger.warning)(
                "%s: %s: not read; a frame of it went over the decode budget before (rejected.csv); it is tried "
                "again once the file changes, or with --fresh", self.name, self.path)
            self._announced_given_up = True
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._frame_count = count if count > 0 else None
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 else None
        self._index = 0
        self._pos = 0
        self._pass = 0
        self._start = self.recording_start()
        # the pipeline opens a file once to count its frames, then the runner opens it: say it once
        level = logging.DEBUG if self._announced else logging.INFO
        self._announced = True
        logger.log(level, "%s: %s frames at %s fps", self.describe(), self._frame_count or "unknown",
                   self.fps or "unknown")

    def _check_size(self, cap: cv2.VideoCapture) -> str | None:
        """Why the stream's declared frame size is refused (over ``MAX_IMAGE_PIXELS``, as for images), else None.

        Read from the container at open, before any frame is decoded: one 12000x12000 frame is 400 MB of BGR
        and FFmpeg keeps several in flight.
        """
        w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if w * h > MAX_IMAGE_PIXELS:
            return (f"video frame size {w}x{h} exceeds limit ({MAX_IMAGE_PIXELS / 1e6:g} MP); no frame was decoded "
                    "(scale the video down, or raise EDGELABEL_MAX_IMAGE_PIXELS)")
        return None

    def _file_sig(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _grew(self) -> bool:
        """At the end of the stream: True when the file is longer than when the capture was opened.

        A file that declares no frame count (a recorder writes it last) and was written less than ``grow_grace``
        seconds ago may still be growing (a recorder, a copy): we wait,
        marked idle for the stall check, until it changes (True) or has gone ``grow_grace`` seconds unwritten
        (False: the real end).  A file last written long ago ends at once.
        """
        self.idle = True
        try:
            while True:
                sig = self._file_sig()
                if sig is None:
                    return False  # gone: the end of what there was
                if sig != self._open_sig:
                    return True
                if self._frame_count is not None:
                    return False  # a finished container declares its frame count, and we read them all
                if time.time() - sig[1] / 1e9 >= self.grow_grace:
                    return False
                stop = self.stop_event or threading.Event()
                if stop.wait(_GROW_POLL):
                    return False
        finally:
            self.idle = False

    def _follow(self) -> bool:
        """Reopen a file that grew at its end and position it after the last frame read; False if that fails."""
        pos = self._pos
        self.close()
        self._open_sig = self._file_sig()
        try:
            self._cap = self._open_capture()
        except SourceError as exc:
            logger.warning("%s: %s grew, but cannot be reopened (%s); finishing", self.name, self.path, exc)
            return False
        for i in range(pos):  # demux only, no decode: cheap
            if not self._cap.grab():
                logger.warning("%s: %s changed while it was read (frame %d of the %d read is gone); finishing",
                               self.name, self.path, i, pos)
                return False
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._frame_count = count if count > 0 else None
        if not self._followed:
            logger.info("%s: %s is still being written; following it to its end (it ends once unwritten for %g s)",
                        self.name, self.path, self.grow_grace)
        self._followed += 1
        return True

    def duration(self) -> float | None:
        """Seconds of media in the file, when the container declares its frame count and rate."""
        if self._frame_count is None or self.fps is None:
            return None
        return self._frame_count / self.fps

    def recording_start(self) -> float:
        """Epoch time of media time 0: the file's mtime minus its duration (the mtime alone if unknown)."""
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return time.time()
        return mtime - (self.duration() or 0.0)

    def pace(self) -> float:
        """A looped file is read at its own frame rate unless ``fps`` says otherwise; a plain one as fast as taken."""
        if self.cfg.fps > 0:
            return self.cfg.fps
        return (self.fps or 0.0) if self.cfg.loop else 0.0

    def _media_time(self, pos: int) -> float:
        """Seconds from the start of the file of the frame at ``pos`` (within the current pass)."""
        if self.fps:
            return pos / self.fps
        assert self._cap is not None
        return max(float(self._cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0), 0.0) / 1000.0

    def total(self) -> int | None:
        if self._refused is not None:
            return 0
        return None if self.cfg.loop else self._frame_count

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def _next_image(self, want_pixels: bool) -> tuple[bool, object]:
        """One read or grab with the retry rule for failures before the declared end."""
        assert self._cap is not None
        for attempt in range(READ_RETRIES + 1):
            started = time.monotonic()
            if want_pixels:
                ok, image = self._cap.read()
            else:
                ok, image = self._cap.grab(), None
            took = time.monotonic() - started
            if took > imageio.DECODE_BUDGET_S and not self.cfg.loop and self._refused is None:
                # a read in progress cannot be stopped; one over the budget ends this file (the frames after it
                # would take as long), and the file is not read again on the next start
                self._refused = over_budget(f"reading and decoding frame {self._pos} of the video", imageio.DECODE_BUDGET_S)
                logger.warning("%s: %s: frame %d took %.1f s to decode: %s", self.name, self.path, self._pos, took,
                               self._refused)
                self._reported_refused = True
                self.on_reject(self.path, self._refused)
                return False, None
            if ok:
                return True, image
            if self._frame_count is None or self._pos >= self._frame_count:
                return False, None  # the normal end
            logger.debug("%s: read failed at frame %d (attempt %d)", self.name, self._pos, attempt + 1)
        logger.warning(
            "%s: %s: read failed at frame %d of %d (corrupt or cut-off file); finishing this pass early",
            self.name, self.path, self._pos, self._frame_count,
        )
        if not self._reported_corrupt:  # counted and listed in rejected.csv like an undecodable image
            self._reported_corrupt = True
            self.on_reject(self.path, f"corrupt or cut-off video: read failed at frame {self._pos} of "
                                      f"{self._frame_count}; the rest of the pass was skipped")
        return False, None

    def _take(self, want_pixels: bool) -> tuple[bool, object]:
        """The frame at ``self._pos``; a file that declares no frame count is read one frame ahead.

        Such a file may still be written (module docstring), and then its last frame may be cut off half-way
        (FFmpeg conceals it: a wrong picture, not an error).  So a frame is handed out only once the next one
        was read, or once the file is known to be complete; when the file has grown, the capture is reopened
        and the held frame read again from the longer file.
        """
        if self.cfg.loop or self._frame_count is not None:
            self._ahead = None
            return self._next_image(want_pixels)
        while True:
            current = self._ahead if self._ahead is not None else self._next_image(True)
            self._ahead = None
            if not current[0]:
                return current
            ahead = self._next_image(True)
            if ahead[0]:
                self._ahead = ahead
                return current
            # ``current`` is the last frame in the file as it is now
            if not (self._grew() and self._follow()):
                return current  # the real end: complete
            # reopened at ``self._pos``: read the held frame again from the longer file
            if self._frame_count is not None:  # the recorder finished: the container now declares its length
                return self._next_image(want_pixels)

    def read(self) -> Frame | None:
        if self._cap is None:
            raise SourceError(f"video {self.path}: not open")
        if self._refused is not None:  # listed in rejected.csv once; the source finishes without decoding
            if not self._reported_refused:
                self._reported_refused = True
                logger.warning("%s: %s: %s", self.name, self.path, self._refused)
                self.on_reject(self.path, self._refused)
            return None
        restarted_empty = False
        loop = self.cfg.loop
        while True:
            key = f"{self.path}#{self._index}"
            skip = not loop and self.skip(key)  # a looped file is a stand-in camera: nothing to resume
            ok, image = self._take(want_pixels=not skip)
            if not ok:
                if not self.cfg.loop:
                    if self._followed:
                        logger.info("%s: %s: %d frames, read while it was written", self.name, self.path, self._pos)
                    return None
                if restarted_empty or self._pos == 0:
                    logger.warning("%s: %s gives no frames; stopping the loop", self.name, self.path)
                    return None
                self.close()
                self._cap = self._open_capture()  # reopening is more reliable than seeking to 0
                self._pos = 0
                self._pass += 1
                restarted_empty = True
                continue
            restarted_empty = False
            index, pos = self._index, self._pos
            self._index += 1
            self._pos += 1
            if skip:
                continue
            assert image is not None
            media_time = self._media_time(pos)
            if loop:
                ns = time.time_ns()
                captured_at, key = ns / 1e9, f"{self.path}@{ns}"
            else:
                captured_at = self._start + media_time
            return Frame(
                source=self.name,
                index=index,
                image=ensure_bgr(image),  # type: ignore[arg-type]
                captured_at=captured_at,
                key=key,
                path=None,
                live=loop,
                extra={"video": self.path, "position": pos, "pass": self._pass},
                media_time=media_time,
            )

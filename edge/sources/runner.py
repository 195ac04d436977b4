"""One thread per source: open, read, cap the rate, hand frames to the hub, reconnect.

Sources are plain blocking readers (``edge.sources.base``); everything about
time lives here:

* **Live sources** (cameras, streams) are never given up.  A failed open or
  read sets the status to ``reconnecting``, or ``offline`` (with the reason in
  ``last_error``) while the source has never opened, and the runner retries
  after an exponential backoff (``reconnect.initial`` doubling up to
  ``reconnect.max``, back to ``initial`` after a good frame), waiting on the
  stop event so shutdown is immediate.
* **Hangs**: OpenCV's ``read()`` can block forever when a camera vanishes
  (opencv#4506, #22677).  Live calls therefore run on a helper daemon thread;
  a call that takes longer than ``read_timeout`` (open: twice that) is
  abandoned, treated as a SourceError, and the runner carries on with a *new*
  source object built from the same config, while the helper closes the old
  object whenever its call finally returns.  Sharing one object with a stuck
  thread would race on the capture handle.
* **Storage sources** (files) run on the runner thread: a SourceError at open
  or while reading is final (``offline``, ERROR logged), ``None`` means
  ``finished``.  Their hub slot blocks instead of dropping.
* **fps cap**: live frames above the cap are skipped (counted in
  ``frames_skipped_fps``, not ``frames_dropped``, which is the hub's count of
  frames the detector was too slow for); storage sources are slowed down to
  ``Source.pace()`` (the cap; a looped video's own frame rate by default).
* An unexpected exception from a source is logged with its traceback and
  handled like a SourceError, so a thread never dies silently.
* **Pause** (an operator's action from the web page): a paused live source
  keeps its device open and keeps reading, so the camera's buffer and the read
  timeout behave as usual, but its frames are discarded uncounted (``fps_in``
  falls to 0); a paused storage source simply stops reading, so nothing is
  skipped and it continues where it was.  The status does not change (a
  paused camera is still ``online``); ``SourceStats.paused`` says it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgelabel.edge.frame import Frame
from edgelabel.edge.sources.base import Source, SourceError
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.rtsp import mask_credentials

logger = logging.getLogger(__name__)

ONLINE = "online"
RECONNECTING = "reconnecting"
OFFLINE = "offline"
FINISHED = "finished"
DISABLED = "disabled"

#: how often a thread blocked on a helper call or a full hub looks at the stop event
_POLL = 0.1
#: the time a live source gets to close before it is abandoned to a background thread
_CLOSE_TIMEOUT = 2.0


@dataclass
class SourceStats:
    """A snapshot for the status page and MQTT.

    ``frames_in`` counts frames read from the source (fps-skipped ones
    included); ``frames_skipped_fps`` of them were thinned out by the fps cap;
    ``frames_dropped`` were replaced in the hub before the detector took them
    (live only).  ``fps_in`` is the smoothed read rate, 0 when frames stopped.
    ``reconnects`` counts attempts to reopen after a failure.  ``last_frame_at``
    is the wall-clock time the last frame was read (not its media time).  ``paused``:
    an operator paused the source (``status`` keeps its value meanwhile).  ``stalled_s``: a storage source's
    ``read()`` has worked for longer than ``read_timeout`` without returning (a decode that takes minutes, a
    hung network mount): seconds so far, with the file in ``stalled_input``; None otherwise.  Time a read
    spends waiting on purpose (``Source.idle``: a watched folder between polls) does not count.
    """

    name: str
    status: str
    live: bool
    frames_in: int
    frames_dropped: int
    frames_skipped_fps: int
    rejected: int
    reconnects: int
    last_frame_at: float | None
    fps_in: float
    total: int | None
    last_error: str | None
    paused: bool = False
    stalled_s: float | None = None
    stalled_input: str | None = None


class _Stopped(Exception):
    """The stop event was set while a live call was in flight."""


class _Result:
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Caller:
    """Runs one source object's blocking calls on a daemon thread so that a hung call can be left behind."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.abandoned = False
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], _Result] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"source-{source.name}-io", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, res = job
            try:
                res.value = fn()
            except BaseException as exc:  # handed to the runner thread, which decides
                res.error = exc
            res.done.set()
            if self.abandoned:
                break
        if self.abandoned:
            try:
                self.source.close()
                logger.info("%s: an abandoned call returned; released it in the background", self.source.name)
            except Exception:
                logger.debug("%s: close after abandon failed", self.source.name, exc_info=True)

    def call(self, fn: Callable[[], Any], timeout: float, stop: threading.Event, what: str) -> Any:
        """``fn()`` on the helper; SourceError after ``timeout``, _Stopped when ``stop`` is set."""
        res = _Result()
        self._jobs.put((fn, res))
        deadline = time.monotonic() + timeout
        while not res.done.wait(min(_POLL, max(0.0, deadline - time.monotonic()))):
            if stop.is_set():
                self.abandon()
                raise _Stopped
            if time.monotonic() >= deadline:
                self.abandon()
                raise SourceError(f"{self.source.describe()}: {what} took longer than {timeout:g} s; abandoned it")
        if res.error is not None:
            raise res.error
        return res.value

    def abandon(self) -> None:
        """Leave the helper; it closes the source when (if ever) its current call returns."""
        self.abandoned = True
        self._jobs.put(None)

    def finish(self) -> None:
        self._jobs.put(None)


class SourceRunner:
    """Drives one source on its own thread; see the module docstring for the rules."""

    def __init__(
        self,
        source: Source,
        hub: FrameHub,
        on_status: Callable[[str, str], None],
        stop: threading.Event,
        on_reject: Callable[[str, str, str], None] | None = None,
        reject_history: int = 100,
    ) -> None:
        """``on_status(name, status)`` on every change; ``on_reject(name, path, reason)`` per rejected input."""
        self.source = source
        self.name = source.name
        self.cfg = source.cfg
        self.live = bool(source.live)
        self.hub = hub
        self._on_status = on_status
        self._stop = stop
        self._on_reject_cb = on_reject
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._status: str | None = None
        self._frames_in = 0
        self._skipped_fps = 0
        self._rejected = 0
        self._reconnects = 0
        self._last_frame_at: float | None = None
        self._last_frame_mono: float | None = None
        self._interval_ewma: float | None = None
        self._total: int | None = None
        self._last_error: str | None = None
        self._recent_rejects: deque[tuple[str, str]] = deque(maxlen=reject_history)
        self._next_due = 0.0
        self._paused = threading.Event()
        self._read_started: float | None = None  # monotonic start of the storage read in progress
        self._prepare(source)
        if self.name not in hub:
            hub.register(self.name, live=self.live)

    # ------------------------------------------------------------------ public

    @property
    def status(self) -> str | None:
        return self._status

    def start(self) -> None:
        """Start the thread (or just report ``disabled``)."""
        if not self.cfg.enabled:
            self._set_status(DISABLED)
            return
        if self._thread is not None:
            raise RuntimeError(f"runner for {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended (or never ran)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        """Whether an operator paused this source."""
        return self._paused.is_set()

    def pause(self) -> None:
        """Stop emitting frames; a live source keeps its device open (see the module docstring)."""
        if not self._paused.is_set():
            self._paused.set()
            logger.info("source %s: paused", self.name)

    def resume(self) -> None:
        """Emit frames again; the fps estimate starts afresh so the pause does not read as a slow frame."""
        if self._paused.is_set():
            with self._lock:
                self._last_frame_mono = None
            self._paused.clear()
            logger.info("source %s: resumed", self.name)

    def recent_rejects(self) -> list[tuple[str, str]]:
        """The last (path, reason) pairs, oldest first."""
        with self._lock:
            return list(self._recent_rejects)

    def stats(self) -> SourceStats:
        now = time.monotonic()
        stalled = self._stalled_for(now)
        with self._lock:
            fps = 0.0
            if self._interval_ewma and self._last_frame_mono is not None:
                # a stalled source reads 0 rather than its last rate
                if now - self._last_frame_mono <= max(2.0, 3 * self._interval_ewma):
                    fps = 1.0 / self._interval_ewma
            return SourceStats(
                name=self.name,
                status=self._status or OFFLINE,
                live=self.live,
                frames_in=self._frames_in,
                frames_dropped=self.hub.dropped(self.name),
                frames_skipped_fps=self._skipped_fps,
                rejected=self._rejected,
                reconnects=self._reconnects,
                last_frame_at=self._last_frame_at,
                fps_in=round(fps, 2),
                total=self._total,
                last_error=self._last_error,
                paused=self._paused.is_set(),
                stalled_s=stalled,
                stalled_input=self.source.current_input if stalled is not None else None,
            )

    def _stalled_for(self, now: float) -> float | None:
        """Seconds the storage read in progress has worked without returning, once past ``read_timeout``."""
        started, src = self._read_started, self.source
        if started is None or self.live or src.idle:
            return None
        elapsed = now - max(started, src.active_since)
        return round(elapsed, 1) if elapsed > self.cfg.read_timeout else None

    # ------------------------------------------------------------------ plumbing

    def _prepare(self, source: Source) -> None:
        source.on_reject = self._reject
        if hasattr(source, "stop_event"):
            source.stop_event = self._stop  # lets a watching folder return at shutdown

    def _replacement(self, old: Source) -> Source:
        """A fresh object for the same source, used when the old one is stuck in a call."""
        try:
            new = type(old)(old.name, old.cfg, old.target)  # type: ignore[call-arg]
        except Exception:
            logger.warning("%s: cannot rebuild the source after a hang; retrying with the stuck one", self.name,
                           exc_info=True)
            return old
        new.skip = old.skip
        new.identity_of = old.identity_of
        new.adopt_identity = old.adopt_identity
        new.given_up = old.given_up
        new.protected = old.protected
        self._prepare(new)
        return new

    def _set_status(self, status: str) -> None:
        if status == self._status:
            return
        self._status = status
        logger.info("source %s: %s", self.name, status)
        try:
            self._on_status(self.name, status)
        except Exception:
            logger.exception("source %s: status callback failed", self.name)

    def _error(self, message: str) -> str:
        message = mask_credentials(message)
        with self._lock:
            self._last_error = message
        return message

    def _reject(self, path: str, reason: str) -> None:
        with self._lock:
            self._rejected += 1
            self._recent_rejects.append((path, reason))
        logger.warning("source %s: rejected %s: %s", self.name, path, reason)
        if self._on_reject_cb is not None:
            try:
                self._on_reject_cb(self.name, path, reason)
            except Exception:
                logger.exception("source %s: reject callback failed", self.name)

    def _count_frame(self, frame: Frame) -> None:
        now = time.monotonic()
        with self._lock:
            self._frames_in += 1
            self._last_frame_at = frame.read_at  # "last frame 2 s ago": our clock, not the media's
            if self._last_frame_mono is not None:
                dt = max(now - self._last_frame_mono, 1e-6)
                self._interval_ewma = dt if self._interval_ewma is None else 0.9 * self._interval_ewma + 0.1 * dt
            self._last_frame_mono = now

    def _fps_allows(self) -> bool:
        """Live fps cap: whether this frame may go on (False counts as skipped)."""
        if self.cfg.fps <= 0:
            return True
        now = time.monotonic()
        if now < self._next_due:
            with self._lock:
                self._skipped_fps += 1
            return False
        self._next_due = max(self._next_due + 1.0 / self.cfg.fps, now)
        return True

    def _throttle(self, fps: float) -> bool:
        """Storage pace (``Source.pace``): sleep until the next frame is due; False when stopped meanwhile."""
        if fps <= 0:
            return not self._stop.is_set()
        now = time.monotonic()
        if now < self._next_due and self._stop.wait(self._next_due - now):
            return False
        self._next_due = max(self._next_due + 1.0 / fps, time.monotonic())
        return not self._stop.is_set()

    def _wait_while_paused(self) -> bool:
        """Storage sources: block while paused; False when stopped meanwhile."""
        while self._paused.is_set():
            if self._stop.wait(_POLL):
                return False
        return not self._stop.is_set()

    def _run(self) -> None:
        try:
            if self.live:
                self._run_live()
            else:
                self._run_storage()
        except Exception:  # a bug here must be visible, and must not leave a stale "online"
            logger.exception("source %s: runner crashed", self.name)
            self._error("runner crashed (see log)")
            self._set_status(OFFLINE)
        logger.debug("source %s: runner thread ends", self.name)

    # ------------------------------------------------------------------ storage

    def _run_storage(self) -> None:
        src = self.source
        try:
            src.open()
        except Exception as exc:
            self._storage_failed("cannot open", exc)
            return
        self._total = src.total()
        fps = src.pace()
        self._set_status(ONLINE)
        try:
            while self._wait_while_paused():
                if not self._throttle(fps):  # before the read, so a paced frame is fresh when it is emitted
                    return
                self._read_started = time.monotonic()
                try:
                    frame = src.read()
                except Exception as exc:
                    self._storage_failed("read failed", exc)
                    return
                finally:
                    self._read_started = None
                if frame is None:
                    if not self._stop.is_set():  # a watching folder returns None only at shutdown
                        self._set_status(FINISHED)
                    return
                self._count_frame(frame)
                while not self._stop.is_set():
                    if self.hub.put(frame, timeout=_POLL):
                        break
                    if self.hub.closed:
                        return
        finally:
            try:
                src.close()
            except Exception:
                logger.warning("source %s: close failed", self.name, exc_info=True)

    def _storage_failed(self, what: str, exc: Exception) -> None:
        if isinstance(exc, SourceError):
            msg = self._error(str(exc))
            logger.error("source %s: %s: %s", self.name, what, msg)
        else:
            msg = self._error(f"{type(exc).__name__}: {exc}")
            logger.error("source %s: %s (unexpected error): %s", self.name, what, msg, exc_info=exc)
        self._set_status(OFFLINE)

    # ------------------------------------------------------------------ live

    def _live_call(self, caller: _Caller, fn: Callable[[], Any], timeout: float, what: str) -> Any:
        """A helper call with every failure turned into SourceError (and logged if unexpected)."""
        try:
            return caller.call(fn, timeout, self._stop, what)
        except (SourceError, _Stopped):
            raise
        except Exception as exc:
            logger.error("source %s: unexpected error in %s", self.name, what, exc_info=exc)
            raise SourceError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _close_live(self, caller: _Caller) -> None:
        if caller.abandoned:
            return
        try:
            caller.call(caller.source.close, _CLOSE_TIMEOUT, threading.Event(), "close")
        except SourceError:
            logger.warning("source %s: close hung; releasing it in the background", self.name)
        except Exception:
            logger.debug("source %s: close failed", self.name, exc_info=True)

    def _live_failed(self, exc: SourceError, status: str) -> None:
        previous = self._last_error
        msg = self._error(str(exc))
        # the same error every few seconds for hours is noise: warn when it changes
        level = logging.WARNING if msg != previous else logging.DEBUG
        logger.log(level, "source %s: %s (%s)", self.name, msg, status)
        self._set_status(status)

    def _run_live(self) -> None:
        rc = self.cfg.reconnect
        delay = rc.initial
        first = True
        opened = False  # until the first successful open the source is offline (never "reconnecting")
        caller: _Caller | None = None
        try:
            while not self._stop.is_set():
                if not first:
                    with self._lock:
                        self._reconnects += 1
                    if opened:
                        self._set_status(RECONNECTING)
                if caller is None or caller.abandoned:
                    if caller is not None:
                        self.source = self._replacement(self.source)
                    caller = _Caller(self.source)
                src = self.source
                try:
                    self._live_call(caller, src.open, 2 * self.cfg.read_timeout, "open")
                except _Stopped:
                    return
                except SourceError as exc:
                    self._live_failed(exc, RECONNECTING if opened else OFFLINE)
                    first = False
                    self._close_live(caller)
                    if self._stop.wait(delay):
                        return
                    delay = min(delay * 2, rc.max)
                    continue
                first = False
                opened = True
                self._set_status(ONLINE)
                try:
                    while not self._stop.is_set():
                        frame = self._live_call(caller, src.read, self.cfg.read_timeout, "read")
                        if frame is None:
                            raise SourceError(f"{src.describe()}: the stream ended")
                        delay = rc.initial
                        if self._paused.is_set():
                            continue  # keep the device open and its buffer fresh; emit nothing
                        self._count_frame(frame)
                        if self._fps_allows():
                            self.hub.put(frame)
                    return
                except _Stopped:
                    return
                except SourceError as exc:
                    self._live_failed(exc, RECONNECTING)
                    self._close_live(caller)
                    if self._stop.wait(delay):
                        return
                    delay = min(delay * 2, rc.max)
        finally:
            if caller is not None:
                self._close_live(caller)
                caller.finish()

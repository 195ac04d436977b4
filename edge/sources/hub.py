"""Where source threads hand frames to the single inference worker.

One slot per source instead of one shared queue, for two reasons:

* live and storage sources need opposite back-pressure: a camera must never
  wait for the detector (the newest frame is the only interesting one, so an
  unread older frame is dropped and counted), while a file must never lose a
  frame (its thread blocks until there is room);
* ``get`` takes from the slots round-robin, so a video file that can always
  fill its slot instantly does not starve a camera.

Everything is guarded by one ``threading.Condition``; waiters sleep on it and
``close()`` wakes all of them for shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgelabel.edge.frame import Frame

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    live: bool
    capacity: int
    frames: deque[Frame] = field(default_factory=deque)
    dropped: int = 0
    delivered: int = 0


class FrameHub:
    """Per-source frame slots with drop-oldest (live) or blocking (storage) puts and fair gets."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._order: list[str] = []
        self._next = 0
        self._closed = False

    def register(self, name: str, live: bool, capacity: int = 4) -> None:
        """Add a source's slot (again: updates the mode, keeps frames and counters).

        A live slot always holds just the newest frame, whatever ``capacity``
        says: a queue of camera frames is only latency.  ``capacity`` bounds
        how far a storage source may read ahead of the detector.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        with self._cond:
            slot = self._slots.get(name)
            cap = 1 if live else capacity
            if slot is None:
                self._slots[name] = _Slot(live=live, capacity=cap)
                self._order.append(name)
            else:
                slot.live, slot.capacity = live, cap
            self._cond.notify_all()

    def __contains__(self, name: object) -> bool:
        with self._cond:
            return name in self._slots

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Hand over one frame; False when the hub is closed (or, storage only, ``timeout`` passed).

        Live: never blocks; an unread older frame is replaced and counted in
        ``dropped``.  Storage: waits for room, so nothing is ever dropped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            slot = self._slots.get(frame.source)
            if slot is None:
                raise KeyError(f"source {frame.source!r} is not registered with the hub")
            if slot.live:
                if self._closed:
                    return False
                while len(slot.frames) >= slot.capacity:
                    slot.frames.popleft()
                    slot.dropped += 1
            else:
                while not self._closed and len(slot.frames) >= slot.capacity:
                    if deadline is None:
                        self._cond.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self._cond.wait(remaining)
                if self._closed:
                    return False
            slot.frames.append(frame)
            self._cond.notify_all()
            return True

    def _take(self) -> Frame | None:
        n = len(self._order)
        for step in range(n):
            i = (self._next + step) % n
            slot = self._slots[self._order[i]]
            if slot.frames:
                self._next = (i + 1) % n
                slot.delivered += 1
                return slot.frames.popleft()
        return None

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, taking the sources in turn; None on timeout or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                frame = self._take()
                if frame is not None:
                    self._cond.notify_all()  # a storage source may be waiting for this room
                    return frame
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            return None

    def close(self) -> None:
        """Refuse new frames and wake every waiting ``put`` and ``get``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def dropped(self, name: str) -> int:
        """Live frames replaced before the pipeline took them."""
        with self._cond:
            slot = self._slots.get(name)
            return slot.dropped if slot else 0

    def pending(self, name: str) -> int:
        """Frames waiting in the source's slot."""
        with self._cond:
            slot = self._slots.get(name)
            return len(slot.frames) if slot else 0

    def delivered(self, name: str) -> int:
        """Frames the pipeline has taken from this source."""
        with self._cond:
            slot = self._slots.get(name)
            return slot.delivered if slot else 0

"""The interface every source implements, whatever its URI scheme.

A source is a plain synchronous reader: ``open()``, then ``read()`` until it
returns ``None`` (finished) or raises ``SourceError`` (lost; a live source is
reopened with backoff by its runner).  Threads, buffering, fps caps and
reconnects live in ``edge.sources.runner`` so each source file stays small.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import ClassVar

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.frame import Frame


class SourceError(RuntimeError):
    """The source cannot deliver frames right now (absent camera, dropped stream)."""


def _never_done(key: str) -> bool:
    return False


def _ignore_reject(path: str, reason: str) -> None:
    return None


def _no_identity(key: str) -> str | None:
    return None


def _ignore_identity(key: str, content: str) -> None:
    return None


class Source(abc.ABC):
    """One input of frames.

    ``live`` sources (cameras, streams) produce frames whether or not anyone
    reads them, so the runner keeps only the newest; storage sources (files)
    wait for the reader and never drop.
    """

    live: ClassVar[bool] = False
    #: the frames are separate pictures rather than a sequence (folders, single images): not tracked by default
    stills: ClassVar[bool] = False

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        self.name = name
        self.cfg = cfg
        self.target = target  # the URI with its scheme resolved (path, device, url, pipeline)
        #: called with a frame key before a storage source decodes it; True skips it
        self.skip: Callable[[str], bool] = _never_done
        #: called with (path, reason) for every input that cannot be decoded
        self.on_reject: Callable[[str, str], None] = _ignore_reject
        #: called with a file's path: True when a previous run gave it up (a decode over the budget) and it was not
        #: written since; a storage source then does not decode it again
        self.given_up: Callable[[str], bool] = _never_done
        #: called with a file's plain key: the content (``size:mtime_ns:sha256``) that was labeled under it, if any
        self.identity_of: Callable[[str], str | None] = _no_identity
        #: called with (plain key, content) to record the content of a file done before identities were kept
        self.adopt_identity: Callable[[str, str], None] = _ignore_identity
        #: True while ``read()`` waits for input on purpose (a watched folder between polls, a video still being
        #: written): the runner's stall check (``SourceStats.stalled_s``) does not count that time
        self._idle = False
        #: monotonic time ``read()`` last started working (began, or stopped waiting); see ``idle``
        self.active_since = 0.0
        #: the file being read, for messages (None: not known)
        self.current_input: str | None = None
        #: real paths of the daemon's own folders and secret files, which a storage source never reads
        #: (set by the pipeline: ``edge.sources.pathguard.protected_paths``)
        self.protected: tuple[str, ...] = ()

    @property
    def idle(self) -> bool:
        return self._idle

    @idle.setter
    def idle(self, value: bool) -> None:
        if self._idle and not value:
            self.active_since = time.monotonic()  # the work after the wait is timed from its own start
        self._idle = value

    @abc.abstractmethod
    def open(self) -> None:
        """Open the device, stream or file; raise SourceError when it is not there."""

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """The next frame, ``None`` when a finite source is done; SourceError when lost."""

    def close(self) -> None:
        """Release the device or file; safe to call twice."""

    def pace(self) -> float:
        """Frames per second a storage source is read at (0: as fast as the pipeline takes them); call after open."""
        return self.cfg.fps

    def total(self) -> int | None:
        """Number of frames this source will deliver, when known (for progress bars)."""
        return None

    def describe(self) -> str:
        return f"{type(self).__name__}({self.target})"

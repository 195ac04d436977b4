"""A folder of image files, read recursively in a stable order, optionally watched for new files.

File policy (so a drop folder full of odd files never stops the daemon):

* Only files whose extension (case-insensitive) is in
  ``edge.sources.IMAGE_EXTENSIONS`` are considered; everything else is ignored
  and logged once at DEBUG (a ``.txt`` or ``.json`` next to images is normal).
* Files and folders whose name starts with ``.`` are ignored: macOS ``._x.jpg``
  resource forks and rsync's ``.x.jpg.XXXXXX`` temporaries would otherwise be
  rejected, or read half-written.
* A considered file is decoded by its *content*: a PNG named ``.jpg`` is
  fine; a text file named ``.jpg`` is rejected ("not an image (text file)").
  Unusable files (zero bytes, cut off, corrupt, unreadable, FIFO, broken
  symlink, declared size over the pixel limit) go to ``on_reject(path,
  reason)`` and the next file is read; one bad file never raises.
* Order: natural sort of the path relative to the folder (``img2`` before
  ``img10``), so a restart walks the same order and ``frame.index`` is the
  position in that listing.  Symlinked folders are not followed (no loops).
* The frame key is the absolute path (without resolving symlinks, so it does
  not change when a mount point moves); ``skip(key)`` is asked before the file
  is even read, which makes resuming a half-done folder cheap.

Time: an image's ``captured_at`` is its file's modification time (what a
camera, or a copy that keeps times, wrote), not the time we read it, so a
record says when the picture was taken as far as the file tells and a
relabeled file gets the same record; ``media_time`` is unset.  The images of a
folder are usually unrelated stills, so tracking is off for folders (and
single images) unless ``tracking.folders`` turns it on.

``watch`` mode keeps polling every ``watch_interval`` seconds after the first
listing and never finishes.  A new file is only read once its size and mtime
were the same on two polls in a row (it is probably still being copied
otherwise); a new zero-byte file waits until it has content, for at most
``EMPTY_GRACE`` seconds: then it is read, and rejected as a zero-byte file.  A file is read at
most once per run, by path: rewriting an already-read file does not re-read it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.frame import Frame, text_path
from edgelabel.edge.sources import IMAGE_EXTENSIONS
from edgelabel.edge.sources.base import Source, SourceError
from edgelabel.edge.sources.imageio import ImageRejected, decode_image_file

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")
_MISSING = object()


def natural_key(rel_path: str) -> tuple[tuple[tuple[object, ...], ...], str]:
    """Sort key: per path component, digit runs compare as numbers; the raw path breaks ties."""
    parts = rel_path.replace(os.sep, "/").split("/")
    # re.split with a group alternates text, digits, text..., so positions have fixed types
    return tuple(tuple(int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(p))) for p in parts), rel_path


#: seconds a new zero-byte file in a watched folder may stay empty (a copy that has not started writing)
EMPTY_GRACE = 60.0


class FolderSource(Source):
    """Every image file under a folder, once, in natural-sort order (see the module docstring)."""

    live = False
    stills = True
    empty_grace = EMPTY_GRACE

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.root = os.path.abspath(os.path.expanduser(target))
        #: set by the runner to its stop event, so a watching read() returns None at shutdown
        self.stop_event: threading.Event | None = None
        self._closed = threading.Event()
        self._files: list[str] = []
        self._seen: set[str] = set()
        self._pending: dict[str, object] = {}
        self._empty_since: dict[str, float] = {}  # monotonic time a pending file was first seen empty
        self._ignored: set[str] = set()
        self._walk_errors: set[str] = set()
        self._pos = 0
        self._total: int | None = None
        self._announced = False

    def describe(self) -> str:
        return f"FolderSource({self.root}{', watch' if self.cfg.watch else ''})"

    def open(self) -> None:
        if not os.path.isdir(self.root):
            what = "is not a folder" if os.path.exists(self.root) else "not found"
            raise SourceError(f"folder {self.root} {what}")
        try:
            os.listdir(self.root)
        except PermissionError:
            raise SourceError(f"folder {self.root}: permission denied (the daemon's user cannot list it)") from None
        except OSError as exc:
            raise SourceError(f"folder {self.root}: cannot list it ({exc.strerror or exc})") from None
        self._closed.clear()
        self._files = self._scan()
        self._seen = set(self._files)
        self._pending = {}
        self._pos = 0
        self._total = len(self._files)
        # the pipeline opens a folder once to count its files, then the runner opens it: say it once
        logger.log(logging.DEBUG if self._announced else logging.INFO, "%s: %d image file(s) found",
                   self.describe(), self._total)
        self._announced = True

    def total(self) -> int | None:
        return self._total

    def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------------ listing

    def _walk_error(self, exc: OSError) -> None:
        where = str(getattr(exc, "filename", "") or self.root)
        if where not in self._walk_errors:  # once per folder, not once per poll
            self._walk_errors.add(where)
            logger.warning("%s: cannot list %s (%s); its files are skipped", self.name, where, exc.strerror or exc)

    def _scan(self) -> list[str]:
        """Absolute paths of the candidate image files, in natural order of their relative path."""
        found: list[tuple[tuple[tuple[tuple[object, ...], ...], str], str]] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                    if full not in self._ignored:
                        self._ignored.add(full)
                        logger.debug("%s: ignoring %s (hidden or not an image extension)", self.name, full)
                    continue
                found.append((natural_key(os.path.relpath(full, self.root)), full))
        found.sort()
        return [full for _, full in found]

    def _poll(self) -> int:
        """Append new files that look complete; returns how many were added."""
        ready: list[str] = []
        current = self._scan()
        present = set(current)
        for path in current:
            if path in self._seen:
                continue
            try:
                st = os.stat(path)
                sig: object = (st.st_size, st.st_mtime_ns)
                empty = st.st_size == 0 and os.path.isfile(path)
            except OSError:
                sig, empty = None, False  # broken symlink: rejected once it stays broken for a poll
            prev = self._pending.get(path, _MISSING)
            if empty:
                since = self._empty_since.setdefault(path, time.monotonic())
                empty = time.monotonic() - since < self.empty_grace  # still empty after the grace: a bad file
            else:
                self._empty_since.pop(path, None)
            if prev == sig and not empty:
                ready.append(path)
                self._pending.pop(path, None)
                self._empty_since.pop(path, None)
            else:
                self._pending[path] = sig
        for gone in [p for p in self._pending if p not in present]:
            del self._pending[gone]
            self._empty_since.pop(gone, None)
        ready.sort(key=lambda p: natural_key(os.path.relpath(p, self.root)))
        self._files.extend(ready)
        self._seen.update(ready)
        if ready:
            logger.debug("%s: %d new file(s)", self.name, len(ready))
        return len(ready)

    def _stopped(self) -> bool:
        return self._closed.is_set() or (self.stop_event is not None and self.stop_event.is_set())

    # ------------------------------------------------------------------ reading

    def read(self) -> Frame | None:
        while True:
            while self._pos < len(self._files):
                index = self._pos
                path = self._files[index]
                key = text_path(path)  # a Latin-1 name from a share: storable text, the same on every run
                self._pos += 1
                if self.skip(key):
                    continue
                try:
                    decoded = decode_image_file(path)
                except ImageRejected as exc:
                    logger.debug("%s: rejected %s: %s", self.name, key, exc.reason)
                    self.on_reject(key, exc.reason)
                    continue
                return Frame(
                    source=self.name,
                    index=index,
                    image=decoded.image,
                    captured_at=decoded.mtime,  # the file's time, not ours (module docstring)
                    key=key,
                    path=path,
                    live=False,
                    extra={"mtime": decoded.mtime, "format": decoded.format, "bytes": decoded.size_bytes},
                )
            if not self.cfg.watch:
                return None
            while not self._stopped():
                (self.stop_event or self._closed).wait(self.cfg.watch_interval)
                if self._stopped():
                    break
                if self._poll():
                    break
            if self._stopped():
                return None

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
  position in that listing.
* Symlinks (``edge.sources.pathguard``): one that leads out of the folder, to
  a file or a folder, is refused (a warning and a row in ``rejected.csv``,
  once per path) unless the source sets ``follow_symlinks: true``; a symlinked
  folder inside the folder is not walked twice, and with ``follow_symlinks``
  folder loops are cut.  Anything that resolves into the daemon's state or
  dataset folder or to one of its secret files is refused whatever the
  setting.  The read checks the opened file again (a symlink swapped in after
  the listing is refused, never read).
* The frame key is the absolute path (without resolving symlinks, so it does
  not change when a mount point moves); ``skip(key)`` is asked before the file
  is even read, which makes resuming a half-done folder cheap.
* File identity is content, not name.  The ledger keeps the content
  (``size:mtime_ns:sha256``) of the first file labeled under each path
  (``identity_of``, ``Ledger.note_identity``).  A file whose size and mtime
  still match it is that file (skipped when done, nothing read); otherwise its
  bytes are hashed: the same bytes keep the plain key, other bytes (a new
  picture under an old name) get the key ``<path>#<sha256[:16]>``, hence a new
  record id, and are labeled.  So the first version of every path keeps the
  key, and record id, it had before identities were kept, and ``--fresh`` keeps
  the identities (a replaced file is never given its predecessor's id).  A path
  labeled before identities were kept adopts, when first met, the size and
  mtime of the file as it is then (``adopt_identity``; no file is read for it):
  a change after the upgrade is seen; one made before it cannot be.

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
``EMPTY_GRACE`` seconds: then it is read, and rejected as a zero-byte file.  A file that changes
after it was read, skipped or rejected (its size or mtime differ on a later poll: a copy that paused
half-way and was rejected as cut off, then resumed; a new picture saved under the same name) is
treated as a new file: read again once it holds still for two polls, with no time limit while the
folder is watched (without ``watch``, the next run does it).  Its content decides its key (above).
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
from edgelabel.edge.sources.imageio import (
    ImageRejected,
    content_key,
    decode_image_bytes,
    file_content,
    read_image_bytes,
)
from edgelabel.edge.sources.pathguard import PathGuard

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
        #: watch mode: (size, mtime_ns) of each file when it was read, skipped or rejected (None: stat failed)
        self._read_sig: dict[str, tuple[int, int] | None] = {}
        #: plain key -> content emitted under it in this run (before the ledger has it)
        self._emitted: dict[str, str] = {}
        self._emitted_keys: set[str] = set()  # frame keys returned in this run (never twice)
        self._empty_since: dict[str, float] = {}  # monotonic time a pending file was first seen empty
        self._ignored: set[str] = set()
        self._walk_errors: set[str] = set()
        self._pos = 0
        self._total: int | None = None
        self._announced = False
        #: what may be read (built at open, when ``protected`` is set)
        self.guard: PathGuard | None = None
        #: path -> why it is refused, not yet reported / already reported (once per path and reason)
        self._refusals: dict[str, str] = {}
        self._refused: dict[str, str] = {}

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
        self.guard = PathGuard(self.root, self.cfg.follow_symlinks, self.protected)
        inside = self.guard.protected_reason(os.path.realpath(self.root))
        if inside is not None:
            raise SourceError(f"folder {self.root} {inside}; point the source at another folder")
        self._closed.clear()
        self._files = self._scan()
        self._seen = set(self._files)
        self._pending = {}
        self._read_sig = {}
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

    def _refuse(self, path: str, why: str) -> None:
        """A file or folder the guard refuses: reported (``on_reject``) by the next ``read``, once per reason."""
        if self._refused.get(path) != why:
            self._refusals[path] = why

    def _report_refusals(self) -> None:
        while self._refusals:
            path, why = self._refusals.popitem()
            self._refused[path] = why
            self.on_reject(text_path(path), why)

    def _scan(self) -> list[str]:
        """Absolute paths of the candidate image files, in natural order of their relative path."""
        guard = self.guard or PathGuard(self.root, self.cfg.follow_symlinks, self.protected)
        follow = self.cfg.follow_symlinks
        walked: set[str] = set()  # real paths of the folders walked (follow_symlinks: loops end here)
        found: list[tuple[tuple[tuple[tuple[object, ...], ...], str], str]] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error, followlinks=follow):
            if follow:
                real = os.path.realpath(dirpath)
                if real in walked:
                    dirnames[:] = []
                    continue
                walked.add(real)
            keep = []
            for d in dirnames:
                if d.startswith("."):
                    continue
                full = os.path.join(dirpath, d)
                link = os.path.islink(full)
                why = guard.refusal(full, is_dir=True)  # also a real folder: the state folder may lie inside
                if why is not None:
                    self._refuse(full, why)
                    continue
                if link and not follow:
                    continue  # leads back inside the folder: its files are listed where they really are
                keep.append(d)
            dirnames[:] = keep
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                    if full not in self._ignored:
                        self._ignored.add(full)
                        logger.debug("%s: ignoring %s (hidden or not an image extension)", self.name, full)
                    continue
                # (a path listed before is not looked at again here: each poll would lstat every file; the
                # read checks what it opens anyway)
                if full not in self._seen and os.path.islink(full):
                    why = guard.refusal(full)
                    if why is not None and os.path.exists(full):  # a broken one is rejected by the read
                        self._refuse(full, why)
                        continue
                self._refused.pop(full, None)  # a refused path that is fine now may be refused again later
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
                if path not in self._read_sig or self._changed_since_read(path) is False:
                    continue
                # rewritten after it was read (a new picture under the name, a copy that paused and resumed):
                # treated as a new file, read once it stops changing
                del self._read_sig[path]
                self._seen.discard(path)
                logger.info("%s: %s changed after it was read; reading it again once it stops changing",
                            self.name, text_path(path))
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

    def _changed_since_read(self, path: str) -> bool:
        try:
            st = os.stat(path)
            sig: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            sig = None
        return sig != self._read_sig.get(path)

    def _stopped(self) -> bool:
        return self._closed.is_set() or (self.stop_event is not None and self.stop_event.is_set())

    # ------------------------------------------------------------------ reading

    def _identify(self, path: str, path_key: str) -> tuple[str, bytes | None, os.stat_result | None]:
        """The frame key of the file's current content (``edge.sources.imageio.content_key``)."""
        return content_key(self, path, path_key, self._emitted.get(path_key))

    def _note_read(self, path: str) -> None:
        """Remember the file's size and mtime as read, so a watching poll sees it change afterwards."""
        if not self.cfg.watch:
            return
        try:
            st = os.stat(path)
            self._read_sig[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            self._read_sig[path] = None

    def read(self) -> Frame | None:
        while True:
            self._report_refusals()
            while self._pos < len(self._files):
                index = self._pos
                path = self._files[index]
                path_key = text_path(path)  # a Latin-1 name from a share: storable text, the same on every run
                self._pos += 1
                self.current_input = path_key
                self._note_read(path)
                try:
                    key, data, st = self._identify(path, path_key)
                    if key in self._emitted_keys or self.skip(key):  # a touched file: the same picture
                        continue
                    if data is None or st is None:
                        data, st = read_image_bytes(path, self.guard)
                    image, fmt = decode_image_bytes(data)
                except ImageRejected as exc:
                    logger.debug("%s: rejected %s: %s", self.name, path_key, exc.reason)
                    self.on_reject(path_key, exc.reason)
                    continue
                content = file_content(data, st)
                self._emitted_keys.add(key)
                if key == path_key:
                    self._emitted.setdefault(path_key, content)
                else:
                    logger.info("%s: %s has new content under a name labeled before; labeled as %s",
                                self.name, path_key, key)
                return Frame(
                    source=self.name,
                    index=index,
                    image=image,
                    captured_at=st.st_mtime,  # the file's time, not ours (module docstring)
                    key=key,
                    path=path,
                    live=False,
                    extra={"mtime": st.st_mtime, "format": fmt, "bytes": len(data),
                           "sha256": content.rsplit(":", 1)[-1],  # of the bytes decoded: sinks need not re-read
                           # the ledger keeps it: which content owns the plain key (``Ledger.note_identity``)
                           "identity": content if key == path_key else None},
                )
            if not self.cfg.watch:
                return None
            while not self._stopped():
                self.idle = True  # waiting for new files is not a stall (listing a hung mount is)
                try:
                    (self.stop_event or self._closed).wait(self.cfg.watch_interval)
                finally:
                    self.idle = False
                if self._stopped():
                    break
                self.current_input = self.root
                if self._poll():
                    break
            if self._stopped():
                return None

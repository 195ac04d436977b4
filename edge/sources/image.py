"""A single image file: one frame, then finished.

The same decoding and rejection rules as a folder (``edge.sources.imageio``):
a file that exists but cannot be used is reported through ``on_reject`` and
the source finishes without a frame; only a missing file is a SourceError,
because that is a configuration mistake rather than bad input.  Like a
folder's images, the frame's ``captured_at`` is the file's modification time,
and the file is known by its content (a new picture under the same name gets
its own key, see ``edge.sources.folder``).
"""

from __future__ import annotations

import logging
import os

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.frame import Frame
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


class ImageSource(Source):
    """One image file; key and ``frame.path`` are its absolute path."""

    live = False
    stills = True

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.path = os.path.abspath(os.path.expanduser(target))
        self._done = False
        self.guard: PathGuard | None = None

    def describe(self) -> str:
        return f"ImageSource({self.path})"

    def open(self) -> None:
        if not os.path.lexists(self.path):
            raise SourceError(f"image {self.path} not found")
        # the configured file may be a symlink anywhere, but never into the daemon's own files
        self.guard = PathGuard(os.path.dirname(self.path), follow_symlinks=True, protected=self.protected)
        why = self.guard.protected_reason(os.path.realpath(self.path))
        if why is not None:
            raise SourceError(f"image {self.path} {why}")
        self._done = False

    def total(self) -> int | None:
        return 1

    def read(self) -> Frame | None:
        if self._done:
            return None
        self._done = True
        try:
            # a new picture under the name of one labeled before gets its own key (edge.sources.folder)
            key, data, st = content_key(self, self.path, self.path)
            if self.skip(key):
                return None
            if data is None or st is None:
                data, st = read_image_bytes(self.path, self.guard)
            image, fmt = decode_image_bytes(data)
        except ImageRejected as exc:
            logger.debug("%s: rejected %s: %s", self.name, self.path, exc.reason)
            self.on_reject(self.path, exc.reason)
            return None
        content = file_content(data, st)
        return Frame(
            source=self.name,
            index=0,
            image=image,
            captured_at=st.st_mtime,  # the file's time, not ours (module docstring)
            key=key,
            path=self.path,
            live=False,
            extra={"mtime": st.st_mtime, "format": fmt, "bytes": len(data),
                   "sha256": content.rsplit(":", 1)[-1],  # of the bytes decoded: sinks need not re-read
                   "identity": content if key == self.path else None},
        )

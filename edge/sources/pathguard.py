"""Which files a storage source may open: symlinks that leave the input folder, and the daemon's own files.

Why: a drop folder is written by other people and machines (an SMB share, a camera's FTP upload).  A
symlink put there, ``in/x.jpg -> /var/lib/edgelabel/web-token`` or ``in/ds -> /var/lib/edgelabel/dataset``,
would have the daemon read a file it keeps secret or label its own dataset, and the page would serve the
result.  So:

* with ``follow_symlinks: false`` (the default) a file or folder whose real path is outside the source's
  folder is refused: not read, listed in ``rejected.csv`` with the reason and a warning in the log;
  a symlink that stays inside the folder is fine;
* with ``follow_symlinks: true`` symlinks are followed wherever they point (folder loops are cut);
* either way, anything whose real path is inside the daemon's state folder or dataset folder, or is one
  of its secret files (web token, cookie key, TLS key, MQTT password file, account file; also as a hard
  link, found by its inode even when the file appeared after the start), is always refused.

The listing checks each symlink's target; the read checks again what was actually opened (the real path
of the open file descriptor, from ``/proc/self/fd``, and its inode), so a symlink or folder swapped in
between the listing and the read is refused too, never read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgelabel.edge.config import Config

FOLLOW_HINT = "set follow_symlinks: true for this source to follow it"


def protected_paths(cfg: Config) -> tuple[str, ...]:
    """Real paths of what the daemon keeps: state and dataset folders, secret files (a storage input may not read
    them).  The files are listed too because they may be configured outside state_dir."""
    paths: list[Path] = [cfg.resolve(cfg.state_dir)]
    if cfg.dataset.enabled:
        paths.append(cfg.resolve(cfg.dataset.path))
    from edgelabel.edge.accounts import ACCOUNTS_FILE  # here: the sources load nothing of the web at import
    from edgelabel.edge.certs import AUTO_KEY_FILE

    web = cfg.web
    # the generated TLS key and the account file are inside state_dir, but a hard link to them is only found by
    # its inode, so they are named too
    paths += [cfg.state_path(web.token_file), cfg.state_path(web.secret_key_file), cfg.state_path(AUTO_KEY_FILE),
              cfg.state_path(ACCOUNTS_FILE)]
    if isinstance(web.tls, dict) and web.tls.get("key"):
        paths.append(cfg.resolve(str(web.tls["key"])))
    if cfg.mqtt.password_file:
        paths.append(cfg.resolve(cfg.mqtt.password_file))
    if cfg.mqtt.tls is not None and cfg.mqtt.tls.key:
        paths.append(cfg.resolve(cfg.mqtt.tls.key))
    return tuple(dict.fromkeys(os.path.realpath(p) for p in paths))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class PathGuard:
    """The rules above for one source folder (``root``, as configured; its own real path is the boundary)."""

    root: str
    follow_symlinks: bool = False
    protected: Iterable[str] = ()
    _root_real: str = field(init=False)
    _protected: tuple[str, ...] = field(init=False)
    _inodes: set[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self._root_real = os.path.realpath(self.root)
        self._protected = tuple(os.path.realpath(p) for p in self.protected)
        self._inodes = set()
        for p in self._protected:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if not os.path.isdir(p):
                self._inodes.add((st.st_dev, st.st_ino))

    def protected_reason(self, real: str) -> str | None:
        """Why a real path may never be read by an input, or None."""
        for p in self._protected:
            if _inside(real, p):
                return f"resolves to {real}, inside the daemon's own files ({p}); never read as an input"
        return None

    def refusal(self, path: str, *, is_dir: bool = False) -> str | None:
        """Why the file (or folder) at ``path`` must not be read, judged by where it really is; None: fine."""
        real = os.path.realpath(path)
        why = self.protected_reason(real)
        if why is not None:
            return why
        if not self.follow_symlinks and not _inside(real, self._root_real):
            what = "a symlink" if os.path.islink(path) else "a path"
            kind = "folder" if is_dir else "file"
            return f"{what} to the {kind} {real}, outside the input folder {self._root_real}; {FOLLOW_HINT}"
        return None

    def _secret_inode(self, st: os.stat_result) -> bool:
        """Whether ``st`` is one of the protected files: those found at start, or (for a file with more than one
        link) those made since, such as the account file at the first login or a token generated later."""
        key = (st.st_dev, st.st_ino)
        if key in self._inodes:
            return True
        if st.st_nlink < 2:
            return False
        for p in self._protected:
            try:
                other = os.stat(p)
            except OSError:
                continue
            if not stat.S_ISDIR(other.st_mode) and (other.st_dev, other.st_ino) == key:
                self._inodes.add(key)
                return True
        return False

    def check_fd(self, fd: int, path: str, st: os.stat_result) -> str | None:
        """Why the file just opened as ``fd`` must not be read (what was opened, not what the path says now)."""
        if self._secret_inode(st):
            return "is one of the daemon's own secret files (a hard link to it); never read as an input"
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the path as it resolves now (the listing checked it before)
            real = os.path.realpath(path)
        real = real.removesuffix(" (deleted)")
        why = self.protected_reason(real)
        if why is not None:
            return why
        if not self.follow_symlinks and not _inside(real, self._root_real):
            return (f"opened {real}, outside the input folder {self._root_real} (a symlink or folder swapped in "
                    f"after the listing?); {FOLLOW_HINT}")
        return None


def read_checked(path: str | os.PathLike[str], guard: PathGuard) -> bytes:
    """A whole regular file, checked by ``guard`` before it is opened and again on the open descriptor before a
    byte is read.  Raises PermissionError (refused: the message says why) or another OSError."""
    text = os.fspath(path)
    why = guard.refusal(text)
    if why is not None:
        raise PermissionError(why)
    if not stat.S_ISREG(os.stat(text).st_mode):  # a device is not even opened
        raise PermissionError("is not a regular file")
    fd = os.open(text, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        why = guard.check_fd(fd, text, st)
        if why is None and not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        if why is not None:
            raise PermissionError(why)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)

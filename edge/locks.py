"""One process per folder: the ``flock`` that the state_dir and the dataset both take.

``flock`` is released by the kernel when the process dies, so a kill -9 leaves no stale lock; the file holds
the holder's pid, for the message that tells a second process who has it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "edgelabel.lock"


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote (``pid N``)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def hold_lock(folder: Path) -> int:
    """Take ``<folder>/edgelabel.lock`` for this process and return its fd (keep it open); LockHeld otherwise."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown pid"
        os.close(fd)
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return fd

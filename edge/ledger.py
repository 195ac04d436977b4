"""The job ledger: which frames are done, so a killed folder job resumes exactly.

A frame is marked done only after every sink has taken its record.  If the
daemon dies between the sinks and the mark, the frame is processed again on
restart and gets the same record id (see ``edge.records.record_id``); sinks
are idempotent on that id, so it is still labeled exactly once.

"Done" means done *by this job*: the model (its sha256) and the thresholds
that made the boxes.  The ledger keeps that identity (:class:`Job`); opened
for another one -- a different model file, ``conf`` or ``iou`` -- it forgets
the frames done before, so they are labeled again instead of being skipped
while the dataset's metadata names a model that never saw them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: OS errors that a freed disk, a remount or a repaired device cures: the write is retried, not abandoned
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
#: SQLite's words for the same conditions (sqlite3.OperationalError carries no errno)
_SQLITE_STORAGE = ("disk is full", "readonly database", "disk i/o error", "unable to open database file")


def storage_fault(exc: BaseException | None) -> str | None:
    """The storage condition behind ``exc`` (its message), or None when it is not one.

    Follows the exception chain: an error raised while handling a full disk (SQLite's "cannot rollback -
    no transaction is active" after SQLite already rolled back, or a sink's SinkRefused) names its cause
    there, and it is the cause, not the wrapper, that says the write can succeed again once space returns.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return str(exc)
        if isinstance(exc, sqlite3.OperationalError) and any(w in str(exc).lower() for w in _SQLITE_STORAGE):
            return f"SQLite: {exc}"
        exc = exc.__cause__ or exc.__context__
    return None


class StateUnavailable(Exception):
    """The state_dir cannot be written: read-only, full, failing, or its disk is not mounted.

    Not a configuration error: a remount, freed space or a mounted disk fixes it without an edit, so the
    CLI exits 1 (restarted by the unit) instead of 2 (``RestartPreventExitStatus``).  The message names
    the path and what to check.
    """


def storage_problem(field: str, path: Path, exc: BaseException) -> str:
    """The line for a ``StateUnavailable``: which setting, which path, the cause and what to check."""
    cause = storage_fault(exc) or str(exc)
    return (f"{field}: {path} cannot be written ({cause}): check that its disk is mounted read-write "
            f"(`findmnt -T {path}`), has free space (`df -h {path}`) and reports no I/O errors "
            "(`dmesg`); the service starts again by itself once it can write there")


@dataclass(frozen=True)
class Job:
    """What makes two runs' boxes the same: the model file's sha256 and the thresholds (name: for messages)."""

    model_sha256: str
    conf: float
    iou: float
    model_name: str = ""

    def same_boxes(self, other: Job) -> bool:
        return (self.model_sha256, self.conf, self.iou) == (other.model_sha256, other.conf, other.iou)

    def describe(self) -> str:
        return f"{self.model_name or 'model'} (sha256 {self.model_sha256[:12]}), conf {self.conf:g}, iou {self.iou:g}"


@dataclass(frozen=True)
class JobChange:
    """The ledger was opened for another job: ``forgotten`` frames done by ``previous`` are labeled again."""

    previous: Job
    current: Job
    forgotten: int


class Ledger:
    """SQLite (WAL) table of finished frames and rejected inputs, per source, for one :class:`Job`."""

    def __init__(self, path: Path, job: Job | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS done (source TEXT NOT NULL, key TEXT NOT NULL, record_id TEXT NOT NULL,"
            " done_at REAL NOT NULL, PRIMARY KEY (source, key))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rejected (source TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL,"
            " at REAL NOT NULL, PRIMARY KEY (source, path))"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute(IDENTITY_TABLE)
        #: set when this job differs from the one that marked the frames done (they were forgotten)
        self.job_change: JobChange | None = None
        if job is not None:
            self._bind(job)

    def _bind(self, job: Job) -> None:
        """Tie the done frames to ``job``; frames a different job marked are forgotten (labeled again)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'job'").fetchone()
        previous = _job_from(row[0]) if row else None
        done = int(self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0])
        if done and previous is not None and not previous.same_boxes(job):
            before = previous
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM done")
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('job', ?)", (json.dumps(asdict(job)),))
            self._db.execute("COMMIT")
            self.job_change = JobChange(before, job, done)
            log.warning("%d frame(s) were labeled by %s; this run uses %s: they are labeled again "
                        "(a frame a person reviewed keeps the person's boxes)", done, before.describe(), job.describe())
            return
        # a ledger written before jobs were recorded is taken to be this job's (an upgrade keeps its progress)
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('job', ?)", (json.dumps(asdict(job)),))

    def job(self) -> Job | None:
        """The job the done frames belong to (None for a ledger that has not recorded one)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'job'").fetchone()
        return _job_from(row[0]) if row else None

    def is_done(self, source: str, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM done WHERE source=? AND key=?", (source, key)).fetchone()
        return row is not None

    def mark_done(self, source: str, key: str, record_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO done (source, key, record_id, done_at) VALUES (?, ?, ?, ?)",
                (source, key, record_id, time.time()),
            )

    def mark_rejected(self, source: str, path: str, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO rejected (source, path, reason, at) VALUES (?, ?, ?, ?)",
                (source, path, reason, time.time()),
            )

    def done_count(self, source: str | None = None) -> int:
        with self._lock:
            if source is None:
                return int(self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM done WHERE source=?", (source,)).fetchone()[0])

    def rejected(self) -> list[tuple[str, str, str, float]]:
        with self._lock:
            return list(self._db.execute("SELECT source, path, reason, at FROM rejected ORDER BY source, path"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ file identity (folder sources)

    def identity(self, source: str, key: str) -> str | None:
        """The content (``size:mtime_ns:sha256``) of the first file labeled under the plain key ``key``."""
        with self._lock:
            row = self._db.execute("SELECT content FROM identity WHERE source=? AND key=?", (source, key)).fetchone()
        return str(row[0]) if row else None

    def note_identity(self, source: str, key: str, content: object) -> None:
        """Remember which content owns ``key`` (the first one wins); called after ``mark_done``. No-op for None.

        Kept by ``--fresh`` and by a job change (``forget_done``): a file replaced under its name gets a new key,
        and so a new record id, even when everything is labeled again.
        """
        if not isinstance(content, str) or not content:
            return
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO identity (source, key, content, at) VALUES (?, ?, ?, ?)",
                             (source, key, content, time.time()))


IDENTITY_TABLE = ("CREATE TABLE IF NOT EXISTS identity (source TEXT NOT NULL, key TEXT NOT NULL, content TEXT NOT NULL,"
                  " at REAL NOT NULL, PRIMARY KEY (source, key))")


def forget_done(path: Path) -> None:
    """``--fresh``: forget the done frames, rejections and job of the ledger at ``path``, keep file identities.

    A ledger that cannot be opened or changed (corrupt, not a database) is deleted instead, as before.
    """
    path = Path(path)
    if path.exists():
        try:
            db = sqlite3.connect(str(path), isolation_level=None)
            try:
                db.execute(IDENTITY_TABLE)
                db.execute("BEGIN")
                for table in ("done", "rejected", "meta"):
                    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
                        db.execute(f"DELETE FROM {table}")  # noqa: S608 -- fixed table names
                db.execute("COMMIT")
            finally:
                db.close()
            return
        except sqlite3.DatabaseError as exc:
            log.warning("--fresh: the ledger %s cannot be cleared (%s); deleting it (file identities are lost)",
                        path, exc)
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(str(path) + suffix)
        except FileNotFoundError:
            pass


def _job_from(text: str) -> Job | None:
    try:
        d = json.loads(text)
        return Job(str(d["model_sha256"]), float(d["conf"]), float(d["iou"]), str(d.get("model_name", "")))
    except (ValueError, KeyError, TypeError):
        return None

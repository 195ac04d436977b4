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

A damaged file costs only what is damaged (:mod:`edge.salvage`): every page is read
once at open (``quick_check``) and a read that fails later on a malformed page is
caught too; the file is moved aside, its readable rows copied into a new one and
the unreadable ones counted in ``lost`` (the ``ledger_lost`` alarm).  A lost
"done" row means the frame is labeled again -- with the same record id, so
consumers and the dataset de-duplicate -- and a lost rejection is tried again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgelabel.edge.salvage import is_corrupt, open_checked, salvage_file

log = logging.getLogger(__name__)
T = TypeVar("T")
#: the ledger's tables, salvaged row by row from a corrupt file
LEDGER_TABLES = ("done", "rejected", "meta", "identity")

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
        #: rows a corrupt file took with it (see _replace_corrupt), and what that means, in words, and when
        self.lost = 0
        self.last_loss: str | None = None
        self.last_loss_at: float | None = None
        self._db = self._open()
        #: set when this job differs from the one that marked the frames done (they were forgotten)
        self.job_change: JobChange | None = None
        if job is not None:
            self._guarded(lambda: self._bind(job))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS done (source TEXT NOT NULL, key TEXT NOT NULL, record_id TEXT NOT NULL,"
                " done_at REAL NOT NULL, PRIMARY KEY (source, key))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS rejected (source TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL,"
                " at REAL NOT NULL, PRIMARY KEY (source, path))"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(IDENTITY_TABLE)
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        """Open the file, read every page once (``quick_check``); a corrupt one is salvaged, not fatal."""
        db, exc = open_checked(self._connect)
        if exc is not None:
            return self._replace_corrupt(exc)
        assert db is not None
        return db

    def _replace_corrupt(self, exc: BaseException) -> sqlite3.Connection:
        """Move the damaged file aside, start a new one with every row still readable, count and explain the rest."""
        db, aside, kept, lost = salvage_file(self.path, self._connect, LEDGER_TABLES)
        done = kept.get("done")
        what = (f"job ledger {self.path} was corrupt ({exc}): moved it to {aside}, kept "
                f"{done.kept if done else 0} done frame(s) and "
                f"{sum(r.kept for t, r in kept.items() if t != 'done')} other row(s) in a new file; "
                f"{lost} row(s) could not be read")
        if lost:
            what += (" -- the frames among them are labeled again when their files are read (the same record ids, "
                     "so MQTT consumers and the dataset de-duplicate them) and rejected files are tried again")
        self.lost += lost
        self.last_loss, self.last_loss_at = what, time.time()
        log.error("%s; the job goes on. Check the disk (dmesg, smartctl) if this happens again.", what)
        return db

    def _guarded(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (under ``self._lock``); a file that turns out corrupt is salvaged and ``fn`` run once more."""
        with self._lock:
            try:
                return fn()
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._db.close()
                self._db = self._replace_corrupt(exc)
                return fn()

    def stats(self) -> dict[str, Any]:
        """Losses to a corrupt file, for the status snapshot (``ledger_lost`` alarm, stats topic)."""
        return {"path": str(self.path), "lost": self.lost, "last_loss": self.last_loss,
                "last_loss_at": self.last_loss_at}

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
        row = self._guarded(lambda: self._db.execute("SELECT value FROM meta WHERE key = 'job'").fetchone())
        return _job_from(row[0]) if row else None

    def is_done(self, source: str, key: str) -> bool:
        row = self._guarded(
            lambda: self._db.execute("SELECT 1 FROM done WHERE source=? AND key=?", (source, key)).fetchone())
        return row is not None

    def mark_done(self, source: str, key: str, record_id: str) -> None:
        self._guarded(lambda: self._db.execute(
            "INSERT OR REPLACE INTO done (source, key, record_id, done_at) VALUES (?, ?, ?, ?)",
            (source, key, record_id, time.time())))

    def mark_rejected(self, source: str, path: str, reason: str) -> None:
        self._guarded(lambda: self._db.execute(
            "INSERT OR REPLACE INTO rejected (source, path, reason, at) VALUES (?, ?, ?, ?)",
            (source, path, reason, time.time())))

    def rejection(self, source: str, path: str) -> tuple[str, float] | None:
        """Why and when (epoch seconds) ``path`` of ``source`` was rejected by this job (None if it was not)."""
        row = self._guarded(lambda: self._db.execute(
            "SELECT reason, at FROM rejected WHERE source=? AND path=?", (source, path)).fetchone())
        return None if row is None else (str(row[0]), float(row[1]))

    def done_count(self, source: str | None = None) -> int:
        if source is None:
            return int(self._guarded(lambda: self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0]))
        return int(self._guarded(
            lambda: self._db.execute("SELECT COUNT(*) FROM done WHERE source=?", (source,)).fetchone()[0]))

    def rejected(self) -> list[tuple[str, str, str, float]]:
        return self._guarded(
            lambda: list(self._db.execute("SELECT source, path, reason, at FROM rejected ORDER BY source, path")))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ file identity (folder sources)

    def identity(self, source: str, key: str) -> str | None:
        """The content (``size:mtime_ns:sha256``) of the first file labeled under the plain key ``key``."""
        row = self._guarded(lambda: self._db.execute(
            "SELECT content FROM identity WHERE source=? AND key=?", (source, key)).fetchone())
        return str(row[0]) if row else None

    def note_identity(self, source: str, key: str, content: object) -> None:
        """Remember which content owns ``key`` (the first one wins); called after ``mark_done``. No-op for None.

        Kept by ``--fresh`` and by a job change (``forget_done``): a file replaced under its name gets a new key,
        and so a new record id, even when everything is labeled again.
        """
        if not isinstance(content, str) or not content:
            return
        self._guarded(lambda: self._db.execute(
            "INSERT OR IGNORE INTO identity (source, key, content, at) VALUES (?, ?, ?, ?)",
            (source, key, content, time.time())))


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

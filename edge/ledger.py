"""The job ledger: which frames are done, so a killed folder job resumes exactly.

A frame is marked done only after every sink has taken its record.  If the
daemon dies between the sinks and the mark, the frame is processed again on
restart and gets the same record id (see ``edge.records.record_id``); sinks
are idempotent on that id, so it is still labeled exactly once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path


class Ledger:
    """SQLite (WAL) table of finished frames and rejected inputs, per source."""

    def __init__(self, path: Path) -> None:
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

"""The durable outbox: an SQLite (WAL) queue between the pipeline and the MQTT broker.

Why it exists: paho keeps unacknowledged QoS>0 messages in RAM only, so a
broker outage longer than the RAM budget, a ``kill -9`` or a power cut used to
lose labels.  Every message the MQTT sink must deliver is first stored here; a
publisher reads committed rows in order and deletes a row only when the broker
has acknowledged it (PUBACK / PUBCOMP).  After a restart whatever is still in
the table is published again, in the original order.

Design decisions:

* **One table, one order.**  ``seq`` is an AUTOINCREMENT key, so reading by
  ``seq`` replays everything in the order it was written, which is in
  particular the order per source.  ``source`` is stored for statistics and
  debugging only.
* **Committed before published.**  :meth:`fetch` only sees committed rows;
  rows waiting in the in-memory batch are invisible to the publisher.
* **Batched commits.**  A commit in WAL mode with ``synchronous=NORMAL`` is a
  ``write()`` into the WAL without ``fsync`` (~60 µs here), which survives a
  process crash but may lose the last transactions on a power cut.  Callers
  choose per :meth:`put`: ``sync=True`` commits before returning (the job
  ledger marks a storage frame done right after the sinks took it, so those
  rows must be on disk first), ``sync=False`` adds the rows to a batch that is
  committed when it holds ``batch_size`` rows or is ``commit_interval``
  seconds old (:meth:`commit_due`, called by the publisher's loop).  A put
  that arrives ``commit_interval`` or more after the previous commit commits
  at once: batching only pays under a burst, and at a camera's pace waiting
  for the batch would add up to ``commit_interval`` to every label's latency.
  Acknowledged rows are deleted in one transaction per :meth:`ack` call.
* **Bounded.**  ``max_messages`` caps the rows (a put that would exceed it
  commits at once, evicting or waiting as the policy says) and ``max_age``
  expires old rows (:meth:`expire`).  When full, the ``policy`` decides:
  ``drop_oldest`` deletes the oldest rows to make room; ``stop_capture`` makes
  :meth:`put` wait until the publisher has made room, which back-pressures the
  pipeline (storage sources wait, live sources drop frames in the frame hub).
  The wait polls an ``interrupted`` callback so shutdown is never blocked.
  Every row that is dropped (evicted, expired, refused) is counted and logged.
* **A broken file must not stop the daemon.**  A file SQLite cannot read is
  renamed ``<name>.corrupt-<time>`` with an ERROR and a new outbox is started.
* ``path=None`` keeps the table in memory: same behaviour, nothing durable.
* **Checkpoints off the write path.**  SQLite normally copies the WAL back
  into the database file (with an ``fsync``) inside whichever commit makes
  the WAL pass 1000 pages: on a camera stream that is every ~150 labels, and
  that label waited 10-30 ms longer.  Automatic checkpoints are off; the
  publisher thread calls :meth:`checkpoint`, which runs a PASSIVE checkpoint
  on a second connection without holding the lock, so writers never wait for it.

Thread safety: one connection, guarded by one lock (a ``Condition`` so a
blocked ``put`` can wait for room).  Any thread may call any method.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "stop_capture")
SCHEMA_VERSION = 1
#: seconds between log lines about drops while they keep happening (the first is logged at once)
DROP_LOG_INTERVAL = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    source     TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL,
    retain     INTEGER NOT NULL,
    msg_id     TEXT,
    created_at REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at);
"""


@dataclass(frozen=True)
class Message:
    """One MQTT message to store: ``source`` orders it, ``msg_id`` is the id consumers de-duplicate on."""

    source: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    msg_id: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    """A committed row: the message plus its position (``seq``) and when it was stored."""

    seq: int
    source: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    msg_id: str | None
    created_at: float


@dataclass(frozen=True)
class PutResult:
    """What :meth:`Outbox.put` did: rows accepted, and rows refused (stop_capture interrupted)."""

    stored: int
    refused: int
    committed: bool = False  # the rows are committed (visible to the publisher) on return


class Outbox:
    """Durable, bounded, ordered message queue; see the module doc for the contract."""

    def __init__(
        self,
        path: Path | str | None,
        *,
        max_messages: int = 1_000_000,
        max_age: float = 0.0,
        policy: str = "drop_oldest",
        commit_interval: float = 0.0,
        batch_size: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"outbox policy {policy!r} is not one of {', '.join(POLICIES)}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        self.path = None if path is None else Path(path)
        self.max_messages = max_messages
        self.max_age = max_age
        self.policy = policy
        self.commit_interval = commit_interval
        self.batch_size = max(1, batch_size)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._buffer: list[tuple[str, str, bytes, int, int, str | None, float]] = []
        self._buffer_since = 0.0  # monotonic time the oldest buffered row arrived
        self._last_commit = float("-inf")  # monotonic time of the last commit
        self._closed = False
        self._waiting = 0  # writers blocked by stop_capture
        # drop accounting (cumulative for this process) and rate-limited logging
        self.evicted = 0
        self.expired = 0
        self.refused = 0
        self._unlogged: dict[str, int] = {}
        self._last_drop_log: dict[str, float] = {}
        self._db = self._open()
        self._checkpoint_db: sqlite3.Connection | None = None  # the publisher's own connection (checkpoint())
        self._commits_since_checkpoint = 0
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._count:
            log.info("outbox %s: %d message(s) from a previous run will be sent first", self.where, self._count)

    # ------------------------------------------------------------------ set-up

    @property
    def durable(self) -> bool:
        return self.path is not None

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "(memory)"

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return self._connect(":memory:")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect(str(self.path))
        except sqlite3.OperationalError:
            raise  # cannot open, locked, I/O error: not the file's fault, do not move it
        except sqlite3.DatabaseError as exc:  # not a database, malformed, unknown schema version
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s cannot be read (%s); moved it to %s and started an empty outbox", self.path, exc, aside)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            return self._connect(str(self.path))

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            if target != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            db.executescript(_SCHEMA)
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"outbox schema version {version}, this build reads {SCHEMA_VERSION}")
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # ------------------------------------------------------------------ writing

    def put(
        self,
        messages: Sequence[Message],
        *,
        sync: bool = True,
        interrupted: Callable[[], bool] | None = None,
        poll: float = 0.1,
    ) -> PutResult:
        """Store ``messages`` (in order); with ``sync`` they are committed before this returns.

        With ``stop_capture`` and a full outbox this blocks until the publisher
        has made room, checking ``interrupted()`` every ``poll`` seconds; if it
        becomes true the messages are refused (counted and logged) instead.
        """
        if not messages:
            return PutResult(0, 0)
        now = self._clock()
        rows = [(m.source, m.topic, bytes(m.payload), int(m.qos), int(m.retain), m.msg_id, now) for m in messages]
        with self._cond:
            if self._closed:
                raise RuntimeError("outbox is closed")
            if self.policy == "stop_capture" and not self._wait_for_room_locked(len(rows), interrupted, poll):
                self.refused += len(rows)
                self._note_drop_locked("refused", len(rows))
                return PutResult(0, len(rows))
            mono = time.monotonic()
            if not self._buffer:
                self._buffer_since = mono
            self._buffer.extend(rows)
            full = self._count + len(self._buffer) > self.max_messages  # drop_oldest evicts at the commit
            quiet = mono - self._last_commit >= self.commit_interval
            committed = sync or full or quiet or len(self._buffer) >= self.batch_size or self._batch_due_locked()
            if committed:
                self._commit_locked()
        return PutResult(len(rows), 0, committed)

    def _wait_for_room_locked(self, n: int, interrupted: Callable[[], bool] | None, poll: float) -> bool:
        """stop_capture: wait until ``n`` more rows fit (or the outbox is empty); False if interrupted."""
        if self._fits_locked(n):
            return True
        # the publisher can only send committed rows: commit the batch before waiting for it
        self._commit_locked()
        if self._fits_locked(n):
            return True
        self._waiting += 1
        if self._waiting == 1:
            log.warning(
                "outbox %s full (%d message(s), max_messages=%d, policy stop_capture): capture waits until the "
                "broker has taken messages",
                self.where, self._count, self.max_messages,
            )
        try:
            while not self._fits_locked(n):
                if self._closed or (interrupted is not None and interrupted()):
                    return False
                self._cond.wait(poll)
        finally:
            self._waiting -= 1
        return True

    def _fits_locked(self, n: int) -> bool:
        depth = self._count + len(self._buffer)
        return depth == 0 or depth + n <= self.max_messages

    def _batch_due_locked(self) -> bool:
        return bool(self._buffer) and time.monotonic() - self._buffer_since >= self.commit_interval

    def commit(self) -> int:
        """Commit the in-memory batch now; returns the rows committed."""
        with self._cond:
            return self._commit_locked()

    def commit_due(self) -> int:
        """Commit the batch if it is ``commit_interval`` old (the publisher calls this in its loop)."""
        with self._cond:
            return self._commit_locked() if self._batch_due_locked() else 0

    def _commit_locked(self) -> int:
        if not self._buffer or self._closed:
            return 0
        rows, self._buffer = self._buffer, []
        self._last_commit = time.monotonic()
        overflow = self._count + len(rows) - self.max_messages
        evict_db = evict_buf = 0
        if overflow > 0 and self.policy == "drop_oldest":
            evict_db = min(overflow, self._count)
            evict_buf = overflow - evict_db  # only when one batch alone exceeds max_messages
            rows = rows[evict_buf:]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            if evict_db:
                deleted = db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (evict_db,)
                ).rowcount
            db.executemany(
                "INSERT INTO outbox (source, topic, payload, qos, retain, msg_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count += len(rows) - deleted
        self._commits_since_checkpoint += 1
        if deleted or evict_buf:
            self.evicted += deleted + evict_buf
            self._note_drop_locked("evicted", deleted + evict_buf)
        return len(rows)

    # ------------------------------------------------------------------ reading and acknowledging

    def fetch(self, after_seq: int = 0, limit: int = 100) -> list[StoredMessage]:
        """Committed rows with ``seq > after_seq``, oldest first (the publisher's window)."""
        with self._cond:
            if self._closed:
                return []
            cur = self._db.execute(
                "SELECT seq, source, topic, payload, qos, retain, msg_id, created_at FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
            return [StoredMessage(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6], r[7]) for r in cur]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged rows in one transaction; returns how many were still there."""
        keys = [(int(s),) for s in seqs]
        if not keys:
            return 0
        with self._cond:
            if self._closed:
                return 0
            db = self._db
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            deleted = db.total_changes - before
            self._count -= deleted
            self._commits_since_checkpoint += 1
            if deleted:
                self._cond.notify_all()
            return deleted

    def expire(self) -> int:
        """Delete rows older than ``max_age`` seconds (0 = never); they are counted as dropped."""
        if self.max_age <= 0:
            return 0
        cutoff = self._clock() - self.max_age
        with self._cond:
            if self._closed:
                return 0
            deleted = self._db.execute("DELETE FROM outbox WHERE created_at < ?", (cutoff,)).rowcount
            if deleted > 0:
                self._count -= deleted
                self.expired += deleted
                self._note_drop_locked("expired", deleted)
                self._cond.notify_all()
            return max(deleted, 0)

    def checkpoint(self, min_commits: int = 64) -> bool:
        """Copy the WAL into the database file if ``min_commits`` commits happened since the last time.

        PASSIVE, on a separate connection and without the lock: puts and acks go
        on meanwhile (WAL readers and writers do not wait for a checkpointer), so
        the ``fsync`` it ends with costs the publisher thread, not a label.
        Returns True when a checkpoint ran.
        """
        if self.path is None or self._closed or self._commits_since_checkpoint < min_commits:
            return False
        self._commits_since_checkpoint = 0
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                                      timeout=10.0)
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # an optimisation: the WAL is still complete and replayed on open
            log.debug("outbox checkpoint failed: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ reporting

    @property
    def depth(self) -> int:
        """Messages stored and not yet acknowledged (committed rows plus the in-memory batch)."""
        with self._cond:
            return self._count + len(self._buffer)

    @property
    def dropped(self) -> int:
        """Every message this outbox lost on purpose: evicted + expired + refused."""
        with self._cond:
            return self.evicted + self.expired + self.refused

    def oldest_age(self) -> float | None:
        """Seconds since the oldest stored row was written (None when empty)."""
        with self._cond:
            if self._closed or not self._count:
                return None
            row = self._db.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else max(0.0, self._clock() - float(row[0]))

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot for status pages and the stats topic."""
        age = self.oldest_age()
        with self._cond:
            return {
                "path": self.where,
                "durable": self.durable,
                "policy": self.policy,
                "max_messages": self.max_messages,
                "max_age_s": self.max_age,
                "depth": self._count + len(self._buffer),
                "uncommitted": len(self._buffer),
                "oldest_age_s": None if age is None else round(age, 1),
                "blocked": self._waiting > 0,
                "evicted": self.evicted,
                "expired": self.expired,
                "refused": self.refused,
            }

    def _note_drop_locked(self, kind: str, n: int) -> None:
        """Log drops: the first of each kind at once, then a summary at most every DROP_LOG_INTERVAL."""
        self._unlogged[kind] = self._unlogged.get(kind, 0) + n
        now = time.monotonic()
        if now - self._last_drop_log.get(kind, float("-inf")) < DROP_LOG_INTERVAL:
            return
        self._last_drop_log[kind] = now
        count, self._unlogged[kind] = self._unlogged[kind], 0
        total = self.evicted + self.expired + self.refused
        if kind == "evicted":
            why = f"outbox full (max_messages={self.max_messages}, policy drop_oldest): dropped the oldest"
        elif kind == "expired":
            why = f"older than outbox max_age={self.max_age:g} s: dropped"
        else:
            why = "outbox full and the sink is closing (policy stop_capture): not stored"
        log.warning("outbox %s: %s %d message(s); %d dropped in total", self.where, why, count, total)

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Commit the batch, checkpoint the WAL into the main file, release blocked writers."""
        with self._cond:
            if self._closed:
                return
            self._commit_locked()
            self._closed = True
            self._cond.notify_all()
            for kind, n in self._unlogged.items():
                if n:
                    log.warning("outbox %s: %d more message(s) %s before closing", self.where, n, kind)
            if self._checkpoint_db is not None:
                self._checkpoint_db.close()
                self._checkpoint_db = None
            try:
                if self.durable:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a checkpoint is an optimisation; the WAL is replayed on open anyway
                log.debug("outbox checkpoint failed: %s", exc)
            self._db.close()

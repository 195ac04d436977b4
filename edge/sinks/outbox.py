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
* **A refused message does not block the line.**  A message the broker
  refuses for good (too large, not authorised) is moved with its reason into
  the ``dead_letter`` table (:meth:`dead_letter`), counted and kept, and the
  publisher goes on with the next one; ``edgelabel outbox
  list|export|requeue <file>`` shows, exports or re-sends them.
* **Corruption costs what is corrupt.**  A file SQLite cannot open, or one
  whose rows stop reading ("database disk image is malformed"), is moved
  aside and its readable rows are copied row by row into a new file
  (:mod:`edge.salvage`, shared with the job ledger and the dataset index); what could not be read is counted in ``lost`` and
  logged as an ERROR (an alarm, see ``edge/health.py``).
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

from edgelabel.edge.salvage import copy_table, estimate_rows, is_corrupt, move_aside, open_read_only

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "stop_capture")
SCHEMA_VERSION = 1
#: seconds between log lines about drops while they keep happening (the first is logged at once)
DROP_LOG_INTERVAL = 30.0
#: seconds stats() waits for the lock before it answers with the last snapshot (and busy_s)
STATS_WAIT = 0.5

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
CREATE TABLE IF NOT EXISTS dead_letter (
    seq        INTEGER PRIMARY KEY,
    source     TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    qos        INTEGER NOT NULL,
    retain     INTEGER NOT NULL,
    msg_id     TEXT,
    created_at REAL    NOT NULL,
    reason     TEXT    NOT NULL,
    failed_at  REAL    NOT NULL
);
"""
_COLUMNS = "source, topic, payload, qos, retain, msg_id, created_at"


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
        self.lost = 0  # rows a corrupt file took with it (salvage could not read them)
        self.last_loss: str | None = None  # what was lost, in words, and when (last_loss_at, wall clock)
        self.last_loss_at: float | None = None
        self.dead_lettered = 0  # rows moved to the dead-letter table by this process
        self._head: tuple[int, float] | None = None  # (lowest seq, monotonic time it became the head)
        self._last_stats: dict[str, Any] = {}  # stats() answers this while the lock stays taken (busy_s)
        self._busy_since: float | None = None
        self._unlogged: dict[str, int] = {}
        self._last_drop_log: dict[str, float] = {}
        self._db = self._open()
        self._checkpoint_db: sqlite3.Connection | None = None  # the publisher's own connection (checkpoint())
        self._commits_since_checkpoint = 0
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._dead = int(self._db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])
        if self._dead:
            log.warning("outbox %s: %d message(s) the broker refused are set aside in its dead-letter table; see "
                        "them with `edgelabel outbox list %s`, send them again with `requeue`",
                        self.where, self._dead, self.where)
        if self._count:
            log.info("outbox %s: %d message(s) from a previous run will be sent first", self.where, self._count)
        self.stats()  # the first snapshot, so a busy answer has every key

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
            return self._replace_corrupt(exc, expected=None)

    def _replace_corrupt(self, exc: BaseException, expected: int | None) -> sqlite3.Connection:
        """Move the unreadable file aside, start a new one with every row that can still be read, count the rest.

        ``expected``: the rows the file held, when known (this process counted them); else it is estimated
        from the damaged file.  Returns the new connection.
        """
        assert self.path is not None
        aside = move_aside(self.path)
        db = self._connect(str(self.path))
        salvaged, lost, dead = _salvage(aside, db, expected)
        self.lost += lost
        self._dead = int(db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])
        what = (f"outbox {self.path} was corrupt ({exc}): moved it to {aside}, kept {salvaged} readable message(s) "
                f"(+{dead} set aside) in a new file, {lost} message(s) could not be read and are lost")
        self.last_loss, self.last_loss_at = what, time.time()
        log.error("%s; delivery goes on. Check the disk (dmesg, smartctl) if this happens again.", what)
        return db

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
            if db.in_transaction:  # SQLite may have rolled back already (disk full): keep the real error
                db.execute("ROLLBACK")
            raise
        if self._count == 0 and rows:
            self._head = (-1, time.monotonic())
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
            query = ("SELECT seq, source, topic, payload, qos, retain, msg_id, created_at FROM outbox"
                     " WHERE seq > ? ORDER BY seq LIMIT ?")
            try:
                rows = self._db.execute(query, (after_seq, limit)).fetchall()
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._recover_locked(exc)
                rows = self._db.execute(query, (after_seq, limit)).fetchall()
            return [StoredMessage(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6], r[7]) for r in rows]

    def _recover_locked(self, exc: BaseException) -> None:
        """The open file went corrupt under us: salvage it into a new one (in memory: nothing to salvage)."""
        if self.path is None:
            raise exc
        expected = self._count
        self._db.close()
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        self._db = self._replace_corrupt(exc, expected=expected)
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._cond.notify_all()

    def _note_head_locked(self, head: int | None) -> None:
        """Remember since when the lowest row has been the head (for ``head_wait_s``: a head that never goes)."""
        if head is None:
            self._head = None
        elif self._head is not None and self._head[0] == -1:  # stored into an empty outbox: waiting since then
            self._head = (head, self._head[1])
        elif self._head is None or self._head[0] != head:
            self._head = (head, time.monotonic())

    def head_wait(self) -> float | None:
        """Seconds the current head row has been waiting to be acknowledged (None when empty)."""
        with self._cond:
            if self._closed or not self._count:
                self._head = None
                return None
            row = self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()
            self._note_head_locked(None if row is None else row[0])
            return None if self._head is None else time.monotonic() - self._head[1]

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, seq: int, reason: str) -> StoredMessage | None:
        """Move row ``seq`` into the dead-letter table with ``reason``; returns it (None if already gone)."""
        with self._cond:
            if self._closed:
                return None
            db = self._db
            row = db.execute(f"SELECT seq, {_COLUMNS} FROM outbox WHERE seq = ?", (int(seq),)).fetchone()
            if row is None:
                return None
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"INSERT OR REPLACE INTO dead_letter (seq, {_COLUMNS}, reason, failed_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, reason, self._clock()))
                db.execute("DELETE FROM outbox WHERE seq = ?", (int(seq),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (disk full): keep the real error
                    db.execute("ROLLBACK")
                raise
            self._count -= 1
            self._dead += 1
            self.dead_lettered += 1
            self._commits_since_checkpoint += 1
            self._cond.notify_all()
            return StoredMessage(row[0], row[1], row[2], bytes(row[3]), row[4], bool(row[5]), row[6], row[7])

    def dead_letters(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The set-aside rows, oldest first, with their reason (for ``list``/``export``)."""
        with self._cond:
            cur = self._db.execute(f"SELECT seq, {_COLUMNS}, reason, failed_at FROM dead_letter ORDER BY seq LIMIT ?",
                                   (limit,))
            return [{"seq": r[0], "source": r[1], "topic": r[2], "payload": bytes(r[3]), "qos": r[4],
                     "retain": bool(r[5]), "msg_id": r[6], "created_at": r[7], "reason": r[8], "failed_at": r[9]}
                    for r in cur]

    def requeue(self) -> int:
        """Put every dead letter back at the end of the outbox (after the broker was fixed); returns how many."""
        with self._cond:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                n = db.execute(f"INSERT INTO outbox ({_COLUMNS}) SELECT source, topic, payload, qos, retain, msg_id, "
                               "? FROM dead_letter ORDER BY seq", (self._clock(),)).rowcount
                db.execute("DELETE FROM dead_letter")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (disk full): keep the real error
                    db.execute("ROLLBACK")
                raise
            self._count += n
            self._dead = 0
            self._cond.notify_all()
            return n

    def ack(self, seqs: Iterable[int], wait: float | None = None) -> int | None:
        """Delete acknowledged rows in one transaction; returns how many were still there.

        With ``wait``, gives up after that many seconds without the lock and returns None (nothing
        deleted): a status request must not hang behind a writer stuck on the disk.
        """
        keys = [(int(s),) for s in seqs]
        if not keys:
            return 0
        if wait is not None:
            if not self._cond.acquire(timeout=wait):
                return None
            self._cond.release()
        with self._cond:
            if self._closed:
                return 0
            db = self._db
            before = db.total_changes
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back already (disk full): keep the real error
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._recover_locked(exc)
                db = self._db
                before = db.total_changes
                db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
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
        """Messages stored and not yet acknowledged (committed rows plus the in-memory batch).

        Read without the lock: a status page must answer while a writer is stuck inside a SQLite call
        (a hung disk), and two integer reads are at worst one batch out of step.
        """
        return self._count + len(self._buffer)

    @property
    def dropped(self) -> int:
        """Every message this outbox lost: evicted + expired + refused (on purpose) + lost (corrupt file).

        Lock-free for the same reason as ``depth``.
        """
        return self.evicted + self.expired + self.refused + self.lost

    def oldest_age(self) -> float | None:
        """Seconds since the oldest stored row was written (None when empty)."""
        with self._cond:
            if self._closed or not self._count:
                return None
            row = self._db.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else max(0.0, self._clock() - float(row[0]))

    def stats(self, wait: float = STATS_WAIT) -> dict[str, Any]:
        """A JSON-able snapshot for status pages and the stats topic.

        Waits at most ``wait`` seconds for the lock: when another thread holds it that long (a commit
        hung on the disk), the last snapshot comes back with ``busy_s``, how long the lock has not been
        free for us, so /healthz and the stats topic keep answering and show the hang.
        """
        if not self._cond.acquire(timeout=wait):
            if self._busy_since is None:
                self._busy_since = time.monotonic()
            return {**self._last_stats, "depth": self.depth, "busy_s": round(time.monotonic() - self._busy_since, 1)}
        self._cond.release()
        self._busy_since = None
        age = self.oldest_age()
        head_wait = self.head_wait()
        with self._cond:
            self._last_stats = {
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
                "lost": self.lost,
                "last_loss": self.last_loss,
                "last_loss_at": self.last_loss_at,
                "dead_letter": self._dead,
                "dead_lettered": self.dead_lettered,
                "head_wait_s": None if head_wait is None else round(head_wait, 1),
                "busy_s": None,
            }
            return dict(self._last_stats)

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


def _salvage(src: Path, dst: sqlite3.Connection, expected: int | None) -> tuple[int, int, int]:
    """Copy every readable row of a damaged outbox file into ``dst`` (:func:`edge.salvage.copy_table`).

    Returns (rows kept, rows lost, dead letters kept).  ``expected`` is the rows the file held when known;
    without it the loss is the ids that failed to read, or the file's leaf pages when SQLite cannot read it.
    """
    old = open_read_only(src)
    if old is None:
        return 0, expected if expected is not None else estimate_rows(src), 0
    try:
        try:
            row = old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            top = None if row is None else int(row[0]) + 1
        except (sqlite3.DatabaseError, TypeError, ValueError):
            top = None
        rows = copy_table(old, dst, "outbox", top_hint=top)
        dead = copy_table(old, dst, "dead_letter")  # an old file without it, or a bad page: already counted
    finally:
        old.close()
    if expected is not None:
        lost = max(0, expected - rows.kept)
    elif rows.unreadable or rows.kept or not rows.damaged:
        lost = rows.unreadable
    else:
        lost = estimate_rows(src)
    return rows.kept, lost, dead.kept


def main(argv: Sequence[str] | None = None) -> int:
    """``edgelabel outbox list|export|requeue FILE``: the dead-letter table of an outbox.

    ``list`` prints one line per set-aside message (topic, size, reason); ``export`` writes them as JSON
    lines (payload as text when it is UTF-8, else base64) to stdout; ``requeue`` puts them back at the end
    of the outbox, to be sent again (stop the daemon first: it counts its rows when it starts).
    """
    import argparse
    import base64
    import json
    import sys

    parser = argparse.ArgumentParser(prog="edgelabel outbox", description=main.__doc__)
    parser.add_argument("action", choices=("list", "export", "requeue"))
    parser.add_argument("file", type=Path, help="the outbox file (state_dir/outbox.sqlite by default)")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        sys.stderr.write(f"{args.file}: no such outbox file (mqtt.outbox.path inside state_dir)\n")
        return 2
    ob = Outbox(args.file)
    try:
        if args.action == "requeue":
            n = ob.requeue()
            sys.stdout.write(f"{n} message(s) put back into {args.file}; they are sent on the next start\n")
            return 0
        for d in ob.dead_letters(limit=10**9):
            if args.action == "list":
                sys.stdout.write(f"{d['seq']}\t{d['topic']}\t{len(d['payload'])} bytes\t{d['reason']}\n")
                continue
            try:
                payload: Any = d["payload"].decode("utf-8")
                enc = "utf-8"
            except UnicodeDecodeError:
                payload, enc = base64.b64encode(d["payload"]).decode(), "base64"
            sys.stdout.write(json.dumps({**d, "payload": payload, "encoding": enc}) + "\n")
    finally:
        ob.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

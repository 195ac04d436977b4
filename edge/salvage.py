"""Row-by-row salvage of a damaged SQLite file: the one approach the outbox, the job ledger and the dataset index share.

Why: a page overwritten on a failing SD card or a torn write makes every full scan of its table fail
("database disk image is malformed"), for ever and after every restart; a file whose header is gone is
"not a database".  Deleting the file loses everything; keeping it stops the daemon.  What is corrupt is
usually one page: the rows on the other pages can still be read one by one (a lookup only fails when it
lands on the bad page).  So the damaged file is moved aside (kept for a post-mortem), a new file is
started, every readable row is copied into it keeping its rowid, and what could not be read is counted
so the caller can say what the loss means (an alarm, see ``edge/health.py``).

Which row ids exist is learned from the table scanned from both ends (a scan stops at the bad page) and
from each of the table's indexes (separate pages: they still name the rows of a bad table page, which
are then counted as unreadable, not silently missed); between the two ends of a broken scan the ids are
probed one by one (at most ``SALVAGE_PROBE_MAX``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: at most this many row ids are probed one by one inside a corrupt region of a table
SALVAGE_PROBE_MAX = 2_000_000


def is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB (the file's fault), not a lock, I/O or full-disk error (OperationalError)."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)


def integrity_problem(db: sqlite3.Connection) -> str | None:
    """The first problem ``PRAGMA quick_check`` finds (every page of every table and index is read), or None.

    Raises sqlite3.DatabaseError when the file cannot be read at all.  Costs one read of the file
    (about 0.1 s for 100 MB here); callers run it once when they open.
    """
    row = db.execute("PRAGMA quick_check(1)").fetchone()
    return None if row is None or row[0] == "ok" else " ".join(str(row[0]).split())


def move_aside(path: Path) -> Path:
    """Rename ``path`` (and its -wal/-shm) to ``<name>.corrupt-<time>``; returns the new name."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            side.rename(Path(str(aside) + suffix))
    return aside


def open_read_only(src: Path) -> sqlite3.Connection | None:
    """A read-only connection to a damaged file, or None when SQLite cannot open it at all."""
    try:
        db = sqlite3.connect(f"file:{src}?mode=ro", uri=True, isolation_level=None)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.Error:
        return None


@dataclass
class TableSalvage:
    """What :func:`copy_table` did for one table."""

    kept: int = 0
    unreadable: int = 0  # rows known to exist (a scan or an index names them) whose read failed
    damaged: bool = False  # a scan stopped at a bad page, or the table could not be read at all


def copy_table(old: sqlite3.Connection, dst: sqlite3.Connection, table: str, *, top_hint: int | None = None,
               probe_max: int = SALVAGE_PROBE_MAX) -> TableSalvage:
    """Copy every readable row of ``table`` from ``old`` into the same table of ``dst``, keeping its rowid.

    Columns are those both files have (an older file may lack newer columns: their defaults apply).
    ``top_hint``: the highest rowid ever given (an AUTOINCREMENT table's sqlite_sequence), used when the
    scan from the top fails at once.  ``dst`` must not be in a transaction; the rows are inserted in one.
    """
    out = TableSalvage()
    try:
        old_cols = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
        indexes = [r[1] for r in old.execute(f"PRAGMA index_list({table})")]
    except sqlite3.DatabaseError:
        return TableSalvage(damaged=True)
    if not old_cols:
        return out  # not in the old file (an older version)
    new_cols = {r[1] for r in dst.execute(f"PRAGMA table_info({table})")}
    cols = [c for c in old_cols if c in new_cols]
    ids: set[int] = set()
    lo_end, hi_end = 0, None
    for order in ("ASC", "DESC"):
        try:
            for (rid,) in old.execute(f"SELECT rowid FROM {table} NOT INDEXED ORDER BY rowid {order}"):
                ids.add(rid)
                if order == "ASC":
                    lo_end = rid
                else:
                    hi_end = rid
        except sqlite3.DatabaseError:
            out.damaged = True
    for index in indexes:  # an index lives on other pages: it still names the rows of a bad table page
        try:
            ids.update(rid for (rid,) in old.execute(f'SELECT rowid FROM {table} INDEXED BY "{index}"'))
        except sqlite3.DatabaseError:
            pass
    if out.damaged:
        top = hi_end if hi_end is not None else top_hint
        if top is not None:
            ids.update(range(max(lo_end + 1, int(top) - probe_max), int(top)))
    quoted = ", ".join(f'"{c}"' for c in cols)
    rows = []
    for rid in sorted(ids):
        try:
            row = old.execute(f"SELECT rowid, {quoted} FROM {table} WHERE rowid = ?", (rid,)).fetchone()
        except sqlite3.DatabaseError:
            out.unreadable += 1
            continue
        if row is not None:
            rows.append(row)
    marks = ", ".join("?" * (len(cols) + 1))
    dst.execute("BEGIN IMMEDIATE")
    try:
        dst.executemany(f"INSERT OR IGNORE INTO {table} (rowid, {quoted}) VALUES ({marks})", rows)
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    out.kept = len(rows)
    return out


def estimate_rows(path: Path) -> int:
    """Rows in a file SQLite cannot open: the cell counts of its table leaf pages (page 1, the schema, left out).

    An estimate (freed pages may still look like leaves; a file cut short is extrapolated to the page count
    its header declares), used only to say roughly how much was lost.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(100)
            size = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 0
            page = 65536 if size == 1 else size if size >= 512 and size & (size - 1) == 0 else 4096
            declared = int.from_bytes(head[28:32], "big") if head[:16] == b"SQLite format 3\x00" else 0
            fh.seek(page)
            rows, pages = 0, 1
            while chunk := fh.read(page):
                pages += 1
                if len(chunk) >= 5 and chunk[0] == 0x0D:
                    rows += int.from_bytes(chunk[3:5], "big")
    except OSError:
        return 0
    if declared > pages:  # cut off: the header still says how many pages there were
        rows = round(rows * (declared - 1) / max(1, pages - 1))
    return rows


def open_checked(connect: Callable[[], sqlite3.Connection]) -> tuple[sqlite3.Connection | None, BaseException | None]:
    """``connect()`` and read every page once: ``(db, None)`` when sound, ``(None, why)`` when the file is corrupt.

    An ``OperationalError`` (cannot open, locked, I/O error, disk full) is raised as it is: that is not the
    file's fault, and the file must not be moved aside for it.
    """
    db: sqlite3.Connection | None = None
    try:
        db = connect()
        problem = integrity_problem(db)
        if problem is None:
            return db, None
        exc: BaseException = sqlite3.DatabaseError(f"integrity check: {problem}")
    except sqlite3.OperationalError:
        if db is not None:
            db.close()
        raise
    except sqlite3.DatabaseError as err:  # not a database, malformed
        exc = err
    if db is not None:
        db.close()
    return None, exc


def salvage_file(path: Path, connect: Callable[[], sqlite3.Connection],
                 tables: Iterable[str]) -> tuple[sqlite3.Connection, Path, dict[str, TableSalvage], int]:
    """Move a corrupt ``path`` aside, start a new file with ``connect()`` and copy every readable row of ``tables``.

    Returns the new connection, where the damaged file went, what each table kept and the rows lost (an
    estimate from the file's pages when SQLite cannot open it at all).  The caller says what the loss means.
    """
    aside = move_aside(path)
    db = connect()
    old = open_read_only(aside)
    if old is None:
        return db, aside, {}, estimate_rows(aside)
    try:
        kept = {t: copy_table(old, db, t) for t in tables}
    finally:
        old.close()
    return db, aside, kept, sum(r.unreadable for r in kept.values())

"""PostgreSQL side of ingest: numbered SQL migrations and the batch writer.

Exactly once rests on two things here: every write is idempotent (``INSERT ... ON CONFLICT`` on the
message's own id, so a redelivered message changes nothing), and a batch is one transaction, so its
messages are acknowledged to the broker only after ``commit`` returned (``service.py``).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("edgelabel.ingest.db")

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
#: pg_advisory_xact_lock key: the same for every ingest process, so only one migrates at a time
_LOCK_KEY = 0x65646765_6C61626C & 0x7FFFFFFFFFFFFFFF
#: the same for creating partitions (two workers may meet a new month at once)
_PARTITION_LOCK_KEY = _LOCK_KEY - 1
#: tables partitioned by month: records and detections by captured_at (001_init.sql), track_events and alarms
#: by at, device_status by received_at (003_history_partitions.sql); every month a batch needs gets all five
PARTITIONED = ("records", "detections", "track_events", "alarms", "device_status")


def month_of(value: str | None) -> tuple[int, int] | None:
    """(year, month) in UTC of an ISO time, None when it does not parse (the database then rejects the row)."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    dt = dt.astimezone(timezone.utc)
    return dt.year, dt.month


def ensure_partitions(conn: psycopg.Connection, months: set[tuple[int, int]], known: set[tuple[int, int]]) -> None:
    """Create the monthly partitions a batch needs, in a short transaction of their own before the batch's.

    Done apart so that the batch's transaction never waits for the parent table's lock while holding row
    locks (two workers meeting a new month would deadlock); ``known`` caches what exists in this process.
    """
    todo = sorted(months - known)
    if not todo:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK_KEY,))
        # TimescaleDB hypertables (003_history_partitions.sql) make their chunks themselves
        tables = [r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relkind = 'p' AND relname = ANY(%s) "
                                             "AND relnamespace = 'public'::regnamespace", (list(PARTITIONED),))]
        for year, month in todo:
            start = f"{year:04d}-{month:02d}-01 00:00:00+00"
            end = f"{year + month // 12:04d}-{month % 12 + 1:02d}-01 00:00:00+00"
            for table in tables:
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})")
                             .format(sql.Identifier(f"{table}_{year:04d}_{month:02d}"), sql.Identifier(table),
                                     sql.Literal(start), sql.Literal(end)))
    known.update(todo)


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration file, in order; a gap in the numbers is an error."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if not m:
            raise RuntimeError(f"{path}: migration files are named NNN_name.sql (lowercase); rename it")
        found.append((int(m.group(1)), path.name, path.read_text(encoding="utf-8")))
    for expected, (version, name, _) in enumerate(found, start=1):
        if version != expected:
            raise RuntimeError(f"{MIGRATIONS}: expected migration {expected:03d}, found {name}")
    return found


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema up to date in one transaction under an advisory lock; returns the version.

    Several workers may start at once: the lock serialises them, the second sees the first's version and
    applies nothing.  A database newer than this code is refused (an old worker must not write into a
    schema it does not know).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        current = conn.execute("SELECT COALESCE(max(version), 0) FROM schema_version").fetchone()[0]
        known = migrations()
        if current > len(known):
            raise RuntimeError(f"the database's schema is version {current}, newer than this edgelabel "
                               f"({len(known)}): upgrade edgelabel on this host")
        for version, name, sql in known[current:]:
            log.info("database: applying migration %s", name)
            try:
                conn.execute(sql)
            except psycopg.errors.DependentObjectsStillExist as exc:
                # the plant's own views on ingest's tables: retrying cannot help, and PostgreSQL's hint
                # (DROP ... CASCADE) would drop them unseen
                detail = " ".join((exc.diag.message_detail or "").split())
                raise RuntimeError(
                    f"migration {name} cannot run, the database was not changed: {exc.diag.message_primary} "
                    f"({detail}). A view or function of your own uses ingest's tables: save its definition "
                    f"(SELECT pg_get_viewdef('NAME'::regclass)), drop it, start this edgelabel once, then create "
                    f"it again") from None
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
            current = version
    return current


_PARTITION_RE = re.compile(r"^(records|detections|track_events|alarms|device_status)_(\d{4})_(\d{2})$")


def drop_old_partitions(conn: psycopg.Connection, keep_months: int, now: datetime | None = None) -> list[str]:
    """Retention: drop the monthly partitions that end more than ``keep_months`` whole months before ``now``.

    The current month and the ``keep_months`` before it stay; ``record_keys`` rows of the dropped months go too
    (a record of a dropped month that arrives again is stored again).  Returns the tables dropped.
    """
    if keep_months <= 0:
        return []
    now = now or datetime.now(timezone.utc)
    first_kept = (now.year * 12 + now.month - 1) - keep_months  # months since year 0
    dropped: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK_KEY,))
        rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                            "WHERE i.inhparent = ANY(%s::regclass[])", (list(PARTITIONED),)).fetchall()
        for (name,) in rows:
            m = _PARTITION_RE.match(name)
            if m and int(m.group(2)) * 12 + int(m.group(3)) - 1 < first_kept:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                dropped.append(name)
        cutoff = f"{first_kept // 12:04d}-{first_kept % 12 + 1:02d}-01 00:00:00+00"
        if dropped:
            conn.execute("DELETE FROM record_keys WHERE captured_at < %s::timestamptz", (cutoff,))
        dropped += _drop_old_chunks(conn, cutoff)
    return sorted(dropped)


# --- TimescaleDB (only where the extension is installed; kept apart, see 003_history_partitions.sql) -----------


def timescale(conn: psycopg.Connection) -> list[str]:
    """The history tables that are TimescaleDB hypertables ([] on a server without the extension)."""
    if not conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')").fetchone()[0]:
        return []
    return [r[0] for r in conn.execute("SELECT hypertable_name::text FROM timescaledb_information.hypertables "
                                       "WHERE hypertable_name::text = ANY(%s) ORDER BY 1", (list(PARTITIONED),))]


def _drop_old_chunks(conn: psycopg.Connection, cutoff: str) -> list[str]:
    """Retention for hypertables: ``drop_chunks`` older than the first month kept; returns the chunks dropped."""
    dropped: list[str] = []
    for table in timescale(conn):
        rows = conn.execute("SELECT drop_chunks(%s::regclass, older_than => %s::timestamptz)", (table, cutoff))
        dropped += [str(r[0]) for r in rows]
    return dropped


@dataclass
class Message:
    """One MQTT message waiting for its transaction; ``mid``/``qos`` are what the acknowledgement needs."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float = field(default_factory=time.monotonic)
    generation: int = 0  # the broker connection it came on (a PUBACK must go back on that one)


@dataclass
class BatchResult:
    inserted: dict[str, int] = field(default_factory=dict)  # new rows per kind
    duplicates: int = 0  # messages whose id was already stored (redeliveries)
    rejected: int = 0  # messages kept in rejected_messages
    newest_capture: float | None = None  # epoch seconds of the newest label record's captured_at


def _ts(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _required_ts(data: dict[str, Any], key: str) -> str:
    """A time the row is partitioned by: a message without it cannot be placed in a month and is rejected."""
    value = _ts(data.get(key))
    if value is None or month_of(value) is None:
        raise ValueError(f"{key}: {data.get(key)!r} is not an ISO 8601 time (the message's schema requires it)")
    return value


def _uuid(value: Any) -> str:
    """A record id as PostgreSQL prints a uuid; ValueError (the message is rejected) when it is not one."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"id: {value!r} is not a UUID (the label record's schema requires one)") from None


def _epoch_iso(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()
    return None


class Writer:
    """Turns a batch of messages into rows: one multi-row statement per table, one transaction."""

    def __init__(self, conn: psycopg.Connection | None, prefix: str,
                 partitions: set[tuple[int, int]] | None = None) -> None:
        self.conn = conn
        self.partitions = partitions if partitions is not None else set()  # months known to exist
        self.prefix = prefix.rstrip("/").split("/")

    def classify(self, topic: str) -> tuple[str, str, str | None]:
        """(kind, device, source) from a topic under the prefix; kind '' for a topic ingest does not know."""
        levels = topic.split("/")
        n = len(self.prefix)
        if levels[:n] != self.prefix:
            return "", "", None
        rest = levels[n:]
        if len(rest) == 2 and rest[1] in ("events", "review", "alarm", "status"):
            return rest[1], rest[0], None
        if len(rest) == 3 and rest[2] in ("labels", "status"):
            return ("labels" if rest[2] == "labels" else "source_status"), rest[0], rest[1]
        return "", "", None

    def write(self, batch: list[Message]) -> BatchResult:
        """Store the batch in one transaction (committed when this returns); raises on a database error."""
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                                  ("labels", "events", "review", "alarm", "status", "rejected")}
        seen: set[tuple[str, str]] = set()
        result = BatchResult()
        for msg in batch:
            kind, device, source = self.classify(msg.topic)
            try:
                row = self._row(kind, device, source, msg)
            # OverflowError: int() of a 1e999 (JSON's inf); RecursionError: JSON nested thousands deep.  Either,
            # escaping here, would stop the worker on every redelivery of the message
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
                rows["rejected"].append({"topic": msg.topic, "payload": msg.payload.hex(), "error": str(exc)[:500]})
                continue
            key = (kind, str(row.get("id", "")))
            if row.get("id") is not None and key in seen:  # the same message twice in one batch
                result.duplicates += 1
                continue
            seen.add(key)
            rows["status" if kind in ("status", "source_status") else kind].append(row)
        months = {m for m in (month_of(r["captured_at"]) for r in rows["labels"]) if m}
        months |= {m for m in (month_of(r["at"]) for r in rows["events"] + rows["alarm"]) if m}
        if rows["status"]:  # received_at is the transaction's now(): this month, and the next near its end
            now = time.time()
            months |= {month_of(datetime.fromtimestamp(t, timezone.utc).isoformat()) for t in (now, now + 120)}
        if months:
            ensure_partitions(self.conn, months, self.partitions)
        with self.conn.transaction():
            self._devices(rows)
            result.inserted["labels"] = self._labels(rows["labels"])
            result.inserted["events"] = self._insert_json(_EVENTS_SQL, rows["events"])
            result.inserted["reviews"] = self._insert_json(_REVIEWS_SQL, rows["review"])
            if rows["labels"] or rows["review"]:
                ids = [r["id"] for r in rows["labels"]] + [r["record_id"] for r in rows["review"]]
                self.conn.execute(_APPLY_REVIEWS_SQL, (ids,))
            result.inserted["alarms"] = self._insert_json(_ALARMS_SQL, rows["alarm"])
            if rows["alarm"]:
                self.conn.execute(_DEVICE_ALARM_SQL, (json.dumps(rows["alarm"]),))
            result.inserted["status"] = self._status(rows["status"])
            result.rejected = self._insert_json(_REJECTED_SQL, rows["rejected"])
        for r in rows["labels"]:
            ts = r["record"].get("captured_ts")
            if isinstance(ts, (int, float)) and (result.newest_capture is None or ts > result.newest_capture):
                result.newest_capture = float(ts)
        stored = sum(len(v) for k, v in rows.items() if k not in ("rejected", "alarm", "status"))
        new = result.inserted["labels"] + result.inserted["events"] + result.inserted["reviews"]
        result.duplicates += stored - new
        return result

    def write_each(self, batch: list[Message]) -> BatchResult:
        """After a batch failed on its data: each message in its own transaction, a failing one rejected."""
        total = BatchResult()
        for msg in batch:
            try:
                one = self.write([msg])
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                reason = " ".join(str(exc).split())[:500]
                with self.conn.transaction():
                    self._insert_json(_REJECTED_SQL, [{"topic": msg.topic, "payload": msg.payload.hex(),
                                                       "error": reason}])
                one = BatchResult(rejected=1)
            for kind, n in one.inserted.items():
                total.inserted[kind] = total.inserted.get(kind, 0) + n
            total.duplicates += one.duplicates
            total.rejected += one.rejected
            if one.newest_capture is not None:
                total.newest_capture = max(total.newest_capture or 0.0, one.newest_capture)
        return total

    # --- one message -> one row -------------------------------------------------------------------------

    def _row(self, kind: str, device: str, source: str | None, msg: Message) -> dict[str, Any]:
        if kind == "":
            raise ValueError("topic not handled by ingest")
        if kind in ("status", "source_status"):
            text = msg.payload.decode("utf-8", "strict").strip()
            if not text or len(text) > 32:
                raise ValueError(f"status payload {text[:40]!r} is not a status word")
            return {"device": device, "source": source or "", "status": text}
        data = json.loads(msg.payload)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if kind == "labels":
            model = data.get("model") or {}
            dets = data["detections"]
            if not isinstance(dets, list):
                raise TypeError("detections: expected a list")
            # the id in PostgreSQL's own spelling: the COPY below finds each new record by what INSERT RETURNING
            # gives back (lowercase, hyphenated), and two spellings of one id in a batch are one record
            return {"id": _uuid(data["id"]), "device": str(data["device_id"]), "source": str(data["source"]),
                    "frame_index": int(data["frame_index"]), "frame_key": str(data["frame_key"]),
                    "captured_at": _ts(data["captured_at"]) or _epoch_iso(data.get("captured_ts")),
                    "media_time": data.get("media_time"),
                    "model": model.get("name") if isinstance(model, dict) else None, "record": data,
                    "_boxes": [_box_row(n, d) for n, d in enumerate(dets)]}
        if kind == "events":
            return {"id": str(data["id"]), "type": str(data["type"]), "device": str(data.get("device_id") or device),
                    "source": data.get("source"), "record_id": data.get("record_id"),
                    "track_uid": data.get("track_uid"), "label": data.get("label"), "at": _required_ts(data, "at"),
                    "event": data}
        if kind == "review":
            return {"id": str(data["id"]), "record_id": str(data["record_id"]),
                    "device": str(data.get("device_id") or device), "source": data.get("source"),
                    "version": int(data["version"]), "action": str(data["action"]), "state": str(data["state"]),
                    "by_name": data.get("by"), "at": _ts(data.get("at")), "detections": data["detections"],
                    "review": data}
        if kind == "alarm":
            return {"device": str(data.get("device_id") or device), "at": _required_ts(data, "at"),
                    "active": bool(data.get("active")), "alarms": data.get("alarms") or []}
        raise ValueError(f"unknown kind {kind}")

    # --- statements --------------------------------------------------------------------------------------

    def _insert_json(self, sql: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        cur = self.conn.execute(sql, (json.dumps(rows),))
        return cur.rowcount if cur.rowcount >= 0 else 0

    def _labels(self, rows: list[dict[str, Any]]) -> int:
        """Insert the new label records, then COPY their boxes into ``detections``.

        The boxes were parsed in Python with the message (``_box_row``) and go in by ``COPY``: building them
        in SQL from each record's JSONB took 58 % of a batch's time (docs/ingest.md, "Throughput").  Only
        records that were new in this transaction get boxes, so no box can exist yet and COPY needs no
        ``ON CONFLICT``.
        """
        if not rows:
            return 0
        boxes = {r["id"]: r.pop("_boxes") for r in rows}
        cur = self.conn.execute(_LABELS_SQL, (json.dumps(rows),))
        new = [str(r[0]) for r in cur.fetchall()]
        if new:
            by_id = {r["id"]: r for r in rows}
            with self.conn.cursor().copy(_DETECTIONS_COPY) as copy:
                for rid in new:
                    r = by_id[rid]
                    for box in boxes[rid]:
                        copy.write_row((rid, box[0], r["device"], r["source"], r["captured_at"], *box[1:]))
        return len(new)

    def _devices(self, rows: dict[str, list[dict[str, Any]]]) -> None:
        pairs = {(r["device"], r.get("source")) for k in ("labels", "events", "review", "alarm", "status")
                 for r in rows[k]}
        if not pairs:
            return
        devices = sorted({d for d, _ in pairs})
        sources = sorted({(d, s) for d, s in pairs if s})
        self.conn.execute(_DEVICES_SQL, (devices,))
        if sources:
            self.conn.execute(_SOURCES_SQL, ([d for d, _ in sources], [s for _, s in sources]))

    def _status(self, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        payload = json.dumps([{**r, "n": n} for n, r in enumerate(rows)])
        self.conn.execute(_STATUS_HISTORY_SQL, (payload,))
        self.conn.execute(_DEVICE_STATUS_SQL, (payload,))
        self.conn.execute(_SOURCE_STATUS_SQL, (payload,))
        return len(rows)


#: record_keys decides what is new (one row per id, whatever its captured_at); only those go into records
_LABELS_SQL = """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(%s::jsonb) AS x(id uuid, device text, source text, frame_index bigint,
        frame_key text, captured_at timestamptz, media_time double precision, model text, record jsonb)
), new AS (
    INSERT INTO record_keys (id, captured_at) SELECT id, captured_at FROM input
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
INSERT INTO records (id, device, source, frame_index, frame_key, captured_at, media_time, model, record)
SELECT i.id, i.device, i.source, i.frame_index, i.frame_key, i.captured_at, i.media_time, i.model, i.record
FROM input i JOIN new USING (id)
RETURNING id
"""

_DETECTIONS_COPY = ("COPY detections (record_id, idx, device, source, captured_at, class_id, label, score, box, "
                    "track_id) FROM STDIN")


def _box_row(idx: int, det: Any) -> tuple[int, int, str, float | None, list[float], int | None]:
    """(idx, class_id, label, score, box, track_id) of one detection; a malformed one rejects its message."""
    if not isinstance(det, dict):
        raise TypeError(f"detections[{idx}]: expected an object")
    score, track = det.get("score"), det.get("track_id")
    return (idx, int(det["class_id"]), str(det.get("label") or ""), None if score is None else float(score),
            [float(v) for v in det.get("box") or []], None if track is None else int(track))

_EVENTS_SQL = """
INSERT INTO track_events (id, type, device, source, record_id, track_uid, label, at, event)
SELECT x.id, x.type, x.device, x.source, x.record_id, x.track_uid, x.label, x.at, x.event
FROM jsonb_to_recordset(%s::jsonb) AS x(id uuid, type text, device text, source text, record_id uuid,
     track_uid text, label text, at timestamptz, event jsonb)
ON CONFLICT (id, at) DO NOTHING
"""

_REVIEWS_SQL = """
INSERT INTO reviews (id, record_id, device, source, version, action, state, by_name, at, detections, review)
SELECT x.id, x.record_id, x.device, x.source, x.version, x.action, x.state, x.by_name, x.at, x.detections, x.review
FROM jsonb_to_recordset(%s::jsonb) AS x(id uuid, record_id uuid, device text, source text, version int,
     action text, state text, by_name text, at timestamptz, detections jsonb, review jsonb)
ON CONFLICT (id) DO NOTHING
"""

#: the newest review of each record applies, whichever arrived first: the review or its label record
_APPLY_REVIEWS_SQL = """
UPDATE records r
SET review_state = v.state, review_version = v.version, reviewed_detections = v.detections,
    reviewed_by = v.by_name, reviewed_at = v.at
FROM (SELECT DISTINCT ON (record_id) record_id, state, version, detections, by_name, at
      FROM reviews WHERE record_id = ANY(%s::uuid[]) ORDER BY record_id, version DESC, at DESC) v
WHERE r.id = v.record_id AND (r.review_version IS NULL OR r.review_version < v.version)
"""

_ALARMS_SQL = """
INSERT INTO alarms (device, at, active, alarms)
SELECT x.device, x.at, x.active, x.alarms
FROM jsonb_to_recordset(%s::jsonb) AS x(device text, at timestamptz, active boolean, alarms jsonb)
ON CONFLICT (device, at) DO NOTHING
"""

_DEVICE_ALARM_SQL = """
UPDATE devices d SET alarm = jsonb_build_object('at', x.at, 'active', x.active, 'alarms', x.alarms)
FROM (SELECT DISTINCT ON (device) device, at, active, alarms
      FROM jsonb_to_recordset(%s::jsonb) AS y(device text, at timestamptz, active boolean, alarms jsonb)
      ORDER BY device, at DESC) x
WHERE d.device = x.device AND (d.alarm IS NULL OR (d.alarm ->> 'at')::timestamptz <= x.at)
"""

_DEVICES_SQL = """
INSERT INTO devices (device) SELECT unnest(%s::text[])
ON CONFLICT (device) DO UPDATE SET last_seen = now()
"""

_SOURCES_SQL = """
INSERT INTO sources (device, source) SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT (device, source) DO UPDATE SET last_seen = now()
"""

_STATUS_HISTORY_SQL = """
INSERT INTO device_status (device, source, status)
SELECT x.device, x.source, x.status FROM jsonb_to_recordset(%s::jsonb) AS x(device text, source text, status text)
"""

#: the last status of the batch wins (a batch keeps the order the broker delivered)
_DEVICE_STATUS_SQL = """
UPDATE devices d SET status = x.status, status_at = now()
FROM (SELECT DISTINCT ON (device) device, status
      FROM jsonb_to_recordset(%s::jsonb) AS y(device text, source text, status text, n bigint)
      WHERE source = '' ORDER BY device, n DESC) x
WHERE d.device = x.device
"""

_SOURCE_STATUS_SQL = """
UPDATE sources s SET status = x.status, status_at = now()
FROM (SELECT DISTINCT ON (device, source) device, source, status
      FROM jsonb_to_recordset(%s::jsonb) AS y(device text, source text, status text, n bigint)
      WHERE source <> '' ORDER BY device, source, n DESC) x
WHERE s.device = x.device AND s.source = x.source
"""

_REJECTED_SQL = """
INSERT INTO rejected_messages (topic, payload, error)
SELECT x.topic, decode(x.payload, 'hex'), x.error
FROM jsonb_to_recordset(%s::jsonb) AS x(topic text, payload text, error text)
"""

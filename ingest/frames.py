"""Fetching captured frames from the appliances into the plant's frame store (docs/ingest.md "Frames").

Every label record whose ``frame_sha256`` is set gets a row in ``frames`` (a trigger, in the transaction that
stores the record: migration 002).  Fetch threads in ``edgelabel ingest`` work those rows off:

* **claim**: a few pending rows at a time, ``SELECT ... FOR UPDATE SKIP LOCKED`` in one statement that also
  moves their ``next_try_at`` a lease ahead, so two threads or two ingest workers never fetch the same frame,
  and a worker killed mid-fetch leaves rows that come due again when the lease runs out;
* **resume**: the store is content-addressed (``framestore.py``): a frame already stored with its hash is
  marked fetched without a download, so a restart repeats no work;
* **fetch**: ``GET <appliance>/api/dataset/frames/<record_id>`` with the appliance's viewer token, at most
  ``frames.rate`` requests a second per appliance; the bytes must hash to the record's ``frame_sha256``;
* **retry**: an appliance that cannot be reached (refused, timeout, TLS) is backed off as a whole, doubling up
  to ``backoff_max``, and its frames wait without losing an attempt (an appliance switched off for a week
  keeps its frames pending).  An answer that is an error (5xx, 429, 401/403) costs the frame an attempt;
* **fail**: 404 (not stored there, or changed since it was labeled), a hash mismatch, an oversize answer, no
  address for the device, or ``max_attempts`` used: ``failed`` with the reason in ``last_error``, a warning in
  the log, counted in /metrics and /healthz, listed by ``edgelabel ingest frames --failed`` and put back by
  ``--requeue``.  Nothing is dropped silently.

Tokens go in the ``Authorization`` header only; every text that is logged or stored passes ``redact``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import re
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from edgelabel.edge.redact import redact
from edgelabel.ingest.frames_config import FramesSection
from edgelabel.ingest.framestore import FolderStore, S3Store, frame_ext, frame_location, open_store

log = logging.getLogger("edgelabel.ingest.frames")

#: the appliance's endpoint (web/review.py)
FRAME_PATH = "/api/dataset/frames/"
#: a device id that may go into frames.url's {device} (the daemon's own rule for device_id)
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: how long a thread with nothing due waits before looking again
POLL = 1.0
#: how often the pending/failed counts are read from the database for /metrics and /healthz
COUNT_INTERVAL = 5.0

_CLAIM_SQL = """
WITH due AS (
    SELECT record_id FROM frames
    WHERE status = 'pending' AND next_try_at <= now() AND NOT (device = ANY(%(held)s::text[]))
    ORDER BY next_try_at
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE frames f SET next_try_at = now() + make_interval(secs => %(lease)s)
FROM due WHERE f.record_id = due.record_id
RETURNING f.record_id::text AS record_id, f.device, f.source, f.frame_sha256, f.frame_path, f.attempts
"""

_FETCHED_SQL = """
UPDATE frames SET status = 'fetched', location = %(location)s, bytes = %(bytes)s, fetched_at = now(),
    last_error = NULL, attempts = attempts + %(tried)s
WHERE record_id = %(id)s AND status = 'pending'
"""

_FAILED_SQL = """
UPDATE frames SET status = 'failed', last_error = %(error)s, attempts = attempts + %(tried)s, next_try_at = now()
WHERE record_id = %(id)s AND status = 'pending'
"""

#: one more answered try: back to pending after a backoff, or failed once max_attempts are used
_RETRY_SQL = """
UPDATE frames SET attempts = attempts + 1,
    status = CASE WHEN attempts + 1 >= %(max)s THEN 'failed' ELSE 'pending' END,
    last_error = CASE WHEN attempts + 1 >= %(max)s THEN 'gave up after ' || (attempts + 1) || ' attempts: ' || %(error)s
                      ELSE %(error)s END,
    next_try_at = now() + make_interval(secs => %(delay)s)
WHERE record_id = %(id)s AND status = 'pending'
RETURNING status
"""

#: not tried (the appliance is backed off, the store failed, the thread stops): due again at ``at``
_RELEASE_SQL = """
UPDATE frames SET next_try_at = now() + make_interval(secs => %(delay)s),
    last_error = COALESCE(%(error)s, last_error)
WHERE record_id = ANY(%(ids)s::uuid[]) AND status = 'pending'
"""


class _Unreachable(Exception):
    """The appliance could not be reached at all: back off the appliance, not the frame."""


class _Retry(Exception):
    """The appliance answered with an error that may pass: one attempt of the frame used."""


class _Failed(Exception):
    """The frame cannot be fetched as it is: failed, with the reason."""


@dataclass
class _Appliance:
    """Per-appliance state of this process: the rate limiter's next slot and the connection backoff."""

    next_slot: float = 0.0
    delay: float = 0.0
    until: float = 0.0
    error: str | None = None


@dataclass
class FetchTotals:
    fetched: int = 0  # downloaded, verified, stored
    already_stored: int = 0  # the store had the bytes already (a restart, a second record of the same image)
    failed: int = 0
    retried: int = 0
    deferred: int = 0  # put back without a try (appliance unreachable, store error)
    bytes: int = 0
    by_device: dict[str, int] = field(default_factory=dict)


class FrameFetcher:
    """The fetch threads of one ingest worker.  ``start()`` returns at once; ``stop()`` joins the threads."""

    def __init__(self, cfg: FramesSection, dsn: str, password: str | None = None, registry: Any = None) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.password = password
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._appliances: dict[str, _Appliance] = {}
        self.totals = FetchTotals()
        self.counts: dict[str, int] = {}
        self.store: FolderStore | S3Store | None = None
        self.last_error: str | None = None
        self._ssl = self._ssl_context()
        # redirects are not followed: urllib would send the Authorization header along to wherever they point
        self._opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=self._ssl))
        self._metrics(registry)

    def _metrics(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.m_frames = Counter("edgelabel_ingest_frames_total", "frames handled by the fetcher, by result "
                                "(fetched, already_stored, failed, retried, deferred)", ["result"], registry=registry)
        self.m_bytes = Counter("edgelabel_ingest_frame_bytes_total", "bytes of frames fetched and stored",
                               registry=registry)
        self.m_status = Gauge("edgelabel_ingest_frame_rows", "frames in the database by status (pending, fetched, "
                              "failed), read every few seconds", ["status"], registry=registry)
        self.m_backoff = Gauge("edgelabel_ingest_frame_appliances_backed_off",
                               "appliances this worker cannot reach now (waiting before the next try)",
                               registry=registry)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cfg.ca_file) if self.cfg.ca_file else ssl.create_default_context()
        if not self.cfg.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        log.info("frames: fetching into %s with %d thread(s), at most %g request(s)/s per appliance, %d attempts",
                 self._store_name(), cfg.workers, cfg.rate, cfg.max_attempts)
        for i in range(cfg.workers):
            t = threading.Thread(target=self._run, args=(i,), name=f"ingest-frames-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def _store_name(self) -> str:
        cfg = self.cfg
        return f"folder {cfg.folder}" if cfg.store == "folder" else f"s3 {cfg.s3.endpoint}/{cfg.s3.bucket}"

    # --- one thread -------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10, "row_factory": dict_row}
        if self.password:
            kwargs["password"] = self.password
        return psycopg.connect(self.dsn, **kwargs)

    def _run(self, n: int) -> None:
        conn: psycopg.Connection | None = None
        delay = 1.0
        next_count = 0.0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                if self.store is None:
                    with self._lock:
                        if self.store is None:
                            self.store = open_store(self.cfg)
                if n == 0 and time.monotonic() >= next_count:
                    self._count(conn)
                    next_count = time.monotonic() + COUNT_INTERVAL
                rows = conn.execute(_CLAIM_SQL, {"held": self._held(), "n": self._claim_size(),
                                                 "lease": self.cfg.lease}).fetchall()
                delay = 1.0
            except (psycopg.Error, OSError, RuntimeError) as exc:
                self._error(f"frames: {'database ' + self.dsn if isinstance(exc, psycopg.Error) else 'store'}: "
                            f"{exc}; retrying in {delay:.0f} s")
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
                continue
            if not rows:
                self._stop.wait(POLL)
                continue
            for i, row in enumerate(rows):
                try:
                    if self._stop.is_set():
                        self._release(conn, rows[i:], 0.0, None)  # due at once for the next worker
                        break
                    if self._held_now(row["device"]):
                        self._release(conn, [row], self._wait_for(row["device"]), None)
                        continue
                    self._one(conn, row)
                except psycopg.Error as exc:
                    self._error(f"frames: database {self.dsn}: {exc}")
                    conn.close()
                    break  # the claimed rows come due again when their lease ends
                except Exception as exc:  # noqa: BLE001 - a thread must not die silently on one frame
                    log.exception("frames: record %s of %s: unexpected error; it is tried again in %.0f s",
                                  row["record_id"], row["device"], self.cfg.backoff_max)
                    self.last_error = redact(f"record {row['record_id']}: {type(exc).__name__}: {exc}")
                    try:
                        self._release(conn, [row], self.cfg.backoff_max, self.last_error)
                    except psycopg.Error:
                        pass  # the lease runs out instead
        if conn is not None:
            conn.close()

    def _claim_size(self) -> int:
        """Rows per claim: no more than a quarter of the lease's worth at the appliance's rate, so a thread is
        done with what it claimed long before another may take it."""
        return max(1, min(self.cfg.batch, int(self.cfg.rate * self.cfg.lease / 4)))

    def _held(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [d for d, a in self._appliances.items() if a.until > now]

    def _held_now(self, device: str) -> bool:
        a = self._appliances.get(device)
        return a is not None and a.until > time.monotonic()

    def _wait_for(self, device: str) -> float:
        a = self._appliances.get(device)
        return max(0.0, a.until - time.monotonic()) if a is not None else 0.0

    def _error(self, text: str) -> None:
        text = redact(" ".join(text.split()))
        self.last_error = text
        log.error("%s", text)

    # --- one frame --------------------------------------------------------------------------------------

    def _one(self, conn: psycopg.Connection, row: dict[str, Any]) -> None:
        rid, device, sha = row["record_id"], row["device"], row["frame_sha256"]
        location = frame_location(device, row["source"], sha, frame_ext(row["frame_path"]))
        store = self.store
        assert store is not None
        if store.has(location, sha):
            conn.execute(_FETCHED_SQL, {"id": rid, "location": location, "bytes": None, "tried": 0})
            self._count_result("already_stored", device)
            return
        try:
            data = self._fetch(device, rid)
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise _Failed(f"sha256 mismatch: the appliance sent {len(data)} bytes hashing to {got}, the record "
                              f"says {sha}")
        except _Failed as exc:
            reason = redact(str(exc))
            conn.execute(_FAILED_SQL, {"id": rid, "error": reason, "tried": 1})
            self._count_result("failed", device)
            log.warning("frames: %s/%s record %s failed: %s (edgelabel ingest frames --failed lists it, "
                        "--requeue tries again)", device, row["source"], rid, reason)
            return
        except _Retry as exc:
            reason = redact(str(exc))
            attempt = row["attempts"] + 1
            delay = min(self.cfg.backoff_max, self.cfg.backoff_min * 2 ** (attempt - 1)) * random.uniform(1.0, 1.25)
            status = conn.execute(_RETRY_SQL, {"id": rid, "error": reason, "max": self.cfg.max_attempts,
                                               "delay": delay}).fetchone()
            if status and status["status"] == "failed":
                self._count_result("failed", device)
                log.warning("frames: %s record %s failed after %d attempts: %s", device, rid, attempt, reason)
            else:
                self._count_result("retried", device)
                log.info("frames: %s record %s: %s (attempt %d of %d; again in %.0f s)", device, rid, reason,
                         attempt, self.cfg.max_attempts, delay)
            return
        except _Unreachable as exc:
            wait = self._back_off(device, redact(str(exc)))
            self._release(conn, [row], wait, redact(str(exc)))
            return
        try:
            store.put(location, data, sha)
        except OSError as exc:
            # the store's problem, not the frame's: no attempt used, the frame waits
            self._error(f"frames: cannot store {location} in {store.describe}: {exc}")
            self._release(conn, [row], 10.0, f"store: {exc}")
            return
        conn.execute(_FETCHED_SQL, {"id": rid, "location": location, "bytes": len(data), "tried": 1})
        self._count_result("fetched", device, len(data))
        self._reached(device)

    def _fetch(self, device: str, record_id: str) -> bytes:
        base, token = self.cfg.appliance(device)
        own = self.cfg.appliances.get(device)
        if base and not (own and own.url) and not _DEVICE_RE.match(device):
            # the device id comes from the message: in frames.url it could name another host (an '@', a '/')
            raise _Failed(f"device id {device!r} is not 1-64 letters, digits, '_', '-', '.' and cannot go into "
                          f"frames.url: set frames.appliances.<device>.url for it, then requeue")
        if not base:
            raise _Failed(f"no web address for device {device!r}: set frames.url (with {{device}}) or "
                          f"frames.appliances.{device}.url, then requeue")
        self._pace(device)
        req = urllib.request.Request(base + FRAME_PATH + record_id, headers={"Accept": "*/*"})
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        url = base + FRAME_PATH + record_id
        try:
            with self._opener.open(req, timeout=self.cfg.timeout) as resp:
                data = self._body(resp, url, time.monotonic() + self.cfg.timeout)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                where = redact(str(exc.headers.get("Location") or "nowhere"))
                raise _Retry(f"{url} answered {exc.code}, a redirect to {where}: not followed (the token would go "
                             f"along); set frames.url or frames.appliances.{device}.url to the address to use") \
                    from None
            detail = _error_text(exc)
            if exc.code in (404, 410):
                raise _Failed(f"{url} answered {exc.code}: {detail}") from None
            if exc.code in (401, 403):
                raise _Retry(f"{url} answered {exc.code} ({detail}): check the viewer token of {device} "
                             f"(frames.appliances.{device}.token or frames.token)") from None
            raise _Retry(f"{url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Unreachable(f"{url}: {reason}") from None
        except http.client.HTTPException as exc:  # a truncated or malformed answer: it may pass
            raise _Retry(f"{url}: the answer broke off ({type(exc).__name__}: {exc})") from None
        if len(data) > self.cfg.max_bytes:
            raise _Failed(f"{url}: the answer is larger than frames.max_bytes ({self.cfg.max_bytes})")
        return data

    def _body(self, resp: Any, url: str, deadline: float) -> bytes:
        """The answer's body, at most ``max_bytes + 1`` of it, read by the piece so that ``timeout`` bounds the
        whole answer: the socket timeout alone bounds each read, and an appliance dripping a byte now and then
        would hold the thread for hours."""
        parts: list[bytes] = []
        size = 0
        while size <= self.cfg.max_bytes:
            if time.monotonic() > deadline:
                raise _Retry(f"{url}: the answer took longer than frames.timeout ({self.cfg.timeout:g} s) "
                             f"({size} bytes by then)")
            part = resp.read1(min(1 << 20, self.cfg.max_bytes + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def _pace(self, device: str) -> None:
        """Wait for this appliance's next slot: at most ``rate`` requests a second to it from this process."""
        with self._lock:
            a = self._appliances.setdefault(device, _Appliance())
            now = time.monotonic()
            slot = max(now, a.next_slot)
            a.next_slot = slot + 1.0 / self.cfg.rate
        if slot > now:
            self._stop.wait(slot - now)

    def _back_off(self, device: str, reason: str) -> float:
        with self._lock:
            a = self._appliances.setdefault(device, _Appliance())
            first = a.delay == 0.0
            a.delay = min(self.cfg.backoff_max, max(self.cfg.backoff_min, a.delay * 2))
            a.until = time.monotonic() + a.delay
            a.error = reason
            self.m_backoff.set(sum(1 for x in self._appliances.values() if x.until > time.monotonic()))
        (log.warning if first else log.info)("frames: appliance %s cannot be reached (%s); its frames wait, "
                                             "next try in %.0f s", device, reason, a.delay)
        self.last_error = reason
        return a.delay

    def _reached(self, device: str) -> None:
        a = self._appliances.get(device)
        if a is not None and a.delay:
            with self._lock:
                a.delay, a.until, a.error = 0.0, 0.0, None
            log.info("frames: appliance %s is reachable again", device)

    def _release(self, conn: psycopg.Connection, rows: list[dict[str, Any]], delay: float, error: str | None) -> None:
        if not rows:
            return
        conn.execute(_RELEASE_SQL, {"ids": [r["record_id"] for r in rows], "delay": delay, "error": error})
        with self._lock:
            self.totals.deferred += len(rows)
        self.m_frames.labels("deferred").inc(len(rows))

    def _count_result(self, result: str, device: str, size: int = 0) -> None:
        self.m_frames.labels(result).inc()
        with self._lock:
            setattr(self.totals, result, getattr(self.totals, result) + 1)
            if result == "fetched":
                self.totals.bytes += size
                self.totals.by_device[device] = self.totals.by_device.get(device, 0) + 1
        if size:
            self.m_bytes.inc(size)

    def _count(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("SELECT status, count(*) AS n FROM frames GROUP BY status").fetchall()
        counts = {"pending": 0, "fetched": 0, "failed": 0}
        counts.update({r["status"]: r["n"] for r in rows})
        self.counts = counts
        for status, n in counts.items():
            self.m_status.labels(status).set(n)
        self.m_backoff.set(len(self._held()))

    def health(self) -> dict[str, Any]:
        """What /healthz shows under ``frames`` (frame problems never make ingest unhealthy; they are listed)."""
        now = time.monotonic()
        with self._lock:
            backed = {d: {"retry_in_s": round(a.until - now, 1), "error": a.error}
                      for d, a in self._appliances.items() if a.until > now}
            t = self.totals
            return {"store": self._store_name(), "pending": self.counts.get("pending"),
                    "fetched": self.counts.get("fetched"), "failed": self.counts.get("failed"),
                    "this_run": {"fetched": t.fetched, "already_stored": t.already_stored, "failed": t.failed,
                                 "retried": t.retried, "deferred": t.deferred, "bytes": t.bytes},
                    "appliances_backed_off": backed, "last_error": self.last_error}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx answer stays an HTTPError (its Location is reported, never requested)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        return None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The appliance's JSON ``error`` (its reason), else the HTTP reason phrase.

    One ``read1`` (what one receive brings): ``read(4096)`` would wait for all 4096 bytes, a byte per
    socket timeout from an appliance that drips its error answer."""
    try:
        body = exc.read1(4096)
        return str(json.loads(body).get("error") or exc.reason)[:300]
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


# --- the command: edgelabel ingest frames ------------------------------------------------------------------


def list_frames(conn: psycopg.Connection, status: str | None, device: str | None, limit: int) -> list[dict[str, Any]]:
    """Rows of ``frames`` (oldest first), filtered by status and device."""
    where, params = [], []
    if status:
        where.append("status = %s")
        params.append(status)
    if device:
        where.append("device = %s")
        params.append(device)
    sql = ("SELECT record_id::text AS record_id, device, source, status, attempts, last_error, location, bytes, "
           "frame_sha256, created_at, fetched_at FROM frames" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY created_at, record_id LIMIT %s")
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(sql, [*params, limit]).fetchall()


def requeue(conn: psycopg.Connection, device: str | None, record_ids: list[str] | None = None) -> int:
    """Failed frames (of a device, or these ids) back to pending with their attempts reset; returns how many."""
    where, params = ["status = 'failed'"], []
    if device:
        where.append("device = %s")
        params.append(device)
    if record_ids:
        where.append("record_id = ANY(%s::uuid[])")
        params.append(record_ids)
    cur = conn.execute("UPDATE frames SET status = 'pending', attempts = 0, next_try_at = now(), "
                       "last_error = 'requeued after: ' || COALESCE(last_error, '') WHERE " + " AND ".join(where),
                       params)
    return cur.rowcount


def _say(text: str, err: bool = False) -> None:
    """A line of the command's output (stdout), or its error (stderr)."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def command(args: Any, dsn: str, password: str | None) -> int:
    """``edgelabel ingest frames [--failed|--pending|--fetched] [--device D] [--requeue] [--json]``."""
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
    if password:
        kwargs["password"] = password
    try:
        conn = psycopg.connect(dsn, **kwargs)
    except psycopg.Error as exc:
        _say(f"edgelabel ingest frames: database {redact(dsn)}: {redact(str(exc).strip())}", err=True)
        return 1
    with conn:
        try:
            conn.execute("SELECT 1 FROM frames LIMIT 1")
        except psycopg.errors.UndefinedTable:
            _say("edgelabel ingest frames: the database has no frames table yet: start edgelabel ingest once "
                  "(it migrates the schema)", err=True)
            return 1
        if args.requeue:
            n = requeue(conn, args.device, args.record or None)
            _say(f"requeued {n} failed frame(s); a running ingest with frames.enabled fetches them again")
            return 0
        status = "failed" if args.failed else "pending" if args.pending else "fetched" if args.fetched else None
        if status is None:
            counts = conn.execute("SELECT device, status, count(*) FROM frames GROUP BY device, status "
                                  "ORDER BY device, status").fetchall()
            if args.json:
                _say(json.dumps([{"device": d, "status": s, "frames": n} for d, s, n in counts]))
            else:
                _say("device\tstatus\tframes")
                for d, s, n in counts:
                    _say(f"{d}\t{s}\t{n}")
            return 0
        rows = list_frames(conn, status, args.device, args.limit)
        if args.json:
            _say(json.dumps(rows, default=str))
        else:
            _say("record_id\tdevice\tsource\tstatus\tattempts\tlocation\tlast_error")
            for r in rows:
                _say(f"{r['record_id']}\t{r['device']}\t{r['source']}\t{r['status']}\t{r['attempts']}\t"
                      f"{r['location'] or ''}\t{r['last_error'] or ''}")
        return 0


def frames_command(args: Any) -> int:
    """``edgelabel ingest frames``: the frames table through the product's command (frames.py)."""
    from edgelabel.ingest.config import ConfigError, load_ingest_config

    try:
        cfg = load_ingest_config(args.config, db=args.db, log_level=args.log_level)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(f"edgelabel ingest frames: config: {redact(problem)}", err=True)
        return 2
    return command(args, cfg.database.dsn, cfg.database.password)

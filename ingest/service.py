"""The ingest worker: MQTT 5 shared subscription in, batched PostgreSQL transactions out, PUBACK last.

Exactly once, end to end:

1. the broker delivers each message of the share group to one worker, QoS 1, and keeps it in that worker's
   session until the worker acknowledges it (``manual_ack``; a persistent session: fixed client id,
   ``clean_start=False``, a session expiry);
2. the worker stores a batch in one transaction; every write is idempotent on the message's id
   (``db.Writer``), so a message stored twice is stored once;
3. only after ``COMMIT`` returned does the worker send the PUBACKs of that batch.

A worker killed before 3 gets its unacknowledged messages again when it (the same client id) reconnects;
those already committed are skipped by the ``ON CONFLICT``.  Nothing is acknowledged that is not stored.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgelabel.edge.redact import redact
from edgelabel.ingest.config import IngestConfig
from edgelabel.ingest.db import Message, Writer, drop_old_partitions, migrate

log = logging.getLogger("edgelabel.ingest")

#: topics under ``<prefix>/`` the worker takes, as docs/mqtt.md names them (stats and snapshots are not stored)
TOPICS = ("+/+/labels", "+/events", "+/review", "+/alarm", "+/status", "+/+/status")


def subscriptions(prefix: str, group: str) -> list[str]:
    return [f"$share/{group}/{prefix}/{t}" for t in TOPICS]


class Metrics:
    """Prometheus metrics of one worker (its own registry: several workers may share a test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("edgelabel_ingest_messages_total", "MQTT messages stored (committed)", ["kind"],
                                registry=r)
        self.rows = Counter("edgelabel_ingest_rows_total", "new rows (labels, events, reviews, alarms, status)",
                            ["kind"], registry=r)
        self.duplicates = Counter("edgelabel_ingest_duplicates_total",
                                  "messages already stored (redeliveries), skipped", registry=r)
        self.rejected = Counter("edgelabel_ingest_rejected_total",
                                "messages kept in rejected_messages (not JSON, missing fields)", registry=r)
        self.errors = Counter("edgelabel_ingest_errors_total", "failures by stage (db, mqtt)", ["stage"],
                              registry=r)
        self.batch_seconds = Histogram("edgelabel_ingest_batch_seconds", "transaction time of a batch",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=r)
        self.batch_size = Histogram("edgelabel_ingest_batch_messages", "messages per batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 5000), registry=r)
        self.lag = Gauge("edgelabel_ingest_lag_seconds",
                         "age of the oldest message received but not yet committed (0 when none waits)", registry=r)
        self.capture_lag = Gauge("edgelabel_ingest_capture_lag_seconds",
                                 "now minus captured_at of the newest label record committed", registry=r)
        self.pending = Gauge("edgelabel_ingest_pending_messages", "messages received, not yet committed",
                             registry=r)
        self.rate = Gauge("edgelabel_ingest_messages_per_second", "committed messages per second over the "
                          "last progress interval", registry=r)
        self.mqtt_up = Gauge("edgelabel_ingest_mqtt_connected", "1 while connected to the broker", registry=r)
        self.db_up = Gauge("edgelabel_ingest_db_ok", "1 while the last database operation succeeded", registry=r)


class IngestService:
    """One worker of a share group.  ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._generation = 0  # connection count: a PUBACK belongs to the connection that got the message
        self._gen_lock = threading.Lock()
        self.mqtt_connected = False
        self.subscribed = False  # the broker confirmed the share-group subscriptions (SUBACK)
        self.db_ok = False
        self.last_error: str | None = None
        self.last_commit_at: str | None = None
        self.schema_version: int | None = None
        self.http_port: int | None = None
        self._classifier = Writer(None, cfg.mqtt.prefix)  # topic -> kind, for the metrics
        self._partitions: set[tuple[int, int]] = set()  # months whose partitions exist (db.ensure_partitions)
        self._fatal = False  # a problem restarting cannot fix (the database's schema is newer than the code)
        self._oldest_waiting: float | None = None
        self._conn: psycopg.Connection | None = None
        self._client: mqtt.Client | None = None
        self._http: ThreadingHTTPServer | None = None
        self.frames: Any = None  # frames.FrameFetcher while frames.enabled (started after the first migration)
        self._totals = {"messages": 0, "new": 0, "duplicates": 0, "rejected": 0}
        self._window: dict[str, Any] = {"t": time.monotonic(), "messages": 0, "new": 0, "duplicates": 0,
                                        "rejected": 0, "batches": [], "by_kind": {}}

    # --- lifecycle --------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        cfg = self.cfg
        log.info("ingest: database %s, broker %s:%s, group %s, client id %s, batches of up to %d messages or "
                 "%.0f ms", redact(cfg.database.dsn), cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.group,
                 cfg.client_id(), cfg.batch.max_rows, cfg.batch.max_wait * 1000)
        self._start_http()
        if not self._connect_db(first=True):
            self._shutdown()
            return 1 if self._fatal else 0
        self._start_frames()
        self._start_mqtt()
        try:
            self._loop()
        finally:
            self._shutdown()
        log.info("ingest: stopped (%d messages stored: %d new rows, %d duplicates skipped, %d rejected)",
                 self._totals["messages"], self._totals["new"], self._totals["duplicates"], self._totals["rejected"])
        return 1 if self._fatal else 0

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _start_frames(self) -> None:
        """The frame fetch threads (frames.py), when ``frames.enabled``; they keep their own connections."""
        if not self.cfg.frames.enabled:
            return
        from edgelabel.ingest.frames import FrameFetcher

        self.frames = FrameFetcher(self.cfg.frames, self.cfg.database.dsn, self.cfg.database.password,
                                   self.metrics.registry)
        self.frames.start()

    def _shutdown(self) -> None:
        if self.frames is not None:
            self.frames.stop()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        if self._conn is not None:
            self._conn.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    # --- database ---------------------------------------------------------------------------------------

    def _connect_db(self, first: bool = False) -> bool:
        """Connect (and migrate) with backoff until it works or the worker stops; every failure is logged."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
                if self.cfg.database.password:
                    kwargs["password"] = self.cfg.database.password
                conn = psycopg.connect(self.cfg.database.dsn, **kwargs)
                version = migrate(conn)
            except RuntimeError as exc:  # a schema newer than this code: retrying will not help
                self.last_error = redact(f"database {self.cfg.database.dsn}: {exc}")
                self.db_ok, self._fatal = False, True
                log.error("ingest: %s; stopping", self.last_error)
                self._stop.set()
                return False
            except (psycopg.Error, OSError) as exc:
                self._db_failed(f"database {redact(self.cfg.database.dsn)}: {exc}", "connect")
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            if first or version != self.schema_version:
                log.info("ingest: database schema version %d", version)
            self._conn, self.schema_version, self.db_ok = conn, version, True
            self.metrics.db_up.set(1)
            return True
        return False

    def _db_failed(self, text: str, stage: str) -> None:
        text = redact(" ".join(text.split()))
        self.last_error = text
        self.db_ok = False
        self.metrics.db_up.set(0)
        self.metrics.errors.labels("db").inc()
        log.error("ingest: %s (%s; retrying, nothing is acknowledged until it is stored)", text, stage)

    def _store(self, batch: list[Message]) -> bool:
        """Commit the batch, retrying through database outages; False only when the worker stops first."""
        while not self._stop.is_set() or self._conn is not None:
            if self._conn is None or self._conn.closed:
                if not self._connect_db():
                    return False
            assert self._conn is not None
            writer = Writer(self._conn, self.cfg.mqtt.prefix, self._partitions)
            t0 = time.monotonic()
            try:
                result = writer.write(batch)
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                # one bad message must not block the others: store them one by one, keep the bad one apart
                log.warning("ingest: a batch of %d failed (%s); storing its messages one by one", len(batch),
                            redact(str(exc).splitlines()[0]))
                self._partitions.clear()  # a month dropped by retention meanwhile is made again
                result = writer.write_each(batch)
            except (psycopg.Error, OSError) as exc:
                self._db_failed(f"database {redact(self.cfg.database.dsn)}: {exc}", "write")
                try:
                    self._conn.close()
                except psycopg.Error:
                    pass
                self._conn = None
                if self._stop.wait(1.0):
                    return False
                continue
            elapsed = time.monotonic() - t0
            self.db_ok = True
            self.metrics.db_up.set(1)
            self._account(batch, result, elapsed)
            return True
        return False

    def _account(self, batch: list[Message], result: Any, elapsed: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(elapsed)
        m.batch_size.observe(len(batch))
        new = 0
        for kind, count in result.inserted.items():
            if count:
                m.rows.labels(kind).inc(count)
                new += count
                self._window["by_kind"][kind] = self._window["by_kind"].get(kind, 0) + count
        kinds: dict[str, int] = {}
        for msg in batch:
            kind = self._classifier.classify(msg.topic)[0] or "other"
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            m.messages.labels(kind).inc(n)
        m.duplicates.inc(result.duplicates)
        m.rejected.inc(result.rejected)
        if result.rejected:
            log.warning("ingest: %d message(s) could not be read as data and were kept in rejected_messages "
                        "(see that table's error column)", result.rejected)
        if result.newest_capture is not None:
            m.capture_lag.set(max(0.0, time.time() - result.newest_capture))
        self.last_commit_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        for key, value in (("messages", len(batch)), ("new", new), ("duplicates", result.duplicates),
                           ("rejected", result.rejected)):
            self._totals[key] += value
            self._window[key] += value
        self._window["batches"].append(elapsed)

    # --- MQTT -------------------------------------------------------------------------------------------

    def _start_mqtt(self) -> None:
        cfg = self.cfg.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id(), protocol=mqtt.MQTTv5)
        client.manual_ack_set(True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry
        props.ReceiveMaximum = cfg.receive_maximum
        self._client = client
        client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props)
        client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker {self.cfg.mqtt.host}:{self.cfg.mqtt.port} refused the connection: {reason}"
            self.metrics.errors.labels("mqtt").inc()
            log.error("ingest: %s (check mqtt.username and the password in EDGELABEL_MQTT_PASSWORD)",
                      self.last_error)
            return
        with self._gen_lock:
            self._generation += 1
        self.mqtt_connected = True
        self.metrics.mqtt_up.set(1)
        topics = subscriptions(self.cfg.mqtt.prefix, self.cfg.mqtt.group)
        # subscribe every time: a broker restarted without persistence has forgotten the session
        client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        log.info("ingest: connected to %s:%s (session %s), subscribed to %s", self.cfg.mqtt.host,
                 self.cfg.mqtt.port, "resumed" if getattr(flags, "session_present", False) else "new",
                 ", ".join(topics))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self.last_error = (f"broker {self.cfg.mqtt.host}:{self.cfg.mqtt.port} refused the subscriptions "
                               f"({', '.join(failed)}); check the broker's ACL for the user and that it "
                               "speaks MQTT 5 with shared subscriptions")
            self.metrics.errors.labels("mqtt").inc()
            log.error("ingest: %s", self.last_error)
            return
        self.subscribed = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.mqtt_connected
        self.mqtt_connected = self.subscribed = False
        self.metrics.mqtt_up.set(0)
        if was and not self._stop.is_set():
            self.last_error = f"broker {self.cfg.mqtt.host}:{self.cfg.mqtt.port}: connection lost ({reason})"
            self.metrics.errors.labels("mqtt").inc()
            log.warning("ingest: %s; reconnecting (unacknowledged messages come again)", self.last_error)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.queue.put(Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, generation=self._generation))

    def _ack(self, batch: list[Message]) -> None:
        """PUBACK every message of a committed batch, in the order received (MQTT wants that order)."""
        if self._client is None:
            return
        current = self._generation
        for msg in batch:
            # a message from an earlier connection is sent again by the broker (same packet id); that copy,
            # already stored, is acknowledged when it comes
            if msg.qos > 0 and msg.generation == current:
                self._client.ack(msg.mid, msg.qos)

    # --- the batch loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        max_rows, max_wait = self.cfg.batch.max_rows, self.cfg.batch.max_wait
        next_progress = time.monotonic() + self.cfg.progress_interval
        next_retention = time.monotonic()
        while not self._stop.is_set():
            if self.cfg.retention.months and time.monotonic() >= next_retention:
                self._retention()
                next_retention = time.monotonic() + self.cfg.retention.check_interval
            batch: list[Message] = []
            try:
                batch.append(self.queue.get(timeout=0.2))
            except queue.Empty:
                pass
            if batch:
                self._oldest_waiting = batch[0].received
                deadline = batch[0].received + max_wait
                while len(batch) < max_rows:
                    remaining = deadline - time.monotonic()
                    try:
                        batch.append(self.queue.get(timeout=remaining) if remaining > 0
                                     else self.queue.get_nowait())
                    except queue.Empty:
                        if remaining <= 0:
                            break
                self._update_gauges()
                if not self._store(batch):
                    return  # stopping: nothing of this batch is acknowledged; the broker sends it again
                self._ack(batch)
                self._oldest_waiting = None
            self._update_gauges()
            if time.monotonic() >= next_progress:
                self._progress()
                next_progress = time.monotonic() + self.cfg.progress_interval

    def _retention(self) -> None:
        """Drop the months past ``retention.months``; a failure is logged and counted, ingest goes on."""
        if self._conn is None or self._conn.closed:
            return
        try:
            dropped = drop_old_partitions(self._conn, self.cfg.retention.months)
        except psycopg.Error as exc:
            self.metrics.errors.labels("retention").inc()
            log.error("ingest: retention (retention.months: %d) failed: %s; retrying in %.0f s",
                      self.cfg.retention.months, redact(" ".join(str(exc).split())), self.cfg.retention.check_interval)
            return
        self._partitions.clear()
        if dropped:
            log.info("ingest: retention (retention.months: %d): dropped %s", self.cfg.retention.months,
                     ", ".join(dropped))

    def _update_gauges(self) -> None:
        oldest = self._oldest_waiting
        self.metrics.lag.set(0.0 if oldest is None else max(0.0, time.monotonic() - oldest))
        self.metrics.pending.set(self.queue.qsize())

    def _progress(self) -> None:
        w = self._window
        span = max(time.monotonic() - w["t"], 1e-6)
        rate = w["messages"] / span
        self.metrics.rate.set(rate)
        if w["messages"]:
            batches = sorted(w["batches"])
            p50 = batches[len(batches) // 2] * 1000
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(w["by_kind"].items())) or "none"
            log.info("ingest: %d messages in %.0f s (%.0f/s), new rows: %s; %d duplicates skipped, %d rejected; "
                     "%d batches, p50 %.0f ms, max %.0f ms; %d waiting", w["messages"], span, rate, kinds,
                     w["duplicates"], w["rejected"], len(batches), p50, batches[-1] * 1000, self.queue.qsize())
        self._window = {"t": time.monotonic(), "messages": 0, "new": 0, "duplicates": 0, "rejected": 0,
                        "batches": [], "by_kind": {}}

    # --- /healthz and /metrics --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        oldest = self._oldest_waiting
        return {"ok": self.mqtt_connected and self.subscribed and self.db_ok,
                "mqtt_connected": self.mqtt_connected, "subscribed": self.subscribed, "db_ok": self.db_ok,
                "schema_version": self.schema_version, "client_id": self.cfg.client_id(),
                "group": self.cfg.mqtt.group, "waiting": self.queue.qsize(),
                "lag_s": 0.0 if oldest is None else round(time.monotonic() - oldest, 3),
                "stored": dict(self._totals), "last_commit_at": self.last_commit_at,
                "last_error": self.last_error,
                **({"frames": self.frames.health()} if self.frames is not None else {})}

    def _start_http(self) -> None:
        listen = self.cfg.http.listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] == "/healthz":
                    body = service.health()
                    data, status, ctype = json.dumps(body).encode(), 200 if body["ok"] else 503, "application/json"
                elif self.path.split("?")[0] == "/metrics":
                    service._update_gauges()
                    data, status, ctype = generate_latest(service.metrics.registry), 200, CONTENT_TYPE_LATEST
                else:
                    data, status, ctype = b"not found: try /healthz or /metrics\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                log.debug("http: " + format, *args)

        try:
            self._http = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as exc:
            raise RuntimeError(f"http.listen {listen}: cannot listen ({exc.strerror}); "
                               "choose a free port or set http.listen: null") from None
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="ingest-http", daemon=True).start()
        log.info("ingest: /healthz and /metrics on http://%s:%d", host, self.http_port)


def main(args: Any) -> int:
    """``edgelabel ingest``: build the config from ``-c`` and the quick flags, run until SIGTERM/SIGINT."""
    from edgelabel.ingest.config import ConfigError, load_ingest_config

    try:
        cfg = load_ingest_config(args.config, mqtt_url=args.mqtt, db=args.db, group=args.group,
                                 client_id=args.client_id, http=args.http, log_level=args.log_level)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", redact(problem))
        log.error("fix the config (docs/ingest.md lists every setting) and start again")
        return 2
    logging.getLogger().setLevel(cfg.log_level.upper())
    service = IngestService(cfg)
    service.install_signal_handlers()
    try:
        return service.run()
    except RuntimeError as exc:
        log.error("ingest: %s", redact(str(exc)))
        return 1

"""An edgelabel consumer that keeps every label record and track event exactly once.

    python examples/consumer.py --host 10.0.0.2 --prefix edgelabel --device line3-cam \\
        --out labels.jsonl --state consumer.sqlite

It subscribes (QoS 1, persistent session) to ``<prefix>/<device>/+/labels``
and ``<prefix>/<device>/events`` and appends each new message to a JSONL file,
one line per message: ``{"topic": ..., "received_at": ..., "message": {...}}``.

Why each piece is there (see docs/mqtt.md, "Exactly once"):

* **QoS 1 redelivers.**  The daemon deletes a message from its outbox only
  after the broker's PUBACK, and replays what is left after a crash or an
  outage; the broker redelivers to us whatever we did not acknowledge.  So a
  message can arrive twice, never zero times.  Every message carries an
  ``id`` (a label record's id is derived from device, source and frame, an
  event's is unique per event); we keep the ids we have written in SQLite and
  skip the ones we have seen.
* **Acknowledge after storing.**  ``manual_ack``: the PUBACK to the broker is
  sent only once the line is written and its id committed.  A crash before
  that makes the broker send the message again.
* **The file and the id table agree after a crash.**  The committed length of
  the JSONL file is stored in the same transaction as the id.  At start-up the
  file is cut back to that length, removing a line that was written but whose
  id was never committed; the broker redelivers that message and it is written
  again, once.
* **Persistent session** (``clean_session=False`` / MQTT 5 session expiry) with a
  fixed client id: the broker queues messages for us while we are away.  We
  subscribe again on every connect, because a broker restarted without
  persistence has forgotten our session.

The id table grows by one row per message (~100 bytes); prune old rows with
``--keep-days`` (a redelivery is only ever a few minutes or hours late).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("edgelabel.consumer")


class Store:
    """The JSONL output and the SQLite table of ids already written, kept consistent across crashes."""

    def __init__(self, out: Path, state: Path, fsync: bool = False) -> None:
        self.out_path = out
        self.fsync = fsync
        state.parent.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(state), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL" if fsync else "PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, topic TEXT NOT NULL, at REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS seen_at ON seen (at)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        row = self.db.execute("SELECT value FROM meta WHERE key='jsonl_size'").fetchone()
        committed = int(row[0]) if row else 0
        self.fh = open(out, "a+b")  # noqa: SIM115 - kept open for the consumer's lifetime
        size = self.fh.seek(0, os.SEEK_END)
        if size > committed:
            log.warning("%s: dropping %d byte(s) written after the last commit (they will be redelivered)",
                        out, size - committed)
            self.fh.truncate(committed)
        elif size < committed:
            log.warning("%s is shorter than recorded (%d < %d bytes): was it edited? continuing at its end",
                        out, size, committed)
        self.size = self.fh.seek(0, os.SEEK_END)
        self.written = 0
        self.duplicates = 0
        self._lock = threading.Lock()  # paho's thread adds, the main thread prunes and closes

    def add(self, msg_id: str, topic: str, doc: dict[str, Any]) -> bool:
        """Append the message unless its id was seen; True if it was new."""
        with self._lock:
            return self._add_locked(msg_id, topic, doc)

    def _add_locked(self, msg_id: str, topic: str, doc: dict[str, Any]) -> bool:
        if self.db.execute("SELECT 1 FROM seen WHERE id=?", (msg_id,)).fetchone():
            self.duplicates += 1
            return False
        line = json.dumps({"topic": topic, "received_at": round(time.time(), 3), "message": doc},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        self.fh.write(line)
        self.fh.flush()
        if self.fsync:
            os.fsync(self.fh.fileno())
        size = self.size + len(line)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT INTO seen (id, topic, at) VALUES (?, ?, ?)", (msg_id, topic, time.time()))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('jsonl_size', ?)", (size,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            self.fh.truncate(self.size)  # keep the file and the table in agreement
            raise
        self.size = size
        self.written += 1
        return True

    def prune(self, keep_days: float) -> int:
        """Forget ids older than ``keep_days`` (0 = keep all)."""
        if keep_days <= 0:
            return 0
        with self._lock:
            cur = self.db.execute("DELETE FROM seen WHERE at < ?", (time.time() - keep_days * 86400,))
        return max(cur.rowcount, 0)

    def close(self) -> None:
        with self._lock:
            self.fh.close()
            self.db.close()


class Consumer:
    """The MQTT side: persistent session, QoS 1, acknowledge after the store has the message."""

    def __init__(self, args: argparse.Namespace, store: Store) -> None:
        self.args = args
        self.store = store
        self.topics = [f"{args.prefix}/{args.device}/+/labels", f"{args.prefix}/{args.device}/events"]
        self.last_index: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        v5 = args.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=args.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if args.username:
            self.client.username_pw_set(args.username, os.environ.get("MQTT_PASSWORD"))
        if args.tls_ca:
            self.client.tls_set(ca_certs=args.tls_ca, certfile=args.tls_cert, keyfile=args.tls_key,
                                cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: log.warning("disconnected from %s:%d; reconnecting", args.host, args.port)

    def run(self) -> None:
        props = None
        kwargs: dict[str, Any] = {}
        if self.args.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 24 * 3600  # keep our queue for a week
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(self.args.host, self.args.port, keepalive=30, **kwargs)
        self.client.loop_start()
        last_prune = time.monotonic()
        while not self._stop.wait(1.0):
            if time.monotonic() - last_prune > 3600:
                last_prune = time.monotonic()
                self.store.prune(self.args.keep_days)
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self) -> None:
        self._stop.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%d (session present: %s)", self.args.host, self.args.port, flags.session_present)
        client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        log.info("subscribed to %s", ", ".join(self.topics))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            msg_id = str(doc["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: not an edgelabel message with an id, skipped", msg.topic)
            client.ack(msg.mid, msg.qos)
            return
        try:
            new = self.store.add(msg_id, msg.topic, doc)
        except (OSError, sqlite3.Error):
            # not acknowledged: the broker sends it again after a reconnect
            log.exception("cannot store %s; it will be redelivered", msg_id)
            client.disconnect()
            return
        client.ack(msg.mid, msg.qos)
        if new and msg.topic.endswith("/labels"):
            key = (str(doc.get("device_id")), str(doc.get("source")))
            index = int(doc.get("frame_index", -1))
            if index <= self.last_index.get(key, -1):
                log.warning("%s/%s: frame %d after frame %d", key[0], key[1], index, self.last_index[key])
            self.last_index[key] = index
        elif not new:
            log.debug("duplicate %s on %s skipped", msg_id, msg.topic)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--prefix", default="edgelabel")
    ap.add_argument("--device", default="+", help="device id, or + for every device on the broker")
    ap.add_argument("--client-id", default="edgelabel-consumer", help="fixed: the broker keeps our session under it")
    ap.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    ap.add_argument("--username", default=os.environ.get("MQTT_USER"), help="password from $MQTT_PASSWORD")
    ap.add_argument("--tls-ca")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to append to")
    ap.add_argument("--state", type=Path, help="SQLite file of ids seen (default: <out>.seen.sqlite)")
    ap.add_argument("--fsync", action="store_true", help="fsync every line (survives power loss; slower)")
    ap.add_argument("--keep-days", type=float, default=30.0, help="forget ids older than this (0 = never)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    store = Store(args.out, args.state or args.out.with_name(args.out.name + ".seen.sqlite"), fsync=args.fsync)
    consumer = Consumer(args, store)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    try:
        consumer.run()
    finally:
        log.info("stopped: %d message(s) written, %d duplicate(s) skipped", store.written, store.duplicates)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

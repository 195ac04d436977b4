"""Publish label records, track events, stats and status to an MQTT broker (paho-mqtt 2.x).

Topics (``prefix`` and the device id come from the config; docs/mqtt.md has every payload)::

    <prefix>/<device>/status             retained: online | stopped | offline (Last Will)
    <prefix>/<device>/<source>/status    retained: online | reconnecting | offline | finished | disabled | stopped
    <prefix>/<device>/<source>/labels    one LabelRecord JSON per processed frame      (outbox, mqtt.qos)
    <prefix>/<device>/events             track events new / update / end             (outbox, mqtt.qos)
    <prefix>/<device>/review             review decisions from the web page           (outbox, mqtt.qos)
    <prefix>/<device>/stats              every mqtt.stats_interval seconds            (QoS 0, live only)
    <prefix>/<device>/alarm              retained: active alarms (dataset capture stopped), on change
    <prefix>/<device>/<source>/snapshot  retained JPEG of the latest annotated frame  (QoS 0, optional)

Why it is built this way:

* **Durable outbox** (:mod:`edge.sinks.outbox`).  ``write``/``events``/
  ``source_status`` only store messages in an SQLite outbox; a publisher
  thread (``mqtt-outbox``) sends committed rows in ``seq`` order and deletes a
  row when paho reports its PUBACK/PUBCOMP (for QoS 0: when it was written to
  the socket).  Labels therefore survive broker outages, ``kill -9`` and
  restarts, and are replayed in order.  Storage frames are committed before
  ``write`` returns (the job ledger marks them done right after); live frames
  are group-committed every ``outbox.commit_interval`` seconds.
* **Window = in-flight limit.**  The publisher never hands paho more than
  ``mqtt.max_inflight`` outbox messages, and paho's in-flight limit is the
  same, so paho never holds a message back in its own queue, where a later
  publish could overtake it.
* **Order across reconnects.**  paho re-sends its unacknowledged messages
  after a reconnect, but only after ``on_connect`` has returned; a message
  published from another thread in between would overtake them.  Each
  in-flight message remembers the connection generation it was sent on, and
  the publisher sends nothing new while a message of an older generation is
  unacknowledged.  Ordering per source is therefore kept on the wire.
* ``connect_async`` + ``loop_start``: the daemon must start and label frames
  even when the broker is absent; paho's network thread retries with backoff
  (``mqtt.reconnect.initial`` doubling to ``mqtt.reconnect.max``).
* An unreachable broker or a refused login is an operator problem that is
  easy to miss on a headless box: the first failure (and every change of its
  cause) is an ERROR naming host:port and, for a refused login, the user
  (never the password); then a WARNING at most every 30 s with the backlog.
* Device status, stats and snapshots are state, not data: they are published
  directly (not through the outbox).  A source's status goes through the
  outbox, so it keeps its place behind the source's labels (``finished`` after
  the last one; ``stopped`` on a clean close).  On every (re)connect the
  device's ``online`` and each source's last state are published again,
  retained, because a broker restarted without persistence forgot them.
* The closing log line's counters add up: published = acknowledged + QoS 0
  (no acknowledgement exists) + refused by the broker + unacknowledged.
* A TLS failure (untrusted certificate, host name mismatch, refused client
  certificate, plain port) is reported as such, naming the mqtt.tls setting to
  check, not as an unreachable broker.
* **A refused message does not block the line.**  A message the broker
  refuses for good (MQTT 5: a failing PUBACK or a permanent DISCONNECT reason
  code, or larger than the CONNACK maximum packet size; MQTT 3.1.1: the same
  message alone in flight at DISCONNECT_STRIKES short connections in a row,
  see :meth:`MqttSink._check_refusal`) is moved to the outbox's dead-letter
  table and delivery goes on with the next one.  Label records are kept
  under ``mqtt.max_message_bytes`` (highest-scoring detections first).
* Every call into paho's ``publish`` goes through :meth:`MqttSink._publish_locked`.

Threading: ``write``/``events``/``source_status``/``stats``/``flush``/``close``
run on the pipeline's sink worker thread, the publisher on ``mqtt-outbox``,
paho callbacks on paho's network thread, ``status`` on any thread.  Shared
state is guarded by ``self._lock``.  ``on_publish`` runs while paho holds its
internal message mutex, and ``_publish_locked`` holds ``self._lock`` while
calling ``client.publish`` (which takes that mutex), so ``on_publish`` must
never take ``self._lock``: it only drops the message id into a lock-free queue
and sets an ``Event``.  Holding ``self._lock`` across ``publish`` also means an
acknowledgement can never be processed before its id is recorded.  The
outbox has its own lock, which is taken after ``self._lock`` or alone, never
the other way round.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import ssl
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgelabel.edge.config import ConfigError, MqttConfig, TlsConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.health import dataset_health as _dataset_health
from edgelabel.edge.health import device_alarms
from edgelabel.edge.health import disk_skipped as _disk_skipped
from edgelabel.edge.ledger import StateUnavailable, storage_fault, storage_problem
from edgelabel.edge.records import LabelRecord, iso_utc
from edgelabel.edge.sinks.base import Sink, SinkRefused
from edgelabel.edge.sinks.outbox import Message, Outbox, StoredMessage

log = logging.getLogger(__name__)

#: seconds between repeated warnings while the broker stays unreachable or messages are dropped
WARN_INTERVAL = 30.0
#: how long ``close``/``flush`` wait for the broker to acknowledge what is stored
ACK_TIMEOUT = 5.0
#: once the daemon is stopping, every wait for acknowledgements together ends this many seconds after the stop
#: (what is not acknowledged stays in the outbox for the next start), so SIGTERM ends the daemon within seconds
STOP_DRAIN_S = 2.5
#: ... and a wait gives up earlier when nothing was acknowledged for this long although the publisher's loop
#: turned meanwhile (broker silent, disk full); a publisher that simply got no CPU yet is not a stall
DRAIN_STALL_S = 1.0
#: seconds without an acknowledgement while connected with messages waiting (or without a turn of the
#: publisher's loop) before the publisher counts as stalled: ``publisher_stalled`` (edge/health.py)
PUBLISHER_STALL_AFTER = 60.0
#: how often the publisher looks at the outbox when nothing wakes it
IDLE_TICK = 0.25
#: seconds between max_age sweeps of the outbox
EXPIRE_INTERVAL = 1.0
#: acknowledged rows are deleted in one transaction once this many are waiting or the oldest is ACK_DELAY old
ACK_BATCH = 256
#: label messages whose capture -> PUBACK latency is kept for the percentiles in status()
LATENCY_WINDOW = 4096
ACK_DELAY = 0.05
#: seconds a status or backlog request waits for the outbox before it answers from what it has
STATUS_WAIT = 0.5
#: MQTT 3.1.1 has no reason codes: the broker closing the connection this many times in a row, each within
#: SHORT_CONNECTION seconds and with the same message first in flight, means it refuses that message
DISCONNECT_STRIKES = 3
SHORT_CONNECTION = 10.0
#: MQTT 5 reason codes (PUBACK or DISCONNECT) that refuse a message for good: sending it again cannot help
PERMANENT_REFUSALS = {0x87: "not authorised", 0x90: "topic name invalid", 0x95: "packet too large",
                      0x99: "payload format invalid", 0x9A: "retain not supported", 0x9B: "QoS not supported",
                      0x9E: "shared subscriptions not supported"}
#: CONNACK reason codes that mean "who you are is not accepted" (3.1.1: 4, 5; MQTT 5: 0x86, 0x87)
AUTH_FAILURES = {4, 5, 0x86, 0x87}
STATS_SCHEMA_VERSION = 1
#: source states that stay true after the daemon stops; every other one becomes ``stopped`` on a clean close
FINAL_SOURCE_STATES = ("finished", "disabled")
_STATS_NAMESPACE = uuid.UUID("9b8e4f2a-1c7d-5f3e-b6a0-4d2e8c1f7a95")
_PAHO_LOG = logging.getLogger(f"{__name__}.paho")


def _paho_noise(record: logging.LogRecord) -> bool:
    """paho 2.2 logs "Client is not connected" at ERROR on every loop turn without a socket (each retry
    while the broker is down, and after a disconnect); the sink reports the connection state itself, so
    this is demoted to DEBUG instead of flooding an operator's log with false errors."""
    message = record.getMessage() if record.levelno >= logging.ERROR else ""
    if message.startswith("Client is not connected") or (message.startswith("failed to receive on socket") and
                                                          "[SSL" in message):
        # the second: a TLS alert from the broker on every retry; the sink names it once (_on_log)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return _PAHO_LOG.isEnabledFor(logging.DEBUG)
    return True


_PAHO_LOG.addFilter(_paho_noise)



def describe_tls_error(exc: BaseException, tls: TlsConfig | None, host: str, port: int) -> str | None:
    """A failed TLS connection in words an operator can act on, naming the mqtt.tls setting to check.

    None when ``exc`` is not a TLS failure (refused, timed out, no route: the broker is unreachable).
    ``edgelabel doctor`` says the same ("TLS handshake failed ... check mqtt.tls"); here the cause is
    split further because the daemon retries forever and the log line is all an operator sees.
    """
    if isinstance(exc, ssl.SSLCertVerificationError) or isinstance(exc, ssl.CertificateError):
        msg = getattr(exc, "verify_message", None) or str(exc)
        if "mismatch" in msg.lower() or "doesn't match" in msg.lower():
            return (f"TLS: hostname mismatch, the broker's certificate is not valid for mqtt.host {host!r} ({msg}); "
                    "set mqtt.host to a name the certificate lists, or reissue the broker's certificate "
                    "(mqtt.tls.insecure: true skips this check, which lets anyone with a certificate from that CA "
                    "pose as the broker)")
        ca = tls.ca if tls is not None and tls.ca else "the system's CA store (mqtt.tls.ca not set)"
        return (f"TLS: certificate verify failed, the broker's certificate is not trusted ({msg}); check that "
                f"mqtt.tls.ca ({ca}) is the CA that signed the broker's certificate")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake failed ({getattr(exc, 'reason', None) or exc}); check mqtt.tls (ca, cert, key) "
                f"and that {host}:{port} speaks TLS")
    if tls is not None and isinstance(exc, ConnectionResetError):
        return (f"TLS handshake failed (connection reset by the broker); check that {host}:{port} is a TLS "
                "listener (mqtt.port; 8883 by convention) and mqtt.tls (ca, cert, key)")
    return None


def describe_tls_alert(alert: str) -> str:
    """The broker ended a TLS connection with an alert after the handshake (TLS 1.3 checks the client
    certificate there): most often a missing or untrusted client certificate."""
    if "certificate" in alert.lower():
        return (f"TLS: the broker rejected the client certificate ({alert}); check mqtt.tls.cert and mqtt.tls.key "
                "(a certificate signed by a CA the broker trusts)")
    return f"TLS error from the broker ({alert}); check mqtt.tls (ca, cert, key)"


@dataclass(frozen=True)
class Backlog:
    """What is still to deliver, for the daemon's wait at the end of a finite job (``mqtt.drain_timeout``)."""

    pending: int  # messages in the outbox, not acknowledged yet
    connected: bool
    unreachable_since: float | None  # wall-clock time the current outage began (None while connected)
    last_error: str | None


def _packet_size(topic: str, payload: bytes, props: Properties | None) -> int:
    """Bytes of a QoS>0 PUBLISH packet on the wire, to compare with the broker's maximum packet size."""
    remaining = 2 + len(topic.encode("utf-8")) + 2 + len(payload)
    if props is not None:
        remaining += len(props.pack())
    header = 2 if remaining < 128 else 3 if remaining < 16384 else 4 if remaining < 2097152 else 5
    return header + remaining


def _forget_in_paho(client: mqtt.Client, mid: int) -> None:
    """Make paho drop a message it would otherwise send again on every reconnect.

    paho has no public call for one message (only ``drop_out_messages``, all of them), so this removes it
    from paho's outgoing table under paho's own mutex; the in-flight count is recomputed on reconnect.
    """
    with client._out_message_mutex:
        msg = client._out_messages.pop(mid, None)
        if msg is not None and msg.qos > 0 and client._inflight_messages > 0:
            client._inflight_messages -= 1


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off on the broker connection (paho leaves it on).

    A QoS 0 message (stats, snapshots) gets no MQTT answer, so the broker's
    TCP acknowledgement of it is delayed (up to 40 ms on Linux), and with
    Nagle on, the next label waits for that acknowledgement: measured, every
    label right after a stats message arrived 25-35 ms late.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # a websocket wrapper or a non-TCP socket: nothing to tune
        log.debug("MQTT: TCP_NODELAY not set: %s", exc)

class MqttSink(Sink):
    """Publishes records, events, stats and status for one device; see the module doc."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, device_id: str, *, state_dir: Path | None = None,
                 sources: Sequence[str] = ()) -> None:
        self.cfg = cfg
        #: the enabled sources: a clean close marks each ``stopped``, also one that had not reported yet (a
        #: previous run's retained ``online`` would otherwise outlive this run)
        self.sources = list(sources)
        self.device_id = device_id
        self.broker = f"{cfg.host}:{cfg.port}"
        self.base_topic = f"{cfg.prefix}/{device_id}"
        self.status_topic = f"{self.base_topic}/status"
        self.events_topic = f"{self.base_topic}/events"
        self.stats_topic = f"{self.base_topic}/stats"
        self.alarm_topic = f"{self.base_topic}/alarm"
        self.client_id = cfg.client_id or f"edgelabel-{device_id}"
        self._v5 = cfg.protocol == "5"
        self._window = min(cfg.max_inflight, cfg.max_queued) if cfg.max_queued else cfg.max_inflight

        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by callbacks and writers: the publisher has work
        self._acks: queue.SimpleQueue[tuple[int, bool, str, float, int]] = queue.SimpleQueue()  # filled by on_publish
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (outbox seq, connection generation)
        self._direct: dict[int, str] = {}  # mid -> topic of direct QoS>0 messages not yet acknowledged
        # capture -> PUBACK latency of label messages: record id -> capture time until published, then
        # mid -> capture time until acknowledged (both bounded), and the last LATENCY_WINDOW latencies
        self._capture_ts: dict[str, float] = {}
        self._mid_capture: dict[int, float] = {}
        self._puback_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._cursor = 0  # highest outbox seq handed to paho
        self._to_delete: list[int] = []  # acknowledged outbox rows not deleted yet (see _process_acks)
        self._to_delete_since = 0.0
        self._generation = 0  # successful connections so far
        self._source_status: dict[str, str] = {}
        self._connected = False
        self._opened = False
        self._closing = False
        self._interrupted = False  # the pipeline is stopping: do not wait for room in a full outbox
        self._in_put = False  # a write is inside Outbox.put (which may wait under stop_capture)
        self._closed = False
        self.left_at_close = 0  # messages still in the outbox when close() returned
        # published == acked + qos0 + broker_refused + messages still awaiting their acknowledgement
        self._published = 0
        self._acked = 0
        self._qos0 = 0  # published with QoS 0 (stats, snapshots, mqtt.qos 0): no acknowledgement exists
        self._broker_refused = 0  # published, then refused by the broker (a failing reason code)
        self._rejected = 0  # refused by the broker (failure reason code) or invalid for paho
        self._unserialisable = 0
        self._store_failed = 0  # the outbox could not store them (disk full, I/O error)
        self._last_publish_at: float | None = None
        self._last_error: str | None = None
        self._refused = False  # the last connection attempt got a failing CONNACK
        # outage reporting: ERROR once per outage (and when its cause changes), then WARNING every WARN_INTERVAL
        self._outage_since: float | None = None
        self._outage_since_wall: float | None = None  # the same moment on the wall clock, for people
        self._tls_alert: str | None = None  # a TLS alert paho read before the connection dropped
        self._outage_kind: str | None = None
        self._last_outage_warning = 0.0
        self._last_reject_log = float("-inf")
        # per-source counters for the stats topic
        self._frames_out: Counter[str] = Counter()
        self._inference_ms: dict[str, list[float]] = {}  # source -> [sum, count] since the last stats
        self._last_stats: tuple[float, Counter[str]] | None = None
        self._stats_seq = 0
        self._last_snapshot: dict[str, float] = {}
        self._alarm_since: dict[str, str] | None = None  # active alarm id -> since (None: not evaluated yet)
        self._alarm_payload: bytes | None = None  # the retained alarm state, published again on every reconnect
        self._disk_skipped: int | None = None  # dataset frames the free-space guard refused, at the last stats
        self._last_write_sync = True
        self._started = time.monotonic()
        # refused messages (see _check_refusal): the broker's MQTT 5 maximum packet size, when it told us
        self._broker_max_packet: int | None = None
        self._connected_at = 0.0
        self._drops: list[tuple[int, float, int]] = []  # (generation, seconds connected, reason code) per disconnect
        self._suspect: tuple[int, int] | None = None  # (outbox seq first in flight at the last drops, strikes)
        self._capped_count = 0  # label records whose detections were capped to mqtt.max_message_bytes
        self._single_left = 0  # > 0: one message in flight at a time, for this many more acknowledgements

        self._client = self._make_client()  # first: a configuration error must not leave the outbox open
        self._outbox = self._make_outbox(state_dir)
        self._drainer: threading.Thread | None = None
        self._stop_drainer = threading.Event()
        self._stop_deadline: float | None = None  # monotonic: when waits for acknowledgements end (stopping)
        #: publisher progress (monotonic): the last turn of its loop, the last acknowledgement or moment with
        #: nothing to deliver; see publisher_state()
        self._beat = time.monotonic()
        self._progress_at = time.monotonic()
        self.stall_after = PUBLISHER_STALL_AFTER

    # ------------------------------------------------------------------ set-up

    def _make_outbox(self, state_dir: Path | None) -> Outbox:
        """The outbox file: ``outbox.path`` inside ``state_dir`` (absolute paths as given); memory if disabled."""
        ob = self.cfg.outbox
        path: Path | None = None
        if ob.enabled:
            p = Path(ob.path).expanduser()
            if p.is_absolute():
                path = p
            elif state_dir is not None:
                path = Path(state_dir) / p
            else:
                log.warning("MQTT: no state directory given; the outbox is kept in memory (lost on restart)")
        else:
            log.info("MQTT: mqtt.outbox.enabled is false; messages wait in memory only (lost on restart)")
        try:
            return Outbox(
                path,
                max_messages=ob.max_messages,
                max_age=ob.max_age,
                policy=ob.policy,
                commit_interval=ob.commit_interval,
            )
        except (OSError, ValueError, sqlite3.Error) as exc:
            if path is not None and storage_fault(exc) is not None:
                # read-only, full or failing disk (also outside state_dir): a remount or freed space fixes
                # it, not an edit, so not the configuration error the unit never restarts
                raise StateUnavailable(storage_problem("mqtt.outbox.path", path, _write_probe(path.parent) or exc)) from exc
            raise ConfigError([f"mqtt.outbox.path: cannot open {path} ({exc})"]) from exc

    def _password(self) -> str | None:
        cfg = self.cfg
        if not cfg.password_file:
            return cfg.password
        if cfg.password:
            raise ConfigError(["mqtt.password_file: set either mqtt.password or mqtt.password_file, not both"])
        try:
            text = Path(cfg.password_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            # the message names the file, never its content
            raise ConfigError([f"mqtt.password_file: cannot read {cfg.password_file} ({exc.__class__.__name__})"]) from None
        return text.rstrip("\r\n")

    def _make_client(self) -> mqtt.Client:
        """Build the paho client; everything here must happen before the first connect."""
        cfg = self.cfg
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
        )
        client.enable_logger(_PAHO_LOG)
        password = self._password()
        if cfg.username:
            client.username_pw_set(cfg.username, password)
        elif password:
            raise ConfigError(["mqtt.password: a password needs mqtt.username"])
        if cfg.tls is not None:
            tls = cfg.tls
            if bool(tls.cert) != bool(tls.key):
                raise ConfigError(["mqtt.tls: a client certificate needs both cert and key"])
            try:
                client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                # a bad certificate path is a configuration mistake: fail start-up with the field named
                raise ConfigError([f"mqtt.tls: cannot load CA/certificate/key ({exc})"]) from exc
            client.tls_insecure_set(tls.insecure)
            if tls.insecure:
                log.warning("MQTT: mqtt.tls.insecure is true: the broker's host name is not checked against its "
                            "certificate, so anyone holding a certificate from that CA can pose as %s; set it to "
                            "false once the certificate names mqtt.host", self.broker)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(cfg.max_queued)
        client.reconnect_delay_set(cfg.reconnect.initial, max(cfg.reconnect.max, cfg.reconnect.initial))  # type: ignore[arg-type]
        # the broker publishes this for us if we vanish without a DISCONNECT (crash, power or network loss)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_socket_open = _no_delay
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log  # only while not connected: paho formats every log line for it
        return client

    def open(self) -> None:
        """Start connecting and publishing in the background; returns at once even if the broker is down."""
        with self._lock:
            if self._opened or self._closing:
                return
            self._opened = True
        log.info(
            "MQTT: connecting to %s as %s (MQTT %s%s, topics under %s/, outbox %s)",
            self.broker, self.client_id, self.cfg.protocol, ", TLS" if self.cfg.tls is not None else "",
            self.base_topic, self._outbox.where,
        )
        try:
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ValueError) as exc:  # pragma: no cover - connect_async only stores arguments
            self._report_outage(f"cannot start connecting: {exc}", "connect")
        self._client.loop_start()
        self._drainer = threading.Thread(target=self._drain_loop, name="mqtt-outbox", daemon=True)
        self._drainer.start()

    # ------------------------------------------------------------------ Sink API

    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Store the record in the outbox (durable before returning for storage frames); never raises.

        With ``outbox.policy: stop_capture`` and a full outbox this blocks until
        the broker has taken messages (or the sink is closing).
        """
        topic = f"{self.base_topic}/{record.source}/labels"
        try:
            payload = record.to_json().encode("utf-8")
            if len(payload) > self.cfg.max_message_bytes:
                payload = self._capped(record, len(payload))
        except (TypeError, ValueError) as exc:
            log.error("MQTT: record %s cannot be serialised, not published: %s", record.id, exc)
            with self._lock:
                self._unserialisable += 1
                self._last_error = f"record not serialisable: {exc}"
            return
        sync = not frame.live
        self._last_write_sync = sync
        with self._lock:
            if len(self._capture_ts) >= LATENCY_WINDOW:  # never acknowledged (outage): forget the oldest
                self._capture_ts.pop(next(iter(self._capture_ts)))
            # a file frame's captured_ts is media time (edge/frame.py): its latency counts from the read
            self._capture_ts[record.id] = record.captured_ts if frame.live else frame.read_at
        self._store([Message(record.source, topic, payload, self.cfg.qos, False, record.id)], sync=sync)
        with self._lock:
            self._frames_out[record.source] += 1
            acc = self._inference_ms.setdefault(record.source, [0.0, 0])
            acc[0] += record.inference_ms
            acc[1] += 1
        if self.cfg.snapshot.enabled:
            self._maybe_snapshot(record, frame)

    def _capped(self, record: LabelRecord, size: int) -> bytes:
        """The record with only its highest-scoring detections that fit ``mqtt.max_message_bytes``.

        A busy frame must not make a message a broker refuses (its ``max_packet_size``); the dataset keeps
        every detection, and ``extra.mqtt_capped`` says how many the message carries of how many.
        """
        limit = self.cfg.max_message_bytes
        dets = record.detections
        order = sorted(range(len(dets)), key=lambda i: -dets[i].score)

        def build(k: int) -> bytes:
            keep = sorted(order[:k])
            extra = {**record.extra, "mqtt_capped": {"detections": len(dets), "kept": k}}
            return replace(record, detections=[dets[i] for i in keep], extra=extra).to_json().encode("utf-8")

        lo, hi = 0, len(dets)  # the largest k whose message fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(mid)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        payload = build(lo)
        with self._lock:
            self._capped_count += 1
            first = self._capped_count == 1
        (log.warning if first else log.debug)(
            "MQTT: record %s of %s is %d bytes, over mqtt.max_message_bytes=%d: the message carries its %d "
            "highest-scoring of %d detections (the dataset keeps all)%s", record.id, record.source, size, limit, lo,
            len(dets), "; later ones are counted in status()['capped']" if first else "")
        return payload

    def events(self, events: list[dict[str, Any]]) -> None:
        """Store track events (from :mod:`edge.tracking`) in the outbox, in order with the labels."""
        msgs: list[Message] = []
        for ev in events:
            doc = {
                "schema_version": ev.get("schema_version", 1),
                "id": ev.get("id") or str(uuid.uuid4()),
                "type": ev.get("type"),
                "device_id": self.device_id,
                **{k: v for k, v in ev.items() if k not in ("schema_version", "id", "type", "device_id")},
            }
            try:
                payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                log.error("MQTT: track event %s cannot be serialised, not published: %s", doc["id"], exc)
                with self._lock:
                    self._unserialisable += 1
                continue
            msgs.append(Message(str(doc.get("source") or ""), self.events_topic, payload, self.cfg.qos, False, doc["id"]))
        self._store(msgs, sync=self._last_write_sync)

    def source_status(self, source: str, status: str) -> None:
        """Store the source's new state (retained, in order with its labels) and remember it for reconnects."""
        with self._lock:
            self._source_status[source] = status
        self._store([Message(source, f"{self.base_topic}/{source}/status", status.encode(), 1, True, None)], sync=True)

    def publish_review(self, doc: dict[str, Any]) -> bool:
        """Store a review decision for ``<prefix>/<device>/review`` (outbox, ``mqtt.qos``); False if not stored.

        Called from the web page's threads once the decision is saved (the outbox is thread-safe).
        It goes through the outbox like labels and events, so it survives outages and restarts; with
        ``stop_capture`` and a full outbox it waits at most ACK_TIMEOUT, since a person is waiting.
        """
        full = {"schema_version": doc.get("schema_version", 1), "id": doc.get("id") or str(uuid.uuid4()),
                "type": "review", "device_id": self.device_id,
                **{k: v for k, v in doc.items() if k not in ("schema_version", "id", "type", "device_id")}}
        try:
            payload = json.dumps(full, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            log.error("MQTT: review %s cannot be serialised, not published: %s", full["id"], exc)
            return False
        if self._closed:
            log.error("MQTT: review %s after close, not stored", full["id"])
            return False
        deadline = time.monotonic() + ACK_TIMEOUT
        msg = Message(str(full.get("source") or ""), f"{self.base_topic}/review", payload, self.cfg.qos, False, full["id"])
        try:
            result = self._outbox.put([msg], sync=True, interrupted=lambda: self._closing or time.monotonic() > deadline)
        except Exception as exc:  # disk full, closed: the decision itself is saved in the dataset
            log.error("MQTT: cannot store review %s in the outbox %s: %s", full["id"], self._outbox.where, exc)
            with self._lock:
                self._store_failed += 1
            return False
        if result.refused:
            return False
        self._wake.set()
        return True

    def stats(self, snapshot: dict[str, Any]) -> None:
        """Publish the daemon's numbers on ``<prefix>/<device>/stats`` (QoS 0; skipped while offline)."""
        doc = self.build_stats(snapshot)
        self._update_alarm(snapshot)
        with self._lock:
            connected = self._connected
        if not connected:
            log.debug("MQTT: stats not published (not connected)")
            return
        self._publish(self.stats_topic, json.dumps(doc, separators=(",", ":")).encode(), 0, retain=False)

    def flush(self) -> None:
        """Commit what is stored and wait (bounded) until the broker has acknowledged all of it."""
        self._outbox.commit()
        self._wake.set()
        self._wait_drained(ACK_TIMEOUT)

    def close(self) -> None:
        """Deliver what is stored (bounded), announce ``stopped``, disconnect; the rest stays in the outbox."""
        with self._lock:
            if self._closing:
                return
            self._closing = True  # releases a write blocked by stop_capture
            # the close stores messages of its own (every source "stopped"): they get a window of their own even
            # when the stop began long before (a web page that took seconds to close its live views); a broker
            # that does not answer or a full disk still ends the wait after DRAIN_STALL_S
            self._stop_deadline = max(self._stop_deadline or 0.0, time.monotonic() + STOP_DRAIN_S)
            opened = self._opened
            running = [src for src, st in self._source_status.items() if st not in FINAL_SOURCE_STATES]
            running += [src for src in self.sources if src not in self._source_status]
        for source in running if opened else []:
            # a retained "online" would outlive the daemon: say every running source stopped, in order
            # behind its labels (through the outbox, so a broker that is down gets it on the next start)
            try:
                self.source_status(source, "stopped")
            except SinkRefused as exc:
                log.warning("MQTT: %s/status stopped not stored: %s", source, exc)
        self._outbox.commit()
        self._wake.set()
        if opened:
            self._wait_drained(ACK_TIMEOUT)
        self._stop_drainer.set()
        self._wake.set()
        if self._drainer is not None:
            self._drainer.join(5.0)
        with self._lock:
            connected = self._connected
        if connected:  # offline: the broker has published the Last Will already
            self._publish(self.status_topic, b"stopped", 1, retain=True)
            with self._lock:  # a short wait of its own: the deadline of the stop may be spent by now
                self._stop_deadline = max(self._stop_deadline or 0.0, time.monotonic() + DRAIN_STALL_S)
            self._wait_drained(2.0, outbox=False)
        self._process_acks(force=True)
        left = self._outbox.depth
        if left and self._outbox.durable:
            log.warning("MQTT: %d message(s) not yet acknowledged by %s stay in the outbox %s and are sent on the "
                        "next start", left, self.broker, self._outbox.where)
        elif left:
            log.warning("MQTT: closing with %d message(s) not acknowledged by %s; the outbox is in memory, they are "
                        "lost", left, self.broker)
        self._client.disconnect()
        if opened:
            self._client.loop_stop()
        self._outbox.close()
        self.left_at_close = left
        with self._lock:
            self._connected = False
            self._closed = True
            counts = self._delivery_counts_locked()
            latency = self._latency_locked()
        log.info("MQTT: closed (%d published = %d acknowledged + %d QoS 0 (never acknowledged: stats, snapshots) + "
                 "%d refused by the broker + %d unacknowledged; %d dropped, %d left in the outbox)",
                 counts["published"], counts["acked"], counts["qos0"], counts["broker_refused"], counts["unacked"],
                 counts["dropped"], left)
        if latency["puback_latency_n"]:
            log.info("MQTT: capture->PUBACK latency over the last %d labels: p50 %s / p95 %s / p99 %s ms",
                     latency["puback_latency_n"], latency["puback_p50_ms"], latency["puback_p95_ms"],
                     latency["puback_p99_ms"])

    def status(self) -> dict[str, Any]:
        """Connection state and counters.

        ``published``: messages handed to the MQTT client (replays from the outbox included);
        ``acked``: messages the broker acknowledged; ``qos0``: messages published with QoS 0 (stats,
        snapshots), which get no acknowledgement; ``broker_refused``: published and refused by the broker;
        ``unacked``: published with QoS 1/2 and not acknowledged yet; these add up:
        ``published == acked + qos0 + broker_refused + unacked``.  ``pending``: messages in
        the outbox, not yet acknowledged; ``dropped``: messages that will never
        be sent (outbox full or expired, refused by the broker, unserialisable,
        not storable), broken down in ``drops``.
        """
        self._process_acks(force=True, wait=STATUS_WAIT)
        ob = self._outbox.stats(wait=STATUS_WAIT)
        with self._lock:
            return {
                "connected": self._connected,
                "broker": self.broker,
                "client_id": self.client_id,
                "protocol": self.cfg.protocol,
                "published": self._published,
                "acked": self._acked,
                "qos0": self._qos0,
                "broker_refused": self._broker_refused,
                "unacked": len(self._inflight) + len(self._direct),
                "pending": ob["depth"],
                "inflight": len(self._inflight),
                "dropped": self._dropped_locked(),
                "drops": {
                    "outbox_full": ob["evicted"],
                    "outbox_expired": ob["expired"],
                    "outbox_refused": ob["refused"],
                    "rejected": self._rejected,
                    "unserialisable": self._unserialisable,
                    "outbox_error": self._store_failed,
                    "outbox_lost": ob["lost"],
                },
                "dead_letter": ob["dead_letter"],
                "capped": self._capped_count,
                "outbox": ob,
                "last_publish_at": self._last_publish_at,
                "last_error": self._last_error,
                "publisher": self._publisher_state_locked(ob["depth"]),
                "unreachable_since": None if self._outage_since_wall is None else iso_utc(self._outage_since_wall),
                **self._latency_locked(),
            }

    def _publisher_state_locked(self, depth: int) -> dict[str, Any]:
        """Whether the outbox publisher makes progress, for ``publisher_stalled`` (edge/health.py).

        ``alive``: its thread runs; ``loop_age_s``: since its loop last turned (it turns every IDLE_TICK, so a
        large value means it is stuck in a call); ``stalled_s``: how long messages have waited while connected
        without a single acknowledgement (None while something moves, nothing waits or the link is down --
        a broker that is down is ``outbox_stuck``'s case); ``stall_after``: the threshold of both.
        """
        now = time.monotonic()
        running = self._opened and not self._closing
        if not self._connected or not depth:
            self._progress_at = now
        waited = now - self._progress_at
        loop_age = now - self._beat if running else None
        return {"alive": None if not running else bool(self._drainer is not None and self._drainer.is_alive()),
                "loop_age_s": None if loop_age is None else round(loop_age, 1),
                "stalled_s": round(waited, 1) if running and waited >= self.stall_after else None,
                "stall_after": self.stall_after}

    def stuck(self) -> str | None:
        """Why the publisher cannot go on without a restart (its thread died or hangs in a call), else None."""
        with self._lock:  # not the outbox's lock: the call the publisher hangs in may hold it
            if not self._opened or self._closing:
                return None
            alive = self._drainer is not None and self._drainer.is_alive()
            age = time.monotonic() - self._beat
        if not alive:
            return "the MQTT outbox publisher thread has ended"
        if age >= self.stall_after:
            return f"the MQTT outbox publisher has been stuck in one call for {age:.0f} s"
        return None

    def backlog(self) -> Backlog:
        """What is left to deliver and whether the broker is reachable (any thread)."""
        self._process_acks(force=True, wait=STATUS_WAIT)
        with self._lock:
            return Backlog(self._outbox.depth, self._connected, self._outage_since_wall, self._last_error)

    def _latency_locked(self) -> dict[str, float | int | None]:
        """Capture -> PUBACK percentiles (ms) over the last LATENCY_WINDOW acknowledged label messages.

        Measured from the frame's capture time to the broker's acknowledgement
        arriving here: what a backend waits for a label, including inference,
        the outbox commit and the broker round trip.  Replays after a restart
        are left out (their capture time is not known to this process).
        """
        values = sorted(self._puback_ms)
        if not values:
            return {"puback_latency_n": 0, "puback_p50_ms": None, "puback_p95_ms": None, "puback_p99_ms": None}
        def pick(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))], 1)
        return {"puback_latency_n": len(values), "puback_p50_ms": pick(0.50), "puback_p95_ms": pick(0.95),
                "puback_p99_ms": pick(0.99)}

    def _delivery_counts_locked(self) -> dict[str, int]:
        """The publish counters and how they add up: published = acked + qos0 + broker_refused + unacked."""
        return {"published": self._published, "acked": self._acked, "qos0": self._qos0,
                "broker_refused": self._broker_refused, "unacked": len(self._inflight) + len(self._direct),
                "dropped": self._dropped_locked()}

    def _dropped_locked(self) -> int:
        return self._outbox.dropped + self._rejected + self._unserialisable + self._store_failed

    # ------------------------------------------------------------------ stats and snapshots

    def build_stats(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """The stats document (schema edge/schemas/stats.v1.json) from ``Pipeline.status()`` and our counters."""
        now_wall, now = time.time(), time.monotonic()
        mine = self.status()
        with self._lock:
            out_now = Counter(self._frames_out)
            prev_t, prev_out = self._last_stats or (self._started, Counter())
            self._last_stats = (now, out_now)
            inf, self._inference_ms = self._inference_ms, {}
            self._stats_seq += 1
            seq = self._stats_seq
        elapsed = max(now - prev_t, 1e-6)
        sources: dict[str, Any] = {}
        hub_drops = 0
        for name, s in (snapshot.get("sources") or {}).items():
            s = s or {}
            dropped = int(s.get("frames_dropped") or 0)
            hub_drops += dropped
            acc = inf.get(name)
            sources[name] = {
                "status": s.get("status"),
                "live": bool(s.get("live", False)),
                "paused": bool(s.get("paused", False)),
                "fps_in": round(float(s.get("fps_in") or 0.0), 2),
                "fps_out": round((out_now[name] - prev_out[name]) / elapsed, 2),
                "frames_in": int(s.get("frames_in") or 0),
                "frames_out": out_now[name],
                "frames_dropped": dropped,
                "frames_skipped_fps": int(s.get("frames_skipped_fps") or 0),
                "rejected": int(s.get("rejected") or 0),
                "reconnects": int(s.get("reconnects") or 0),
                "inference_ms": round(acc[0] / acc[1], 2) if acc and acc[1] else None,
            }
            if isinstance(s.get("stalled_s"), (int, float)):  # a read without progress past read_timeout
                sources[name]["stalled_s"] = round(float(s["stalled_s"]), 1)
        sums = [v for v in inf.values() if v[1]]
        ob = mine["outbox"]
        return {
            "schema_version": STATS_SCHEMA_VERSION,
            "id": str(uuid.uuid5(_STATS_NAMESPACE, f"{self.device_id}\x1f{self._started}\x1f{now_wall}\x1f{seq}")),
            "device_id": self.device_id,
            "at": iso_utc(now_wall),
            "ts": round(now_wall, 3),
            "uptime_s": snapshot.get("uptime_s", round(now - self._started, 1)),
            "frames": int(snapshot.get("frames") or sum(out_now.values())),
            "detections": int(snapshot.get("detections") or 0),
            "inference_ms": round(sum(v[0] for v in sums) / sum(v[1] for v in sums), 2) if sums else None,
            "inference_ms_avg": snapshot.get("inference_ms_avg"),
            "sources": sources,
            "drops": {
                "hub": hub_drops,
                "outbox_full": ob["evicted"],
                "outbox_expired": ob["expired"],
                "outbox_refused": ob["refused"],
                "mqtt_rejected": mine["drops"]["rejected"] + mine["drops"]["unserialisable"],
                "outbox_error": mine["drops"]["outbox_error"],
                "outbox_lost": ob["lost"],
                "ledger_lost": int((snapshot.get("ledger") or {}).get("lost") or 0),
                "dataset_index_lost": int((((snapshot.get("sinks") or {}).get("dataset") or {}).get("index") or {})
                                          .get("lost") or 0),
            },
            "outbox": {
                "depth": ob["depth"],
                "oldest_age_s": ob["oldest_age_s"],
                "max_messages": ob["max_messages"],
                "policy": ob["policy"],
                "durable": ob["durable"],
                "blocked": ob["blocked"],
                "dead_letter": ob["dead_letter"],
                "capped": self._capped_count,
                "lost": ob["lost"],
                "head_wait_s": ob["head_wait_s"],
            },
            "mqtt": {
                "connected": mine["connected"],
                "published": mine["published"],
                "acked": mine["acked"],
                "inflight": mine["inflight"],
                "last_error": mine["last_error"],
            },
            "dataset": _dataset_health(snapshot),
            "zones": snapshot.get("zones") or {},
        }

    def _update_alarm(self, snapshot: dict[str, Any]) -> None:
        """Publish ``<prefix>/<device>/alarm`` (retained, QoS 1) whenever the set of active alarms changes.

        Evaluated with every stats snapshot, so an alarm is raised or cleared within ``stats_interval``
        seconds.  The first evaluation always publishes, which clears an alarm retained by a previous run.
        """
        now = iso_utc(time.time())
        active = device_alarms(snapshot, skipped_before=self._disk_skipped)
        self._disk_skipped = _disk_skipped(snapshot)
        with self._lock:
            before = self._alarm_since
            if before is not None and set(before) == {a["id"] for a in active}:
                return
            since = {a["id"]: (before or {}).get(a["id"], now) for a in active}
            self._alarm_since = since
            alarms = [{**a, "since": since[a["id"]]} for a in active]
            doc = {"schema_version": 1, "device_id": self.device_id, "at": now, "active": bool(alarms), "alarms": alarms}
            payload = self._alarm_payload = json.dumps(doc, separators=(",", ":")).encode()
            connected = self._connected
        for a in alarms:
            if before is None or a["id"] not in before:
                log.error("MQTT: alarm %s raised on %s: %s", a["id"], self.alarm_topic, a["message"])
        for gone in set(before or {}) - set(since):
            log.warning("MQTT: alarm %s cleared", gone)
        if connected:  # else the next (re)connect publishes it
            self._publish(self.alarm_topic, payload, 1, retain=True)

    def _maybe_snapshot(self, record: LabelRecord, frame: Frame) -> None:
        """Publish the annotated frame, retained, at most every ``snapshot.interval`` seconds per source."""
        snap = self.cfg.snapshot
        now = time.monotonic()
        with self._lock:
            if not self._connected or now - self._last_snapshot.get(record.source, float("-inf")) < snap.interval:
                return
            self._last_snapshot[record.source] = now
        try:
            from edgelabel.edge.annotate import draw_detections, encode_jpeg

            jpeg = encode_jpeg(draw_detections(frame.image, record.detections), snap.quality, snap.max_width)
        except Exception as exc:  # a snapshot is a convenience: never let it disturb labeling
            log.warning("MQTT: snapshot of %s frame %d failed: %s", record.source, record.frame_index, exc)
            return
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "image/jpeg"
            props.UserProperty = ("record_id", record.id)
            props.UserProperty = ("frame_index", str(record.frame_index))
            props.UserProperty = ("captured_at", record.captured_at)
        self._publish(f"{self.base_topic}/{record.source}/snapshot", jpeg, 0, retain=True, properties=props)

    # ------------------------------------------------------------------ storing

    def waiting(self) -> bool:
        """True while a write may be waiting for room in a full outbox (stop_capture back-pressure)."""
        return self._in_put and self.cfg.outbox.policy == "stop_capture"

    def interrupt(self) -> None:
        """Release a write waiting for room in a full outbox (stop_capture); it raises SinkRefused."""
        self._interrupted = True
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_DRAIN_S

    def _store(self, msgs: list[Message], *, sync: bool) -> None:
        """Hand messages to the outbox; drops are counted and logged by the outbox itself.

        Raises SinkRefused when the messages were not stored (closed, interrupted while
        waiting for room, or the outbox cannot be written), so the caller can retry the
        frame later instead of marking it done.
        """
        if not msgs:
            return
        if self._closed:
            log.error("MQTT: %d message(s) after close, not stored (first topic %s)", len(msgs), msgs[0].topic)
            with self._lock:
                self._store_failed += len(msgs)
            raise SinkRefused("MQTT sink is closed")
        try:
            self._in_put = True
            result = self._outbox.put(msgs, sync=sync, interrupted=lambda: self._closing or self._interrupted)
        except Exception as exc:  # disk full, I/O error: report, keep labeling (the dataset still works)
            retried = storage_fault(exc) is not None  # disk full, read-only: the pipeline holds the record and retries
            log.error("MQTT: cannot store %d message(s) in the outbox %s: %s (%s)", len(msgs), self._outbox.where, exc,
                      "held and retried until the disk can be written" if retried
                      else "storage frames are labeled again on the next start")
            with self._lock:
                if not retried:  # a record that waits is not lost: counting each try inflated the drops
                    self._store_failed += len(msgs)
                self._last_error = f"outbox write failed: {exc}"
            raise SinkRefused(f"outbox write failed: {exc}") from exc
        finally:
            self._in_put = False
        if result.refused:
            raise SinkRefused(f"{result.refused} message(s) refused: the outbox is full and the daemon is stopping")
        if result.committed and not self._inflight:
            # committed now: publish at once; with messages in flight the next acknowledgement wakes the
            # publisher anyway, and it then sends what has gathered in one go (a batch is sent by its tick)
            self._wake.set()
        if not self._connected:
            self._warn_outage_if_due()

    # ------------------------------------------------------------------ publishing (the outbox thread)

    def _drain_loop(self) -> None:
        """Commit due batches, apply acknowledgements, expire old rows, keep the in-flight window full."""
        tick = min(IDLE_TICK, self.cfg.outbox.commit_interval) if self.cfg.outbox.commit_interval > 0 else IDLE_TICK
        last_expire = 0.0
        failing = False
        while not self._stop_drainer.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            self._beat = time.monotonic()
            try:
                self._outbox.commit_due()
                self._process_acks()
                self._check_refusal()
                if time.monotonic() - last_expire >= EXPIRE_INTERVAL:
                    last_expire = time.monotonic()
                    self._outbox.expire()
                    self._outbox.checkpoint()  # the WAL's fsync here, not inside a label's commit
                self._fill_window()
                self._warn_outage_if_due()
                failing = False
            except Exception as exc:  # the thread must not die silently (disk full, I/O errors)
                if not failing:
                    log.exception("MQTT: outbox publisher failed; retrying")
                failing = True
                with self._lock:
                    self._last_error = f"outbox: {exc}"
                self._stop_drainer.wait(1.0)

    def _fill_window(self) -> None:
        """Publish the next committed rows, up to ``max_inflight`` unacknowledged at a time."""
        with self._lock:
            if not self._connected or self._stop_drainer.is_set():
                return
            if any(gen != self._generation for _, gen in self._inflight.values()):
                return  # paho is re-sending what was in flight at the disconnect: nothing may overtake it
            room = (1 if self._single_left > 0 else self._window) - len(self._inflight)
            cursor = self._cursor
        if room <= 0:
            return
        rows = self._outbox.fetch(cursor, room)
        if not rows:
            return
        with self._lock:
            for row in rows:
                if not self._connected:
                    break
                if not self._publish_row_locked(row):
                    break

    def _publish_row_locked(self, row: StoredMessage) -> bool:
        """Publish one outbox row (caller holds the lock); False to stop filling the window for now."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)
            if row.payload[:1] == b"{":
                props.ContentType = "application/json"
            if self._outbox.max_age > 0:
                left = self._outbox.max_age - (time.time() - row.created_at)
                props.MessageExpiryInterval = max(1, int(left))
        limit = self._broker_max_packet
        if limit is not None:
            size = _packet_size(row.topic, row.payload, props)
            if size > limit:  # the broker told us (CONNACK) it would drop the connection over it: set it aside
                self._cursor = row.seq
                self._acks.put((-row.seq, True, "packet too large", 0.0, 0x95))
                return True
        mid, rc = self._publish_locked(row.topic, row.payload, row.qos, row.retain, props)
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return False  # paho's RAM queue is full (mqtt.max_queued): try again when acks arrive
        if row.qos == 0 and rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False  # paho discards QoS 0 while offline: keep the row, send it after the reconnect
        self._cursor = row.seq
        if row.qos == 0 and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            # QoS 0 has no acknowledgement and paho does not keep it across a reconnect, so it must not hold
            # the in-flight window: handed over is as delivered as it gets
            self._acks.put((-row.seq, False, "qos0", 0.0, 0))
            return True
        if mid is None or rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # paho refused it for good (invalid topic, payload too large): it will never be sent
            self._last_error = f"message {row.msg_id or row.seq} on {row.topic} refused by the MQTT client: {rc}"
            self._acks.put((-row.seq, True, f"refused by the MQTT client: {rc}", 0.0, 0))  # set aside by _process_acks
            return True
        self._inflight[mid] = (row.seq, self._generation)
        captured = self._capture_ts.pop(row.msg_id, None) if row.msg_id else None
        if captured is not None:
            if len(self._mid_capture) >= LATENCY_WINDOW:
                self._mid_capture.pop(next(iter(self._mid_capture)))
            self._mid_capture[mid] = captured
        return True

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None = None) -> bool:
        """Publish a direct (not outboxed) message; True if paho took it."""
        with self._lock:
            mid, rc = self._publish_locked(topic, payload, qos, retain, properties)
            ok = mid is not None and rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
            if ok and qos > 0 and mid is not None:
                self._direct[mid] = topic
        return ok

    def _publish_locked(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None
    ) -> tuple[int | None, MQTTErrorCode | None]:
        """The one place that calls ``client.publish`` (caller holds ``self._lock``)."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except (ValueError, TypeError) as exc:  # invalid topic/payload: a bug, but never fatal here
            log.error("MQTT: cannot publish on %s: %s", topic, exc)
            return None, None
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._published += 1
            if qos == 0:
                self._qos0 += 1
            self._last_publish_at = time.time()
        return info.mid, info.rc

    def _process_acks(self, force: bool = False, wait: float | None = None) -> None:
        """Move acknowledgements from the callback queue into counters and delete the acknowledged rows.

        The in-flight window is freed at once; the rows are deleted in batches
        (ACK_BATCH rows or ACK_DELAY seconds, or now with ``force``), because a
        transaction per acknowledgement would cost as much as the publishing.
        A crash in between only means those few rows are sent again.
        """
        rejected: list[str] = []
        batch: list[int] = []
        dead: list[tuple[int, str, int]] = []  # (outbox seq, reason, reason code) to set aside
        with self._lock:
            done = self._to_delete
            while True:
                try:
                    mid, failed, reason, acked_at, code = self._acks.get_nowait()
                except queue.Empty:
                    break
                self._progress_at = time.monotonic()  # acknowledged, handed over (QoS 0) or set aside: the line moves
                if mid < 0:  # a row paho refused outright or a QoS 0 row handed over (see _publish_row_locked)
                    if failed:
                        dead.append((-mid, reason, code))
                    else:
                        done.append(-mid)
                    continue
                entry = self._inflight.pop(mid, None)
                if entry is not None:
                    if not failed and self._single_left > 0:
                        self._single_left -= 1
                        if self._suspect is not None and self._suspect[0] == entry[0]:
                            self._suspect = None  # it got through after all
                    if failed:  # MQTT 5: a failing PUBACK reason code; set the row aside, go on with the next
                        self._broker_refused += 1
                        self._mid_capture.pop(mid, None)
                        dead.append((entry[0], reason, code))
                        continue
                    done.append(entry[0])
                elif self._direct.pop(mid, None) is None:
                    continue  # a QoS0 direct message (stats, snapshot): nothing to account
                if failed:
                    self._rejected += 1
                    self._broker_refused += 1
                    self._last_error = f"broker refused a message: {reason}"
                    rejected.append(reason)
                else:
                    self._acked += 1
                    captured = self._mid_capture.pop(mid, None)
                    if captured is not None:
                        self._puback_ms.append((acked_at - captured) * 1e3)
            now = time.monotonic()
            if done and not self._to_delete_since:
                self._to_delete_since = now
            if done and (force or len(done) >= ACK_BATCH or now - self._to_delete_since >= ACK_DELAY):
                batch, self._to_delete, self._to_delete_since = done, [], 0.0
        if batch and self._outbox.ack(batch, wait=wait) is None:
            with self._lock:  # the outbox is busy (a writer stuck on the disk): delete them on a later turn
                self._to_delete[:0] = batch
                self._to_delete_since = self._to_delete_since or time.monotonic()
        for seq, reason, code in dead:
            self._set_aside(seq, reason, code)
        if rejected:
            now = time.monotonic()
            if now - self._last_reject_log >= WARN_INTERVAL:
                self._last_reject_log = now
                log.error("MQTT: broker %s refused %d message(s) (%s); they are dropped", self.broker, len(rejected),
                          rejected[-1])

    def _check_refusal(self) -> None:
        """Find the message a broker refuses by closing the connection, and set it aside.

        MQTT 3.1.1 has no way to refuse one message: mosquitto closes the connection (a packet over its
        max_packet_size), and paho sends the same message again on the next connection, for ever.  Which
        one it was is not the lowest in flight: the broker resets the connection, which discards the
        PUBACKs it had just sent for the messages before.  So a short connection that drops with messages
        in flight switches the publisher to single steps: paho keeps only the lowest of them (the others
        stay in the outbox and are published again after it), and one message is in flight at a time.
        The same single message in flight at DISCONNECT_STRIKES drops in a row (MQTT 5: one DISCONNECT
        whose reason code is permanent, e.g. 0x95 packet too large) is set aside in the dead-letter table.
        Single steps end after ``max_inflight`` acknowledgements in a row.
        """
        with self._lock:
            drops, self._drops = self._drops, []
        for generation, lasted, code in drops:
            forget: list[int] = []
            with self._lock:
                # in flight when that connection dropped (paho re-sends them, they keep their first generation)
                old = sorted((seq, mid) for mid, (seq, gen) in self._inflight.items() if gen <= generation)
                if not old or lasted > SHORT_CONNECTION:
                    self._suspect = None
                    continue
                seq, mid = old[0]
                single = self._single_left > 0 and len(old) == 1
                self._single_left = self._window
                if not single:  # isolate the lowest: the rest go back to the outbox's queue
                    for _, other in old[1:]:
                        self._inflight.pop(other, None)
                        self._mid_capture.pop(other, None)
                        forget.append(other)
                    self._published -= len(forget)  # taken back from paho: published again later
                    self._cursor = seq
                    self._suspect = (seq, 0)
                else:
                    strikes = self._suspect[1] + 1 if self._suspect is not None and self._suspect[0] == seq else 1
                    self._suspect = (seq, strikes)
                    if code in PERMANENT_REFUSALS or strikes >= DISCONNECT_STRIKES:
                        self._suspect = None
                        self._inflight.pop(mid, None)
                        self._mid_capture.pop(mid, None)
                        self._broker_refused += 1
                        forget.append(mid)
            for other in forget:
                _forget_in_paho(self._client, other)
            if single and self._suspect is None:
                reason = (str(ReasonCode(PacketTypes.DISCONNECT, identifier=code)) if code in PERMANENT_REFUSALS else
                          f"the broker closed the connection right after receiving it, {strikes} times in a row")
                self._set_aside(seq, reason, code)
            self._wake.set()

    def _set_aside(self, seq: int, reason: str, code: int) -> None:
        """Move one refused outbox row to the dead-letter table and say why, in words a technician can act on."""
        row = self._outbox.dead_letter(seq, reason)
        if row is None:
            return
        size = len(row.payload)
        if code == 0x87 or "authori" in reason.lower():
            who = f"user {self.cfg.username!r}" if self.cfg.username else "an anonymous client"
            hint = f"the broker's ACL does not let {who} publish on {row.topic}: allow that topic for this client"
        elif code == 0x95 or "too large" in reason.lower():
            limit = f" (the broker accepts at most {self._broker_max_packet} bytes)" if self._broker_max_packet else ""
            hint = (f"the message is {size} bytes, too large for the broker{limit}: raise max_packet_size on the "
                    "broker or set mqtt.max_message_bytes below it")
        elif code in PERMANENT_REFUSALS:
            hint = f"the broker refuses it ({PERMANENT_REFUSALS[code]})"
        else:
            hint = (f"MQTT {self.cfg.protocol} gives no reason; the message is {size} bytes: most likely it is larger "
                    f"than the broker's max_packet_size, or the broker's ACL denies {row.topic} (see the broker's log)")
        with self._lock:
            self._last_error = f"message on {row.topic} set aside: {reason}"
        log.error("MQTT: broker %s refused message %s on %s (%d bytes): %s; %s. It is set aside in the outbox's "
                  "dead-letter table (%d there now) and delivery goes on with the next message. Once the broker is "
                  "fixed, send it again: edgelabel outbox requeue %s (with the daemon stopped)",
                  self.broker, row.msg_id or row.seq, row.topic, size, reason, hint, self._outbox.stats()["dead_letter"],
                  self._outbox.where)

    def _wait_drained(self, timeout: float, outbox: bool = True) -> bool:
        """Wait until the outbox (if ``outbox``) is empty and direct messages are acknowledged.

        Gives up at ``timeout`` or as soon as the link is down; while stopping also at the stop's deadline
        (STOP_DRAIN_S after it) and when nothing moved for DRAIN_STALL_S.
        """
        deadline = time.monotonic() + timeout
        last: tuple[int, int] | None = None
        moved_at = time.monotonic()
        while True:
            self._process_acks(force=True)
            with self._lock:
                connected = self._connected
                direct = len(self._direct)
            depth = self._outbox.depth if outbox else 0
            if not depth and not direct:
                return True
            now = time.monotonic()
            if (depth, direct) != last:
                last, moved_at = (depth, direct), now
            if not connected or now >= deadline:
                return False
            # the publisher had its turn since the last progress (or, for the direct messages after it stopped,
            # there is no publisher to wait for) and still nothing moved
            had_turn = not outbox or self._beat > moved_at
            if self._stop_deadline is not None and (now >= self._stop_deadline
                                                    or (now - moved_at >= DRAIN_STALL_S and had_turn)):
                return False  # stopping: the broker is silent, the outbox cannot be written, or time is up
            self._wake.set()
            time.sleep(0.02)

    # ------------------------------------------------------------------ reporting

    def _report_outage(self, reason: str, kind: str) -> None:
        """ERROR on the first failure of an outage and when its cause changes, then a rate-limited WARNING."""
        now = time.monotonic()
        with self._lock:
            self._last_error = reason
            first = self._outage_since is None
            changed = kind != self._outage_kind
            if first:
                self._outage_since = now
                self._outage_since_wall = time.time()
            if first or changed:
                self._outage_kind = kind
                self._last_outage_warning = now
        if first or changed:
            if kind == "lost":
                log.error("MQTT: broker %s: %s. Reconnecting; if this repeats right after publishing, the broker "
                          "refuses a message (larger than its max_packet_size, or denied by its ACL): it is set "
                          "aside after %d tries in a row and delivery goes on. Labels are kept in the outbox.",
                          self.broker, reason, DISCONNECT_STRIKES)
            elif kind in ("auth", "tls"):
                log.error("MQTT: broker %s: %s. Retrying; labels are kept in the outbox until it accepts us.",
                          self.broker, reason)
            else:
                log.error(
                    "MQTT: broker %s unreachable (%s): is the broker running? check mqtt.host/port. "
                    "Labels are kept in the outbox %s (max %d) and sent when it comes back.",
                    self.broker, reason, self._outbox.where, self._outbox.max_messages,
                )
        else:
            self._warn_outage_if_due()

    def _warn_outage_if_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            since = self._outage_since
            if since is None or now - self._last_outage_warning < WARN_INTERVAL:
                return
            self._last_outage_warning = now
            reason = self._last_error
            state = "unreachable" if self._outage_kind in (None, "connect") else "not connected"
        log.warning(
            "MQTT: broker %s still %s after %.0f s (%s); %d message(s) waiting in the outbox, %d dropped so far",
            self.broker, state, now - since, reason, self._outbox.depth, self._outbox.dropped,
        )

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._connected = False
                self._refused = True
            if reason_code.value in AUTH_FAILURES:
                user = f"user {self.cfg.username!r}" if self.cfg.username else "no username"
                self._report_outage(
                    f"not authorised: the broker refused the login ({reason_code}, {user}); check mqtt.username "
                    "and mqtt.password / mqtt.password_file",
                    "auth",
                )
            else:
                self._report_outage(f"broker refused the connection: {reason_code}", "refused")
            return
        client.on_log = None  # connected: no TLS alert to catch, and no formatting cost per message
        with self._lock:
            self._connected = True
            self._refused = False
            self._generation += 1
            self._connected_at = time.monotonic()
            self._progress_at = self._connected_at  # the stall clock starts with the connection
            limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
            new_limit = isinstance(limit, int) and limit != self._broker_max_packet
            self._broker_max_packet = limit if isinstance(limit, int) else None
            since, self._outage_since, self._outage_kind = self._outage_since, None, None
            self._outage_since_wall = None
            sources = dict(self._source_status)
            alarm = self._alarm_payload
        waiting = self._outbox.depth
        if new_limit and isinstance(limit, int) and limit < self.cfg.max_message_bytes + 1024:
            log.warning("MQTT: broker %s accepts packets of at most %d bytes (its max_packet_size), less than "
                        "mqtt.max_message_bytes=%d allows: a larger message cannot be delivered and is set aside in "
                        "the outbox's dead-letter table. Set mqtt.max_message_bytes below %d, or raise the broker's "
                        "max_packet_size", self.broker, limit, self.cfg.max_message_bytes, limit - 1024)
        if since is not None:
            log.warning("MQTT: connected to %s again after %.0f s; sending %d stored message(s)",
                        self.broker, time.monotonic() - since, waiting)
        else:
            log.info("MQTT: connected to %s%s", self.broker,
                     f"; sending {waiting} stored message(s)" if waiting else "")
        # birth message, then the last known state of every source (retained, so late subscribers see it)
        self._publish(self.status_topic, b"online", 1, retain=True)
        for source, state in sources.items():
            self._publish(f"{self.base_topic}/{source}/status", state.encode(), 1, retain=True)
        if alarm is not None:
            self._publish(self.alarm_topic, alarm, 1, retain=True)
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the connect: the exception is the one handled
        exc = sys.exc_info()[1]
        with self._lock:
            self._refused = False
        tls_problem = None if exc is None else describe_tls_error(exc, self.cfg.tls, self.cfg.host, self.cfg.port)
        if tls_problem is not None:
            self._report_outage(tls_problem, "tls")
            return
        detail = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) if exc is not None else ""
        self._report_outage(f"connection failed: {detail}" if detail else "connection failed", "connect")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        client.on_log = self._on_log
        with self._lock:
            was_connected, self._connected = self._connected, False
            closing, refused = self._closing, self._refused
            if was_connected and not closing:
                self._drops.append((self._generation, time.monotonic() - self._connected_at, int(reason_code.value)))
        if closing and not reason_code.is_failure:
            log.debug("MQTT: disconnected from %s", self.broker)
            return
        if refused and not was_connected:
            return  # the refused CONNACK was reported; keep that reason in last_error
        with self._lock:
            alert, self._tls_alert = self._tls_alert, None
        if alert is not None:
            self._report_outage(describe_tls_alert(alert), "tls")
            return
        if was_connected:
            self._report_outage(f"the broker closed the connection: {reason_code}", "lost")
            self._wake.set()
            return
        self._report_outage(f"connection lost: {reason_code}", "connect")

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        """Keep a TLS alert paho read from the socket: it is why the next disconnect happens (_on_disconnect).

        Set only while not connected (a broker refusing the client certificate sends its alert right after
        the handshake, before CONNACK), because paho formats every log line, debug included, for it.
        """
        if level == mqtt.MQTT_LOG_ERR and buf.startswith("failed to receive on socket") and "[SSL" in buf:
            alert = buf.split("] ", 1)[-1].split(" (_ssl.c", 1)[0].strip()
            with self._lock:
                self._tls_alert = alert

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # runs under paho's message mutex: must not take self._lock (see module doc)
        self._acks.put((mid, bool(reason_code.is_failure), str(reason_code), time.time(), int(reason_code.value)))
        self._wake.set()


def _write_probe(folder: Path) -> OSError | None:
    """The OS's own error for a file created in ``folder`` (SQLite only says "unable to open database file")."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(probe)
    return None

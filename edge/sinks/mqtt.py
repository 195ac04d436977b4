"""Publish label records and device/source status to an MQTT broker (paho-mqtt 2.x).

Topics (``prefix`` and the device id come from the config)::

    <prefix>/<device>/status            retained: online | stopped | offline (Last Will)
    <prefix>/<device>/<source>/status   retained: whatever the source last reported
    <prefix>/<device>/<source>/labels   one LabelRecord JSON per processed frame

Why it is built this way:

* ``connect_async`` + ``loop_start``: the daemon must start and label frames
  even when the broker is absent; paho's network thread keeps retrying with
  backoff (1 s doubling to 30 s) and re-sends queued QoS>0 messages on reconnect.
* paho keeps QoS>0 messages in RAM only, so its queue is capped with
  ``max_queued_messages_set(cfg.max_queued)`` (0 means unlimited, paho's rule)
  and every message it refuses is counted as ``dropped`` and logged.  QoS0
  messages published while disconnected are discarded by paho: counted too.
* An unreachable broker is an operator problem that is easy to miss on a
  headless box, so the first failure is an ERROR naming host:port, followed by
  a WARNING at most every 30 s with the backlog size while it lasts.
* Every publish goes through :meth:`MqttSink._publish`, the one place that
  talks to paho, so a durable on-disk outbox can later sit between ``write``
  and ``_publish`` (write appends to the outbox; a drainer calls ``_publish``;
  the acknowledgements tracked by message id delete the rows).

Threading: ``write``/``source_status``/``close`` run on the sink worker thread,
paho callbacks on paho's network thread, ``status`` on any thread.  Shared
state is guarded by ``self._lock``.  ``on_publish`` runs while paho holds its
internal message mutex, and ``_publish`` holds ``self._lock`` while calling
``client.publish`` (which takes that mutex), so ``on_publish`` must never take
``self._lock``: it only drops the message id into a lock-free queue that is
drained under ``self._lock``.  Holding ``self._lock`` across ``publish`` also
means an acknowledgement can never be drained before its id is recorded.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import ConfigError, MqttConfig
from edge.frame import Frame
from edge.records import LabelRecord
from edge.sinks.base import Sink

log = logging.getLogger(__name__)

#: seconds between repeated warnings while the broker stays unreachable or messages are dropped
WARN_INTERVAL = 30.0
#: how long ``close``/``flush`` wait for the broker to acknowledge pending QoS>0 messages
ACK_TIMEOUT = 5.0
RECONNECT_MIN_DELAY = 1
RECONNECT_MAX_DELAY = 30


class MqttSink(Sink):
    """Publishes every record on ``<prefix>/<device>/<source>/labels`` and keeps retained status topics."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, device_id: str) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.broker = f"{cfg.host}:{cfg.port}"
        self.base_topic = f"{cfg.prefix}/{device_id}"
        self.status_topic = f"{self.base_topic}/status"

        self._lock = threading.Lock()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()  # filled by on_publish, see module doc
        self._pending: dict[int, str] = {}  # mid -> topic of QoS>0 messages not yet acknowledged
        self._source_status: dict[str, str] = {}
        self._connected = False
        self._opened = False
        self._closing = False
        self._published = 0
        self._acked = 0
        self._dropped = 0
        self._last_publish_at: float | None = None
        self._last_error: str | None = None
        # outage reporting: ERROR once per outage, then WARNING at most every WARN_INTERVAL
        self._outage_since: float | None = None
        self._last_outage_warning = 0.0
        # drop reporting: first drop logged at once, later ones summarised every WARN_INTERVAL
        self._dropped_unlogged = 0
        self._last_drop_log = float("-inf")

        self._client = self._make_client()

    # ------------------------------------------------------------------ set-up

    def _make_client(self) -> mqtt.Client:
        """Build the paho client; everything here must happen before the first connect."""
        cfg = self.cfg
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id(),
            protocol=mqtt.MQTTv311,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            tls = cfg.tls
            try:
                client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                # a bad certificate path is a configuration mistake: fail start-up with the field named
                raise ConfigError([f"mqtt.tls: cannot load CA/certificate/key ({exc})"]) from exc
            client.tls_insecure_set(tls.insecure)
        client.max_queued_messages_set(cfg.max_queued)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
        # the broker publishes this for us if we vanish without a DISCONNECT (crash, power or network loss)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def open(self) -> None:
        """Start connecting in the background; returns at once even if the broker is down."""
        with self._lock:
            if self._opened:
                return
            self._opened = True
        log.info("MQTT: connecting to %s as %s (topics under %s/)", self.broker, self._client_id(), self.base_topic)
        try:
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ValueError) as exc:  # pragma: no cover - connect_async only stores arguments
            self._report_outage(f"cannot start connecting: {exc}")
        self._client.loop_start()

    def _client_id(self) -> str:
        return self.cfg.client_id or f"edgelabel-{self.device_id}"

    # ------------------------------------------------------------------ Sink API

    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Queue the record for delivery; never raises and never blocks on the network."""
        topic = f"{self.base_topic}/{record.source}/labels"
        try:
            payload = record.to_json()
        except (TypeError, ValueError) as exc:
            log.error("MQTT: record %s cannot be serialised, not published: %s", record.id, exc)
            with self._lock:
                self._dropped += 1
                self._last_error = f"record not serialisable: {exc}"
            return
        self._publish(topic, payload, self.cfg.qos, retain=False)

    def source_status(self, source: str, status: str) -> None:
        """Publish the source's state retained, and remember it for re-publishing after a reconnect."""
        with self._lock:
            self._source_status[source] = status
        self._publish(f"{self.base_topic}/{source}/status", status, 1, retain=True)

    def flush(self) -> None:
        """Wait (bounded) until the broker has acknowledged everything published so far."""
        self._wait_for_acks(ACK_TIMEOUT)

    def close(self) -> None:
        """Announce ``stopped``, give pending messages a bounded time to be acknowledged, disconnect."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            opened = self._opened
        self._publish(self.status_topic, "stopped", 1, retain=True)
        if opened:
            self._wait_for_acks(ACK_TIMEOUT)
        with self._lock:
            self._drain_acks_locked()
            lost = len(self._pending)
        if lost:
            log.warning("MQTT: closing with %d message(s) not acknowledged by %s; they are lost", lost, self.broker)
        self._client.disconnect()
        if opened:
            self._client.loop_stop()
        with self._lock:
            self._connected = False
            counts = (self._published, self._acked, self._dropped)
        log.info("MQTT: closed (%d published, %d acknowledged, %d dropped)", *counts)

    def status(self) -> dict[str, Any]:
        """Connection state and counters.

        ``published``: messages paho accepted (sent or queued); ``acked``: QoS>0
        messages the broker acknowledged; ``pending``: QoS>0 messages accepted
        but not yet acknowledged; ``dropped``: messages that will never be sent
        (queue full, QoS0 while offline, unserialisable record).
        """
        with self._lock:
            self._drain_acks_locked()
            return {
                "connected": self._connected,
                "broker": self.broker,
                "published": self._published,
                "acked": self._acked,
                "pending": len(self._pending),
                "dropped": self._dropped,
                "last_publish_at": self._last_publish_at,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ publishing

    def _publish(self, topic: str, payload: str | bytes, qos: int, retain: bool) -> bool:
        """Hand one message to paho and account for it; True if it will be delivered (or was).

        The single point where messages leave the sink: a future outbox calls
        this for each stored row and uses the tracked acknowledgement to delete it.
        """
        reason: str | None = None
        with self._lock:
            self._drain_acks_locked()
            try:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
            except (ValueError, TypeError) as exc:  # invalid topic/payload: a bug, but never fatal here
                rc: MQTTErrorCode | None = None
                reason = f"invalid message for {topic}: {exc}"
            else:
                rc = info.rc
                if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                    reason = f"in-memory queue full (mqtt.max_queued={self.cfg.max_queued})"
                elif rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
                    reason = "QoS0 message while not connected"
                elif rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    reason = mqtt.error_string(rc)
                else:
                    # NO_CONN with QoS>0: paho keeps it queued and sends it after reconnecting
                    self._published += 1
                    self._last_publish_at = time.time()
                    if qos > 0:
                        self._pending[info.mid] = topic
            if reason is not None:
                self._dropped += 1
                self._dropped_unlogged += 1
                self._last_error = f"dropped: {reason}"
            connected = self._connected
        if reason is not None:
            self._log_drops(reason)
        elif not connected:
            self._warn_outage_if_due()
        return reason is None

    def _drain_acks_locked(self) -> None:
        """Move acknowledgements from the callback queue into the counters (caller holds the lock).

        Ids that are not pending belong to QoS0 messages (paho reports those
        once written to the socket) and are ignored.
        """
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return
            if self._pending.pop(mid, None) is not None:
                self._acked += 1

    def _wait_for_acks(self, timeout: float) -> bool:
        """Wait until nothing is pending; give up at ``timeout`` or as soon as the link is down."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain_acks_locked()
                if not self._pending:
                    return True
                if not self._connected:
                    return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # ------------------------------------------------------------------ reporting

    def _report_outage(self, reason: str) -> None:
        """ERROR on the first failure of an outage, then a rate-limited WARNING with the backlog."""
        now = time.monotonic()
        with self._lock:
            self._last_error = reason
            first = self._outage_since is None
            if first:
                self._outage_since = now
                self._last_outage_warning = now
        if first:
            log.error(
                "MQTT: broker %s unreachable (%s): is the broker running? check mqtt.host/port. "
                "Labels are kept in memory (max %s) and sent when it comes back.",
                self.broker,
                reason,
                self.cfg.max_queued or "unlimited",
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
            self._drain_acks_locked()
            waiting, dropped, reason = len(self._pending), self._dropped, self._last_error
        log.warning(
            "MQTT: broker %s still unreachable after %.0f s (%s); %d message(s) waiting, %d dropped so far",
            self.broker,
            now - since,
            reason,
            waiting,
            dropped,
        )

    def _log_drops(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_drop_log < WARN_INTERVAL:
                return
            self._last_drop_log = now
            count, self._dropped_unlogged = self._dropped_unlogged, 0
            total = self._dropped
        log.warning("MQTT: dropped %d message(s) (%s); %d dropped in total", count, reason, total)

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
            self._report_outage(f"broker refused the connection: {reason_code}")
            return
        with self._lock:
            self._connected = True
            since, self._outage_since = self._outage_since, None
            self._drain_acks_locked()
            waiting = len(self._pending)
            sources = dict(self._source_status)
        if since is not None:
            log.warning(
                "MQTT: connected to %s again after %.0f s; sending %d queued message(s)",
                self.broker,
                time.monotonic() - since,
                waiting,
            )
        else:
            log.info("MQTT: connected to %s", self.broker)
        # birth message, then the last known state of every source (retained, so late subscribers see it)
        self._publish(self.status_topic, "online", 1, retain=True)
        for source, state in sources.items():
            self._publish(f"{self.base_topic}/{source}/status", state, 1, retain=True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._report_outage("connection failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._connected = False
            closing = self._closing
        if closing and not reason_code.is_failure:
            log.debug("MQTT: disconnected from %s", self.broker)
            return
        self._report_outage(f"connection lost: {reason_code}")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # runs under paho's message mutex: must not take self._lock (see module doc)
        self._acks.put(mid)

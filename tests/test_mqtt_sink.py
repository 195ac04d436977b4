"""MqttSink against a real Mosquitto: topics, QoS, retained status, Last Will, broker outages.

A small TCP relay stands in front of the broker where a test needs to control
the network: to open the broker's port only after a subscriber is listening
(so the "broker comes back" check is not a race), or to cut the link silently
the way a pulled cable does (no FIN, so only the keepalive can notice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelabel.edge.config import ConfigError, MqttConfig, TlsConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, load_schema, record_id
from edgelabel.edge.sinks.base import SinkRefused
from edgelabel.edge.sinks.mqtt import MqttSink
from edgelabel.engines.base import Detection
from tests.conftest import Broker, free_port

DEVICE = "edge-test-01"
PREFIX = "edgelabel"
MODEL = ModelInfo(
    name="yolox_nano",
    sha256=hashlib.sha256(b"yolox_nano.onnx test stand-in").hexdigest(),
    family="yolox",
    engine="onnxruntime",
    provider="CPUExecutionProvider",
    precision="fp32",
    input_size=(416, 416),
)
FRAME_IMAGE = np.zeros((72, 128, 3), np.uint8)


def make_record(source: str, index: int) -> LabelRecord:
    """A record as the pipeline would build it for frame ``index`` of a 1280x720 RTSP camera."""
    captured_ns = 1_700_000_000_000_000_000 + index * 33_333_333
    key = f"rtsp://10.0.0.5:554/stream1@{captured_ns}"
    ts = captured_ns / 1e9
    dets = [
        Detection(0, "person", 0.873, (120.5, 80.25, 260.0, 410.75)),
        Detection(2, "car", 0.51, (700.0, 300.0, 1010.5, 520.0)),
    ]
    return LabelRecord(
        id=record_id(DEVICE, source, key),
        device_id=DEVICE,
        source=source,
        frame_index=index,
        frame_key=key,
        captured_at=iso_utc(ts),
        captured_ts=ts,
        width=1280,
        height=720,
        model=MODEL,
        inference_ms=11.7,
        detections=[DetectionRecord.from_detection(d, 1280, 720) for d in dets[: index % 3]],
    )


def frame_for(record: LabelRecord) -> Frame:
    return Frame(record.source, record.frame_index, FRAME_IMAGE, record.captured_ts, record.frame_key, live=True)


def mqtt_cfg(port: int, **kw: object) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, prefix=PREFIX, **kw)  # type: ignore[arg-type]


class Subscriber:
    """Records every message on ``topic`` with its QoS and retain flag (tests.helpers.Collector keeps no QoS)."""

    def __init__(self, port: int, topic: str = f"{PREFIX}/#") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "collector could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[mqtt.MQTTMessage]], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.messages), timeout)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic: str, timeout: float = 2.0) -> str | None:
    """The retained payload on ``topic`` as a new subscriber sees it (None if none arrives)."""
    c = Subscriber(port, topic)
    try:
        if not c.wait_for(lambda ms: any(m.retain for m in ms), timeout):
            return None  # none stored (a live message published just now does not count)
        return next(m for m in c.messages if m.retain).payload.decode()
    finally:
        c.close()


def wait_retained(port: int, topic: str, expected: str, timeout: float) -> str | None:
    """Poll until the retained value on ``topic`` is ``expected``; return the last value seen."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = retained(port, topic, timeout=0.5)
        if value == expected:
            break
        time.sleep(0.1)
    return value


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


class Relay:
    """TCP relay from ``port`` to the broker; ``cut()`` silently stops all traffic and refuses new links."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._cut = threading.Event()
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []

    def start(self) -> Relay:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if self._cut.is_set():
                if not data:
                    return
                continue  # swallow: neither side learns anything, like a dead link
            try:
                if data:
                    dst.sendall(data)
                else:
                    dst.shutdown(socket.SHUT_WR)
                    return
            except OSError:
                return

    def cut(self) -> None:
        self._cut.set()
        if self._listener is not None:
            self._listener.close()

    def close(self) -> None:
        self.cut()
        for s in self._socks:
            s.close()


@pytest.fixture
def schema() -> dict[str, object]:
    return load_schema()


def test_records_published_once_on_labels_topic_with_qos1_and_valid_schema(broker: Broker, schema: dict) -> None:
    collector = Subscriber(broker.port)
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        records = [make_record(src, i) for src in ("cam1", "yard") for i in range(25)]
        for rec in records:
            sink.write(rec, frame_for(rec))
        assert collector.wait_for(lambda ms: sum(m.topic.endswith("/labels") for m in ms) >= 50, 10)
        sink.flush()
        st = sink.status()
    finally:
        sink.close()
    time.sleep(0.2)  # nothing more may arrive: no duplicates
    collector.close()

    assert st["connected"] is True and st["broker"] == f"127.0.0.1:{broker.port}"
    assert st["published"] == 51 and st["acked"] == 51  # 50 records + the retained "online"
    assert st["pending"] == 0 and st["dropped"] == 0 and st["last_error"] is None
    assert st["last_publish_at"] is not None and abs(st["last_publish_at"] - time.time()) < 30

    by_id: dict[str, mqtt.MQTTMessage] = {}
    for msg in collector.messages:
        if not msg.topic.endswith("/labels"):
            continue
        doc = json.loads(msg.payload)
        jsonschema.validate(doc, schema)
        assert doc["id"] not in by_id, f"record {doc['id']} delivered twice"
        by_id[doc["id"]] = msg
        assert msg.topic == f"{PREFIX}/{DEVICE}/{doc['source']}/labels"
        assert msg.qos == 1 and not msg.retain
    assert set(by_id) == {r.id for r in records}
    sample = json.loads(by_id[records[2].id].payload)
    assert sample == records[2].to_dict()


def test_capture_to_puback_latency_is_measured_per_label(broker: Broker, caplog) -> None:
    """Each acknowledged label adds capture -> PUBACK to the percentiles in status() and the closing log line."""
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        assert sink.status()["puback_latency_n"] == 0 and sink.status()["puback_p99_ms"] is None
        for i in range(20):
            base = make_record("cam1", i)
            rec = LabelRecord(**{**base.__dict__, "captured_ts": time.time() - 0.05})  # captured 50 ms ago
            sink.write(rec, frame_for(rec))
        sink.flush()
        st = sink.status()
    finally:
        with caplog.at_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt"):
            sink.close()
    assert st["puback_latency_n"] == 20
    assert 50.0 <= st["puback_p50_ms"] <= st["puback_p95_ms"] <= st["puback_p99_ms"] < 5000.0
    assert "capture->PUBACK latency over the last 20 labels" in caplog.text


def test_device_and_source_status_are_retained_online_then_stopped(broker: Broker) -> None:
    status_topic = f"{PREFIX}/{DEVICE}/status"
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    try:
        assert wait_retained(broker.port, status_topic, "online", 5) == "online"
        sink.source_status("cam1", "reconnecting")
        sink.source_status("cam1", "online")
        sink.source_status("files", "finished")
        sink.flush()
        assert retained(broker.port, f"{PREFIX}/{DEVICE}/cam1/status") == "online"
        assert retained(broker.port, f"{PREFIX}/{DEVICE}/files/status") == "finished"
    finally:
        sink.close()
    assert sink.status()["connected"] is False
    assert sink.status()["pending"] == 0
    assert retained(broker.port, status_topic) == "stopped"
    sink.close()  # a second close is harmless


def test_a_close_long_after_the_stop_began_still_delivers_its_own_stopped_statuses(broker: Broker) -> None:
    """The stop's deadline starts at SIGTERM; the MQTT sink closes last, after the web page (which once took
    5 s to close a live view).  The close's own messages (each running source ``stopped``) still get their
    window instead of being left in the outbox with exit 75."""
    from edgelabel.edge.sinks.mqtt import STOP_DRAIN_S

    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    try:
        assert wait_retained(broker.port, f"{PREFIX}/{DEVICE}/status", "online", 5) == "online"
        sink.source_status("cam1", "online")
        sink.flush()
        sink.interrupt()  # SIGTERM: the stop's deadline starts now
        time.sleep(STOP_DRAIN_S + 0.5)  # ... and is spent by the time the sink closes
    finally:
        sink.close()
    assert sink.left_at_close == 0
    assert retained(broker.port, f"{PREFIX}/{DEVICE}/cam1/status") == "stopped"


def test_reconnect_republishes_device_and_source_status(broker: Broker, tmp_path: Path, caplog) -> None:
    """The broker restarts without persistence, losing every retained message: the sink restores them."""
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt")
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    restarted = Broker(tmp_path, port=broker.port)
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        sink.source_status("cam1", "online")
        sink.flush()
        broker.stop()
        assert wait_until(lambda: not sink.status()["connected"], 5)
        restarted.start()
        assert wait_retained(broker.port, f"{PREFIX}/{DEVICE}/status", "online", 10) == "online"
        assert wait_retained(broker.port, f"{PREFIX}/{DEVICE}/cam1/status", "online", 5) == "online"
        assert sink.status()["connected"] is True
    finally:
        sink.close()
        restarted.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"127.0.0.1:{broker.port}" in errors[0].getMessage()
    assert any("connected to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)


WILL_CHILD = """
import logging, sys, time
from edgelabel.edge.config import ConfigError, MqttConfig, TlsConfig
from edgelabel.edge.sinks.mqtt import MqttSink
logging.basicConfig(level=logging.INFO)
sink = MqttSink(MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), prefix="edgelabel", keepalive=5), sys.argv[2])
sink.open()
deadline = time.time() + 10
while not sink.status()["connected"] and time.time() < deadline:
    time.sleep(0.02)
sink.source_status("cam1", "online")
sink.flush()
print("READY" if sink.status()["connected"] else "NOT CONNECTED", flush=True)
time.sleep(60)
"""


def test_last_will_offline_when_the_process_is_killed(broker: Broker) -> None:
    device = "edge-will-01"
    status_topic = f"{PREFIX}/{device}/status"
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_CHILD, str(broker.port), device],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        assert retained(broker.port, status_topic) == "online"
        watcher = Subscriber(broker.port, status_topic)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert watcher.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), 12)
        watcher.close()
        assert retained(broker.port, status_topic) == "offline"
        assert retained(broker.port, f"{PREFIX}/{device}/cam1/status") == "online"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_last_will_offline_when_the_link_dies_silently(broker: Broker, caplog) -> None:
    """No FIN, no RST: the broker notices only by keepalive (1.5 x 5 s) and then publishes the will."""
    caplog.set_level(logging.ERROR, logger="edgelabel.edge.sinks.mqtt")
    relay = Relay(broker.port).start()
    status_topic = f"{PREFIX}/{DEVICE}/status"
    sink = MqttSink(mqtt_cfg(relay.port, keepalive=5), DEVICE)
    sink.open()
    try:
        assert wait_retained(broker.port, status_topic, "online", 5) == "online"
        watcher = Subscriber(broker.port, status_topic)
        relay.cut()
        t0 = time.monotonic()
        assert watcher.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), 12)
        assert time.monotonic() - t0 > 4  # the broker could only learn it by keepalive
        watcher.close()
        assert retained(broker.port, status_topic) == "offline"
        # the sink noticed too, and said so loudly
        assert wait_until(lambda: not sink.status()["connected"], 8)
        assert wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 5)
    finally:
        sink.close()
        relay.close()


def test_broker_down_at_start_queues_without_blocking_and_delivers_later(broker: Broker, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt")
    port = free_port()  # nothing listens here yet
    sink = MqttSink(mqtt_cfg(port), DEVICE)
    t0 = time.perf_counter()
    sink.open()
    records = [make_record("cam1", i) for i in range(100)]
    for rec in records:
        sink.write(rec, frame_for(rec))
    elapsed = time.perf_counter() - t0
    relay: Relay | None = None
    collector: Subscriber | None = None
    try:
        assert elapsed < 0.5, f"open + 100 writes took {elapsed:.3f} s with the broker down"
        assert wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 5)
        error = next(r for r in caplog.records if r.levelno == logging.ERROR).getMessage()
        assert f"127.0.0.1:{port}" in error and "is the broker running" in error and "mqtt.host/port" in error
        st = sink.status()
        assert st["connected"] is False and st["broker"] == f"127.0.0.1:{port}"
        # nothing is handed to the MQTT client while offline: all 100 wait in the outbox
        assert (st["published"], st["pending"], st["acked"], st["dropped"]) == (0, 100, 0, 0)
        assert st["last_error"]

        # the broker "comes up" on that port: subscribe first, then open the port
        collector = Subscriber(broker.port)
        relay = Relay(broker.port, port=port).start()
        assert collector.wait_for(lambda ms: sum(m.topic.endswith("/labels") for m in ms) >= 100, 15)
        assert wait_until(lambda: sink.status()["pending"] == 0, 5)
        st = sink.status()
        assert st["connected"] is True
        assert (st["published"], st["acked"], st["dropped"]) == (101, 101, 0)  # + the "online" status
        got = [json.loads(m.payload)["id"] for m in collector.on(f"{PREFIX}/{DEVICE}/cam1/labels")]
        assert sorted(got) == sorted(r.id for r in records) and all(m.qos == 1 for m in collector.messages)
        assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        sink.close()
        if collector:
            collector.close()
        if relay:
            relay.close()


def test_full_outbox_drops_oldest_and_offline_qos0_waits(caplog) -> None:
    """drop_oldest: the newest records are kept, every eviction is counted and logged; QoS 0 is not lost offline."""
    caplog.set_level(logging.WARNING)
    port = free_port()
    cfg = mqtt_cfg(port)
    cfg.outbox.max_messages = 10
    sink = MqttSink(cfg, DEVICE)  # never opened: nothing can be delivered
    records = [make_record("cam1", i) for i in range(15)]
    for rec in records:
        sink.write(rec, frame_for(rec))
    st = sink.status()
    assert (st["published"], st["pending"], st["dropped"]) == (0, 10, 5)
    assert st["drops"]["outbox_full"] == 5 and st["outbox"]["evicted"] == 5
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops and "max_messages=10" in drops[0] and "oldest" in drops[0]
    kept = [json.loads(m.payload)["id"] for m in sink._outbox.fetch(0, 100)]
    assert kept == [r.id for r in records[5:]]  # the oldest went, order kept

    qos0 = MqttSink(mqtt_cfg(port, qos=0), DEVICE)
    for i in range(3):
        rec = make_record("cam1", i)
        qos0.write(rec, frame_for(rec))
    assert qos0.status()["dropped"] == 0 and qos0.status()["pending"] == 3
    sink.close()
    qos0.close()


def test_outage_warning_repeats_with_the_backlog(monkeypatch, caplog) -> None:
    monkeypatch.setattr("edgelabel.edge.sinks.mqtt.WARN_INTERVAL", 0.3)
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.mqtt")
    sink = MqttSink(mqtt_cfg(free_port()), DEVICE)
    sink.open()
    try:
        for i in range(5):
            rec = make_record("cam1", i)
            sink.write(rec, frame_for(rec))
        assert wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 5)
        time.sleep(0.35)
        rec = make_record("cam1", 5)
        sink.write(rec, frame_for(rec))

        def repeated() -> bool:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            return any("still unreachable" in w and "6 message(s) waiting" in w for w in warnings)

        assert wait_until(repeated, 3), [r.getMessage() for r in caplog.records]
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # ERROR once per outage
    finally:
        sink.close()


def test_unreadable_tls_files_fail_start_up_with_the_field_named(tmp_path: Path) -> None:
    cfg = mqtt_cfg(8883, tls=TlsConfig(ca=str(tmp_path / "missing-ca.pem")))
    with pytest.raises(ConfigError, match=r"mqtt\.tls"):
        MqttSink(cfg, DEVICE)


# ---------------------------------------------------------------------- outbox, events, stats, snapshots, MQTT 5

EVENT_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "event.v1.json").read_text()))
STATS_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "stats.v1.json").read_text()))


def storage_frame(record: LabelRecord) -> Frame:
    return Frame(record.source, record.frame_index, FRAME_IMAGE, record.captured_ts, record.frame_key, live=False)


def label_ids(sub: Subscriber) -> list[str]:
    return [json.loads(m.payload)["id"] for m in sub.messages if m.topic.endswith("/labels")]


def test_outbox_survives_a_sink_restart_and_replays_in_order(broker: Broker, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks")
    port = free_port()  # the broker is "down": nothing listens here
    first = MqttSink(mqtt_cfg(port), DEVICE, state_dir=tmp_path)
    first.open()
    records = [make_record(src, i) for i in range(30) for src in ("cam1", "yard")]
    for rec in records:
        first.write(rec, storage_frame(rec))
    first.close()
    assert (tmp_path / "outbox.sqlite").is_file()
    assert any("stay in the outbox" in r.getMessage() for r in caplog.records)

    collector = Subscriber(broker.port)
    second = MqttSink(mqtt_cfg(broker.port), DEVICE, state_dir=tmp_path)
    assert second.status()["pending"] == 60
    second.open()
    try:
        assert collector.wait_for(lambda ms: sum(m.topic.endswith("/labels") for m in ms) >= 60, 10)
        second.flush()
        assert second.status()["pending"] == 0 and second.status()["acked"] >= 60
    finally:
        second.close()
        collector.close()
    assert label_ids(collector) == [r.id for r in records]  # exactly once, in the original order


def test_events_are_published_after_their_label_with_ids_and_a_valid_schema(broker: Broker) -> None:
    from edgelabel.edge.config import TrackingConfig
    from edgelabel.edge.tracking import Tracker

    collector = Subscriber(broker.port)
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    tracker = Tracker("cam1", TrackingConfig(min_hits=2, update_interval=0.0))
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        for i in range(6):
            rec = make_record("cam1", 2)  # two detections each frame
            rec.frame_index = i
            rec.id = record_id(DEVICE, "cam1", f"k{i}")
            dets = [Detection(d.class_id, d.label, d.score, tuple(d.box)) for d in rec.detections]  # type: ignore[arg-type]
            ids, events = tracker.update(dets, rec.captured_ts + i * 0.1, rec.id, i)
            sink.write(rec, frame_for(rec))
            sink.events(events)
        sink.events(tracker.finish(rec.captured_ts + 1))
        assert collector.wait_for(lambda ms: sum(m.topic.endswith("/events") for m in ms) >= 2 + 8 + 2, 10)
    finally:
        sink.close()
        collector.close()
    events = [json.loads(m.payload) for m in collector.messages if m.topic == f"{PREFIX}/{DEVICE}/events"]
    assert [e["type"] for e in events] == ["new", "new"] + ["update"] * 8 + ["end", "end"]
    for e in events:
        assert not sorted(EVENT_VALIDATOR.iter_errors(e), key=str)
        assert e["device_id"] == DEVICE and e["source"] == "cam1"
    assert len({e["id"] for e in events}) == len(events)
    # every event comes after the label record it refers to
    order = [json.loads(m.payload)["id"] if m.topic.endswith("/labels") else ("ev", json.loads(m.payload)["record_id"])
             for m in collector.messages if m.topic.endswith(("/labels", "/events"))]
    for pos, item in enumerate(order):
        if isinstance(item, tuple):
            assert item[1] in order[:pos]


def test_stats_message_from_the_pipeline_snapshot(broker: Broker) -> None:
    collector = Subscriber(broker.port)
    sink = MqttSink(mqtt_cfg(broker.port), DEVICE)
    sink.open()
    snapshot = {
        "device_id": DEVICE, "uptime_s": 12.5, "running": True, "frames": 40, "detections": 55, "rejected": 1,
        "inference_ms_avg": 14.2, "last_error": None,
        "sources": {
            "cam1": {"name": "cam1", "status": "online", "live": True, "frames_in": 300, "frames_dropped": 7,
                     "frames_skipped_fps": 250, "rejected": 0, "reconnects": 2, "last_frame_at": None, "fps_in": 9.8,
                     "total": None, "last_error": None},
            "files": {"name": "files", "status": "finished", "live": False, "frames_in": 10, "frames_dropped": 0,
                      "frames_skipped_fps": 0, "rejected": 1, "reconnects": 0, "last_frame_at": None, "fps_in": 0.0,
                      "total": 11, "last_error": None},
        },
    }
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        for i in range(10):
            rec = make_record("cam1", i)
            sink.write(rec, frame_for(rec))
        sink.stats(snapshot)
        assert collector.wait_for(lambda ms: any(m.topic.endswith("/stats") for m in ms), 5)
    finally:
        sink.close()
        collector.close()
    (msg,) = collector.on(f"{PREFIX}/{DEVICE}/stats")
    doc = json.loads(msg.payload)
    assert not sorted(STATS_VALIDATOR.iter_errors(doc), key=str), sorted(STATS_VALIDATOR.iter_errors(doc), key=str)[0]
    assert msg.qos == 0 and not msg.retain
    assert doc["device_id"] == DEVICE and doc["uptime_s"] == 12.5 and doc["frames"] == 40
    cam = doc["sources"]["cam1"]
    assert cam["frames_out"] == 10 and cam["fps_out"] > 0 and cam["fps_in"] == 9.8 and cam["frames_dropped"] == 7
    assert cam["inference_ms"] == pytest.approx(11.7)
    assert doc["sources"]["files"]["frames_out"] == 0 and doc["sources"]["files"]["inference_ms"] is None
    assert doc["drops"] == {"hub": 7, "outbox_full": 0, "outbox_expired": 0, "outbox_refused": 0, "mqtt_rejected": 0,
                            "outbox_error": 0, "outbox_lost": 0, "ledger_lost": 0, "dataset_index_lost": 0}
    assert doc["outbox"]["policy"] == "drop_oldest" and doc["mqtt"]["connected"] is True


def test_snapshot_is_a_retained_annotated_jpeg_rate_limited_per_source(broker: Broker) -> None:
    import cv2

    from edgelabel.edge.config import SnapshotConfig

    topic = f"{PREFIX}/{DEVICE}/cam1/snapshot"
    cfg = mqtt_cfg(broker.port, snapshot=SnapshotConfig(enabled=True, interval=0.5, max_width=64))
    sink = MqttSink(cfg, DEVICE)
    sink.open()
    live = Subscriber(broker.port, topic)
    try:
        assert wait_until(lambda: sink.status()["connected"], 5)
        image = np.full((720, 1280, 3), 90, np.uint8)
        for i in range(10):  # ten frames within 0.5 s: one snapshot
            rec = make_record("cam1", 2)
            sink.write(rec, Frame("cam1", i, image, rec.captured_ts, f"k{i}", live=True))
        assert live.wait_for(lambda ms: bool(ms), 3)
        time.sleep(0.2)
        assert len(live.on(topic)) == 1
        late = Subscriber(broker.port, topic)  # a dashboard that opens later still gets the latest frame
        assert late.wait_for(lambda ms: bool(ms), 3) and late.messages[0].retain
        jpeg = late.messages[0].payload
        late.close()
    finally:
        sink.close()
        live.close()
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (36, 64, 3)  # downscaled to max_width
    assert (img != 90).any()  # the boxes are drawn


def test_mqtt5_publishes_with_json_content_type_and_message_expiry(broker: Broker) -> None:
    got: list[mqtt.MQTTMessage] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"v5-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda c, u, m: got.append(m)
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(f"{PREFIX}/#", qos=1)
    sub.loop_start()
    assert subscribed.wait(5)
    cfg = mqtt_cfg(broker.port, protocol="5")
    cfg.outbox.max_age = 3600
    sink = MqttSink(cfg, DEVICE)
    sink.open()
    try:
        for i in range(5):
            rec = make_record("cam1", i)
            sink.write(rec, storage_frame(rec))
        assert wait_until(lambda: sum(m.topic.endswith("/labels") for m in got) >= 5, 10)
        assert sink.status()["protocol"] == "5"
    finally:
        sink.close()
        sub.disconnect()
        sub.loop_stop()
    labels = [m for m in got if m.topic.endswith("/labels")]
    assert [json.loads(m.payload)["frame_index"] for m in labels] == list(range(5))
    props = labels[0].properties
    assert props is not None and props.ContentType == "application/json"
    assert 3500 < props.MessageExpiryInterval <= 3600


def test_stop_capture_blocks_the_writer_until_the_broker_takes_messages(broker: Broker) -> None:
    port = free_port()
    cfg = mqtt_cfg(port)
    cfg.outbox.max_messages, cfg.outbox.policy = 3, "stop_capture"
    cfg.reconnect.initial = cfg.reconnect.max = 0.2
    sink = MqttSink(cfg, DEVICE)
    sink.open()
    records = [make_record("cam1", i) for i in range(6)]
    done = threading.Event()

    def pipeline() -> None:
        for rec in records:
            sink.write(rec, storage_frame(rec))
        done.set()

    collector = Subscriber(broker.port)
    relay: Relay | None = None
    try:
        threading.Thread(target=pipeline, daemon=True).start()
        assert not done.wait(1.0), "the 4th write must wait while the outbox is full"
        st = sink.status()
        assert st["pending"] == 3 and st["outbox"]["blocked"] is True and st["dropped"] == 0
        relay = Relay(broker.port, port=port).start()  # the broker comes up: the writer goes on
        assert done.wait(10)
        assert collector.wait_for(lambda ms: sum(m.topic.endswith("/labels") for m in ms) >= 6, 10)
        assert sink.status()["dropped"] == 0
    finally:
        sink.close()
        collector.close()
        if relay:
            relay.close()
    assert label_ids(collector) == [r.id for r in records]


def test_stop_capture_writer_is_released_by_close_and_the_refusal_counted(caplog) -> None:
    caplog.set_level(logging.WARNING)
    cfg = mqtt_cfg(free_port())
    cfg.outbox.max_messages, cfg.outbox.policy = 2, "stop_capture"
    sink = MqttSink(cfg, DEVICE)
    for i in range(2):
        rec = make_record("cam1", i)
        sink.write(rec, storage_frame(rec))
    released = threading.Event()
    refused: list[Exception] = []
    rec = make_record("cam1", 2)

    def blocked_write() -> None:
        try:
            sink.write(rec, storage_frame(rec))
        except SinkRefused as exc:  # the pipeline then leaves the frame for the next start
            refused.append(exc)
        released.set()

    threading.Thread(target=blocked_write, daemon=True).start()
    assert not released.wait(0.5)
    sink.close()
    assert released.wait(3)
    assert len(refused) == 1
    assert sink.status()["drops"]["outbox_refused"] == 1 and sink.status()["dropped"] == 1
    assert any("stop_capture" in r.getMessage() for r in caplog.records)


def test_a_failing_outbox_never_stops_labeling_and_is_counted(monkeypatch, caplog) -> None:
    """A full disk is not a loss: the pipeline holds the record and retries it (edge.pipeline._retry_storage),
    so it is not counted as dropped on every try.  Any other failure to store is a drop, counted once."""
    import sqlite3

    caplog.set_level(logging.ERROR, logger="edgelabel.edge.sinks.mqtt")
    sink = MqttSink(mqtt_cfg(free_port()), DEVICE)

    def disk_full(*a: object, **kw: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def broken(*a: object, **kw: object) -> None:
        raise RuntimeError("the outbox is in a state nobody expected")

    rec = make_record("cam1", 0)
    monkeypatch.setattr(sink._outbox, "put", disk_full)
    for _ in range(3):  # three tries of one waiting record
        with pytest.raises(SinkRefused):  # reported to the pipeline, which does not mark the frame done
            sink.write(rec, storage_frame(rec))
    st = sink.status()
    assert st["dropped"] == 0 and "disk is full" in st["last_error"]
    assert any("held and retried" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(sink._outbox, "put", broken)
    with pytest.raises(SinkRefused):
        sink.write(rec, storage_frame(rec))
    st = sink.status()
    assert st["dropped"] == 1 and st["drops"]["outbox_error"] == 1 and "nobody expected" in st["last_error"]
    assert any("labeled again on the next start" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    sink.close()


def test_password_file_is_read_and_misconfigurations_name_the_field(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-the-file\n")
    sink = MqttSink(mqtt_cfg(1883, username="edge", password_file=str(pw)), DEVICE)
    assert sink._client._password == b"from-the-file"  # newline stripped
    sink.close()
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read") as err:
        MqttSink(mqtt_cfg(1883, username="edge", password_file=str(tmp_path / "missing")), DEVICE)
    assert "from-the-file" not in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        MqttSink(mqtt_cfg(1883, username="edge", password="x", password_file=str(pw)), DEVICE)
    with pytest.raises(ConfigError, match="needs mqtt.username"):
        MqttSink(mqtt_cfg(1883, password="x"), DEVICE)
    with pytest.raises(ConfigError, match="both cert and key"):
        MqttSink(mqtt_cfg(8883, tls=TlsConfig(cert=str(pw))), DEVICE)

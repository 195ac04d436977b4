"""A message the broker refuses for good does not block delivery: real Mosquitto with max_packet_size and an ACL.

Before, the client sent the same head-of-line message again on every reconnect, for ever (0 labels delivered
after it), and the log blamed an unreachable broker.  Now the refused message is set aside in the outbox's
dead-letter table (counted, alarmed, re-sendable) and the next messages go through, on MQTT 3.1.1 (the
disconnect-right-after-publishing pattern) and MQTT 5 (reason codes, the CONNACK maximum packet size).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest

from edgelabel.edge.health import device_alarms, outbox_alarms
from edgelabel.edge.records import DetectionRecord
from edgelabel.edge.sinks import outbox as outbox_mod
from edgelabel.edge.sinks.mqtt import MqttSink
from edgelabel.engines.base import Detection
from tests.conftest import Broker, free_port
from tests.test_mqtt_faults import HAVE_MOSQUITTO, ConfBroker
from tests.test_mqtt_sink import DEVICE, PREFIX, Subscriber, make_record, mqtt_cfg, storage_frame, wait_until

pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")
N = 30
BIG = 10  # the index of the record too large for the broker


def big_record(index: int):
    rec = make_record("cam1", index)
    det = DetectionRecord.from_detection(Detection(0, "person", 0.9, (10.0, 10.0, 50.0, 90.0)), 1280, 720)
    return dataclasses.replace(rec, detections=[det] * 200)


def labels(sub: Subscriber) -> list[int]:
    """Frame indexes received, de-duplicated as a consumer does (QoS 1 is at least once: the broker's reset
    of the connection discards PUBACKs it had sent, so the messages just before the refused one come twice)."""
    got = [json.loads(m.payload)["frame_index"] for m in sub.messages if m.topic.endswith("/labels")]
    return list(dict.fromkeys(got))


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_record_over_the_brokers_max_packet_size_is_set_aside_and_the_rest_delivered(
        tmp_path: Path, protocol: str, caplog, capsys) -> None:
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks")
    broker = ConfBroker(tmp_path, "allow_anonymous true\npersistence false\nmax_packet_size 6000\n").start()
    cfg = mqtt_cfg(broker.port, protocol=protocol)
    cfg.reconnect.initial = cfg.reconnect.max = 0.2
    sink = MqttSink(cfg, DEVICE, state_dir=tmp_path)
    sub = Subscriber(broker.port, f"{PREFIX}/{DEVICE}/+/labels")
    try:
        sink.open()
        records = [big_record(i) if i == BIG else make_record("cam1", i) for i in range(N)]
        assert len(records[BIG].to_json()) > 6000
        for rec in records:
            sink.write(rec, storage_frame(rec))
        assert sub.wait_for(lambda ms: len(labels(sub)) >= N - 1, 30), f"delivered {labels(sub)}"
        assert labels(sub) == [i for i in range(N) if i != BIG]  # in order, only the refused one missing
        assert wait_until(lambda: sink.status()["pending"] == 0, 10)
        st = sink.status()
        assert st["dead_letter"] == 1 and st["outbox"]["dead_letter"] == 1
        assert st["published"] == st["acked"] + st["qos0"] + st["broker_refused"] + st["unacked"]
        alarms = device_alarms({"sinks": {"mqtt": st}})
        assert [a["id"] for a in alarms] == ["outbox_dead_letter"]
        assert "requeue" in alarms[0]["message"]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "refused message" in r.getMessage()]
        assert len(errors) == 1 and f"{PREFIX}/{DEVICE}/cam1/labels" in errors[0]
        assert f"{len(records[BIG].to_json().encode())} bytes" in errors[0] and "max_packet_size" in errors[0]
        if protocol == "5":  # the broker told its limit at CONNACK: warned at connect, never sent
            assert any("at most 6000 bytes" in r.getMessage() for r in caplog.records)
    finally:
        sink.close()
        sub.close()
        broker.stop()
    # the operator raises the limit and sends it again
    box = outbox_mod.Outbox(tmp_path / cfg.outbox.path)
    [dead] = box.dead_letters()
    assert json.loads(dead["payload"])["frame_index"] == BIG and dead["topic"].endswith("/cam1/labels")
    box.close()
    capsys.readouterr()
    assert outbox_mod.main(["export", str(tmp_path / cfg.outbox.path)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    exported = json.loads(line)
    assert json.loads(exported["payload"])["frame_index"] == BIG and exported["encoding"] == "utf-8"
    assert exported["reason"] and exported["topic"] == dead["topic"]
    assert outbox_mod.main(["requeue", str(tmp_path / cfg.outbox.path)]) == 0
    broker2 = Broker(tmp_path).start()
    sink2 = MqttSink(mqtt_cfg(broker2.port, protocol=protocol), DEVICE, state_dir=tmp_path)
    sub2 = Subscriber(broker2.port, f"{PREFIX}/{DEVICE}/+/labels")
    try:
        sink2.open()
        assert sub2.wait_for(lambda ms: len(ms) >= 1, 15)
        assert labels(sub2) == [BIG]
        assert sink2.status()["dead_letter"] == 0
    finally:
        sink2.close()
        sub2.close()
        broker2.stop()


def test_a_topic_the_acl_denies_is_set_aside_on_mqtt5_and_other_sources_flow(tmp_path: Path, caplog) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {PREFIX}/#\ntopic deny {PREFIX}/{DEVICE}/cam2/labels\n")
    broker = ConfBroker(tmp_path, f"allow_anonymous true\npersistence false\nacl_file {acl}\n").start()
    cfg = mqtt_cfg(broker.port, protocol="5")
    sink = MqttSink(cfg, DEVICE, state_dir=tmp_path)
    sub = Subscriber(broker.port, f"{PREFIX}/{DEVICE}/+/labels")
    try:
        sink.open()
        for i in range(10):
            rec = make_record("cam2" if i in (3, 4) else "cam1", i)
            sink.write(rec, storage_frame(rec))
        assert sub.wait_for(lambda ms: len(ms) >= 8, 15)
        assert wait_until(lambda: sink.status()["dead_letter"] == 2, 10)
        assert labels(sub) == [0, 1, 2, 5, 6, 7, 8, 9]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "refused message" in r.getMessage()]
        assert errors and "ACL" in errors[0] and f"{PREFIX}/{DEVICE}/cam2/labels" in errors[0]
        assert "is the broker running" not in caplog.text
    finally:
        sink.close()
        sub.close()
        broker.stop()


def test_a_head_message_that_waits_too_long_raises_an_alarm_that_clears_on_delivery(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the head message cannot be delivered
    cfg = mqtt_cfg(port)
    cfg.reconnect.initial = cfg.reconnect.max = 0.2
    sink = MqttSink(cfg, DEVICE, state_dir=tmp_path)
    broker = None
    try:
        sink.open()
        rec = make_record("cam1", 0)
        sink.write(rec, storage_frame(rec))
        time.sleep(0.6)
        snap = {"sinks": {"mqtt": sink.status()}}
        [alarm] = outbox_alarms(snap, stuck_after=0.5)
        assert alarm["id"] == "outbox_stuck" and alarm["severity"] == "error" and "1 message(s)" in alarm["message"]
        assert outbox_alarms(snap) == []  # the default threshold is minutes, not seconds
        broker = Broker(tmp_path, port).start()
        assert wait_until(lambda: sink.status()["pending"] == 0, 15)
        assert outbox_alarms({"sinks": {"mqtt": sink.status()}}, stuck_after=0.5) == []
    finally:
        sink.close()
        if broker is not None:
            broker.stop()


def test_a_record_over_max_message_bytes_carries_its_best_detections_and_says_so(broker: Broker, tmp_path: Path) -> None:
    cfg = mqtt_cfg(broker.port, max_message_bytes=4096)
    sink = MqttSink(cfg, DEVICE, state_dir=tmp_path)
    sub = Subscriber(broker.port, f"{PREFIX}/{DEVICE}/+/labels")
    try:
        sink.open()
        rec = big_record(0)
        dets = [dataclasses.replace(d, score=round(0.3 + i / 1000, 5)) for i, d in enumerate(rec.detections)]
        rec = dataclasses.replace(rec, detections=dets)
        assert len(rec.to_json()) > 4096
        sink.write(rec, storage_frame(rec))
        assert sub.wait_for(lambda ms: len(ms) >= 1, 10)
        msg = sub.messages[0]
        doc = json.loads(msg.payload)
        kept = doc["extra"]["mqtt_capped"]["kept"]
        assert len(msg.payload) <= 4096 and doc["extra"]["mqtt_capped"]["detections"] == 200
        assert 0 < kept == len(doc["detections"]) < 200
        assert [d["score"] for d in doc["detections"]] == [d.score for d in dets[200 - kept:]]  # the best, in order
        assert sink.status()["capped"] == 1 and sink.status()["dead_letter"] == 0
    finally:
        sink.close()
        sub.close()

"""Delivery promises of the daemon as a real process: real Mosquitto, real model, real footage.

What a consumer relies on and these tests check on the wire: a source's ``finished`` comes after its
last label; a clean stop leaves no source looking ``online``; the closing line's counters add up; a
finite job does not exit with labels still in the outbox while the broker may come back; a TLS
failure is named as such.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import cv2
import pytest

from tests.conftest import Broker
from tests.helpers import Collector, edgelabel, run_edgelabel

DEVICE = "deliv-dev"
PREFIX = "el"
HAVE_MOSQUITTO = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")


def short_video(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of a real clip, re-encoded (a shorter job, same footage)."""
    cap = cv2.VideoCapture(str(src))
    ok, img = cap.read()
    assert ok, f"cannot read {src}"
    h, w = img.shape[:2]
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
    n = 0
    while ok and n < frames:
        out.write(img)
        n += 1
        ok, img = cap.read()
    out.release()
    cap.release()
    return dst


def write_config(tmp_path: Path, assets: Path, port: int, sources: dict[str, Any], **mqtt_extra: Any) -> Path:
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources,
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": PREFIX, "qos": 1,
                 "reconnect": {"initial": 0.2, "max": 0.5}, **mqtt_extra},
        "dataset": {"enabled": False},
    }
    path = tmp_path / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def image_folder(tmp_path: Path, assets: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for img in sorted((assets / "images").glob("*.jpg")):
        shutil.copy(img, folder / img.name)
    return folder


def test_finished_follows_the_last_label_of_its_source(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """Every label of a video and of a folder reaches the broker before that source's ``finished``."""
    clip = short_video(assets / "videos" / "cars.mp4", tmp_path / "cars-40.mp4", 40)
    folder = image_folder(tmp_path, assets)
    n_images = len(list(folder.iterdir()))
    col = Collector(broker.port, f"{PREFIX}/#")
    cfg = write_config(tmp_path, assets, broker.port, {"clip": {"uri": str(clip)}, "photos": {"uri": str(folder)}})
    try:
        res = run_edgelabel("run", "-c", str(cfg), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"stopped", 10)
        with col._lock:
            wire = [(t, p) for t, p, _ in col.messages]
    finally:
        col.close()
    for source, expected in (("clip", 40), ("photos", n_images)):
        labels = [i for i, (t, _) in enumerate(wire) if t == f"{PREFIX}/{DEVICE}/{source}/labels"]
        finished = [i for i, (t, p) in enumerate(wire) if t == f"{PREFIX}/{DEVICE}/{source}/status" and p == b"finished"]
        assert len(labels) == expected, f"{source}: {len(labels)}/{expected} labels"
        assert len(finished) == 1, f"{source}: {len(finished)} 'finished' messages"
        late = [i for i in labels if i > finished[0]]
        assert not late, f"{source}: {len(late)} label(s) arrived after its 'finished'"


CLOSED = re.compile(r"MQTT: closed \((\d+) published = (\d+) acknowledged \+ (\d+) QoS 0 .*?\+ (\d+) refused by the broker "
                    r"\+ (\d+) unacknowledged; (\d+) dropped, (\d+) left in the outbox\)")


def test_closing_counters_reconcile_after_a_clean_run(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """published = acknowledged + QoS 0 + refused + unacknowledged, and a clean run leaves nothing unaccounted."""
    folder = image_folder(tmp_path, assets)
    col = Collector(broker.port, f"{PREFIX}/#")
    cfg = write_config(tmp_path, assets, broker.port, {"photos": {"uri": str(folder)}})
    try:
        res = run_edgelabel("run", "-c", str(cfg), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"stopped", 10)
        with col._lock:
            qos0_topics = [t for t, _, _ in col.messages if t.endswith(("/stats", "/snapshot"))]
    finally:
        col.close()
    found = CLOSED.search(res.stderr)
    assert found, "no closing line with the reconciled counters:\n" + res.stderr[-2000:]
    published, acked, qos0, refused, unacked, dropped, left = map(int, found.groups())
    assert published == acked + qos0 + refused + unacked
    assert (refused, unacked, dropped, left) == (0, 0, 0, 0)
    assert qos0 == len(qos0_topics) >= 1  # the final stats message: QoS 0 has no acknowledgement


def retained_statuses(port: int, sources: list[str]) -> dict[str, bytes | None]:
    """What a subscriber arriving now reads on the device and source status topics (retained values)."""
    late = Collector(port, f"{PREFIX}/{DEVICE}/#")
    try:
        topics = {"device": f"{PREFIX}/{DEVICE}/status", **{s: f"{PREFIX}/{DEVICE}/{s}/status" for s in sources}}
        late.wait_for(lambda: all(late.last(t) is not None for t in topics.values()), 3)
        return {name: late.last(t) for name, t in topics.items()}
    finally:
        late.close()


def test_clean_stop_leaves_no_source_online(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """SIGTERM: every running source's retained status becomes ``stopped``; a finished one keeps ``finished``."""
    folder = image_folder(tmp_path, assets)
    sources = {"cam": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5},
               "photos": {"uri": str(folder)}}
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(write_config(tmp_path, assets, broker.port, sources)))
    try:
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/photos/status") == b"finished"
                            and len(col.on("/cam/labels")) >= 3, 60), "no labels from the looping video"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert proc.returncode == 0, err[-3000:]
    assert retained_statuses(broker.port, ["cam", "photos"]) == {
        "device": b"stopped", "cam": b"stopped", "photos": b"finished"}


def test_after_kill_9_the_device_last_will_marks_source_statuses_stale(tmp_path: Path, assets: Path,
                                                                       broker: Broker) -> None:
    """kill -9 cannot update the sources: they keep ``online`` and the device's ``offline`` (Last Will) wins.

    docs/mqtt.md tells consumers to read a source's status only while the device is ``online``; the next
    start publishes every source's state again.
    """
    sources = {"cam": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5}}
    cfg = write_config(tmp_path, assets, broker.port, sources, keepalive=5)
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert col.wait_for(lambda: len(col.on("/cam/labels")) >= 3, 60), "no labels from the looping video"
        proc.kill()
        proc.wait(10)
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"offline", 15)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert retained_statuses(broker.port, ["cam"]) == {"device": b"offline", "cam": b"online"}
    # the next start and a clean stop put things right
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert col.wait_for(lambda: len(col.on("/cam/labels")) >= 1 and col.last(f"{PREFIX}/{DEVICE}/status") == b"online", 60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert proc.returncode == 0, err[-3000:]
    assert retained_statuses(broker.port, ["cam"]) == {"device": b"stopped", "cam": b"stopped"}

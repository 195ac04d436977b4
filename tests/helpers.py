"""Test helpers: an MQTT collector and a way to run the daemon as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgelabel.edge.frame import Frame
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id

ROOT = Path(__file__).resolve().parent.parent
#: the classes and model of the hand-made label records below (the first 8 COCO classes, yolo11n_int8)
NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]
MODEL = ModelInfo("yolo11n_int8", "0" * 64, "yolov8", "onnxruntime", "CPUExecutionProvider", "int8", (640, 640))


def label_record(frame: Frame, dets: list[tuple[int, float, tuple[float, float, float, float]]],
                 device: str) -> LabelRecord:
    """The record the pipeline would build for ``frame`` with ``dets`` as (class id, score, xyxy box)."""
    w, h = frame.width, frame.height
    return LabelRecord(
        id=record_id(device, frame.source, frame.key), device_id=device, source=frame.source, frame_index=frame.index,
        frame_key=frame.key, captured_at=iso_utc(frame.captured_at), captured_ts=frame.captured_at, width=w, height=h,
        model=MODEL, inference_ms=5.0,
        detections=[DetectionRecord(c, NAMES[c], s, list(b), [b[0] / w, b[1] / h, b[2] / w, b[3] / h]) for c, s, b in dets])


class Collector:
    """Subscribes to everything on a broker and keeps every message received."""

    def __init__(self, port: int, topic: str = "#") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"collector-{os.getpid()}-{time.time_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("collector could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def labels(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/labels")]

    def last(self, topic: str) -> bytes | None:
        with self._lock:
            found = [p for t, p, _ in self.messages if t == topic]
        return found[-1] if found else None

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def edgelabel(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``edgelabel ARGS`` as a separate process (the real console entry point's module)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-m", "edgelabel.edge.cli", *args],
        cwd=kw.pop("cwd", ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_edgelabel(*args: str, timeout: float = 120.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = edgelabel(*args, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"edgelabel {' '.join(args)} did not finish in {timeout} s\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

"""Shared by the ``faults`` tests (tests/test_faults_*.py): the daemon as a process, probes, measurements.

No tests here.  Every fault test records what it measured with :func:`measure`: the figures go to
the test's output (``pytest -m faults -rP`` shows them) and, one JSON object per line, to
``$EDGELABEL_ARTIFACTS/faults.jsonl`` when that variable is set; RELIABILITY.md quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import ROOT

DEVICE = "fault-dev"  # the same device and prefix as tests/test_mqtt_faults.py, whose consumer helper is reused
PREFIX = "el"
HAVE_MOSQUITTO = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def measure(test: str, **figures: Any) -> dict[str, Any]:
    """Record a fault test's measured outcome (printed, and appended to $EDGELABEL_ARTIFACTS/faults.jsonl)."""
    doc = {"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    line = json.dumps(doc, sort_keys=False, default=str)
    print(f"MEASURED {line}")
    out = os.environ.get("EDGELABEL_ARTIFACTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "faults.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return doc


def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def write_config(tmp: Path, port: int, sources: dict[str, Any], *, mqtt_extra: dict[str, Any] | None = None,
                 dataset: dict[str, Any] | None = None, **extra: Any) -> Path:
    """A daemon config for the fault tests (YOLOX-nano, MQTT on the test's broker; JSON is YAML)."""
    from tests.conftest import ASSETS

    cfg = {
        "device_id": DEVICE,
        "state_dir": str(tmp / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3, "threads": 1},
        "sources": sources,
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": PREFIX, "qos": 1, "keepalive": 5,
                 "reconnect": {"initial": 0.3, "max": 2}, "stats_interval": 1, **(mqtt_extra or {})},
        "dataset": dataset if dataset is not None else {"enabled": False},
        **extra,
    }
    path = tmp / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))
    return path


class DaemonProc:
    """``edgelabel run -c CONFIG`` as a real process; its log is read continuously (a full pipe would stall it)."""

    def __init__(self, config: Path, *, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "edgelabel.edge.cli", "run", "-c", str(config)],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no handler, no DISCONNECT."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the daemon did not stop within {timeout} s\n{self.log()[-4000:]}") from None
        self._reader.join(5)
        return code

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the daemon did not finish within {timeout} s\n{self.log()[-4000:]}") from None
        self._reader.join(5)
        return code

    def ensure_dead(self) -> None:
        if self.alive():
            self.kill()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def sqlite_check(path: Path) -> str:
    """``PRAGMA integrity_check`` of a database file (after its writer died); 'ok' when sound."""
    with sqlite3.connect(path, timeout=5) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def sqlite_scalar(path: Path, sql: str) -> Any:
    """One value read beside a running writer (read-only, WAL); None when the file or table is not there yet."""
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
            row = db.execute(sql).fetchone()
            return row[0] if row else None
    except sqlite3.Error:
        return None


class TimedCollector:
    """Subscribes to ``<prefix>/#`` and keeps every message with its arrival time (monotonic)."""

    def __init__(self, port: int, topic: str = f"{PREFIX}/#") -> None:
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"timed-{os.getpid()}-{time.time_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("collector could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), msg.topic, msg.payload, bool(msg.retain)))

    def on(self, suffix: str) -> list[tuple[float, bytes]]:
        with self._lock:
            return [(t, p) for t, topic, p, _ in self.messages if topic.endswith(suffix)]

    def labels(self, source: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        suffix = f"/{source}/labels" if source else "/labels"
        return [(t, json.loads(p)) for t, p in self.on(suffix)]

    def last(self, suffix: str) -> bytes | None:
        found = self.on(suffix)
        return found[-1][1] if found else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every stored image and label file under a dataset root (relative path -> content)."""
    out: dict[str, bytes] = {}
    for sub in ("images", "labels"):
        base = root / sub
        if base.is_dir():
            for p in base.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    out[str(p.relative_to(root))] = p.read_bytes()
    return out

"""The daemon around the pipeline: systemd notify + watchdog, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from edgelabel.edge.config import config_from_dict
from edgelabel.edge.daemon import run_daemon
from edgelabel.edge.health import device_alarms
from edgelabel.edge.notify import Notifier
from edgelabel.edge.pipeline import Pipeline, load_model
from edgelabel.edge.sinks.base import Sink
from tests.helpers import Collector, edgelabel


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, text: str) -> list[float]:
        return [t for t, m in list(self.messages) if m == text]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


class StallingDetector:
    """Wraps a real detector; ``infer`` blocks once ``stall`` is set (a hung engine)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.stall = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def infer(self, tensor):
        if self.stall.is_set():
            self.release.wait(60)
        return self._inner.infer(tensor)


def _cfg(tmp_path: Path, assets: Path, **over) -> dict:
    data = {
        "device_id": "dmn",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox"},
        "sources": {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 20}},
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
    }
    data.update(over)
    return data


def test_ready_watchdog_only_while_progress_and_stopping(tmp_path, assets, monkeypatch):
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = config_from_dict(_cfg(tmp_path, assets))
    stalling = StallingDetector(load_model(cfg))
    holder: dict = {}

    def factory(c, **kw):
        holder["p"] = Pipeline(c, detector=stalling, **kw)
        return holder["p"]

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        r=run_daemon(cfg, notifier=Notifier(), pipeline_factory=factory, install_signals=False)))
    t.start()
    try:
        deadline = time.time() + 30
        while not sock.times("READY=1") and time.time() < deadline:
            time.sleep(0.05)
        assert sock.times("READY=1"), sock.messages
        pipeline = holder["p"]
        ready_at = sock.times("READY=1")[0]
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for _, m in sock.messages)
        time.sleep(1.5)
        pings = [x for x in sock.times("WATCHDOG=1") if x > ready_at]
        assert len(pings) >= 4, "watchdog pings while frames flow"
        assert pipeline.totals.frames > 0
        stalling.stall.set()
        time.sleep(0.5)  # the frame in flight enters the stalled engine
        stalled_at = time.monotonic()
        time.sleep(2.0)
        late = [x for x in sock.times("WATCHDOG=1") if x > stalled_at + 1.0]
        assert late == [], "no watchdog pings while the engine is stuck"
        stalling.release.set()
        stalling.stall.clear()
        time.sleep(1.0)
        resumed = [x for x in sock.times("WATCHDOG=1") if x > stalled_at + 2.0]
        assert resumed, "pings resume once frames flow again"
    finally:
        stalling.release.set()
        if "p" in holder:
            holder["p"].stop()
        t.join(30)
        sock.close()
    assert result["r"][0] == 0
    assert sock.times("STOPPING=1")


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_sighup_reload_adds_source_rejects_bad_config_swaps_model(tmp_path, assets, broker):
    col = Collector(broker.port)
    data = _cfg(tmp_path, assets, mqtt={"host": "127.0.0.1", "port": broker.port, "prefix": "el"})
    cfg_path = tmp_path / "edgelabel.yaml"
    _write(cfg_path, data)
    proc = edgelabel("run", "-c", str(cfg_path))
    try:
        assert col.wait_for(lambda: len(col.on("/cars/labels")) >= 5, 60), "first source never labeled"
        # 1. a valid new config: one more source
        data["sources"]["people"] = {"uri": str(assets / "videos" / "people-walking.mp4"), "loop": True, "fps": 10}
        _write(cfg_path, data)
        proc.send_signal(signal.SIGHUP)
        assert col.wait_for(lambda: len(col.on("/people/labels")) >= 3, 30), "added source never labeled"
        # 2. a broken config: rejected, the running one continues
        _write(cfg_path, {**data, "mqtt": {"qos": 9}})
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        before = len(col.on("/cars/labels"))
        assert col.wait_for(lambda: len(col.on("/cars/labels")) >= before + 5, 20)
        assert proc.poll() is None
        # 3. a model change: the engine is swapped without a restart
        data["model"] = {"path": str(assets / "models" / "yolo11n_int8.onnx")}
        del data["sources"]["people"]
        _write(cfg_path, data)
        proc.send_signal(signal.SIGHUP)
        assert col.wait_for(lambda: any(r["model"]["name"] == "yolo11n_int8" for r in col.labels()), 30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "reload rejected: mqtt.qos: 9 is above the maximum 2" in err
    assert "source people added" in err and "source people removed" in err
    names = [r["model"]["name"] for r in col.labels() if r["source"] == "cars"]
    switch = names.index("yolo11n_int8")
    assert set(names[:switch]) == {"yolox_nano"} and set(names[switch:]) == {"yolo11n_int8"}
    col.close()


class Unexpected(BaseException):
    """An exception type no worker loop expects (they catch ``Exception``): a bug that escapes."""


class DyingSink(Sink):
    """Takes two records, then raises :class:`Unexpected` out of ``write``; keeps the stats snapshots."""

    name = "dying"

    def __init__(self) -> None:
        self.written = 0
        self.died_at: float | None = None
        self.snapshots: list[dict] = []

    def write(self, record, frame) -> None:
        self.written += 1
        if self.written == 3:
            self.died_at = time.monotonic()
            raise Unexpected("a bug in the sink")

    def stats(self, snapshot) -> None:
        self.snapshots.append(snapshot)


def test_a_worker_thread_that_dies_withholds_the_watchdog_raises_an_alarm_and_exits_1(tmp_path, assets, monkeypatch):
    """Before: the sink worker died silently, the daemon kept running (sources read, nothing labeled) and
    never ended, even on a stop.  Now the death is recorded, the alarm names it, no WATCHDOG=1 follows, and
    the daemon exits 1 (systemd's Restart=on-failure restarts it)."""
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = config_from_dict(_cfg(tmp_path, assets))  # a looped clip: the daemon never finishes by itself
    sink = DyingSink()
    holder: dict = {}

    def factory(c, **kw):
        holder["p"] = Pipeline(c, sinks=[sink], **kw)
        return holder["p"]

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        r=run_daemon(cfg, notifier=Notifier(), pipeline_factory=factory, install_signals=False)), daemon=True)
    t.start()
    t.join(30)
    ended = not t.is_alive()
    if not ended and "p" in holder:
        holder["p"].stop()
        t.join(10)
    sock.close()
    assert ended and "r" in result, "the daemon did not end by itself after its sink worker died"
    code, pipeline = result["r"]
    assert code == 1
    assert "sinks" in pipeline.died and "Unexpected: a bug in the sink" in pipeline.died["sinks"]
    assert not pipeline.alive(max_age=60)
    assert sink.died_at is not None
    late = [x for x in sock.times("WATCHDOG=1") if x > sink.died_at + 0.3]
    assert late == [], "no watchdog ping after the sink worker died"
    assert sock.times("STOPPING=1")
    # the alarm (MQTT alarm topic, /healthz) comes from the last snapshot the sinks were given
    alarms = device_alarms(sink.snapshots[-1])
    assert [a["id"] for a in alarms] == ["worker_thread_died"] and "sinks" in alarms[0]["message"]

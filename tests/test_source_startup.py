"""SIGTERM while a source's open hangs: the daemon stops within seconds, in every phase of start-up.

The hanging camera is real: a TCP server in this test accepts the RTSP connection and never answers
(a camera whose firmware froze, a port forwarded to nothing that listens).  OpenCV's FFmpeg open then
waits for its own timeout, the runner's watchdog for twice the read timeout, and start-up for every
source to report a first state.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.rtsp import RtspSource
from edgelabel.edge.sources.runner import SourceRunner
from tests.conftest import ASSETS
from tests.helpers import edgelabel


class SilentServer:
    """Accepts TCP connections and never sends a byte; keeps them open until closed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def silent() -> SilentServer:
    server = SilentServer()
    yield server
    server.close()


def test_a_silent_rtsp_server_is_offline_with_a_reason_and_the_runner_stops_at_once(silent: SilentServer) -> None:
    url = f"rtsp://127.0.0.1:{silent.port}/x"
    seen: list[str] = []
    stop = threading.Event()
    runner = SourceRunner(RtspSource("cam", SourceConfig(uri=url, name="cam", read_timeout=1.0), url), FrameHub(),
                          lambda _n, s: seen.append(s), stop)
    runner.start()
    assert silent.accepted.wait(10), "the source never connected"
    deadline = time.monotonic() + 15
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[:1] == ["offline"]  # an open that hangs is a failure with a reason, not a silent wait
    assert "127.0.0.1" in (runner.stats().last_error or "")
    assert silent.accepted.wait(10)
    t0 = time.monotonic()
    stop.set()
    assert runner.join(3)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("with_broker", [False, True], ids=["no-mqtt", "mqtt"])
def test_sigterm_during_startup_with_a_hanging_open_exits_promptly(
    tmp_path: Path, silent: SilentServer, with_broker: bool, request: pytest.FixtureRequest
) -> None:
    """Used to take ~28 s (the open's watchdog, then the wait for every source's first state)."""
    mqtt: dict[str, object] = {"enabled": False}
    if with_broker:
        mqtt = {"host": "127.0.0.1", "port": request.getfixturevalue("broker").port, "prefix": "el"}
    cfg = {
        "device_id": "startup-test",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox"},
        "sources": {"cam": {"uri": f"rtsp://127.0.0.1:{silent.port}/x"}},  # read_timeout 10 s: open watchdog 20 s
        "mqtt": mqtt,
        "dataset": {"path": str(tmp_path / "dataset")},
    }
    path = tmp_path / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))
    proc = edgelabel("run", "-c", str(path))
    try:
        assert silent.accepted.wait(60), "the daemon never opened the stream"
        time.sleep(0.5)  # well inside the open: FFmpeg waits for an answer that never comes
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in err
    assert took < 5.0, f"stopping took {took:.1f} s\n{err[-3000:]}"  # aim: 2 s; room for a loaded machine

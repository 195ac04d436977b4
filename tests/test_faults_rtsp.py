"""Fault: an RTSP camera disappears and comes back while another source keeps running.

Injected for real: ``tests/rtsp_server.py`` (GStreamer's RTSP server, a separate process run with the
system Python) serves ``bottle-detection.mp4`` as H.264 over RTSP on loopback; the daemon reads it
through OpenCV/FFmpeg over TCP beside a looping video file.  The server is SIGKILLed (the camera loses
power: sockets reset, the port refuses connections), stays away 4 s (longer than ``reconnect.max``, so
the backoff reaches its ceiling), and is started again on the same port.

Must happen: the camera source goes ``reconnecting`` (retained status on MQTT) within the read
timeout, comes back ``online`` and delivers labels again within the backoff bound (``reconnect.max``
plus one open) after the server returns, and the other source never stalls: no gap between its
labels longer than 2 s at any time.  Measured: detection and recovery times, the longest gap of the
other source, reconnect attempts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Broker, free_port
from tests.test_faults_support import HAVE_MOSQUITTO, PREFIX, DaemonProc, TimedCollector, measure, wait_until, write_config

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")]

SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"
READ_TIMEOUT = 2.0
RECONNECT = {"initial": 0.5, "max": 2.0}
DOWN_S = 4.0


class RtspServer:
    """tests/rtsp_server.py as a process; ``start`` again after ``kill`` serves the same URL."""

    def __init__(self, port: int, video: Path) -> None:
        self.port, self.video = port, video
        self.proc: subprocess.Popen[str] | None = None
        self.url = f"rtsp://127.0.0.1:{port}/cam"

    def start(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), "--file", str(self.video)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.wait(5)
            if self.proc.returncode == 3:
                pytest.skip(f"RTSP server not available: {err.strip()} (apt-get install python3-gi "
                            "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,bad})")
            raise RuntimeError(f"rtsp_server.py did not start: {line}{err}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def statuses(col: TimedCollector, source: str) -> list[tuple[float, str]]:
    return [(t, p.decode()) for t, p in col.on(f"{PREFIX}/fault-dev/{source}/status")]


def test_rtsp_camera_disappears_and_comes_back_others_never_stall(tmp_path: Path, assets: Path, broker: Broker) -> None:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} not found (the RTSP server runs on the system Python with PyGObject)")
    server = RtspServer(free_port(), assets / "videos" / "bottle-detection.mp4")
    server.start()
    col = TimedCollector(broker.port)
    cfg = write_config(tmp_path, broker.port, {
        "cam": {"uri": server.url, "read_timeout": READ_TIMEOUT, "reconnect": RECONNECT, "fps": 5},
        "clip": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 6},
    })
    daemon = DaemonProc(cfg)
    outages: list[dict[str, float]] = []

    def outage(kind: str) -> None:
        """The camera goes away (killed: connections reset; frozen: silent, like a pulled cable) and returns."""
        assert server.proc is not None
        assert statuses(col, "cam")[-1][1] == "online"
        pid = server.proc.pid
        gone = time.monotonic()  # before the kill: the daemon may notice before kill() has reaped the server
        if kind == "killed":
            server.kill()
        else:
            os.kill(pid, signal.SIGSTOP)
        assert wait_until(lambda: statuses(col, "cam")[-1][1] == "reconnecting", 2 * READ_TIMEOUT + 5), \
            f"{kind}: camera status {statuses(col, 'cam')[-3:]}\n" + daemon.log()[-3000:]
        detected = next(t for t, st in statuses(col, "cam") if t >= gone and st == "reconnecting")
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - gone)))
        if kind == "killed":
            server.start()
        else:
            os.kill(pid, signal.SIGCONT)
        back = time.monotonic()
        assert wait_until(lambda: any(t > back for t, _ in col.labels("cam")), 30), \
            f"{kind}: the camera did not come back\n" + daemon.log()[-3000:]
        first_label = min(t for t, _ in col.labels("cam") if t > back)
        assert wait_until(lambda: statuses(col, "cam")[-1][1] == "online", 5)
        outages.append({"gone": gone, "detected": detected, "back": back, "first_label": first_label})
        time.sleep(1.5)  # labels keep coming from both after the recovery

    try:
        assert wait_until(lambda: len(col.labels("cam")) >= 10 and len(col.labels("clip")) >= 10, 90), \
            "no labels from the camera\n" + daemon.log()[-3000:]
        outage("killed")
        outage("frozen")
        stats = [json.loads(p) for _, p in col.on(f"{PREFIX}/fault-dev/stats")]
        code = daemon.stop(30)
    finally:
        daemon.ensure_dead()
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()
        col.close()
    assert code == 0, daemon.log()[-3000:]
    clip = sorted(t for t, _ in col.labels("clip"))
    bound = RECONNECT["max"] + READ_TIMEOUT  # the longest backoff, then one open (which answers at once when up)
    figures: dict[str, object] = {}
    for kind, o in zip(("killed", "frozen"), outages, strict=True):
        window = [t for t in clip if o["gone"] - 2 <= t <= o["first_label"] + 2]
        worst_gap = max(b - a for a, b in zip(window, window[1:], strict=False))
        during = len([t for t in clip if o["gone"] <= t <= o["back"]])
        recovery = o["first_label"] - o["back"]
        figures[kind] = {"down_s": round(o["back"] - o["gone"], 2), "reconnecting_after_s": round(o["detected"] - o["gone"], 2),
                         "first_label_after_return_s": round(recovery, 2), "other_source_labels_while_down": during,
                         "other_source_worst_gap_s": round(worst_gap, 2)}
        assert o["detected"] - o["gone"] <= READ_TIMEOUT + 1.5, (kind, figures[kind])
        assert recovery <= bound, f"{kind}: camera back after {recovery:.1f} s (bound {bound} s)"
        assert worst_gap < 2.0, f"{kind}: the other source stalled for {worst_gap:.1f} s"
        assert during >= 3 * DOWN_S  # ~6 fps while the camera was away
    reconnects = max((st["sources"]["cam"]["reconnects"] for st in stats), default=0)
    measure("rtsp_camera_lost_and_back", read_timeout_s=READ_TIMEOUT, reconnect=RECONNECT, bound_s=bound,
            reconnect_attempts=reconnects, **figures)
    assert reconnects >= 2

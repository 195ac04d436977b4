"""No camera or broker secret leaves the daemon: pages, API answers, metrics, MQTT payloads, the log, doctor.

A real ``edgelabel run`` with its web page and a real broker gets sources whose URIs carry passwords in every
form cheap cameras use (user info with a raw ``#``, query parameters, path parameters, a GStreamer
``user-pw`` property).  The cameras are not there (a closed loopback port), so every URI also ends up in an
error text, the place where secrets used to leak.  Every byte the daemon shows is then searched for the
secrets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.browser import DaemonProcess
from tests.conftest import ROOT, Broker, free_port
from tests.helpers import Collector

SECRETS = {
    "userinfo": "Zq9raw#hash",
    "query": "Zq9query-pass",
    "path": "Zq9path-pass",
    "gst": "Zq9gst-pass",
    "token": "Zq9query-token",
}


def sources(port: int) -> dict[str, Any]:
    host = f"127.0.0.1:{port}"
    return {
        "userinfo": {"uri": f"rtsp://admin:{SECRETS['userinfo']}@{host}/live"},
        "query": {"uri": f"rtsp://{host}/cgi-bin/stream?channel=1&USER=admin&Password={SECRETS['query']}"
                         f"&token={SECRETS['token']}"},
        "path": {"uri": f"rtsp://{host}/user=admin&password={SECRETS['path']}&channel=1&stream=0.sdp"},
        "gst": {"uri": f"gst://rtspsrc location=rtsp://{host}/s user-id=admin user-pw={SECRETS['gst']} latency=0 "
                       "! rtph264depay ! avdec_h264 ! videoconvert ! video/x-raw,format=BGR ! appsink"},
    }


def fetch(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return ""  # not listening yet


def leaks(where: str, text: str) -> list[str]:
    """Every secret, whole or in part (each starts with Zq9, a piece of one leaked through a port error)."""
    found = [f"{where}: {name} secret {secret!r}" for name, secret in SECRETS.items() if secret in text]
    if not found and "Zq9" in text:
        at = text.index("Zq9")
        found.append(f"{where}: a piece of a secret: {text[max(0, at - 60):at + 20]!r}")
    return found


@pytest.mark.slow
def test_no_secret_on_any_page_answer_payload_or_log_line(tmp_path: Path, broker: Broker, assets: Path) -> None:
    closed = free_port()  # nothing listens: every camera fails to open and its URI lands in an error text
    web_port = free_port()
    cfg = {
        "device_id": "secrets-test",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
        "sources": {name: {**src, "read_timeout": 2, "reconnect": {"initial": 0.5, "max": 1}}
                    for name, src in sources(closed).items()},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "dataset": {"path": str(tmp_path / "ds")},
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
    }
    collector = Collector(broker.port)
    daemon = DaemonProcess(tmp_path, tmp_path / "daemon.log", cfg, web_port)
    found: list[str] = []
    try:
        deadline = time.time() + 60
        status: dict[str, Any] = {}
        while time.time() < deadline:  # until every source has failed at least once, with its error
            text = fetch(f"{daemon.url}/api/status")
            if text.startswith("{"):
                status = json.loads(text)
                srcs = status.get("sources") or {}
                if len(srcs) == 4 and all(s.get("last_error") for s in srcs.values()):
                    break
            assert daemon.proc.poll() is None, daemon.log_tail()
            time.sleep(0.5)
        assert status.get("sources") and all(s.get("last_error") for s in status["sources"].values()), status
        token = (Path(cfg["state_dir"]) / "web-token").read_text().strip()
        for auth in ({}, {"Authorization": f"Bearer {token}"}):
            who = "operator" if auth else "anonymous"
            for path in ["/", "/api/status", "/api/sources", "/api/logs", "/metrics", "/healthz", "/labels",
                         *[f"/sources/{n}" for n in SECRETS if n != "token"],
                         *[f"/api/sources/{n}" for n in SECRETS if n != "token"]]:
                found += leaks(f"{who} GET {path}", fetch(daemon.url + path, auth))
    finally:
        code = daemon.stop()
        collector.close()
    found += leaks("daemon log", daemon.log_path.read_text(errors="replace"))
    for topic, payload, _ in collector.messages:
        found += leaks(f"MQTT {topic}", payload.decode("utf-8", "replace"))
    assert code == 0, daemon.log_tail()
    assert collector.messages, "the daemon published its status"

    config = tmp_path / "edgelabel.yaml"
    doctor = subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", "doctor", "-c", str(config), "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    found += leaks("doctor --json", doctor.stdout + doctor.stderr)
    assert "admin:***@" in doctor.stdout and "Password=***" in doctor.stdout, doctor.stdout[-2000:]  # it showed them
    doctor = subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", "doctor", "-c", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    found += leaks("doctor", doctor.stdout + doctor.stderr)
    assert not found, "\n".join(found)

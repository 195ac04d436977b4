"""What goes wrong while the pipeline starts reaches the web page's log panel.

The panel's handler used to be installed with the web server, after the model had loaded and the sources had
opened, so the warnings of that phase (a camera that cannot be opened, an insecure TLS setting, a rejected
file) were in the journal but never on the page an operator looks at.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.browser import DaemonProcess
from tests.conftest import free_port


def test_start_up_warnings_are_on_the_log_panel(tmp_path: Path, assets: Path) -> None:
    web_port = free_port()
    closed = free_port()
    cfg = {
        "device_id": "startup-logs",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
        "sources": {"cam": {"uri": f"rtsp://127.0.0.1:{closed}/live", "reconnect": {"initial": 60, "max": 60}}},
        # warned about while the MQTT sink starts, before the web server exists
        "mqtt": {"host": "127.0.0.1", "port": closed, "tls": {"insecure": True}},
        "dataset": {"enabled": False},
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
    }
    daemon = DaemonProcess(tmp_path, tmp_path / "daemon.log", cfg, web_port)
    try:
        entries: list[dict[str, object]] = []
        deadline = time.time() + 60
        while time.time() < deadline:
            assert daemon.proc.poll() is None, daemon.log_tail()
            try:
                with urllib.request.urlopen(f"{daemon.url}/api/logs", timeout=5) as resp:
                    entries = json.loads(resp.read())["entries"]
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        messages = [str(e["message"]) for e in entries]
        assert any("mqtt.tls.insecure" in m for m in messages), messages
        first_seq = min(int(e["seq"]) for e in entries)  # type: ignore[call-overload]
        assert first_seq == 1, "the panel holds the warnings from the very start"
    finally:
        daemon.stop()
    log = daemon.log_path.read_text()
    assert log.index("mqtt.tls.insecure") < log.index("web page on"), "the warning came before the web server"

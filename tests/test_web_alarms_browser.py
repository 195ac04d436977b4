"""An alarm reaches the operator's page: a real daemon whose job ledger was corrupt, seen in Chromium.

The ledger file is damaged before the daemon starts (its header overwritten, as a failing SD card does); the
daemon salvages it, counts the rows it could not read and raises ``ledger_lost``.  Before, that alarm went to
the MQTT alarm topic, ``/healthz`` and the log, but the dashboard showed nothing: an operator looking at the
page saw a healthy box.  Now ``/api/status`` lists the active alarms and the dashboard shows each one, in the
words of ``edgelabel.edge.health``, above the cards.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.browser import CHROMIUM, CHROMIUM_ARGS, DaemonProcess, requires_chromium
from tests.conftest import free_port

pytestmark = requires_chromium


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/api/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _corrupt_ledger(path: Path) -> None:
    """A ledger with rows in it, then its first page (the header and the schema) overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE filler (x TEXT)")
        db.executemany("INSERT INTO filler VALUES (?)", [("x" * 200,) for _ in range(500)])
    data = bytearray(path.read_bytes())
    data[:100] = b"\xa5" * 100
    path.write_bytes(bytes(data))


def test_a_corrupt_ledger_shows_as_an_alarm_on_the_dashboard(tmp_path: Path, assets: Path, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    state = tmp_path / "state"
    _corrupt_ledger(state / "ledger.sqlite")
    port = free_port()
    cfg = {
        "device_id": "alarm-test",
        "state_dir": str(state),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": {"shelf": {"uri": str(assets / "images"), "watch": True}},
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
        "web": {"enabled": True, "host": "127.0.0.1", "port": port},
    }
    daemon = DaemonProcess(tmp_path, artifacts / "daemon.log", cfg, port)
    try:
        deadline, alarms = time.monotonic() + 90, []
        while time.monotonic() < deadline and not alarms:
            assert daemon.proc.poll() is None, daemon.log_tail()
            try:
                alarms = [a for a in _status(daemon.url).get("alarms", []) if a["id"] == "ledger_lost"]
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        assert alarms, daemon.log_tail()
        assert alarms[0]["severity"] == "error" and "corrupt" in alarms[0]["message"]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(daemon.url + "/")
                banner = page.locator('#alarms [data-alarm="ledger_lost"]')
                banner.wait_for(state="visible", timeout=20_000)
                text = banner.inner_text()
                assert text.startswith("Alarm: ledger lost") and "check the disk" in text, text
                assert "notice bad" in (banner.get_attribute("class") or "")
                lost = page.locator("#lost")
                assert lost.is_visible() and int(page.locator('#lost [data-f="lost"]').inner_text()) > 0
                page.screenshot(path=str(artifacts / "dashboard-alarm.png"), full_page=True)
            finally:
                browser.close()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

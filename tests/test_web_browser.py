"""The dashboard in a real browser: the daemon on a shared video, Debian's headless Chromium driven by Playwright.

What a person at the line would do: open the dashboard, see the source's fps
and its live thumbnail, try to pause it without logging in (refused), log in
through the form with the operator token, pause and resume it.  Screenshots at
1280 and 800 px wide are saved to $EDGELABEL_ARTIFACTS (default: the test's
tmp_path) and the folder is printed.

The daemon is the real command (``python -m edge.cli run -c ...``) in its own
process; the browser is /usr/bin/chromium (``apt-get install chromium``), never
a browser downloaded by Playwright.
"""

from __future__ import annotations

import json
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, DaemonProcess, requires_chromium
from tests.conftest import free_port

pytestmark = requires_chromium


def _api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Daemon(DaemonProcess):
    """``edgelabel run`` on a looping video, MQTT to the test broker, the web page on a free loopback port."""

    def __init__(self, workdir: Path, assets: Path, log_path: Path, mqtt_port: int) -> None:
        port = free_port()
        cfg = {
            "device_id": "browser-test",
            "state_dir": str(workdir / "state"),
            "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
            "sources": {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 10}},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "prefix": "browser"},
            "dataset": {"enabled": False},
            "web": {"enabled": True, "host": "127.0.0.1", "port": port, "stream_fps": 5},
        }
        super().__init__(workdir, log_path, cfg, port)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the web page did not become ready within {timeout:.0f} s:\n{self.log_tail()}")

    def source(self, name: str = "cars") -> dict[str, Any]:
        return _api(f"{self.url}/api/sources/{name}")  # type: ignore[no-any-return]


@pytest.fixture
def daemon(tmp_path: Path, assets: Path, artifacts: Path, broker: Any) -> Iterator[Daemon]:
    d = Daemon(tmp_path, assets, artifacts / "daemon.log", broker.port)
    try:
        d.wait_ready()
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()


def test_dashboard_in_chromium(daemon: Daemon, artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import sync_playwright

    token_file = daemon.state / "web-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token not in daemon.log_tail()

    problems: list[str] = []  # console errors (a CSP violation is one), failed page loads
    card = '[data-source="cars"]'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" and "status of 401" not in m.text else None)  # 401s: the refusals we provoke
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(daemon.url + "/")

            # the card shows frames coming in and a thumbnail with boxes
            page.wait_for_function(
                """sel => { const el = document.querySelector(sel + ' [data-f="fps_in"]');
                            return el && parseFloat(el.textContent) > 0; }""", arg=card, timeout=60_000)
            page.wait_for_function(
                """sel => { const img = document.querySelector(sel + ' img[data-role="thumb"]');
                            return img && img.complete && img.naturalWidth > 0; }""", arg=card, timeout=30_000)
            page.wait_for_function(
                "() => document.querySelector('#card-engine [data-f=\"provider\"]').textContent.includes('CPU')")
            assert page.locator('#card-engine [data-f="model"]').inner_text().startswith("yolox_nano")
            assert page.locator('#card-engine [data-f="engine_reason"]').inner_text().startswith("auto: ")
            assert page.locator('#card-mqtt [data-f="mqtt_state"]').inner_text() == "connected"
            page.wait_for_function(  # labels are acknowledged: capture -> ack latency is shown
                "() => / ms median · \\d+ ms p99 \\(last \\d+ labels\\)/.test("
                "document.querySelector('#card-mqtt [data-f=\"mqtt_latency\"]').textContent)", timeout=30_000)
            assert page.locator(f'{card} [data-f="status"]').inner_text() == "online"
            page.screenshot(path=str(artifacts / "dashboard-1280.png"), full_page=True)

            # pausing without a login is refused, and says how to get one
            page.click(f'{card} button[data-action="pause"]')
            notice = page.locator("#notice")
            notice.wait_for(state="visible")
            assert "need to log in" in notice.inner_text() and notice.get_attribute("data-kind") == "bad"
            assert daemon.source()["paused"] is False
            assert page.locator(f'{card} [data-f="paused"]').is_hidden()
            # a script in the page cannot do it either (no token, no CSRF header)
            status = page.evaluate("async () => (await fetch('/api/sources/cars/pause', {method: 'POST'})).status")
            assert status == 401

            # log in through the form, come back to the dashboard
            notice.get_by_role("link", name="Log in").click()
            page.wait_for_url("**/login?next=*")
            page.fill("#token", "wrong")
            page.click('#login-form button[type="submit"]')
            assert "Wrong token" in page.locator("#login-error").inner_text()
            page.fill("#token", token)
            page.click('#login-form button[type="submit"]')
            page.wait_for_url(daemon.url + "/")
            assert page.locator(".session .badge").inner_text() == "operator"
            assert token not in page.content()

            # now pausing works: the card says paused, the source stops reading, fps falls to 0
            page.click(f'{card} button[data-action="pause"]')
            page.locator(f'{card} [data-f="paused"]').wait_for(state="visible")
            assert daemon.source()["paused"] is True
            page.wait_for_function(
                """sel => parseFloat(document.querySelector(sel + ' [data-f="fps_in"]').textContent) === 0""",
                arg=card, timeout=15_000)
            assert daemon.source()["status"] == "online"
            page.screenshot(path=str(artifacts / "dashboard-paused-1280.png"), full_page=True)
            page.click(f'{card} button[data-action="resume"]')
            page.locator(f'{card} [data-f="paused"]').wait_for(state="hidden")
            assert daemon.source()["paused"] is False
            page.wait_for_function(
                """sel => parseFloat(document.querySelector(sel + ' [data-f="fps_in"]').textContent) > 0""",
                arg=card, timeout=15_000)

            # the live view (MJPEG) and a record's frame with its boxes
            page.goto(daemon.url + "/sources/cars")
            page.wait_for_function("() => { const i = document.getElementById('stream'); return i.naturalWidth > 0; }",
                                   timeout=30_000)
            page.screenshot(path=str(artifacts / "live-1280.png"))
            page.goto(daemon.url + "/labels?source=cars&class=car&limit=25")
            page.screenshot(path=str(artifacts / "labels-1280.png"), full_page=True)
            page.locator("table.records a", has_text="frame").first.click()
            page.wait_for_function("() => { const i = document.getElementById('frame'); return i && i.naturalWidth > 0; }")
            page.screenshot(path=str(artifacts / "record-1280.png"), full_page=True)

            # a small laptop: 800 px wide
            page.set_viewport_size({"width": 800, "height": 900})
            page.goto(daemon.url + "/")
            page.wait_for_function(
                """sel => { const img = document.querySelector(sel + ' img[data-role="thumb"]');
                            return img && img.complete && img.naturalWidth > 0; }""", arg=card, timeout=30_000)
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the dashboard is {overflow} px wider than an 800 px window"
            page.screenshot(path=str(artifacts / "dashboard-800.png"), full_page=True)
            page.goto(daemon.url + "/sources/cars")
            page.wait_for_function("() => document.getElementById('stream').naturalWidth > 0", timeout=30_000)
            page.screenshot(path=str(artifacts / "live-800.png"))
        finally:
            browser.close()
    assert not problems, problems
    with capsys.disabled():
        print(f"\nweb screenshots and daemon log: {artifacts}")
    for name in ("dashboard-1280.png", "dashboard-800.png", "live-1280.png", "live-800.png"):
        assert (artifacts / name).stat().st_size > 10_000, name

"""A review session in a real browser: the daemon labels the shared images, a person reviews them in headless
Chromium, exports, and the files on disk, the MQTT review messages and the export all say the same.

The daemon is the real command (``python -m edge.cli run -c ...``) with a watched folder of the shared
images, a private Mosquitto and the web page on a free port; every captured frame needs review.  The
browser is /usr/bin/chromium driven by Playwright (never a browser Playwright downloads).  Screenshots go
to $EDGELABEL_ARTIFACTS (default: the test's tmp folder), whose path is printed.

The session: log in, accept the first frame with the keyboard (A), change a box's class on the second
and confirm it, reject the third with the button, on a fourth draw a box with the mouse and delete
another with the Delete key, then download a COCO export from the page.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pycocotools.coco import COCO

from edgelabel.edge.review import load_schema
from tests.browser import CHROMIUM, CHROMIUM_ARGS, DaemonProcess, requires_chromium
from tests.conftest import free_port
from tests.helpers import Collector, run_edgelabel

pytestmark = requires_chromium
#: a named reviewer (web.operators): the review decisions record this name
TESTER_TOKEN = "tester-review-token-0123456789"


class Daemon(DaemonProcess):
    """``edgelabel run`` on a watched folder, MQTT to the test broker, the web page on a free port."""

    def __init__(self, workdir: Path, assets: Path, broker_port: int, log_path: Path) -> None:
        port = free_port()
        self.dataset = workdir / "dataset"
        images = workdir / "in"
        images.mkdir()
        for p in sorted((assets / "images").glob("*.jpg")):
            shutil.copy(p, images / p.name)
        cfg = {
            "device_id": "review-browser",
            "state_dir": str(workdir / "state"),
            "model": {"path": str(assets / "models" / "yolo11n_int8.onnx"), "conf": 0.3},
            "sources": {"shots": {"uri": f"{images}/", "watch": True}},
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "prefix": "el"},
            "dataset": {"path": str(self.dataset), "save_images": "always",
                        "capture": {"storage": {"review": "all"}}},
            # the reviewer logs in with a named operator's token: decisions carry that name
            "web": {"enabled": True, "host": "127.0.0.1", "port": port,
                    "operators": {"tester": {"role": "reviewer", "token": TESTER_TOKEN}}},
        }
        super().__init__(workdir, log_path, cfg, port)

    def queue_total(self, token: str) -> int:
        req = urllib.request.Request(f"{self.url}/api/review/queue?limit=1", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.loads(r.read())["total"])

    def wait_labeled(self, n: int, timeout: float = 90.0) -> str:
        """Wait until the web page answers and ``n`` frames wait for review; returns the operator token."""
        deadline = time.monotonic() + timeout
        token_file = self.state / "web-token"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                token = token_file.read_text().strip()
                if self.queue_total(token) >= n:
                    return token
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"{n} frames were not ready for review within {timeout:.0f} s:\n{self.log_tail()}")


@pytest.fixture
def daemon(tmp_path: Path, assets: Path, broker: Any, artifacts: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, assets, broker.port, artifacts / "review-daemon.log")
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()


def index_rows(dataset: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(dataset / "index.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: r for r in db.execute("SELECT * FROM records")}


def test_review_session_in_chromium(daemon: Daemon, broker: Any, artifacts: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import Page, sync_playwright

    n_images = len(list((tmp_path / "in").glob("*.jpg")))
    col = Collector(broker.port, "el/review-browser/review")
    daemon.wait_labeled(n_images)
    problems: list[str] = []

    def current(page: Page) -> str:
        return page.locator("#stage").get_attribute("data-record-id") or ""

    def settled(page: Page) -> None:
        """Every save the page started has been answered."""
        page.wait_for_function("() => document.getElementById('stage').dataset.pending === '0'", timeout=15_000)

    def wait_next(page: Page, previous: str) -> str:
        page.wait_for_function(
            """prev => { const s = document.getElementById('stage'), img = document.getElementById('review-image');
                         return s.dataset.recordId && s.dataset.recordId !== prev && s.dataset.pending === '0'
                                && img.classList.contains('loaded'); }""", arg=previous, timeout=15_000)
        return current(page)

    def boxes(page: Page) -> int:
        return page.locator("#overlay g.box").count()

    decided: dict[str, str] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
            page = ctx.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            # the review page needs the token: the login form, then back to /review
            page.goto(daemon.url + "/review")
            page.wait_for_url(lambda url: "/login?next=" in url and url.endswith("/review"))
            page.fill("#token", TESTER_TOKEN)
            page.click('#login-form button[type="submit"]')
            page.wait_for_url(daemon.url + "/review")
            page.wait_for_function("() => document.querySelectorAll('#queue li').length > 0")
            assert page.locator("#queue li").count() == n_images
            assert page.locator('[data-f="count-needs_review"]').inner_text() == str(n_images)
            first = wait_next(page, "")
            assert page.locator("#reviewer").inner_text().endswith("tester")  # shown, not typed
            page.screenshot(path=str(artifacts / "review-1440.png"), full_page=True)

            # 1. accept the most uncertain frame with the keyboard
            assert boxes(page) > 0
            page.keyboard.press("a")
            decided[first] = "accepted"
            second = wait_next(page, first)

            # 2. change a box's class on the next one (saved at once), then confirm it with the button
            assert boxes(page) > 0
            page.select_option('#box-list tr[data-i="0"] select[data-role="class"]', label="truck")
            settled(page)
            page.wait_for_function("() => document.getElementById('stage').dataset.state === 'corrected'")
            assert (page.locator("#overlay g.box text").first.text_content() or "").startswith("truck")
            page.click("#btn-accept")
            decided[second] = "corrected"
            third = wait_next(page, second)

            # 3. reject the third with the button
            page.click("#btn-reject")
            decided[third] = "rejected"
            fourth = wait_next(page, third)

            # 4. draw a box with the mouse (class car), delete the frame's first box with the Delete key
            before = boxes(page)
            page.select_option("#new-class", label="car")
            page.click("h1")
            page.keyboard.press("d")
            area = page.locator("#overlay").bounding_box()
            assert area is not None
            x0, y0 = area["x"] + area["width"] * 0.05, area["y"] + area["height"] * 0.05
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + area["width"] * 0.2, y0 + area["height"] * 0.15, steps=6)
            page.mouse.up()
            settled(page)
            assert boxes(page) == before + 1
            page.locator('#box-list tr[data-i="0"] td').first.click()  # select the first box
            page.keyboard.press("Delete")
            settled(page)
            assert boxes(page) == before
            page.wait_for_function("() => document.getElementById('stage').dataset.state === 'corrected'")
            page.screenshot(path=str(artifacts / "review-edited-1440.png"), full_page=True)
            page.keyboard.press("a")
            decided[fourth] = "corrected"
            fifth = wait_next(page, fourth)

            # next without deciding, and the counts on the page
            page.keyboard.press("n")
            wait_next(page, fifth)
            assert page.locator('[data-f="count-needs_review"]').inner_text() == str(n_images - 4)
            assert page.locator('[data-f="count-corrected"]').inner_text() == "2"
            assert page.locator("#queue li").count() == n_images - 4

            # 5. export from the page: COCO, the default states (accepted, corrected, auto_accepted)
            page.select_option("#export-format", "coco")
            with page.expect_download() as info:
                page.click("#btn-export")
            download = info.value
            assert download.suggested_filename.startswith("edgelabel-review-browser-coco-")
            zip_path = tmp_path / "from-page.zip"
            download.save_as(str(zip_path))

            page.set_viewport_size({"width": 800, "height": 900})
            page.reload()
            page.wait_for_function("() => document.getElementById('review-image').classList.contains('loaded')")
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the review page is {overflow} px wider than an 800 px window"
            page.screenshot(path=str(artifacts / "review-800.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems

    # the dataset on disk, while the daemon still runs: states, who, label files, COCO
    rows = index_rows(daemon.dataset)
    for rid, state in decided.items():
        row = rows[rid]
        assert (row["state"], row["reviewed_by"]) == (state, "tester"), rid
        assert row["synced"] == 1
    assert sum(1 for r in rows.values() if r["state"] == "needs_review") == n_images - 4
    second_row = rows[second]
    second_dets = json.loads(second_row["detections"])
    assert second_dets[0]["label"] == "truck" and json.loads(second_row["model_detections"])[0]["label"] != "truck"
    lines = (daemon.dataset / second_row["label_path"]).read_text().splitlines()
    assert lines[0].split()[0] == "7" and len(lines) == len(second_dets)
    third_row = rows[third]
    assert not (daemon.dataset / third_row["label_path"]).exists()
    assert (daemon.dataset / "rejected" / third_row["image_path"]).is_file()
    assert not (daemon.dataset / third_row["image_path"]).exists()
    fourth_dets = json.loads(rows[fourth]["detections"])
    assert any(d["label"] == "car" and d["score"] is None for d in fourth_dets)  # the drawn box
    coco = COCO(str(daemon.dataset / "annotations.coco.json"))
    by_id = {img["edgelabel_record_id"]: img for img in coco.dataset["images"]}
    assert third not in by_id and by_id[second]["edgelabel_review_state"] == "corrected"
    assert sorted(coco.cats[a["category_id"]]["name"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[by_id[second]["id"]]))) \
        == sorted(d["label"] for d in second_dets)

    # the page's export: the accepted and corrected frames, their boxes as the index has them
    with zipfile.ZipFile(zip_path) as z:
        doc = json.loads(z.read("annotations/instances_default.json"))
        exported = {img["edgelabel_record_id"]: img for img in doc["images"]}
        assert set(exported) == {first, second, fourth}
        for rid, img in exported.items():
            assert z.getinfo(f"images/default/{img['file_name']}").file_size > 1000
            got = sorted((a["category_id"] - 1, [round(v, 1) for v in a["bbox"]]) for a in doc["annotations"]
                         if a["image_id"] == img["id"])
            want = sorted((d["class_id"], [round(d["box"][0], 1), round(d["box"][1], 1), round(d["box"][2] - d["box"][0], 1),
                                           round(d["box"][3] - d["box"][1], 1)]) for d in json.loads(rows[rid]["detections"]))
            assert [g[0] for g in got] == [w[0] for w in want]
            for (_, g), (_, w) in zip(got, want, strict=True):
                assert g == pytest.approx(w, abs=0.11)
    COCO(str(_extract(zip_path, tmp_path / "page-export") / "annotations" / "instances_default.json"))

    # the same dataset through the command line, as Pascal VOC
    res = run_edgelabel("export", "--dataset", str(daemon.dataset), "--format", "voc", str(tmp_path / "voc"))
    assert res.returncode == 0 and "exported 3 image(s)" in res.stdout, res.stderr
    assert len(list((tmp_path / "voc" / "Annotations").glob("*.xml"))) == 3

    # every decision went out on <prefix>/<device>/review, valid, in order, by the reviewer
    assert col.wait_for(lambda: len(col.on("/review")) >= 7, 15), [json.loads(p)["action"] for p in col.on("/review")]
    msgs = [json.loads(p) for p in col.on("/review")]
    col.close()
    schema = load_schema()
    for m in msgs:
        jsonschema.validate(m, schema)
        assert m["by"] == "tester" and m["device_id"] == "review-browser"
    final = {}
    for m in msgs:
        final[m["record_id"]] = m["state"]
    assert final == decided
    assert [m["action"] for m in msgs if m["record_id"] == fourth] == ["update", "update", "accept"]
    with capsys.disabled():
        print(f"\nreview screenshots and daemon log: {artifacts}")
    for name in ("review-1440.png", "review-edited-1440.png", "review-800.png"):
        assert (artifacts / name).stat().st_size > 10_000, name


def _extract(zip_path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(zip_path.read_bytes())) as z:
        z.extractall(folder)
    return folder

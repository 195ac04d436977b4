"""The web page's API, auth and security, with Flask's test client on a real running pipeline.

One pipeline (YOLOX-nano on the looping traffic video, MQTT and dataset off) runs
for the whole module; each test builds its own app on it.  Tests that change
state (pause) put it back.  A few tests start waitress for real (threads,
streams, the log handler's lifetime).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from edgelabel.edge.config import Config, ReconnectConfig, SourceConfig, config_from_dict
from edgelabel.edge.frame import Frame
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.sources.base import Source
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.web.app import create_app
from edgelabel.web.auth import load_secrets
from edgelabel.web.logbuffer import RingLogHandler
from edgelabel.web.server import start_web
from edgelabel.web.sink import WebSink
from edgelabel.web.system import DeviceMonitor
from tests.conftest import ASSETS, free_port

TOKEN = "test-operator-token-0123456789abcdef"
SECRET_KEY = "test-secret-key-" + "x" * 32
MQTT_PASSWORD = "Mq77-pa55word-nobody-guesses"


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def make_cfg(tmp: Path, sources: dict[str, Any] | None = None, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "device_id": "web-test",
        "state_dir": str(tmp / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources or {"cars": {"uri": str(ASSETS / "videos" / "cars.mp4"), "loop": True, "fps": 10}},
        "mqtt": {"enabled": False, "password": MQTT_PASSWORD},
        "dataset": {"enabled": False},
        "web": {"enabled": True, "stream_fps": 10},
    }
    data.update(extra)
    return config_from_dict(data, base_dir=tmp)


@dataclasses.dataclass
class Daemon:
    cfg: Config
    pipeline: Pipeline
    sink: WebSink


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("web")
    cfg = make_cfg(tmp)
    sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[sink], show_progress=False)
    pipeline.start()
    try:
        assert wait_for(lambda: len(sink.recent()) >= 20 and sink.latest_jpeg("cars")[1], 60), "no records arrived"
        yield Daemon(cfg, pipeline, sink)
    finally:
        pipeline.shutdown()


def app_for(d: Daemon, cfg: Config | None = None, **test_config: Any) -> Flask:
    return create_app(cfg or d.cfg, d.pipeline, d.sink, test_config={
        "TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY, **test_config})


@pytest.fixture
def app(daemon: Daemon) -> Flask:
    return app_for(daemon)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csrf_from(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client: FlaskClient) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    assert page.status_code == 200
    resp = client.post("/login", data={"token": TOKEN, "csrf_token": csrf_from(page.text), "next": "/"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    return csrf_from(client.get("/").text)


# --------------------------------------------------------------------------- status, sources, headers


def test_status_has_engine_mqtt_device_and_sources(client: FlaskClient) -> None:
    resp = client.get("/api/status")
    assert resp.status_code == 200
    s = resp.get_json()
    assert s["device_id"] == "web-test" and s["running"] is True
    eng = s["engine"]
    assert eng["engine"] == "onnxruntime" and eng["provider"] == "CPUExecutionProvider"
    assert eng["name"] == "yolox_nano" and len(eng["sha256"]) == 64 and eng["input_size"] == [416, 416]
    assert eng["precision"] and eng["inference_ms_avg"] > 0 and eng["inference_ms_last"] > 0
    assert s["mqtt"]["enabled"] is False
    dev = s["device"]
    assert dev["cpu"]["cores"] >= 1 and dev["memory"]["total"] > 0 and dev["disk"][0]["label"] == "state"
    assert isinstance(dev["temperatures"], list)
    assert dev["gpu"]["available"] is False and dev["gpu"]["reason"]  # no Jetson file, no nvidia-smi here
    cars = s["sources"]["cars"]
    assert cars["status"] == "online" and cars["paused"] is False and cars["live"] is False
    assert cars["frames_in"] > 0 and cars["records"] > 0 and cars["snapshot_seq"] > 0
    assert cars["uri"].endswith("cars.mp4") and cars["fps_cap"] == 10
    assert s["web"]["authenticated"] is False


def test_fps_in_and_out_are_measured(client: FlaskClient) -> None:
    def rates() -> Any:
        src = client.get("/api/sources/cars").get_json()
        return src if src["fps_in"] > 3 and src["fps_out"] > 3 else None

    src = wait_for(rates, 15)
    assert src, client.get("/api/sources/cars").get_json()
    # the cap (10 fps) holds on average: counted over 3 s, not read off the smoothed rates, which a loaded
    # machine's bursts after a stall pushed to 13
    def taken() -> int:  # frames read and not thinned out by the cap
        src = client.get("/api/sources/cars").get_json()
        return int(src["frames_in"]) - int(src.get("frames_skipped_fps") or 0)

    first, t0 = taken(), time.monotonic()
    time.sleep(3)
    frames = taken() - first
    assert 0 < frames / (time.monotonic() - t0) <= 10.5, frames
    listing = client.get("/api/sources").get_json()
    assert [x["name"] for x in listing["sources"]] == ["cars"]
    assert client.get("/api/sources/nope").status_code == 404


def test_security_headers(client: FlaskClient) -> None:
    for path in ("/", "/api/status", "/labels", "/login", "/api/sources/cars/snapshot.jpg"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        h = resp.headers
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["X-Frame-Options"] == "DENY"
        csp = h["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert h["Cache-Control"] == "no-store", path
    static = client.get("/static/style.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")
    static.close()


def test_pages_render_offline_assets_only(client: FlaskClient) -> None:
    for path in ("/", "/labels", "/logs", "/sources/cars", "/login"):
        html = client.get(path).text
        # every script, style and image is served by the appliance itself
        for url in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert not re.match(r"^(https?:)?//", url), f"{path} refers to {url}"
        assert "<script>" not in html and " style=" not in html  # nothing inline: the CSP forbids it
    for asset in ("style.css", "app.js", "dashboard.js", "source.js", "favicon.svg"):
        resp = client.get(f"/static/{asset}")
        assert resp.status_code == 200, asset
        resp.close()
    assert client.get("/sources/nope").status_code == 404


# --------------------------------------------------------------------------- labels and frames


def test_labels_filters_and_pagination(client: FlaskClient) -> None:
    page = client.get("/api/labels?limit=10").get_json()
    assert page["limit"] == 10 and page["offset"] == 0 and len(page["items"]) == 10
    assert page["total"] >= 20 and page["next_offset"] == 10 and page["next_cursor"] == page["items"][-1]["id"]
    ts = [r["received_at"] for r in page["items"]]
    assert ts == sorted(ts, reverse=True)  # newest first
    assert len(client.get("/api/labels?limit=10&offset=10").get_json()["items"]) == 10
    # records keep arriving, so offsets shift; the cursor continues exactly after the previous page
    time.sleep(0.5)
    second = client.get(f"/api/labels?limit=10&cursor={page['next_cursor']}").get_json()
    assert len(second["items"]) == 10
    assert second["items"][0]["received_at"] <= page["items"][-1]["received_at"]
    assert not {r["id"] for r in page["items"]} & {r["id"] for r in second["items"]}
    assert client.get(f"/api/labels?cursor={uuid.uuid4()}").status_code == 410
    assert client.get("/api/labels?cursor=../x").status_code == 400
    rec = page["items"][0]
    assert rec["source"] == "cars" and rec["frame_url"] == f"/api/frames/{rec['id']}.jpg" and rec["frame_available"]
    assert client.get(f"/api/labels/{rec['id']}").get_json()["id"] == rec["id"]

    cars = client.get("/api/labels?class=car&limit=500").get_json()
    assert cars["total"] > 0 and all(any(d["label"] == "car" for d in r["detections"]) for r in cars["items"])
    by_id = client.get("/api/labels?class=2&limit=500").get_json()  # COCO class 2 is car
    assert by_id["total"] == cars["total"] or abs(by_id["total"] - cars["total"]) <= 5  # the ring moves meanwhile
    assert client.get("/api/labels?class=zebra").get_json()["total"] == 0
    assert client.get("/api/labels?source=elsewhere").get_json()["total"] == 0
    assert client.get("/api/labels?source=cars&limit=1").get_json()["items"][0]["source"] == "cars"
    assert "car" in client.get("/api/classes").get_json()["classes"]
    for bad in ("limit=0", "limit=abc", "limit=501", "offset=-1"):
        resp = client.get(f"/api/labels?{bad}")
        assert resp.status_code == 400 and "error" in resp.get_json(), bad


def test_labels_page_and_record_page(client: FlaskClient) -> None:
    html = client.get("/labels?source=cars&class=car&limit=25").text
    ids = re.findall(r'href="/labels/([0-9a-f-]{36})"', html)
    assert len(ids) == 25
    older = re.search(r'href="(/labels\?[^"]*cursor=([0-9a-f-]{36})[^"]*)">older', html)
    assert older and older.group(2) == ids[-1]
    html2 = client.get(older.group(1).replace("&amp;", "&")).text
    ids2 = re.findall(r'href="/labels/([0-9a-f-]{36})"', html2)
    assert ids2 and not set(ids) & set(ids2) and "← newest" in html2
    detail = client.get(f"/labels/{ids[0]}")
    assert detail.status_code == 200
    assert f'src="/api/frames/{ids[0]}.jpg"' in detail.text and "car" in detail.text
    assert client.get(f"/labels/{uuid.uuid4()}").status_code == 404


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_frames_by_record_id(client: FlaskClient, daemon: Daemon) -> None:
    rec = client.get("/api/labels?class=car&limit=1").get_json()["items"][0]
    boxed = client.get(rec["frame_url"])
    raw = client.get(rec["frame_url"] + "?raw=1")
    assert boxed.status_code == raw.status_code == 200
    assert boxed.mimetype == raw.mimetype == "image/jpeg"
    a, b = _decode(boxed.data), _decode(raw.data)
    assert a.shape == b.shape and a.shape[1] <= daemon.cfg.web.stream_width
    assert a.shape[1] / a.shape[0] == pytest.approx(rec["width"] / rec["height"], rel=0.01)
    assert float(np.abs(a.astype(int) - b.astype(int)).mean()) > 0.5  # the boxes are drawn on one of them


@pytest.mark.parametrize("bad,code", [
    ("not-a-uuid", 400),
    ("..%2F..%2Fetc%2Fpasswd", 404),  # never a path: does not even match the route
    ("../../etc/passwd", 404),
    ("%2E%2E", 400),
    ("6A1F6C8E-3B0E-5B7A-9D1E-2F4C8A9B0C11x", 400),
    ("{6a1f6c8e-3b0e-5b7a-9d1e-2f4c8a9b0c11}", 400),  # parseable by uuid.UUID, but not the canonical form
])
def test_frames_refuse_anything_but_a_record_id(client: FlaskClient, bad: str, code: int) -> None:
    resp = client.get(f"/api/frames/{bad}.jpg")
    assert resp.status_code == code
    assert resp.mimetype != "image/jpeg"


def test_frame_of_unknown_record_is_404(client: FlaskClient) -> None:
    resp = client.get(f"/api/frames/{uuid.uuid4()}.jpg")
    assert resp.status_code == 404 and "error" in resp.get_json()
    assert client.get(f"/api/labels/{uuid.uuid4()}").status_code == 404


def test_snapshot_is_the_latest_annotated_frame(client: FlaskClient) -> None:
    resp = client.get("/api/sources/cars/snapshot.jpg")
    assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
    image = _decode(resp.data)
    assert image.shape[1] <= 960


# --------------------------------------------------------------------------- live view (MJPEG)


def test_mjpeg_stream_sends_jpeg_parts_and_frees_its_slot(app: Flask) -> None:
    ctx = app.extensions["edgelabel"]
    client = app.test_client()
    resp = client.get("/api/sources/cars/stream.mjpg", buffered=False)
    assert resp.status_code == 200
    assert resp.mimetype == "multipart/x-mixed-replace"
    assert resp.headers["Cache-Control"] == "no-store"
    it = iter(resp.response)
    t0 = time.monotonic()
    parts = [next(it) for _ in range(3)]
    elapsed = time.monotonic() - t0
    for part in parts:
        assert part.startswith(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: ")
        head, _, body = part.partition(b"\r\n\r\n")
        length = int(head.rsplit(b" ", 1)[1])
        assert body[:2] == b"\xff\xd8" and len(body) == length + 2
    assert 0.15 <= elapsed < 5  # three parts at most 10 per second: rate-limited
    assert ctx.streams == 1
    resp.close()
    assert ctx.streams == 0


def test_live_views_are_capped(app: Flask) -> None:
    ctx = app.extensions["edgelabel"]
    ctx.max_streams = 1
    client = app.test_client()
    first = client.get("/api/sources/cars/stream.mjpg", buffered=False)
    second = client.get("/api/sources/cars/stream.mjpg", buffered=False)
    try:
        assert first.status_code == 200 and second.status_code == 503
        assert "too many live views" in second.get_json()["error"]
        assert client.get("/api/status").status_code == 200
    finally:
        first.close()
        second.close()
    assert ctx.streams == 0
    assert client.get("/api/sources/nope/stream.mjpg").status_code == 404


# --------------------------------------------------------------------------- auth: token, login, CSRF


def test_pause_needs_the_token(client: FlaskClient, daemon: Daemon) -> None:
    resp = client.post("/api/sources/cars/pause")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.get_json()["login"] == "/login"
    wrong = client.post("/api/sources/cars/pause", headers=bearer("wrong-token"))
    assert wrong.status_code == 401
    form = client.post("/sources/cars/pause", data={"csrf_token": "x"})
    assert form.status_code == 302 and form.headers["Location"].startswith("/login")
    assert daemon.pipeline.status()["sources"]["cars"]["paused"] is False


def test_pause_and_resume_with_bearer_token(client: FlaskClient, daemon: Daemon) -> None:
    try:
        resp = client.post("/api/sources/cars/pause", headers=bearer())
        assert resp.status_code == 200 and resp.get_json()["paused"] is True
        assert resp.get_json()["status"] == "online"  # paused is not a state of its own
        time.sleep(0.5)  # a frame in flight may still be counted
        before = daemon.pipeline.status()["sources"]["cars"]["frames_in"]
        time.sleep(1.0)
        after = daemon.pipeline.status()["sources"]["cars"]
        assert after["frames_in"] == before and after["paused"] is True  # a paused file stops reading
        assert client.get("/api/sources/cars").get_json()["paused"] is True
        assert client.post("/api/sources/nope/pause", headers=bearer()).status_code == 404
    finally:
        resp = client.post("/api/sources/cars/resume", headers=bearer())
    assert resp.status_code == 200 and resp.get_json()["paused"] is False
    assert wait_for(lambda: daemon.pipeline.status()["sources"]["cars"]["frames_in"] > after["frames_in"], 5)


def test_login_form_session_and_csrf(app: Flask, daemon: Daemon) -> None:
    client = app.test_client()
    page = client.get("/login")
    token = csrf_from(page.text)
    assert TOKEN not in page.text
    assert client.post("/login", data={"token": TOKEN}).status_code == 403  # no CSRF token: refused
    wrong = client.post("/login", data={"token": "nope", "csrf_token": token})
    assert wrong.status_code == 401 and "Wrong token" in wrong.text
    ok = client.post("/login", data={"token": TOKEN, "csrf_token": token, "next": "//evil.example/x"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/"  # no open redirect
    cookie = client.get_cookie("edgelabel_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"
    csrf = csrf_from(client.get("/").text)
    assert csrf != token  # a new session, a new CSRF token
    try:
        no_csrf = client.post("/api/sources/cars/pause")
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.get_json()["error"]
        bad_csrf = client.post("/api/sources/cars/pause", headers={"X-CSRF-Token": "forged"})
        assert bad_csrf.status_code == 403
        ok = client.post("/api/sources/cars/pause", headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200 and ok.get_json()["paused"] is True
        assert client.get("/api/status").get_json()["web"]["authenticated"] is True
        # the no-script form works too, with the CSRF field
        form = client.post("/sources/cars/resume", data={"csrf_token": csrf, "back": "source"})
        assert form.status_code == 302 and form.headers["Location"] == "/sources/cars"
        assert daemon.pipeline.status()["sources"]["cars"]["paused"] is False
    finally:
        daemon.pipeline.set_source_paused("cars", False)
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.post("/api/sources/cars/pause", headers={"X-CSRF-Token": csrf}).status_code == 401


def test_repeated_wrong_tokens_are_throttled(app: Flask) -> None:
    client = app.test_client()
    token = csrf_from(client.get("/login").text)
    codes = [client.post("/login", data={"token": f"guess{i}", "csrf_token": token}).status_code for i in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] == 429
    # even the right token is refused for a while from that address
    assert client.post("/login", data={"token": TOKEN, "csrf_token": token}).status_code == 429


def test_public_read_false_needs_login_everywhere(daemon: Daemon) -> None:
    cfg = dataclasses.replace(daemon.cfg, web=dataclasses.replace(daemon.cfg.web, public_read=False))
    client = app_for(daemon, cfg).test_client()
    page = client.get("/")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    for path in ("/api/status", "/api/labels", "/metrics", "/api/sources/cars/snapshot.jpg", "/api/openapi.yaml"):
        assert client.get(path).status_code == 401, path
    health = client.get("/healthz")
    assert health.status_code == 200 and "reasons" not in health.get_json()  # no source names to strangers
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/login").status_code == 200
    assert client.get("/api/status", headers=bearer()).status_code == 200
    assert "reasons" in client.get("/healthz", headers=bearer()).get_json()
    login(client)
    assert client.get("/").status_code == 200 and client.get("/labels").status_code == 200


# --------------------------------------------------------------------------- secrets


def test_token_and_key_files_are_generated_0600_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path)
    with caplog.at_level(logging.INFO):
        token, key = load_secrets(cfg)
    token_file, key_file = tmp_path / "state" / "web-token", tmp_path / "state" / "web-secret-key"
    assert token_file.read_text().strip() == token and key_file.read_text().strip() == key
    assert token != key and len(token) >= 40 and len(key) >= 40
    for f in (token_file, key_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert str(token_file) in caplog.text and token not in caplog.text and key not in caplog.text
    assert load_secrets(cfg) == (token, key)  # kept across restarts
    os.chmod(token_file, 0o644)
    assert load_secrets(cfg)[0] == token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    configured = make_cfg(tmp_path / "b", web={"token": "from-the-config-file-123"})
    assert load_secrets(configured)[0] == "from-the-config-file-123"
    assert not (tmp_path / "b" / "state" / "web-token").exists()


def test_no_secret_reaches_pages_api_or_logs(daemon: Daemon, tmp_path: Path) -> None:
    handler = RingLogHandler()
    app = create_app(daemon.cfg, daemon.pipeline, daemon.sink, log_handler=handler,
                     test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY})
    logger = logging.getLogger("edgelabel.test.secrets")
    logger.addHandler(handler)
    try:
        logger.warning("connect rtsp://admin:CamPa55word@10.0.0.9/stream failed")
        logger.error("broker refused user with password %s (token %s)", MQTT_PASSWORD, TOKEN)
        try:
            raise ValueError(f"bad {SECRET_KEY}")
        except ValueError:
            logger.exception("wrapped")
    finally:
        logger.removeHandler(handler)
    client = app.test_client()
    login(client)
    bodies = []
    for path in ("/", "/api/status", "/api/sources", "/api/labels?limit=5", "/logs", "/api/logs", "/metrics",
                 "/labels", "/sources/cars", "/healthz"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        bodies.append(resp.text)
    text = "\n".join(bodies)
    for secret in (TOKEN, SECRET_KEY, MQTT_PASSWORD, "CamPa55word"):
        assert secret not in text
    logs = client.get("/api/logs").get_json()["entries"]
    assert [e["level"] for e in logs] == ["warning", "error", "error"]
    assert "rtsp://admin:***@10.0.0.9/stream" in logs[0]["message"] and "***" in logs[1]["message"]


def test_redactor_masks_secret_fields_in_foreign_status() -> None:
    from edgelabel.web.redact import Redactor

    r = Redactor(["tok-123456"])
    out = r.data({"mqtt": {"password": "p", "broker": "mqtt://u:pw@host:1883", "connected": True, "token_count": 3,
                           "note": "uses tok-123456", "tls": {"key_password": "k"}}})
    assert out["mqtt"]["password"] == "***" and out["mqtt"]["tls"]["key_password"] == "***"
    assert out["mqtt"]["broker"] == "mqtt://u:***@host:1883" and out["mqtt"]["note"] == "uses ***"
    assert out["mqtt"]["connected"] is True and out["mqtt"]["token_count"] == 3  # numbers are not secrets


# --------------------------------------------------------------------------- health and metrics


def test_healthz_ready(client: FlaskClient) -> None:
    resp = client.get("/healthz")
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body == {"status": "ok", "live": True, "ready": True, "reasons": [],
                    "checks": {"model_loaded": True, "pipeline_running": True, "sources": {"cars": "online"}}}


def test_healthz_503_before_the_model_is_loaded(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[sink], show_progress=False)  # not started: no model yet
    client = create_app(cfg, pipeline, sink, test_config={"TESTING": True}).test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 503
    assert "model not loaded" in resp.get_json()["reasons"]
    # the secrets were generated into the state folder on the way
    assert (tmp_path / "state" / "web-token").is_file() and (tmp_path / "state" / "web-secret-key").is_file()


def test_healthz_503_when_all_sources_are_offline(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, sources={"gone": {"uri": str(tmp_path / "missing.mp4")}})
    sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[sink], show_progress=False)
    pipeline.start()
    try:
        client = create_app(cfg, pipeline, sink, test_config={"TESTING": True}).test_client()
        assert wait_for(lambda: pipeline.status()["sources"]["gone"]["status"] == "offline", 10)
        resp = client.get("/healthz")
        reasons = resp.get_json()["reasons"]
        assert resp.status_code == 503 and any(r.startswith("all sources offline: gone") for r in reasons), reasons
    finally:
        pipeline.shutdown()


def test_metrics_prometheus_format_per_app_registry(daemon: Daemon) -> None:
    app1, app2 = app_for(daemon), app_for(daemon)
    resp = app1.test_client().get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain; version=0.0.4")
    text = resp.text
    assert re.search(r'^edgelabel_frames_total\{source="cars"\} [1-9]', text, re.M)
    assert re.search(r'^edgelabel_detections_total\{class="car",source="cars"\} [1-9]', text, re.M)
    assert re.search(r'^edgelabel_inference_latency_seconds_bucket\{le="\+Inf"\} [1-9]', text, re.M)
    assert re.search(r"^edgelabel_inference_latency_seconds_sum [0-9.]+", text, re.M)
    assert re.search(r'^edgelabel_source_fps\{direction="in",source="cars"\} ', text, re.M)
    assert re.search(r'^edgelabel_source_fps\{direction="out",source="cars"\} ', text, re.M)
    assert re.search(r'^edgelabel_source_frames_dropped_total\{source="cars"\} 0', text, re.M)
    assert re.search(r'^edgelabel_source_state\{source="cars",state="online"\} 1', text, re.M)
    assert 'edgelabel_model_info{engine="onnxruntime"' in text and "edgelabel_up 1.0" in text
    assert "# TYPE edgelabel_mqtt_outbox_depth gauge" in text and "# TYPE edgelabel_mqtt_dropped_total counter" in text
    om = app1.test_client().get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.content_type.startswith("application/openmetrics-text") and om.text.rstrip().endswith("# EOF")
    assert app2.test_client().get("/metrics").status_code == 200  # a second app: its own registry, no clash
    assert app1.extensions["edgelabel_metrics"] is not app2.extensions["edgelabel_metrics"]
    assert not any(n.startswith("edgelabel") for n in REGISTRY._names_to_collectors)  # never the global one


def test_mqtt_card_reads_outbox_keys_defensively() -> None:
    from edgelabel.web.context import mqtt_summary

    assert mqtt_summary({}, enabled=False)["enabled"] is False
    old = mqtt_summary({"mqtt": {"connected": True, "broker": "h:1883", "pending": 4, "dropped": 1,
                                 "last_publish_at": 1.5}}, True)
    assert (old["connected"], old["outbox_depth"], old["dropped"], old["last_publish_at"]) == (True, 4, 1, 1.5)
    # the shape of the outbox-backed sink: ``dropped`` already counts the outbox's losses
    new = mqtt_summary({"mqtt": {"connected": False, "pending": 120, "dropped": 5, "inflight": 2,
                                 "drops": {"outbox_full": 3, "rejected": 2}, "outbox": {"depth": 120, "evicted": 3}}},
                       True)
    assert (new["connected"], new["outbox_depth"], new["dropped"]) == (False, 120, 5)
    assert new["drops"] == {"outbox_full": 3, "rejected": 2} and new["details"]["inflight"] == 2
    bare = mqtt_summary({"mqtt": {"outbox": {"depth": 2, "evicted": 1, "expired": 2}}}, True)
    assert (bare["outbox_depth"], bare["dropped"]) == (2, 3)
    flat = mqtt_summary({"mqtt": {"outbox_depth": 7, "outbox": "sqlite", "connected": "yes"}}, True)
    assert flat["outbox_depth"] == 7 and flat["connected"] is None


def test_device_monitor_reads_jetson_sysfs(tmp_path: Path) -> None:
    sys_root = tmp_path / "sys"
    for i, (kind, milli) in enumerate([("CPU-therm", 45500), ("GPU-therm", 43000), ("AO-therm", "garbage")]):
        zone = sys_root / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(f"{kind}\n")
        (zone / "temp").write_text(f"{milli}\n")
    (sys_root / "devices" / "gpu.0").mkdir(parents=True)
    (sys_root / "devices" / "gpu.0" / "load").write_text("345\n")
    mon = DeviceMonitor({"state": tmp_path}, sys_root=sys_root, nvidia_smi="")
    snap = mon.snapshot()
    assert snap["temperatures"] == [
        {"zone": "thermal_zone0", "type": "CPU-therm", "celsius": 45.5},
        {"zone": "thermal_zone1", "type": "GPU-therm", "celsius": 43.0},
    ]
    assert snap["gpu"] == {"available": True, "source": "jetson", "load_percent": 34.5}
    empty = DeviceMonitor({"state": tmp_path}, sys_root=tmp_path / "nothing", nvidia_smi="").snapshot()
    assert empty["temperatures"] == [] and empty["gpu"]["available"] is False
    broken = DeviceMonitor({"state": tmp_path}, sys_root=tmp_path / "nothing", nvidia_smi=str(tmp_path / "no-smi"))
    assert broken.gpu() == {"available": False, "reason": "nvidia-smi gave no readable answer"}


def test_openapi_documents_every_api_route(app: Flask, client: FlaskClient) -> None:
    resp = client.get("/api/openapi.yaml")
    assert resp.status_code == 200 and resp.mimetype == "application/yaml"
    doc = yaml.safe_load(resp.data)
    resp.close()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops if method != "parameters"}
    served = set()
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/metrics")):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented

    def no_none(node: Any, where: str = "") -> None:  # a stray comma in a YAML flow mapping makes a null key
        if isinstance(node, dict):
            for k, v in node.items():
                assert v is not None or k in ("nullable",), f"{where}/{k} is null"
                no_none(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                no_none(v, f"{where}/{i}")

    no_none(doc)


def _json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema as JSON Schema (``nullable`` becomes a null type)."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def test_api_answers_match_the_openapi_schemas(client: FlaskClient) -> None:
    import jsonschema

    doc = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("web", "openapi.yaml").read_text())
    components = {"schemas": _json_schema(doc["components"]["schemas"])}

    def check(url: str, schema: str, code: int = 200) -> None:
        resp = client.get(url)
        assert resp.status_code == code, url
        validator = jsonschema.Draft202012Validator({"components": components, "$ref": f"#/components/schemas/{schema}"})
        errors = sorted(validator.iter_errors(resp.get_json()), key=str)
        assert not errors, f"{url}: {errors[0]}"

    check("/api/status", "Status")
    check("/api/sources/cars", "Source")
    check("/api/labels?limit=3", "LabelsPage")
    check("/healthz", "Health")
    check("/api/logs", "Logs")
    check("/api/labels?limit=0", "Error", 400)


# --------------------------------------------------------------------------- the real server (waitress)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _open_stream(url: str) -> socket.socket:
    """An MJPEG viewer: a raw socket that has read the first part and then just stays open."""
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()  # type: ignore[union-attr]
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\xff\xd8" not in data:
        chunk = s.recv(65536)
        assert chunk, data[:200]
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return s


def test_waitress_streams_do_not_block_the_api(daemon: Daemon) -> None:
    cfg = dataclasses.replace(daemon.cfg, web=dataclasses.replace(daemon.cfg.web, threads=6, host="127.0.0.1",
                                                                  port=free_port()))
    root = logging.getLogger()
    server = start_web(daemon.pipeline, daemon.sink, cfg)
    viewers: list[socket.socket] = []
    try:
        assert any(isinstance(h, RingLogHandler) for h in root.handlers)  # the log panel's buffer is installed
        assert server.url == f"http://127.0.0.1:{cfg.web.port}"
        status, body, headers = _get(server.url + "/healthz")
        assert status == 200 and headers["Server"] == "edgelabel"
        viewers = [_open_stream(server.url + "/api/sources/cars/stream.mjpg") for _ in range(2)]  # 6 - 4 slots
        status, body, _ = _get(server.url + "/api/sources/cars/stream.mjpg")
        assert status == 503
        for _ in range(5):  # the API stays quick while every live-view slot is taken
            t0 = time.monotonic()
            status, body, _ = _get(server.url + "/api/status")
            assert status == 200 and time.monotonic() - t0 < 2.0
    finally:
        t0 = time.monotonic()
        server.stop()
        for v in viewers:
            v.close()
    assert time.monotonic() - t0 < 6
    assert not any(isinstance(h, RingLogHandler) for h in root.handlers)  # removed on stop
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cfg.web.port), timeout=1).close()
    server.stop()  # idempotent


def test_start_web_reports_a_taken_port(daemon: Daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = list(logging.getLogger().handlers)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_web(daemon.pipeline, daemon.sink, daemon.cfg, host="127.0.0.1", port=port)
        assert logging.getLogger().handlers == before


# --------------------------------------------------------------------------- SourceRunner pause/resume


class Camera(Source):
    """A live source that always has a new frame: enough to see what a paused camera does."""

    live = True

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.reads = 0
        self.opens = 0
        self.closes = 0

    def open(self) -> None:
        self.opens += 1

    def read(self) -> Frame | None:
        time.sleep(0.01)
        self.reads += 1
        return Frame(self.name, self.reads, np.zeros((4, 4, 3), np.uint8), time.time(), f"cam@{self.reads}", live=True)

    def close(self) -> None:
        self.closes += 1


def test_paused_camera_keeps_its_device_open_but_emits_nothing() -> None:
    hub, stop = FrameHub(), threading.Event()
    statuses: list[str] = []
    cam = Camera("cam", SourceConfig(uri="x", name="cam", reconnect=ReconnectConfig(initial=0.05, max=0.1)), "x")
    runner = SourceRunner(cam, hub, lambda n, s: statuses.append(s), stop)
    runner.start()
    try:
        assert wait_for(lambda: runner.stats().frames_in > 5, 5)
        runner.pause()
        assert runner.paused and runner.stats().paused
        time.sleep(0.1)
        frames, reads, delivered = runner.stats().frames_in, cam.reads, hub.dropped("cam") + hub.pending("cam")
        time.sleep(0.4)
        st = runner.stats()
        assert st.frames_in == frames and hub.dropped("cam") + hub.pending("cam") == delivered  # nothing emitted
        assert cam.reads > reads + 10  # still reading: the device stays open and its buffer fresh
        assert st.status == "online" and cam.opens == 1 and cam.closes == 0
        assert wait_for(lambda: runner.stats().fps_in == 0.0, 3)
        runner.resume()
        assert not runner.paused
        assert wait_for(lambda: runner.stats().frames_in > frames + 5, 5)
        assert wait_for(lambda: runner.stats().fps_in > 20, 3)
    finally:
        stop.set()
        runner.join(3)
    assert statuses == ["online"]


def test_paused_video_stops_reading_and_continues_where_it_was(assets: Path) -> None:
    from edgelabel.edge.sources import create_source

    hub, stop = FrameHub(), threading.Event()
    src = create_source(SourceConfig(uri=str(assets / "videos" / "cars.mp4"), name="clip"))
    runner = SourceRunner(src, hub, lambda n, s: None, stop)
    got: list[int] = []

    def consume() -> None:
        while not stop.is_set():
            f = hub.get(timeout=0.1)
            if f is not None:
                got.append(f.index)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    runner.start()
    try:
        assert wait_for(lambda: len(got) > 10, 10)
        runner.pause()
        time.sleep(0.3)
        n = runner.stats().frames_in
        time.sleep(0.5)
        assert runner.stats().frames_in == n and runner.stats().paused and runner.stats().status == "online"
        runner.resume()
        assert wait_for(lambda: runner.stats().status == "finished" and len(got) == 268, 30)
    finally:
        stop.set()
        runner.join(3)
        consumer.join(3)
    assert got == list(range(268))  # nothing skipped, nothing twice


# --------------------------------------------------------------------------- frames stored by the dataset


def test_frames_come_from_the_dataset_when_it_stored_them(tmp_path: Path, assets: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        (images / name).write_bytes((assets / "images" / name).read_bytes())
    cfg = make_cfg(tmp_path, sources={"shots": {"uri": str(images) + "/"}},
                   dataset={"enabled": True, "path": str(tmp_path / "dataset"), "save_images": "always"})
    sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[sink], show_progress=False)
    pipeline.start()
    try:
        assert pipeline.wait(60)
    finally:
        pipeline.shutdown()
    client = create_app(cfg, pipeline, sink, test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN,
                                                          "SECRET_KEY": SECRET_KEY}).test_client()
    items = client.get("/api/labels?source=shots").get_json()["items"]
    assert len(items) == 2
    for rec in items:
        kept = sink.get(rec["id"])
        assert kept is not None and kept.jpeg is None  # no copy of our own: the dataset has the pixels
        assert not Path(rec["frame_path"]).is_absolute() and (tmp_path / "dataset" / rec["frame_path"]).is_file()
        raw = _decode(client.get(rec["frame_url"] + "?raw=1").data)
        boxed = _decode(client.get(rec["frame_url"]).data)
        assert raw.shape == boxed.shape == (rec["height"], rec["width"], 3)  # the stored frame, full size
        assert float(np.abs(raw.astype(int) - boxed.astype(int)).mean()) > 0.5


def test_a_record_path_outside_the_dataset_is_never_served(tmp_path: Path, daemon: Daemon) -> None:
    cfg = make_cfg(tmp_path, dataset={"enabled": True, "path": str(tmp_path / "dataset")})
    (tmp_path / "dataset").mkdir()
    secret = tmp_path / "outside.jpg"
    cv2.imwrite(str(secret), np.full((8, 8, 3), 255, np.uint8))
    sink = WebSink(cfg)
    record = daemon.sink.recent()[0].record
    forged = dataclasses.replace(record, id=str(uuid.uuid4()), frame_path="../outside.jpg")
    sink.write(forged, Frame("cars", 0, np.zeros((4, 4, 3), np.uint8), time.time(), "k"))
    client = create_app(cfg, daemon.pipeline, sink, test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN,
                                                                 "SECRET_KEY": SECRET_KEY}).test_client()
    resp = client.get(f"/api/frames/{forged.id}.jpg")
    assert resp.status_code == 404 and resp.mimetype == "application/json"


def test_a_live_view_that_starts_waiting_after_the_stop_began_returns_at_once(daemon: Daemon) -> None:
    """The web server stops by setting ``closing`` and waking the viewers; a viewer that was between its check
    of ``closing`` and its wait missed the wake-up and slept its whole keepalive (5 s), holding up SIGTERM."""
    closing = threading.Event()
    closing.set()
    t0 = time.monotonic()
    daemon.sink.wait_jpeg("cars", 10**12, 5.0, cancel=closing)  # no frame will ever be newer than this
    assert time.monotonic() - t0 < 1.0

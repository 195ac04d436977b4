"""Authentication on the plant LAN: token strength, sessions that end, throttles that summarize and cannot lock
everyone out, named operators with roles.

The app runs on a real dataset (tests/test_review.py's) behind the review stand-in pipeline; the proxy test
starts the real waitress server, because only waitress applies ``web.trusted_proxy`` to X-Forwarded-For.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import logging
import re
import shutil
import ssl
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edgelabel.edge.config import Config, ConfigError, config_from_dict
from edgelabel.web.app import create_app
from edgelabel.web.auth import BEARER_FAILURES, FailureThrottle, load_secrets, token_digest
from edgelabel.web.server import start_web
from edgelabel.web.sink import WebSink
from edgelabel.web.tls import ensure_self_signed, fingerprint
from tests.test_review import FakePipeline, build

TOKEN = "auth-test-admin-token-0123456789"
KEY = "auth-test-secret-key-" + "k" * 32
VIEWER = "viewer-token-Abcdefgh12345"
REVIEWER = "reviewer-token-Abcdefgh12345"
HOWTO = 'python -c "import secrets; print(secrets.token_urlsafe(24))"'


def cfg_for(tmp: Path, **web: Any) -> Config:
    return config_from_dict({
        "device_id": "auth-dev", "state_dir": str(tmp / "state"),
        "model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "v4l2:///dev/video9"}},
        "mqtt": {"enabled": False}, "dataset": {"path": str(tmp / "ds")},
        "web": {"enabled": True, **web},
    }, base_dir=tmp)


def make_app(cfg: Config, token: str = TOKEN, sinks: list[Any] | None = None,
             clock: Callable[[], float] | None = None) -> Flask:
    return create_app(cfg, FakePipeline(cfg, sinks or []), WebSink(cfg),
                      test_config={"TESTING": True, "EDGELABEL_TOKEN": token, "SECRET_KEY": KEY}, clock=clock)


class Clock:
    """Time that moves only when told (the account store's clock: sessions' idle and absolute lifetimes)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def csrf_from(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client: FlaskClient, token: str = TOKEN, addr: str = "127.0.0.1") -> int:
    env = {"REMOTE_ADDR": addr}
    page = client.get("/login", environ_base=env)
    return client.post("/login", data={"token": token, "csrf_token": csrf_from(page.text)},
                       environ_base=env).status_code


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- weak tokens


@pytest.mark.parametrize("weak", ["a", "short-Token-1", "a" * 40, "1234567890123456789"])
def test_weak_tokens_are_refused_with_how_to_make_one(tmp_path: Path, weak: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, token=weak)
    (problem,) = err.value.problems
    assert problem.startswith("web.token: ") and HOWTO in problem
    with pytest.raises(ConfigError, match=r"web\.operators\.dana\.token: .*secrets\.token_urlsafe"):
        cfg_for(tmp_path, operators={"dana": {"role": "reviewer", "token": weak}})


def test_a_strong_token_and_a_generated_one_are_accepted_and_a_weak_token_file_is_refused(tmp_path: Path) -> None:
    assert cfg_for(tmp_path, token="Zq9-plant-token-2026").web.token == "Zq9-plant-token-2026"
    cfg = cfg_for(tmp_path)
    token, _ = load_secrets(cfg)  # generated: always strong
    assert len(token) >= 40
    (tmp_path / "state" / "web-token").write_text("abc\n")  # edited by hand
    with pytest.raises(ConfigError, match=r"web\.token_file .*web-token.*at least 16"):
        load_secrets(cfg)


# --------------------------------------------------------------------------- sessions end


def test_logout_ends_the_session_server_side_also_across_a_restart(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    app = make_app(cfg)
    client = app.test_client()
    assert login(client) == 302
    stolen = client.get_cookie("edgelabel_session").value  # what a copy of the cookie would hold
    csrf = csrf_from(client.get("/").text)
    assert client.get("/api/status").get_json()["web"]["authenticated"] is True
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302

    for fresh_app in (app, make_app(cfg)):  # the same process, and after a restart (the list is in state_dir)
        replay = fresh_app.test_client()
        replay.set_cookie("edgelabel_session", stolen)
        assert replay.get("/api/status").get_json()["web"]["authenticated"] is False
        assert replay.get("/api/review/queue").status_code == 401


def test_changing_the_token_ends_every_session(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    client = make_app(cfg).test_client()
    assert login(client) == 302
    cookie = client.get_cookie("edgelabel_session").value
    same = make_app(cfg).test_client()
    same.set_cookie("edgelabel_session", cookie)
    assert same.get("/api/status").get_json()["web"]["authenticated"] is True  # a restart keeps sessions
    changed = make_app(cfg, token="auth-test-NEW-token-0123456789").test_client()
    changed.set_cookie("edgelabel_session", cookie)
    assert changed.get("/api/status").get_json()["web"]["authenticated"] is False


def test_a_session_ends_24_hours_after_login_however_busy(tmp_path: Path) -> None:
    clock = Clock()
    client = make_app(cfg_for(tmp_path), clock=clock).test_client()
    assert login(client) == 302
    for _ in range(2):  # busy: a request every 11 h keeps it from idling out
        clock.advance(11 * 3600)
        assert client.get("/api/status").get_json()["web"]["authenticated"] is True
    clock.advance(2.5 * 3600)  # 24.5 h after login
    assert client.get("/api/status").get_json()["web"]["authenticated"] is False
    assert client.get("/api/review/queue").status_code == 401


# --------------------------------------------------------------------------- bearer throttle


def test_wrong_bearer_tokens_are_throttled_per_address_and_summarized_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(cfg_for(tmp_path))
    c = app.test_client()
    attacker = {"REMOTE_ADDR": "10.9.9.9"}
    with caplog.at_level(logging.WARNING, logger="edgelabel.web"):
        codes = [c.get("/api/review/queue", headers=bearer(f"guess-{i:04d}-abcdefghij"), environ_base=attacker)
                 for i in range(300)]
    assert [r.status_code for r in codes[:BEARER_FAILURES]] == [401] * BEARER_FAILURES
    refused = codes[BEARER_FAILURES:]
    assert {r.status_code for r in refused} == {429}
    assert 1 <= int(refused[-1].headers["Retry-After"]) <= 60 and "retry after" in refused[-1].get_json()["error"]
    # even the right token waits at that address: a throttle that answered it would confirm a guess
    assert c.get("/api/review/queue", headers=bearer(TOKEN), environ_base=attacker).status_code == 429
    lines = [r.getMessage() for r in caplog.records if "bearer token" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # not 300
    # another address is not affected
    assert c.get("/api/review/queue", headers=bearer(TOKEN), environ_base={"REMOTE_ADDR": "10.0.0.5"}).status_code != 429


def test_a_spray_from_many_addresses_hits_the_global_budget_but_not_operators_known_to_be_good(tmp_path: Path) -> None:
    app = make_app(cfg_for(tmp_path))
    state = app.extensions["edgelabel_auth"]
    state.bearer_throttle = FailureThrottle("bearer token", max_failures=20, window=60, global_failures=50,
                                            global_penalty=5)
    c = app.test_client()
    good = {"REMOTE_ADDR": "10.0.0.7"}
    assert c.get("/api/review/queue", headers=bearer(TOKEN), environ_base=good).status_code != 401
    for i in range(60):  # 60 addresses, one guess each: no address is over its own limit
        c.get("/api/status", headers=bearer(f"spray-{i}-abcdefghijkl"), environ_base={"REMOTE_ADDR": f"10.1.0.{i}"})
    newcomer = c.get("/api/status", headers=bearer(TOKEN), environ_base={"REMOTE_ADDR": "10.2.0.1"})
    assert newcomer.status_code == 429 and int(newcomer.headers["Retry-After"]) <= 5  # a short penalty only
    assert c.get("/api/status", headers=bearer(TOKEN), environ_base=good).status_code == 200


# --------------------------------------------------------------------------- login throttle keying


class _Browser:
    """urllib with cookies, and the X-Forwarded-For a reverse proxy would add."""

    def __init__(self, base: str, client_ip: str) -> None:
        self.base, self.ip = base, client_ip
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                                  _NoRedirect())

    def login(self, token: str) -> int:
        page = self.opener.open(self._req("/login"), timeout=10).read().decode()
        data = f"token={token}&csrf_token={csrf_from(page)}".encode()
        try:
            return int(self.opener.open(self._req("/login", data), timeout=10).status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def _req(self, path: str, data: bytes | None = None) -> urllib.request.Request:
        return urllib.request.Request(self.base + path, data=data, headers={"X-Forwarded-For": self.ip})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_behind_a_trusted_proxy_one_guesser_does_not_lock_out_the_other_operators(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, token=TOKEN, trusted_proxy="127.0.0.1")
    server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    try:
        guesser = _Browser(server.url, "10.20.0.66")
        codes = [guesser.login(f"wrong-{i}-abcdefghijkl") for i in range(6)]
        assert codes == [401] * 5 + [429]
        assert guesser.login(TOKEN) == 429
        # every operator reaches the page through the same proxy address, and still logs in
        assert _Browser(server.url, "10.20.0.7").login(TOKEN) == 302
        # the proxy speaks HTTPS to the browser: the session cookie is Secure
        req = urllib.request.Request(server.url + "/login", headers={"X-Forwarded-For": "10.20.0.8",
                                                                     "X-Forwarded-Proto": "https"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "; secure" in resp.headers["Set-Cookie"].lower()
        with urllib.request.urlopen(server.url + "/login", timeout=10) as resp:
            assert "; secure" not in resp.headers["Set-Cookie"].lower()
    finally:
        server.stop()


def test_without_a_trusted_proxy_a_forged_x_forwarded_for_does_not_escape_the_throttle(tmp_path: Path) -> None:
    """A LAN client that sends a new X-Forwarded-For with every guess is still counted by its own address."""
    cfg = cfg_for(tmp_path, token=TOKEN)
    server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    try:
        codes = [_Browser(server.url, f"10.30.0.{i}").login(f"wrong-{i}-abcdefghijkl") for i in range(6)]
        assert codes == [401] * 5 + [429]
        # and X-Forwarded-Proto from it does not make the cookie Secure (nor the request HTTPS)
        req = urllib.request.Request(server.url + "/login", headers={"X-Forwarded-Proto": "https"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "; secure" not in resp.headers["Set-Cookie"].lower()
    finally:
        server.stop()


def test_login_failures_from_many_addresses_cost_new_addresses_a_short_wait_only(tmp_path: Path) -> None:
    app = make_app(cfg_for(tmp_path))
    c = app.test_client()
    assert login(c, addr="10.0.0.7") == 302  # an operator who logged in lately
    for i in range(30):
        assert login(app.test_client(), "wrong-token-abcdefghijkl", addr=f"10.3.0.{i}") == 401
    refused = app.test_client()
    page = refused.get("/login", environ_base={"REMOTE_ADDR": "10.4.0.1"})
    resp = refused.post("/login", data={"token": TOKEN, "csrf_token": csrf_from(page.text)},
                        environ_base={"REMOTE_ADDR": "10.4.0.1"})
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) <= 30
    assert login(app.test_client(), addr="10.0.0.7") == 302


# --------------------------------------------------------------------------- operators and roles


@pytest.fixture
def roles_app(tmp_path: Path) -> Iterator[tuple[Flask, Any]]:
    cfg = cfg_for(tmp_path, operators={
        "vera": {"role": "viewer", "token": VIEWER},
        "dana": {"role": "reviewer", "token_sha256": token_digest(REVIEWER).hex()},
    })
    sink, recs = build(tmp_path / "ds")
    yield make_app(cfg, sinks=[sink]), recs
    sink.close()


def test_a_viewer_reads_but_cannot_change_state(roles_app: tuple[Flask, Any]) -> None:
    app, recs = roles_app
    c = app.test_client()
    rid = recs[0].id
    assert c.get("/api/review/queue", headers=bearer(VIEWER)).status_code == 200
    for method, url, body in (("post", f"/api/review/items/{rid}", {"action": "accept"}),
                              ("post", "/api/sources/cam/pause", None)):
        resp = getattr(c, method)(url, headers=bearer(VIEWER), json=body)
        assert resp.status_code == 403 and "vera" in resp.get_json()["error"] and "viewer" in resp.get_json()["error"]
    assert login(c, VIEWER) == 302
    csrf = csrf_from(c.get("/").text)
    assert c.post(f"/api/review/items/{rid}", json={"action": "accept"},
                  headers={"X-CSRF-Token": csrf}).status_code == 403


def test_a_review_decision_records_the_authenticated_name_not_a_typed_one(roles_app: tuple[Flask, Any]) -> None:
    app, recs = roles_app
    c = app.test_client()
    rid = recs[0].id
    resp = c.post(f"/api/review/items/{rid}", headers=bearer(REVIEWER), json={"action": "accept", "by": "the boss"})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["item"]["reviewed_by"] == "dana"
    # a reviewer may review, but pausing a source is an admin's
    assert c.post("/api/sources/cam/pause", headers=bearer(REVIEWER)).status_code == 403
    assert c.post("/api/sources/cam/pause", headers=bearer(TOKEN)).status_code == 404  # admin: reached the action
    assert login(c, REVIEWER) == 302
    assert "dana" in c.get("/review").text


def test_operator_entries_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, operators={"operator": {"role": "admin", "token": VIEWER},
                                     "x": {"role": "root", "token_sha256": "abc"}, "y": {"role": "viewer"}})
    text = "\n".join(err.value.problems)
    assert "web.operators.operator: operator names" in text
    assert "web.operators.x.role: 'root' is not allowed (use viewer, reviewer, admin)" in text
    assert "web.operators.x.token_sha256: expected 64 hex digits" in text
    assert "web.operators.y: set exactly one of token" in text
    assert VIEWER not in json.dumps(err.value.problems)


# --------------------------------------------------------------------------- HTTPS


def _https(url: str, cafile: Path, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(cafile))  # verifies the chain and the host name (127.0.0.1)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect())
    try:
        with opener.open(urllib.request.Request(url, data=data), timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_tls_auto_serves_https_with_a_generated_certificate_and_secure_cookies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = cfg_for(tmp_path, token=TOKEN, tls="auto")
    with caplog.at_level(logging.INFO, logger="edgelabel.web"):
        server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    cert = tmp_path / "state" / "web-tls-cert.pem"
    try:
        assert server.url.startswith("https://127.0.0.1:")
        assert stat.S_IMODE((tmp_path / "state" / "web-tls-key.pem").stat().st_mode) == 0o600
        assert fingerprint(cert) in caplog.text
        code, headers, body = _https(server.url + "/login", cert)
        assert code == 200 and "secure" in headers["set-cookie"].lower()
        # a body larger than one TLS record (16 KiB) arrives whole
        code, _, _ = _https(server.url + "/login", cert, data=b"token=x&pad=" + b"p" * 40000)
        assert code == 403  # no CSRF token: refused by the app, so the request was read to its end
        code, _, body = _https(server.url + "/api/openapi.yaml", cert)
        assert code == 200 and len(body) > 16384 and body.startswith(b"openapi")
        # plain HTTP on the HTTPS port is dropped, and the server goes on serving
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(server.url.replace("https://", "http://") + "/healthz", timeout=5)
        assert _https(server.url + "/login", cert)[0] == 200
        # concurrent clients (reads on the server loop, writes from worker threads): every answer whole
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _https(server.url + "/api/openapi.yaml", cert), range(40)))
        assert {(a[0], len(a[2])) for a in answers} == {(200, len(body))}
    finally:
        server.stop()
    # kept across restarts; and the same files work as web.tls: {cert, key}
    again = cfg_for(tmp_path, token=TOKEN, tls={"cert": str(cert), "key": str(tmp_path / "state" / "web-tls-key.pem")})
    before = cert.read_bytes()
    server = start_web(FakePipeline(again), WebSink(again), again, host="127.0.0.1", port=0)
    try:
        assert _https(server.url + "/login", cert)[0] == 200 and cert.read_bytes() == before
    finally:
        server.stop()


def test_a_missing_certificate_stops_the_start_with_the_file_name(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, token=TOKEN, tls={"cert": "nope.pem", "key": "nope.key"})
    with pytest.raises(ConfigError, match=r"web\.tls: cert file .*nope\.pem does not exist"):
        start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command here")
def test_without_the_cryptography_package_the_openssl_command_makes_the_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography -> ImportError
    cfg = cfg_for(tmp_path, token=TOKEN, tls="auto")
    cert, key = ensure_self_signed(cfg)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    try:
        assert _https(server.url + "/login", cert)[0] == 200
    finally:
        server.stop()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cert.unlink()
    with pytest.raises(ConfigError, match=r"web\.tls: auto needs the cryptography package \(pip install cryptography\)"):
        ensure_self_signed(cfg)


def test_a_blocked_address_or_user_name_is_not_forgotten_when_many_others_fail_once() -> None:
    """The throttles keep a bounded table; failures under throwaway names or addresses must not push a blocked
    entry out of it (that would give a guesser a fresh allowance)."""
    from edgelabel.web.throttle import CredentialThrottle

    names = CredentialThrottle(max_failures=10, window=900, max_keys=50)
    for _ in range(10):
        names.failed("alice", "user 'alice'")
    assert names.retry_after("alice", "10.0.0.9") > 0
    for i in range(500):
        names.failed(f"junk{i}", "an unknown user name")
    assert names.retry_after("alice", "10.0.0.9") > 0

    addrs = FailureThrottle("login", max_failures=5, window=300, global_failures=10**6, max_addresses=50)
    for _ in range(5):
        addrs.failed("10.0.0.66")
    assert addrs.retry_after("10.0.0.66") > 0
    for i in range(500):
        addrs.failed(f"10.1.{i // 250}.{i % 250}")
    assert addrs.retry_after("10.0.0.66") > 0

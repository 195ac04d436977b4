"""Local web accounts: users made with the real ``edgelabel user`` command, password logins, roles, API tokens,
server-side sessions that end (logout, password change, disable, removal, revocation, idle and absolute
lifetime), throttles per user name and per address, and no secret in the log or in a listing.

The app is the real one from its factory over a real dataset (tests/test_review.py's); one test goes through
the real waitress server.  Time moves through the account store's clock, never by sleeping.
"""

from __future__ import annotations

import http.cookiejar
import logging
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from edgelabel.edge.accounts import (
    ACCOUNTS_FILE,
    KIND_USER,
    AccountError,
    AccountStore,
    hash_password,
    verify_password,
)
from edgelabel.web.server import start_web
from edgelabel.web.sink import WebSink
from edgelabel.web.throttle import NAME_FAILURES
from tests.test_review import FakePipeline, build
from tests.test_web_auth import TOKEN, Clock, bearer, cfg_for, csrf_from, make_app

ALICE_PW = "alice correct horse battery"
RITA_PW = "rita staple-gun 4711"
VERA_PW = "vera looks at screens"


def write_config(tmp: Path) -> Path:
    """The same settings as cfg_for, as a file for the command line."""
    path = tmp / "edgelabel.yaml"
    path.write_text(yaml.safe_dump({
        "device_id": "auth-dev", "state_dir": str(tmp / "state"),
        "model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "v4l2:///dev/video9"}},
        "mqtt": {"enabled": False}, "dataset": {"path": str(tmp / "ds")}, "web": {"enabled": True},
    }))
    return path


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", *args, "-c", str(config)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def pw_login(client: FlaskClient, name: str, password: str, addr: str = "127.0.0.1") -> TestResponse:
    env = {"REMOTE_ADDR": addr}
    page = client.get("/login", environ_base=env)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": csrf_from(page.text)},
                       environ_base=env)


def authenticated(client: FlaskClient) -> bool:
    return bool(client.get("/api/status").get_json()["web"]["authenticated"])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Flask, Any, AccountStore, Clock]]:
    """An app over a real dataset, with alice (admin), rita (reviewer) and vera (viewer) in its account store."""
    clock = Clock()
    cfg = cfg_for(tmp_path)
    store = AccountStore(cfg.state_path(ACCOUNTS_FILE), clock)
    store.add_user("alice", "admin", ALICE_PW)
    store.add_user("rita", "reviewer", RITA_PW)
    store.add_user("vera", "viewer", VERA_PW)
    sink, recs = build(tmp_path / "ds")
    yield make_app(cfg, sinks=[sink], clock=clock), recs, store, clock
    sink.close()
    store.close()


# --------------------------------------------------------------------------- the command line


def test_users_are_managed_with_the_command_and_the_running_app_sees_every_change_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path)
    app = make_app(cfg_for(tmp_path))  # "the daemon", running before any account exists
    c = app.test_client()
    assert pw_login(c, "alice", ALICE_PW).status_code == 401

    added = cli(config, "user", "add", "alice", "--role", "admin", "--password-stdin", stdin=ALICE_PW + "\n")
    assert added.returncode == 0, added.stderr
    assert "alice added (admin)" in added.stdout
    path = tmp_path / "state" / ACCOUNTS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ALICE_PW.encode() not in path.read_bytes()  # only the scrypt hash
    # refused with a clear reason: a short password, no terminal and no --password-stdin, a taken name
    short = cli(config, "user", "add", "bob", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 12 are required" in short.stderr
    no_tty = cli(config, "user", "add", "bob", "--role", "viewer", stdin="")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    again = cli(config, "user", "add", "alice", "--role", "viewer", "--password-stdin", stdin="another long one\n")
    assert again.returncode == 2 and "already used by a user" in again.stderr
    reserved = cli(config, "user", "add", "operator", "--role", "viewer", "--password-stdin", stdin=ALICE_PW + "\n")
    assert reserved.returncode == 2 and "web.token" in reserved.stderr

    listed = cli(config, "user", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and "admin" in listed.stdout
    assert "enabled" in listed.stdout and "bob" not in listed.stdout and "scrypt" not in listed.stdout

    # the running app: the new user logs in without a restart
    assert pw_login(c, "alice", ALICE_PW).status_code == 302 and authenticated(c)
    # a password change from the command line ends the session at once; the new password works
    new_pw = "alice NEW horse battery"
    changed = cli(config, "user", "passwd", "alice", "--password-stdin", stdin=new_pw + "\n")
    assert changed.returncode == 0 and "1 session(s) ended" in changed.stdout, changed.stderr
    assert not authenticated(c) and c.get("/api/review/queue").status_code == 401
    assert pw_login(c, "alice", ALICE_PW).status_code == 401
    assert pw_login(c, "alice", new_pw).status_code == 302 and authenticated(c)
    # another role counts from the next request, without a new login
    assert c.post("/api/sources/cam/pause", headers={"X-CSRF-Token": csrf_from(c.get("/").text)}).status_code == 404
    assert cli(config, "user", "role", "alice", "viewer").returncode == 0
    demoted = c.post("/api/sources/cam/pause", headers={"X-CSRF-Token": csrf_from(c.get("/").text)})
    assert demoted.status_code == 403 and "has the role viewer" in demoted.get_json()["error"]
    assert cli(config, "user", "role", "alice", "admin").returncode == 0
    # disabled: the session ends and the password no longer works; enabled: it does again
    assert cli(config, "user", "disable", "alice").returncode == 0
    assert not authenticated(c)
    assert pw_login(c, "alice", new_pw).status_code == 401
    assert "disabled" in cli(config, "user", "list").stdout
    assert cli(config, "user", "enable", "alice").returncode == 0
    assert pw_login(c, "alice", new_pw).status_code == 302 and authenticated(c)
    # removed: the session ends, the name is gone
    removed = cli(config, "user", "remove", "alice")
    assert removed.returncode == 0 and "1 session(s) ended" in removed.stdout
    assert not authenticated(c)
    assert "no users yet" in cli(config, "user", "list").stdout
    gone = cli(config, "user", "remove", "alice")
    assert gone.returncode == 2 and "no user named 'alice'" in gone.stderr
    assert ALICE_PW not in caplog.text and new_pw not in caplog.text


def test_api_tokens_are_shown_once_scoped_by_role_and_refused_at_once_when_revoked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path)
    app = make_app(cfg_for(tmp_path))
    c = app.test_client()
    made = cli(config, "token", "add", "wallboard", "--role", "viewer")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("elt_") and len(secret) >= 40 and "shown this once" in made.stderr
    listed = cli(config, "token", "list")
    assert "wallboard" in listed.stdout and "viewer" in listed.stdout and "live" in listed.stdout
    assert secret not in listed.stdout and secret[4:20] not in listed.stdout
    assert secret.encode() not in (tmp_path / "state" / ACCOUNTS_FILE).read_bytes()

    # scoped: a viewer token reads, and is refused what needs more
    assert c.get("/api/review/queue", headers=bearer(secret)).status_code in (200, 404)  # 404: no dataset sink
    refused = c.post("/api/sources/cam/pause", headers=bearer(secret))
    assert refused.status_code == 403 and "wallboard" in refused.get_json()["error"]
    # it also opens a session through the form's token field
    page = c.get("/login")
    assert c.post("/login", data={"token": secret, "csrf_token": csrf_from(page.text)}).status_code == 302
    assert authenticated(c)
    assert "last used 20" in cli(config, "token", "list").stdout

    revoked = cli(config, "token", "revoke", "wallboard")
    assert revoked.returncode == 0, revoked.stderr
    assert c.get("/api/status", headers=bearer(secret)).status_code == 200  # public read, but:
    assert c.get("/api/review/queue", headers=bearer(secret)).status_code == 401
    assert not authenticated(c)  # the session it opened ended with it
    assert "revoked" in cli(config, "token", "list").stdout
    assert cli(config, "token", "revoke", "wallboard").returncode == 2  # no live token of that name
    # an admin token reaches the action; the ids in the listing revoke too
    admin = cli(config, "token", "add", "ci", "--role", "admin").stdout.strip()
    assert c.post("/api/sources/cam/pause", headers=bearer(admin)).status_code == 404  # reached: no source "cam"
    tid = next(line.split()[0] for line in cli(config, "token", "list").stdout.splitlines() if " ci " in line)
    assert cli(config, "token", "revoke", tid).returncode == 0
    assert c.post("/api/sources/cam/pause", headers=bearer(admin)).status_code == 401
    assert secret not in caplog.text and admin not in caplog.text
    # a token shorter than the minimum is refused before any lookup
    assert c.get("/api/review/queue", headers=bearer("elt_short")).status_code == 401


# --------------------------------------------------------------------------- roles and reviews


def test_roles_of_password_users_and_the_reviewer_recorded_is_the_logged_in_user(
        site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    app, recs, _, _ = site
    viewer, reviewer, admin = app.test_client(), app.test_client(), app.test_client()
    for client, name, pw in ((viewer, "vera", VERA_PW), (reviewer, "rita", RITA_PW), (admin, "alice", ALICE_PW)):
        resp = pw_login(client, name, pw)
        assert resp.status_code == 302 and resp.headers["Location"] == "/"
    csrf = {c: csrf_from(c.get("/").text) for c in (viewer, reviewer, admin)}
    rid = recs[0].id
    assert viewer.get("/api/review/queue").status_code == 200
    no = viewer.post(f"/api/review/items/{rid}", json={"action": "accept"}, headers={"X-CSRF-Token": csrf[viewer]})
    assert no.status_code == 403 and "'vera' has the role viewer" in no.get_json()["error"]
    ok = reviewer.post(f"/api/review/items/{rid}", json={"action": "accept", "by": "the boss"},
                       headers={"X-CSRF-Token": csrf[reviewer]})
    assert ok.status_code == 200 and ok.get_json()["item"]["reviewed_by"] == "rita"
    pause = reviewer.post("/api/sources/cam/pause", headers={"X-CSRF-Token": csrf[reviewer]})
    assert pause.status_code == 403 and "needs admin" in pause.get_json()["error"]
    assert admin.post("/api/sources/cam/pause", headers={"X-CSRF-Token": csrf[admin]}).status_code == 404
    assert "rita" in reviewer.get("/review").text
    # the cookie holds the random id only, and a session-bound POST still needs the CSRF token
    cookie = reviewer.get_cookie("edgelabel_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"
    assert "rita" not in cookie.value and len(cookie.value) >= 43
    assert reviewer.post(f"/api/review/items/{rid}", json={"action": "reopen"}).status_code == 403


def test_the_form_asks_for_one_way_of_logging_in(site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    app = site[0]
    c = app.test_client()
    page = c.get("/login")
    assert 'id="username"' in page.text and 'id="password"' in page.text and 'id="token"' in page.text
    both = c.post("/login", data={"username": "alice", "password": ALICE_PW, "token": TOKEN,
                                  "csrf_token": csrf_from(page.text)})
    assert both.status_code == 400 and "not both" in both.text
    assert c.post("/login", data={"csrf_token": csrf_from(page.text)}).status_code == 400
    assert c.post("/login", data={"username": "alice", "password": ALICE_PW}).status_code == 403  # no CSRF
    wrong = pw_login(c, "alice", "not her password")
    assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
    unknown = pw_login(c, "nobody", ALICE_PW)
    assert unknown.status_code == 401 and "Wrong user name or password." in unknown.text
    # web.token still logs in through its field, as the admin "operator"
    page = c.get("/login")
    assert c.post("/login", data={"token": TOKEN, "csrf_token": csrf_from(page.text)}).status_code == 302
    assert c.get("/api/review/queue").status_code == 200


# --------------------------------------------------------------------------- sessions end


def test_sessions_end_at_logout_and_with_their_user_and_the_cookie_alone_is_worthless_after(
        site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    app, _, store, _ = site
    c = app.test_client()
    assert pw_login(c, "alice", ALICE_PW).status_code == 302
    stolen = c.get_cookie("edgelabel_session").value
    assert store.session_count(KIND_USER, "alice") == 1
    assert c.post("/logout", data={"csrf_token": csrf_from(c.get("/").text)}).status_code == 302
    assert store.session_count(KIND_USER, "alice") == 0
    replay = app.test_client()
    replay.set_cookie("edgelabel_session", stolen)
    assert not authenticated(replay) and replay.get("/api/review/queue").status_code == 401
    # a page request with the dead cookie goes to the login form, and the cookie is cleared
    page = replay.get("/review")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    assert replay.get_cookie("edgelabel_session") is None

    # removal and disabling through the store (as the command does) end sessions of that user only
    r, v = app.test_client(), app.test_client()
    assert pw_login(r, "rita", RITA_PW).status_code == 302 and pw_login(v, "vera", VERA_PW).status_code == 302
    store.set_disabled("rita", True)
    assert not authenticated(r) and authenticated(v)
    store.remove_user("vera")
    assert not authenticated(v)
    with pytest.raises(AccountError, match="at least 12"):
        store.set_password("alice", "too short")


def test_sessions_end_after_12_hours_idle_and_24_hours_in_all(site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    app, _, store, clock = site
    idle, busy = app.test_client(), app.test_client()
    assert pw_login(idle, "alice", ALICE_PW).status_code == 302
    assert pw_login(busy, "rita", RITA_PW).status_code == 302
    clock.advance(11.9 * 3600)
    assert authenticated(busy)  # a request: no longer idle
    clock.advance(0.2 * 3600)  # alice: 12.1 h without a request
    assert not authenticated(idle) and authenticated(busy)
    clock.advance(11.8 * 3600)  # 23.9 h after login
    assert authenticated(busy)
    clock.advance(0.2 * 3600)  # 24.1 h
    assert not authenticated(busy)
    assert store.session_count() == 0  # both rows are gone, not just refused


# --------------------------------------------------------------------------- throttles


def test_wrong_passwords_are_throttled_per_user_name_and_per_address_without_locking_the_owner_out(
        site: tuple[Flask, Any, AccountStore, Clock], caplog: pytest.LogCaptureFixture) -> None:
    app = site[0]
    owner = "10.7.0.1"
    assert pw_login(app.test_client(), "alice", ALICE_PW, addr=owner).status_code == 302
    typo = "alice correct horse battery!"
    with caplog.at_level(logging.INFO, logger="edgelabel.web"):
        # a guesser spread over many addresses: each address stays under its own limit (5)
        codes = [pw_login(app.test_client(), "alice", f"guess number {i:04d}", addr=f"10.8.0.{i}").status_code
                 for i in range(NAME_FAILURES)]
        assert codes == [401] * NAME_FAILURES
        blocked = pw_login(app.test_client(), "alice", ALICE_PW, addr="10.8.1.1")
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["Retry-After"]) <= 900
        # the owner's own desk still gets in, and other users are not affected
        assert pw_login(app.test_client(), "alice", ALICE_PW, addr=owner).status_code == 302
        assert pw_login(app.test_client(), "rita", RITA_PW, addr="10.8.1.2").status_code == 302
        # per address: 5 wrong tries from one address (any names), then even the right password waits
        one = "10.9.0.9"
        assert [pw_login(app.test_client(), name, typo, addr=one).status_code
                for name in ("rita", "vera", "nobody", typo, "rita")] == [401] * 5
        late = pw_login(app.test_client(), "vera", VERA_PW, addr=one)
        assert late.status_code == 429 and "from this address" in late.text
    lines = [r.getMessage() for r in caplog.records if "wrong" in r.getMessage()]
    per_name = [m for m in lines if "for user 'alice'" in m]
    assert 1 <= len(per_name) <= 2, lines  # the first failure and the block, not one line per try
    assert len(lines) <= NAME_FAILURES + 8, lines
    text = caplog.text
    assert typo not in text and "guess number" not in text and ALICE_PW not in text  # no password, no typed name
    assert "an unknown user name" in text


# --------------------------------------------------------------------------- the real server


class _Browser:
    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def open(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def test_a_password_login_through_the_real_server(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, token=TOKEN)
    store = AccountStore(cfg.state_path(ACCOUNTS_FILE))
    store.add_user("alice", "admin", ALICE_PW)
    server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    try:
        b = _Browser(server.url)
        _, page = b.open("/login")
        form = f"username=alice&password={ALICE_PW.replace(' ', '+')}&csrf_token={csrf_from(page)}".encode()
        code, _ = b.open("/login", form)
        assert code == 200  # followed the redirect to the dashboard
        assert {c.name for c in b.jar} == {"edgelabel_session"}  # the pre-login cookie is gone
        code, body = b.open("/api/status")
        assert code == 200 and '"authenticated":true' in body.replace(" ", "")
        store.set_password("alice", "alice another long one")
        code, body = b.open("/api/status")
        assert '"authenticated":false' in body.replace(" ", "")
    finally:
        server.stop()
        store.close()
    hashed = AccountStore(cfg.state_path(ACCOUNTS_FILE))._one("SELECT password FROM users")[0]  # type: ignore[index]
    assert hashed.startswith("scrypt$32768$8$1$") and verify_password("alice another long one", hashed)


# --------------------------------------------------------------------------- the file


def test_older_hash_parameters_are_raised_at_login_and_a_loose_file_mode_is_tightened(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = cfg_for(tmp_path)
    path = cfg.state_path(ACCOUNTS_FILE)
    store = AccountStore(path)
    store.add_user("alice", "admin", ALICE_PW)
    weaker = hash_password(ALICE_PW, n=2**14)  # as made before the parameters were raised
    store._write([("UPDATE users SET password = ? WHERE name = 'alice'", (weaker,))])
    store.close()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edgelabel.accounts"):
        app = make_app(cfg)
        assert pw_login(app.test_client(), "alice", ALICE_PW).status_code == 302
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "was readable by others" in caplog.text
    stored = AccountStore(path)._one("SELECT password FROM users")[0]  # type: ignore[index]
    assert stored.startswith("scrypt$32768$8$1$") and verify_password(ALICE_PW, stored)
    assert not verify_password("alice wrong horse battery", stored) and not verify_password(ALICE_PW, "md5$abc")


def _on_a_terminal(config: Path, args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run the command on a pseudo-terminal of its own (as a person at a shell); answer each prompt in turn."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling terminal, as getpass expects
        os.execv(sys.executable, [sys.executable, "-m", "edgelabel.edge.cli", *args, "-c", str(config)])
    out = b""
    pending = list(answers)
    answered_at = 0  # answer a prompt only once it appears after the previous answer (getpass flushes input)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if pending and out[answered_at:].rstrip().endswith(b":"):
                os.write(fd, pending.pop(0).encode() + b"\n")
                answered_at = len(out)
    else:
        os.kill(pid, signal.SIGKILL)  # stuck at a prompt: fail the test, do not hang it
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_on_a_terminal_the_password_is_asked_twice_and_never_echoed(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, out = _on_a_terminal(config, ["user", "add", "dana", "--role", "admin"], [ALICE_PW, ALICE_PW])
    assert code == 0 and "New password for dana:" in out and "Repeat it:" in out and "dana added" in out, out
    assert ALICE_PW not in out  # not echoed
    code, out = _on_a_terminal(config, ["user", "passwd", "dana"], [RITA_PW, VERA_PW])
    assert code == 2 and "the two passwords differ; nothing was changed" in out, out
    store = AccountStore(tmp_path / "state" / ACCOUNTS_FILE)
    assert store.check_password("dana", ALICE_PW) is not None
    store.close()


def test_the_command_edits_the_accounts_while_the_served_app_is_busy_with_them(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cfg = cfg_for(tmp_path, token=TOKEN)
    secret = cli(config, "token", "add", "ci", "--role", "viewer").stdout.strip()
    server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    revoked = threading.Event()
    answers: list[list[tuple[bool, int]]] = []

    def hammer() -> None:
        mine: list[tuple[bool, int]] = []
        answers.append(mine)
        while len(mine) < 2000:
            after = revoked.is_set()
            req = urllib.request.Request(server.url + "/api/review/queue", headers=bearer(secret))
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    mine.append((after, resp.status))
            except urllib.error.HTTPError as exc:
                mine.append((after, exc.code))
            if after:
                return

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(hammer) for _ in range(4)]
            for i in range(3):  # writes from another process while every request reads (and touches) the file
                assert cli(config, "user", "add", f"u{i}", "--role", "viewer", "--password-stdin",
                           stdin=f"password number {i}\n").returncode == 0
            assert cli(config, "token", "revoke", "ci").returncode == 0
            revoked.set()
            for f in futures:
                f.result(timeout=60)
    finally:
        server.stop()
    # no error from the shared file: the token works (200; 404 without a dataset) until it is revoked, then
    # is refused (401, and 429 once the refusals pile up), never accepted again
    for mine in answers:
        codes = [code for _, code in mine]
        assert set(codes) <= {200, 404, 401, 429}, codes
        first_refusal = next(i for i, c in enumerate(codes) if c in (401, 429))
        assert codes[0] in (200, 404) and all(c in (401, 429) for c in codes[first_refusal:]), codes
        assert mine[-1][0] is True and mine[-1][1] in (401, 429)


def test_a_wrong_password_page_is_the_same_for_a_known_and_an_unknown_user_name(
        site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    """The answer to a wrong login must not tell whether the name exists (it was echoed back only when it did)."""
    app = site[0]
    known = pw_login(app.test_client(), "alice", "not her password at all")
    unknown = pw_login(app.test_client(), "alicia", "not her password at all")
    assert known.status_code == unknown.status_code == 401

    def form(text: str) -> str:  # the page without the per-session CSRF token
        return re.sub(r'(value|content)="[A-Za-z0-9_-]{40,}"', "", text)

    assert 'value="alice"' not in known.text
    assert form(known.text) == form(unknown.text)


def test_a_password_change_while_a_login_with_the_old_one_is_under_way_ends_that_login_too(
        site: tuple[Flask, Any, AccountStore, Clock]) -> None:
    """The command changes the password after the old one was checked but before the session row is written:
    the session that the old password opened must not outlive the change."""
    app, _, store, clock = site
    accounts = app.extensions["edgelabel_auth"].accounts
    checked = accounts.check_password

    def check_then_changed(name: str, password: str) -> Any:
        user = checked(name, password)
        clock.advance(1.0)
        store.set_password(name, "alice changed it meanwhile")  # the command, on its own connection
        return user

    accounts.check_password = check_then_changed
    c = app.test_client()
    assert pw_login(c, "alice", ALICE_PW).status_code == 302  # the old password was right when it was checked
    accounts.check_password = checked
    assert not authenticated(c) and c.get("/api/review/queue").status_code == 401
    assert store.session_count(KIND_USER, "alice") == 0
    # a login with the new password lives on
    assert pw_login(c, "alice", "alice changed it meanwhile").status_code == 302 and authenticated(c)


def test_the_command_on_an_unusable_account_file_says_which_file_and_exits_1_without_a_traceback(
        tmp_path: Path) -> None:
    """A corrupt (or locked, or unwritable) account file is an SQLite error, not an OSError: still a clear line."""
    config = write_config(tmp_path)
    path = tmp_path / "state" / ACCOUNTS_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an SQLite file " * 200)
    for args in (("user", "list"), ("token", "list"), ("user", "remove", "alice"), ("token", "revoke", "ci")):
        out = cli(config, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr and str(path) in out.stderr and "not a database" in out.stderr


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """``$`` also matches before a final newline: "bob\\n" passed the name rule, and then could never log in
    (the form strips it) while it went into review records and log lines."""
    store = AccountStore(tmp_path / ACCOUNTS_FILE)
    try:
        for bad in ("bob\n", "bob\r\n", "\nbob"):
            with pytest.raises(AccountError, match="use 1-64 letters"):
                store.add_user(bad, "viewer", ALICE_PW)
            with pytest.raises(AccountError, match="use 1-64 letters"):
                store.add_token(bad, "viewer")
        assert store.users() == [] and store.tokens() == []
    finally:
        store.close()


def test_revoking_by_a_name_that_is_also_another_tokens_id_revokes_neither_and_says_so(tmp_path: Path) -> None:
    """Names and ids share the argument of ``token revoke``: when one value names one token and is the id of
    another, the command must not pick one of them (the compromised one might stay live)."""
    store = AccountStore(tmp_path / ACCOUNTS_FILE)
    try:
        first, _ = store.add_token("ci", "viewer")
        named, _ = store.add_token(first.id, "viewer")  # a name that looks like an id: eight hex digits
        with pytest.raises(AccountError, match="both"):
            store.revoke_token(first.id)
        assert all(t.revoked is None for t in store.tokens())
        assert store.revoke_token("ci").id == first.id  # by the unambiguous name, or by the other's id
        assert store.revoke_token(named.id).name == first.id
    finally:
        store.close()

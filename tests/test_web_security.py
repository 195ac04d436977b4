"""The web page's attack surface, on a real running pipeline (YOLOX-nano on the looping traffic video, dataset on).

* schemathesis drives every operation of ``web/openapi.yaml`` in-process (WSGI), with schema-valid and
  schema-violating requests, anonymous and with the operator token: no 5xx, every answer matches the
  document (status, content type, headers, body schema), invalid input is refused with a 4xx.
* Every state-changing route the app has (found in its URL map, so a new one is covered the day it is
  added) refuses a request without the operator token or with a wrong one, and refuses a
  session-authenticated request without the session's CSRF token.
* Path traversal and guessed record ids on the frame and record routes never reach a file: 404 (400
  for a malformed id, as documented), never an image that is not a kept record's frame.
* Every route, anonymous, authenticated and in error answers, carries nosniff, frame denial, a
  self-only Content-Security-Policy without inline script, and no-store (static files excepted).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, given, settings
from werkzeug.routing import Rule

from edgelabel.edge.config import Config, config_from_dict
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.records import record_id
from edgelabel.web.app import create_app
from edgelabel.web.sink import WebSink
from tests.conftest import ASSETS
from tests.fuzzing import examples

TOKEN = "sec-test-operator-token-5f0c2a9e7d"
SECRET_KEY = "sec-test-secret-key-" + "y" * 32
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
#: routes that take credentials themselves (they are CSRF-checked, see the CSRF test)
CREDENTIAL_ROUTES = {"auth.login", "auth.logout"}


def wait_for(pred: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Iterator[tuple[Config, Pipeline, WebSink]]:
    tmp = tmp_path_factory.mktemp("websec")
    cfg = config_from_dict({
        "device_id": "sec-test",
        "state_dir": str(tmp / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": {"cars": {"uri": str(ASSETS / "videos" / "cars.mp4"), "loop": True, "fps": 6}},
        "mqtt": {"enabled": False},
        "dataset": {"enabled": True, "path": str(tmp / "dataset"), "coco_interval": 5},  # the review API needs it
        "web": {"enabled": True, "recent_records": 10},
    }, base_dir=tmp)
    sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[sink], show_progress=False)
    pipeline.start()
    try:
        assert wait_for(lambda: len(sink.recent()) >= 10 and sink.latest_jpeg("cars")[1], 60), "no records arrived"
        yield cfg, pipeline, sink
    finally:
        pipeline.shutdown()


def make_app(running: tuple[Config, Pipeline, WebSink], secret_key: str = SECRET_KEY) -> Flask:
    cfg, pipeline, sink = running
    app = create_app(cfg, pipeline, sink, test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN,
                                                       "SECRET_KEY": secret_key})
    # live views are endless bodies; with no slot the route answers its documented 503 at once
    app.extensions["edgelabel"].max_streams = 0
    return app


@pytest.fixture
def app(running: tuple[Config, Pipeline, WebSink]) -> Iterator[Flask]:
    app = make_app(running)
    yield app
    running[1].set_source_paused("cars", False)  # whatever a test did


def paused(running: tuple[Config, Pipeline, WebSink]) -> bool:
    return bool(running[1].status()["sources"]["cars"]["paused"])


def csrf_from(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def logged_in(app: Flask) -> tuple[FlaskClient, str]:
    """A client with an operator session, and that session's CSRF token."""
    client = app.test_client()
    page = client.get("/login")
    resp = client.post("/login", data={"token": TOKEN, "csrf_token": csrf_from(page.text), "next": "/"})
    assert resp.status_code == 302, resp.text
    return client, csrf_from(client.get("/").text)


def url_for_rule(rule: Rule, running: tuple[Config, Pipeline, WebSink]) -> str:
    """The rule with real values: the configured source, a kept record, a static file."""
    values = {"name": "cars", "record_id": running[2].recent()[0].record.id, "filename": "style.css"}
    url = rule.rule
    for arg in rule.arguments:
        url = re.sub(rf"<(?:[a-z]+:)?{arg}>", values.get(arg, "x"), url)
    return url


# ----------------------------------------------------------------------------- schemathesis


def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_document(
    app: Flask, running: tuple[Config, Pipeline, WebSink]
) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import negative_data_rejection
    from schemathesis.config import SchemathesisConfig

    # 410 is documented for /api/labels: a cursor whose record has left the ring of kept records
    config = SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "410", "429"]}}})
    schema = schemathesis.openapi.from_wsgi("/api/openapi.yaml", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures: list[str] = []
    calls = [0]

    def fuzz(op: Any, mode: Any, headers: dict[str, str]) -> None:
        @settings(max_examples=examples(20), deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            calls[0] += 1
            # an invalid request need not be refused: schemathesis also counts an undeclared query parameter
            # (even one with an empty name) as invalid, and this API, like any, ignores those.  The declared
            # parameters' refusals are asserted one by one in
            # test_review.py::test_every_typed_query_parameter_refuses_an_empty_or_malformed_value
            case.call_and_validate(headers=headers, excluded_checks=[negative_data_rejection])

        run()

    for auth in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for op in operations:
                if mode is GenerationMode.NEGATIVE and not list(op.iter_parameters()):
                    continue  # nothing to make invalid
                try:
                    fuzz(op, mode, auth)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # schemathesis raises an exception group per operation
                    who = "operator" if auth else "anonymous"
                    failures.append(f"{who} {mode.value} {op.label}: {str(exc)[:1500]}")
    print(f"schemathesis: {calls[0]} requests over {len(operations)} operations, {len(failures)} failing operation(s)")
    assert not failures, "\n\n".join(failures)
    assert calls[0] > 500


# ----------------------------------------------------------------------------- tokens


def state_changing(app: Flask) -> list[Rule]:
    return [r for r in app.url_map.iter_rules() if r.methods and r.methods & STATE_CHANGING]


def test_every_state_changing_route_refuses_a_missing_or_wrong_token(
    app: Flask, running: tuple[Config, Pipeline, WebSink]
) -> None:
    rules = [r for r in state_changing(app) if r.endpoint not in CREDENTIAL_ROUTES]
    assert {r.rule for r in rules} >= {"/api/sources/<name>/pause", "/sources/<name>/pause",
                                       "/api/sources/<name>/resume", "/sources/<name>/resume"}
    foreign = make_app(running, secret_key="another-appliance-key-" + "z" * 30)  # a session signed elsewhere
    foreign_client, _ = logged_in(foreign)
    foreign_cookie = foreign_client.get_cookie("edgelabel_session")
    assert foreign_cookie is not None
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("no credentials", {}),
        ("wrong bearer", {"headers": {"Authorization": "Bearer wrong-token"}}),
        ("empty bearer", {"headers": {"Authorization": "Bearer "}}),
        ("token prefix", {"headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}}),
        ("token plus a char", {"headers": {"Authorization": f"Bearer {TOKEN}x"}}),
        ("token without scheme", {"headers": {"Authorization": TOKEN}}),
        ("basic auth", {"headers": {"Authorization": "Basic b3BlcmF0b3I6" + TOKEN}}),
        ("token in the query", {"query_string": {"token": TOKEN}}),
        ("token in a form field", {"data": {"token": TOKEN}}),
        ("token in a header of its own", {"headers": {"X-Token": TOKEN, "X-Api-Key": TOKEN}}),
    ]
    checked = 0
    for rule in rules:
        url = url_for_rule(rule, running)
        for method in sorted(rule.methods & STATE_CHANGING):
            for what, kwargs in attempts:
                resp = app.test_client().open(url, method=method, **kwargs)
                login_redirect = resp.status_code == 302 and resp.headers["Location"].startswith("/login")
                assert resp.status_code == 401 or login_redirect, f"{method} {url} with {what}: {resp.status_code}"
                checked += 1
            client = app.test_client()
            client.set_cookie("edgelabel_session", foreign_cookie.value)
            resp = client.open(url, method=method, headers={"X-CSRF-Token": "x"}, data={"csrf_token": "x"})
            assert resp.status_code in (302, 401), f"{method} {url} with a foreign session: {resp.status_code}"
            checked += 1
    assert not paused(running), "an unauthorised request changed the pipeline"
    assert checked >= 40
    # and the right token does work on the API, so the refusals above are about the credentials
    ok = app.test_client().post("/api/sources/cars/pause", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and paused(running)


def test_csrf_is_enforced_on_every_form_and_session_post(app: Flask, running: tuple[Config, Pipeline, WebSink]) -> None:
    client, csrf = logged_in(app)
    _, other_csrf = logged_in(app)  # a valid token of another session
    rules = [r for r in state_changing(app) if r.endpoint != "auth.login"]
    for rule in rules:
        url = url_for_rule(rule, running)
        for what, kwargs in (("no CSRF token", {}),
                             ("a forged token", {"headers": {"X-CSRF-Token": "forged"}, "data": {"csrf_token": "forged"}}),
                             ("another session's token", {"data": {"csrf_token": other_csrf}}),
                             ("an empty token", {"headers": {"X-CSRF-Token": ""}})):
            resp = client.post(url, **kwargs)
            assert resp.status_code == 403, f"POST {url} with {what}: {resp.status_code}"
    assert not paused(running)
    assert client.get("/api/status").get_json()["web"]["authenticated"] is True  # logout refused too
    # the login form itself: the right token without the form's CSRF token is refused
    fresh = app.test_client()
    fresh.get("/login")
    assert fresh.post("/login", data={"token": TOKEN}).status_code == 403
    assert fresh.post("/login", data={"token": TOKEN, "csrf_token": other_csrf}).status_code == 403
    assert fresh.get("/api/status").get_json()["web"]["authenticated"] is False
    # with its CSRF token the same session may act
    resp = client.post("/sources/cars/pause", data={"csrf_token": csrf})
    assert resp.status_code == 302 and paused(running)
    assert client.post("/api/sources/cars/resume", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert not paused(running)
    cookie = client.get_cookie("edgelabel_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"


# ----------------------------------------------------------------------------- files by id only

TRAVERSAL = [
    "..", "../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%252F..%252Fetc%252Fpasswd", "....//....//etc/passwd", "..\\..\\..\\etc\\passwd", "%2Fetc%2Fpasswd",
    "/etc/passwd", "file:%2F%2F%2Fetc%2Fpasswd", "~root", ".", "%00", "..%00", "%0A", "%20",
    "{id}%00", "{id}%2F..%2F..%2Fetc%2Fpasswd", "{id}/../../etc/passwd", "{id}.jpg", "{id}%20",
    "{id}%0A", "x{id}", "{{{id}}}", "urn:uuid:{id}", "{id_hex}",
]


@pytest.mark.parametrize("route", ["/api/frames/{}.jpg", "/api/frames/{}.jpg?raw=1", "/api/labels/{}", "/labels/{}"])
def test_path_traversal_on_record_routes_never_reaches_a_file(
    app: Flask, running: tuple[Config, Pipeline, WebSink], route: str
) -> None:
    kept = running[2].recent()[0].record.id
    client = app.test_client()
    for payload in TRAVERSAL:
        target = payload.replace("{id}", kept).replace("{id_hex}", uuid.UUID(kept).hex)
        resp = client.get(route.format(target))
        assert resp.status_code in (400, 404), f"{route.format(target)}: {resp.status_code}"
        assert resp.mimetype != "image/jpeg" and b"root:" not in resp.data
    for payload in ("../app.py", "..%2Fapp.py", "%2e%2e/auth.py", "/etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd"):
        resp = client.get(f"/static/{payload}", follow_redirects=True)  # "//" is first merged by a 308
        assert resp.status_code == 404, payload
        resp.close()
    for payload in ("..", "..%2F..%2Fetc", "%2e%2e", "cars%2F..%2F..", "cars/../../etc/passwd"):
        assert client.get(f"/sources/{payload}").status_code == 404, payload
        assert client.get(f"/api/sources/{payload}/snapshot.jpg").status_code == 404, payload


def test_guessed_record_ids_get_404(app: Flask, running: tuple[Config, Pipeline, WebSink]) -> None:
    cfg, _, sink = running
    client = app.test_client()
    oldest_kept = min(k.record.frame_index for k in sink.recent())
    video = str(ASSETS / "videos" / "cars.mp4")
    guesses = [str(uuid.uuid4()) for _ in range(30)]
    # ids a guesser could compute (uuid5 of device, source, frame key): frames not (or no longer) kept
    guesses += [record_id(cfg.device_id, "cars", f"{video}#{i}") for i in range(max(0, oldest_kept - 5), oldest_kept)]
    guesses += [record_id(cfg.device_id, "cars", f"{video}#{i}") for i in range(10**6, 10**6 + 10)]
    guesses += [str(uuid.UUID(int=0)), str(uuid.UUID(int=2**128 - 1))]
    kept = {k.record.id for k in sink.recent()}
    for guess in guesses:
        if guess in kept:
            continue
        for route in (f"/api/frames/{guess}.jpg", f"/api/frames/{guess}.jpg?raw=1", f"/api/labels/{guess}",
                      f"/labels/{guess}"):
            resp = client.get(route)
            assert resp.status_code == 404, f"{route}: {resp.status_code}"
            assert resp.mimetype != "image/jpeg"
    # a record that was kept and has left the ring (recent_records: 10) is gone too
    first = sink.recent()[-1].record.id
    assert wait_for(lambda: sink.get(first) is None, 30), "the ring of kept records did not move"
    assert client.get(f"/api/frames/{first}.jpg").status_code == 404


# ----------------------------------------------------------------------------- headers

CSP_REQUIRED = {"default-src": "'self'", "object-src": "'none'", "frame-ancestors": "'none'", "base-uri": "'none'",
                "form-action": "'self'"}


def check_headers(resp: Any, where: str) -> None:
    h = resp.headers
    assert h.get("X-Content-Type-Options") == "nosniff", where
    assert h.get("X-Frame-Options") == "DENY", where
    assert h.get("Referrer-Policy") == "no-referrer", where
    csp = {d.split()[0]: d.split()[1:] for d in h.get("Content-Security-Policy", "").split(";") if d.strip()}
    for directive, value in CSP_REQUIRED.items():
        assert csp.get(directive) == [value], f"{where}: CSP {directive} is {csp.get(directive)}"
    for directive in ("default-src", "script-src", "style-src", "img-src", "connect-src"):
        sources = csp.get(directive, csp["default-src"])
        bad = {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:", "blob:"} & set(sources)
        assert not bad, f"{where}: CSP {directive} allows {bad}"


def test_security_headers_on_every_route_anonymous_authenticated_and_in_errors(
    app: Flask, running: tuple[Config, Pipeline, WebSink]
) -> None:
    anonymous = app.test_client()
    operator, _ = logged_in(app)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    seen = 0
    for rule in app.url_map.iter_rules():
        if not rule.methods or "GET" not in rule.methods:
            continue
        url = url_for_rule(rule, running)
        for who, client, headers in (("anonymous", anonymous, {}), ("session", operator, {}),
                                     ("bearer", anonymous, bearer)):
            resp = client.get(url, headers=headers)
            where = f"{who} GET {url} ({resp.status_code})"
            assert resp.status_code < 500 or (rule.endpoint == "api.stream" and resp.status_code == 503), where
            check_headers(resp, where)
            cache = resp.headers.get("Cache-Control", "")
            if rule.endpoint == "static":
                assert "no-store" not in cache and "private" not in cache, where
            else:
                assert "no-store" in cache and "public" not in cache, where  # never cached, above all when authenticated
            resp.close()
            seen += 1
    assert seen >= 60
    for method, url in (("GET", "/no/such/page"), ("GET", "/api/no/such"), ("PUT", "/api/status"),
                        ("POST", "/api/sources/cars/pause"), ("GET", "/api/labels?limit=0")):
        resp = anonymous.open(url, method=method)
        assert resp.status_code in (400, 401, 404, 405), f"{method} {url}: {resp.status_code}"
        check_headers(resp, f"{method} {url} ({resp.status_code})")
        assert "no-store" in resp.headers.get("Cache-Control", "")


# ----------------------------------------------------------------------------- DNS rebinding


REBIND_PATHS = ["/", "/api/status", "/api/sources", "/api/labels", "/healthz", "/metrics", "/login"]


def test_a_foreign_host_name_is_refused_everywhere(app: Flask) -> None:
    """A page on evil.example that re-points its DNS name at the appliance sends ``Host: evil.example``: 400,
    for every route, with and without a token, and the answer says what to do."""
    client = app.test_client()
    for path in REBIND_PATHS:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            resp = client.get(path, headers={"Host": "evil.example:8080", **headers})
            assert resp.status_code == 400, (path, resp.status_code)
            assert "web.allowed_hosts" in resp.text and "sec-test" not in resp.text
    resp = client.post("/api/sources/cars/pause", headers={"Host": "attacker.test", "Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 400


def test_own_names_and_ip_addresses_are_served(app: Flask) -> None:
    import socket

    client = app.test_client()
    short = socket.gethostname().lower()
    for host in ["127.0.0.1:8080", "10.1.2.3", "[::1]:8080", "[fe80::1%eth0]", "localhost:8080", short,
                 f"{short.split('.')[0]}.local", "LOCALHOST."]:
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_adds_proxy_names_and_star_turns_the_check_off(running: tuple[Config, Pipeline, WebSink]) -> None:
    cfg, pipeline, sink = running
    for allowed, host, code in ((["edgelabel.plant.local"], "EdgeLabel.Plant.Local:443", 200),
                                (["edgelabel.plant.local"], "other.plant.local", 400),
                                (["*"], "anything.example", 200)):
        cfg2 = config_from_dict({**_cfg_dict(cfg), "web": {**_cfg_dict(cfg)["web"], "allowed_hosts": allowed}},
                                base_dir=Path(cfg.base_dir))
        app = create_app(cfg2, pipeline, sink, test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN,
                                                            "SECRET_KEY": SECRET_KEY})
        assert app.test_client().get("/healthz", headers={"Host": host}).status_code == code, (allowed, host)


def _cfg_dict(cfg: Config) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(cfg)
    data.pop("base_dir", None)
    return data


# ----------------------------------------------------------------------------- sockets


SLOW_CLIENTS = 200
#: the requirement: /healthz and /metrics answer within a second while the slow clients hold their connections
ANSWER_WITHIN_S = 1.0


def _timed_get(port: int, path: str) -> tuple[float, bytes]:
    """(seconds from connecting to the whole answer, the answer) for one GET on a fresh connection."""
    import socket

    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return time.perf_counter() - t0, b"".join(chunks)


def test_slow_anonymous_clients_cannot_starve_healthz_and_metrics(running: tuple[Config, Pipeline, WebSink]) -> None:
    """200 anonymous connections that send half a request and hold it (one more header byte now and then, so
    they never look idle): /healthz and /metrics each answer, whole, within 1 s, on the real server beside the
    running pipeline.  (Before: waitress accepted 100 connections and then none, 60 s idle limit.)  A
    half-sent request holds no worker thread (waitress buffers it on its event loop), so the bound is the
    connection limit and the event loop, not ``web.threads``."""
    import socket

    from edgelabel.web.server import start_web

    cfg, pipeline, sink = running
    server = start_web(pipeline, sink, cfg, host="127.0.0.1", port=0)
    port = int(server.url.rsplit(":", 1)[1])
    stuck: list[socket.socket] = []
    timings: dict[str, list[float]] = {"/healthz": [], "/metrics": []}
    try:
        for i in range(SLOW_CLIENTS):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-%d: " % i)  # and never the rest
            stuck.append(s)
        for _ in range(5):
            for s in stuck:
                s.sendall(b"x")  # still sending, slowly: not an idle connection the server may drop
            for path, seen in timings.items():
                took, answer = _timed_get(port, path)
                assert answer.startswith(b"HTTP/1.1 200"), (path, answer[:200])
                assert b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) > 10, path
                seen.append(took)
            time.sleep(0.2)
        shown = ", ".join(f"{p} max {max(t) * 1000:.0f} ms (median {sorted(t)[len(t) // 2] * 1000:.0f} ms)"
                          for p, t in timings.items())
        print(f"with {SLOW_CLIENTS} slow connections held: {shown}")
        for path, seen in timings.items():
            assert max(seen) < ANSWER_WITHIN_S, f"{path} took {max(seen):.2f} s beside {SLOW_CLIENTS} slow clients"
        # the slow clients are still connected (not dropped to make room): each still gets its answer
        for s in stuck[:5]:
            s.sendall(b"1\r\nConnection: close\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for s in stuck:
            s.close()
        server.stop()


def test_a_large_body_is_refused_from_its_length_before_it_is_read(running: tuple[Config, Pipeline, WebSink]) -> None:
    """waitress's own body limit equals Flask's (64 KiB): a 300 MiB POST was spooled to /tmp by waitress
    before Flask's limit applied.  Now the declared length alone gets 413 (nothing of the body sent), and a
    chunked body is cut off as soon as it passes the limit."""
    import socket

    from edgelabel.web.app import MAX_BODY_BYTES
    from edgelabel.web.server import start_web

    cfg, pipeline, sink = running
    server = start_web(pipeline, sink, cfg, host="127.0.0.1", port=0)
    port = int(server.url.rsplit(":", 1)[1])
    assert server._server.adj.max_request_body_size == MAX_BODY_BYTES == server.app.config["MAX_CONTENT_LENGTH"]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t0 = time.perf_counter()
            s.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                      b"Content-Length: 314572800\r\n\r\n")  # headers only: not one byte of the body
            answer = s.recv(64)
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert time.perf_counter() - t0 < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/review/items/00000000-0000-5000-8000-000000000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
            sent = 0
            answer = b""
            s.settimeout(0.05)
            while sent < 16 * MAX_BODY_BYTES and not answer:
                s.sendall(b"4000\r\n" + b"[" * 0x4000 + b"\r\n")
                sent += 0x4000
                try:
                    answer = s.recv(64)
                except TimeoutError:
                    pass
            s.settimeout(10)
            answer = answer or s.recv(64)
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert sent <= 4 * MAX_BODY_BYTES, f"the server read {sent} bytes of a chunked body before refusing it"
        # and the server goes on serving
        _, answer = _timed_get(port, "/healthz")
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


def test_connections_from_the_lan_leave_file_descriptors_for_the_daemon(
    running: tuple[Config, Pipeline, WebSink],
) -> None:
    """Under systemd's default soft limit of 1024 open files, 1000 LAN connections (the connection limit) would
    have left the daemon about 20 descriptors for its model, SQLite files and inputs.  The server raises the
    soft limit within the hard one to hold the connection limit plus a reserve, or lowers the connection limit
    where the hard limit is too low."""
    import resource
    import subprocess
    import sys

    from edgelabel.web.server import CONNECTION_LIMIT, FD_RESERVE, start_web

    cfg, pipeline, sink = running
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[1] != resource.RLIM_INFINITY and before[1] < CONNECTION_LIMIT + FD_RESERVE:
        pytest.skip(f"the hard open-file limit here ({before[1]}) is below {CONNECTION_LIMIT + FD_RESERVE}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, before[1]))
    try:
        server = start_web(pipeline, sink, cfg, host="127.0.0.1", port=0)
        try:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= CONNECTION_LIMIT + FD_RESERVE
            assert server._server.adj.connection_limit == CONNECTION_LIMIT
        finally:
            server.stop()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)

    code = ("import logging; logging.basicConfig(); from edgelabel.web.server import _connection_limit; "
            "print(_connection_limit())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600)))
    assert int(done.stdout.strip()) == 600 - FD_RESERVE
    assert "LimitNOFILE" in done.stderr

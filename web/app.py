"""The Flask app factory: ``create_app(cfg, pipeline, web_sink)``.

Why a factory (as in Flask's tutorial): nothing exists at import time, so the
daemon, the tests and a future second instance each get their own app, their
own metrics registry and their own secrets.  The app reads the daemon through
``pipeline.status()`` and ``web_sink``; it changes it only through
``pipeline.set_source_paused``, behind the operator token.

Every response carries the security headers (nosniff, a self-only
Content-Security-Policy with no inline script or style, frame denial, no
referrer; Strict-Transport-Security over HTTPS when ``web.tls.hsts`` asks
for it) and everything except static files is ``no-store``: pages may show
an operator's session and live state, neither belongs in a cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from edgelabel.edge.accounts import ACCOUNTS_FILE, AccountStore
from edgelabel.edge.config import Config
from edgelabel.web import api, auth, ops, pages, review
from edgelabel.web.auth import (
    BEARER_FAILURES,
    BEARER_WINDOW,
    GLOBAL_BEARER_FAILURES,
    GLOBAL_BEARER_PENALTY,
    AuthState,
    FailureThrottle,
    Operators,
    check_bearer,
    csrf_token,
    current_operator,
    is_authenticated,
    load_secrets,
    unauthorized,
    wants_json,
)
from edgelabel.web.context import PipelineLike, WebContext
from edgelabel.web.hosts import HostCheck
from edgelabel.web.logbuffer import RingLogHandler
from edgelabel.web.metrics import make_registry
from edgelabel.web.redact import Redactor
from edgelabel.web.sessions import ServerSessionInterface
from edgelabel.web.sink import WebSink
from edgelabel.web.system import DeviceMonitor
from edgelabel.web.tls import hsts_seconds

log = logging.getLogger("edgelabel.web")

#: the largest request body anything here accepts (a review decision of 1000 boxes is ~60 KB)
MAX_BODY_BYTES = 64 * 1024

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: routes open even when web.public_read is false (to log in, style the login page, probe health)
_OPEN_ENDPOINTS = {"auth.login", "static", "ops.healthz"}
#: waitress threads kept free for API calls whatever the number of live viewers
API_HEADROOM = 4


def _mqtt_password_file(cfg: Config) -> str | None:
    """The MQTT password kept in a file, so that it can be masked too (never logged)."""
    if not cfg.mqtt.password_file:
        return None
    try:
        return cfg.resolve(cfg.mqtt.password_file).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def create_app(
    cfg: Config,
    pipeline: PipelineLike,
    web_sink: WebSink,
    *,
    log_handler: RingLogHandler | None = None,
    device: DeviceMonitor | None = None,
    test_config: Mapping[str, Any] | None = None,
    clock: Callable[[], float] | None = None,
) -> Flask:
    """The web app for one daemon.

    ``log_handler`` is the ring buffer behind the log panel (``start_web``
    installs one on the root logger; without it the panel stays empty).
    ``test_config`` overrides Flask settings, e.g. ``EDGELABEL_TOKEN`` and
    ``SECRET_KEY`` so that tests need not write secret files.  ``clock`` (default ``time.time``) is the
    account store's: sessions' idle and absolute lifetimes are measured with it.
    """
    app = Flask(__name__, instance_relative_config=False)
    app.config.update(
        SESSION_COOKIE_NAME="edgelabel_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        SEND_FILE_MAX_AGE_DEFAULT=timedelta(minutes=10),
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented field order
    app.jinja_env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    if test_config:
        app.config.update(test_config)
    if "EDGELABEL_TOKEN" not in app.config or "SECRET_KEY" not in app.config or not app.config["SECRET_KEY"]:
        token, key = load_secrets(cfg)
        app.config.setdefault("EDGELABEL_TOKEN", token)
        if not app.config.get("SECRET_KEY"):
            app.config["SECRET_KEY"] = key

    redactor = Redactor([app.config["EDGELABEL_TOKEN"], str(app.config["SECRET_KEY"]), cfg.mqtt.password,
                         _mqtt_password_file(cfg), *(op.token for op in cfg.web.operators.values())])
    if log_handler is None:
        log_handler = RingLogHandler()
    log_handler.set_redact(redactor.text)
    if device is None:
        disks = {"state": cfg.resolve(cfg.state_dir)}
        if cfg.dataset.enabled:
            disks["dataset"] = cfg.resolve(cfg.dataset.path)
        device = DeviceMonitor(disks)
    ctx = WebContext(
        cfg=cfg,
        pipeline=pipeline,
        sink=web_sink,
        device=device,
        logs=log_handler,
        redactor=redactor,
        throttle=FailureThrottle("login (password or token)"),
        max_streams=max(1, cfg.web.threads - API_HEADROOM),
    )
    app.extensions["edgelabel"] = ctx
    accounts = AccountStore(cfg.state_path(ACCOUNTS_FILE), clock or time.time)
    app.session_interface = ServerSessionInterface(accounts)  # server-side sessions: web/sessions.py
    app.extensions["edgelabel_auth"] = AuthState(
        operators=Operators.from_config(cfg, str(app.config["EDGELABEL_TOKEN"]), str(app.config["SECRET_KEY"])),
        accounts=accounts,
        bearer_throttle=FailureThrottle("bearer token", BEARER_FAILURES, BEARER_WINDOW, GLOBAL_BEARER_FAILURES,
                                        GLOBAL_BEARER_PENALTY),
    )
    if cfg.web.tls is not None:
        app.config["SESSION_COOKIE_SECURE"] = True  # served over HTTPS: the cookie never travels in clear
    app.extensions["edgelabel_metrics"] = make_registry(ctx)

    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(review.bp)

    hosts = HostCheck(cfg.web.allowed_hosts, cfg.web.host)
    hsts = hsts_seconds(cfg)  # web.tls.hsts: sent only on answers that went over HTTPS
    refused_logged: set[str] = set()  # one log line per refused name, not one per request

    @app.before_request
    def _host() -> Any:
        """Only this appliance's names and IP addresses (DNS rebinding: web/hosts.py)."""
        if hosts.allows(request.headers.get("Host")):
            return None
        shown = (request.headers.get("Host") or "(none)")[:100]
        if shown not in refused_logged and len(refused_logged) < 100:
            refused_logged.add(shown)
            log.warning(
                "web: refused a request for host %r from %s (not one of this appliance's names; "
                "add it to web.allowed_hosts if it is a proxy or DNS alias)", shown, request.remote_addr)
        return Response(f"400 Bad Request: this appliance does not answer to the host name {shown!r}. "
                        "Use its IP address or add the name to web.allowed_hosts.\n", status=400, mimetype="text/plain")

    @app.before_request
    def _bearer() -> Any:
        """Wrong bearer tokens are throttled per address and globally (429 + Retry-After), before any compare."""
        return check_bearer()

    @app.before_request
    def _gate() -> Any:
        """With ``public_read`` off, every route but login, static files and health needs the token."""
        if cfg.web.public_read or request.endpoint in _OPEN_ENDPOINTS or request.endpoint is None:
            return None
        if not is_authenticated():
            return unauthorized("login required")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        h = resp.headers
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Content-Security-Policy"] = CSP
        h["Referrer-Policy"] = "no-referrer"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Cross-Origin-Resource-Policy"] = "same-origin"
        if hsts is not None and request.is_secure:
            h["Strict-Transport-Security"] = f"max-age={hsts}"
        if request.endpoint != "static":
            h["Cache-Control"] = "no-store"
            h["Pragma"] = "no-cache"
        return resp

    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        return {
            "csrf_token": csrf_token,
            "authenticated": current_operator() is not None,
            "operator": current_operator(),
            "device_id": cfg.device_id,
            "public_read": cfg.web.public_read,
        }

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        """JSON errors for the API, a plain page for people; never a traceback."""
        code = exc.code or 500
        if wants_json():
            resp = jsonify(error=exc.description or exc.name)
            resp.status_code = code
            return resp
        return render_template("error.html", code=code, name=exc.name, description=exc.description), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("web: %s %s failed", request.method, request.path)
        if wants_json():
            resp = jsonify(error="internal error (see the daemon log)")
            resp.status_code = 500
            return resp
        return render_template("error.html", code=500, name="Internal error",
                               description="Something went wrong; the daemon log has the details."), 500

    return app


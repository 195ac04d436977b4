"""Who may change things: the operator token, the login form, sessions and CSRF.

Why this shape:

* One secret, the operator token, guards every state-changing action.  A
  script sends it as ``Authorization: Bearer <token>``; a person types it into
  the login form once and gets a signed session cookie (HttpOnly,
  SameSite=Strict).  The token is generated on first start when the config
  does not set one and is kept, like the cookie-signing key, in a 0600 file in
  the state folder; neither is ever logged or shown.
* A cookie is sent by the browser on its own, so every POST that relies on
  the session must also carry the session's CSRF token (a hidden form field or
  the ``X-CSRF-Token`` header that the page's script adds).  A bearer token is
  never sent on its own, so bearer requests need no CSRF token.
* Read-only pages are open when ``web.public_read`` is true (a trusted plant
  LAN); when false, everything but the login page, static files and the
  health check needs the token too.
* Repeated wrong tokens from one address are refused for a while, so the
  token cannot be guessed at line speed.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for

from edgelabel.edge.config import Config

log = logging.getLogger("edgelabel.web")

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
#: failed logins allowed per address and window before that address is refused for the window
MAX_FAILURES = 5
FAILURE_WINDOW = 300.0


# --------------------------------------------------------------------------- secrets on disk


def load_or_create_secret(path: Path, what: str) -> str:
    """The secret stored in ``path``; generated (``secrets.token_urlsafe``) and written 0600 when absent.

    The value never reaches the log: only the file's path does, so the operator knows where to look.
    """
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if value:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s file %s was readable by others (mode %o); set to 0600", what, path, mode)
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (value + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    log.info("generated the web %s; it is stored in %s (mode 0600)", what, path)
    return value


def load_secrets(cfg: Config) -> tuple[str, str]:
    """(operator token, cookie-signing key): the token from the config, else from/into its state file."""
    token = cfg.web.token or load_or_create_secret(cfg.state_path(cfg.web.token_file), "operator token")
    key = load_or_create_secret(cfg.state_path(cfg.web.secret_key_file), "session key")
    return token, key


# --------------------------------------------------------------------------- checks


def _token() -> str:
    return str(current_app.config["EDGELABEL_TOKEN"])


def token_matches(candidate: str | None) -> bool:
    """Constant-time comparison with the operator token."""
    if not candidate:
        return False
    return hmac.compare_digest(candidate.encode("utf-8"), _token().encode("utf-8"))


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def auth_method() -> str | None:
    """``"bearer"`` or ``"session"`` when the request carries the operator's credentials, else None."""
    if "auth_method" not in g:
        method = None
        bearer = bearer_token()
        if bearer is not None:
            method = "bearer" if token_matches(bearer) else None
        elif session.get("auth") is True:
            method = "session"
        g.auth_method = method
    return g.auth_method


def is_authenticated() -> bool:
    """Whether the request may change things."""
    return auth_method() is not None


def csrf_token() -> str:
    """The session's CSRF token, created on first use (for forms and the page's script)."""
    value = session.get("csrf")
    if not isinstance(value, str) or len(value) < 20:
        value = secrets.token_urlsafe(32)
        session["csrf"] = value
    return value


def csrf_ok() -> bool:
    """Whether the POST carries this session's CSRF token (header or form field)."""
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not isinstance(expected, str) or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def wants_json() -> bool:
    """API routes and scripts get JSON errors; browsers on pages get pages and redirects."""
    if request.path.startswith("/api/") or request.path == "/metrics":
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def unauthorized(message: str) -> Response:
    """A 401 the way the client understands it (JSON with a Bearer challenge, or the login page)."""
    if wants_json():
        resp = jsonify(error=message, login=url_for("auth.login"))
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Bearer realm="edgelabel"'
        return resp
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def forbidden_csrf() -> Response:
    """The refusal of a cookie-authenticated POST without the session's CSRF token."""
    log.warning("web: refused %s %s from %s: missing or wrong CSRF token", request.method, request.path,
                request.remote_addr)
    if wants_json():
        resp = jsonify(error="CSRF token missing or wrong; reload the page")
        resp.status_code = 403
        return resp
    abort(403, description="The form was stale (CSRF check failed). Reload the page and try again.")


def require_operator(view: F) -> F:
    """Decorator for state-changing routes: the token (bearer) or a logged-in session plus CSRF."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        method = auth_method()
        if method is None:
            if bearer_token() is not None:
                log.warning("web: refused %s %s from %s: wrong bearer token", request.method, request.path,
                            request.remote_addr)
                return unauthorized("wrong token")
            return unauthorized("login required: this action needs the operator token")
        if method == "session" and request.method not in ("GET", "HEAD", "OPTIONS") and not csrf_ok():
            return forbidden_csrf()
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# --------------------------------------------------------------------------- login throttle


class LoginThrottle:
    """Counts failed logins per address; more than MAX_FAILURES in FAILURE_WINDOW s blocks it."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW, max_addresses: int = 1000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, addr: str, now: float) -> deque[float]:
        q = self._failures.setdefault(addr, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, addr: str) -> bool:
        """Whether this address has used up its attempts."""
        with self._lock:
            return len(self._recent(addr, time.monotonic())) >= self.max_failures

    def failed(self, addr: str) -> None:
        """Count one failed attempt."""
        now = time.monotonic()
        with self._lock:
            if addr not in self._failures and len(self._failures) >= self.max_addresses:
                self._failures.pop(next(iter(self._failures)))  # bounded memory, oldest address out
            self._recent(addr, now).append(now)

    def succeeded(self, addr: str) -> None:
        """Forget the address's failures."""
        with self._lock:
            self._failures.pop(addr, None)


def _safe_next(target: str | None) -> str:
    """Only a local path may be a redirect target (no open redirects)."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//") \
                and "\\" not in target:
            return target
    return url_for("pages.dashboard")


# --------------------------------------------------------------------------- views


@bp.route("/login", methods=("GET", "POST"))
def login() -> Any:
    """The token form: a valid token starts an authenticated session."""
    throttle: LoginThrottle = current_app.extensions["edgelabel"].throttle
    next_url = _safe_next(request.values.get("next"))
    if request.method == "POST":
        addr = request.remote_addr or "?"
        if not csrf_ok():
            return forbidden_csrf()
        if throttle.blocked(addr):
            log.warning("web: login refused for %s: too many wrong tokens", addr)
            return render_template("login.html", next=next_url,
                                   error="Too many wrong tokens. Wait a few minutes."), 429
        if token_matches(request.form.get("token", "").strip()):
            throttle.succeeded(addr)
            session.clear()
            session.permanent = True
            session["auth"] = True
            csrf_token()  # a fresh CSRF token for the new session
            log.info("web: operator logged in from %s", addr)
            flash("Logged in: actions are enabled.")
            return redirect(next_url)
        throttle.failed(addr)
        log.warning("web: wrong token on the login form from %s", addr)
        return render_template("login.html", next=next_url, error="Wrong token."), 401
    return render_template("login.html", next=next_url, error=None)


@bp.post("/logout")
def logout() -> Any:
    """End the session (CSRF-checked so another site cannot log the operator out)."""
    if session.get("auth") and not csrf_ok():
        return forbidden_csrf()
    session.clear()
    flash("Logged out.")
    return redirect(url_for("pages.dashboard"))

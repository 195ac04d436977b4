"""Who may do what: operator tokens, named operators with roles, the login form, sessions, CSRF, throttles.

Why this shape:

* Every credential is a token.  ``web.token`` (generated into a 0600 file in
  the state folder when unset) is the admin ``operator``; ``web.operators``
  adds named people or scripts, each with a role: ``viewer`` reads (it
  matters when ``web.public_read`` is false), ``reviewer`` also decides
  reviews, ``admin`` also pauses and resumes sources.  Tokens are
  kept as sha256 digests only; a review decision records the authenticated
  name, never a typed one.
* A script sends ``Authorization: Bearer <token>``; a person types the token
  into the login form once and gets a signed session cookie (HttpOnly,
  SameSite=Strict, Secure over HTTPS).  The session holds a random id and a
  generation derived from the operator's token digest: changing a token ends
  every session it opened, logout puts the id on a revocation list kept in
  the state folder, and a session ends after 12 h idle and 24 h in all.
* A cookie is sent by the browser on its own, so every POST that relies on
  the session must also carry the session's CSRF token (a hidden form field or
  the ``X-CSRF-Token`` header that the page's script adds).  A bearer token is
  never sent on its own, so bearer requests need no CSRF token.
* Wrong tokens are throttled per client address and, with a shorter penalty,
  across all addresses (``FailureThrottle``): a guesser is refused with 429 and
  ``Retry-After``, and a burst shows as a few log lines, not one per request.
  Addresses that authenticated recently are exempt from the global penalty,
  so a spray from many addresses cannot lock the operators out.  Behind a
  reverse proxy the client address comes from ``X-Forwarded-For`` only when
  the proxy is ``web.trusted_proxy`` (waitress applies it).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for

from edgelabel.edge.config import WEB_ROLES, Config, ConfigError, web_token_problem

log = logging.getLogger("edgelabel.web")

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
#: failed logins allowed per address and window before that address is refused for the window
MAX_FAILURES = 5
FAILURE_WINDOW = 300.0
#: failed logins from all addresses together per window before new addresses wait GLOBAL_LOGIN_PENALTY s
GLOBAL_LOGIN_FAILURES = 30
GLOBAL_LOGIN_PENALTY = 30.0
#: wrong bearer tokens per address and window; across all addresses; and the global penalty
BEARER_FAILURES = 20
BEARER_WINDOW = 60.0
GLOBAL_BEARER_FAILURES = 200
GLOBAL_BEARER_PENALTY = 10.0
#: a session ends this long after login whatever its use (the idle limit is the app's PERMANENT_SESSION_LIFETIME)
SESSION_ABSOLUTE_LIFETIME = 24 * 3600.0
#: the name web.token authenticates as
DEFAULT_OPERATOR = "operator"
#: the least role that may change state, per blueprint (others: admin)
CHANGE_ROLE = {"review": "reviewer"}
_RANK = {role: i for i, role in enumerate(WEB_ROLES)}


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
    why = web_token_problem(token)
    if why:  # web.token itself is checked with the config; a token file may have been edited by hand
        where = "web.token" if cfg.web.token else f"web.token_file ({cfg.state_path(cfg.web.token_file)})"
        raise ConfigError([f"{where}: the operator token {why}"])
    key = load_or_create_secret(cfg.state_path(cfg.web.secret_key_file), "session key")
    return token, key


# --------------------------------------------------------------------------- operators


def token_digest(token: str) -> bytes:
    """The sha256 of a token: all that is kept of it in memory after start-up."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Operator:
    """An authenticated name, its role and its session generation (changes when its token changes)."""

    name: str
    role: str
    digest: bytes
    generation: str

    def may(self, role: str) -> bool:
        """Whether this operator's role is ``role`` or above."""
        return _RANK[self.role] >= _RANK[role]


class Operators:
    """Every token the page accepts: web.token as the admin ``operator``, plus ``web.operators``."""

    def __init__(self, entries: list[tuple[str, str, bytes]], secret_key: str) -> None:
        key = secret_key.encode("utf-8")
        self._by_name = {
            name: Operator(name, role, digest, hmac.new(key, b"gen:" + name.encode() + b":" + digest,
                                                        hashlib.sha256).hexdigest()[:32])
            for name, role, digest in entries}

    @classmethod
    def from_config(cls, cfg: Config, token: str, secret_key: str) -> Operators:
        entries = [(DEFAULT_OPERATOR, "admin", token_digest(token))]
        for name, op in cfg.web.operators.items():
            if op.token:
                entries.append((name, op.role, token_digest(op.token)))
            elif op.token_sha256:
                entries.append((name, op.role, bytes.fromhex(op.token_sha256)))
        return cls(entries, secret_key)

    def match(self, candidate: str | None) -> Operator | None:
        """The operator whose token this is; every entry is compared, in constant time each."""
        if not candidate:
            return None
        digest = token_digest(candidate)
        found = None
        for op in self._by_name.values():
            if hmac.compare_digest(digest, op.digest):
                found = op
        return found

    def get(self, name: Any) -> Operator | None:
        return self._by_name.get(name) if isinstance(name, str) else None


# --------------------------------------------------------------------------- revoked sessions


class RevokedSessions:
    """Session ids ended by logout, kept until they would have expired anyway (0600 JSON in the state folder).

    A signed cookie cannot be taken back from the browser; this list is what makes logout final, also across a
    restart of the daemon.
    """

    def __init__(self, path: Path | None, max_entries: int = 10000) -> None:
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._ids: dict[str, float] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self._ids = {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                log.warning("web: the list of ended sessions in %s could not be read (%s); sessions ended before "
                            "this start are valid until they expire, at most %.0f h", path, exc,
                            SESSION_ABSOLUTE_LIFETIME / 3600)

    def revoke(self, sid: str, until: float) -> None:
        now = time.time()
        with self._lock:
            self._ids = {k: v for k, v in self._ids.items() if v > now}
            self._ids[sid] = until
            while len(self._ids) > self.max_entries:
                self._ids.pop(next(iter(self._ids)))
            snapshot = dict(self._ids)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(snapshot).encode("ascii"))
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("web: could not record an ended session in %s (%s); it stays ended until the daemon "
                        "restarts", self.path, exc)

    def __contains__(self, sid: object) -> bool:
        with self._lock:
            return isinstance(sid, str) and sid in self._ids


# --------------------------------------------------------------------------- throttles


class FailureThrottle:
    """Counts failures per client address and across all addresses; says for how long a client must wait.

    * ``max_failures`` in ``window`` s from one address: that address waits until its oldest failure is out
      of the window.
    * ``global_failures`` in ``window`` s from all addresses together: every address that has not
      authenticated in the last hour waits ``global_penalty`` s (shorter: a spray must not lock everyone out).
    * Logging is summarized: the first failure of an address in a window, the start of a block, and the start of
      a global penalty each log one line; the rest are counted.
    """

    def __init__(self, what: str = "login", max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 global_failures: int = GLOBAL_LOGIN_FAILURES, global_penalty: float = GLOBAL_LOGIN_PENALTY,
                 max_addresses: int = 1000) -> None:
        self.what = what
        self.max_failures = max_failures
        self.window = window
        self.global_failures = global_failures
        self.global_penalty = global_penalty
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()
        self._global_until = 0.0
        self._good: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, addr: str, now: float) -> deque[float]:
        q = self._failures.get(addr)
        if q is None:
            if len(self._failures) >= self.max_addresses:
                self._failures.popitem(last=False)  # bounded memory, oldest address out
            q = self._failures[addr] = deque()
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, addr: str) -> float:
        """Seconds this address must wait before its next try; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(addr, now) if addr in self._failures else deque()  # reading adds no entry
            wait = self.window - (now - q[0]) if len(q) >= self.max_failures else 0.0
            if now < self._global_until and not self._trusted(addr, now):
                wait = max(wait, self._global_until - now)
            return max(0.0, wait)

    def blocked(self, addr: str) -> bool:
        """Whether this address must wait now."""
        return self.retry_after(addr) > 0

    def _trusted(self, addr: str, now: float) -> bool:
        seen = self._good.get(addr)
        return seen is not None and now - seen < 3600.0

    def failed(self, addr: str) -> None:
        """Count one failure (and log it when it is the first of its kind in the window)."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(addr, now)
            q.append(now)
            self._all.append(now)
            while self._all and now - self._all[0] > self.window:
                self._all.popleft()
            first, blocking = len(q) == 1, len(q) == self.max_failures
            global_start = len(self._all) >= self.global_failures and now >= self._global_until
            if global_start:
                self._global_until = now + self.global_penalty
                self._all.clear()
        if first:
            log.warning("web: wrong %s from %s (further failures from it within %.0f s are counted, not logged)",
                        self.what, addr, self.window)
        if blocking:
            log.warning("web: %d wrong %s tries from %s within %.0f s; it is refused until they age out",
                        self.max_failures, self.what, addr, self.window)
        if global_start:
            log.warning("web: %d wrong %s tries from all addresses within %.0f s; addresses that have not "
                        "logged in lately wait %.0f s", self.global_failures, self.what, self.window,
                        self.global_penalty)

    def succeeded(self, addr: str) -> None:
        """Forget the address's failures and exempt it from the global penalty for an hour."""
        with self._lock:
            self._failures.pop(addr, None)
            self._good[addr] = time.monotonic()
            self._good.move_to_end(addr)
            while len(self._good) > self.max_addresses:
                self._good.popitem(last=False)


#: the name the web context knows the login throttle by
LoginThrottle = FailureThrottle


@dataclass
class AuthState:
    """The app's credentials and counters (``app.extensions["edgelabel_auth"]``)."""

    operators: Operators
    revoked: RevokedSessions
    bearer_throttle: FailureThrottle


def auth_state() -> AuthState:
    return current_app.extensions["edgelabel_auth"]  # type: ignore[no-any-return]


def client_address() -> str:
    """The client's address (behind ``web.trusted_proxy`` waitress has already taken it from X-Forwarded-For)."""
    return request.remote_addr or "?"


def too_many(retry_after: float, message: str) -> Response:
    """A 429 with Retry-After, JSON for scripts, the login page for people."""
    seconds = max(1, int(retry_after + 0.999))
    if wants_json() or request.endpoint != "auth.login":
        resp = jsonify(error=f"{message}; retry after {seconds} s")
        resp.status_code = 429
    else:
        resp = Response(render_template("login.html", next=_safe_next(request.values.get("next")),
                                        error=f"{message}. Wait {seconds} s."), status=429)
    resp.headers["Retry-After"] = str(seconds)
    return resp


def check_bearer() -> Response | None:
    """``before_request``: refuse a throttled client's bearer token before it is compared; count wrong ones."""
    bearer = bearer_token()
    if bearer is None:
        return None
    state, addr = auth_state(), client_address()
    wait = state.bearer_throttle.retry_after(addr)
    if wait > 0:
        return too_many(wait, "too many wrong tokens")
    op = state.operators.match(bearer)
    if op is None:
        state.bearer_throttle.failed(addr)
    else:
        state.bearer_throttle.succeeded(addr)
    g.operator, g.auth_method = op, ("bearer" if op else None)
    return None


# --------------------------------------------------------------------------- checks


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _session_operator() -> Operator | None:
    """The operator of a live session: known name, current token generation, not logged out, not too old."""
    state = auth_state()
    op = state.operators.get(session.get("op"))
    gen, sid, iat = session.get("gen"), session.get("sid"), session.get("iat")
    if op is None or not isinstance(gen, str) or not isinstance(sid, str) or not isinstance(iat, (int, float)):
        return None
    if not hmac.compare_digest(gen.encode(), op.generation.encode()) or sid in state.revoked:
        return None
    if not 0 <= time.time() - iat < SESSION_ABSOLUTE_LIFETIME:
        return None
    return op


def current_operator() -> Operator | None:
    """Who this request is: the bearer token's operator, else the session's, else None (anonymous)."""
    if "auth_method" not in g:
        op, method = None, None
        bearer = bearer_token()
        if bearer is not None:
            op = auth_state().operators.match(bearer)
            method = "bearer" if op else None
        else:
            op = _session_operator()
            method = "session" if op else None
        g.operator, g.auth_method = op, method
    return g.operator  # type: ignore[no-any-return]


def auth_method() -> str | None:
    """``"bearer"`` or ``"session"`` when the request carries an operator's credentials, else None."""
    current_operator()
    return g.auth_method  # type: ignore[no-any-return]


def is_authenticated() -> bool:
    """Whether the request carries any operator's credentials (a viewer's too)."""
    return current_operator() is not None


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
                client_address())
    if wants_json():
        resp = jsonify(error="CSRF token missing or wrong; reload the page")
        resp.status_code = 403
        return resp
    abort(403, description="The form was stale (CSRF check failed). Reload the page and try again.")


def forbidden_role(op: Operator, needed: str) -> Response:
    """The refusal of an action above the operator's role."""
    message = f"operator {op.name!r} has the role {op.role}; this action needs {needed} (ask an admin)"
    if wants_json():
        resp = jsonify(error=message)
        resp.status_code = 403
        return resp
    abort(403, description=message)


def require_operator(view: F) -> F:
    """Decorator for operator routes: a token (bearer) or a logged-in session, plus CSRF and the role on changes.

    Reading needs any role; a state-changing method needs ``CHANGE_ROLE`` of the route's blueprint (admin for
    the rest), so a viewer can look but not touch.
    """

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        op = current_operator()
        if op is None:
            if bearer_token() is not None:
                return unauthorized("wrong token")
            return unauthorized("login required: this action needs an operator token")
        changes = request.method not in ("GET", "HEAD", "OPTIONS")
        if changes and auth_method() == "session" and not csrf_ok():
            return forbidden_csrf()
        needed = CHANGE_ROLE.get(request.blueprint or "", "admin") if changes else "viewer"
        if not op.may(needed):
            return forbidden_role(op, needed)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


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
    """The token form: a valid token starts a session for its operator."""
    throttle: FailureThrottle = current_app.extensions["edgelabel"].throttle
    next_url = _safe_next(request.values.get("next"))
    if request.method == "POST":
        addr = client_address()
        if not csrf_ok():
            return forbidden_csrf()
        wait = throttle.retry_after(addr)
        if wait > 0:
            return too_many(wait, "Too many wrong tokens")
        op = auth_state().operators.match(request.form.get("token", "").strip())
        if op is not None:
            throttle.succeeded(addr)
            session.clear()
            session.permanent = True
            session.update(op=op.name, gen=op.generation, sid=secrets.token_urlsafe(16), iat=int(time.time()))
            csrf_token()  # a fresh CSRF token for the new session
            log.info("web: %s (%s) logged in from %s", op.name, op.role, addr)
            flash(f"Logged in as {op.name} ({op.role}).")
            return redirect(next_url)
        throttle.failed(addr)
        return render_template("login.html", next=next_url, error="Wrong token."), 401
    return render_template("login.html", next=next_url, error=None)


@bp.post("/logout")
def logout() -> Any:
    """End the session here and server-side (CSRF-checked so another site cannot log the operator out)."""
    if session.get("sid") and not csrf_ok():
        return forbidden_csrf()
    sid, iat = session.get("sid"), session.get("iat")
    if isinstance(sid, str) and isinstance(iat, (int, float)):
        auth_state().revoked.revoke(sid, iat + SESSION_ABSOLUTE_LIFETIME)
        log.info("web: %s logged out from %s", session.get("op"), client_address())
    session.clear()
    flash("Logged out.")
    return redirect(url_for("pages.dashboard"))

"""Who may do what: user accounts, tokens, the login form, server-side sessions, CSRF, throttles.

Why this shape:

* Three kinds of credential, each with a role (``viewer`` reads, which matters when ``web.public_read`` is
  false; ``reviewer`` also decides reviews; ``admin`` also pauses and resumes sources):

  - **users** with passwords (``edgelabel user add NAME --role ROLE``), for people, kept in the account
    store (``edge/accounts.py``: scrypt hashes in ``<state_dir>/web-accounts.sqlite``, 0600);
  - **API tokens** (``edgelabel token add NAME --role ROLE``), for scripts, in the same store as sha256
    digests; revocable one by one;
  - **configured tokens**: ``web.token`` (generated into a 0600 file in the state folder when unset) is
    the admin ``operator``, the service credential of the appliance; ``web.operators`` adds named ones.

  A review decision records the authenticated name, never a typed one.
* A script sends ``Authorization: Bearer <token>`` (any kind of token).  A person logs in through the form
  with a user name and password, or with a token in its own field, and gets a session: the cookie holds
  only a random id, the session itself is a row in the account store (``web/sessions.py``).  Logout
  deletes the row; a password change, disabling or removing the user, revoking the API token or changing
  the configured token that opened it ends it too; so do 12 h without a request and 24 h after login.
* A cookie is sent by the browser on its own, so every POST that relies on the session must also carry the
  session's CSRF token (a hidden form field or the ``X-CSRF-Token`` header that the page's script adds).  A
  bearer token is never sent on its own, so bearer requests need no CSRF token.
* Failures are throttled (``web/throttle.py``): wrong tokens and wrong logins per client address and across
  all addresses, wrong passwords also per user name; a guesser is refused with 429 and ``Retry-After``,
  and a burst shows as a few log lines, not one per request.  Addresses that authenticated recently are
  exempt from the global penalty and from a user name's block, so a spray cannot lock the operators out.
  Behind a reverse proxy the client address comes from ``X-Forwarded-For`` only when the proxy is
  ``web.trusted_proxy`` (waitress applies it).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for

from edgelabel.edge.accounts import (
    KIND_API_TOKEN,
    KIND_CONFIG_TOKEN,
    KIND_USER,
    PASSWORD_MAX_LENGTH,
    AccountStore,
    Session,
    user_cred,
)
from edgelabel.edge.config import WEB_ROLES, WEB_TOKEN_MIN_LENGTH, Config, ConfigError, web_token_problem
from edgelabel.web.throttle import BEARER_FAILURES as BEARER_FAILURES
from edgelabel.web.throttle import BEARER_WINDOW as BEARER_WINDOW
from edgelabel.web.throttle import GLOBAL_BEARER_FAILURES as GLOBAL_BEARER_FAILURES
from edgelabel.web.throttle import GLOBAL_BEARER_PENALTY as GLOBAL_BEARER_PENALTY
from edgelabel.web.throttle import CredentialThrottle, FailureThrottle

log = logging.getLogger("edgelabel.web")

bp = Blueprint("auth", __name__)

F = TypeVar("F", bound=Callable[..., Any])

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
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
    """An authenticated name and its role.

    ``kind`` is how it authenticated: ``token`` (web.token or web.operators), ``api-token`` (the account
    store's API tokens) or ``user`` (a password); ``cred`` ties a session to the credential that opened it
    (a configured token's generation, which changes with the token; an API token's id; a user's ``changed``
    stamp as the password check read it).
    """

    name: str
    role: str
    kind: str = KIND_CONFIG_TOKEN
    digest: bytes = b""
    cred: str = ""

    @property
    def generation(self) -> str:
        return self.cred

    def may(self, role: str) -> bool:
        """Whether this operator's role is ``role`` or above."""
        return _RANK[self.role] >= _RANK[role]


class Operators:
    """The configured tokens: web.token as the admin ``operator``, plus ``web.operators``."""

    def __init__(self, entries: list[tuple[str, str, bytes]], secret_key: str) -> None:
        key = secret_key.encode("utf-8")
        self._by_name = {
            name: Operator(name, role, KIND_CONFIG_TOKEN, digest,
                           hmac.new(key, b"gen:" + name.encode() + b":" + digest, hashlib.sha256).hexdigest()[:32])
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


#: the name the web context knows the login throttle by
LoginThrottle = FailureThrottle


@dataclass
class AuthState:
    """The app's credentials and counters (``app.extensions["edgelabel_auth"]``)."""

    operators: Operators
    accounts: AccountStore
    bearer_throttle: FailureThrottle
    name_throttle: CredentialThrottle = field(default_factory=CredentialThrottle)

    def resolve_token(self, candidate: str | None) -> Operator | None:
        """The operator whose token this is: a configured one, else a live API token; None for anything else.

        A token shorter than the configured minimum is refused before any lookup (and counted as a failure by
        the caller). The account store may raise ``sqlite3.Error`` / ``OSError``.
        """
        if not candidate or len(candidate) < WEB_TOKEN_MIN_LENGTH or len(candidate) > 512:
            return None
        op = self.operators.match(candidate)
        if op is not None:
            return op
        tok = self.accounts.match_token(candidate)
        return Operator(tok.name, tok.role, KIND_API_TOKEN, cred=tok.id) if tok is not None else None

    def session_operator(self, record: Session | None) -> Operator | None:
        """The operator of a live session row (the store has checked its lifetimes, user and API token)."""
        if record is None:
            return None
        if record.kind == KIND_CONFIG_TOKEN:
            op = self.operators.get(record.name)  # the configured token must still be the one that logged in
            return op if op is not None and hmac.compare_digest(op.cred.encode(), record.cred.encode()) else None
        if record.kind in (KIND_USER, KIND_API_TOKEN) and record.role in _RANK:
            return Operator(record.name, record.role, record.kind, cred=record.cred)
        return None


def auth_state() -> AuthState:
    return current_app.extensions["edgelabel_auth"]  # type: ignore[no-any-return]


def store_unavailable(exc: Exception) -> Response:
    """A 503 naming the account file, when it cannot be read (a full or read-only disk)."""
    path = auth_state().accounts.path
    log.error("web: the account store %s cannot be used: %s", path, exc)
    message = f"the account store {path.name} in the state folder cannot be read ({type(exc).__name__}); see the daemon log"
    if wants_json() or request.endpoint != "auth.login":
        resp = jsonify(error=message)
        resp.status_code = 503
        return resp
    return Response(render_template("login.html", next=_safe_next(request.values.get("next")), error=message),
                    status=503)


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
    try:
        op = state.resolve_token(bearer)
    except (sqlite3.Error, OSError) as exc:
        return store_unavailable(exc)
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
    """The operator of this request's server-side session; a session whose configured token changed is ended."""
    record = getattr(session, "record", None)
    if record is None:
        return None
    state = auth_state()
    op = state.session_operator(record)
    if op is None:
        try:
            state.accounts.end_session(session.sid)  # type: ignore[attr-defined]
        except (sqlite3.Error, OSError) as exc:
            log.warning("web: a session could not be ended in %s: %s", state.accounts.path, exc)
        session.end()  # type: ignore[attr-defined]
    return op


def current_operator() -> Operator | None:
    """Who this request is: the bearer token's operator, else the session's, else None (anonymous)."""
    if "auth_method" not in g:
        op, method = None, None
        bearer = bearer_token()
        if bearer is not None:  # check_bearer ran first and set g; this is for requests outside it
            try:
                op = auth_state().resolve_token(bearer)
            except (sqlite3.Error, OSError):
                op = None
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
            return unauthorized("login required: log in at /login, or send a token as Authorization: Bearer")
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


def _login_page(next_url: str, error: str | None, status: int = 200, username: str = "") -> Any:
    return render_template("login.html", next=next_url, error=error, username=username), status


def _start_session(state: AuthState, op: Operator, addr: str, how: str, next_url: str) -> Any:
    """A new server-side session for ``op`` (a new id: nothing of the anonymous state is kept)."""
    raw, expires = state.accounts.create_session(op.kind, op.name, op.cred)
    now = state.accounts.clock()
    record = Session(digest="", kind=op.kind, name=op.name, cred=op.cred, role=op.role, created=now,
                     last_seen=now, expires=expires, data={})
    session.start(raw, record)  # type: ignore[attr-defined]
    csrf_token()  # a fresh CSRF token for the new session
    log.info("web: %s (%s) logged in with a %s from %s", op.name, op.role, how, addr)
    flash(f"Logged in as {op.name} ({op.role}).")
    return redirect(next_url)


def _password_login(state: AuthState, throttle: FailureThrottle, addr: str, username: str, password: str,
                    next_url: str) -> Any:
    key = username[:64]
    wait = state.name_throttle.retry_after(key, addr)
    if wait > 0:
        return too_many(wait, "Too many wrong passwords for this user name")
    user = state.accounts.check_password(username, password[:PASSWORD_MAX_LENGTH + 1])
    if user is None:
        throttle.failed(addr)
        known = len(username) <= 64 and state.accounts.user(username) is not None
        # an unknown name is not logged: it may be a password typed into the wrong field.  No name is put back
        # into the form either: echoing only known ones would tell a guesser which names exist
        state.name_throttle.failed(key, f"user {username!r}" if known else "an unknown user name")
        return _login_page(next_url, "Wrong user name or password.", 401)
    throttle.succeeded(addr)
    state.name_throttle.succeeded(key, addr)
    # the session is tied to the account as checked: a change that lands before its row is written ends it
    return _start_session(state, Operator(user.name, user.role, KIND_USER, cred=user_cred(user.changed)), addr,
                          "password", next_url)


@bp.route("/login", methods=("GET", "POST"))
def login() -> Any:
    """The login form: a user name and password, or a token; either starts a server-side session."""
    throttle: FailureThrottle = current_app.extensions["edgelabel"].throttle
    next_url = _safe_next(request.values.get("next"))
    if request.method != "POST":
        return _login_page(next_url, None)
    addr = client_address()
    if not csrf_ok():
        return forbidden_csrf()
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    token = request.form.get("token", "").strip()
    if username and token:
        return _login_page(next_url, "Give a user name and password, or a token, not both.", 400, username)
    if not username and not token:
        return _login_page(next_url, "Enter your user name and password, or a token.", 400)
    wait = throttle.retry_after(addr)
    if wait > 0:
        return too_many(wait, "Too many failed logins from this address" if username else "Too many wrong tokens")
    state = auth_state()
    try:
        if username:
            return _password_login(state, throttle, addr, username, password, next_url)
        op = state.resolve_token(token)
        if op is None:
            throttle.failed(addr)
            return _login_page(next_url, "Wrong token.", 401)
        throttle.succeeded(addr)
        return _start_session(state, op, addr, "token", next_url)
    except (sqlite3.Error, OSError) as exc:
        return store_unavailable(exc)


@bp.post("/logout")
def logout() -> Any:
    """End the session server-side (CSRF-checked so another site cannot log the operator out)."""
    sid = getattr(session, "sid", None)
    if sid and not csrf_ok():
        return forbidden_csrf()
    if sid:
        record = session.record  # type: ignore[attr-defined]
        try:
            auth_state().accounts.end_session(sid)
        except (sqlite3.Error, OSError) as exc:
            return store_unavailable(exc)
        log.info("web: %s logged out from %s", record.name if record else "?", client_address())
        session.end()  # type: ignore[attr-defined]
    flash("Logged out.")
    return redirect(url_for("pages.dashboard"))

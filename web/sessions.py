"""Server-side sessions for Flask: the cookie holds a random id, the account store (edge/accounts.py) the rest.

Why two cookies:

* ``edgelabel_session`` exists only after a login and holds nothing but the session's random id (256 bits).
  What the session means (who, since when, its CSRF token) is in the account store under the id's sha256,
  so ending a session there (logout, password change, revoked token, idle or absolute lifetime) ends it for
  every copy of the cookie at once.
* Before login the page still needs a CSRF token for the login form and a place for a flashed message
  ("Logged out.").  Keeping such anonymous state server-side would let anyone on the LAN fill the store
  with rows, so it travels in ``edgelabel_login``, signed with the app's key (itsdangerous, as Flask's own
  sessions), holding no authority: a forged or copied one logs no one in.

Both cookies are HttpOnly, SameSite=Strict and ``Secure`` whenever the request came over HTTPS (``web.tls``,
or a trusted proxy's ``X-Forwarded-Proto``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from datetime import datetime, timezone
from typing import Any

from flask import Flask, Request, Response, has_request_context, request
from flask.sessions import SessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.datastructures import CallbackDict

from edgelabel.edge.accounts import IDLE_LIFETIME, AccountStore, Session

log = logging.getLogger("edgelabel.web")

#: the anonymous (pre-login) cookie
ANON_COOKIE = "edgelabel_login"


class EdgeSession(CallbackDict, SessionMixin):  # type: ignore[type-arg]
    """``flask.session``: a dict saved server-side when ``sid`` is set, in the signed anonymous cookie otherwise."""

    def __init__(self, initial: dict[str, Any] | None = None, sid: str | None = None,
                 record: Session | None = None, stale: bool = False) -> None:
        def on_update(self: EdgeSession) -> None:
            self.modified = True
            self.accessed = True

        super().__init__(initial or {}, on_update)
        self.sid = sid
        self.record = record
        self.stale = stale  # the request carried a session id that is no longer valid
        self.started = False
        self.ended = False
        self.expires: float | None = record.expires if record is not None else None
        self.modified = False
        self.accessed = False

    def start(self, sid: str, record: Session) -> None:
        """Become the new server-side session ``sid`` (login); nothing of the anonymous state is kept."""
        self.clear()
        self.sid, self.record, self.expires, self.started, self.ended = sid, record, record.expires, True, False
        self.modified = True

    def end(self) -> None:
        """Become anonymous (logout; the caller has removed the server-side row)."""
        self.clear()
        self.sid, self.record, self.expires, self.started, self.ended = None, None, None, False, True
        self.modified = True


class ServerSessionInterface(SessionInterface):
    """Opens and saves ``EdgeSession`` objects (see the module docstring)."""

    def __init__(self, store: AccountStore) -> None:
        self.store = store

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app) or (has_request_context() and request.is_secure))

    def _serializer(self, app: Flask) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(str(app.secret_key), salt="edgelabel-anonymous-session",
                                      signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha256})

    def open_session(self, app: Flask, request: Request) -> EdgeSession:
        raw = request.cookies.get(self.get_cookie_name(app))
        if raw:
            try:
                record = self.store.session(raw)
            except (sqlite3.Error, OSError) as exc:
                log.warning("web: the session store %s cannot be read (%s); the request is treated as not logged "
                            "in", self.store.path, exc)
                record = None
            if record is not None:
                return EdgeSession(record.data, sid=raw, record=record)
        data: dict[str, Any] = {}
        anon = request.cookies.get(ANON_COOKIE)
        if anon:
            try:
                loaded = self._serializer(app).loads(anon, max_age=int(IDLE_LIFETIME))
                data = loaded if isinstance(loaded, dict) else {}
            except BadSignature:
                data = {}
        return EdgeSession(data, stale=bool(raw))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, EdgeSession)
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        kw = {"domain": domain, "path": path, "secure": self.get_cookie_secure(app),
              "samesite": self.get_cookie_samesite(app), "httponly": self.get_cookie_httponly(app)}
        if session.accessed:
            response.vary.add("Cookie")
        if session.sid is not None:
            if session.modified:
                try:
                    self.store.save_session_data(session.sid, dict(session))
                except (sqlite3.Error, OSError) as exc:
                    log.warning("web: a session's data could not be saved in %s (%s)", self.store.path, exc)
            if session.started:
                expires = datetime.fromtimestamp(session.expires or 0, tz=timezone.utc)
                response.set_cookie(name, session.sid, expires=expires, **kw)  # type: ignore[arg-type]
                response.delete_cookie(ANON_COOKIE, **kw)  # type: ignore[arg-type]
            return
        if session.ended or session.stale:
            response.delete_cookie(name, **kw)  # type: ignore[arg-type]
        if not session.modified:
            return
        if session:
            value = self._serializer(app).dumps(dict(session))
            response.set_cookie(ANON_COOKIE, value, max_age=int(IDLE_LIFETIME), **kw)  # type: ignore[arg-type]
        else:
            response.delete_cookie(ANON_COOKIE, **kw)  # type: ignore[arg-type]

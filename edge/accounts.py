"""Local web accounts: people with passwords, API tokens, and the server-side sessions of both.

Why this shape:

* One SQLite file, ``<state_dir>/web-accounts.sqlite``, mode 0600 (created so, and set back to 0600 with a
  warning when found wider).  SQLite because the ``edgelabel user`` and ``edgelabel token`` commands edit it
  while the daemon runs: every statement is its own short transaction (a 5 s busy timeout covers the rare
  overlap) and the daemon reads the file on every login, bearer request and session lookup, so a new user,
  a revoked token or a disabled account counts at once, without a restart.  The default rollback journal
  (not WAL) keeps no ``-shm`` file around that a ``sudo edgelabel user ...`` could leave owned by root; run
  as root, the command hands a new file to the state folder's owner (the service user).
* Passwords are hashed with scrypt (``hashlib.scrypt``: OpenSSL, in the standard library, memory-hard).
  scrypt rather than argon2-cffi: no compiled dependency to build for the Jetson's aarch64 Python, and
  scrypt's memory cost is what defeats GPU guessing of a stolen file.  Parameters: n=2**15, r=8, p=1
  (32 MiB and about 0.1 s per hash on one core of the development machine), a 16-byte random salt and a
  32-byte key, stored with the hash as ``scrypt$n$r$p$salt$key`` so that they can be raised later: a hash
  made with lower parameters is replaced at its owner's next login.  At most two hashes run at once
  (``_HASH_SLOTS``): a burst of logins cannot take 32 MiB per web thread.  Comparisons are constant-time,
  and an unknown user name costs the same hash as a known one (no user-name oracle by timing).
* API tokens (``edgelabel token add``) are 43 random URL-safe characters after an ``elt_`` prefix (a secret
  scanner can recognise them); only their sha256 is stored, a high-entropy secret needs no slow hash.
  Each has a role like a user, can be revoked, and records when it was last used (to the minute).
* Sessions live here, not in the cookie: the cookie holds only a random id, this table holds its sha256,
  the name and kind of the credential that opened it, the times, and the session's own data (its CSRF
  token).  A session ends at logout, when its user's password changes, when the user is disabled or
  removed, when the token that opened it is revoked or changed, after ``IDLE_LIFETIME`` without a request
  and ``ABSOLUTE_LIFETIME`` after login, whatever happens in the browser.  ``clock`` is injectable so that
  tests move time instead of sleeping.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelabel.edge.config import WEB_ROLES

log = logging.getLogger("edgelabel.accounts")

#: the store's file name inside state_dir
ACCOUNTS_FILE = "web-accounts.sqlite"
#: the shortest password accepted (NIST SP 800-63B asks for at least 8; a plant appliance gets more)
PASSWORD_MIN_LENGTH = 12
#: the longest: a hash of megabytes is work for nothing
PASSWORD_MAX_LENGTH = 1024
#: a session ends after this long without a request, and this long after login in any case
IDLE_LIFETIME = 12 * 3600.0
ABSOLUTE_LIFETIME = 24 * 3600.0
#: live sessions kept per user or token; a further login ends the oldest
MAX_SESSIONS_PER_PRINCIPAL = 50
#: last_seen and last_used are written at most this often (a read per request, a write per minute)
TOUCH_INTERVAL = 60.0
#: names of users and tokens: the same rule as web.operators; "operator" is web.token's
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RESERVED_NAMES = frozenset({"operator"})
TOKEN_PREFIX = "elt_"

#: scrypt's cost (see the module docstring); raising these rehashes each password at its next login
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
_HASH_SLOTS = threading.BoundedSemaphore(2)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, password TEXT NOT NULL,
    created REAL NOT NULL, changed REAL NOT NULL, disabled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, last_used REAL, revoked REAL);
CREATE TABLE IF NOT EXISTS sessions (
    digest TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, cred TEXT NOT NULL,
    created REAL NOT NULL, last_seen REAL NOT NULL, expires REAL NOT NULL, data TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS sessions_by_principal ON sessions (kind, name);
"""

#: the kinds of credential a session can be opened with
KIND_USER, KIND_API_TOKEN, KIND_CONFIG_TOKEN = "user", "api-token", "token"


class AccountError(Exception):
    """A refused account change; the message names the value and what to do instead."""


# --------------------------------------------------------------------------- passwords


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$key`` for ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p, KEY_BYTES))}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    with _HASH_SLOTS:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                              maxmem=256 * r * n * p + 1024 * 1024)


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time); False for a malformed entry."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with weaker parameters than today's."""
    try:
        _, n, r, p, _, _ = stored.split("$")
        return (int(n), int(r), int(p)) < (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    except ValueError:
        return True


@functools.cache
def _dummy_hash() -> str:
    """What an unknown user name is checked against, so that it costs the same time as a known one."""
    return hash_password(secrets.token_urlsafe(16))


def password_problem(password: str, name: str = "") -> str | None:
    """Why ``password`` is refused, or None: length bounds, and not the user's name."""
    if len(password) < PASSWORD_MIN_LENGTH:
        return (f"the password is only {len(password)} characters long; at least {PASSWORD_MIN_LENGTH} are "
                "required (a few unrelated words make a long password easy to remember)")
    if len(password) > PASSWORD_MAX_LENGTH:
        return f"the password is longer than {PASSWORD_MAX_LENGTH} characters"
    if name and password.strip().lower() == name.lower():
        return "the password must not be the user name"
    return None


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot name a user or token, or None."""
    if not NAME_RE.fullmatch(name):
        return f"{what} name {name[:80]!r}: use 1-64 letters, digits, '_', '-' or '.'"
    if name in RESERVED_NAMES:
        return f"{what} name {name!r} is taken by web.token (the admin 'operator'); choose another"
    return None


def role_problem(role: str) -> str | None:
    return None if role in WEB_ROLES else f"role {role!r} is not one of {', '.join(WEB_ROLES)}"


def user_cred(changed: float) -> str:
    """What ties a user's session to the account as it was when the password was checked (its ``changed``)."""
    return repr(float(changed))


def token_digest_hex(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class User:
    name: str
    role: str
    created: float
    changed: float
    disabled: bool


@dataclass(frozen=True)
class ApiToken:
    id: str
    name: str
    role: str
    created: float
    last_used: float | None
    revoked: float | None


@dataclass
class Session:
    """A live session as the web layer sees it (the raw id stays with the caller)."""

    digest: str
    kind: str
    name: str
    cred: str
    role: str | None  # the user's or API token's current role; None for config tokens (the web layer knows)
    created: float
    last_seen: float
    expires: float
    data: dict[str, Any]


# --------------------------------------------------------------------------- the store


class AccountStore:
    """Users, API tokens and sessions in one SQLite file; safe to share between the daemon and the CLI.

    The file is opened on first use, so an app that never authenticates anyone creates nothing.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    # ---- file

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._prepare_file()
            db = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _prepare_file(self) -> None:
        """Create the file 0600 (owned by the state folder's owner when run as root), or tighten its mode."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:
                os.chmod(self.path, 0o600)
                log.warning("the account file %s was readable by others (mode %o); set to 0600", self.path, mode)
            return
        os.close(fd)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            owner = self.path.parent.stat()
            if owner.st_uid != 0:  # `sudo edgelabel user add`: the daemon's service user must open it
                os.chown(self.path, owner.st_uid, owner.st_gid)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        """The first row, fetched while holding the lock (the connection is shared by the web threads)."""
        with self._lock:
            return self._conn().execute(sql, args).fetchone()  # type: ignore[no-any-return]

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements in one transaction; the row counts."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                counts = [db.execute(sql, args).rowcount for sql, args in statements]
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return counts

    # ---- users

    def _taken(self, name: str) -> str | None:
        if self._one("SELECT 1 FROM users WHERE name = ?", (name,)):
            return "a user"
        if self._one("SELECT 1 FROM tokens WHERE name = ? AND revoked IS NULL", (name,)):
            return "an API token"
        return None

    def add_user(self, name: str, role: str, password: str) -> User:
        why = name_problem(name, "user") or role_problem(role) or password_problem(password, name)
        if why:
            raise AccountError(why)
        taken = self._taken(name)
        if taken:
            raise AccountError(f"the name {name!r} is already used by {taken} (edgelabel user list / token list)")
        now = self.clock()
        hashed = hash_password(password)
        try:
            self._write([("INSERT INTO users (name, role, password, created, changed) VALUES (?, ?, ?, ?, ?)",
                          (name, role, hashed, now, now))])
        except sqlite3.IntegrityError:
            raise AccountError(f"the user {name!r} exists already") from None
        log.info("web account %r (%s) added", name, role)
        return User(name, role, now, now, False)

    def user(self, name: str) -> User | None:
        row = self._one("SELECT name, role, created, changed, disabled FROM users WHERE name = ?", (name,))
        return User(row["name"], row["role"], row["created"], row["changed"], bool(row["disabled"])) if row else None

    def users(self) -> list[User]:
        rows = self._all("SELECT name, role, created, changed, disabled FROM users ORDER BY name")
        return [User(r["name"], r["role"], r["created"], r["changed"], bool(r["disabled"])) for r in rows]

    def _need_user(self, name: str) -> None:
        if self.user(name) is None:
            raise AccountError(f"no user named {name!r} (edgelabel user list shows them)")

    def set_password(self, name: str, password: str) -> int:
        """A new password; every session of the user ends.  Returns the number of sessions ended."""
        self._need_user(name)
        why = password_problem(password, name)
        if why:
            raise AccountError(why)
        hashed = hash_password(password)
        _, ended = self._write([("UPDATE users SET password = ?, changed = ? WHERE name = ?", (hashed, self.clock(), name)),
                                ("DELETE FROM sessions WHERE kind = ? AND name = ?", (KIND_USER, name))])
        log.info("web account %r: password changed, %d session(s) ended", name, ended)
        return ended

    def set_role(self, name: str, role: str) -> None:
        """A new role; it counts from the user's next request (sessions read the role live, none ends)."""
        self._need_user(name)
        why = role_problem(role)
        if why:
            raise AccountError(why)
        self._write([("UPDATE users SET role = ? WHERE name = ?", (role, name))])
        log.info("web account %r: role set to %s", name, role)

    def set_disabled(self, name: str, disabled: bool) -> int:
        """Disable (ending every session) or enable a user; the number of sessions ended."""
        self._need_user(name)
        stmts: list[tuple[str, tuple[Any, ...]]] = [  # enabling an enabled user changes nothing (no logout)
            ("UPDATE users SET disabled = ?, changed = ? WHERE name = ? AND disabled != ?",
             (int(disabled), self.clock(), name, int(disabled)))]
        if disabled:
            stmts.append(("DELETE FROM sessions WHERE kind = ? AND name = ?", (KIND_USER, name)))
        counts = self._write(stmts)
        ended = counts[1] if disabled else 0
        log.info("web account %r %s", name, f"disabled, {ended} session(s) ended" if disabled else "enabled")
        return ended

    def remove_user(self, name: str) -> int:
        self._need_user(name)
        _, ended = self._write([("DELETE FROM users WHERE name = ?", (name,)),
                                ("DELETE FROM sessions WHERE kind = ? AND name = ?", (KIND_USER, name))])
        log.info("web account %r removed, %d session(s) ended", name, ended)
        return ended

    def check_password(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs and the account is enabled; None otherwise (same cost either way)."""
        row = None
        if NAME_RE.fullmatch(name) and len(password) <= PASSWORD_MAX_LENGTH:
            row = self._one("SELECT * FROM users WHERE name = ?", (name,))
        ok = verify_password(password[:PASSWORD_MAX_LENGTH], row["password"] if row else _dummy_hash())
        if row is None or not ok or row["disabled"]:
            return None
        if needs_rehash(row["password"]):  # parameters were raised since this hash was made
            self._write([("UPDATE users SET password = ? WHERE name = ? AND password = ?",
                          (hash_password(password), name, row["password"]))])
        return User(row["name"], row["role"], row["created"], row["changed"], False)

    # ---- API tokens

    def add_token(self, name: str, role: str) -> tuple[ApiToken, str]:
        """A new API token: its record and the secret (shown once; only its sha256 is kept)."""
        why = name_problem(name, "token") or role_problem(role)
        if why:
            raise AccountError(why)
        taken = self._taken(name)
        if taken:
            raise AccountError(f"the name {name!r} is already used by {taken}; revoke it first or choose another")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tid, now = secrets.token_hex(4), self.clock()
        self._write([("INSERT INTO tokens (id, name, role, digest, created) VALUES (?, ?, ?, ?, ?)",
                      (tid, name, role, token_digest_hex(secret), now))])
        log.info("web API token %r (%s, id %s) added", name, role, tid)
        return ApiToken(tid, name, role, now, None, None), secret

    def tokens(self) -> list[ApiToken]:
        rows = self._all("SELECT * FROM tokens ORDER BY created")
        return [ApiToken(r["id"], r["name"], r["role"], r["created"], r["last_used"], r["revoked"]) for r in rows]

    def revoke_token(self, name_or_id: str) -> ApiToken:
        """Revoke the live token with this name or id; its sessions end."""
        rows = self._all("SELECT * FROM tokens WHERE (id = ? OR name = ?) AND revoked IS NULL",
                         (name_or_id, name_or_id))
        if not rows:
            raise AccountError(f"no live API token named or with the id {name_or_id!r} (edgelabel token list)")
        if len(rows) > 1:  # one token's name is another's id: revoking either could leave the wrong one live
            ids = ", ".join(f"{r['id']} ({r['name']})" for r in rows)
            raise AccountError(f"{name_or_id!r} is both a token's name and another token's id ({ids}); nothing "
                               "revoked: name the one to revoke by its other value, the id of the named one or the name of the other "
                               "(edgelabel token list shows both)")
        row = rows[0]
        now = self.clock()
        self._write([("UPDATE tokens SET revoked = ? WHERE id = ?", (now, row["id"])),
                     ("DELETE FROM sessions WHERE kind = ? AND cred = ?", (KIND_API_TOKEN, row["id"]))])
        log.info("web API token %r (id %s) revoked", row["name"], row["id"])
        return ApiToken(row["id"], row["name"], row["role"], row["created"], row["last_used"], now)

    def match_token(self, secret: str) -> ApiToken | None:
        """The live API token whose secret this is (looked up by its sha256, which an attacker cannot steer)."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        row = self._one("SELECT * FROM tokens WHERE digest = ? AND revoked IS NULL", (token_digest_hex(secret),))
        if row is None:
            return None
        now = self.clock()
        if row["last_used"] is None or now - row["last_used"] >= TOUCH_INTERVAL:
            self._write([("UPDATE tokens SET last_used = ? WHERE id = ?", (now, row["id"]))])
        return ApiToken(row["id"], row["name"], row["role"], row["created"], now, None)

    # ---- sessions

    def create_session(self, kind: str, name: str, cred: str, data: dict[str, Any] | None = None) -> tuple[str, float]:
        """A new session: (the random id for the cookie, its absolute expiry).  Only the id's sha256 is kept."""
        raw = secrets.token_urlsafe(32)
        now = self.clock()
        expires = now + ABSOLUTE_LIFETIME
        self._write([
            ("DELETE FROM sessions WHERE expires <= ? OR last_seen <= ?", (now, now - IDLE_LIFETIME)),
            ("INSERT INTO sessions (digest, kind, name, cred, created, last_seen, expires, data) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
             (token_digest_hex(raw), kind, name, cred, now, now, expires, json.dumps(data or {}))),
            ("DELETE FROM sessions WHERE kind = ? AND name = ? AND digest NOT IN (SELECT digest FROM sessions "
             "WHERE kind = ? AND name = ? ORDER BY created DESC LIMIT ?)",
             (kind, name, kind, name, MAX_SESSIONS_PER_PRINCIPAL)),
        ])
        return raw, expires

    def session(self, raw: str) -> Session | None:
        """The live session with this cookie id, its principal checked again; None (and the row gone) otherwise."""
        if not raw or len(raw) > 100:
            return None
        digest = token_digest_hex(raw)
        row = self._one("SELECT * FROM sessions WHERE digest = ?", (digest,))
        if row is None:
            return None
        now = self.clock()
        role: str | None = None
        alive = row["created"] <= now < row["expires"] and now - row["last_seen"] < IDLE_LIFETIME
        if alive and row["kind"] == KIND_USER:
            user = self._one("SELECT role, changed, disabled FROM users WHERE name = ?", (row["name"],))
            # cred is the account's "changed" stamp seen when the password was checked (user_cred): a password
            # change, disable or removal between that check and this row being written still ends the session
            alive = user is not None and not user["disabled"] and user["changed"] <= row["created"] \
                and (not row["cred"] or row["cred"] == user_cred(user["changed"]))
            role = user["role"] if alive else None
        elif alive and row["kind"] == KIND_API_TOKEN:
            tok = self._one("SELECT role FROM tokens WHERE id = ? AND revoked IS NULL", (row["cred"],))
            alive = tok is not None
            role = tok["role"] if alive else None
        if not alive:
            self.end_session(raw)
            return None
        last_seen = row["last_seen"]
        if now - last_seen >= TOUCH_INTERVAL:
            self._write([("UPDATE sessions SET last_seen = ? WHERE digest = ?", (now, digest))])
            last_seen = now
        try:
            data = json.loads(row["data"])
        except ValueError:
            data = {}
        return Session(digest, row["kind"], row["name"], row["cred"], role, row["created"], last_seen,
                       row["expires"], data if isinstance(data, dict) else {})

    def save_session_data(self, raw: str, data: dict[str, Any]) -> None:
        self._write([("UPDATE sessions SET data = ? WHERE digest = ?", (json.dumps(data), token_digest_hex(raw)))])

    def end_session(self, raw: str) -> bool:
        (n,) = self._write([("DELETE FROM sessions WHERE digest = ?", (token_digest_hex(raw),))])
        return n > 0

    def end_sessions(self, kind: str, name: str) -> int:
        (n,) = self._write([("DELETE FROM sessions WHERE kind = ? AND name = ?", (kind, name))])
        return n

    def session_count(self, kind: str | None = None, name: str | None = None) -> int:
        if kind is None:
            return int(self._one("SELECT COUNT(*) FROM sessions")[0])  # type: ignore[index]
        return int(self._one("SELECT COUNT(*) FROM sessions WHERE kind = ? AND name = ?", (kind, name))[0])  # type: ignore[index]


def store_for(state_dir: Path, clock: Callable[[], float] = time.time) -> AccountStore:
    """The account store of the daemon whose state folder this is."""
    return AccountStore(Path(state_dir) / ACCOUNTS_FILE, clock)

"""``edgelabel user ...`` and ``edgelabel token ...``: the web accounts (edge/accounts.py) from the shell.

Why these rules:

* A password never comes from the command line (``ps`` and ``/proc/<pid>/cmdline`` show it to every
  local user): it is asked twice on the terminal, or read from the first line of standard input with
  ``--password-stdin`` (for provisioning scripts).
* A new API token is printed once, on standard output; only its sha256 is kept, so it cannot be shown
  again (revoke it and add another when it is lost).  ``token list`` and ``user list`` show no secret.
* The account file is found like every other state file: ``state_dir`` of ``-c CONFIG`` (or
  ``--state-dir DIR``).  The daemon need not stop: it reads the file on every login and request.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelabel.edge.accounts import ACCOUNTS_FILE, AccountError, AccountStore, password_problem, store_for
from edgelabel.edge.config import WEB_ROLES, ConfigError, config_from_dict, read_config_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> int:
    print(f"edgelabel: {message}", file=sys.stderr)
    return EXIT_USAGE


def _open_store(args: argparse.Namespace) -> tuple[AccountStore, set[str]]:
    """The store of -c CONFIG's state_dir (or --state-dir); plus the names web.operators already uses."""
    if args.state_dir:
        return store_for(Path(args.state_dir)), set()
    if not args.config:
        raise ConfigError([f"edgelabel {args.command}: give -c CONFIG (the daemon's config file, to find its "
                           "state_dir) or --state-dir DIR"])
    cfg = config_from_dict(read_config_file(args.config), base_dir=Path(args.config).resolve().parent)
    return AccountStore(cfg.state_path(ACCOUNTS_FILE)), set(cfg.web.operators)


def _read_password(args: argparse.Namespace, name: str) -> str:
    """The new password: the first line of stdin with --password-stdin, else asked twice on the terminal."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise AccountError("no terminal to ask for the password on; pipe it in with --password-stdin "
                               "(never put it on the command line)")
        password = getpass.getpass(f"New password for {name}: ")
        why = password_problem(password, name)
        if why:
            raise AccountError(why)
        if getpass.getpass("Repeat it: ") != password:
            raise AccountError("the two passwords differ; nothing was changed")
    why = password_problem(password, name)
    if why:
        raise AccountError(why)
    return password


def _unusable(store: AccountStore, exc: Exception) -> int:
    """The account file could not be read or written (SQLite says why: locked, not a database, read-only)."""
    print(f"edgelabel: the account file {store.path} cannot be used: {exc}. If it is busy, try again; run the "
          "command as the daemon's service user (sudo -u ...) if it is not writable", file=sys.stderr)
    return EXIT_FAILED


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _run(args: argparse.Namespace, action: Callable[[AccountStore, set[str]], None]) -> int:
    """Open the account store named by ``-c``/``--state-dir``, run ``action`` on it, turn its errors into exits."""
    try:
        store, config_names = _open_store(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"edgelabel: config error: {line}", file=sys.stderr)
        return EXIT_USAGE
    try:
        action(store, config_names)
    except AccountError as exc:
        return _err(str(exc))
    except (OSError, sqlite3.Error) as exc:
        return _unusable(store, exc)
    finally:
        store.close()
    return EXIT_OK


def _new_name(name: str, config_names: set[str]) -> None:
    if name in config_names:
        raise AccountError(f"the name {name!r} is a web.operators entry in the config; choose another")


def cmd_user(args: argparse.Namespace) -> int:
    def action(store: AccountStore, config_names: set[str]) -> None:
        if args.action == "add":
            _new_name(args.name, config_names)
            user = store.add_user(args.name, args.role, _read_password(args, args.name))
            print(f"user {user.name} added ({user.role}); log in at the web page's /login")
        elif args.action == "passwd":
            if store.user(args.name) is None:
                raise AccountError(f"no user named {args.name!r} (edgelabel user list shows them)")
            ended = store.set_password(args.name, _read_password(args, args.name))
            print(f"password of {args.name} changed; {ended} session(s) ended")
        elif args.action == "list":
            users = store.users()
            if not users:
                print("no users yet (edgelabel user add NAME --role admin -c CONFIG)")
            for u in users:
                state = "disabled" if u.disabled else "enabled"
                print(f"{u.name:<24} {u.role:<9} {state:<9} created {_when(u.created)}  changed {_when(u.changed)}")
        elif args.action == "role":
            store.set_role(args.name, args.role)
            print(f"user {args.name} is now {args.role} (from their next request)")
        elif args.action == "remove":
            ended = store.remove_user(args.name)
            print(f"user {args.name} removed; {ended} session(s) ended")
        elif args.action in ("disable", "enable"):
            ended = store.set_disabled(args.name, args.action == "disable")
            print(f"user {args.name} {args.action}d" + (f"; {ended} session(s) ended" if args.action == "disable" else ""))

    return _run(args, action)


def cmd_token(args: argparse.Namespace) -> int:
    def action(store: AccountStore, config_names: set[str]) -> None:
        if args.action == "add":
            _new_name(args.name, config_names)
            tok, secret = store.add_token(args.name, args.role)
            print(secret)
            print(f"API token {tok.name} ({tok.role}, id {tok.id}) added. It is shown this once: store it now "
                  "(send it as 'Authorization: Bearer <token>').", file=sys.stderr)
        elif args.action == "list":
            toks = store.tokens()
            if not toks:
                print("no API tokens (edgelabel token add NAME --role ROLE -c CONFIG)")
            for t in toks:
                state = f"revoked {_when(t.revoked)}" if t.revoked else "live"
                print(f"{t.id}  {t.name:<24} {t.role:<9} created {_when(t.created)}  last used {_when(t.last_used)}  "
                      f"{state}")
        elif args.action == "revoke":
            tok = store.revoke_token(args.name)
            print(f"API token {tok.name} (id {tok.id}) revoked; it is refused from now on")

    return _run(args, action)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="the daemon's config file (the accounts live in its state_dir)")
    p.add_argument("--state-dir", metavar="DIR", help="the daemon's state folder, instead of -c")


def add_parsers(sub: Any) -> None:
    """Add ``user`` and ``token`` to the ``edgelabel`` command's subparsers."""
    u = sub.add_parser("user", help="web accounts with passwords: add, passwd, list, role, remove, disable, enable")
    uact = u.add_subparsers(dest="action", required=True)
    add = uact.add_parser("add", help="add a user (the password is asked twice, or read with --password-stdin)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=list(WEB_ROLES))
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    pw = uact.add_parser("passwd", help="set a new password (ends the user's sessions)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    uact.add_parser("list", help="the users, their roles and states (no secrets)")
    rl = uact.add_parser("role", help="give a user another role (counts from their next request)")
    rl.add_argument("name")
    rl.add_argument("role", choices=list(WEB_ROLES))
    for action, text in (("remove", "remove a user (ends their sessions)"),
                         ("disable", "refuse a user's logins and end their sessions"), ("enable", "allow them again")):
        uact.add_parser(action, help=text).add_argument("name")
    for p in uact.choices.values():
        _where(p)
    u.set_defaults(func=cmd_user)

    t = sub.add_parser("token", help="API tokens with a role for scripts: add (shown once), list, revoke")
    tact = t.add_subparsers(dest="action", required=True)
    tadd = tact.add_parser("add", help="make a token; it is printed once, only its sha256 is kept")
    tadd.add_argument("name")
    tadd.add_argument("--role", required=True, choices=list(WEB_ROLES))
    tact.add_parser("list", help="the tokens: id, name, role, last use (no secrets)")
    tact.add_parser("revoke", help="revoke a token by name or id (refused at once, its sessions end)") \
        .add_argument("name", metavar="NAME|ID")
    for p in tact.choices.values():
        _where(p)
    t.set_defaults(func=cmd_token)

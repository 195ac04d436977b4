"""Query parameters, read one way for every route.

A parameter that is absent takes its default.  A parameter that is present must be valid, and an empty
value (``?limit=``) is not a number: it is refused with 400 like ``?limit=abc``, because a client that
sends it has a bug the answer should show, and because the OpenAPI document says so (``type: integer``).
Every refusal names the parameter, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from flask import abort, request

# ASCII only: int() and float() also take other scripts' digits, "1_000" and surrounding blanks
_INT = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _present(name: str) -> str | None:
    """The raw value, None when absent; a parameter given twice is refused (which one would count?)."""
    values = request.args.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        abort(400, description=f"{name}: given {len(values)} times; give it once")
    return values[0]


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """An integer in lo..hi; absent: ``default``."""
    raw = _present(name)
    if raw is None:
        return default
    if not _INT.fullmatch(raw):
        abort(400, description=f"{name}: {raw!r} is not an integer; give a whole number {lo}..{hi} or leave it out")
    value = int(raw)
    if not lo <= value <= hi:
        abort(400, description=f"{name}: {value} is outside {lo}..{hi}")
    return value


def float_arg(name: str, default: float, lo: float, hi: float, *, hi_inclusive: bool = True) -> float:
    """A finite number in lo..hi (hi excluded unless ``hi_inclusive``); absent: ``default``."""
    raw = _present(name)
    if raw is None:
        return default
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    upper = f"{hi}" if hi_inclusive else f"below {hi}"
    if not math.isfinite(value):
        abort(400, description=f"{name}: {raw!r} is not a number; give one from {lo} to {upper} or leave it out")
    if value < lo or value > hi or (value == hi and not hi_inclusive):
        abort(400, description=f"{name}: {value} is outside {lo} to {upper}")
    return value


def choice_arg(name: str, choices: Sequence[str], default: str | None = None) -> str | None:
    """One of ``choices``; absent: ``default``.  An empty value is not a choice."""
    raw = _present(name)
    if raw is None:
        return default
    if raw not in choices:
        abort(400, description=f"{name}: {raw!r} is not one of {', '.join(choices)}")
    return raw


def str_arg(name: str) -> str | None:
    """A free-text filter; absent or empty: None (no filter), as a form's "all" option sends it."""
    raw = _present(name)
    return raw or None

"""Query parameters, read one way for every route.

A parameter that is absent takes its default.  A parameter that is present must be valid, and an empty
value (``?limit=``) is not a number: it is refused with 400 like ``?limit=abc``, because a client that
sends it has a bug the answer should show, and because the OpenAPI document says so (``type: integer``).
Every refusal names the parameter, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

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


#: deepest nesting a request body may have: a review decision is an object of a list of boxes (depth 3),
#: with room for what clients add; Python's parser gave up with RecursionError near 1000
MAX_JSON_DEPTH = 32


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf and broke the box arithmetic downstream
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 300:  # float() of it would overflow (a double ends near 1.8e308)
        raise ValueError(f"{text[:40]}... is out of range")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or 400 saying what is wrong with it.

    Stricter than ``request.get_json``: nesting deeper than MAX_JSON_DEPTH (which made the parser raise
    RecursionError, a 500), NaN/Infinity and numbers beyond a double (1e400) are refused up front.
    """
    data = request.get_data(cache=True)
    if not data.strip():
        abort(400, description="expected a JSON object in the body (Content-Type: application/json)")
    if json_depth(data) > MAX_JSON_DEPTH:
        abort(400, description=f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(data, parse_float=_finite, parse_int=_bounded_int, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        abort(400, description=f"the body is not valid JSON: {str(exc)[:200]}")
    if not isinstance(body, dict):
        abort(400, description="expected a JSON object in the body")
    return body

"""One function that takes credentials out of any text before it is shown or logged.

Cameras and brokers take their secrets in many places, and every one of them ends up in a source URI, a
GStreamer pipeline, an OpenCV/FFmpeg error or a config value that the daemon shows somewhere (the log, the web
page, the API, ``doctor``).  ``redact`` knows them all, so callers never decide what is secret:

* user info in a URL: ``rtsp://admin:secret@cam/`` -> ``rtsp://admin:***@cam/`` (the user stays visible to
  spot a wrong account; a raw ``@``, ``#``, ``?`` or ``/`` inside the password is covered: the user info runs
  to the last ``@`` of the URL);
* query and path parameters named like a credential, in any position and any case:
  ``?user=admin&password=x``, ``/user=admin&password=x&channel=1``, ``;pwd=x``, ``token=``, ``key=``, ``auth=``;
* GStreamer properties: ``user-id=``, ``user-pw=``, ``proxy-pw=``, ``password=``, quoted or not;
* percent-encoded forms of all the above (a camera URL inside another URL's query, ``password%3Dx``).

What is masked is the value; names, hosts, paths and ports stay readable.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"

#: parameter names that carry a credential (the whole name, any case): user/username/login, the password
#: family, tokens, keys, auth*, secrets, signatures; GStreamer's user-id/user-pw/proxy-id/proxy-pw and any
#: other ``*-pw``/``*_password``/``*_token``/``*_secret``
_NAME = (r"(?:user(?:[-_]?(?:name|id))?|login|proxy[-_]?id|pass(?:word|wd|phrase)?|pwd|passwd|token|"
         r"(?:api|access|secret|private)?[-_]?key|auth\w*|secret|credentials?|sig(?:nature)?|"
         r"[a-z]*[-_](?:pw|pwd|pass|passwd|password|token|secret))")
#: a name that is a password even in ``name: value`` form (as YAML and error texts write it)
_COLON_NAME = r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|[a-z]*[-_](?:pw|pwd|password|token|secret))"
_VALUE = r"(?P<value>\"[^\"]*\"?|'[^']*'?|[^\s&;/,|!\"']*)"
_LEAD = r"(?:^|(?<=[\s?&;/,|!{(\"'\[=:]))(?:--?)?"
#: name=value where the name starts a parameter (after a separator or a blank) and the value is quoted or runs
#: to the next separator; ``#`` does not end a value (a raw # in a password)
_PARAM_RE = re.compile(rf"{_LEAD}{_NAME}\s*=\s*{_VALUE}", re.IGNORECASE)
_COLON_RE = re.compile(rf"{_LEAD}{_COLON_NAME}\s*:\s+{_VALUE}", re.IGNORECASE)
#: a URL up to the end of its token (blank or quote): its user info is anything before the last @
_URL_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s\"'<>]*)")


#: values that are not secrets but stand-ins for one (SQL and format placeholders in a traceback's source line)
_PLACEHOLDERS = frozenset({"?", "%s", "{}", "***"})


def _mask_param(m: re.Match[str]) -> str:
    value = m.group("value")
    if not value or value in _PLACEHOLDERS:
        return m.group(0)
    quote = value[0] if value[0] in "\"'" else ""
    masked = f"{quote}{MASK}{quote}" if quote and len(value) > 1 and value.endswith(quote) else f"{quote}{MASK}"
    head = m.group(0)[: m.start("value") - m.start(0)]
    return head + masked


def _mask_userinfo(m: re.Match[str], replacement: str | None) -> str:
    scheme, rest = m.group("scheme"), m.group("rest")
    at = rest.rfind("@")
    if at < 0:
        return m.group(0)
    userinfo, host = rest[:at], rest[at + 1:]
    if "/" in userinfo and ":" not in userinfo.split("/", 1)[0]:
        # no user info here (rtsp://cam/live@main), but maybe in a URL nested in this one's path or query
        return scheme + _URL_RE.sub(lambda inner: _mask_userinfo(inner, replacement), rest)
    if replacement is None:
        return f"{scheme}{host}"
    user, sep, _ = userinfo.partition(":")
    return f"{scheme}{user}:{replacement}@{host}" if sep else f"{scheme}{replacement}@{host}"


#: an API token of ``edgelabel token add`` (``elt_`` + 43 URL-safe characters): masked wherever it appears,
#: with its prefix kept so a reader sees what kind of secret was there
_API_TOKEN_RE = re.compile(r"\belt_[A-Za-z0-9_-]{20,}")


def _redact_plain(text: str, replacement: str | None) -> str:
    text = _API_TOKEN_RE.sub("elt_" + MASK, text)
    text = _URL_RE.sub(lambda m: _mask_userinfo(m, replacement), text)
    text = _PARAM_RE.sub(_mask_param, text)
    return _COLON_RE.sub(_mask_param, text)


def redact(text: str, replacement: str | None = MASK) -> str:
    """``text`` with every credential it carries masked (see the module docstring for the forms).

    ``replacement=None`` drops URL user info entirely (for keys that must not change when a password does);
    parameter values are always replaced by ``***``.
    """
    if not text:
        return text
    out = _redact_plain(text, replacement)
    if "%" not in out:
        return out
    # percent-encoded credentials: decode each blank-separated token (up to three levels of nesting) and,
    # where the decoded form carries a credential, show that form masked
    parts = re.split(r"(\s+)", out)
    for i, token in enumerate(parts):
        if "%" not in token:
            continue
        decoded = token
        for _ in range(3):
            step = unquote(decoded)
            if step == decoded:
                break
            decoded = step
            masked = _redact_plain(decoded, replacement)
            if masked != decoded:
                parts[i] = masked
                break
    return "".join(parts)

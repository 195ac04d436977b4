"""Keep secrets out of everything the web page shows: pages, API answers and the log panel.

Why in one place: status snapshots come from sinks that other modules own and
grow over time (an outbox, TLS settings...), so rather than trusting each of
them, everything on its way out passes through ``Redactor.data``: values under
keys that name a secret are replaced, every string has its credentials
masked (``edge.redact``), and the known secrets (the operator token, the MQTT password) are
replaced wherever they appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from edgelabel.edge.redact import redact

MASK = "***"
_SECRET_KEY_RE = re.compile(r"(?i)(pass(word|wd)?|secret|token|credential|private_key|api_key)")


class Redactor:
    """Masks URL credentials, secret-named fields and the literal values of known secrets."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # short strings would mask innocent text; longest first so a secret's prefix does not win
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add(self, secret: str | None) -> None:
        """Also mask this value from now on."""
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def text(self, value: str) -> str:
        """The string with credentials and known secrets masked."""
        out = redact(value)
        for secret in self._secrets:
            if secret in out:
                out = out.replace(secret, MASK)
        return out

    def data(self, value: Any) -> Any:
        """A JSON-able copy of ``value`` with every secret masked."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                key = str(k)
                if _SECRET_KEY_RE.search(key) and v not in (None, "", False) and not isinstance(v, (bool, int, float)):
                    out[key] = MASK
                else:
                    out[key] = self.data(v)
            return out
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value

"""A logging handler that keeps the latest warnings and errors for the web page's log panel.

Why a handler and not the journal: the operator at the line has a browser, not
a shell.  The buffer is bounded (old entries fall off), records are redacted
before they are stored (an RTSP password in an OpenCV error must not reach a
page), and a traceback is reduced to its last line: the full one stays in the
daemon's own log.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from edgelabel.edge.redact import redact as redact_credentials


class RingLogHandler(logging.Handler):
    """Keeps the last ``capacity`` records at ``level`` or above, each with a sequence number."""

    def __init__(self, capacity: int = 200, level: int = logging.WARNING,
                 redact: Callable[[str], str] = redact_credentials) -> None:
        super().__init__(level)
        self.redact = redact
        self._entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = 0
        self._counts = {"warning": 0, "error": 0}
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Store one redacted entry; never raises into the code that logged."""
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                message += f" ({type(exc).__name__}: {exc})"
            entry = {
                "time": record.created,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": self.redact(message)[:2000],
            }
        except Exception:
            self.handleError(record)
            return
        with self._ring_lock:
            self._seq += 1
            entry["seq"] = self._seq
            self._entries.append(entry)
            self._counts["error" if record.levelno >= logging.ERROR else "warning"] += 1

    def set_redact(self, redact: Callable[[str], str]) -> None:
        """Use ``redact`` from now on, and apply it to what is already stored.

        The handler is installed before the pipeline starts, so that start-up errors reach the page; the
        app's redactor, which also knows the token and the MQTT password, exists only later.
        """
        with self._ring_lock:
            self.redact = redact
            for entry in self._entries:
                entry["message"] = redact(entry["message"])

    def entries(self, since: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """Entries with a sequence number above ``since``, oldest first, at most the newest ``limit``."""
        with self._ring_lock:
            items = [e for e in self._entries if e["seq"] > since]
        return [dict(e) for e in items[-limit:]] if limit > 0 else []

    def summary(self) -> dict[str, int]:
        """The newest sequence number and how many warnings/errors were seen in all."""
        with self._ring_lock:
            return {"last_seq": self._seq, **self._counts}

    def install(self, logger: logging.Logger | None = None) -> None:
        """Attach to ``logger`` (the root logger by default)."""
        (logger or logging.getLogger()).addHandler(self)

    def uninstall(self, logger: logging.Logger | None = None) -> None:
        """Detach from ``logger`` (the root logger by default)."""
        (logger or logging.getLogger()).removeHandler(self)

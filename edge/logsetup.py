"""Logging set-up: journald-friendly under systemd, human-friendly in a terminal.

Why two formats: journald already stamps every line with the time, unit and
PID, so timestamps from Python only double the width of ``journalctl``
output.  What journald cannot know is the priority of a line written to
stderr; it reads it from a syslog-style ``<N>`` prefix (sd-daemon(3),
``SyslogLevelPrefix=`` is on by default), which lets ``journalctl -p warning``
and the coloured output work.  A terminal (or a file) gets timestamps and
level names instead.

Under systemd is detected the documented way: ``$JOURNAL_STREAM`` holds the
``device:inode`` of the stream journald connected to stderr, and matches only
while stderr really goes to the journal (not after a shell redirect).
``$INVOCATION_ID`` (set by systemd for every service start) is the fallback
for units whose stderr is a pipe or socket systemd set up some other way;
an interactive terminal always gets the human format.

Every line passes ``RedactingFilter`` on its way out: a camera password inside an OpenCV error, a URI or
a pipeline string never reaches the journal or the log file, whoever logged it.

``$EDGELABEL_LOG_DIR`` (optional) adds a size-rotated ``edgelabel.log`` there,
for devices whose journal is volatile; the unit's ``LogsDirectory=`` provides
``/var/log/edgelabel`` for it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from edgelabel.edge.redact import redact

log = logging.getLogger(__name__)

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

#: Python level -> syslog priority (sd-daemon(3): SD_ERR=3, SD_WARNING=4, SD_INFO=6, SD_DEBUG=7)
_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

HUMAN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"
LOG_FILE_NAME = "edgelabel.log"
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5

#: marks the handlers this module installed, so a second call (a config reload) replaces them
_OURS = "_edgelabel_handler"


class RedactingFilter(logging.Filter):
    """Masks credentials (``edge.redact``) in the message and the traceback of every record it passes."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as logging does
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald should record for a Python log level."""
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a multi-line record (a traceback) gets the prefix.

    journald splits stream input into one entry per line, so without the
    prefix on each line the traceback lines would be stored at the default
    priority and vanish from ``journalctl -p err``.
    """

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def _stream_identity(stream: TextIO) -> str | None:
    """``device:inode`` of the file behind ``stream`` (the form of ``$JOURNAL_STREAM``), or None."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def journal_mode(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is read by journald, so the journal format applies."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if env is None else env
    journal_stream = environ.get("JOURNAL_STREAM", "")
    if journal_stream:
        return _stream_identity(stream) == journal_stream
    return bool(environ.get("INVOCATION_ID")) and not _is_tty(stream)


def parse_level(level: str) -> int:
    """``info`` -> logging.INFO; an unknown name is INFO (the config schema already refuses those)."""
    return LEVELS.get(str(level).strip().lower(), logging.INFO)


def setup_logging(level: str, *, stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> None:
    """Configure the root logger for the daemon and the CLI.

    Safe to call again (a config reload changes the level): the handlers
    installed by an earlier call are replaced, handlers added by others
    (pytest's capture, for instance) are left alone.  ``stream`` and ``env``
    default to stderr and the process environment; tests pass their own.
    """
    stream = sys.stderr if stream is None else stream
    environ = os.environ if env is None else env
    levelno = parse_level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()  # a StreamHandler leaves its stream open; a file handler closes its file

    console = logging.StreamHandler(stream)
    journald = journal_mode(stream, environ)
    console.setFormatter(JournalFormatter() if journald else logging.Formatter(HUMAN_FORMAT))
    console.addFilter(RedactingFilter())
    setattr(console, _OURS, True)
    root.addHandler(console)

    log_dir = environ.get("EDGELABEL_LOG_DIR", "").strip()
    file_error: OSError | None = None
    if log_dir:
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                Path(log_dir) / LOG_FILE_NAME, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
            )
        except OSError as exc:
            file_error = exc
        else:
            file_handler.setFormatter(logging.Formatter(HUMAN_FORMAT))
            file_handler.addFilter(RedactingFilter())
            setattr(file_handler, _OURS, True)
            root.addHandler(file_handler)
    root.setLevel(levelno)
    if str(level).strip().lower() not in LEVELS:
        log.warning("unknown log level %r; using info", level)
    if file_error is not None:
        log.warning("EDGELABEL_LOG_DIR=%s: cannot write a log file there (%s); logging to stderr only", log_dir, file_error)
    log.debug("logging: level %s, %s format", logging.getLevelName(levelno), "journal" if journald else "terminal")

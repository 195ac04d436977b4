"""The ingest service's one validated config: a small schema of its own, in the daemon's style.

``ingest.yaml`` has three sections (``mqtt``, ``database``, ``batch``) and ``http``; ``${VAR}`` and
``${VAR:-default}`` in any string come from the environment, so passwords stay out of the file.  Errors
name the dotted field, the bad value and what is allowed, e.g. ``batch.max_rows: 0 is below the minimum 1``.
Quick flags (``--mqtt``, ``--db``, ``--group``) override the file, so a first try needs no file at all.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgelabel.edge.config import ConfigError, expand_env, read_config_file
from edgelabel.ingest.frames_config import FramesSection, frames_section

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOPIC_RE = re.compile(r"^[^#+\s$]+$")

__all__ = ["ConfigError", "IngestConfig", "MqttSection", "DatabaseSection", "BatchSection", "HttpSection", "RetentionSection",
           "load_ingest_config", "ingest_config_from_dict", "parse_mqtt_url"]


@dataclass
class MqttSection:
    """The plant broker and the share group this worker joins."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None  # from ${...} or EDGELABEL_MQTT_PASSWORD; never logged
    prefix: str = "edgelabel"
    group: str = "edgelabel-ingest"
    #: fixed per worker: the broker keeps this session's unacknowledged messages for it across a crash
    client_id: str | None = None
    keepalive: int = 30
    session_expiry: int = 86400  # seconds the broker keeps the session (and its queue) while the worker is away
    receive_maximum: int = 1000  # unacknowledged messages the broker may have in flight to this worker


@dataclass
class DatabaseSection:
    """PostgreSQL: a libpq URL; the password from ``PGPASSWORD`` or ``database.password`` (``${VAR}``)."""

    dsn: str = "postgresql://postgres@127.0.0.1:5432/edgelabel"
    password: str | None = None


@dataclass
class BatchSection:
    """How long a message may wait for its transaction: ``max_rows`` messages or ``max_wait`` seconds."""

    max_rows: int = 500
    max_wait: float = 0.2


@dataclass
class RetentionSection:
    """How many whole months of records and detections to keep before the current one (0 = keep all)."""

    months: int = 0
    check_interval: float = 3600.0  # seconds between retention checks


@dataclass
class HttpSection:
    """``/healthz`` and ``/metrics``; ``listen: null`` turns them off."""

    listen: str | None = "127.0.0.1:9184"


@dataclass
class IngestConfig:
    mqtt: MqttSection = field(default_factory=MqttSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    batch: BatchSection = field(default_factory=BatchSection)
    http: HttpSection = field(default_factory=HttpSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    frames: FramesSection = field(default_factory=FramesSection)  # frames_config.py
    log_level: str = "info"
    progress_interval: float = 10.0  # seconds between progress lines in the log

    def client_id(self) -> str:
        """The configured client id, else one fixed per group and host (restarts resume the same session)."""
        return self.mqtt.client_id or f"{self.mqtt.group}-{socket.gethostname()}"[:64]


_SECTIONS = {"mqtt": MqttSection, "database": DatabaseSection, "batch": BatchSection, "http": HttpSection,
             "retention": RetentionSection}
_LIMITS: dict[str, tuple[float, float]] = {
    "mqtt.port": (1, 65535), "mqtt.keepalive": (5, 3600), "mqtt.session_expiry": (0, 2**32 - 1),
    "mqtt.receive_maximum": (1, 65535), "batch.max_rows": (1, 100000), "batch.max_wait": (0.001, 60),
    "progress_interval": (0.1, 86400), "retention.months": (0, 1200), "retention.check_interval": (1, 86400 * 7),
}


def _value(path: str, value: Any, default: Any, problems: list[str]) -> Any:
    if isinstance(value, str):
        value = expand_env(value, path, problems)
    if value is None:
        return None
    want = type(default) if default is not None else str
    if want is bool or isinstance(value, bool):
        problems.append(f"{path}: expected {want.__name__}, got {value!r}")
        return default
    if want is float and isinstance(value, (int, float)):
        value = float(value)
    elif want is int and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    elif want is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, want):
        problems.append(f"{path}: expected {want.__name__}, got {value!r}")
        return default
    if path in _LIMITS:
        lo, hi = _LIMITS[path]
        if value < lo:
            problems.append(f"{path}: {value!r} is below the minimum {lo:g}")
        elif value > hi:
            problems.append(f"{path}: {value!r} is above the maximum {hi:g}")
    return value


def _section(name: str, cls: type, data: Any, problems: list[str]) -> Any:
    obj = cls()
    if data is None:
        return obj
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a mapping, got {type(data).__name__}")
        return obj
    known = {f.name for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            problems.append(f"{name}.{key}: unknown setting (allowed: {', '.join(sorted(known))})")
            continue
        setattr(obj, key, _value(f"{name}.{key}", value, getattr(cls(), key), problems))
    return obj


def ingest_config_from_dict(data: Any) -> IngestConfig:
    """Validate a mapping; raises ``ConfigError`` listing every problem with its field path."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping of settings at the top level, got {type(data).__name__}"])
    cfg = IngestConfig()
    for key, value in data.items():
        if key in _SECTIONS:
            setattr(cfg, key, _section(key, _SECTIONS[key], value, problems))
        elif key == "frames":
            cfg.frames = frames_section(value, problems)
        elif key in ("log_level", "progress_interval"):
            setattr(cfg, key, _value(key, value, getattr(cfg, key), problems))
        else:
            problems.append(f"{key}: unknown section (allowed: "
                            f"{', '.join([*_SECTIONS, 'frames', 'log_level', 'progress_interval'])})")
    _check(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _check(cfg: IngestConfig, problems: list[str]) -> None:
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        problems.append(f"log_level: {cfg.log_level!r} is not one of debug, info, warning, error")
    if not _NAME_RE.match(cfg.mqtt.group or ""):
        problems.append(f"mqtt.group: {cfg.mqtt.group!r} must be 1-64 letters, digits, '_', '.' or '-' "
                        "(it becomes part of the shared subscription $share/<group>/...)")
    if not _TOPIC_RE.match(cfg.mqtt.prefix or ""):
        problems.append(f"mqtt.prefix: {cfg.mqtt.prefix!r} must be a topic level without '+', '#', '$' or blanks")
    if cfg.mqtt.client_id is not None and not 1 <= len(cfg.mqtt.client_id) <= 64:
        problems.append("mqtt.client_id: must be 1-64 characters (each worker of a group needs its own)")
    dsn = cfg.database.dsn or ""
    if not dsn.startswith(("postgresql://", "postgres://")):
        problems.append(f"database.dsn: expected postgresql://[user@]host[:port]/dbname, got {dsn[:40]!r}")
    elif urlsplit(dsn).password:
        problems.append("database.dsn: holds a password; put it in PGPASSWORD or database.password: ${VAR} instead")
    if cfg.http.listen is not None:
        host, _, port = cfg.http.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append(f"http.listen: expected HOST:PORT, got {cfg.http.listen!r}")


def parse_mqtt_url(url: str) -> dict[str, Any]:
    """``mqtt://[user@]host[:port]`` -> settings of the mqtt section; a password in the URL is refused."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ConfigError([f"--mqtt: expected mqtt://[user@]host[:port], got {url!r} (TLS: use -c ingest.yaml)"])
    if parts.password is not None:
        raise ConfigError(["--mqtt: the URL holds a password; set EDGELABEL_MQTT_PASSWORD instead"])
    try:
        port = parts.port or 1883
    except ValueError:
        raise ConfigError([f"--mqtt: bad port in {url!r}"]) from None
    out: dict[str, Any] = {"host": parts.hostname, "port": port}
    if parts.username:
        out["username"] = unquote(parts.username)
    return out


def load_ingest_config(path: str | Path | None = None, *, mqtt_url: str | None = None, db: str | None = None,
                       group: str | None = None, client_id: str | None = None, http: str | None = None,
                       log_level: str | None = None) -> IngestConfig:
    """The file (if any) with the quick flags on top; ``EDGELABEL_MQTT_PASSWORD`` fills a missing password."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    for name in _SECTIONS:
        if data.get(name) is None:
            data[name] = {}
        elif not isinstance(data[name], dict):
            raise ConfigError([f"{path}: {name}: expected a mapping, got {type(data[name]).__name__}"])
    if mqtt_url:
        data["mqtt"].update(parse_mqtt_url(mqtt_url))
    if db:
        data["database"]["dsn"] = db
    if group:
        data["mqtt"]["group"] = group
    if client_id:
        data["mqtt"]["client_id"] = client_id
    if http:
        data["http"]["listen"] = None if http == "off" else http
    if log_level:
        data["log_level"] = log_level
    try:
        cfg = ingest_config_from_dict(data)
    except ConfigError as exc:
        if path:
            raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
        raise
    if not cfg.mqtt.password and os.environ.get("EDGELABEL_MQTT_PASSWORD"):
        cfg.mqtt.password = os.environ["EDGELABEL_MQTT_PASSWORD"]
    return cfg

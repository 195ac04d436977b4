"""The ``frames:`` section of ingest.yaml: where captured frames are fetched from and where they are kept.

Apart from ``config.py`` because it nests (``s3:``, ``appliances: {<device>: {...}}``) and takes booleans, which
the flat sections there do not.  Off by default: a plant without a frame store gets boxes without pixels, as
before.  Errors name the dotted field, the value and what is allowed, like the rest of the config.

    frames:
      enabled: true
      store: folder                      # or s3
      folder: /mnt/nas/edgelabel         # the central dataset folder (a NAS mount)
      url: https://{device}.plant:8080   # an appliance's web address; {device} is its device id
      token: ${EDGELABEL_FRAMES_TOKEN}   # a viewer token accepted by every appliance (or one per appliance)
      appliances:
        line3-cam: {url: https://10.0.3.17:8080, token: ${LINE3_VIEWER_TOKEN}}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from edgelabel.edge.config import expand_env
from edgelabel.edge.redact import redact

_DEVICE_RE = re.compile(r"^[^/#+\s]{1,128}$")


@dataclass
class S3Settings:
    """An S3-compatible bucket (MinIO, Ceph, AWS); keys from ``${VAR}``, never written in the file."""

    endpoint: str = ""  # host[:port], no scheme (the minio client's form)
    bucket: str = ""
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = True  # https
    region: str | None = None
    prefix: str = ""  # key prefix inside the bucket


@dataclass
class ApplianceSettings:
    """Where one appliance's web API is and the viewer token it accepts."""

    url: str | None = None
    token: str | None = None


@dataclass
class FramesSection:
    """Fetching the frames the label records name, into the plant's frame store (docs/ingest.md "Frames")."""

    enabled: bool = False
    store: str = "folder"  # folder | s3
    folder: str | None = None
    s3: S3Settings = field(default_factory=S3Settings)
    #: an appliance's base URL when ``appliances`` does not name it; ``{device}`` is replaced by its device id
    url: str | None = None
    token: str | None = None  # the default viewer token (never logged)
    appliances: dict[str, ApplianceSettings] = field(default_factory=dict)
    rate: float = 5.0  # requests per second per appliance (per ingest worker)
    max_attempts: int = 8  # answered tries before a frame is failed
    backoff_min: float = 2.0  # seconds before the first retry; doubles per try ...
    backoff_max: float = 600.0  # ... up to this
    timeout: float = 30.0  # seconds per request
    verify_tls: bool = True
    ca_file: str | None = None  # a plant CA for the appliances' certificates
    max_bytes: int = 64 * 1024 * 1024  # a bigger answer is refused
    workers: int = 2  # fetch threads in this ingest process
    batch: int = 16  # frames claimed at a time by one thread
    lease: float = 300.0  # seconds a claimed frame is reserved for the thread that claimed it

    def appliance(self, device: str) -> tuple[str | None, str | None]:
        """(base URL, token) of a device: its own entry first, then the defaults."""
        own = self.appliances.get(device) or ApplianceSettings()
        url = own.url or (self.url.replace("{device}", device) if self.url else None)
        return (url.rstrip("/") if url else None), (own.token or self.token)


_LIMITS: dict[str, tuple[float, float]] = {
    "rate": (0.01, 10000), "max_attempts": (1, 1000), "backoff_min": (0.01, 86400), "backoff_max": (0.01, 7 * 86400),
    "timeout": (0.1, 3600), "max_bytes": (1, 2**40), "workers": (1, 64), "batch": (1, 1000), "lease": (1, 86400),
}


def _scalar(path: str, value: Any, default: Any, want: type, problems: list[str]) -> Any:
    if isinstance(value, str):
        value = expand_env(value, path, problems)
    if value is None:
        return None if default is None else default
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{path}: expected true or false, got {value!r}")
        return default
    if isinstance(value, bool):
        problems.append(f"{path}: expected {want.__name__}, got {value!r}")
        return default
    if want in (int, float) and isinstance(value, str):
        try:
            value = want(value)
        except ValueError:
            pass
    if want is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, want):
        problems.append(f"{path}: expected {'a number' if want is float else want.__name__}, got {value!r}")
        return default
    key = path.rsplit(".", 1)[-1]
    if path.count(".") == 1 and key in _LIMITS:
        lo, hi = _LIMITS[key]
        if value < lo:
            problems.append(f"{path}: {value!r} is below the minimum {lo:g}")
        elif value > hi:
            problems.append(f"{path}: {value!r} is above the maximum {hi:g}")
    return value


_TYPES = {"enabled": bool, "store": str, "folder": str, "url": str, "token": str, "rate": float, "max_attempts": int,
          "backoff_min": float, "backoff_max": float, "timeout": float, "verify_tls": bool, "ca_file": str,
          "max_bytes": int, "workers": int, "batch": int, "lease": float}
_S3_TYPES = {"endpoint": str, "bucket": str, "access_key": str, "secret_key": str, "secure": bool, "region": str,
             "prefix": str}


def _mapping(path: str, data: Any, known: dict[str, type], obj: Any, problems: list[str]) -> None:
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping, got {type(data).__name__}")
        return
    for key, value in data.items():
        if key not in known:
            problems.append(f"{path}.{key}: unknown setting (allowed: {', '.join(sorted(known))})")
            continue
        setattr(obj, key, _scalar(f"{path}.{key}", value, getattr(obj, key), known[key], problems))


def frames_section(data: Any, problems: list[str]) -> FramesSection:
    """Validate ``frames:``; every problem is appended to ``problems`` with its dotted field."""
    cfg = FramesSection()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        problems.append(f"frames: expected a mapping, got {type(data).__name__}")
        return cfg
    allowed = {f.name for f in fields(FramesSection)}
    flat = {k: v for k, v in data.items() if k not in ("s3", "appliances")}
    for key in flat:
        if key not in allowed:
            problems.append(f"frames.{key}: unknown setting (allowed: {', '.join(sorted(allowed))})")
    _mapping("frames", {k: v for k, v in flat.items() if k in allowed}, _TYPES, cfg, problems)
    if data.get("s3") is not None:
        _mapping("frames.s3", data["s3"], _S3_TYPES, cfg.s3, problems)
    apps = data.get("appliances")
    if apps is not None:
        if not isinstance(apps, dict):
            problems.append(f"frames.appliances: expected a mapping of device id -> {{url, token}}, got "
                            f"{type(apps).__name__}")
        else:
            for device, entry in apps.items():
                where = f"frames.appliances.{device}"
                if not isinstance(device, str) or not _DEVICE_RE.match(device):
                    problems.append(f"{where}: not a device id (the appliance's device_id, as in its MQTT topics)")
                    continue
                one = ApplianceSettings()
                _mapping(where, entry, {"url": str, "token": str}, one, problems)
                cfg.appliances[device] = one
    _check(cfg, problems)
    return cfg


def _check_url(where: str, url: str | None, problems: list[str]) -> None:
    if url is None:
        return
    parts = urlsplit(url.replace("{device}", "device"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: expected http(s)://host[:port] (the appliance's web address), got {redact(url)!r}")
    elif parts.password is not None or parts.username is not None:
        problems.append(f"{where}: holds user info; give the viewer token in 'token: ${{VAR}}' instead")


def _check(cfg: FramesSection, problems: list[str]) -> None:
    if cfg.store not in ("folder", "s3"):
        problems.append(f"frames.store: {cfg.store!r} is not one of folder, s3")
    if cfg.backoff_max < cfg.backoff_min:
        problems.append(f"frames.backoff_max: {cfg.backoff_max:g} is below frames.backoff_min ({cfg.backoff_min:g})")
    _check_url("frames.url", cfg.url, problems)
    for device, one in cfg.appliances.items():
        _check_url(f"frames.appliances.{device}.url", one.url, problems)
    if not cfg.enabled:
        return
    if cfg.store == "folder" and not cfg.folder:
        problems.append("frames.folder: missing; give the central dataset folder (e.g. /mnt/nas/edgelabel), "
                        "or store: s3")
    if cfg.store == "s3":
        for key in ("endpoint", "bucket", "access_key", "secret_key"):
            if not getattr(cfg.s3, key):
                problems.append(f"frames.s3.{key}: missing (store: s3 needs endpoint, bucket, access_key and "
                                "secret_key; keys as ${VAR})")
        if cfg.s3.endpoint and "://" in cfg.s3.endpoint:
            problems.append(f"frames.s3.endpoint: give host[:port] without a scheme (secure: true|false says "
                            f"https or http), got {cfg.s3.endpoint!r}")
    if not cfg.url and not cfg.appliances:
        problems.append("frames.url: missing; give the appliances' web address (e.g. https://{device}.plant:8080) "
                        "or list them under frames.appliances")

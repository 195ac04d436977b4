"""One configuration schema, loaded from YAML and validated at start-up.

Every section is a dataclass; ``load_config`` turns a mapping into them and
reports the first problems with the dotted field path, the bad value and what
is allowed, e.g. ``sources.cam1.uri: unsupported scheme 'rtps' (use file,
v4l2, rtsp, csi, gst)``.  ``${VAR}`` and ``${VAR:-default}`` in any string
value are replaced from the environment, so secrets stay out of the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SOURCE_SCHEMES = ("file", "v4l2", "rtsp", "csi", "gst")
ENGINE_TYPES = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
FAMILIES = ("auto", "yolov8", "yolov5", "yolox", "end2end", "efficientnms")
PROVIDERS = ("tensorrt", "cuda", "cpu")
DATASET_FORMATS = ("yolo", "coco")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOPIC_RE = re.compile(r"^[^#+\s]+$")


#: values quoted in error messages: bounded, so a huge or alias-bombed YAML value cannot blow up a message
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    """``repr(value)``, shortened with ``...`` past ~80 characters."""
    return _REPR.repr(value)


# fullmatch: "$" alone also matches before a final newline, and a key "0\n" went out unquoted
_PLAIN_KEY = re.compile(r"(?=.*[A-Za-z0-9])[A-Za-z0-9_.-]{1,64}")


def _key(key: Any) -> str:
    """A mapping key as it appears in a field path: as written, or quoted when empty, odd or long."""
    return key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else _show(key)


#: for other modules' messages about a named entry (``sources.<name>``), quoted as the validator quotes it
field_key = _key


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists one line per field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


@dataclass
class ModelConfig:
    """The detector: an ONNX file, the back end that runs it and how to decode it."""

    path: str = ""  # ONNX (any engine) or a serialized TensorRT engine (.engine/.plan)
    # auto: native TensorRT when it imports and a GPU is present, else ONNX Runtime (providers below)
    engine: str = field(default="auto", metadata=_choice(*ENGINE_TYPES))
    family: str = field(default="auto", metadata=_choice(*FAMILIES))
    labels: str | None = None  # a text file, one class name per line
    conf: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    iou: float = field(default=0.45, metadata={"min": 0.0, "max": 1.0})
    providers: list[str] = field(default_factory=lambda: list(PROVIDERS))
    # ONNX Runtime on the CPU: intra-op threads per inference call and inference workers calling the
    # one session at once; 0/0 picks 1 thread x one worker per core (measured fastest for small detectors)
    threads: int = field(default=0, metadata={"min": 0, "max": 256})
    workers: int = field(default=0, metadata={"min": 0, "max": 16})
    # native TensorRT: precision (fp16 falls back to fp32 where the GPU lacks fast fp16), builder workspace
    precision: str = field(default="fp16", metadata=_choice(*PRECISIONS))
    workspace_mb: int = field(default=1024, metadata={"min": 16, "max": 65536})
    # INT8: calibration images (a folder; default: the frames this appliance captured) and the accuracy
    # gate: the INT8 engine is refused when its mAP50 against FP16 drops more than this many points
    calibration: str | None = None
    calibration_images: int = field(default=500, metadata={"min": 8, "max": 100000})
    int8_max_drop: float = field(default=2.0, metadata={"min": 0.0, "max": 100.0})


@dataclass
class ReconnectConfig:
    """Exponential backoff between attempts to reopen a live source."""

    initial: float = field(default=1.0, metadata={"min": 0.01})
    max: float = field(default=60.0, metadata={"min": 0.01})


@dataclass
class ZoneConfig:
    """A polygon on a source's frames: zone_enter / zone_exit events with dwell time (docs/tracking.md)."""

    points: list[list[float]] = field(default_factory=list)  # [[x, y], ...], at least 3
    units: str = field(default="normalized", metadata=_choice("normalized", "pixels"))
    classes: list[str] = field(default_factory=list)  # labels that count; empty: all
    anchor: str = field(default="bottom", metadata=_choice("bottom", "center"))  # the box's point that counts
    hysteresis: float = field(default=0.01, metadata={"min": 0.0, "max": 0.5})  # share of the frame diagonal
    ignore: bool = False  # detections (of `classes`) with their point inside are dropped; no events

    def problems(self, where: str) -> list[str]:
        """Geometry errors, as ``<where>.<field>`` messages."""
        return _point_problems(where, self.points, self.units, 3, None)


@dataclass
class LineConfig:
    """A directed line (first point to second): line_cross events with the side crossed to."""

    points: list[list[float]] = field(default_factory=list)  # [[x1, y1], [x2, y2]]
    units: str = field(default="normalized", metadata=_choice("normalized", "pixels"))
    classes: list[str] = field(default_factory=list)
    anchor: str = field(default="bottom", metadata=_choice("bottom", "center"))
    hysteresis: float = field(default=0.01, metadata={"min": 0.0, "max": 0.5})

    def problems(self, where: str) -> list[str]:
        out = _point_problems(where, self.points, self.units, 2, 2)
        if not out and self.points[0] == self.points[1]:
            out.append(f"{where}.points: the two points are the same; a line needs two different points")
        return out


def _point_problems(where: str, points: list[list[float]], units: str, least: int, most: int | None) -> list[str]:
    count = f"exactly {least}" if most == least else f"at least {least}"
    if len(points) < least or (most is not None and len(points) > most):
        return [f"{where}.points: {count} [x, y] points needed, got {len(points)}"]
    out = []
    for i, p in enumerate(points):
        if len(p) != 2:
            out.append(f"{where}.points[{i}]: expected [x, y], got {_show(p)}")
        elif units == "normalized" and not all(0.0 <= v <= 1.0 for v in p):
            out.append(f"{where}.points[{i}]: {_show(p)} is outside 0..1 (normalized units; "
                       "set units: pixels for pixel coordinates)")
        elif units == "pixels" and not all(v >= 0 for v in p):
            out.append(f"{where}.points[{i}]: {_show(p)} has a negative pixel coordinate")
    return out


@dataclass
class SourceConfig:
    """One input: a folder, image, video file, camera or stream, chosen by URI."""

    uri: str = ""
    enabled: bool = True
    fps: float = field(default=0.0, metadata={"min": 0.0})  # cap; 0: no cap
    loop: bool = False  # video files: start again at the end
    watch: bool = False  # folders: keep running and label new files
    watch_interval: float = field(default=2.0, metadata={"min": 0.05})
    # folders: read a symlink that leads out of the folder (never one into state_dir/dataset: edge/sources/pathguard.py)
    follow_symlinks: bool = False
    read_timeout: float = field(default=10.0, metadata={"min": 0.1})  # live sources
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    width: int = field(default=0, metadata={"min": 0})  # cameras: requested size, 0 = default
    height: int = field(default=0, metadata={"min": 0})
    zones: dict[str, ZoneConfig] = field(default_factory=dict)  # polygons: enter / exit events
    lines: dict[str, LineConfig] = field(default_factory=dict)  # directed lines: crossing events
    tracking: TrackingConfig | None = None  # replaces the top-level tracking section for this source
    name: str = ""  # filled from the mapping key


@dataclass
class TlsConfig:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False


@dataclass
class OutboxConfig:
    """The durable on-disk queue between the pipeline and the broker."""

    enabled: bool = True
    path: str = "outbox.sqlite"  # relative paths are inside state_dir
    max_messages: int = field(default=1_000_000, metadata={"min": 1})
    max_age: float = field(default=7 * 24 * 3600.0, metadata={"min": 0.0})  # seconds; 0 = no limit
    policy: str = field(default="drop_oldest", metadata=_choice("drop_oldest", "stop_capture"))
    # seconds a live frame's messages may wait in memory to be committed in one batch; 0 = commit each one
    # (storage frames are always committed before the job ledger marks them done)
    commit_interval: float = field(default=0.05, metadata={"min": 0.0, "max": 5.0})


@dataclass
class SnapshotConfig:
    """Optional JPEG of the latest annotated frame on ``<prefix>/<device>/<source>/snapshot``."""

    enabled: bool = False
    interval: float = field(default=10.0, metadata={"min": 0.5})
    quality: int = field(default=80, metadata={"min": 1, "max": 100})  # JPEG quality
    max_width: int = field(default=640, metadata={"min": 0})  # downscale wider frames; 0 = full size


@dataclass
class MqttConfig:
    """Broker connection and topic layout: ``<prefix>/<device>/<source>/labels``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata={"min": 1, "max": 65535})
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    prefix: str = "edgelabel"
    qos: int = field(default=1, metadata={"min": 0, "max": 2})
    keepalive: int = field(default=30, metadata={"min": 5, "max": 65535})
    max_queued: int = field(default=10000, metadata={"min": 0})  # cap on the MQTT client's RAM queue; 0 = none
    max_inflight: int = field(default=100, metadata={"min": 1, "max": 65535})  # unacknowledged messages on the wire
    reconnect: ReconnectConfig = field(default_factory=lambda: ReconnectConfig(initial=1.0, max=30.0))
    tls: TlsConfig | None = None
    protocol: str = field(default="3.1.1", metadata=_choice("3.1.1", "5"))
    password_file: str | None = None  # read the password from this file instead
    stats_interval: float = field(default=10.0, metadata={"min": 0.5})  # seconds between stats messages
    # once every source is done: seconds to keep delivering what is left in the outbox; 0 = do not wait
    drain_timeout: float = field(default=300.0, metadata={"min": 0.0})
    # a label record over this many bytes keeps only its highest-scoring detections that fit (docs/mqtt.md)
    max_message_bytes: int = field(default=262144, metadata={"min": 4096})
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


@dataclass
class BandConfig:
    """A score band ``low <= score < high``: detections in it are uncertain (see edge/capture.py)."""

    low: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    high: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})


@dataclass
class RateConfig:
    """The most frames one source may add to the dataset per sliding minute/hour/day; 0 = no limit."""

    per_minute: int = field(default=0, metadata={"min": 0})
    per_hour: int = field(default=0, metadata={"min": 0})
    per_day: int = field(default=0, metadata={"min": 0})


@dataclass
class CaptureConfig:
    """Which frames of a source enter the dataset, and which of those need a person's review.

    Filters (classes, min/max_detections) must pass; then any trigger (every_n, random,
    near_threshold, new_tracks) selects the frame -- no trigger set selects every frame --
    and the rate limits have the last word.  docs/review.md has the rules.
    """

    enabled: bool = True
    every_n: int = field(default=0, metadata={"min": 0})  # every N-th filtered frame; 0 = off
    random: float = field(default=0.0, metadata={"min": 0.0, "max": 100.0})  # percent of filtered frames
    near_threshold: BandConfig | None = None  # a detection scored in the band selects the frame for review
    new_tracks: bool = False  # a tracked object seen for the first time selects the frame
    classes: list[str] = field(default_factory=list)  # only these classes count; empty = all
    zones: list[str] = field(default_factory=list)  # per-source policies: only detections in these zones count
    min_detections: int = field(default=0, metadata={"min": 0})
    max_detections: int | None = field(default=None, metadata={"min": 0})
    rate: RateConfig = field(default_factory=RateConfig)
    review: str = field(default="uncertain", metadata=_choice("uncertain", "all", "none"))  # -> needs_review
    seed: int | None = None  # the random trigger's seed (reproducible sampling); null = a fresh one


def _live_capture_default() -> CaptureConfig:
    """Cameras never stop: keep the frames worth a look, not 30 a second (docs/review.md, "Defaults")."""
    return CaptureConfig(every_n=300, near_threshold=BandConfig(), new_tracks=True,
                         rate=RateConfig(per_minute=12, per_hour=240, per_day=2000))


def _storage_capture_default() -> CaptureConfig:
    """Files, folders, videos: keep every frame; the ones with a near-threshold score go to a person first."""
    return CaptureConfig(every_n=1, near_threshold=BandConfig())


@dataclass
class CaptureSection:
    """Capture policies: one for file/folder/video sources, one for live sources, overrides by source name."""

    # every frame; needs_review when a detection scores in [0.25, 0.5), else auto_accepted (edgelabel label too)
    storage: CaptureConfig = field(default_factory=_storage_capture_default)
    live: CaptureConfig = field(default_factory=_live_capture_default)
    sources: dict[str, CaptureConfig] = field(default_factory=dict)  # replaces storage/live for that source


@dataclass
class DatasetConfig:
    """The labeled dataset on disk (YOLO txt + COCO JSON)."""

    enabled: bool = True
    path: str = "dataset"
    formats: list[str] = field(default_factory=lambda: list(DATASET_FORMATS))
    save_images: str = field(default="auto", metadata=_choice("auto", "always", "never"))
    image_format: str = field(default="jpg", metadata=_choice("jpg", "png"))
    jpeg_quality: int = field(default=95, metadata={"min": 1, "max": 100})
    coco_interval: float = field(default=10.0, metadata={"min": 0.0})  # seconds between rewrites
    capture: CaptureSection = field(default_factory=CaptureSection)
    # quota, oldest first (rejected, then auto_accepted, then needs_review, then reviewed); 0 = no limit
    max_bytes: int = field(default=0, metadata={"min": 0})
    max_images: int = field(default=0, metadata={"min": 0})
    min_free_bytes: int = field(default=1_000_000_000, metadata={"min": 0})  # free space kept on the disk


@dataclass
class TrackingConfig:
    """Multi-object tracking per source: track ids in records and track events."""

    enabled: bool = True
    iou: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})  # similarity to match a strong detection
    fuse_score: bool = True  # strong detections: similarity = IoU x score (else IoU)
    low_iou: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # IoU to match a weak detection
    high_score: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})  # weaker detections only extend tracks
    low_score: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})  # below: ignored by the tracker
    new_track_score: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})  # to start a track
    max_age: float = field(default=3.0, metadata={"min": 0.0})  # seconds unseen before a track ends (track buffer)
    min_hits: int = field(default=2, metadata={"min": 1})  # detections before a track is announced
    update_interval: float = field(default=5.0, metadata={"min": 0.0})  # seconds between update events
    # image folders and single images: their pictures are usually unrelated stills, so nothing is tracked
    # across them unless this is true (videos and live sources are always tracked when enabled)
    folders: bool = False

    def problems(self) -> list[str]:
        """Settings that are each valid but contradict each other, as ``tracking.<field>`` messages."""
        out = []
        if self.low_score > self.high_score:
            out.append(f"tracking.low_score: {self.low_score} is above tracking.high_score {self.high_score} "
                       "(lower it, or raise high_score)")
        if self.new_track_score < self.high_score:
            out.append(f"tracking.new_track_score: {self.new_track_score} is below tracking.high_score "
                       f"{self.high_score} (weak detections never start tracks; raise it to at least high_score)")
        return out


#: the roles of named web operators, least to most (web/auth.py says what each may do)
WEB_ROLES = ("viewer", "reviewer", "admin")
#: the shortest web token accepted; shorter ones are refused with how to generate one
WEB_TOKEN_MIN_LENGTH = 16
WEB_TOKEN_HOWTO = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(24))"'


def web_token_problem(token: str) -> str | None:
    """Why ``token`` is too weak to guard the web page, or None.

    At least WEB_TOKEN_MIN_LENGTH characters from at least two classes (lower case, upper case, digits,
    others): a short or one-class token falls to guessing even behind the throttle.
    """
    if len(token) < WEB_TOKEN_MIN_LENGTH:
        return f"is only {len(token)} characters long; at least {WEB_TOKEN_MIN_LENGTH} are required ({WEB_TOKEN_HOWTO})"
    classes = {"lower" if c.islower() else "upper" if c.isupper() else "digit" if c.isdigit() else "other"
               for c in token}
    if len(classes) < 2:
        return f"uses one class of characters only; mix letters, digits or symbols ({WEB_TOKEN_HOWTO})"
    return None


@dataclass
class WebOperatorConfig:
    """One named web operator: a role and a token (``${ENV}`` recommended) or the token's sha256."""

    role: str = field(default="viewer", metadata=_choice(*WEB_ROLES))
    token: str | None = None
    token_sha256: str | None = None  # hex sha256 of the token, so the config file need not hold the token


@dataclass
class WebConfig:
    """The operator's web page."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata={"min": 1, "max": 65535})
    token: str | None = None  # needed for every state-changing action; generated when unset
    token_file: str = "web-token"  # relative paths are inside state_dir
    public_read: bool = True  # read-only pages without the token
    threads: int = field(default=16, metadata={"min": 2, "max": 256})
    stream_fps: float = field(default=5.0, metadata={"min": 0.1, "max": 30.0})
    secret_key_file: str = "web-secret-key"  # signs session cookies; generated when absent; inside state_dir
    stream_width: int = field(default=960, metadata={"min": 160, "max": 3840})  # live views and kept frames
    recent_records: int = field(default=200, metadata={"min": 10, "max": 10000})  # records (and frames) kept
    # DNS names the page answers to besides IP addresses and this machine's names (web/hosts.py); "*": any
    allowed_hosts: list[str] = field(default_factory=list)
    # named operators (name -> role and token); web.token stays valid as the admin "operator"
    operators: dict[str, WebOperatorConfig] = field(default_factory=dict)
    # the one reverse proxy whose X-Forwarded-For / X-Forwarded-Proto is believed (waitress's trusted_proxy)
    trusted_proxy: str | None = None
    # HTTPS: {cert: file, key: file}, or "auto" ({auto: true}) for a self-signed certificate kept in state_dir;
    # null: plain HTTP.  A mapping may add hsts: <seconds> (Strict-Transport-Security over HTTPS; default false)
    tls: Any = None

    def problems(self) -> list[str]:
        """Token strength, operator entries and the TLS setting, as ``web.<field>`` messages."""
        out: list[str] = []
        if self.token is not None:
            why = web_token_problem(self.token)
            if why:
                out.append(f"web.token: the operator token {why}")
        for name, op in self.operators.items():
            where = f"web.operators.{_key(name)}"
            if not _NAME_RE.fullmatch(name) or name == "operator":
                out.append(f"{where}: operator names are 1-64 characters of letters, digits, '_', '-', '.' "
                           "('operator' is taken by web.token)")
            if (op.token is None) == (op.token_sha256 is None):
                out.append(f"{where}: set exactly one of token (e.g. token: ${{EDGELABEL_TOKEN_{name.upper()}}}) "
                           "or token_sha256")
            elif op.token is not None:
                why = web_token_problem(op.token)
                if why:
                    out.append(f"{where}.token: the token {why}")
            elif op.token_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", op.token_sha256):
                out.append(f"{where}.token_sha256: expected 64 hex digits (python -c \"import hashlib,getpass; "
                           "print(hashlib.sha256(getpass.getpass().encode()).hexdigest())\")")
        tls = self.tls
        if tls is not None and tls != "auto":
            auto = isinstance(tls, dict) and tls.get("auto") is True
            files = ("cert", "key")
            if not isinstance(tls, dict) or set(tls) - {"cert", "key", "hsts", "auto"} or (
                    set(tls) & set(files) if auto
                    else not all(isinstance(tls.get(k), str) and tls.get(k) for k in files) or "auto" in tls):
                out.append(f"web.tls: expected \"auto\", {{auto: true, hsts: ...}} or a mapping {{cert: file, key: file, "
                           f"hsts: ...}}, got {_show(tls)}")
            else:
                hsts = tls.get("hsts")
                if hsts is not None and hsts is not False and (
                        isinstance(hsts, bool) or not isinstance(hsts, int) or not 0 <= hsts <= 2 * 365 * 86400):
                    out.append(f"web.tls.hsts: expected seconds (0..63072000, e.g. 31536000 for a year) or false, "
                               f"got {_show(hsts)}")
        return out


@dataclass
class Config:
    """The whole daemon configuration."""

    device_id: str = "edge-01"
    state_dir: str = "state"
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    web: WebConfig = field(default_factory=WebConfig)
    base_dir: str = field(default=".", metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the config, relative paths taken from the config file's folder."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.base_dir) / p

    def state_path(self, path: str) -> Path:
        """A path for daemon state: relative paths are inside ``state_dir``."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.resolve(self.state_dir) / p


# --------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(value: str, path: str, problems: list[str]) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (set it or write ${{{name}:-default}})")
        return ""

    return _ENV_RE.sub(sub, value)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (list,):
        return "a list"
    if origin in (dict,):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str, meta: typing.Mapping[str, Any], problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        converted = _convert(value, inner, path, meta, problems)
        # an empty string (often an unset ${VAR:-}) means "not set" for optional fields
        return None if converted == "" else converted
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_show(value)}")
            return tp()
        return _build(tp, value, path, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return []
        return [_convert(v, item_tp, f"{path}[{i}]", meta, problems) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_show(value)}")
            return {}
        return {str(k): _convert(v, val_tp, f"{path}.{_key(k)}", meta, problems) for k, v in value.items()}
    # scalars
    if isinstance(value, str):
        value = expand_env(value, path, problems)
    out: Any = value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            out = value.lower() in ("true", "yes", "on", "1")
        elif not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {_show(value)}")
            return False
    elif tp in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            out = tp(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf) from YAML
            problems.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
            return tp()
        if tp is float and not math.isfinite(out):  # .nan passes every min/max comparison, .inf never ends
            problems.append(f"{path}: expected a finite number, got {_show(value)}")
            return tp()
        if "min" in meta and out < meta["min"]:
            problems.append(f"{path}: {_show(value)} is below the minimum {meta['min']}")
        if "max" in meta and out > meta["max"]:
            problems.append(f"{path}: {_show(value)} is above the maximum {meta['max']}")
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = str(value)
        elif not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_show(value)}")
            return ""
    choices = meta.get("choices")
    if choices and out not in choices:
        problems.append(f"{path}: {_show(out)} is not allowed (use {', '.join(choices)})")
    return out


def _build(cls: type, data: dict[str, Any], path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{_key(key)}" if path else _key(key)
        if key not in known:
            allowed = ", ".join(n for n in known if n != "name")
            problems.append(f"{where}: unknown field (allowed: {allowed})")
            continue
        f = known[key]
        kwargs[key] = _convert(value, hints[key], where, f.metadata, problems)
    return cls(**kwargs)


def _check(cfg: Config, problems: list[str]) -> None:
    """Rules that involve more than one field or the meaning of a value."""
    from edgelabel.edge.sources import parse_uri  # late import: sources import config types

    if not _NAME_RE.fullmatch(cfg.device_id):
        problems.append(f"device_id: {_show(cfg.device_id)} must be 1-64 characters of letters, digits, '_', '-', '.'")
    if not cfg.model.path:
        problems.append("model.path: required (path to an ONNX detector)")
    problems.extend(cfg.tracking.problems())
    problems.extend(cfg.web.problems())
    for i, p in enumerate(cfg.model.providers):
        if p not in PROVIDERS:
            problems.append(f"model.providers[{i}]: {_show(p)} is not allowed (use {', '.join(PROVIDERS)})")
    if not cfg.sources:
        problems.append("sources: at least one source is required, e.g. sources: {cam1: {uri: rtsp://...}}")
    for name, src in cfg.sources.items():
        src.name = name
        if not _NAME_RE.fullmatch(name):
            problems.append(f"sources.{_key(name)}: source names must be 1-64 characters of letters, digits, '_', '-', '.'")
        if not src.uri:
            problems.append(f"sources.{_key(name)}.uri: required")
            continue
        try:
            parse_uri(src.uri)
        except ValueError as exc:
            problems.append(f"sources.{_key(name)}.uri: {exc}")
        if src.reconnect.max < src.reconnect.initial:
            problems.append(f"sources.{_key(name)}.reconnect.max: {src.reconnect.max} is below reconnect.initial {src.reconnect.initial}")
        if src.tracking is not None:
            problems.extend(p.replace("tracking.", f"sources.{_key(name)}.tracking.") for p in src.tracking.problems())
        tracking = src.tracking or cfg.tracking
        for kind, shapes in (("zones", src.zones), ("lines", src.lines)):
            for shape_name, shape in shapes.items():
                problems.extend(shape.problems(f"sources.{_key(name)}.{kind}.{_key(shape_name)}"))
            counted = [s for s in shapes.values() if not getattr(s, "ignore", False)]  # ignore zones need no tracker
            if counted and not tracking.enabled:
                problems.append(f"sources.{_key(name)}.{kind}: needs tracking (set tracking.enabled: true, or remove them)")
    if not _TOPIC_RE.match(cfg.mqtt.prefix):
        problems.append(f"mqtt.prefix: {_show(cfg.mqtt.prefix)} must not be empty or contain '#', '+' or spaces")
    mqtt = cfg.mqtt
    if mqtt.enabled:  # the MQTT sink refuses these too, but only after the model is loaded and the ledger open
        if mqtt.password and mqtt.password_file:
            problems.append("mqtt.password_file: set either mqtt.password or mqtt.password_file, not both")
        if mqtt.tls is not None and bool(mqtt.tls.cert) != bool(mqtt.tls.key):
            problems.append("mqtt.tls: a client certificate needs both cert and key")
    for i, fmt in enumerate(cfg.dataset.formats):
        if fmt not in DATASET_FORMATS:
            problems.append(f"dataset.formats[{i}]: {_show(fmt)} is not allowed (use {', '.join(DATASET_FORMATS)})")
    _check_capture(cfg.dataset.capture, problems)
    _check_capture_zones(cfg, problems)


def _check_capture_zones(cfg: Config, problems: list[str]) -> None:
    """Capture policies may only name zones that their source has (and only per-source policies may)."""
    section = cfg.dataset.capture
    for which, policy in (("live", section.live), ("storage", section.storage)):
        if policy.zones:
            problems.append(f"dataset.capture.{which}.zones: zones are per source; "
                            f"set them in dataset.capture.sources.<name>.zones")
    for name, policy in section.sources.items():
        src = cfg.sources.get(name)
        known = {z for z, zc in src.zones.items() if not zc.ignore} if src is not None else set()
        for z in policy.zones:
            if z not in known:
                problems.append(f"dataset.capture.sources.{name}.zones: {_show(z)} is not a zone of source {name} "
                                f"(its zones: {', '.join(sorted(known)) or 'none'}; define it in sources.{name}.zones)")


def _check_capture(section: CaptureSection, problems: list[str]) -> None:
    """Capture rules that span fields: a band must be a real interval, min <= max detections."""
    policies = {"dataset.capture.storage": section.storage, "dataset.capture.live": section.live}
    policies.update({f"dataset.capture.sources.{_key(name)}": c for name, c in section.sources.items()})
    for where, c in policies.items():
        band = c.near_threshold
        if band is not None and not band.low < band.high:
            problems.append(f"{where}.near_threshold: low {band.low} must be below high {band.high}")
        if c.max_detections is not None and c.max_detections < c.min_detections:
            problems.append(f"{where}.max_detections: {c.max_detections} is below min_detections {c.min_detections}")


def validate_config(data: Any, base_dir: str | Path = ".") -> tuple[Config | None, list[str]]:
    """The config and every schema problem, without raising.

    A field with a problem holds its default in the returned config, so a
    caller can go on to check what the schema cannot (files on disk, the model)
    and report everything in one pass; ``None`` when ``data`` is not a mapping.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"(top level): expected a mapping of settings, got {type(data).__name__}"]
    cfg = _build(Config, data, "", problems)
    cfg.base_dir = str(base_dir)
    _check(cfg, problems)
    return cfg, problems


def config_from_dict(data: Any, base_dir: str | Path = ".") -> Config:
    """Validate a mapping (as read from YAML) and return the config, or raise ConfigError."""
    cfg, problems = validate_config(data, base_dir)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


#: the variable the bundled demo config takes its model and video from, and its default (edge/configs/default.yaml)
MIRROR_ENV, MIRROR_DEFAULT = "EDGELABEL_MIRROR", "../shared"


def mirror_folder(base_dir: str | Path) -> Path:
    """Where the bundled demo config looks for the asset mirror, as ``${EDGELABEL_MIRROR:-../shared}`` expands."""
    value = os.environ.get(MIRROR_ENV, MIRROR_DEFAULT)
    return Path(os.path.normpath(Path(base_dir) / os.path.expanduser(value)))


def mirror_hint(base_dir: str | Path) -> str:
    """What to do when the bundled demo config's model or video is missing: say where it looked."""
    folder = mirror_folder(base_dir)
    how = (f"{MIRROR_ENV}={os.environ[MIRROR_ENV]}" if MIRROR_ENV in os.environ
           else f"{MIRROR_ENV} is not set: {MIRROR_DEFAULT} from the current directory {os.path.normpath(base_dir)}")
    return (f"{MIRROR_ENV}: the bundled demo config looked for the asset mirror (models/, videos/) in {folder} "
            f"({how}); set {MIRROR_ENV} to the folder that holds it, or give your own config with -c "
            "(or --model and --source)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file into a mapping; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config file ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: config file is not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError (control character) has no mark
        where = (f" line {mark.line + 1}, column {mark.column + 1}" if mark
                 else f" character {position + 1}" if isinstance(position, int) else "")
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise ConfigError([f"{p}:{where}: invalid YAML ({problem})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}"])
    return data


def load_config(path: str | Path) -> Config:
    """Read, validate and return the config in ``path``."""
    p = Path(path)
    return config_from_dict(read_config_file(p), base_dir=p.resolve().parent)

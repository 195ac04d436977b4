"""What every request needs, attached to the app by ``create_app`` (never module-level state).

``WebContext`` holds the pipeline, the web sink, the device monitor, the log
buffer and the redactor; ``build_status`` turns them into the one snapshot the
dashboard, ``/api/status``, ``/api/sources`` and ``/metrics`` read, so the
pages and the API cannot disagree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from flask import current_app

from edgelabel.edge.config import Config
from edgelabel.edge.health import device_alarms
from edgelabel.edge.sources.rtsp import mask_credentials
from edgelabel.web.auth import LoginThrottle
from edgelabel.web.logbuffer import RingLogHandler
from edgelabel.web.redact import Redactor
from edgelabel.web.sink import WebSink
from edgelabel.web.system import DeviceMonitor

#: mqtt status keys that may hold the outbox depth, most specific first (the outbox is newer than this page)
_OUTBOX_KEYS = ("outbox_depth", "outbox_size", "outbox_messages", "queued", "backlog", "pending")
_OUTBOX_DICT_KEYS = ("depth", "size", "messages", "queued", "count", "rows")
_DROP_KEYS = ("dropped", "outbox_dropped", "drops")


class PipelineLike(Protocol):
    """What the web page uses of ``edge.pipeline.Pipeline``."""

    cfg: Config

    def status(self) -> dict[str, Any]: ...

    def set_source_paused(self, name: str, paused: bool) -> None: ...


@dataclass
class WebContext:
    """The web app's view of the daemon."""

    cfg: Config
    pipeline: PipelineLike
    sink: WebSink
    device: DeviceMonitor
    logs: RingLogHandler
    redactor: Redactor
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    max_streams: int = 8
    closing: threading.Event = field(default_factory=threading.Event)
    _streams: int = 0
    _streams_lock: threading.Lock = field(default_factory=threading.Lock)

    def try_stream(self) -> bool:
        """Take a live-view slot; pair with ``release_stream``."""
        with self._streams_lock:
            if self._streams >= self.max_streams:
                return False
            self._streams += 1
            return True

    def release_stream(self) -> None:
        """Give a live-view slot back."""
        with self._streams_lock:
            self._streams = max(0, self._streams - 1)

    @property
    def streams(self) -> int:
        """Open live views."""
        with self._streams_lock:
            return self._streams


def get_ctx() -> WebContext:
    """The current app's context."""
    return current_app.extensions["edgelabel"]  # type: ignore[no-any-return]


def _number(d: Any, keys: tuple[str, ...]) -> int | float | None:
    """The first numeric value among ``keys`` in ``d`` (defensive: sinks change)."""
    if not isinstance(d, dict):
        return None
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def mqtt_summary(sinks: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """The MQTT card: whatever ``status()['sinks']['mqtt']`` offers, read key by key."""
    raw = sinks.get("mqtt")
    if not isinstance(raw, dict):
        return {"enabled": enabled, "connected": None, "broker": None, "outbox_depth": None,
                "last_publish_at": None, "dropped": None, "last_error": None, "drops": None, "details": {}}
    outbox = raw.get("outbox")
    depth = _number(raw, _OUTBOX_KEYS[:3])
    if depth is None and isinstance(outbox, dict):
        depth = _number(outbox, _OUTBOX_DICT_KEYS)
    elif depth is None and isinstance(outbox, (int, float)) and not isinstance(outbox, bool):
        depth = outbox
    if depth is None:
        depth = _number(raw, _OUTBOX_KEYS[3:])
    dropped = _number(raw, _DROP_KEYS)  # the sink's own total (it includes the outbox's losses)
    if dropped is None and isinstance(outbox, dict):
        dropped = _number(outbox, ("dropped",))
        if dropped is None:
            parts = [_number(outbox, (k,)) for k in ("evicted", "expired", "refused")]
            dropped = sum(v for v in parts if v is not None) if any(v is not None for v in parts) else None
    connected = raw.get("connected")
    return {
        "enabled": True,
        "connected": connected if isinstance(connected, bool) else None,
        "broker": raw.get("broker"),
        "outbox_depth": depth,
        "last_publish_at": _number(raw, ("last_publish_at", "last_published_at", "last_publish")),
        "dropped": dropped,
        "last_error": raw.get("last_error"),
        "drops": {k: v for k, v in raw["drops"].items() if isinstance(v, (int, float))} if isinstance(raw.get("drops"), dict)
        else None,
        "details": {k: v for k, v in raw.items() if isinstance(v, (str, int, float, bool)) or v is None},
    }


def source_entry(ctx: WebContext, name: str, stats: dict[str, Any]) -> dict[str, Any]:
    """One source as the page and the API show it: runner stats, what the records say, links."""
    scfg = ctx.pipeline.cfg.sources.get(name)
    web = ctx.sink.source_view(name)
    entry = dict(stats)
    entry.setdefault("paused", False)
    entry.update(web)
    entry["uri"] = mask_credentials(scfg.uri, None) if scfg is not None else None
    entry["fps_cap"] = scfg.fps if scfg is not None else None
    entry["snapshot_url"] = f"/api/sources/{name}/snapshot.jpg"
    entry["stream_url"] = f"/api/sources/{name}/stream.mjpg"
    return entry


def build_status(ctx: WebContext, include_device: bool = True) -> dict[str, Any]:
    """The whole daemon as the web page sees it, with every secret masked."""
    raw = ctx.pipeline.status()
    sinks = raw.get("sinks") or {}
    model = raw.get("model")
    engine = None
    if isinstance(model, dict):
        engine = {**model, "inference_ms_avg": raw.get("inference_ms_avg"),
                  "inference_ms_last": ctx.sink.last_inference_ms()}
    sources = {n: source_entry(ctx, n, s) for n, s in (raw.get("sources") or {}).items()}
    out = {
        "device_id": raw.get("device_id"),
        "uptime_s": raw.get("uptime_s"),
        "running": raw.get("running"),
        "time": time.time(),
        "frames": raw.get("frames"),
        "detections": raw.get("detections"),
        "rejected": raw.get("rejected"),
        "last_error": raw.get("last_error"),
        "storage_faults": raw.get("storage_faults") or [],  # read by readiness() through edge.health
        "threads_died": raw.get("threads_died") or {},
        "engine": engine,
        "mqtt": mqtt_summary(sinks, ctx.pipeline.cfg.mqtt.enabled),
        "dataset": sinks.get("dataset"),
        "sources": sources,
        "sinks": sinks,
        "zones": raw.get("zones") or {},
        "ledger": raw.get("ledger"),
        "logs": ctx.logs.summary(),
        "web": {"public_read": ctx.cfg.web.public_read, "stream_fps": ctx.cfg.web.stream_fps,
                "live_views": ctx.streams, "max_live_views": ctx.max_streams},
    }
    # what stops labeling or delivery, in the technician's words of edge/health.py (the MQTT alarm topic's list)
    out["alarms"] = device_alarms(out)
    if include_device:
        out["device"] = ctx.device.snapshot()
    return ctx.redactor.data(out)  # type: ignore[no-any-return]


def readiness(status: dict[str, Any]) -> list[str]:
    """Why the daemon is not ready (empty: ready): no model, stopped, every source offline, or an error alarm
    (``edgelabel.edge.health``: labeling or delivery stopped or losing data)."""
    reasons = []
    if not status.get("engine"):
        reasons.append("model not loaded")
    if status.get("running") is False:
        reasons.append("pipeline stopped")
    sources = status.get("sources") or {}
    active = {n: s for n, s in sources.items() if s.get("status") != "disabled"}
    if not active:
        reasons.append("no enabled source")
    else:
        down = [n for n, s in active.items() if s.get("status") in ("offline", "reconnecting", None)]
        if len(down) == len(active):
            reasons.append("all sources offline: " + ", ".join(sorted(down)))
    reasons += [f"{a['id']}: {a['message']}" for a in device_alarms(status) if a.get("severity") == "error"]
    return reasons

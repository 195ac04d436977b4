"""Zones and lines per source: enter / exit / crossing events from tracked boxes, with counters.

A factory counts with these ("parts that crossed the conveyor line, per class and direction", "people
inside the robot cell") instead of rebuilding it downstream from raw boxes.  Configured per source
(``sources.<name>.zones`` / ``lines``, :class:`edge.config.ZoneConfig` / :class:`edge.config.LineConfig`);
every tracked detection contributes one point of its box (``anchor``: the bottom centre, where a person
or a vehicle touches the ground, or the centre).

* **Zones** (polygons): ``zone_enter`` when a track's point is inside, ``zone_exit`` when it is outside
  again, with the dwell time, or when the track ends (``reason``: ``left``, ``track_end``,
  ``source_stopped``).
* **Lines** (directed, first point to second): ``line_cross`` when a track's point goes from one side to
  the other within the segment; ``direction`` names the side it crossed to, as seen standing on the
  first point looking at the second (``left`` / ``right`` on the displayed image).
* **Hysteresis**: a point must be more than ``hysteresis`` (a share of the frame diagonal) inside or
  outside a zone, or away from a line, before its state changes; a box jittering on the boundary
  therefore enters once and crosses once.
* **Ignore zones** (``ignore: true``): detections whose point lies inside (of the zone's ``classes``, or
  any) are dropped before tracking and recording, for a static false positive (a poster, a reflection);
  they produce no events.
* **Counters**: enters, exits and crossings per zone / line, class and direction, and who is inside each
  zone now (:meth:`ZoneCounter.counts`).

Events go out on the events topic next to the track events (schema ``edge/schemas/zone-event.v1.json``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelabel.edge.config import LineConfig, ZoneConfig
from edgelabel.edge.records import iso_utc

ZONE_EVENT_SCHEMA_VERSION = 1
_NAMESPACE = uuid.UUID("8b1f3c2e-5d4a-4f6b-9c7e-2a1d0e9f8b7c")


@dataclass
class TrackedBox:
    """One tracked detection of a frame, as the zone counter needs it."""

    track_id: int
    track_uid: str
    class_id: int
    label: str
    box: tuple[float, float, float, float]


def _points(points: list[list[float]], units: str, width: int, height: int) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return arr * np.array([width, height]) if units == "normalized" else arr


def _anchor(box: Sequence[float], anchor: str) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2, y2 if anchor == "bottom" else (y1 + y2) / 2])


def inside_zone(zone: ZoneConfig, label: str, box: Sequence[float], width: int, height: int) -> bool:
    """A box's point lies in ``zone`` and the zone counts its class (no hysteresis: one frame on its own)."""
    if zone.classes and label not in zone.classes:
        return False
    pts = _points(zone.points, zone.units, width, height)
    return signed_distance_to_polygon(_anchor(box, zone.anchor), pts) > 0


def signed_distance_to_polygon(p: np.ndarray, poly: np.ndarray) -> float:
    """Distance from ``p`` to the polygon's boundary, positive inside, negative outside (pixels)."""
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("ij,ij->i", p - a, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-12), 0.0, 1.0)
    dist = float(np.min(np.linalg.norm(a + t[:, None] * ab - p, axis=1)))
    # even-odd rule
    crosses = ((a[:, 1] > p[1]) != (b[:, 1] > p[1])) & (
        p[0] < a[:, 0] + (p[1] - a[:, 1]) * ab[:, 0] / np.where(ab[:, 1] == 0, 1e-12, ab[:, 1]))
    return dist if int(np.count_nonzero(crosses)) % 2 else -dist


def line_side(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(signed distance, positive on the left of a->b as displayed; position along a->b, 0..1 on the segment)."""
    ab = b - a
    length = float(np.hypot(*ab))
    d = float((p - a) @ np.array([ab[1], -ab[0]])) / length  # image y points down: (dy, -dx) is the left
    t = float((p - a) @ ab) / (length * length)
    return d, t


@dataclass
class _Inside:
    since: float
    record_id: str  # the frame of the last point inside
    frame_index: int
    track: TrackedBox


@dataclass
class _Shape:
    name: str
    kind: str  # "zone" or "line"
    cfg: ZoneConfig | LineConfig
    inside: dict[int, _Inside] = field(default_factory=dict)  # zones: track id -> since
    side: dict[int, tuple[int, float]] = field(default_factory=dict)  # lines: track id -> (side, t)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> {enter|exit|left|right: n}

    def count(self, label: str, what: str) -> int:
        per = self.counts.setdefault(label, {})
        per[what] = per.get(what, 0) + 1
        return per[what]


class ZoneCounter:
    """One source's zones and lines; fed every frame's tracked detections."""

    def __init__(self, source: str, zones: dict[str, ZoneConfig], lines: dict[str, LineConfig]) -> None:
        self.source = source
        self.shapes = (zones, lines)  # the configuration, to notice a reload that changed it
        self._shapes = [_Shape(n, "zone", z) for n, z in zones.items() if not z.ignore]
        self._shapes += [_Shape(n, "line", ln) for n, ln in lines.items()]
        self._ignore = [z for z in zones.values() if z.ignore]
        self._seq = 0
        self._last_ts: float | None = None  # the latest frame's time (the clock finish() ends stays on)

    def drop_ignored(self, detections: list[Any], width: int, height: int) -> list[Any]:
        """``detections`` without those whose point lies in an ``ignore`` zone (of the zone's classes).

        Hysteresis does not apply: a detection is kept or dropped on its own point.
        """
        if not self._ignore or not detections:
            return detections
        return [d for d in detections if not any(inside_zone(z, d.label, d.box, width, height) for z in self._ignore)]

    def update(self, boxes: Sequence[TrackedBox], ts: float, width: int, height: int, record_id: str,
               frame_index: int, ended: Sequence[int] = ()) -> list[dict[str, Any]]:
        """The events of one frame; ``ended`` are track ids the tracker ended in this frame."""
        events: list[dict[str, Any]] = []
        self._last_ts = ts if self._last_ts is None else max(self._last_ts, ts)
        margin_px = float(np.hypot(width, height))
        for shape in self._shapes:
            cfg = shape.cfg
            pts = _points(cfg.points, cfg.units, width, height)
            margin = cfg.hysteresis * margin_px
            for tb in boxes:
                if cfg.classes and tb.label not in cfg.classes:
                    continue
                p = _anchor(tb.box, cfg.anchor)
                if shape.kind == "zone":
                    d = signed_distance_to_polygon(p, pts)
                    if tb.track_id in shape.inside and d >= -margin:
                        inside = shape.inside[tb.track_id]
                        inside.record_id, inside.frame_index, inside.track = record_id, frame_index, tb
                    elif tb.track_id not in shape.inside and d > margin:
                        shape.inside[tb.track_id] = _Inside(ts, record_id, frame_index, tb)
                        n = shape.count(tb.label, "enter")
                        events.append(self._event("zone_enter", shape, tb, ts, record_id, frame_index, p, count=n))
                    elif tb.track_id in shape.inside and d < -margin:
                        events.append(self._exit(shape, tb.track_id, ts, record_id, frame_index, p, "left"))
                else:
                    d, t = line_side(p, pts[0], pts[1])
                    if abs(d) <= margin:
                        continue  # on the line (within the hysteresis): keep the last side
                    side = 1 if d > 0 else -1
                    before = shape.side.get(tb.track_id)
                    shape.side[tb.track_id] = (side, t)
                    # a crossing: the other side than last time, and the path between the two points
                    # passes within the segment
                    if before is not None and before[0] != side and 0.0 <= (before[1] + t) / 2 <= 1.0:
                        direction = "left" if side > 0 else "right"
                        n = shape.count(tb.label, direction)
                        events.append(self._event("line_cross", shape, tb, ts, record_id, frame_index, p,
                                                  direction=direction, count=n))
            for tid in ended:
                self._forget(shape, tid, ts, events, "track_end")
        return events

    def observe(self, detections: Sequence[Any], ids: Sequence[int | None], uids: dict[int, str],
                track_events: Sequence[dict[str, Any]], ts: float, width: int, height: int, record_id: str,
                frame_index: int) -> list[dict[str, Any]]:
        """:meth:`update` from what the pipeline has: the frame's detections, the tracker's ids, uids and events."""
        boxes = [TrackedBox(tid, uids.get(tid, ""), int(d.class_id), d.label, tuple(d.box))
                 for d, tid in zip(detections, ids, strict=True) if tid is not None]
        ended = [int(e["track_id"]) for e in track_events if e.get("type") == "end"]
        return self.update(boxes, ts, width, height, record_id, frame_index, ended=ended)

    def finish(self, ts: float | None = None) -> list[dict[str, Any]]:
        """The source stopped: every track inside a zone exits (``source_stopped``), by default at the last
        frame's time (the frames' clock: media time for a file, as the tracker's ``finish``)."""
        if ts is None:
            ts = self._last_ts if self._last_ts is not None else 0.0
        events: list[dict[str, Any]] = []
        for shape in self._shapes:
            for tid in list(shape.inside):
                self._forget(shape, tid, ts, events, "source_stopped")
            shape.side.clear()
        return events

    def counts(self) -> dict[str, Any]:
        """Counters per zone and line: ``{"zones": {name: {"inside": n, "by_class": {label: {...}}}}, "lines": ...}``."""
        out: dict[str, Any] = {"zones": {}, "lines": {}}
        for shape in self._shapes:
            entry: dict[str, Any] = {"by_class": {k: dict(v) for k, v in shape.counts.items()}}
            if shape.kind == "zone":
                entry["inside"] = len(shape.inside)
            out["zones" if shape.kind == "zone" else "lines"][shape.name] = entry
        return out

    # ------------------------------------------------------------------ internals

    def _forget(self, shape: _Shape, tid: int, ts: float, events: list[dict[str, Any]], reason: str) -> None:
        """The track is gone: forget its side of a line, and it exits a zone it was in (at its last frame inside)."""
        shape.side.pop(tid, None)
        inside = shape.inside.get(tid)
        if inside is not None:
            events.append(self._exit(shape, tid, ts, inside.record_id, inside.frame_index, None, reason))

    def _exit(self, shape: _Shape, tid: int, ts: float, record_id: str, frame_index: int,
              p: np.ndarray | None, reason: str) -> dict[str, Any]:
        inside = shape.inside.pop(tid)
        tb = inside.track
        n = shape.count(tb.label, "exit")
        return self._event("zone_exit", shape, tb, ts, record_id, frame_index, p, count=n, reason=reason,
                           entered_at=iso_utc(inside.since), dwell_s=round(max(ts - inside.since, 0.0), 3))

    def _event(self, kind: str, shape: _Shape, tb: TrackedBox, ts: float, record_id: str, frame_index: int,
               p: np.ndarray | None, **extra: Any) -> dict[str, Any]:
        self._seq += 1
        doc: dict[str, Any] = {
            "schema_version": ZONE_EVENT_SCHEMA_VERSION,
            "id": str(uuid.uuid5(_NAMESPACE, f"{tb.track_uid}\x1f{kind}\x1f{shape.name}\x1f{ts!r}\x1f{self._seq}")),
            "type": kind,
            "source": self.source,
            shape.kind: shape.name,
            "track_id": tb.track_id,
            "track_uid": tb.track_uid,
            "class_id": tb.class_id,
            "label": tb.label,
            "record_id": record_id,
            "frame_index": frame_index,
            "point": None if p is None else [round(float(v), 1) for v in p],
            "at": iso_utc(ts),
        }
        doc.update(extra)
        return doc

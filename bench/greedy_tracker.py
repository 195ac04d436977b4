"""The greedy IoU tracker edgelabel shipped before the Kalman/Hungarian one, kept for comparison only.

``bench/tracking.py`` runs it side by side with ``edge.tracking.Tracker`` on the same detections; nothing in
the daemon imports this file.  Its original module doc follows.

Multi-object tracking per source: stable track ids in records and new / update / end events.

A small ByteTrack-style tracker in plain numpy, because the daemon runs on
small boxes and a detector's boxes on consecutive frames overlap strongly:

* **Prediction.**  Each track keeps a constant-velocity estimate of its box
  (pixels per second, smoothed), so a fast object that moves most of its
  width between two frames is still matched; velocity is in seconds, not
  frames, because live sources drop frames and fps caps vary.
* **Two-stage association** (ByteTrack): detections with ``score >=
  tracking.high_score`` are matched first against every track; the weaker
  ones are then only used to keep *confirmed* tracks alive (an object that is
  briefly partly hidden), never to start a track, which keeps false positives
  from creating tracks.
* **Greedy IoU matching with class consistency**: pairs are taken in order of
  decreasing IoU above ``tracking.iou``; a pair of different classes never
  matches, so a detection that switches class starts a new track (the old one
  ends after ``max_age``).  Greedy is as good as Hungarian at the overlaps
  that matter here and needs no extra dependency.
* **Confirmation.**  A track gets its public id only after ``min_hits``
  detections (the record shows ``track_id: null`` before); ids count from 1
  per source and are never reused while the daemon runs.
* **Events.**  ``new`` when a track is confirmed, ``update`` at most every
  ``update_interval`` seconds per track while it is matched (0: every matched
  frame), ``end`` when it has not been matched for ``max_age`` seconds or when
  the source stops (:meth:`Tracker.finish`).  Each carries the track-level
  confidence (mean and max score), first/last time and the best frame (the
  record id, frame index and box of its highest-scoring detection), so a
  consumer can fetch one good crop per object.

Times are the frames' capture times (epoch seconds), so the tracker behaves the
same for a video processed faster than real time and for a live camera.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelabel.edge.config import TrackingConfig
from edgelabel.edge.records import iso_utc
from edgelabel.engines.base import Detection

EVENT_SCHEMA_VERSION = 1
#: weight of the newest measurement in the velocity estimate
_VELOCITY_GAIN = 0.5
_NAMESPACE = uuid.UUID("3d9c1a52-6f0b-5e4e-8a61-0c2f7b5d9e13")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4, x1 y1 x2 y2) with every box in ``b`` (M x 4): N x M."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    ax1, ay1, ax2, ay2 = (a[:, i][:, None] for i in range(4))
    bx1, by1, bx2, by2 = (b[:, i][None, :] for i in range(4))
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    area_a = np.clip(ax2 - ax1, 0, None) * np.clip(ay2 - ay1, 0, None)
    area_b = np.clip(bx2 - bx1, 0, None) * np.clip(by2 - by1, 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) taken in order of decreasing score, each row and column at most once, score >= threshold."""
    if scores.size == 0:
        return []
    rows, cols = np.nonzero(scores >= threshold)
    if len(rows) == 0:
        return []
    order = np.argsort(-scores[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


@dataclass
class _Best:
    record_id: str
    frame_index: int
    box: list[float]
    score: float
    ts: float


@dataclass
class _Track:
    key: int  # internal, also for unconfirmed tracks
    class_id: int
    label: str
    box: np.ndarray  # last measured box
    first_ts: float
    last_ts: float
    best: _Best
    last_record_id: str
    last_frame_index: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    hits: int = 1
    score_sum: float = 0.0
    score_max: float = 0.0
    track_id: int | None = None  # public id, set on confirmation
    uid: str = ""
    last_event_ts: float = 0.0
    events_sent: int = 0

    def predict(self, ts: float, horizon: float) -> np.ndarray:
        """The box expected at ``ts`` (the velocity is trusted for at most ``horizon`` seconds)."""
        dt = min(max(ts - self.last_ts, 0.0), horizon)
        return self.box + self.velocity * dt


class GreedyTracker:
    """Tracks one source's detections across frames; see the module doc."""

    def __init__(self, source: str, cfg: TrackingConfig) -> None:
        self.source = source
        self.cfg = cfg
        self._tracks: list[_Track] = []
        self._next_key = 1
        self._next_id = 1
        self._run = uuid.uuid4().hex  # makes track uids unique across daemon restarts
        self._last_ts: float | None = None

    @property
    def confirmed(self) -> int:
        """Confirmed tracks currently alive."""
        return sum(1 for t in self._tracks if t.track_id is not None)

    def update(
        self, detections: Sequence[Detection], ts: float, record_id: str, frame_index: int
    ) -> tuple[list[int | None], list[dict[str, Any]]]:
        """Match one frame's detections; returns each detection's track id (None if unconfirmed) and the events."""
        cfg = self.cfg
        if self._last_ts is not None and ts < self._last_ts:
            ts = self._last_ts  # a clock step backwards must not make tracks younger
        self._last_ts = ts
        events: list[dict[str, Any]] = []
        n = len(detections)
        ids: list[int | None] = [None] * n
        boxes = np.array([d.box for d in detections], dtype=np.float64).reshape(n, 4)
        scores = np.array([float(d.score) for d in detections], dtype=np.float64)
        classes = np.array([int(d.class_id) for d in detections], dtype=np.int64)

        tracks = self._tracks
        horizon = max(cfg.max_age, 1e-3)
        predicted = np.array([t.predict(ts, horizon) for t in tracks], dtype=np.float64).reshape(len(tracks), 4)
        track_classes = np.array([t.class_id for t in tracks], dtype=np.int64)
        iou = iou_matrix(boxes, predicted)
        iou[classes[:, None] != track_classes[None, :]] = 0.0  # never match across classes

        high = np.nonzero(scores >= cfg.high_score)[0]
        low = np.nonzero(scores < cfg.high_score)[0]
        matched_det: dict[int, int] = {}  # detection index -> track index
        free_tracks = np.arange(len(tracks))
        # stage 1: strong detections against every track
        for r, c in greedy_match(iou[np.ix_(high, free_tracks)], cfg.iou):
            matched_det[int(high[r])] = int(free_tracks[c])
        # stage 2: weak detections only keep confirmed tracks alive
        taken = set(matched_det.values())
        free_tracks = np.array([i for i, t in enumerate(tracks) if i not in taken and t.track_id is not None], dtype=np.int64)
        for r, c in greedy_match(iou[np.ix_(low, free_tracks)], cfg.iou):
            matched_det[int(low[r])] = int(free_tracks[c])

        for d, ti in matched_det.items():
            track = tracks[ti]
            self._observe(track, boxes[d], float(scores[d]), ts, record_id, frame_index)
            if track.track_id is None and track.hits >= cfg.min_hits:
                self._confirm(track)
                events.append(self._event("new", track, ts))
            elif track.track_id is not None and ts - track.last_event_ts >= cfg.update_interval:
                events.append(self._event("update", track, ts))
            ids[d] = track.track_id

        # unmatched strong detections start tracks
        for d in high:
            d = int(d)
            if d in matched_det:
                continue
            track = self._start(detections[d], boxes[d], float(scores[d]), ts, record_id, frame_index)
            if cfg.min_hits <= 1:
                self._confirm(track)
                events.append(self._event("new", track, ts))
            ids[d] = track.track_id

        # tracks unseen for longer than max_age end (unconfirmed ones vanish silently)
        matched_tracks = {id(tracks[ti]) for ti in matched_det.values()}
        alive: list[_Track] = []
        for track in self._tracks:
            if id(track) not in matched_tracks and ts - track.last_ts > cfg.max_age:
                if track.track_id is not None:
                    events.append(self._event("end", track, ts, reason="lost"))
                continue
            alive.append(track)
        self._tracks = alive
        return ids, events

    def finish(self, ts: float) -> list[dict[str, Any]]:
        """The source stopped (finished, offline, reconnecting, shutdown): end every confirmed track."""
        events = [self._event("end", t, ts, reason="finished") for t in self._tracks if t.track_id is not None]
        self._tracks = []
        self._last_ts = None
        return events

    # ------------------------------------------------------------------ internals

    def _start(self, det: Detection, box: np.ndarray, score: float, ts: float, record_id: str, frame_index: int) -> _Track:
        track = _Track(
            key=self._next_key,
            class_id=int(det.class_id),
            label=det.label,
            box=box.copy(),
            first_ts=ts,
            last_ts=ts,
            best=_Best(record_id, frame_index, _round_box(box), round(score, 5), ts),
            last_record_id=record_id,
            last_frame_index=frame_index,
            score_sum=score,
            score_max=score,
        )
        self._next_key += 1
        self._tracks.append(track)
        return track

    def _observe(self, track: _Track, box: np.ndarray, score: float, ts: float, record_id: str, frame_index: int) -> None:
        dt = ts - track.last_ts
        if dt > 0:
            measured = (box - track.box) / dt
            track.velocity = (1 - _VELOCITY_GAIN) * track.velocity + _VELOCITY_GAIN * measured
        track.box = box.copy()
        track.last_ts = ts
        track.hits += 1
        track.score_sum += score
        track.score_max = max(track.score_max, score)
        track.last_record_id = record_id
        track.last_frame_index = frame_index
        if score > track.best.score:
            track.best = _Best(record_id, frame_index, _round_box(box), round(score, 5), ts)

    def _confirm(self, track: _Track) -> None:
        track.track_id = self._next_id
        self._next_id += 1
        track.uid = str(uuid.uuid5(_NAMESPACE, f"{self.source}\x1f{self._run}\x1f{track.track_id}"))

    def _event(self, kind: str, track: _Track, ts: float, reason: str | None = None) -> dict[str, Any]:
        """One event dict, as published on ``<prefix>/<device>/events`` (the sink adds ``device_id``)."""
        assert track.track_id is not None
        track.events_sent += 1
        track.last_event_ts = ts
        return {
            "schema_version": EVENT_SCHEMA_VERSION,
            "id": str(uuid.uuid5(_NAMESPACE, f"{track.uid}\x1f{track.events_sent}")),
            "type": kind,
            "source": self.source,
            "track_id": track.track_id,
            "track_uid": track.uid,
            "class_id": track.class_id,
            "label": track.label,
            "confidence": round(track.score_sum / track.hits, 5),
            "score_max": round(track.score_max, 5),
            "hits": track.hits,
            "first_seen": iso_utc(track.first_ts),
            "first_ts": round(track.first_ts, 6),
            "last_seen": iso_utc(track.last_ts),
            "last_ts": round(track.last_ts, 6),
            "duration_s": round(track.last_ts - track.first_ts, 3),
            "record_id": track.last_record_id,
            "frame_index": track.last_frame_index,
            "box": _round_box(track.box),
            "best": {
                "record_id": track.best.record_id,
                "frame_index": track.best.frame_index,
                "box": track.best.box,
                "score": track.best.score,
                "captured_at": iso_utc(track.best.ts),
            },
            "end_reason": reason,
            "at": iso_utc(ts),
        }


def _round_box(box: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in box]

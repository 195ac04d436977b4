"""Multi-object tracking per source: stable track ids in records and new / update / end events.

A ByteTrack-style tracker written here in numpy and SciPy (docs/tracking.md says why no library tracker is
embedded: the maintained ones pull in PyTorch, matplotlib, pip's OpenCV or an older numpy, too heavy or
conflicting on a Jetson image):

* **Motion: a Kalman filter on media time.**  Each track's state is its box centre, width and height and
  their velocities in pixels per *second* (constant-velocity model).  The prediction step uses the time
  between the frames' timestamps, not a frame count, so dropped frames, fps caps and irregular video
  timestamps do not matter; ``dt = 0`` (two frames with one timestamp) predicts nothing, a clock step
  backwards is treated as ``dt = 0`` and a long pause extrapolates at most :data:`MAX_DT` seconds.  The
  noise model is ByteTrack's (proportional to the box size), rescaled from "per frame at 30 fps" to
  "per second".
* **Two-stage association** (ByteTrack): detections with ``score >= tracking.high_score`` are matched first
  against every confirmed track, those seen in the last frame and those lost for up to ``max_age``
  seconds (the track buffer that bridges short occlusions).  The weaker ones (``low_score`` up to
  ``high_score``) are then matched, at the stricter ``tracking.low_iou``, only against tracks that were
  seen in the last frame and are still unmatched: a partly hidden person keeps its id, and a weak false
  positive never starts a track.  Remaining strong detections are matched to tentative tracks, and those
  with ``score >= new_track_score`` start new tentative tracks.
* **Optimal assignment**: each stage solves the assignment on ``1 - similarity`` with SciPy's
  ``linear_sum_assignment`` (Hungarian); pairs below the stage's threshold are never matched.  The
  similarity is the IoU of the detection with the track's predicted box, times the detection's score for
  strong detections (``fuse_score``, ByteTrack's setting for MOT17).
* **Duplicates**: a lost track whose predicted box overlaps, by more than :data:`DUPLICATE_IOU`, a track
  matched in the same frame that was started after the lost one was last seen ends: it is the same object
  under a second id, and would otherwise take that object's detection back later (an id switch).
* **Class-aware**: a detection is never matched to a track of another class, so a detection that switches
  class starts a new track (the old one ends after ``max_age``).
* **Confirmation.**  A track gets its public id only after ``min_hits`` detections (the record shows
  ``track_id: null`` before); a tentative track that misses one frame is dropped.  Ids come from a
  :class:`TrackIdStore` when the daemon has a state dir: they are unique per source across restarts, not
  only while the daemon runs.
* **Events.**  ``new`` when a track is confirmed, ``update`` at most every ``update_interval`` seconds per
  track while it is matched (0: every matched frame), ``end`` when it has not been matched for ``max_age``
  seconds or when the source stops (:meth:`Tracker.finish`).  Each carries the track-level confidence
  (mean and max score), first/last time and the best frame (the record id, frame index and box of its
  highest-scoring detection), so a consumer can fetch one good crop per object.

Times are the frames' ``captured_at`` (epoch seconds): a camera's capture time, a video file's media time
(``edge.sources.video``), so the Kalman filter, ``max_age`` and event durations behave the same for a video
processed faster or slower than real time and for a live camera.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from edgelabel.edge.config import TrackingConfig
from edgelabel.edge.records import iso_utc
from edgelabel.engines.base import Detection

log = logging.getLogger(__name__)

EVENT_SCHEMA_VERSION = 1
_NAMESPACE = uuid.UUID("3d9c1a52-6f0b-5e4e-8a61-0c2f7b5d9e13")
#: the longest single prediction step in seconds (a paused source must not fling boxes off screen)
MAX_DT = 1.0
#: a lost track overlapping a matched one by more than this is a duplicate and ends
DUPLICATE_IOU = 0.6
#: ByteTrack's noise weights are per frame at this rate; they are rescaled to per second
_REF_FPS = 30.0
_STD_POS = 1.0 / 20  # measurement / position noise, share of the box size
_STD_VEL = 1.0 / 160  # velocity noise per frame, share of the box size


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


def optimal_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) of the assignment that maximises the total IoU, each pair with IoU >= threshold.

    Pairs under the threshold are priced out before solving, so a weak pair never forces a worse
    assignment on the others.
    """
    if iou.size == 0:
        return []
    valid = iou >= max(threshold, 1e-9)
    if not valid.any():
        return []
    cost = np.where(valid, 1.0 - iou, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if valid[r, c]]


def _xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    w = np.maximum(b[..., 2] - b[..., 0], 1.0)
    h = np.maximum(b[..., 3] - b[..., 1], 1.0)
    return np.stack([b[..., 0] + w / 2, b[..., 1] + h / 2, w, h], axis=-1)


def _cxcywh_to_xyxy(m: np.ndarray) -> np.ndarray:
    cx, cy, w, h = m[..., 0], m[..., 1], m[..., 2], m[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _size_std(wh: np.ndarray, weight: float) -> np.ndarray:
    """Per-coordinate standard deviations (cx, cy, w, h) proportional to each box's width / height (K x 4)."""
    w, h = wh[:, 0], wh[:, 1]
    return np.stack([w, h, w, h], axis=1) * weight


class TrackIdStore:
    """Track ids unique per source across daemon restarts, from a small JSON file in the state dir.

    Ids are reserved in blocks of ``block``: the file holds, per source, the first id not yet reserved,
    and is rewritten (atomically) only when a block is used up, so a busy scene does not write the
    disk for every new track.  After a restart (or a crash) counting resumes at the reserved mark:
    the unused rest of the last block is skipped, never reused.  When the file cannot be read or
    written the store logs why and counts on in memory: ids stay unique while the daemon runs, and
    ``track_uid`` stays unique in any case.
    """

    def __init__(self, path: str | Path, block: int = 1000) -> None:
        self.path = Path(path)
        self.block = max(1, int(block))
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = self._load()
        self._next: dict[str, int] = dict(self._reserved)

    def _load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            marks = data["next"]
            if not isinstance(marks, dict) or not all(isinstance(v, int) and v >= 1 for v in marks.values()):
                raise ValueError("'next' must map source names to ids >= 1")
            return {str(k): int(v) for k, v in marks.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s: cannot read the track id counters (%s); track ids start at 1 again. "
                      "Delete the file to silence this; track_uid stays unique.", self.path, exc)
            return {}

    def next_id(self, source: str) -> int:
        """The next track id for ``source`` (reserving a new block on disk when needed)."""
        with self._lock:
            tid = self._next.get(source, 1)
            self._next[source] = tid + 1
            if tid >= self._reserved.get(source, 1):
                self._reserved[source] = tid + self.block
                self._save()
            return tid

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "next": self._reserved}, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("%s: cannot save the track id counters (%s); ids stay unique until the daemon "
                      "restarts. Check the state dir's disk space and permissions.", self.path, exc)


class _MemoryIds:
    """Ids from 1 per source, for a tracker without a state dir (tests, benchmarks)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def next_id(self, source: str) -> int:
        tid = self._next.get(source, 1)
        self._next[source] = tid + 1
        return tid


@dataclass
class _Best:
    record_id: str
    frame_index: int
    box: list[float]
    score: float
    ts: float


@dataclass
class _Track:
    key: int  # internal, also for tentative tracks
    class_id: int
    label: str
    box: np.ndarray  # last measured box (x1 y1 x2 y2)
    first_ts: float
    last_ts: float
    best: _Best
    last_record_id: str
    last_frame_index: int
    missed: bool = False  # not matched in the latest frame
    hits: int = 1
    score_sum: float = 0.0
    score_max: float = 0.0
    track_id: int | None = None  # public id, set on confirmation
    uid: str = ""
    last_event_ts: float = 0.0
    events_sent: int = 0


class Tracker:
    """Tracks one source's detections across frames; see the module doc."""

    def __init__(self, source: str, cfg: TrackingConfig, ids: TrackIdStore | None = None) -> None:
        self.source = source
        self.cfg = cfg
        self._ids: TrackIdStore | _MemoryIds = ids if ids is not None else _MemoryIds()
        self._tracks: list[_Track] = []
        # Kalman state of self._tracks, row by row (arrays, so predict and correct are batched):
        # cx cy w h and their velocities per second, and the 8 x 8 covariances
        self._mean = np.zeros((0, 8))
        self._cov = np.zeros((0, 8, 8))
        self._next_key = 1
        self._run = uuid.uuid4().hex  # makes track uids unique across daemon restarts
        self._last_ts: float | None = None

    @property
    def confirmed(self) -> int:
        """Confirmed tracks currently alive."""
        return sum(1 for t in self._tracks if t.track_id is not None)

    def uids(self) -> dict[int, str]:
        """track id -> track uid of the confirmed tracks alive now (for the zone counter's events)."""
        return {t.track_id: t.uid for t in self._tracks if t.track_id is not None}

    def predicted_boxes(self) -> list[tuple[int | None, list[float]]]:
        """(track id, box the filter expects at the latest frame) of every live track; for tests and tools."""
        return [(t.track_id, _round_box(_cxcywh_to_xyxy(m[:4]))) for t, m in zip(self._tracks, self._mean, strict=True)]

    def update(
        self, detections: Sequence[Detection], ts: float, record_id: str, frame_index: int
    ) -> tuple[list[int | None], list[dict[str, Any]]]:
        """Match one frame's detections; returns each detection's track id (None if unconfirmed) and the events."""
        cfg = self.cfg
        if self._last_ts is not None and ts < self._last_ts:
            ts = self._last_ts  # a clock step backwards must not make tracks younger
        dt = 0.0 if self._last_ts is None else min(ts - self._last_ts, MAX_DT)
        self._last_ts = ts
        events: list[dict[str, Any]] = []
        n = len(detections)
        ids: list[int | None] = [None] * n
        boxes = np.array([d.box for d in detections], dtype=np.float64).reshape(n, 4)
        scores = np.array([float(d.score) for d in detections], dtype=np.float64)
        classes = np.array([int(d.class_id) for d in detections], dtype=np.int64)

        tracks = self._tracks
        self._predict(dt)
        predicted = _cxcywh_to_xyxy(self._mean[:, :4])
        track_classes = np.array([t.class_id for t in tracks], dtype=np.int64)
        iou = iou_matrix(boxes, predicted)
        iou[classes[:, None] != track_classes[None, :]] = 0.0  # never match across classes

        high = [i for i in range(n) if scores[i] >= cfg.high_score]
        low = [i for i in range(n) if cfg.low_score <= scores[i] < cfg.high_score]
        confirmed = [i for i, t in enumerate(tracks) if t.track_id is not None]
        tentative = [i for i, t in enumerate(tracks) if t.track_id is None]
        matched: dict[int, int] = {}  # detection index -> track index

        # strong detections are matched on IoU x score (ByteTrack's score fusion): a confident detection may
        # overlap its track less than a doubtful one must
        fused = iou * scores[:, None] if cfg.fuse_score else iou

        def stage(dets: list[int], pool: list[int], threshold: float, sim: np.ndarray = iou) -> None:
            if not dets or not pool:
                return
            for r, c in optimal_match(sim[np.ix_(dets, pool)], threshold):
                matched[dets[r]] = pool[c]

        # 1: strong detections against confirmed tracks, lost ones (the track buffer) included
        stage(high, confirmed, cfg.iou, fused)
        taken = set(matched.values())
        # 2: weak detections keep tracks alive that were seen in the last frame
        stage(low, [i for i in confirmed if i not in taken and not tracks[i].missed], cfg.low_iou)
        # 3: the remaining strong detections against tentative tracks
        stage([d for d in high if d not in matched], tentative, cfg.iou, fused)

        if matched:
            det_idx = list(matched)
            self._correct([matched[d] for d in det_idx], boxes[det_idx])
        for d, ti in matched.items():
            track = tracks[ti]
            self._observe(track, boxes[d], float(scores[d]), ts, record_id, frame_index)
            if track.track_id is None and track.hits >= cfg.min_hits:
                self._confirm(track)
                events.append(self._event("new", track, ts))
            elif track.track_id is not None and ts - track.last_event_ts >= cfg.update_interval:
                events.append(self._event("update", track, ts))
            ids[d] = track.track_id

        # unmatched tracks: tentative ones vanish silently, confirmed ones end after max_age unseen
        matched_tracks = set(matched.values())
        keep = np.ones(len(tracks), dtype=bool)
        for i, track in enumerate(tracks):
            if i not in matched_tracks:
                track.missed = True
                if track.track_id is None:
                    keep[i] = False
                elif ts - track.last_ts > cfg.max_age:
                    events.append(self._event("end", track, ts, reason="lost"))
                    keep[i] = False
        # a lost track whose predicted box lies on a track that was started after it was lost is the same
        # object under a second id (it reappeared where the filter did not expect it): it would take that
        # object's detection back later, a second id switch, so it ends now.  (A person hidden behind
        # another is not a duplicate: the one in front was tracked before the hidden one was lost.)
        lost = [i for i in range(len(tracks)) if keep[i] and i not in matched_tracks]
        if lost and matched_tracks:
            now = _cxcywh_to_xyxy(self._mean[:, :4])
            active = sorted(matched_tracks)
            overlap = iou_matrix(now[lost], now[active])
            born = np.array([tracks[j].first_ts for j in active])
            for k, i in enumerate(lost):
                if np.any((overlap[k] > DUPLICATE_IOU) & (born > tracks[i].last_ts)):
                    events.append(self._event("end", tracks[i], ts, reason="lost"))
                    keep[i] = False
        if not keep.all():
            self._tracks = [t for t, k in zip(tracks, keep, strict=True) if k]
            self._mean, self._cov = self._mean[keep], self._cov[keep]

        # unmatched strong detections start tracks
        new = [d for d in high if d not in matched and scores[d] >= cfg.new_track_score]
        if new:
            self._start([detections[d] for d in new], boxes[new], scores[new], ts, record_id, frame_index)
            for d, track in zip(new, self._tracks[-len(new):], strict=True):
                if cfg.min_hits <= 1:
                    self._confirm(track)
                    events.append(self._event("new", track, ts))
                ids[d] = track.track_id
        return ids, events

    def finish(self, ts: float | None = None) -> list[dict[str, Any]]:
        """The source stopped (finished, offline, reconnecting, shutdown): end every confirmed track.

        ``ts`` defaults to the last frame's time: the tracker runs on the frames' clock, which for a
        file is its media time, so "now" would put the end hours or years after the last frame.
        """
        if ts is None:
            ts = self._last_ts if self._last_ts is not None else max((t.last_ts for t in self._tracks), default=0.0)
        events = [self._event("end", t, ts, reason="finished") for t in self._tracks if t.track_id is not None]
        self._tracks = []
        self._mean, self._cov = np.zeros((0, 8)), np.zeros((0, 8, 8))
        self._last_ts = None
        return events

    # ------------------------------------------------------------------ internals

    def _predict(self, dt: float) -> None:
        """Move every track's state ``dt`` seconds ahead (all tracks share the frame clock)."""
        if not self._tracks or dt <= 0:
            return
        mean, cov = self._mean, self._cov
        missed = np.fromiter((t.missed for t in self._tracks), dtype=bool, count=len(self._tracks))
        mean[missed, 6:8] = 0.0  # a lost box keeps moving but stops growing or shrinking (as ByteTrack)
        mean[:, :4] += mean[:, 4:] * dt
        # F P F^T for F = [[I, dt I], [0, I]], written out per 4 x 4 block
        p11, p12, p21, p22 = cov[:, :4, :4], cov[:, :4, 4:], cov[:, 4:, :4], cov[:, 4:, 4:]
        top_left = p11 + dt * (p12 + p21) + dt * dt * p22
        top_right = p12 + dt * p22
        cov[:, :4, :4] = top_left
        cov[:, :4, 4:] = top_right
        cov[:, 4:, :4] = top_right.transpose(0, 2, 1)
        wh = np.maximum(mean[:, 2:4], 1.0)
        mean[:, 2:4] = wh
        q_pos = _size_std(wh, _STD_POS) ** 2 * _REF_FPS
        q_vel = _size_std(wh, _STD_VEL * _REF_FPS) ** 2 * _REF_FPS
        diag = np.arange(8)
        cov[:, diag, diag] += np.concatenate([q_pos, q_vel], axis=1) * dt

    def _correct(self, track_idx: list[int], boxes: np.ndarray) -> None:
        """Kalman update of the matched tracks with their detections (batched)."""
        idx = np.asarray(track_idx, dtype=np.int64)
        mean, cov = self._mean[idx], self._cov[idx]
        z = _xyxy_to_cxcywh(boxes)
        r = _size_std(np.maximum(mean[:, 2:4], 1.0), _STD_POS) ** 2
        s = cov[:, :4, :4] + np.eye(4)[None] * r[:, :, None]
        gain = np.linalg.solve(s, cov[:, :4, :]).transpose(0, 2, 1)  # P H^T S^-1 (S and P symmetric)
        mean = mean + np.einsum("kij,kj->ki", gain, z - mean[:, :4])
        cov = cov - gain @ cov[:, :4, :]
        mean[:, 2:4] = np.maximum(mean[:, 2:4], 1.0)
        self._mean[idx], self._cov[idx] = mean, cov

    def _start(self, dets: list[Detection], boxes: np.ndarray, scores: np.ndarray, ts: float, record_id: str,
               frame_index: int) -> None:
        """Tentative tracks for unmatched strong detections, appended to the tracks and their state."""
        z = _xyxy_to_cxcywh(boxes)
        std = np.concatenate([_size_std(z[:, 2:4], 2 * _STD_POS), _size_std(z[:, 2:4], 10 * _STD_VEL * _REF_FPS)], axis=1)
        cov = np.zeros((len(dets), 8, 8))
        cov[:, np.arange(8), np.arange(8)] = std**2
        self._mean = np.concatenate([self._mean, np.concatenate([z, np.zeros_like(z)], axis=1)])
        self._cov = np.concatenate([self._cov, cov])
        for det, box, score in zip(dets, boxes, scores, strict=True):
            score = float(score)
            self._tracks.append(_Track(
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
            ))
            self._next_key += 1

    def _observe(self, track: _Track, box: np.ndarray, score: float, ts: float, record_id: str, frame_index: int) -> None:
        track.box = box.copy()
        track.last_ts = ts
        track.missed = False
        track.hits += 1
        track.score_sum += score
        track.score_max = max(track.score_max, score)
        track.last_record_id = record_id
        track.last_frame_index = frame_index
        if score > track.best.score:
            track.best = _Best(record_id, frame_index, _round_box(box), round(score, 5), ts)

    def _confirm(self, track: _Track) -> None:
        track.track_id = self._ids.next_id(self.source)
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

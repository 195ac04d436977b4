"""Capture policies: which labeled frames enter the dataset, and which of those a person must review.

Every frame is labeled and published; the dataset keeps only what a policy selects, because a
camera at 30 fps would fill any disk in days with near-identical frames.  The dataset sink asks
:class:`CaptureSelector` once per frame, on the pipeline's sink thread, before it stores any
pixel.  The evaluation is a handful of comparisons per detection and an O(1) rate-limit check, so
it costs microseconds on the per-frame path and needs no I/O.

One policy (:class:`edge.config.CaptureConfig`) per source, applied in this order:

1. **Filters** -- ``classes`` (only detections of these classes count; empty = all), then
   ``zones`` (per-source policies: only detections whose point lies in one of these zones of the source
   count, see docs/tracking.md), then ``min_detections``/``max_detections`` on the number of counted
   detections.  With a class or zone list, a frame needs at least one counted detection.  A frame that fails a filter is not captured.
2. **Triggers** (any one selects the frame) -- ``every_n`` (the 1st, N+1-th, ... frame *that passed
   the filters*), ``random`` (that percentage of filtered frames, from a seeded generator when
   ``seed`` is set), ``near_threshold`` (a counted detection scored in ``[low, high)``) and
   ``new_tracks`` (a counted detection carries a track id seen for the first time).  A policy with
   no trigger selects every filtered frame.
3. **Rate limits** -- ``rate.per_minute/per_hour/per_day``: at most that many captured frames in
   any sliding window of that length, on the records' capture clock (``captured_ts``: capture time for
   live sources, media time for video files, file time for images -- see ``edge/frame.py``).  A selected
   frame over a limit is dropped (counted as ``limited``).

Review state: a captured frame is ``needs_review`` when ``review`` is ``all``, or when it is
``uncertain`` (the default) and a counted detection lies in the ``near_threshold`` band; otherwise
``auto_accepted``.  Its *uncertainty* orders the review queue: 1 for a score at the band's centre
(0.5 without a band), falling linearly to 0 at the band's edges.

New tracks come from the records, not from ``Sink.events``: the tracker announces a track (event
``new``) in the very frame in which its id first appears in a record, and ids count up per source,
so "an id above the highest seen so far" is that event -- known in ``prepare``, before the MQTT
sink publishes the record, which must already name the stored frame.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from edgelabel.edge.config import BandConfig, CaptureConfig, CaptureSection, RateConfig, ZoneConfig
from edgelabel.edge.records import DetectionRecord, LabelRecord

log = logging.getLogger(__name__)

AUTO_ACCEPTED = "auto_accepted"
NEEDS_REVIEW = "needs_review"
#: rate-limit windows: (seconds, RateConfig field)
WINDOWS = ((60.0, "per_minute"), (3600.0, "per_hour"), (86400.0, "per_day"))
#: the counters every policy keeps (fixed keys: status() copies them from another thread)
COUNTERS = ("frames", "filtered_out", "selected", "limited", "captured", "needs_review")


@dataclass(frozen=True)
class CaptureDecision:
    """What the policy decided for one frame."""

    capture: bool
    state: str = AUTO_ACCEPTED
    uncertainty: float = 0.0
    reasons: tuple[str, ...] = ()  # the triggers that fired: all, every_n, random, near_threshold, new_track
    limited: bool = False  # selected, but a rate limit refused it


SKIP = CaptureDecision(False)


def uncertainty(score: float, band: BandConfig | None) -> float:
    """1 at the band's centre (0.5 without a band), 0 at and beyond its edges: how much a person should look."""
    if band is None:
        return max(0.0, 1.0 - abs(2.0 * score - 1.0))
    half = (band.high - band.low) / 2.0
    return max(0.0, 1.0 - abs(score - (band.low + half)) / half) if half > 0 else 0.0


class RateLimiter:
    """At most N events in any sliding window per configured span (minute, hour, day).

    One deque of accepted timestamps per window, trimmed as time passes: O(1) amortised per
    call, memory bounded by the limits (a per_day of 2000 keeps at most 2000 floats).
    """

    def __init__(self, cfg: RateConfig) -> None:
        self._windows: list[tuple[float, int, deque[float]]] = [
            (span, limit, deque()) for span, name in WINDOWS if (limit := int(getattr(cfg, name))) > 0
        ]
        self._last = -math.inf

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return bool(self._windows)

    def allow(self, ts: float) -> bool:
        """Take one slot at time ``ts`` if every window has room (a clock that steps back counts as now)."""
        if not self._windows:
            return True
        ts = max(ts, self._last)
        for span, limit, q in self._windows:
            while q and q[0] <= ts - span:
                q.popleft()
            if len(q) >= limit:
                return False
        for _, _, q in self._windows:
            q.append(ts)
        self._last = ts
        return True


def describe(cfg: CaptureConfig) -> str:
    """One line for the log: what this policy keeps."""
    if not cfg.enabled:
        return "nothing (capture disabled)"
    parts: list[str] = []
    if cfg.every_n:
        parts.append("every frame" if cfg.every_n == 1 else f"every {_ordinal(cfg.every_n)} frame")
    if cfg.random:
        parts.append(f"{cfg.random:g}% at random")
    if cfg.near_threshold is not None:
        parts.append(f"scores in [{cfg.near_threshold.low:g}, {cfg.near_threshold.high:g})")
    if cfg.new_tracks:
        parts.append("new tracks")
    text = " or ".join(parts) if parts else "every frame"
    filters = []
    if cfg.classes:
        filters.append("classes " + ",".join(cfg.classes))
    if cfg.min_detections:
        filters.append(f">= {cfg.min_detections} detections")
    if cfg.max_detections is not None:
        filters.append(f"<= {cfg.max_detections} detections")
    if filters:
        text += " with " + ", ".join(filters)
    limits = [f"<= {getattr(cfg.rate, name)}/{name[4:]}" for _, name in WINDOWS if getattr(cfg.rate, name)]
    if limits:
        text += " (" + ", ".join(limits) + ")"
    return f"{text}; review: {cfg.review}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class CapturePolicy:
    """One source's policy with its state (frame counter, random generator, rate windows, highest track id)."""

    def __init__(self, cfg: CaptureConfig, source: str = "", zones: dict[str, ZoneConfig] | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self._classes = frozenset(cfg.classes)
        # the source's zones named by ``cfg.zones`` (the config check makes sure they exist)
        self._zones = [(zones or {})[z] for z in cfg.zones if z in (zones or {})]
        self._band = cfg.near_threshold
        self._any_trigger = cfg.every_n > 0 or cfg.random > 0 or cfg.near_threshold is not None or cfg.new_tracks
        self._rng = random.Random(f"{cfg.seed}\x1f{source}") if cfg.seed is not None else random.Random()
        self._limiter = RateLimiter(cfg.rate)
        self._filtered = 0  # frames that passed the filters so far (every_n counts these)
        self._max_track = 0  # highest track id seen in this source's records
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def decide(self, record: LabelRecord) -> CaptureDecision:
        """Capture this frame or not, and in which review state."""
        cfg, counts = self.cfg, self.counts
        counts["frames"] += 1
        dets = record.detections
        counted = [d for d in dets if d.label in self._classes] if self._classes else dets
        if self._zones:
            counted = [d for d in counted if self._in_zone(d, record.width, record.height)]
        new_track = False
        highest = self._max_track
        for d in dets:  # every class: ids are allocated across classes, in the order they first appear
            if d.track_id is not None and d.track_id > self._max_track:
                highest = max(highest, d.track_id)
                if not self._classes or d.label in self._classes:
                    new_track = True
        self._max_track = highest
        if not cfg.enabled:
            return SKIP
        n = len(counted)
        too_many = cfg.max_detections is not None and n > cfg.max_detections
        if ((self._classes or self._zones) and n == 0) or n < cfg.min_detections or too_many:
            counts["filtered_out"] += 1
            return SKIP
        position = self._filtered
        self._filtered += 1
        band = self._band
        in_band = band is not None and any(band.low <= d.score < band.high for d in counted)
        reasons: list[str] = []
        if not self._any_trigger:
            reasons.append("all")
        else:
            if cfg.every_n and position % cfg.every_n == 0:
                reasons.append("every_n")
            if cfg.random and self._rng.random() * 100.0 < cfg.random:  # drawn for every filtered frame: reproducible
                reasons.append("random")
            if in_band:
                reasons.append("near_threshold")
            if cfg.new_tracks and new_track:
                reasons.append("new_track")
        if not reasons:
            return SKIP
        counts["selected"] += 1
        if not self._limiter.allow(record.captured_ts):
            counts["limited"] += 1
            return CaptureDecision(False, reasons=tuple(reasons), limited=True)
        needs = cfg.review == "all" or (cfg.review == "uncertain" and in_band)
        counts["captured"] += 1
        if needs:
            counts["needs_review"] += 1
        return CaptureDecision(
            True,
            NEEDS_REVIEW if needs else AUTO_ACCEPTED,
            round(max((uncertainty(d.score, band) for d in counted), default=0.0), 6),
            tuple(reasons),
        )


    def _in_zone(self, det: DetectionRecord, width: int, height: int) -> bool:
        """The detection's point lies in one of the policy's zones (that counts its class)."""
        from edgelabel.edge.zones import inside_zone

        return any(inside_zone(z, det.label, det.box, width, height) for z in self._zones)


class CaptureSelector:
    """The policies of every source: ``sources.<name>`` if configured, else ``live`` or ``storage``."""

    def __init__(self, section: CaptureSection, zones: dict[str, dict[str, ZoneConfig]] | None = None) -> None:
        self.section = section
        self.zones = zones or {}  # source -> its zones, for policies that name some
        self._policies: dict[str, CapturePolicy] = {}
        self._lock = threading.Lock()  # status() reads from other threads while the sink thread adds sources

    def policy(self, source: str, live: bool) -> CapturePolicy:
        """The source's policy, created (and logged) on its first frame."""
        policy = self._policies.get(source)
        if policy is None:
            cfg = self.section.sources.get(source)
            which = f"dataset.capture.sources.{source}"
            if cfg is None:
                cfg = self.section.live if live else self.section.storage
                which = "dataset.capture.live" if live else "dataset.capture.storage"
            policy = CapturePolicy(cfg, source, self.zones.get(source))
            with self._lock:
                self._policies[source] = policy
            log.info("dataset: %s keeps %s (%s)", source, describe(cfg), which)
        return policy

    def decide(self, record: LabelRecord, live: bool) -> CaptureDecision:
        """The decision for one record of a live or storage source."""
        return self.policy(record.source, live).decide(record)

    def status(self) -> dict[str, Any]:
        """Per-source counters: frames, filtered_out, selected, limited, captured, needs_review."""
        with self._lock:
            policies = list(self._policies.items())
        return {name: dict(p.counts) for name, p in policies}

"""The web page's view of the pipeline: a Sink that keeps recent records and live frames.

Why a sink: the sink worker already hands every record and its frame to each
sink, in order, so the web page needs no hook inside the pipeline.  It must
never slow that worker down, whatever the viewers do:

* ``write`` only stores references under a lock (no copy, no drawing, no
  encoding) and wakes the encoder thread;
* the encoder thread (started by ``open``) draws boxes, scales to
  ``web.stream_width`` and JPEG-encodes the newest frame of a source at most
  ``web.stream_fps`` times a second; live views and thumbnails only ever read
  that one shared JPEG, so ten viewers cost what one costs;
* the last ``web.recent_records`` records are kept in a ring with a small raw
  JPEG of their frame (for the labels page), encoded as far as the encoder
  keeps up.  Frames waiting for it are bounded (``_MAX_PENDING``): what it
  cannot keep up with is skipped and counted, never queued without bound.
  Records whose pixels the dataset stored (``frame_path``) need no copy here.

It also counts what ``/metrics`` reports about records (per-source frames,
detections per class, an inference latency histogram), so those numbers come
from the records themselves rather than from another hook in the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edgelabel.edge.annotate import draw_detections, draw_zones, encode_jpeg
from edgelabel.edge.config import Config
from edgelabel.edge.frame import Frame
from edgelabel.edge.records import DetectionRecord, LabelRecord
from edgelabel.edge.sinks.base import Sink

log = logging.getLogger("edgelabel.web")

#: frames (full size) that may wait for the encoder to make their labels-page copy
_MAX_PENDING = 8
#: JPEG quality of live views and thumbnails / of kept frames
STREAM_QUALITY = 75
KEPT_QUALITY = 85
#: the window over which the output rate of a source is measured
_RATE_WINDOW = 5.0
#: inference latency histogram bucket bounds, milliseconds (Jetson int8 to CPU fp32)
LATENCY_BUCKETS_MS: tuple[float, ...] = (2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500)


@dataclass
class KeptRecord:
    """A recent record as the web page keeps it: the record, when it came, and its frame copy."""

    record: LabelRecord
    received_at: float
    jpeg: bytes | None = None  # raw pixels (no boxes), at most web.stream_width wide
    scale: float = 1.0  # jpeg width / frame width
    pending: bool = False  # waiting for the encoder to make ``jpeg``


@dataclass
class _SourceView:
    """Everything the web page knows about one source from the records it has seen."""

    pending: tuple[LabelRecord, np.ndarray] | None = None  # newest frame not yet encoded for viewers
    jpeg: bytes | None = None  # newest annotated frame, shared by every viewer
    seq: int = 0  # bumps with every new jpeg
    encoded_mono: float = -1e9  # monotonic time of the last encode (rate limit)
    frame_at: float | None = None  # capture time of the frame in ``jpeg``
    records: int = 0
    detections: int = 0
    last_record_at: float | None = None
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=128))  # monotonic


@dataclass
class LatencyHistogram:
    """Cumulative counts of inference times, kept here so that /metrics needs no hook elsewhere."""

    bounds_ms: tuple[float, ...] = LATENCY_BUCKETS_MS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    total: int = 0
    sum_ms: float = 0.0

    def observe(self, ms: float) -> None:
        """Count one inference time."""
        i = 0
        while i < len(self.bounds_ms) and ms > self.bounds_ms[i]:
            i += 1
        self.counts[i] += 1
        self.total += 1
        self.sum_ms += ms

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound ms, count <= bound)`` pairs, the last bound being +inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds_ms, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class WebCounters:
    """A consistent copy of the sink's counters for /metrics."""

    frames: dict[str, int]
    detections: dict[tuple[str, str], int]
    latency: LatencyHistogram
    not_kept: int
    encoded: int


def scale_detections(detections: list[DetectionRecord], scale: float) -> list[DetectionRecord]:
    """The detections with boxes in the pixels of an image scaled by ``scale``."""
    if scale == 1.0:
        return list(detections)
    return [dataclasses.replace(d, box=[v * scale for v in d.box]) for d in detections]


def shrink(image: np.ndarray, max_width: int) -> tuple[np.ndarray, float]:
    """The image at most ``max_width`` wide (a new array), and the scale applied."""
    h, w = image.shape[:2]
    if max_width and w > max_width:
        scale = max_width / w
        small = cv2.resize(image, (max_width, max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        return small, scale
    return image.copy(), 1.0


class WebSink(Sink):
    """Collects what the web page shows; create it before the Pipeline and pass it in ``extra_sinks``."""

    name = "web"

    def __init__(self, cfg: Config) -> None:
        self.stream_fps = float(cfg.web.stream_fps)
        self.width = int(cfg.web.stream_width)
        self.capacity = int(cfg.web.recent_records)
        # zones and lines per source, drawn on the live view (and so on the dashboard's thumbnails)
        self._shapes = {n: (s.zones, s.lines) for n, s in cfg.sources.items() if s.zones or s.lines}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the encoder waits here
        self._frames = threading.Condition(self._lock)  # live viewers wait here
        self._ring: OrderedDict[str, KeptRecord] = OrderedDict()
        self._to_keep: deque[tuple[str, np.ndarray]] = deque()
        self._sources: dict[str, _SourceView] = {}
        self._status: dict[str, tuple[str, float]] = {}
        self._classes: Counter[str] = Counter()
        self._detections: Counter[tuple[str, str]] = Counter()
        self._latency = LatencyHistogram()
        self._last_inference_ms: float | None = None
        self._not_kept = 0
        self._encoded = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ Sink interface (sink worker thread)

    def open(self) -> None:
        """Start the encoder thread (idempotent)."""
        with self._lock:
            self._closed = False
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._encode_loop, name="web-encoder", daemon=True)
            self._thread.start()

    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Keep references only (the pipeline's hot path): the encoder does the work later."""
        now_mono = time.monotonic()
        with self._lock:
            view = self._sources.get(record.source)
            if view is None:
                view = self._sources[record.source] = _SourceView()
            view.pending = (record, frame.image)
            view.records += 1
            view.detections += len(record.detections)
            view.last_record_at = time.time()
            view.arrivals.append(now_mono)
            for d in record.detections:
                self._classes[d.label] += 1
                self._detections[(record.source, d.label)] += 1
            self._latency.observe(record.inference_ms)
            self._last_inference_ms = record.inference_ms
            kept = self._ring[record.id] = KeptRecord(record, time.time())
            self._ring.move_to_end(record.id)
            while len(self._ring) > self.capacity:
                self._ring.popitem(last=False)
            if not record.frame_path:  # the dataset did not store the pixels: keep a small copy
                if len(self._to_keep) >= _MAX_PENDING:
                    dropped, _ = self._to_keep.popleft()
                    self._not_kept += 1
                    if dropped in self._ring:
                        self._ring[dropped].pending = False
                self._to_keep.append((record.id, frame.image))
                kept.pending = True
            self._work.notify()

    def source_status(self, source: str, status: str) -> None:
        """Remember when each source last changed state (shown on its card)."""
        with self._lock:
            self._status[source] = (status, time.time())

    def close(self) -> None:
        """Stop the encoder and release live viewers; what was kept stays readable."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._frames.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def status(self) -> dict[str, Any]:
        """Counters of the web sink itself (in the pipeline's status snapshot)."""
        with self._lock:
            return {
                "records_kept": len(self._ring),
                "frames_encoded": self._encoded,
                "frames_not_kept": self._not_kept,
            }

    # ------------------------------------------------------------------ encoder thread

    def _due_stream_locked(self, now: float) -> tuple[str, tuple[LabelRecord, np.ndarray]] | None:
        interval = 1.0 / self.stream_fps
        for name, view in self._sources.items():
            if view.pending is not None and now - view.encoded_mono >= interval:
                job = view.pending
                view.pending = None
                view.encoded_mono = now
                return name, job
        return None

    def _next_wait_locked(self, now: float) -> float | None:
        interval = 1.0 / self.stream_fps
        waits = [view.encoded_mono + interval - now for view in self._sources.values() if view.pending is not None]
        return max(0.001, min(waits)) if waits else None

    def _encode_loop(self) -> None:
        """Serve live views first (rate limited), then kept-frame copies, until closed."""
        while True:
            stream_job = keep_job = None
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    stream_job = self._due_stream_locked(now)
                    if stream_job is None and self._to_keep:
                        keep_job = self._to_keep.popleft()
                    if stream_job is not None or keep_job is not None:
                        break
                    self._work.wait(self._next_wait_locked(now))
                if self._closed:
                    return
            try:
                if stream_job is not None:
                    self._encode_stream(*stream_job)
                elif keep_job is not None:
                    self._encode_kept(*keep_job)
            except Exception:  # a bad frame must not end live views
                log.exception("web: encoding a frame failed")

    def _encode_stream(self, source: str, job: tuple[LabelRecord, np.ndarray]) -> None:
        record, image = job
        small, scale = shrink(image, self.width)
        raw: bytes | None = None
        with self._lock:
            kept = self._ring.get(record.id)
            wants_raw = kept is not None and kept.jpeg is None and not record.frame_path
        if wants_raw:
            raw = encode_jpeg(small, KEPT_QUALITY)
        annotated = draw_detections(small, scale_detections(record.detections, scale), copy=False)
        if source in self._shapes:
            draw_zones(annotated, *self._shapes[source], scale=scale)
        jpeg = encode_jpeg(annotated, STREAM_QUALITY)
        with self._lock:
            view = self._sources[source]
            view.jpeg = jpeg
            view.seq += 1
            view.frame_at = record.captured_ts
            self._encoded += 1
            if raw is not None and kept is not None:
                kept.jpeg, kept.scale, kept.pending = raw, scale, False
            self._frames.notify_all()

    def _encode_kept(self, rid: str, image: np.ndarray) -> None:
        with self._lock:
            kept = self._ring.get(rid)
            if kept is None or kept.jpeg is not None:
                return  # evicted meanwhile, or the live view already made the copy
        small, scale = shrink(image, self.width)
        jpeg = encode_jpeg(small, KEPT_QUALITY)
        with self._lock:
            kept.jpeg, kept.scale, kept.pending = jpeg, scale, False
            self._encoded += 1
            self._frames.notify_all()

    # ------------------------------------------------------------------ readers (web threads)

    def latest_jpeg(self, source: str) -> tuple[int, bytes | None]:
        """The newest annotated JPEG of a source and its sequence number (0, None before any)."""
        with self._lock:
            view = self._sources.get(source)
            return (view.seq, view.jpeg) if view else (0, None)

    def wait_jpeg(self, source: str, after: int, timeout: float,
                  cancel: threading.Event | None = None) -> tuple[int, bytes | None]:
        """Block until the source has a JPEG newer than ``after`` (or timeout / close / ``cancel``); the newest.

        ``cancel`` is looked at under the lock that ``wake_viewers`` takes, so a viewer that starts waiting just
        after the web server began to stop does not sleep through its wake-up (a stop then took 5 s).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed and not (cancel is not None and cancel.is_set()):
                view = self._sources.get(source)
                if view is not None and view.seq > after and view.jpeg is not None:
                    return view.seq, view.jpeg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._frames.wait(remaining)
            view = self._sources.get(source)
            return (view.seq, view.jpeg) if view else (0, None)

    def wake_viewers(self) -> None:
        """Let every waiting viewer look again (the web server is stopping)."""
        with self._lock:
            self._frames.notify_all()

    def source_view(self, source: str) -> dict[str, Any]:
        """What the records say about one source: output rate, counts, the newest snapshot."""
        now = time.monotonic()
        with self._lock:
            view = self._sources.get(source)
            status = self._status.get(source)
            if view is None:
                return {"fps_out": 0.0, "records": 0, "detections": 0, "last_record_at": None,
                        "snapshot_seq": 0, "snapshot_at": None,
                        "status_since": status[1] if status else None}
            recent = [t for t in view.arrivals if now - t <= _RATE_WINDOW]
            fps = 0.0
            if len(recent) >= 2 and recent[-1] > recent[0]:
                fps = (len(recent) - 1) / (recent[-1] - recent[0])
                if now - recent[-1] > max(2.0, 3.0 / fps):  # stalled (paused, finished): 0, not the last rate
                    fps = 0.0
            return {
                "fps_out": round(fps, 2),
                "records": view.records,
                "detections": view.detections,
                "last_record_at": view.last_record_at,
                "snapshot_seq": view.seq if view.jpeg is not None else 0,
                "snapshot_at": view.frame_at,
                "status_since": status[1] if status else None,
            }

    def recent(self, source: str | None = None, label: str | None = None, before: str | None = None) -> list[KeptRecord]:
        """Kept records, newest first, optionally only one source's and/or with one class.

        ``before``: only records older than the kept record with this id (a cursor that stays put while new
        records arrive); KeyError when that record has left the ring.
        """
        with self._lock:
            items = list(self._ring.values())
            if before is not None:
                if before not in self._ring:
                    raise KeyError(before)
                items = items[:list(self._ring).index(before)]
        items.reverse()
        if source:
            items = [k for k in items if k.record.source == source]
        if label:
            if label.isdigit():
                cid = int(label)
                items = [k for k in items if any(d.class_id == cid for d in k.record.detections)]
            else:
                items = [k for k in items if any(d.label == label for d in k.record.detections)]
        return items

    def get(self, record_id: str, wait: float = 0.0) -> KeptRecord | None:
        """One kept record by id (None once it left the ring).

        ``wait``: when its frame copy is still being made, wait up to that long for it (a page that links to
        the newest record asks for its frame at once).
        """
        deadline = time.monotonic() + wait
        with self._lock:
            kept = self._ring.get(record_id)
            while kept is not None and kept.pending and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._frames.wait(remaining)
            return kept

    def classes(self) -> list[str]:
        """Every class seen so far, most frequent first."""
        with self._lock:
            return [c for c, _ in self._classes.most_common()]

    def last_inference_ms(self) -> float | None:
        """The inference time of the newest record."""
        with self._lock:
            return self._last_inference_ms

    def counters(self) -> WebCounters:
        """A consistent copy of the counters for /metrics."""
        with self._lock:
            return WebCounters(
                frames={n: v.records for n, v in self._sources.items()},
                detections=dict(self._detections),
                latency=dataclasses.replace(self._latency, counts=list(self._latency.counts)),
                not_kept=self._not_kept,
                encoded=self._encoded,
            )

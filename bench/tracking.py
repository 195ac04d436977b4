"""Tracking benchmark: MOT metrics on MOT17-09 with simulated detections, fragments on real detections, cost.

One command, every tracker side by side on identical detections::

    pip install -e .[bench]          # motmetrics, supervision (ByteTrack)
    python bench/tracking.py         # about a minute on 2 cores (the detector pass is cached)
    python bench/tracking.py --write # and put the tables into BENCHMARKS.md's "Tracking" section
    python bench/tracking.py --quick # 150 frames, one noise level and seed, no videos (seconds)
    python bench/tracking.py --daemon  # also the videos through the real pipeline (its clock and tracker)

Trackers: ``edgelabel`` (``edge.tracking.Tracker``, default ``tracking:`` settings), ``greedy (before)``
(the tracker edgelabel shipped before, ``bench/greedy_tracker.py``, with the defaults it shipped with) and ``sv-bytetrack``
(supervision's ByteTrack, its defaults, ``frame_rate`` set to the sequence's).

1. **MOT17-09 with simulated detections.**  Ground truth: ``<mirror>/tracking/MOT17-09/gt.txt`` (MOT17
   annotations, CC BY-NC-SA 3.0; read for evaluation only, never copied into this repository), rows with
   consider flag 1, class 1 (pedestrian) and visibility >= :data:`VISIBILITY`.  Detections are the
   ground-truth boxes perturbed like a small detector would (:func:`perturb`, seeded): a box is dropped
   with probability ``drop + drop_hidden * (1 - visibility)``; its centre moves by a normal jitter of
   ``jitter`` times its width/height and its size by a factor ``1 + N(0, size_jitter)``; its score is
   ``0.3 + 0.6 * visibility + N(0, score_noise)`` (clipped to 0.05..0.99), so half-hidden people fall under
   some trackers' high-score thresholds; ``fp_per_frame`` false positives (Poisson) per frame, sized like
   random ground-truth boxes, anywhere in the image, scored uniformly in 0.1..0.6.  Metrics from
   py-motmetrics (boxes matched at IoU >= 0.5): IDF1, MOTA, ID switches, fragmentations, false positives
   and misses, each the mean over :data:`SEEDS` (one identity mistake on a long track moves IDF1 by
   points, so one seed is too noisy to rank trackers).
2. **Real detections.**  ``yolox_nano.onnx`` through edgelabel's own detector loading
   (``engines.detector.load_detector``, ONNX Runtime on the CPU, conf 0.25 as the daemon's default) on
   ``people-walking.mp4`` and ``one-by-one-person-detection.mp4``; person detections only, timestamps
   are media time (frame index / fps).  Per tracker: person tracks, and the fragment share: tracks that
   start 1 to 3 frames after another track's last box, at IoU > 0.5 with it (the same person under a new
   id), and the share of person detections that got a track id (a tracker that ignores weak detections
   makes fewer tracks and fewer fragments).  The detections are cached in the temp folder
   (``--no-cache`` to redo them).
3. **Cost.**  Tracker time per frame with 30 detections (30 jittering walkers, 300 frames).

The metric computation is checked on known cases in ``tests/test_tracking_bench.py``.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.greedy_tracker import GreedyTracker  # noqa: E402
from edgelabel.edge.config import TrackingConfig  # noqa: E402
from edgelabel.edge.tracking import Tracker, iou_matrix  # noqa: E402
from edgelabel.engines.base import Detection  # noqa: E402

MIRROR = Path(os.environ.get("EDGELABEL_MIRROR", ROOT.parent / "shared")).resolve()
MOT = MIRROR / "tracking" / "MOT17-09"
VIDEOS = ("people-walking.mp4", "one-by-one-person-detection.mp4")
MODEL = "yolox_nano.onnx"
#: ground-truth rows less visible than this are left out (neither truth nor a source of detections)
VISIBILITY = 0.2
#: each noise level is simulated with each of these seeds; the table shows the mean over them
SEEDS = (17, 18, 19, 20, 21)
SEED = SEEDS[0]
#: a box counts as found at IoU >= this (the MOTChallenge rule)
MATCH_IOU = 0.5

Box = tuple[float, float, float, float]  # x1 y1 x2 y2
Frames = dict[int, list[tuple[int, Box]]]  # frame -> [(id, box)]


@dataclass(frozen=True)
class Noise:
    """One simulated detector (see the module doc for how each number is used)."""

    name: str
    drop: float
    drop_hidden: float
    jitter: float
    size_jitter: float
    fp_per_frame: float
    score_noise: float


LEVELS = (
    Noise("low", drop=0.05, drop_hidden=0.3, jitter=0.02, size_jitter=0.03, fp_per_frame=0.3, score_noise=0.05),
    Noise("medium", drop=0.10, drop_hidden=0.5, jitter=0.04, size_jitter=0.06, fp_per_frame=1.0, score_noise=0.10),
    Noise("high", drop=0.20, drop_hidden=0.6, jitter=0.07, size_jitter=0.10, fp_per_frame=2.0, score_noise=0.15),
)


# --------------------------------------------------------------------------- ground truth and detections


@dataclass
class Sequence:
    gt: Frames
    visibility: dict[tuple[int, int], float]  # (frame, id) -> visibility
    frames: int
    fps: float
    width: int
    height: int


def load_mot(folder: Path, visibility: float = VISIBILITY, max_frames: int | None = None) -> Sequence:
    """MOTChallenge ``gt.txt`` + ``seqinfo.ini``: pedestrians (class 1) to consider, at least ``visibility``."""
    for name in ("gt.txt", "seqinfo.ini"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name}: missing (set EDGELABEL_MIRROR to the shared folder that has "
                             "tracking/MOT17-09/)")
    ini = configparser.ConfigParser()
    ini.read(folder / "seqinfo.ini")
    seq = ini["Sequence"]
    frames = int(seq["seqLength"]) if max_frames is None else min(int(seq["seqLength"]), max_frames)
    gt: Frames = {f: [] for f in range(1, frames + 1)}
    vis: dict[tuple[int, int], float] = {}
    for line in (folder / "gt.txt").read_text().splitlines():
        f, tid, x, y, w, h, consider, cls, v = line.split(",")[:9]
        frame = int(f)
        if frame > frames or int(consider) != 1 or int(cls) != 1 or float(v) < visibility:
            continue
        x1, y1 = float(x), float(y)
        gt[frame].append((int(tid), (x1, y1, x1 + float(w), y1 + float(h))))
        vis[(frame, int(tid))] = float(v)
    return Sequence(gt, vis, frames, float(seq["frameRate"]), int(seq["imWidth"]), int(seq["imHeight"]))


Dets = dict[int, list[tuple[Box, float]]]  # frame -> [(box, score)]


def perturb(seq: Sequence, noise: Noise, seed: int = SEED) -> Dets:
    """Simulated detections for every frame of ``seq`` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([(b[2] - b[0], b[3] - b[1]) for boxes in seq.gt.values() for _, b in boxes])
    out: Dets = {}
    for frame in range(1, seq.frames + 1):
        dets: list[tuple[Box, float]] = []
        for tid, (x1, y1, x2, y2) in seq.gt[frame]:
            v = seq.visibility[(frame, tid)]
            if rng.random() < noise.drop + noise.drop_hidden * (1.0 - v):
                continue
            w, h = x2 - x1, y2 - y1
            cx = (x1 + x2) / 2 + rng.normal(0, noise.jitter) * w
            cy = (y1 + y2) / 2 + rng.normal(0, noise.jitter) * h
            w *= max(0.3, 1 + rng.normal(0, noise.size_jitter))
            h *= max(0.3, 1 + rng.normal(0, noise.size_jitter))
            score = float(np.clip(0.3 + 0.6 * v + rng.normal(0, noise.score_noise), 0.05, 0.99))
            dets.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), score))
        for _ in range(rng.poisson(noise.fp_per_frame)):
            w, h = sizes[rng.integers(len(sizes))]
            x, y = rng.uniform(0, max(seq.width - w, 1.0)), rng.uniform(0, max(seq.height - h, 1.0))
            dets.append(((x, y, x + w, y + h), float(rng.uniform(0.1, 0.6))))
        out[frame] = dets
    return out


# --------------------------------------------------------------------------- metrics


def evaluate(gt: Frames, hyp: Frames) -> dict[str, float]:
    """IDF1, MOTA, ID switches and fragmentations of ``hyp`` against ``gt`` (py-motmetrics, IoU >= 0.5)."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    for frame in sorted(set(gt) | set(hyp)):
        g, h = gt.get(frame, []), hyp.get(frame, [])
        gb = np.array([b for _, b in g], dtype=np.float64).reshape(len(g), 4)
        hb = np.array([b for _, b in h], dtype=np.float64).reshape(len(h), 4)
        # motmetrics' own iou_matrix uses np.asfarray, gone in numpy 2: the same distance, computed here
        iou = iou_matrix(gb, hb)
        dist = np.where(iou >= MATCH_IOU, 1.0 - iou, np.nan)
        acc.update([i for i, _ in g], [i for i, _ in h], dist)
    names = ["idf1", "mota", "num_switches", "num_fragmentations", "num_false_positives", "num_misses"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas FutureWarnings inside motmetrics
        summary = mm.metrics.create().compute(acc, metrics=names, name="run")
    row = summary.iloc[0]
    return {"idf1": float(row["idf1"]), "mota": float(row["mota"]), "switches": int(row["num_switches"]),
            "fragmentations": int(row["num_fragmentations"]), "fp": int(row["num_false_positives"]),
            "misses": int(row["num_misses"])}


def fragment_share(hyp: Frames, gap: int = 3, iou: float = 0.5) -> tuple[int, int]:
    """(tracks, tracks that start 1..``gap`` frames after another track's last box at IoU > ``iou``)."""
    first: dict[int, tuple[int, Box]] = {}
    last: dict[int, tuple[int, Box]] = {}
    for frame in sorted(hyp):
        for tid, box in hyp[frame]:
            first.setdefault(tid, (frame, box))
            last[tid] = (frame, box)
    ends = sorted((f, tid, b) for tid, (f, b) in last.items())
    fragments = 0
    for tid, (f0, b0) in first.items():
        for f1, other, b1 in ends:
            if other != tid and 1 <= f0 - f1 <= gap and iou_matrix(np.array([b1]), np.array([b0]))[0, 0] > iou:
                fragments += 1
                break
    return len(first), fragments


# --------------------------------------------------------------------------- trackers


class Adapter:
    """One tracker behind two calls: ``prepare`` turns a frame's boxes, scores and classes into the
    tracker's own input type (not timed: the daemon's detector already yields it), ``track`` runs the
    tracker and returns (id, box) of its confirmed tracks."""

    name = ""

    def prepare(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Any:
        raise NotImplementedError

    def track(self, ts: float, prepared: Any) -> list[tuple[int, Box]]:
        raise NotImplementedError

    def step(self, ts: float, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> list[tuple[int, Box]]:
        return self.track(ts, self.prepare(boxes, scores, classes))


class Edgelabel(Adapter):
    name = "edgelabel"
    factory: Callable[..., Any] = Tracker

    @staticmethod
    def config() -> TrackingConfig:
        return TrackingConfig()  # the daemon's defaults

    def __init__(self, fps: float) -> None:
        self.tracker = self.factory("bench", self.config())
        self.index = 0

    def prepare(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Any:
        return [Detection(int(c), "person", float(s), tuple(float(v) for v in b))
                for b, s, c in zip(boxes, scores, classes, strict=True)]

    def track(self, ts: float, prepared: Any) -> list[tuple[int, Box]]:
        dets = prepared
        ids, _ = self.tracker.update(dets, ts, "r", self.index)
        self.index += 1
        return [(i, d.box) for i, d in zip(ids, dets, strict=True) if i is not None]


class Greedy(Edgelabel):
    name = "greedy (before)"
    factory = GreedyTracker

    @staticmethod
    def config() -> TrackingConfig:
        # the defaults it shipped with (the fields it does not know are unused)
        return TrackingConfig(iou=0.3, high_score=0.5, max_age=2.0, min_hits=2)


class SupervisionByteTrack(Adapter):
    name = "sv-bytetrack"

    def __init__(self, fps: float) -> None:
        import supervision as sv

        self.sv = sv
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in supervision in favour of the `trackers` package
            self.tracker = sv.ByteTrack(frame_rate=max(1, round(fps)))

    def prepare(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Any:
        return self.sv.Detections(xyxy=boxes.reshape(-1, 4).astype(np.float32), confidence=scores.astype(np.float32),
                                  class_id=classes.astype(int))

    def track(self, ts: float, prepared: Any) -> list[tuple[int, Box]]:
        out = self.tracker.update_with_detections(prepared)
        return [(int(i), tuple(float(v) for v in b)) for i, b in zip(out.tracker_id, out.xyxy, strict=True)]


def available_trackers() -> tuple[list[type[Adapter]], list[str]]:
    """The trackers to compare, and a note per library tracker that is not installed."""
    trackers: list[type[Adapter]] = [Edgelabel, Greedy]
    notes = []
    try:
        import supervision as sv

        if hasattr(sv, "ByteTrack"):
            trackers.append(SupervisionByteTrack)
        else:
            notes.append(f"supervision {sv.__version__} has no ByteTrack (removed in 0.31): pip install 'supervision<0.31'")
    except ImportError:
        notes.append("supervision not installed: pip install -e .[bench]")
    return trackers, notes


def run_tracker(cls: type[Adapter], dets: Dets, fps: float) -> Frames:
    """Feed ``dets`` frame by frame (timestamps: frame / fps) and collect the tracks."""
    tracker = cls(fps)
    out: Frames = {}
    for frame in sorted(dets):
        rows = dets[frame]
        boxes = np.array([b for b, _ in rows], dtype=np.float64).reshape(len(rows), 4)
        scores = np.array([s for _, s in rows], dtype=np.float64)
        out[frame] = tracker.step(frame / fps, boxes, scores, np.zeros(len(rows), dtype=np.int64))
    return out


def time_per_frame(cls: type[Adapter], n: int = 30, frames: int = 300, seed: int = SEED) -> float:
    """CPU milliseconds (this thread's, so other load on the machine does not count) per frame with ``n``
    detections: walkers at random speeds, a few pixels of jitter."""
    rng = np.random.default_rng(seed)
    start = rng.uniform([0, 0], [1700, 800], size=(n, 2))
    vel = rng.uniform(-60, 60, size=(n, 2))  # pixels per second
    size = rng.uniform([40, 100], [80, 240], size=(n, 2))
    fps = 30.0
    tracker = cls(fps)
    spent = 0.0
    for f in range(frames):
        xy = start + vel * f / fps + rng.normal(0, 2, size=(n, 2))
        boxes = np.concatenate([xy, xy + size], axis=1)
        scores = rng.uniform(0.3, 0.95, n)
        prepared = tracker.prepare(boxes, scores, np.zeros(n, dtype=np.int64))
        t0 = time.thread_time()
        tracker.track(f / fps, prepared)
        spent += time.thread_time() - t0
    return spent / frames * 1e3


# --------------------------------------------------------------------------- real detections


def video_detections(video: Path, model: Path, cache: bool) -> tuple[Dets, float]:
    """Person detections of every frame (edgelabel's detector, ONNX Runtime, CPU), cached; and the fps."""
    import cv2

    from edgelabel.engines.detector import load_detector

    key = f"{video.name}-{video.stat().st_size}-{model.name}-{model.stat().st_size}.json"
    path = Path(tempfile.gettempdir()) / "edgelabel-bench-tracking" / key
    if cache and path.is_file():
        data = json.loads(path.read_text())
        return {int(f): [(tuple(b), s) for b, s in rows] for f, rows in data["dets"].items()}, data["fps"]
    det = load_detector(model, engine="onnxruntime", family="yolox", providers=["cpu"], conf=0.25, iou=0.45)
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    dets: Dets = {}
    frame = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frame += 1
        dets[frame] = [(tuple(float(v) for v in d.box), float(d.score))
                       for d in det.detect(img).detections if d.class_id == 0]
    cap.release()
    det.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fps": fps, "dets": dets}))
    return dets, fps


def daemon_tracks(video: Path, model: Path) -> tuple[Frames, float]:
    """The person tracks the real pipeline (``edgelabel run``'s Pipeline, its own clock and tracker) gives a video,
    frame by frame; and the median time between frames, which shows the clock the frames were stamped with."""
    from edgelabel.edge.config import config_from_dict
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sinks.base import Sink

    class Recorder(Sink):
        name = "bench-tracks"

        def __init__(self) -> None:
            self.hyp: Frames = {}
            self.ts: list[float] = []

        def write(self, record: Any, frame: Any) -> None:
            self.ts.append(record.captured_ts)
            self.hyp[record.frame_index + 1] = [(d.track_id, tuple(d.box)) for d in record.detections
                                                if d.track_id is not None and d.label == "person"]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({"state_dir": str(Path(tmp) / "state"),
                                "model": {"path": str(model), "family": "yolox"},
                                "sources": {"video": {"uri": str(video)}},
                                "mqtt": {"enabled": False}, "dataset": {"enabled": False}}, base_dir=tmp)
        rec = Recorder()
        if Pipeline(cfg, extra_sinks=[rec], show_progress=False).run() != 0:
            raise SystemExit(f"{video}: the pipeline failed (see the log above)")
    gaps = sorted(b - a for a, b in zip(rec.ts, rec.ts[1:], strict=False))
    return rec.hyp, gaps[len(gaps) // 2] if gaps else 0.0


# --------------------------------------------------------------------------- main


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="150 frames, the medium noise level, no videos")
    ap.add_argument("--no-cache", action="store_true", help="run the detector on the videos again")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md (section 'Tracking')")
    ap.add_argument("--daemon", action="store_true", help="also run the videos through the real pipeline (its clock, "
                    "its tracker with the default settings) and report the same counts")
    args = ap.parse_args()
    trackers, notes = available_trackers()
    seq = load_mot(MOT, max_frames=150 if args.quick else None)
    levels = [LEVELS[1]] if args.quick else list(LEVELS)

    seeds = SEEDS[:1] if args.quick else SEEDS
    out = [f"MOT17-09 ({seq.frames} frames, {seq.fps:g} fps, {sum(map(len, seq.gt.values()))} ground-truth boxes "
           f"with visibility >= {VISIBILITY}), simulated detections, mean over seeds {', '.join(map(str, seeds))}:", ""]
    rows = []
    for level in levels:
        runs = [perturb(seq, level, seed) for seed in seeds]
        for cls in trackers:
            ms = [evaluate(seq.gt, run_tracker(cls, dets, seq.fps)) for dets in runs]
            m = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
            rows.append([level.name, cls.name, f"{m['idf1'] * 100:.1f}", f"{m['mota'] * 100:.1f}",
                         f"{m['switches']:.1f}", f"{m['fragmentations']:.0f}", f"{m['fp']:.0f}", f"{m['misses']:.0f}"])
        print(f"noise {level.name} done", file=sys.stderr)
    out += [table(["noise", "tracker", "IDF1 %", "MOTA %", "ID switches", "fragmentations", "FP", "misses"], rows), ""]

    if not args.quick:
        rows = []
        for name in VIDEOS:
            dets, fps = video_detections(MIRROR / "videos" / name, MIRROR / "models" / MODEL, cache=not args.no_cache)
            total = sum(map(len, dets.values()))
            for cls in trackers:
                hyp = run_tracker(cls, dets, fps)
                tracks, frags = fragment_share(hyp)
                with_id = sum(map(len, hyp.values()))
                rows.append([name, cls.name, str(tracks), f"{frags} ({frags / max(tracks, 1) * 100:.0f} %)",
                             f"{with_id / max(total, 1) * 100:.0f} %"])
            print(f"{name} done", file=sys.stderr)
        out += [f"Real detections ({MODEL}, ONNX Runtime CPU, conf 0.25, persons), media-time timestamps:", "",
                table(["video", "tracker", "person tracks", "fragments (share)", "detections with an id"], rows), ""]
        if args.daemon:
            rows = []
            for name in VIDEOS:
                hyp, gap = daemon_tracks(MIRROR / "videos" / name, MIRROR / "models" / MODEL)
                tracks, frags = fragment_share(hyp)
                rows.append([name, str(tracks), f"{frags} ({frags / max(tracks, 1) * 100:.0f} %)", f"{gap * 1e3:.1f} ms"])
            out += ["The same videos through the daemon's pipeline (`edgelabel run`'s code path, default settings):", "",
                    table(["video", "person tracks", "fragments (share)", "median time between frames"], rows), ""]

    rows = [[cls.name, f"{time_per_frame(cls, frames=100 if args.quick else 300):.3f}"] for cls in trackers]
    out += ["Tracker time per frame, 30 detections (CPU time of the calling thread):", "",
            table(["tracker", "ms per frame"], rows), ""]
    out += [f"Note: {n}" for n in notes]
    text = "\n".join(out)
    print(text)
    if args.write:
        command = "python bench/tracking.py" + (" --quick" if args.quick else "") + (" --daemon" if args.daemon else "")
        write_section(ROOT / "BENCHMARKS.md", text, command)
    return 0


def write_section(path: Path, tables: str, command: str) -> None:
    """Replace (or append) the ``## Tracking`` section of ``path`` (bench/run.py keeps it when it rewrites the file)."""
    import platform

    import scipy

    versions = f"Python {platform.python_version()}, numpy {np.__version__}, SciPy {scipy.__version__}"
    try:
        import motmetrics
        import supervision

        versions += f", motmetrics {motmetrics.__version__}, supervision {supervision.__version__}"
    except ImportError:
        pass
    section = "\n".join([
        "## Tracking", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"{versions}). How the detections are simulated and what each column means: docs/tracking.md.", "",
        tables.rstrip(), "",
    ])
    old = path.read_text() if path.is_file() else ""
    if "## Tracking" in old:
        start = old.index("## Tracking")
        nxt = old.find("\n## ", start + 1)
        old = old[:start] + (old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + section)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

"""How long one review decision holds the dataset lock, for the largest update the API accepts.

The dataset index has one lock, shared by the sink thread that writes new frames and by every review
decision; while a decision holds it, labeling waits.  This measures a maximal valid ``update``:
``MAX_BOXES`` boxes on a frame that had ``MAX_DET`` detector boxes (every one moved, so the change summary
matches each new box against each old one), on a dataset of ``--frames`` frames with YOLO and COCO on
(the COCO file is rewritten, incrementally, under the lock)::

    python bench/review_lock.py                 # 2000 frames, 5 decisions; prints the figures
    python bench/review_lock.py --frames 20000
    python bench/review_lock.py --boxes 1000    # more than the API accepts: what one such update cost

Printed: the whole call; the longest single hold of the lock (a decision takes it more than once: to read
the row, to write it, to snapshot the COCO rows; checking the boxes, the change summary and writing the
COCO file happen outside it); the sum of its holds.  ``-v`` lists every hold.  Nothing is written outside
a temp folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgelabel.edge.config import CaptureConfig, CaptureSection, DatasetConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id
from edgelabel.edge.review import MAX_BOXES, ReviewStore
from edgelabel.edge.sinks.dataset import DatasetSink
from edgelabel.engines.models.nms import MAX_DET

NAMES = ["person", "bicycle", "car", "motorcycle", "bus", "truck"]
MODEL = ModelInfo("bench", "0" * 64, "yolov8", "onnxruntime", "CPUExecutionProvider", "fp32", (640, 640))
W, H = 1920, 1080


class TimedLock:
    """An RLock that records how long each outermost hold lasted."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._since = 0.0
        self.holds: list[float] = []

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self._depth += 1
            if self._depth == 1:
                self._since = time.perf_counter()
        return got

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.holds.append(time.perf_counter() - self._since)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: Any) -> None:
        self.release()


def boxes(n: int, rng: np.random.Generator, shift: float = 0.0) -> list[tuple[int, float, list[float]]]:
    out = []
    for _ in range(n):
        x, y = rng.uniform(0, W - 60), rng.uniform(0, H - 60)
        out.append((int(rng.integers(0, len(NAMES))), float(rng.uniform(0.3, 0.99)),
                    [x + shift, y + shift, x + 40 + shift, y + 50 + shift]))
    return out


def record(i: int, frame: Frame, dets: list[tuple[int, float, list[float]]]) -> LabelRecord:
    return LabelRecord(
        id=record_id("bench", frame.source, frame.key), device_id="bench", source=frame.source, frame_index=i,
        frame_key=frame.key, captured_at=iso_utc(frame.captured_at), captured_ts=frame.captured_at, width=W,
        height=H, model=MODEL, inference_ms=5.0,
        detections=[DetectionRecord(c, NAMES[c], s, b, [b[0] / W, b[1] / H, b[2] / W, b[3] / H]) for c, s, b in dets])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=2000, help="frames in the dataset (default 2000)")
    p.add_argument("--runs", type=int, default=5, help="decisions measured (default 5)")
    p.add_argument("-v", "--verbose", action="store_true", help="each hold of each decision")
    p.add_argument("--boxes", type=int, default=MAX_BOXES, help=f"boxes per update (default MAX_BOXES, {MAX_BOXES})")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    review_all = CaptureSection(live=CaptureConfig(review="all"), storage=CaptureConfig(review="all"))
    image = np.zeros((H, W, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        sink = DatasetSink(DatasetConfig(path=str(root), capture=review_all, min_free_bytes=0, save_images="never"),
                           root, NAMES, MODEL.name)
        sink.open()
        t0 = time.perf_counter()
        ids = []
        for i in range(args.frames):
            frame = Frame("cam", i, image, 1_800_000_000.0 + i, f"rtsp://cam/s@{i}", live=True)
            rec = record(i, frame, boxes(MAX_DET if i < args.runs else 3, rng))
            sink.prepare(rec, frame)
            sink.write(rec, frame)
            ids.append(rec.id)
        sink.flush()
        print(f"dataset: {args.frames} frames built in {time.perf_counter() - t0:.1f} s")
        index = sink.index
        timed = TimedLock()
        index.lock = timed  # type: ignore[assignment]
        store = ReviewStore(index)
        totals, holds, totals_held = [], [], []
        for rid in ids[:args.runs]:
            body = [{"class_id": c, "box": b, "score": s} for c, s, b in boxes(args.boxes, rng, shift=3.0)]
            timed.holds.clear()
            t = time.perf_counter()
            result = store.decide(rid, "update", by="bench", detections=body, version=1)
            totals.append(time.perf_counter() - t)
            holds.append(max(timed.holds))  # the longest hold of the decision (it takes the lock more than once)
            totals_held.append(sum(timed.holds))
            if args.verbose:
                print("  holds (ms):", [round(h * 1000, 1) for h in timed.holds])
            assert result["item"]["state"] == "corrected" and len(result["item"]["detections"]) == args.boxes
        sink.close()
    print(f"update of {args.boxes} boxes over {MAX_DET} detector boxes, {args.runs} runs:")
    print(f"  whole decision  median {statistics.median(totals) * 1000:.0f} ms, max {max(totals) * 1000:.0f} ms")
    print(f"  longest hold    median {statistics.median(holds) * 1000:.0f} ms, max {max(holds) * 1000:.0f} ms")
    print(f"  all holds       median {statistics.median(totals_held) * 1000:.0f} ms, "
          f"max {max(totals_held) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

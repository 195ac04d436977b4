"""Detection parity with the reference implementation (Ultralytics), box by box.  Not part of CI.

For every Ultralytics ONNX model in the mirror (yolo11n_int8, yolov8n_int8, yolo26n_int8) this runs
Ultralytics' own ``YOLO(model.onnx, task="detect").predict(...)`` (in the separate environment given
by ``--ultralytics-python``) and edgelabel's detector (ONNX Runtime, CPU provider) on the same
frames -- every image of ``images/`` and every Nth frame of every video of ``videos/`` -- with the
same thresholds and input size, and compares the detections one to one::

    python bench/parity.py --ultralytics-python /tmp/ulvenv/bin/python [--every 20] [--out parity.md]

Frames are decoded once, here, and written as lossless PNG files that both sides read, so both see
exactly the same pixels (JPEG and H.264 decoders differ between OpenCV builds); each side hashes the
pixels it ran on and the report says whether all hashes agree.

Matching, per frame: pairs of the same class with IoU >= 0.95 are matched greedily, highest IoU
first, one to one.  Target: every box matched on both sides and max |score difference| <= 0.01.
``% matched`` is matched / (reference + ours - matched), i.e. 100 % only when nothing is unmatched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import MIRROR  # noqa: E402  (the same mirror as the main benchmark)
from edgelabel.engines.detector import load_detector  # noqa: E402
from edgelabel.engines.models.nms import box_iou  # noqa: E402

MODELS = ("yolo11n_int8", "yolov8n_int8", "yolo26n_int8")

# One detection everywhere below: [class, score, x1, y1, x2, y2] in frame pixels.
Det = list[float]

#: runs in the Ultralytics environment: argv[1] = job JSON file, argv[2] = result JSON file
PEER_CODE = r"""
import hashlib, json, sys, time
import ultralytics
from ultralytics import YOLO
job = json.load(open(sys.argv[1]))
out = {"ultralytics": ultralytics.__version__, "models": {}}
try:
    import onnxruntime, cv2, torch
    out["versions"] = {"onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__, "torch": torch.__version__}
except Exception as exc:
    out["versions"] = {"error": str(exc)}
for spec in job["models"]:
    model = YOLO(spec["path"], task="detect")
    frames, hashes, t0 = [], [], time.perf_counter()
    for path in job["frames"]:
        r = model.predict(path, conf=job["conf"], iou=job["iou"], imgsz=spec["imgsz"], device="cpu", verbose=False)[0]
        b = r.boxes
        frames.append([[int(c), float(s), *map(float, xy)] for xy, s, c in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist())])
        hashes.append(hashlib.sha1(r.orig_img.tobytes()).hexdigest())
    out["models"][spec["name"]] = {"frames": frames, "hashes": hashes, "seconds": time.perf_counter() - t0}
json.dump(out, open(sys.argv[2], "w"))
"""


def extract_frames(work: Path, every: int) -> list[tuple[str, Path]]:
    """Every mirror image and every ``every``-th video frame as PNG files: [(name, path)]."""
    frames: list[tuple[str, Path]] = []
    for img_path in sorted((MIRROR / "images").glob("*.jpg")):
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{img_path}: cannot decode")
        dst = work / f"{len(frames):05d}_{img_path.stem}.png"
        cv2.imwrite(str(dst), img)
        frames.append((img_path.name, dst))
    for video in sorted((MIRROR / "videos").glob("*.mp4")):
        cap = cv2.VideoCapture(str(video))
        index = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            if index % every == 0:
                dst = work / f"{len(frames):05d}_{video.stem}_{index:06d}.png"
                cv2.imwrite(str(dst), img)
                frames.append((f"{video.name}#{index}", dst))
            index += 1
        cap.release()
    return frames


def run_ours(model: Path, frames: list[tuple[str, Path]], conf: float,
             iou: float) -> tuple[list[list[Det]], list[str], float, int]:
    """edgelabel on the frames: (detections per frame, pixel hashes, seconds, input size)."""
    det = load_detector(model, engine="onnxruntime", providers=["cpu"], conf=conf, iou=iou)
    out: list[list[Det]] = []
    hashes: list[str] = []
    t0 = time.perf_counter()
    for _, path in frames:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        hashes.append(hashlib.sha1(img.tobytes()).hexdigest())
        out.append([[d.class_id, d.score, *d.box] for d in det.detect(img).detections])
    seconds = time.perf_counter() - t0
    size = det.input_size[0]
    det.close()
    return out, hashes, seconds, size


def run_peer(python: str, work: Path, models: list[tuple[str, Path, int]], frames: list[tuple[str, Path]],
             conf: float, iou: float) -> dict[str, Any]:
    """Ultralytics on the same frames, in its own environment (one process for all models)."""
    job = {
        "models": [{"name": n, "path": str(p), "imgsz": s} for n, p, s in models],
        "frames": [str(p) for _, p in frames],
        "conf": conf,
        "iou": iou,
    }
    job_file, result_file = work / "job.json", work / "peer.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    proc = subprocess.run([python, "-c", PEER_CODE, str(job_file), str(result_file)],
                          capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"Ultralytics run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


@dataclass
class Compare:
    """Parity figures of one model over all frames."""

    ref: int = 0
    ours: int = 0
    matched: int = 0
    dscores: list[float] = field(default_factory=list)
    dbox: float = 0.0  # max |coordinate difference| of matched boxes, pixels
    unmatched: list[str] = field(default_factory=list)  # one line per unmatched box, for the details section

    @property
    def pct(self) -> float:
        union = self.ref + self.ours - self.matched
        return 100.0 * self.matched / union if union else 100.0


def _describe(side: str, d: Det, others: list[Det]) -> str:
    """An unmatched box and its closest counterpart of the same class on the other side."""
    same = [(o, box_iou(d[2:], o[2:])) for o in others if int(o[0]) == int(d[0])]
    best = max(same, key=lambda t: t[1], default=None)
    box = "[" + ", ".join(f"{v:.1f}" for v in d[2:]) + "]"
    near = "no box of that class on the other side"
    if best is not None and best[1] > 0:
        near = f"closest other-side box IoU {best[1]:.3f}, score {best[0][1]:.4f}"
    return f"{side} only: class {int(d[0])} score {d[1]:.4f} {box}; {near}"


def compare(peer: list[list[Det]], ours: list[list[Det]], names: list[str], match_iou: float) -> Compare:
    """Greedy one-to-one matching per frame (same class, IoU >= match_iou, highest IoU first)."""
    res = Compare()
    for name, theirs, mine in zip(names, peer, ours, strict=True):
        res.ref += len(theirs)
        res.ours += len(mine)
        pairs = sorted(
            ((box_iou(a[2:], b[2:]), i, j) for i, a in enumerate(theirs) for j, b in enumerate(mine) if int(a[0]) == int(b[0])),
            reverse=True,
        )
        used_t: set[int] = set()
        used_o: set[int] = set()
        for iou, i, j in pairs:
            if iou < match_iou:
                break
            if i in used_t or j in used_o:
                continue
            used_t.add(i)
            used_o.add(j)
            res.matched += 1
            res.dscores.append(abs(theirs[i][1] - mine[j][1]))
            res.dbox = max(res.dbox, max(abs(p - q) for p, q in zip(theirs[i][2:], mine[j][2:], strict=True)))
        res.unmatched += [f"{name}: " + _describe("Ultralytics", d, mine) for i, d in enumerate(theirs) if i not in used_t]
        res.unmatched += [f"{name}: " + _describe("edgelabel", d, theirs) for j, d in enumerate(mine) if j not in used_o]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ultralytics-python", required=True, help="python of an environment with ultralytics installed")
    ap.add_argument("--every", type=int, default=20, help="use every Nth video frame (default 20: 166 frames, about 3 minutes on 2 cores)")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.45, help="NMS IoU (end-to-end models have no NMS)")
    ap.add_argument("--match-iou", type=float, default=0.95, help="IoU for two boxes to be the same detection")
    ap.add_argument("--score-tol", type=float, default=0.01, help="target: max |score difference|")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", help="also write the markdown report to this file")
    args = ap.parse_args()
    if args.every < 1:
        ap.error("--every must be >= 1")

    with tempfile.TemporaryDirectory(prefix="edgelabel-parity-") as tmp:
        work = Path(tmp)
        frames = extract_frames(work, args.every)
        print(f"{len(frames)} frames ({sum(1 for n, _ in frames if '#' not in n)} images, every {args.every}th video frame)",
              file=sys.stderr)
        ours: dict[str, tuple[list[list[Det]], list[str], float, int]] = {}
        for name in args.models:
            ours[name] = run_ours(MIRROR / "models" / f"{name}.onnx", frames, args.conf, args.iou)
            print(f"edgelabel {name}: {ours[name][2]:.1f} s", file=sys.stderr)
        specs = [(n, MIRROR / "models" / f"{n}.onnx", ours[n][3]) for n in args.models]
        t0 = time.perf_counter()
        peer = run_peer(args.ultralytics_python, work, specs, frames, args.conf, args.iou)
        print(f"Ultralytics: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    names = [n for n, _ in frames]
    rows: list[str] = []
    details: list[str] = []
    identical_all = True
    for name in args.models:
        mine, my_hashes, my_s, size = ours[name]
        theirs = peer["models"][name]
        identical = sum(a == b for a, b in zip(my_hashes, theirs["hashes"], strict=True))
        identical_all &= identical == len(frames)
        c = compare(theirs["frames"], mine, names, args.match_iou)
        mean_d = float(np.mean(c.dscores)) if c.dscores else 0.0
        max_d = max(c.dscores, default=0.0)
        unmatched_ref = c.ref - c.matched
        unmatched_ours = c.ours - c.matched
        ok = unmatched_ref == 0 and unmatched_ours == 0 and max_d <= args.score_tol
        rows.append(
            f"| {name} | {size} | {c.ref} | {c.ours} | {c.matched} | {mean_d:.5f} | {max_d:.5f} | {c.dbox:.2f} | "
            f"{unmatched_ref} | {unmatched_ours} | {c.pct:.2f} % | {'pass' if ok else 'FAIL'} |"
        )
        if c.unmatched:
            details.append(f"- {name} ({len(c.unmatched)} unmatched):")
            details += [f"  - {u}" for u in c.unmatched[:20]]
            if len(c.unmatched) > 20:
                details.append(f"  - ... {len(c.unmatched) - 20} more")
        print(f"{name}: edgelabel {my_s:.1f} s, Ultralytics {theirs['seconds']:.1f} s", file=sys.stderr)

    versions = peer.get("versions", {})
    cmd = " ".join(["python bench/parity.py", *sys.argv[1:]])
    md = [
        "| model | imgsz | Ultralytics boxes | edgelabel boxes | matched | mean abs Δscore | max abs Δscore | max abs Δbox (px) "
        "| unmatched Ultralytics | unmatched edgelabel | % matched | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Frames: {len(frames)} ({len([n for n in names if '#' not in n])} images + every {args.every}th frame of "
        f"{len(list((MIRROR / 'videos').glob('*.mp4')))} videos), identical pixels on both sides: "
        f"{'yes' if identical_all else 'NO'}. conf {args.conf}, NMS IoU {args.iou}; match: same class, IoU >= {args.match_iou}; "
        f"target: 100 % matched, max abs Δscore <= {args.score_tol}.",
        "",
        f"Ultralytics {peer['ultralytics']} (ONNX Runtime {versions.get('onnxruntime', '?')}, OpenCV {versions.get('opencv', '?')}, "
        f"torch {versions.get('torch', '?')}) vs edgelabel (ONNX Runtime {ort.__version__} CPU, OpenCV {cv2.__version__}, "
        f"numpy {np.__version__}), Python {platform.python_version()}, {os.cpu_count()} cores. "
        f"Date {time.strftime('%Y-%m-%d', time.gmtime())}. Command: `{cmd}`.",
    ]
    if details:
        md += ["", "Unmatched boxes (first 20 per model):", "", *details]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

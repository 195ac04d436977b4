"""GPU check: the native TensorRT engine against ONNX Runtime on the CPU, image by image.

Run through ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU and
TensorRT.  It builds an engine for the model into a fresh cache (build time),
loads it again (second-start time, a cache hit), runs both back ends on every
image and matches detections one to one (same class, IoU >= 0.95,
|score difference| <= 0.01).  fp16 moves scores and boxes a little, so the
figures are printed and the run fails only below 98% matched.

Exit codes: 0 parity holds, 1 parity below the threshold, 2 setup failure
(model, build), 3 no GPU or TensorRT on this machine (nothing was checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
try:
    import edgelabel.engines  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a bare copy of the repository on the GPU machine: its folders are the edgelabel package
    import types

    _root_package = types.ModuleType("edgelabel")
    _root_package.__path__ = [str(ROOT)]
    sys.modules["edgelabel"] = _root_package

from edgelabel.engines.base import Detection, EngineError  # noqa: E402
from edgelabel.engines.detector import Detector, load_detector  # noqa: E402
from edgelabel.engines.models.nms import box_iou  # noqa: E402
from edgelabel.engines.tensorrt import TensorRTEngine, import_tensorrt, load_cuda  # noqa: E402

MIRROR = Path(os.environ.get("EDGELABEL_MIRROR", ROOT.parent / "shared"))


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def match(ref: list[Detection], got: list[Detection], min_iou: float, score_tol: float) -> tuple[int, list[float], list[float]]:
    """Greedy one-to-one matching, best reference score first; returns (matched, IoUs, |Δscore|s) of the matches."""
    used: set[int] = set()
    ious: list[float] = []
    deltas: list[float] = []
    for r in sorted(ref, key=lambda d: -d.score):
        best, best_iou = -1, 0.0
        for j, g in enumerate(got):
            if j in used or g.class_id != r.class_id:
                continue
            value = box_iou(r.box, g.box)
            if value > best_iou:
                best, best_iou = j, value
        if best >= 0 and best_iou >= min_iou and abs(got[best].score - r.score) <= score_tol:
            used.add(best)
            ious.append(best_iou)
            deltas.append(abs(got[best].score - r.score))
    return len(used), ious, deltas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MIRROR / "models" / "yolox_nano.onnx")
    parser.add_argument("--images", type=Path, default=MIRROR / "images")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--min-match", type=float, default=0.98)
    parser.add_argument("--iou", type=float, default=0.95)
    parser.add_argument("--score-tol", type=float, default=0.01)
    args = parser.parse_args()

    try:
        import_tensorrt()
        load_cuda(0).close()
    except EngineError as exc:
        say(f"SKIP: no usable NVIDIA GPU / TensorRT on this machine: {exc}")
        return 3
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not args.model.is_file() or not images:
        say(f"ERROR: model {args.model} or images in {args.images} not found (set EDGELABEL_MIRROR)")
        return 2

    with tempfile.TemporaryDirectory(prefix="gpu-check-engines-") as cache:
        options = {"precision": args.precision, "cache_dir": cache}
        if args.precision == "int8":
            options["calib_images"] = str(args.images)
        try:
            t0 = time.perf_counter()
            first = TensorRTEngine(args.model, **options)
            build_s = time.perf_counter() - t0
            first.close()
            t0 = time.perf_counter()
            engine = TensorRTEngine(args.model, **options)
            load_s = time.perf_counter() - t0
            trt = Detector(engine)
            ort = load_detector(args.model, engine="onnxruntime", providers=["cpu"])
        except EngineError as exc:
            say(f"ERROR: {exc}")
            return 2
        info = engine.info()
        say(f"engine:  {info.provider}, precision {info.precision}, file {Path(str(info.extra.get('engine_file'))).name}")
        say(f"build:   {build_s:.1f} s (fresh cache)   second start: {load_s:.2f} s (cache hit: {engine.cache_hit})")
        say(f"family:  {trt.family}, input {trt.input_size[0]}x{trt.input_size[1]}")
        say()

        total_ref = total_got = total_matched = 0
        all_ious: list[float] = []
        all_deltas: list[float] = []
        trt_ms: list[float] = []
        ort_ms: list[float] = []
        for path in images:
            frame = cv2.imread(str(path))
            if frame is None:
                say(f"{path.name}: cannot be decoded, skipped")
                continue
            ref = ort.detect(frame)
            got = trt.detect(frame)
            ort_ms.append(ref.inference_ms)
            trt_ms.append(got.inference_ms)
            matched, ious, deltas = match(ref.detections, got.detections, args.iou, args.score_tol)
            total_ref += len(ref.detections)
            total_got += len(got.detections)
            total_matched += matched
            all_ious += ious
            all_deltas += deltas
            say(
                f"{path.name:16s} onnxruntime {len(ref.detections):3d}  tensorrt {len(got.detections):3d}  matched {matched:3d}"
                + (f"  min IoU {min(ious):.3f}  max |dscore| {max(deltas):.4f}" if ious else "")
            )
        trt.close()
        ort.close()

    denominator = max(total_ref, total_got, 1)
    rate = total_matched / denominator
    say()
    say(f"matched {total_matched}/{denominator} detections = {rate:.1%} (need {args.min_match:.0%})")
    if all_ious:
        say(f"IoU of matches: min {min(all_ious):.4f}, mean {sum(all_ious) / len(all_ious):.4f}")
        say(f"|score diff| of matches: max {max(all_deltas):.4f}, mean {sum(all_deltas) / len(all_deltas):.4f}")
    if trt_ms:
        warm_trt = sorted(trt_ms)[len(trt_ms) // 2]
        warm_ort = sorted(ort_ms)[len(ort_ms) // 2]
        say(f"inference median: tensorrt {warm_trt:.2f} ms, onnxruntime cpu {warm_ort:.2f} ms")
    if rate < args.min_match:
        say("FAIL: TensorRT detections differ from ONNX Runtime's beyond the tolerance")
        return 1
    say("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

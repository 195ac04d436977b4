"""Load the configured detector: back end, CPU threading plan, and INT8 behind its accuracy gate.

The pipeline calls :func:`load_model` at start and on a model reload.  Everything
that decides *how* the model runs lives here, so the log line, the status
page and the records agree on one answer:

* ``model.engine`` (``auto``/``tensorrt``/``onnxruntime``) is resolved by
  :func:`engines.select.choose_engine`; a TensorRT failure on an ONNX model
  falls back to ONNX Runtime inside :func:`engines.detector.load_detector`.
* On the CPU, :func:`cpu_plan` picks intra-op threads and inference workers.
* ``model.precision: int8`` on native TensorRT calibrates on site images,
  holds a fifth of them back, and keeps the INT8 engine only when its mAP50
  against the FP16 engine drops by at most ``model.int8_max_drop`` points
  (:mod:`edge.int8gate`).  The verdict is cached next to the INT8 engine,
  so the check runs once per engine build, not at every start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelabel.edge.config import Config, ModelConfig
from edgelabel.engines.base import EngineError
from edgelabel.engines.detector import Detector, load_detector
from edgelabel.engines.select import choose_engine, is_serialized_engine
from edgelabel.engines.trtcache import atomic_write  # the verdict and the calibration choice live in the engine cache

log = logging.getLogger("edgelabel.loader")

#: makes a detector for a precision and (INT8) its calibration images; injectable for tests
MakeDetector = Callable[[str, "list[Path] | None"], Detector]


def cpu_plan(m: ModelConfig, cores: int | None = None) -> tuple[int, int]:
    """(intra-op threads, inference workers) for ONNX Runtime on the CPU.

    Explicit settings win.  Otherwise one single-threaded session is called by
    one worker per core (at most 4): on small detectors this measured 1.4x
    the raw rate of one 2-thread call on 2 cores, more while the decoder
    competes for the cores (bench/run.py, BENCHMARKS.md).
    """
    cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
    workers = m.workers or min(cores, 4)
    threads = m.threads or (1 if workers > 1 else 0)
    return threads, workers


def worker_count(cfg: Config, detector: Detector) -> int:
    """How many inference workers call ``detector`` at once (1 unless the engine allows more)."""
    limit = max(1, int(getattr(detector.engine, "max_concurrency", 1)))
    if limit == 1:
        return 1
    on_cpu = detector.engine.info().provider == "CPUExecutionProvider"
    wanted = cpu_plan(cfg.model)[1] if on_cpu else max(1, cfg.model.workers)
    return min(wanted, limit)


def calibration_folder(cfg: Config) -> Path:
    """``model.calibration``, else the images this appliance captured into its dataset."""
    if cfg.model.calibration:
        return cfg.resolve(cfg.model.calibration)
    return cfg.resolve(cfg.dataset.path) / "images"


def _even_sample(paths: list[Path], limit: int) -> list[Path]:
    """At most ``limit`` paths spread evenly over the sorted list (a whole shift, not its first minutes)."""
    paths = sorted(paths)
    if len(paths) <= limit:
        return paths
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def calibration_split(folder: Path, max_images: int, manifest: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-back images) from ``folder``.

    The same split wherever it is made, so an engine built ahead of time
    (``edgelabel build-engine``) is the one the daemon finds.  With a
    ``manifest`` the first choice is kept there and reused while its files
    exist: the default folder is the dataset, which grows all the time, and
    a new selection at every start would mean a new calibration hash, so a
    new INT8 build and gate at every start.  Delete the manifest to choose
    again from what the folder holds now.
    """
    from edgelabel.engines.calibration import list_images, split_calibration

    if manifest is not None and manifest.is_file():
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
            calib = [Path(p) for p in doc["calibration"]]
            held = [Path(p) for p in doc["held_back"]]
            if calib and all(p.is_file() for p in calib + held):
                return calib, held
            log.warning("INT8: images listed in %s are gone; choosing calibration images again", manifest)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("INT8: ignoring %s (%s); choosing calibration images again", manifest, exc)
    images = list_images(folder) if folder.is_dir() else []
    if not images:
        return [], []
    calib, held = (list(part) for part in split_calibration(_even_sample(images, max_images)))
    if manifest is not None:
        doc = {"folder": str(folder), "calibration": [str(p) for p in calib], "held_back": [str(p) for p in held]}
        try:
            atomic_write(manifest, json.dumps(doc, indent=1).encode("utf-8"))
        except OSError as exc:
            log.warning("INT8: cannot keep the calibration choice in %s (%s)", manifest, exc)
    return calib, held


def calibration_manifest(cfg: Config) -> Path:
    """Where the INT8 calibration choice for the configured model is kept."""
    return cfg.state_path("engines") / f"{cfg.resolve(cfg.model.path).stem}-calibration.json"


def probe_model(cfg: Config) -> Detector | None:
    """Open the configured model the way :func:`load_model` does, minus any TensorRT engine build.

    ``check-config`` and the doctor call this, so a file that is not a detector
    is refused there with the message ``edgelabel run`` gives (the same
    :class:`engines.detector.Detector` checks raise it).  ONNX files load on
    ONNX Runtime with the configured providers except TensorRT (a build takes
    minutes on a Jetson); a serialized TensorRT engine is not opened (None)
    unless ``model.engine`` is ``onnxruntime``, where it fails as in ``run``.
    The caller closes the detector.
    """
    m = cfg.model
    path = cfg.resolve(m.path)
    if is_serialized_engine(path) and m.engine != "onnxruntime":
        return None
    providers = [p for p in m.providers if p != "tensorrt"] or ["cpu"]
    threads, _ = cpu_plan(m)
    return load_detector(path, engine="onnxruntime", family=m.family,
                         labels=str(cfg.resolve(m.labels)) if m.labels else None, conf=m.conf, iou=m.iou,
                         providers=providers, threads=threads)


def running(detector: Detector) -> str:
    """What runs, for a reason line: ``FP32 on onnxruntime (CPUExecutionProvider)``.

    Asked of the engine, not assumed: an FP16 TensorRT build that fails falls back to ONNX Runtime,
    which runs the model at its own precision (FP32 for an FP32 graph).
    """
    info = detector.engine.info()
    return f"{info.precision.upper()} on {info.backend} ({info.provider})"


def load_model(cfg: Config, progress: bool = False) -> Detector:
    """Load the configured detector (EngineError with one clear line when it cannot be used)."""
    m = cfg.model
    path = cfg.resolve(m.path)
    threads, _ = cpu_plan(m)
    options: dict[str, Any] = {
        "engine": m.engine,
        "family": m.family,
        "labels": str(cfg.resolve(m.labels)) if m.labels else None,
        "conf": m.conf,
        "iou": m.iou,
        "providers": m.providers,
        "threads": threads,
        "precision": m.precision,
        "workspace_mb": m.workspace_mb,
        "cache_dir": str(cfg.state_path("engines")),  # TensorRT engine caches: no rebuild on every start
    }
    if m.precision != "int8" or is_serialized_engine(path):
        return load_detector(path, **options)
    try:
        choice = choose_engine(m.engine, path)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    if choice.engine != "tensorrt":
        detector = load_detector(path, **options)
        detector.engine_reason += f"; model.precision int8 applies to native TensorRT only; using {running(detector)}"
        return detector

    chosen = {**options, "engine": choice.engine}  # decided once; load_int8_gated sets the reason it reports

    def make(precision: str, calib: list[Path] | None) -> Detector:
        if calib is None:
            return load_detector(path, **{**chosen, "precision": precision})
        return load_detector(path, **{**chosen, "precision": precision, "calib_images": calib}, fallback=False)

    folder = calibration_folder(cfg)
    return load_int8_gated(make, folder, m.calibration_images, m.int8_max_drop, cfg.state_path("engines"),
                           choice.reason, progress=progress, manifest=calibration_manifest(cfg))


def load_int8_gated(
    make: MakeDetector,
    folder: Path,
    max_images: int,
    max_drop: float,
    cache_dir: Path,
    reason: str,
    progress: bool = False,
    manifest: Path | None = None,
) -> Detector:
    """The INT8 detector when it passes the gate, else the FP16 one; the reason says why and what runs."""
    from edgelabel.edge.int8gate import GateResult, run_gate

    calib, held = calibration_split(folder, max_images, manifest)
    if not calib:
        detector = make("fp16", None)
        detector.engine_reason = (f"{reason}; INT8 not used: no calibration images in {folder} "
                                  f"(set model.calibration to a folder of site images); using {running(detector)}")
        log.warning("%s", detector.engine_reason)
        return detector
    log.info("INT8: calibrating on %d image(s) from %s, %d held back for the accuracy gate", len(calib), folder,
             len(held))
    try:
        candidate = make("int8", calib)
    except EngineError as exc:
        detector = make("fp16", None)
        detector.engine_reason = f"{reason}; INT8 build failed ({exc}); using {running(detector)}"
        log.warning("%s", detector.engine_reason)
        return detector
    engine_file = getattr(candidate.engine, "engine_file", None)
    verdict_file = (Path(engine_file).with_suffix(".gate.json") if engine_file
                    else cache_dir / f"{candidate.engine.model_path.stem}-int8.gate.json")
    result: GateResult | None = None
    if verdict_file.is_file():
        try:
            cached = GateResult.from_json(verdict_file.read_text(encoding="utf-8"))
            if abs(cached.margin_points - max_drop) < 1e-9:
                result = cached
                log.info("INT8 gate: verdict from %s (delete it to check again)", verdict_file)
        except (OSError, ValueError) as exc:
            log.warning("INT8 gate: ignoring %s (%s); checking again", verdict_file, exc)
    reference: Detector | None = None
    fresh = result is None
    try:
        if result is None or not result.accepted:
            reference = make("fp16", None)
        if result is None:
            assert reference is not None
            result = run_gate(candidate, reference, held, margin_points=max_drop, progress=progress)
    except BaseException:  # release GPU memory now, not at some later garbage collection
        candidate.close()
        if reference is not None:
            reference.close()
        raise
    if fresh:
        try:
            atomic_write(verdict_file, result.to_json().encode("utf-8"))
        except OSError as exc:
            log.warning("INT8 gate: cannot keep the verdict in %s (%s); it is checked again at the next start",
                        verdict_file, exc)
    chosen, other = (candidate, reference) if result.accepted else (reference, candidate)
    assert chosen is not None
    if other is not None:
        other.close()
    verdict = result.reason.removesuffix("; using FP16")  # verdicts cached by earlier versions said so
    chosen.engine_reason = f"{reason}; {verdict}" + ("" if result.accepted else f"; using {running(chosen)}")
    chosen.int8_gate = result
    return chosen

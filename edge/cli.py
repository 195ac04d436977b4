"""The ``edgelabel`` command: run, label, export, check-config, user, token.

Exit codes: 0 success, 1 the job failed at run time, 2 bad configuration,
bad input path or a model that cannot be used (one line says which file and why).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse, urlsplit

import edgelabel.edge.sources.imageio  # noqa: F401  (sets OpenCV's image size limit before cv2 is loaded)
from edgelabel.edge import __version__
from edgelabel.edge.accounts_cli import add_parsers as add_account_parsers
from edgelabel.edge.config import (
    FAMILIES,
    Config,
    ConfigError,
    config_from_dict,
    field_key,
    mirror_folder,
    mirror_hint,
    read_config_file,
    validate_config,
)
from edgelabel.edge.logsetup import setup_logging
from edgelabel.edge.redact import redact

log = logging.getLogger("edgelabel")

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _source_name(uri: str, taken: set[str]) -> str:
    """A readable, unique source name derived from a URI (``cars`` for ``/videos/cars.mp4``)."""
    from edgelabel.edge.sources import suggest_name

    base = suggest_name(uri) or "source"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def parse_mqtt_url(url: str) -> dict[str, Any]:
    """``mqtt[s]://[user@]host[:port]`` -> mqtt config fields; the password comes from EDGELABEL_MQTT_PASSWORD.

    A password in the URL is refused: a command line is readable by every local user (``ps``,
    ``/proc/<pid>/cmdline``) for as long as the daemon runs.
    """
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError([f"--mqtt: {redact(url)!r} is not mqtt[s]://[user@]host[:port]"])
    if u.password is not None:
        raise ConfigError(["--mqtt: a password on the command line is readable by every local user (ps, "
                           "/proc/<pid>/cmdline); give mqtt[s]://user@host:port and put the password in the "
                           "EDGELABEL_MQTT_PASSWORD environment variable (or mqtt.password_file in a config file)"])
    out: dict[str, Any] = {"enabled": True, "host": u.hostname, "port": u.port or (8883 if u.scheme == "mqtts" else 1883)}
    if u.username:
        out["username"] = unquote(u.username)
    if os.environ.get("EDGELABEL_MQTT_PASSWORD"):
        out["password"] = os.environ["EDGELABEL_MQTT_PASSWORD"]
    if u.scheme == "mqtts":
        out["tls"] = {}
    return out


def build_run_config(args: argparse.Namespace) -> Config:
    """The config file (or the bundled default) with the command-line overrides applied."""
    if args.config:
        path = Path(args.config)
        data = read_config_file(path)
        base_dir = path.resolve().parent
    else:
        data = read_config_file(DEFAULT_CONFIG)
        base_dir = Path.cwd()
        log.info("no -c given: using the bundled default config %s", DEFAULT_CONFIG)
    if args.source:
        taken: set[str] = set()
        data["sources"] = {_source_name(u, taken): {"uri": u} for u in args.source}
    if args.model:
        model = dict(data.get("model") or {})
        model["path"] = str(Path(args.model).resolve())
        if "family" in model and not args.family:
            model["family"] = "auto"
        if "labels" in model:
            model.pop("labels")
        data["model"] = model
    if args.family:
        data.setdefault("model", {})["family"] = args.family
    if args.mqtt:
        if args.mqtt == "off":
            data["mqtt"] = {**(data.get("mqtt") or {}), "enabled": False}
        else:
            data["mqtt"] = {**(data.get("mqtt") or {}), **parse_mqtt_url(args.mqtt)}
    if args.device:
        data["device_id"] = args.device
    if args.state_dir:
        data["state_dir"] = str(Path(args.state_dir).resolve())
        dataset = dict(data.get("dataset") or {})
        if not args.config or "path" not in dataset:  # the bundled default's ./dataset is no one's choice
            # the dataset goes with the job state: two quick-start daemons never write one dataset
            dataset["path"] = str(Path(data["state_dir"]) / "dataset")
            data["dataset"] = dataset
    if args.web:
        host, _, port = args.web.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError([f"--web: {args.web!r} is not HOST:PORT"])
        data["web"] = {**(data.get("web") or {}), "enabled": True, "host": host, "port": int(port)}
    if args.log_level:
        data["log_level"] = args.log_level
    try:
        return _checked_config(data, base_dir)
    except ConfigError as exc:
        if not args.config:  # the demo config's files live in the asset mirror: say where it looked
            mirror = str(mirror_folder(base_dir)) + os.sep
            if any(mirror in p for p in exc.problems):
                raise ConfigError([*exc.problems, mirror_hint(base_dir)]) from None
        raise


def _field_of(problem: str) -> str:
    """The field path a problem line starts with (``sources.a.uri`` of ``sources.a.uri: ...``)."""
    return problem.split(": ", 1)[0]


def _related(a: str, b: str) -> bool:
    """One field path is the other or lies inside it (``mqtt.tls`` and ``mqtt.tls.cert``)."""
    return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))


def _checked_config(data: Any, base_dir: str | Path) -> Config:
    """Schema and file problems in one pass: ConfigError with all of them, so one edit round fixes all."""
    cfg, problems = validate_config(data, base_dir)
    if cfg is not None:
        problems += _check_paths(cfg, problems)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _check_paths(cfg: Config, known: Sequence[str] = ()) -> list[str]:
    """File checks that need the disk, beyond the schema (model and file sources exist).

    Fields that already have a problem in ``known`` (schema problems) are not
    checked again: a field with a schema problem holds its default.
    """
    problems = [p for p in _path_problems(cfg) if not any(_related(_field_of(p), _field_of(k)) for k in known)]
    return problems


def _path_problems(cfg: Config) -> list[str]:
    from edgelabel.edge.sources import source_kind

    problems = []
    mqtt = cfg.mqtt
    if mqtt.enabled:
        files = [("mqtt.password_file", mqtt.password_file)]
        if mqtt.tls is not None:
            files += [(f"mqtt.tls.{a}", getattr(mqtt.tls, a)) for a in ("ca", "cert", "key")]
        for field_path, value in files:
            if value and not os.access(cfg.resolve(value), os.R_OK):
                problems.append(f"{field_path}: {cfg.resolve(value)}: file not found or not readable")
        if (mqtt.password or mqtt.password_file) and not mqtt.username:
            problems.append("mqtt.password: a password needs mqtt.username too")
    model = Path(os.path.normpath(cfg.resolve(cfg.model.path)))
    if cfg.model.path and not model.is_file():
        problems.append(f"model.path: {model}: file not found (an ONNX detector is expected)")
    if cfg.model.labels and not cfg.resolve(cfg.model.labels).is_file():
        problems.append(f"model.labels: {cfg.resolve(cfg.model.labels)}: file not found")
    for name, src in cfg.sources.items():
        try:
            kind, target = source_kind(src.uri)
        except ValueError:  # a bad URI is a schema problem, reported already
            continue
        if kind in ("folder", "image", "video"):
            p = Path(os.path.normpath(cfg.resolve(target)))
            if not p.exists() and not src.watch:
                problems.append(f"sources.{field_key(name)}.uri: {p}: no such file or folder")
    return problems


def _resolve_file_sources(cfg: Config) -> None:
    """Make file paths absolute against the config's folder (source keys stay stable across cwd)."""
    from edgelabel.edge.sources import source_kind

    mqtt = cfg.mqtt
    if mqtt.password_file:
        mqtt.password_file = str(cfg.resolve(mqtt.password_file))
    if mqtt.tls is not None:
        for attr in ("ca", "cert", "key"):
            value = getattr(mqtt.tls, attr)
            if value:
                setattr(mqtt.tls, attr, str(cfg.resolve(value)))
    for src in cfg.sources.values():
        kind, target = source_kind(src.uri)
        if kind in ("folder", "image", "video"):
            resolved = str(cfg.resolve(target).resolve())
            src.uri = resolved + ("/" if kind == "folder" else "")


def _install_signal_handlers(pipeline: Any) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        pipeline.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _config_errors(exc: ConfigError) -> int:
    """Print one ``config error`` line per problem; the usage exit code."""
    for line in exc.problems:
        print(f"edgelabel: config error: {line}", file=sys.stderr)
    return EXIT_USAGE


def _run_pipeline(cfg: Config, fresh: bool, show_progress: bool = True) -> tuple[int, Any]:
    from edgelabel.edge.pipeline import Pipeline, StateUnavailable
    from edgelabel.engines.base import EngineError

    _resolve_file_sources(cfg)
    pipeline = Pipeline(cfg, fresh=fresh, show_progress=show_progress)
    _install_signal_handlers(pipeline)
    try:
        code = pipeline.run()
    except StateUnavailable as exc:  # a remount or freed space fixes it, not an edit
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_FAILED, None
    except EngineError as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_USAGE, pipeline
    except ConfigError as exc:
        return _config_errors(exc), pipeline
    return code, pipeline


def _validated_run_config(args: argparse.Namespace) -> Config:
    cfg = build_run_config(args)  # schema and file problems, all at once
    _resolve_file_sources(cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from edgelabel.edge.daemon import run_daemon
    from edgelabel.edge.pipeline import StateUnavailable
    from edgelabel.engines.base import DeviceError, EngineError

    try:
        cfg = _validated_run_config(args)
    except ConfigError as exc:
        return _config_errors(exc)
    setup_logging(cfg.log_level)
    reload_config = (lambda: _validated_run_config(args)) if args.config else None
    try:
        code, pipeline = run_daemon(cfg, fresh=args.fresh, reload_config=reload_config)
    except DeviceError as exc:  # the GPU failed, not the model: worth a restart
        print(f"edgelabel: {exc} (a device error: retrying may help)", file=sys.stderr)
        return EXIT_FAILED
    except StateUnavailable as exc:  # read-only, full or unmounted state_dir: the unit restarts on 1
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EngineError as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        return _config_errors(exc)
    t = pipeline.totals
    log.info("done: %d frames, %d detections, %d rejected", t.frames, t.detections, t.rejected)
    review = _review_line(cfg, pipeline, storage_only=False)
    if review:
        log.info("%s", review)
    return code


def cmd_label(args: argparse.Namespace) -> int:
    """One-shot auto-labeling of a folder, image or video into a dataset, no config file."""
    inp = Path(args.input)
    if not inp.exists():
        print(f"edgelabel: {inp}: no such file or folder (give a folder of images, an image or a video)",
              file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out).resolve()
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    data: dict[str, Any] = {
        "device_id": args.device or "edge-01",
        "state_dir": str(out / ".edgelabel"),
        "log_level": args.log_level or "info",
        "model": {"path": str(Path(args.model).resolve()), "family": args.family or "auto",
                  "conf": args.conf, "iou": args.iou},
        "sources": {_source_name(str(inp), set()): {"uri": str(inp.resolve()) + ("/" if inp.is_dir() else "")}},
        "mqtt": {"enabled": False},
        "dataset": {"enabled": True, "path": str(out), "formats": formats, "coco_interval": 30.0,
                    "save_images": "always"},  # images/ + labels/: a training set as it is
    }
    if args.labels:
        data["model"]["labels"] = str(Path(args.labels).resolve())
    try:
        cfg = config_from_dict(data, base_dir=Path.cwd())
        problems = _check_paths(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"edgelabel: {line.replace('dataset.formats', '--format').replace('model.', '--')}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.log_level)
    started = time.monotonic()
    code, pipeline = _run_pipeline(cfg, args.fresh)
    if code == EXIT_USAGE or pipeline is None:  # nothing ran: the error is printed
        return code
    elapsed = time.monotonic() - started
    t = pipeline.totals
    lines = [
        f"labeled {t.frames} frame(s) in {elapsed:.1f} s ({t.frames / elapsed if elapsed else 0:.1f} fps), "
        f"{t.detections} detection(s), {t.rejected} rejected",
    ]
    if t.by_class:
        lines.append("classes: " + ", ".join(f"{k} {v}" for k, v in t.by_class.most_common()))
    review = _review_line(cfg, pipeline)
    if review:
        lines.append(review)
    already = _done_before(cfg, t.frames)
    if already:
        lines.append(f"skipped {already} frame(s) labeled in an earlier run with the same model and thresholds "
                     "(--fresh labels them again)")
    lines.append(f"dataset: {out}")
    if t.rejected:
        lines.append(f"rejected inputs: {pipeline.rejected_report}")
    print("\n".join(lines))
    return code


def _review_line(cfg: Config, pipeline: Any, storage_only: bool = True) -> str | None:
    """What the dataset sends to a person: this run's needs_review frames, and the dataset's total.

    ``storage_only``: every source follows ``dataset.capture.storage`` (``edgelabel label``), so its band
    says why; otherwise the per-source policies do (docs/review.md).
    """
    dataset = next((s for s in pipeline.sinks or [] if s.name == "dataset"), None)
    if dataset is None:
        return None
    st = dataset.status()
    now = sum(c.get("needs_review", 0) for c in st["capture"].values())
    total = st["states"]["needs_review"]
    band = cfg.dataset.capture.storage.near_threshold
    storage_only = storage_only and not cfg.dataset.capture.sources
    why = (f"a detection scored in [{band.low:g}, {band.high:g})" if storage_only and band is not None
           else "their capture policy")
    return (f"review: {now} frame(s) of this run need a person's look ({why}), {total} in the dataset; "
            "the web page's Review shows them, `edgelabel export --state needs_review` exports them")


def _done_before(cfg: Config, labeled_now: int) -> int:
    """Frames of this job's ledger that an earlier run labeled (the ones this run skipped)."""
    from edgelabel.edge.ledger import Ledger

    path = cfg.resolve(cfg.state_dir) / "ledger.sqlite"
    if not path.is_file():
        return 0
    try:
        ledger = Ledger(path)
    except sqlite3.Error:
        return 0
    try:
        return max(ledger.done_count() - labeled_now, 0)
    finally:
        ledger.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgelabel.edge.doctor import run_doctor

    return int(run_doctor(args.config, args.json))


def _model_problem(cfg: Config, known: Sequence[str]) -> str | None:
    """Open the model as ``run`` would (edge.loader.probe_model): run's message when it is not usable.

    Skipped while a ``model.*`` field has a problem (the model cannot be judged with a wrong setting).
    """
    from edgelabel.edge.loader import probe_model
    from edgelabel.engines.base import EngineError

    if any(_field_of(k) == "(top level)" or _related(_field_of(k), "model") for k in known):
        return None
    try:
        detector = probe_model(cfg)
    except EngineError as exc:
        return f"model.path: {exc}"
    if detector is not None:
        detector.close()
    return None


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem at once: schema, files on disk, and whether the model is a detector ``run`` can use."""
    path = Path(args.file)
    try:
        data = read_config_file(path)
    except ConfigError as exc:  # the file itself: its lines start with the file name already
        for line in exc.problems:
            print(line, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg, problems = validate_config(data, base_dir=path.resolve().parent)
        if cfg is not None:
            problems += _check_paths(cfg, problems)
            model_problem = _model_problem(cfg, problems)
            if model_problem:
                problems.append(model_problem)
        if problems or cfg is None:
            raise ConfigError(problems)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"{path}: {line}", file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    names = ", ".join(cfg.sources)
    print(f"{path}: OK ({len(cfg.sources)} source(s): {names}; model {cfg.resolve(cfg.model.path)})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export the dataset's frames in the chosen review states to a folder or zip (edge/export.py)."""
    from edgelabel.edge.export import ExportError, export_dataset

    if args.db or args.frames or args.ingest_config:
        return _central_export(args)
    setup_logging(args.log_level or "warning")
    if args.dataset:
        root = Path(args.dataset)
    else:
        try:
            cfg = _read_config(args.config)
        except ConfigError as exc:
            return _config_errors(exc)
        root = cfg.resolve(cfg.dataset.path) if cfg is not None else Path("dataset")  # the default: ./dataset
    try:
        res = export_dataset(root, args.format, Path(args.out), states=args.state, val_fraction=args.val,
                             image_prefix=args.image_prefix, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as exc:
        print(f"edgelabel: export failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    skipped = f", {len(res.missing)} skipped (image gone)" if res.missing else ""
    print(f"exported {res.images} image(s), {res.annotations} box(es) as {res.format} "
          f"({', '.join(res.states)}) to {res.path}{skipped}")
    return EXIT_OK


def _central_export(args: argparse.Namespace) -> int:
    """``edgelabel export --db DSN --frames DIR``: the plant store's frames of every appliance (ingest/export.py)."""
    setup_logging(args.log_level or "info")  # the export's progress is in the log
    if args.format not in ("yolo", "coco"):
        print(f"edgelabel export: --format {args.format}: the central export (--db) writes yolo or coco", file=sys.stderr)
        return EXIT_USAGE
    if not (args.db or args.ingest_config):
        print("edgelabel export: the central export needs --db postgresql://... (or --ingest-config ingest.yaml)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.db and urlsplit(args.db).password:
        print("edgelabel export: --db holds a password, and a command line is readable by every local user; "
              "give --db postgresql://user@host/dbname and the password in PGPASSWORD (or ~/.pgpass)", file=sys.stderr)
        return EXIT_USAGE
    try:
        from edgelabel.ingest.export import main as central_main
    except ImportError as exc:
        log.error("edgelabel export --db needs the ingest extra (%s): pip install 'edgelabel[ingest]'", exc)
        return EXIT_USAGE
    return central_main(args.db, args.frames, args.format, args.out, val=args.val, devices=args.device,
                        overwrite=args.overwrite, config=args.ingest_config)


def _read_config(path: str | None) -> Config | None:
    """The settings of the config file given with -c (None without one); ConfigError when invalid."""
    if not path:
        return None
    return config_from_dict(read_config_file(path), base_dir=Path(path).resolve().parent)


def cmd_eval(args: argparse.Namespace) -> int:
    """COCO mAP of a model on a YOLO-format labeled folder (the same scoring as the INT8 gate)."""
    from edgelabel.edge.evaluate import DatasetError, NoGroundTruthError, evaluate, format_result, load_yolo_dataset
    from edgelabel.engines.base import EngineError
    from edgelabel.engines.detector import load_detector

    setup_logging(args.log_level or "warning")
    try:
        dataset = load_yolo_dataset(args.data, split=args.split)
        detector = load_detector(args.model, engine=args.engine, family=args.family, conf=args.conf, iou=args.iou,
                                 labels=args.labels)
    except (DatasetError, EngineError, OSError) as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = evaluate(detector, dataset, progress=True)
    except NoGroundTruthError as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        detector.close()
    print(f"{Path(args.model).name} on {args.data} ({detector.engine.type_name}, conf {args.conf}, iou {args.iou})")
    print(format_result(result))
    return EXIT_OK


def cmd_build_engine(args: argparse.Namespace) -> int:
    """Build (or find in the cache) the TensorRT engine the daemon will use, ahead of time."""
    from edgelabel.edge.loader import calibration_folder, calibration_manifest, calibration_split
    from edgelabel.engines.base import EngineError
    from edgelabel.engines.select import cuda_gpu_count, tensorrt_importable

    setup_logging(args.log_level or "info")
    try:
        cfg = _read_config(args.config)
    except ConfigError as exc:
        return _config_errors(exc)
    if not tensorrt_importable():
        print("edgelabel: TensorRT's Python bindings are not installed (JetPack: sudo apt install python3-libnvinfer; "
              "desktop: pip install tensorrt); the daemon runs ONNX Runtime instead", file=sys.stderr)
        return EXIT_FAILED
    if cuda_gpu_count() == 0:
        print("edgelabel: no CUDA GPU answers (driver not loaded, or not an NVIDIA machine); "
              "engines are built on the device that runs them", file=sys.stderr)
        return EXIT_FAILED
    from edgelabel.engines.tensorrt import TensorRTEngine

    cache = Path(args.cache_dir) if args.cache_dir else (cfg.state_path("engines") if cfg else None)
    calib = None
    if args.precision == "int8":
        folder = Path(args.calib) if args.calib else calibration_folder(cfg) if cfg is not None else None
        limit = cfg.model.calibration_images if cfg is not None else 500
        manifest = calibration_manifest(cfg) if cfg is not None else None
        calib = calibration_split(folder, limit, manifest)[0] if folder is not None else []
        if not calib:
            print(f"edgelabel: --precision int8 needs calibration images: {folder or 'give --calib DIR'} "
                  "has none (a folder of site images)", file=sys.stderr)
            return EXIT_USAGE
    try:
        engine = TensorRTEngine(args.model, precision=args.precision, workspace_mb=args.workspace_mb,
                                cache_dir=cache, calib_images=calib, input_size=args.input_size,
                                family=args.family)
    except EngineError as exc:
        print(f"edgelabel: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        info = engine.info()
        how = "found in the cache" if engine.cache_hit else f"built in {engine.build_seconds:.1f} s"
        print(f"engine: {engine.engine_file} ({how})")
        print(f"runs on: {info.provider}, precision {info.precision}")
        for spec in engine.inputs:
            print(f"input  {spec.name}: {list(spec.shape)} {spec.dtype}")
        for spec in engine.outputs:
            print(f"output {spec.name}: {list(spec.shape)} {spec.dtype}")
    finally:
        engine.close()
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    """The outbox's dead-letter table: messages the broker refused for good (edgelabel.edge.sinks.outbox)."""
    from edgelabel.edge.sinks import outbox

    path = args.file
    if path is None:
        cfg = _read_config(args.config) if args.config else None
        if cfg is None:
            print("edgelabel outbox: give the outbox file or -c CONFIG (it is state_dir/outbox.sqlite)", file=sys.stderr)
            return EXIT_USAGE
        path = str(cfg.state_path(cfg.mqtt.outbox.path))
    return outbox.main([args.action, path])


def cmd_ingest(args: argparse.Namespace) -> int:
    """The plant-side ingest service; imported only here so the daemon never loads it (nor psycopg)."""
    setup_logging(args.log_level or "info")
    frames_flags = [f for f in ("failed", "pending", "fetched", "requeue", "device", "record", "json") if getattr(args, f)]
    if args.action == "run" and frames_flags:
        log.error("edgelabel ingest: --%s belongs to 'edgelabel ingest frames ...'", frames_flags[0])
        return EXIT_USAGE
    try:
        from edgelabel.ingest.service import main as ingest_main
        if args.action == "frames":
            from edgelabel.ingest.frames import frames_command as ingest_main
    except ImportError as exc:
        log.error("edgelabel ingest needs the ingest extra (%s): pip install 'edgelabel[ingest]'", exc)
        return EXIT_USAGE
    return ingest_main(args)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelabel", description="Edge auto-labeling: detectors on cameras and files, "
                                "labels over MQTT and on disk.")
    p.add_argument("--version", action="version", version=f"edgelabel {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon (the bundled demo config when -c is not given)")
    r.add_argument("-c", "--config", help="YAML config file (default: the bundled demo config)")
    r.add_argument("--source", action="append", metavar="URI",
                   help="replace the config's sources (repeatable): a path, file://, v4l2://, rtsp://, csi://, gst://")
    r.add_argument("--model", metavar="PATH", help="ONNX detector (replaces model.path)")
    r.add_argument("--family", choices=list(FAMILIES), help="model family")
    r.add_argument("--mqtt", metavar="URL",
                   help="mqtt[s]://[user@]host:port (the password from EDGELABEL_MQTT_PASSWORD, never in the URL), or 'off'")
    r.add_argument("--device", metavar="ID", help="device id used in topics and records")
    r.add_argument("--web", metavar="HOST:PORT", help="serve the web page on HOST:PORT")
    r.add_argument("--state-dir", metavar="DIR", help="where the ledger and reports live (and the dataset, "
                   "as DIR/dataset, unless the config sets dataset.path)")
    r.add_argument("--fresh", action="store_true", help="forget which frames were already labeled")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)

    lab = sub.add_parser("label", help="label a folder, image or video into a dataset (no config file)")
    lab.add_argument("input", help="folder of images, an image or a video file")
    lab.add_argument("--model", required=True, metavar="PATH", help="ONNX detector")
    lab.add_argument("--out", default="labeled", metavar="DIR", help="dataset folder (default: ./labeled)")
    lab.add_argument("--format", default="yolo,coco", help="comma list of yolo, coco (default: both)")
    lab.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    lab.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    lab.add_argument("--family", choices=list(FAMILIES))
    lab.add_argument("--labels", metavar="FILE", help="class names, one per line")
    lab.add_argument("--device", metavar="ID")
    lab.add_argument("--fresh", action="store_true", help="label everything again")
    lab.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    lab.set_defaults(func=cmd_label)

    d = sub.add_parser("doctor", help="check this machine for everything the configured job needs")
    d.add_argument("-c", "--config", help="YAML config file (default: the bundled demo config)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    e = sub.add_parser("export", help="export the dataset as yolo, coco, voc, cvat or labelstudio (folder or .zip)")
    e.add_argument("out", metavar="OUT", help="output folder, or a .zip file")
    e.add_argument("--format", required=True, choices=["yolo", "coco", "voc", "cvat", "labelstudio"])
    e.add_argument("--state", default="accepted,corrected,auto_accepted",
                   help="comma list of review states to export (default: accepted,corrected,auto_accepted)")
    e.add_argument("--dataset", metavar="DIR", help="dataset folder (default: dataset.path of -c, else ./dataset)")
    e.add_argument("-c", "--config", help="take the dataset folder from this config file")
    e.add_argument("--val", type=float, default=0.0, metavar="FRACTION",
                   help="yolo: put this share of the frames (by record id) in val (default 0: val = train)")
    e.add_argument("--image-prefix", metavar="URL",
                   help="labelstudio: start of every image URL (default /data/local-files/?d=<OUT name>/)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--db", metavar="DSN", help="central export: the plant's ingest database (postgresql://...); "
                   "one yolo or coco folder merged from every appliance, reviewed boxes preferred")
    e.add_argument("--frames", metavar="DIR", help="central export: the frame folder ingest fills (frames.folder)")
    e.add_argument("--ingest-config", metavar="FILE", help="central export: ingest.yaml (database, and the frame "
                   "store: folder or s3)")
    e.add_argument("--device", action="append", metavar="ID", help="central export: only this appliance (repeat)")
    e.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="COCO mAP50-95 / mAP50 of a model on a YOLO-format labeled folder")
    v.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and labels/ (or its data.yaml)")
    v.add_argument("--model", required=True, metavar="PATH", help="ONNX detector (or a TensorRT .engine)")
    v.add_argument("--split", metavar="NAME", help="images/NAME and labels/NAME only (e.g. val)")
    v.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    v.add_argument("--family", default="auto", choices=list(FAMILIES))
    v.add_argument("--labels", metavar="FILE", help="class names, one per line")
    v.add_argument("--conf", type=float, default=0.001, help="confidence threshold (default 0.001, as for mAP)")
    v.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    v.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    v.set_defaults(func=cmd_eval)

    b = sub.add_parser("build-engine", help="build the TensorRT engine for a model ahead of time (on the device)")
    b.add_argument("model", metavar="MODEL", help="ONNX detector")
    b.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    b.add_argument("--calib", metavar="DIR", help="int8: folder of calibration images (site images)")
    b.add_argument("-c", "--config", help="use this config's engine cache (state_dir/engines) and calibration folder")
    b.add_argument("--cache-dir", metavar="DIR", help="engine cache folder (default: the config's, else ~/.cache)")
    b.add_argument("--input-size", metavar="HxW", help="for models with a dynamic input size (default 640x640)")
    b.add_argument("--family", default="auto", choices=list(FAMILIES))
    b.add_argument("--workspace-mb", type=int, default=1024)
    b.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    b.set_defaults(func=cmd_build_engine)

    i = sub.add_parser("ingest", help="plant side: store what appliances publish over MQTT in PostgreSQL "
                       "(docs/ingest.md; needs the ingest extra)")
    i.add_argument("action", nargs="?", choices=["run", "frames"], default="run",
                   help="run (the default): the service; frames: list the fetched/pending/failed frames, or requeue "
                   "the failed ones")
    i.add_argument("-c", "--config", help="ingest.yaml (the quick flags below override it)")
    i.add_argument("--mqtt", metavar="URL", help="mqtt://[user@]host:port (password from EDGELABEL_MQTT_PASSWORD)")
    i.add_argument("--db", metavar="DSN", help="postgresql://[user@]host[:port]/dbname (password from PGPASSWORD)")
    i.add_argument("--group", metavar="NAME", help="MQTT share group (workers of one group split the load)")
    i.add_argument("--client-id", metavar="ID", help="this worker's fixed MQTT client id (one per worker)")
    i.add_argument("--http", metavar="HOST:PORT", help="/healthz and /metrics (default 127.0.0.1:9184; 'off')")
    i.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    f = i.add_mutually_exclusive_group()
    f.add_argument("--failed", action="store_true", help="frames: list the frames that failed, with the reason")
    f.add_argument("--pending", action="store_true", help="frames: list the frames waiting to be fetched")
    f.add_argument("--fetched", action="store_true", help="frames: list the frames in the store")
    f.add_argument("--requeue", action="store_true", help="frames: put the failed frames back to pending")
    i.add_argument("--device", help="frames: only this appliance's")
    i.add_argument("--record", action="append", metavar="ID", help="frames --requeue: only this record (repeat)")
    i.add_argument("--limit", type=int, default=1000, help="frames: at most this many lines (default 1000)")
    i.add_argument("--json", action="store_true", help="frames: JSON output")
    i.set_defaults(func=cmd_ingest)

    o = sub.add_parser("outbox", help="list, export or requeue the messages the broker refused for good "
                       "(stop the daemon before requeue)")
    o.add_argument("action", choices=["list", "export", "requeue"])
    o.add_argument("file", nargs="?", help="the outbox file (default: state_dir/outbox.sqlite of -c CONFIG)")
    o.add_argument("-c", "--config", help="the daemon's config file, to find the outbox")
    o.set_defaults(func=cmd_outbox)

    add_account_parsers(sub)  # user, token: the web accounts (edge/accounts_cli.py)

    c = sub.add_parser("check-config", help="validate a config file without starting anything")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # a watchdog kill (SIGABRT) or a fatal error then prints every thread's stack to the log
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (embedded, captured)
        pass
    args = make_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Keep every labeled frame as a training dataset on disk: YOLO txt + COCO JSON over a SQLite index.

Layout under the dataset root::

    images/<source>/<name>.<jpg|png>   stored copies of frames (cameras, video; all frames with save_images: always)
    labels/<source>/<stem>.txt         YOLO labels: ``class cx cy w h`` normalised, 6 decimals; empty = no objects
    classes.txt  data.yaml             class list, Ultralytics dataset file (train/val: images)
    annotations.coco.json              COCO detection JSON, regenerated from the index
    index.sqlite                       one row per record: the source of truth for the COCO file

Naming, chosen so that a frame processed twice (after a crash) lands on the same files:

* stored copy of a frame without a file: ``images/<source>/<index:08d>_<id[:8]>.<ext>``
* stored copy of a file frame (save_images: always): ``images/<source>/<original stem>_<id[:8]>.<ext>``
* its YOLO label: ``labels/<source>/<stored stem>.txt`` (the Ultralytics images/ -> labels/ convention)
* a referenced original (folder/image sources, save_images auto/never) is not copied; its label is
  ``labels/<source>/<original stem>_<id[:8]>.txt`` -- unique even when sub-folders repeat a stem.
  Ultralytics cannot pair these by path, so the COCO image entry carries the mapping:
  ``file_name`` is the absolute original path and ``edgelabel_label_file`` the label file.

COCO specifics: ``category_id = model class_id + 1`` (COCO ids are 1-based); every category also
carries ``edgelabel_class_id`` so the map is explicit.  ``bbox`` is ``[x, y, w, h]`` in pixels, clipped
to the frame, and every annotation keeps the detector's ``score``.  Image ids are the index's rowid,
so they stay stable across rewrites (upserts keep the rowid, which INSERT OR REPLACE would not).

Failure policy: the dataset is secondary to delivering labels, so a disk error (ENOSPC, EACCES,
EROFS, SQLite "disk full") is logged as ERROR with the path and errno text, counted in
``status()['errors']``, flips ``status()['ok']`` to False and skips that record -- it never raises
into the pipeline.  Every file is written to a temporary name and renamed, so a failure or a crash
leaves either the old file or the new one, never a partial one.  The next successful write sets
``ok`` back to True.

Durability trade-off: only the COCO file is fsync'ed; images and labels are renamed without fsync
(per-frame fsync is too slow on eMMC/SD), and SQLite runs WAL with synchronous=NORMAL.  After a
power cut the last few frames may be missing, but reprocessing them overwrites the same names.

Threading: ``open``/``prepare``/``write``/``flush``/``close`` are called by one thread at a time (the
pipeline opens and closes from the main thread and writes from the sink worker); ``status`` may be
called from any thread and only reads counters under ``self._lock``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from edge.config import DatasetConfig
from edge.frame import Frame
from edge.records import LabelRecord, iso_utc
from edge.sinks.base import Sink

log = logging.getLogger(__name__)

COCO_FILE = "annotations.coco.json"
INDEX_FILE = "index.sqlite"
#: while writes keep failing, repeat the ERROR at most this often (seconds)
ERROR_LOG_INTERVAL = 30.0
#: COCO rewrites may take at most ~1/COCO_BUDGET of the sink thread's time on big datasets
COCO_BUDGET = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,          -- the record id (uuid5 of device, source, frame key)
    source TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    frame_index INTEGER NOT NULL,
    image_path TEXT,              -- COCO file_name: relative for stored copies, absolute for originals
    label_path TEXT NOT NULL,     -- YOLO txt, relative to the dataset root
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    detections TEXT NOT NULL,     -- JSON list of {class_id, label, score, box: [x1, y1, x2, y2]}
    n_detections INTEGER NOT NULL,
    created REAL NOT NULL         -- epoch seconds of the first write
);
"""
_UPSERT = """
INSERT INTO records (id, source, frame_key, frame_index, image_path, label_path, width, height,
                     captured_at, detections, n_detections, created)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    source = excluded.source, frame_key = excluded.frame_key, frame_index = excluded.frame_index,
    image_path = excluded.image_path, label_path = excluded.label_path, width = excluded.width,
    height = excluded.height, captured_at = excluded.captured_at, detections = excluded.detections,
    n_detections = excluded.n_detections
"""


@dataclass(frozen=True)
class _Plan:
    """Where one record's pixels and labels go, decided in ``prepare`` and used by ``write``."""

    image: str | None  # COCO file_name; None when no pixels are kept anywhere
    label: str  # YOLO txt relative to the root
    failed: bool = False  # the stored copy could not be written: skip the record


class DatasetSink(Sink):
    """Writes stored frames, YOLO labels, a COCO file and a SQLite index under ``root``."""

    name = "dataset"

    def __init__(self, cfg: DatasetConfig, root: Path, class_names: list[str], model_name: str) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.class_names = list(class_names)
        self.model_name = model_name
        self.formats = set(cfg.formats)
        self._db: sqlite3.Connection | None = None
        self._dirs: set[Path] = set()  # folders known to exist, to skip a mkdir per frame
        self._plan: tuple[str, _Plan] | None = None
        self._coco_dirty = True
        self._coco_due = 0.0  # time.monotonic() after which write() may regenerate the COCO file
        self._lock = threading.Lock()
        self._images = 0
        self._annotations = 0
        self._errors = 0
        self._ok = True
        self._last_write_at: float | None = None
        self._last_error: str | None = None
        self._last_error_log = float("-inf")
        self._unlogged_errors = 0

    # ------------------------------------------------------------------ Sink API

    def open(self) -> None:
        """Create the layout and the index; a failure is reported and retried on the next write."""
        self._ensure_open()

    def prepare(self, record: LabelRecord, frame: Frame) -> None:
        """Store the pixels if the policy says so and point ``record.frame_path``/``frame_sha256`` at them.

        Runs before any sink's ``write`` so the MQTT record names the exact stored pixels.
        """
        self._plan = (record.id, self._store_frame(record, frame))

    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Index the record and write its YOLO label; the COCO file follows at most every coco_interval."""
        plan = self._plan[1] if self._plan and self._plan[0] == record.id else self._store_frame(record, frame)
        self._plan = None
        if plan.failed or not self._ensure_open():
            return
        assert self._db is not None
        boxes = _clipped_boxes(record)
        label_path = self.root / plan.label
        try:
            if "yolo" in self.formats:
                _write_atomic(self._dir_ready(label_path), _yolo_text(boxes, record.width, record.height).encode())
            with self._db:
                row = self._db.execute("SELECT n_detections FROM records WHERE id = ?", (record.id,)).fetchone()
                self._db.execute(
                    _UPSERT,
                    (
                        record.id,
                        record.source,
                        record.frame_key,
                        record.frame_index,
                        plan.image,
                        plan.label,
                        record.width,
                        record.height,
                        record.captured_at,
                        json.dumps(boxes, separators=(",", ":")),
                        len(boxes),
                        time.time(),
                    ),
                )
        except (OSError, sqlite3.Error) as exc:
            self._report_error("write labels for", label_path if isinstance(exc, OSError) else self._index_path, exc)
            return
        with self._lock:
            if row is None:
                self._images += 1
                self._annotations += len(boxes)
            else:
                self._annotations += len(boxes) - row[0]
            self._last_write_at = time.time()
        self._report_success()
        self._coco_dirty = True
        if time.monotonic() >= self._coco_due:
            self._write_coco()

    def flush(self) -> None:
        """Regenerate the COCO file now if anything changed since the last one."""
        self._write_coco()

    def close(self) -> None:
        """Write the final COCO file and close the index."""
        self.flush()
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - close only fails on a broken database
                self._report_error("close", self._index_path, exc)
            self._db = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "path": str(self.root),
                "images": self._images,
                "annotations": self._annotations,
                "errors": self._errors,
                "ok": self._ok,
                "last_write_at": self._last_write_at,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ set-up

    @property
    def _index_path(self) -> Path:
        return self.root / INDEX_FILE

    def _ensure_open(self) -> bool:
        """Open the index and write the class files once; False (reported) while that is impossible."""
        if self._db is not None:
            return True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._index_path, check_same_thread=False, timeout=10.0)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                images, annotations = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(n_detections), 0) FROM records"
                ).fetchone()
                if "yolo" in self.formats:
                    self._write_class_files()
            except BaseException:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._report_error("open the dataset at", self.root, exc)
            return False
        self._db = db
        with self._lock:
            self._images, self._annotations = int(images), int(annotations)
        log.info("dataset: %s (%d image(s), %d annotation(s) so far)", self.root, images, annotations)
        return True

    def _write_class_files(self) -> None:
        names = "".join(f"{n}\n" for n in self.class_names)
        _write_atomic(self.root / "classes.txt", names.encode())
        data = {
            "path": str(self.root.resolve()),
            "train": "images",
            "val": "images",
            "names": dict(enumerate(self.class_names)),
        }
        header = (
            f"# edgelabel auto-labels by {self.model_name}. YOLO labels of stored frames sit under labels/;\n"
            f"# referenced original files are listed with their label file in {COCO_FILE}.\n"
        )
        _write_atomic(self.root / "data.yaml", (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode())

    def _dir_ready(self, path: Path) -> Path:
        """Create ``path``'s folder on first use; returns ``path``."""
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        return path

    # ------------------------------------------------------------------ pixels

    def _store_frame(self, record: LabelRecord, frame: Frame) -> _Plan:
        """Apply save_images: write an encoded copy, or reference the original file, or keep nothing."""
        source = _safe_component(record.source)
        short = record.id[:8]
        mode = self.cfg.save_images
        original = os.path.abspath(frame.path) if frame.path else None
        if mode == "always" or (mode == "auto" and original is None):
            stem = f"{Path(original).stem}_{short}" if original else f"{frame.index:08d}_{short}"
            rel = f"images/{source}/{stem}.{self.cfg.image_format}"
            try:
                data = self._encode(frame.image)
                _write_atomic(self._dir_ready(self.root / rel), data)
            except (OSError, ValueError) as exc:
                self._report_error("store frame", self.root / rel, exc)
                record.frame_path, record.frame_sha256 = original, None  # never point at pixels that are not there
                return _Plan(None, f"labels/{source}/{stem}.txt", failed=True)
            record.frame_path, record.frame_sha256 = rel, hashlib.sha256(data).hexdigest()
            return _Plan(rel, f"labels/{source}/{stem}.txt")
        if original is not None:
            record.frame_path, record.frame_sha256 = original, _file_sha256(original)
            return _Plan(original, f"labels/{source}/{Path(original).stem}_{short}.txt")
        record.frame_path, record.frame_sha256 = None, None
        return _Plan(None, f"labels/{source}/{frame.index:08d}_{short}.txt")

    def _encode(self, image: np.ndarray) -> bytes:
        if self.cfg.image_format == "png":
            ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast: edge CPUs are slow
        else:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image.shape} {image.dtype} frame as {self.cfg.image_format}")
        return buf.tobytes()

    # ------------------------------------------------------------------ COCO

    def _write_coco(self) -> None:
        """Regenerate the COCO file from the index (tmp + fsync + rename) if anything changed."""
        if "coco" not in self.formats or not self._coco_dirty or not self._ensure_open():
            return
        assert self._db is not None
        t0 = time.monotonic()
        path = self.root / COCO_FILE
        try:
            rows = self._db.execute(
                "SELECT rowid, id, source, frame_key, image_path, label_path, width, height, captured_at, detections"
                " FROM records ORDER BY rowid"
            ).fetchall()
            data = json.dumps(self._coco(rows), separators=(",", ":"), ensure_ascii=False).encode()
            _write_atomic(path, data, fsync=True)
        except (OSError, sqlite3.Error) as exc:
            self._report_error("write", path, exc)
            return
        self._coco_dirty = False
        spent = time.monotonic() - t0
        # a big dataset makes every rewrite slower: space them out so they never dominate the sink thread
        self._coco_due = time.monotonic() + max(self.cfg.coco_interval, COCO_BUDGET * spent)
        log.debug("dataset: wrote %s (%d images) in %.3f s", path, len(rows), spent)

    def _coco(self, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
        categories = [
            {"id": i + 1, "name": n, "supercategory": "object", "edgelabel_class_id": i}
            for i, n in enumerate(self.class_names)
        ]
        known = set(range(len(self.class_names)))
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for rowid, rid, source, key, image_path, label_path, width, height, captured_at, dets_json in rows:
            images.append(
                {
                    "id": rowid,
                    # not a file when the frame was not kept (save_images: never on a camera): the frame key
                    "file_name": image_path if image_path is not None else key,
                    "width": width,
                    "height": height,
                    "edgelabel_record_id": rid,
                    "captured_at": captured_at,
                    "edgelabel_source": source,
                    "edgelabel_frame_key": key,
                    "edgelabel_label_file": label_path,
                }
            )
            for det in json.loads(dets_json):
                cls = det["class_id"]
                if cls not in known:  # a model with more outputs than names: keep the category list valid
                    known.add(cls)
                    categories.append(
                        {"id": cls + 1, "name": det["label"], "supercategory": "object", "edgelabel_class_id": cls}
                    )
                x1, y1, x2, y2 = det["box"]
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": rowid,
                        "category_id": cls + 1,
                        "bbox": [x1, y1, round(w, 2), round(h, 2)],
                        "area": round(w * h, 2),
                        "iscrowd": 0,
                        "segmentation": [],
                        "score": det["score"],
                    }
                )
        return {
            "info": {
                "description": (
                    f"edgelabel auto-labels by {self.model_name}. category_id = model class_id + 1. "
                    "file_name is relative to the dataset root for stored copies and absolute for referenced "
                    "originals; edgelabel_label_file is the YOLO label of each image."
                ),
                "version": "1",
                "year": time.gmtime().tm_year,
                "contributor": "edgelabel",
                "date_created": iso_utc(time.time()),
                "edgelabel_model": self.model_name,
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": sorted(categories, key=lambda c: c["id"]),
        }

    # ------------------------------------------------------------------ reporting

    def _report_error(self, what: str, path: Path | str, exc: BaseException) -> None:
        """Count the failure, mark the dataset unhealthy and log it (ERROR, rate-limited while it lasts)."""
        if isinstance(exc, OSError) and exc.errno is not None:
            where = exc.filename or path
            detail = f"{exc.strerror or os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
        else:
            where = path
            code = getattr(exc, "sqlite_errorname", None)
            detail = f"{exc} ({code})" if code else str(exc)
        self._dirs.clear()  # a folder may have vanished (unmounted, deleted): recreate on the next write
        now = time.monotonic()
        with self._lock:
            was_ok = self._ok
            self._errors += 1
            self._ok = False
            self._last_error = f"{where}: {detail}"
            self._unlogged_errors += 1
            if not was_ok and now - self._last_error_log < ERROR_LOG_INTERVAL:
                return
            self._last_error_log = now
            count, self._unlogged_errors = self._unlogged_errors, 0
            total = self._errors
        more = f" ({count} failure(s) since the last report, {total} in total)" if not was_ok else ""
        log.error(
            "dataset: cannot %s %s: %s%s; the dataset skips it, labels still go to the other sinks",
            what,
            where,
            detail,
            more,
        )

    def _report_success(self) -> None:
        with self._lock:
            if self._ok:
                return
            self._ok = True
            total = self._errors
        log.warning("dataset: writing to %s again (%d error(s) so far)", self.root, total)


# ---------------------------------------------------------------------- helpers


def _write_atomic(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            exc.filename = str(path)  # report the file the caller asked for, not our temporary name
        raise
    if fsync:
        try:
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)  # make the rename itself durable
        except OSError:
            pass
        finally:
            os.close(fd)


def _file_sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        log.warning("dataset: cannot hash %s (%s); frame_sha256 left empty", path, exc.strerror or exc)
        return None
    return h.hexdigest()


def _safe_component(name: str) -> str:
    """A source name as one path component (config names are already safe; '.' and '..' are not)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "_"


def _clipped_boxes(record: LabelRecord) -> list[dict[str, Any]]:
    """Detections clipped to the frame, empty boxes dropped: what both label formats describe."""
    w, h = record.width, record.height
    out: list[dict[str, Any]] = []
    for d in record.detections:
        x1, y1, x2, y2 = (float(v) for v in d.box)
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if x2 <= x1 or y2 <= y1:
            continue
        out.append({"class_id": d.class_id, "label": d.label, "score": d.score, "box": [x1, y1, x2, y2]})
    return out


def _yolo_text(boxes: list[dict[str, Any]], width: int, height: int) -> str:
    lines = []
    for b in boxes:
        x1, y1, x2, y2 = b["box"]
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"{b['class_id']} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
    return "".join(lines)

"""Keep the frames a capture policy selects as a training dataset: YOLO txt + COCO JSON over a SQLite index.

Layout under the dataset root::

    images/<source>/<name>.<jpg|png>   stored copies of frames (cameras, video; all frames with save_images: always)
    labels/<source>/<stem>.txt         YOLO labels: ``class cx cy w h`` normalised, 6 decimals; empty = no objects
    rejected/images/<source>/...       stored copies of frames a reviewer rejected (no label file: out of training)
    classes.txt  data.yaml             class list, Ultralytics dataset file (train/val: images)
    annotations.coco.json              COCO detection JSON (rejected frames left out), regenerated from the index
    index.sqlite                       one row per record: the source of truth for everything above
    edgelabel.lock                     flock held by the one process that writes the dataset (see lock_dataset)

Which frames: :mod:`edge.capture` decides per frame (in ``prepare``, before any pixel is written)
whether the frame enters the dataset and whether it is ``auto_accepted`` or ``needs_review``.  The
bundled default keeps every frame of files, folders and videos (``edgelabel label`` too), sending those
with a detection scored near the threshold to ``needs_review``, and samples live cameras.  A person's
decisions (:mod:`edge.review`) move a row to
``accepted``, ``corrected`` or ``rejected`` with who and when; those rows are never overwritten by
a frame that is labeled again (after a crash or ``--fresh``).

Naming, chosen so that a frame processed twice (after a crash) lands on the same files:

* stored copy of a frame without a file: ``images/<source>/<index:08d>_<id[:8]>.<ext>``
* stored copy of a file frame (save_images: always, what ``edgelabel label`` uses):
  ``images/<source>/<original stem>_<id[:8]>.<ext>`` -- the original's bytes (a hard link on the same
  disk, else a copy), encoded as ``image_format`` only for types a trainer may not read (jp2, pnm)
* ``<source>`` is the source name, except that a source called ``images`` is stored as ``images_src``:
  Ultralytics replaces the *last* ``/images/`` of an image path by ``/labels/`` to find its label
* its YOLO label: ``labels/<source>/<stored stem>.txt`` (the Ultralytics images/ -> labels/ convention)
* a referenced original (folder/image sources, save_images auto/never) is not copied; its label is
  ``labels/<source>/<original stem>_<id[:8]>.txt`` -- unique even when sub-folders repeat a stem.
  Ultralytics cannot pair these by path, so the COCO image entry carries the mapping:
  ``file_name`` is the absolute original path and ``edgelabel_label_file`` the label file.

COCO specifics: ``category_id = model class_id + 1`` (COCO ids are 1-based); every category also
carries ``edgelabel_class_id`` so the map is explicit.  ``bbox`` is ``[x, y, w, h]`` in pixels, clipped
to the frame, and every annotation the detector made keeps its ``score`` (a box a person drew has
none).  Image ids are the index's rowid, so they stay stable across rewrites (upserts keep the rowid,
which INSERT OR REPLACE would not), and annotation ids are ``rowid * 10000 + n``; each image carries
its review state, reviewer and time.  Rewrites are incremental: each row's JSON is kept with its
``version`` and only changed rows are serialised again (a review decision on 20 000 frames: ~0.2 s).

Quota (``dataset.max_images``, ``dataset.max_bytes``, ``dataset.min_free_bytes``): when a limit is
passed the oldest frames are removed, in tiers -- rejected first, then auto_accepted, then
needs_review, and frames a person accepted or corrected only when nothing else is left.  The disk
guard (``min_free_bytes``) reacts to a disk that other programs fill too, so it never removes
accepted or corrected frames; only the quotas the operator sized do.  Only files the dataset owns
are deleted (never a referenced original).  If the disk is still short of ``min_free_bytes``, new
frames are not stored (counted, logged): the appliance never fills its disk.

Failure policy: the dataset is secondary to delivering labels, so a disk error (ENOSPC, EACCES,
EROFS, SQLite "disk full") is logged as ERROR with the path and errno text, counted in
``status()['errors']``, flips ``status()['ok']`` to False and skips that record -- it never raises
into the pipeline.  Every file is written to a temporary name and renamed, so a failure or a crash
leaves either the old file or the new one, never a partial one.  The next successful write sets
``ok`` back to True.  A review decision is committed to the index first (marked unsynced), then
its files are rewritten and the mark cleared; a crash in between is completed on the next open.

Durability trade-off: only the COCO file is fsync'ed; images and labels are renamed without fsync
(per-frame fsync is too slow on eMMC/SD), and SQLite runs WAL with synchronous=NORMAL.  After a
power cut the last few frames may be missing, but reprocessing them overwrites the same names.

Threading: the sink's ``open``/``prepare``/``write``/``flush``/``close`` are called by one thread at
a time (the pipeline's sink worker); review decisions arrive on web threads.  Both go through one
:class:`DatasetIndex`, whose ``lock`` serialises every change to the index and its files;
``status`` may be called from any thread and only reads counters under small locks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from edgelabel.edge.capture import SKIP, CaptureDecision, CaptureSelector
from edgelabel.edge.config import ConfigError, DatasetConfig
from edgelabel.edge.formats import yolo_text
from edgelabel.edge.frame import Frame, text_path
from edgelabel.edge.locks import LOCK_FILE, LockHeld, hold_lock
from edgelabel.edge.records import LabelRecord, iso_utc
from edgelabel.edge.salvage import is_corrupt, open_checked, salvage_file
from edgelabel.edge.sinks.base import Sink
from edgelabel.edge.sources.pathguard import PathGuard, read_checked

log = logging.getLogger(__name__)

COCO_FILE = "annotations.coco.json"
INDEX_FILE = "index.sqlite"
REJECTED_DIR = "rejected"
#: every review state, in the order of the docs
STATES = ("auto_accepted", "needs_review", "accepted", "corrected", "rejected")
#: states a person set: a frame labeled again never overwrites them
REVIEWED = frozenset({"accepted", "corrected", "rejected"})
#: while writes keep failing, repeat the ERROR at most this often (seconds)
ERROR_LOG_INTERVAL = 30.0
#: COCO rewrites may take at most ~1/COCO_BUDGET of the sink thread's time on big datasets
COCO_BUDGET = 10.0
#: seconds between summaries of quota rotations (the first one is logged at once)
ROTATION_LOG_INTERVAL = 600.0
#: rows deleted per transaction while rotating
ROTATE_BATCH = 64
#: file types stored byte for byte (save_images: always): what Ultralytics, Datumaro and OpenCV all read
TRAINABLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

#: rotation order: lower tiers go first, oldest first within a tier (the expression must match the index's)
_TIER = "(CASE state WHEN 'rejected' THEN 0 WHEN 'auto_accepted' THEN 1 WHEN 'needs_review' THEN 2 ELSE 3 END)"

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
    detections TEXT NOT NULL,     -- JSON list of {class_id, label, score, box: [x1, y1, x2, y2]}: the labels now
    n_detections INTEGER NOT NULL,
    created REAL NOT NULL         -- epoch seconds of the first write
);
"""
#: columns added by the review/quota version; ALTERed into older indexes on open (name, declaration)
_COLUMNS = (
    ("state", "TEXT NOT NULL DEFAULT 'auto_accepted'"),
    ("reviewed_by", "TEXT"),
    ("reviewed_at", "TEXT"),  # ISO-8601 UTC of the last decision
    ("uncertainty", "REAL NOT NULL DEFAULT 0"),  # review queue order (edge.capture.uncertainty)
    ("model_detections", "TEXT"),  # the detector's boxes as captured (NULL on rows older than this column)
    ("bytes", "INTEGER NOT NULL DEFAULT 0"),  # files the dataset owns for this row (stored image + label)
    ("version", "INTEGER NOT NULL DEFAULT 1"),  # bumped by every change; review requests may name the one they saw
    ("synced", "INTEGER NOT NULL DEFAULT 1"),  # 0 while a decision's files are being rewritten
    ("captured_ts", "REAL"),
    ("model", "TEXT"),  # the name of the model whose run made the row's boxes (NULL on older rows)
    ("image_sha256", "TEXT"),  # the labeled pixels' file hash: an original is served only while it matches
)
_SCHEMA_EXTRA = f"""
CREATE INDEX IF NOT EXISTS records_queue ON records (state, uncertainty DESC, created);
CREATE INDEX IF NOT EXISTS records_rotation ON records ({_TIER}, created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS review_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    action TEXT NOT NULL,
    state TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    by TEXT NOT NULL,
    at TEXT NOT NULL,
    version INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS review_log_record ON review_log (record_id, seq);
"""
_UPSERT = """
INSERT INTO records (id, source, frame_key, frame_index, image_path, label_path, width, height,
                     captured_at, detections, n_detections, created, state, uncertainty, model_detections,
                     bytes, captured_ts, model, image_sha256)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    source = excluded.source, frame_key = excluded.frame_key, frame_index = excluded.frame_index,
    image_path = excluded.image_path, label_path = excluded.label_path, width = excluded.width,
    height = excluded.height, captured_at = excluded.captured_at, detections = excluded.detections,
    n_detections = excluded.n_detections, state = excluded.state, uncertainty = excluded.uncertainty,
    model_detections = excluded.model_detections, bytes = excluded.bytes, captured_ts = excluded.captured_ts,
    model = excluded.model, image_sha256 = excluded.image_sha256, version = records.version + 1, synced = 1
"""


class VersionConflict(RuntimeError):
    """A review request named an older version of the row than the index holds (someone else changed it)."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the frame was changed meanwhile (now version {current}); reload it")
        self.current = current


@dataclass(frozen=True)
class Rotation:
    """What one quota rotation removed."""

    removed: int = 0
    freed: int = 0  # bytes of files deleted
    reviewed: int = 0  # of which accepted or corrected


# ---------------------------------------------------------------------- the index


class DatasetIndex:
    """``index.sqlite`` and the files it describes (labels, stored images, COCO); one lock for every change.

    Shared in one process by the dataset sink (per frame), the review page (decisions) and exports
    (reads), so that a decision and a frame can never interleave their file rewrites.  Counters
    (images, annotations, bytes, rows per state) are kept in memory and read without the big lock.
    ``repair=False`` (exports) never touches files: a daemon may be completing a decision meanwhile.
    """

    def __init__(self, root: Path, *, formats: Iterable[str] = ("yolo", "coco"), names: list[str] | None = None,
                 model_name: str | None = None, repair: bool = True) -> None:
        self.root = Path(root)
        self.formats = set(formats)
        self._given_names = list(names) if names is not None else None
        self._names: list[str] = list(names or [])
        self._model_name = model_name or ""
        self._legacy_model = ""  # the model the index named before this open: rows without a model column value
        self._yaml_models: str | None = None  # the model list data.yaml was last written with
        self._repair = repair
        self.lock = threading.RLock()
        self._counts_lock = threading.Lock()
        #: real paths of the daemon's own folders and secret files (``edge.sources.pathguard.protected_paths``,
        #: set by the pipeline and the web page): an original that resolves there is never opened
        self.protected: tuple[str, ...] = ()
        self._guard: tuple[tuple[str, ...], PathGuard] | None = None
        self._db: sqlite3.Connection | None = None
        self._dirs: set[Path] = set()
        self._images = 0
        self._annotations = 0
        self._bytes = 0
        self._coco_bytes = 0
        #: COCO snapshots built / written (write_coco writes outside the index lock, in build order)
        self._coco_write_lock = threading.Lock()
        self._coco_built = 0
        self._coco_written = 0
        self._by_state: Counter[str] = Counter()
        self.coco_dirty = True
        # rowid -> (record id, version, image JSON, annotations JSON, classes used): COCO rewrites serialise changed
        # rows only.  The record id is part of the key because SQLite may give a deleted row's rowid to a new row.
        self._coco_cache: dict[int, tuple[str, int, bytes, bytes, tuple[tuple[int, str], ...]]] = {}
        #: rows a corrupt index file took with it (see _replace_corrupt), what that means and when
        self.lost = 0
        self.last_loss: str | None = None
        self.last_loss_at: float | None = None

    # ------------------------------------------------------------------ open / close

    @property
    def path(self) -> Path:
        return self.root / INDEX_FILE

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the dataset index is not open")
        return self._db

    def open(self) -> None:
        """Open (create, migrate) the index; write the class files when names were given. Raises OSError/sqlite3.Error."""
        with self.lock:
            if self._db is not None:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            db = self._connect_checked()
            try:
                self._db = db
                self._load_meta()
                if self._given_names is not None:
                    with db:
                        db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
                            ("names", json.dumps(self._names)), ("model", self._model_name),
                            ("formats", json.dumps(sorted(self.formats)))])
                        if self._legacy_model and db.execute("SELECT 1 FROM records WHERE model IS NULL").fetchone():
                            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('legacy_model', ?)",
                                       (self._legacy_model,))
                    if "yolo" in self.formats:
                        self._write_class_files()
                self._recount()
                if self._repair:
                    self._repair_unsynced()
                    remove_unfinished_writes(self.root)
            except BaseException:
                self._db = None
                db.close()
                raise

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                try:
                    self._db.close()
                finally:
                    self._db = None
                    self._dirs.clear()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            _migrate(db)
            db.executescript(_SCHEMA_EXTRA)
        except BaseException:
            db.close()
            raise
        return db

    def _connect_checked(self) -> sqlite3.Connection:
        """Connect, read every page once (``quick_check``); a corrupt index is salvaged (``repair``) or raised."""
        db, exc = open_checked(self._connect)
        if exc is not None:
            if not self._repair:  # an export never changes the dataset: the daemon salvages it when it opens
                raise exc
            db = self._replace_corrupt(exc)
        assert db is not None
        db.row_factory = sqlite3.Row
        return db

    def _replace_corrupt(self, exc: BaseException) -> sqlite3.Connection:
        """Move the damaged index aside, start a new one with every readable row, count and explain the rest.

        Never deletes a file of the dataset: the images and labels of rows that could not be read stay
        where they are (left out of the COCO file until their frames are labeled again).
        """
        db, aside, kept, lost = salvage_file(self.path, self._connect, ("records", "meta", "review_log"))
        rec = kept.get("records")
        what = (f"dataset index {self.path} was corrupt ({exc}): moved it to {aside}, kept "
                f"{rec.kept if rec else 0} record(s) in a new index; {lost} row(s) could not be read")
        if lost:
            what += (" -- their image and label files stay in the dataset folder but are left out of the COCO "
                     "file; a frame labeled again gets its row back (same record id, same file names); "
                     "review decisions among them are lost")
        self.lost += lost
        self.last_loss, self.last_loss_at = what, time.time()
        log.error("%s; the dataset goes on. Check the disk (dmesg, smartctl) if this happens again.", what)
        return db

    def salvage(self, exc: BaseException) -> bool:
        """The open index turned out corrupt while in use: salvage it now (True) instead of failing every write."""
        if not is_corrupt(exc) or not self._repair:
            return False
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._dirs.clear()
            self._coco_cache.clear()
        self.open()
        return True

    def loss_status(self) -> dict[str, Any]:
        """Rows lost to a corrupt index file (the ``dataset_index_lost`` alarm, stats)."""
        return {"path": str(self.path), "lost": self.lost, "last_loss": self.last_loss,
                "last_loss_at": self.last_loss_at}

    def _load_meta(self) -> None:
        """Class names and model: given, else stored in the index, else classes.txt, else what the rows say."""
        meta = {r["key"]: r["value"] for r in self.db.execute("SELECT key, value FROM meta")}
        self._legacy_model = meta.get("legacy_model") or meta.get("model") or ""
        if not self._model_name:
            self._model_name = meta.get("model") or "unknown"
        if self._given_names is not None:
            return
        if "names" in meta:
            self._names = list(json.loads(meta["names"]))
            return
        classes = self.root / "classes.txt"
        if classes.is_file():
            self._names = [ln.strip() for ln in classes.read_text(encoding="utf-8").splitlines() if ln.strip()]
            return
        found: dict[int, str] = {}
        for (dets,) in self.db.execute("SELECT detections FROM records"):
            for d in json.loads(dets):
                found.setdefault(int(d["class_id"]), str(d["label"]))
        self._names = [found.get(i, f"class{i}") for i in range(max(found) + 1)] if found else []

    def _write_class_files(self) -> None:
        names = "".join(f"{n}\n" for n in self._names)
        write_atomic(self.root / "classes.txt", names.encode())
        self._write_data_yaml(self.model_name)

    def refresh_data_yaml(self) -> bool:
        """Rewrite data.yaml when the models that made the boxes changed since it was written; True if written."""
        if "yolo" not in self.formats or self._given_names is None:
            return False
        with self.lock:
            models = self.model_name
            if models == self._yaml_models:
                return False
            self._write_data_yaml(models)
            return True

    def _write_data_yaml(self, models: str) -> None:
        data = {
            "path": str(self.root.resolve()),
            "train": "images",
            "val": "images",
            "names": dict(enumerate(self._names)),
        }
        header = (
            f"# edgelabel auto-labels by {models}. YOLO labels of stored frames sit under labels/;\n"
            f"# referenced original files are listed with their label file in {COCO_FILE}.\n"
        )
        write_atomic(self.root / "data.yaml", (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode())
        self._yaml_models = models

    def _recount(self) -> None:
        rows = self.db.execute(
            "SELECT state, COUNT(*), COALESCE(SUM(n_detections), 0), COALESCE(SUM(bytes), 0) FROM records GROUP BY state"
        ).fetchall()
        try:
            coco = (self.root / COCO_FILE).stat().st_size
        except OSError:
            coco = 0
        with self._counts_lock:
            self._by_state = Counter({r[0]: int(r[1]) for r in rows})
            self._images = sum(int(r[1]) for r in rows)
            self._annotations = sum(int(r[2]) for r in rows)
            self._bytes = sum(int(r[3]) for r in rows)
            self._coco_bytes = coco

    def _repair_unsynced(self) -> None:
        """Finish review decisions whose files a crash interrupted (the index row is the truth)."""
        rows = self.db.execute("SELECT * FROM records WHERE synced = 0").fetchall()
        for row in rows:
            self._finish_files(row)
        if rows:
            self.coco_dirty = True
            log.warning("dataset: completed %d review decision(s) interrupted by a restart", len(rows))

    # ------------------------------------------------------------------ reading

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def model_name(self) -> str:
        """The models whose runs made the boxes in the dataset (most frames first), e.g. ``yolo11n_int8``, or
        ``yolo11n_int8, yolox_nano`` while both are present; the configured model while there are no frames."""
        return ", ".join(self.models()) or self._model_name

    def models(self) -> list[str]:
        """Names of the models that made the boxes of the frames kept (rejected frames left out), most first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT COALESCE(model, ?) AS m, COUNT(*) AS n FROM records WHERE state != 'rejected'"
                " GROUP BY m ORDER BY n DESC, m", (self._legacy_model or "unknown",)).fetchall()
        return [r["m"] for r in rows]

    def counts(self) -> dict[str, Any]:
        """images, annotations, bytes (owned files + COCO) and rows per state, without waiting for a write."""
        with self._counts_lock:
            return {"images": self._images, "annotations": self._annotations, "bytes": self._bytes + self._coco_bytes,
                    "states": {s: self._by_state.get(s, 0) for s in STATES}}

    def row(self, record_id: str) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute("SELECT rowid, * FROM records WHERE id = ?", (record_id,)).fetchone()  # type: ignore[no-any-return]

    def history(self, record_id: str) -> list[dict[str, Any]]:
        """The review decisions about one frame, oldest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT action, state, previous_state, by, at, version FROM review_log WHERE record_id = ? ORDER BY seq",
                (record_id,)).fetchall()
        return [dict(r) for r in rows]

    def select(self, where: str = "", params: Iterable[Any] = (), order: str = "rowid", limit: int | None = None,
               offset: int = 0) -> list[sqlite3.Row]:
        """Rows matching a WHERE clause written by this package (never by a request: values go in ``params``)."""
        sql = "SELECT rowid, * FROM records" + (f" WHERE {where}" if where else "") + f" ORDER BY {order}"
        args = list(params)
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [limit, offset]
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def count(self, where: str = "", params: Iterable[Any] = ()) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM records" + (f" WHERE {where}" if where else ""),
                                       list(params)).fetchone()[0])

    def image_file(self, row: sqlite3.Row) -> Path | None:
        """Where the row's pixels are now: a stored copy (under rejected/ while rejected) or the original file.

        A relative path that would leave the dataset folder is refused (None): the index is ours, but
        it is a file on disk, and the web page serves what this returns.
        """
        img = row["image_path"]
        if not img:
            return None
        p = Path(img)
        if p.is_absolute():
            return p
        root = self.root.resolve()
        normal, moved = (root / p).resolve(), (root / REJECTED_DIR / p).resolve()
        if not (normal.is_relative_to(root) and moved.is_relative_to(root)):
            log.warning("dataset: index row %s names %s outside the dataset; ignored", row["id"], img)
            return None
        first, second = (moved, normal) if row["state"] == "rejected" else (normal, moved)
        return first if first.exists() or not second.exists() else second

    def original_changed(self, row: sqlite3.Row, path: Path, data: bytes | None = None) -> bool:
        """True when ``row`` references an original file (not a copy the dataset stored) whose bytes are not
        the ones labeled: replaced, rewritten, or swapped for a symlink to another file; also when it cannot be
        read the guarded way (gone, or a symlink into the daemon's own files), a row without a sha256 included.

        Originals live in folders others can write to; serving or exporting whatever is at the path now
        would put other pixels under reviewed labels, or hand out any file the daemon can read.
        """
        expected = row["image_sha256"] if "image_sha256" in row.keys() else None
        if not Path(row["image_path"] or "").is_absolute():
            return False  # a stored copy
        try:
            data = data if data is not None else self.read_original(path)
        except OSError:
            return True  # gone, or refused by the guard (also for a row from before hashes were kept)
        if not expected:
            return False  # a row from before hashes were kept: nothing to compare, but read the guarded way
        digest = hashlib.sha256(data).hexdigest()
        if digest == expected:
            return False
        log.warning("dataset: %s changed since it was labeled (record %s); it is not served or exported",
                    text_path(str(path)), row["id"])
        return True

    def read_verified(self, row: sqlite3.Row) -> bytes | None:
        """The bytes of the row's image, or None when it is gone or an original changed since labeling."""
        path = self.image_file(row)
        if path is None:
            return None
        try:
            data = self.read_original(path) if Path(row["image_path"] or "").is_absolute() else path.read_bytes()
        except OSError:
            return None
        return None if self.original_changed(row, path, data) else data

    def read_original(self, path: Path) -> bytes:
        """The bytes of an original input file; OSError when it is gone, or resolves (now, or as opened) into the
        dataset, the state folder or a secret file: an input path swapped for a symlink there is never read."""
        protected = (*self.protected, str(self.root))
        if self._guard is None or self._guard[0] != protected:
            self._guard = (protected, PathGuard("/", follow_symlinks=True, protected=protected))
        try:
            return read_checked(path, self._guard[1])
        except PermissionError as exc:
            log.warning("dataset: the original %s %s", text_path(str(path)), exc)
            raise

    # ------------------------------------------------------------------ frames (the sink thread)

    def add_frame(self, record: LabelRecord, *, image: str | None, label: str, boxes: list[dict[str, Any]],
                  image_bytes: int, decision: CaptureDecision) -> bool | None:
        """Write the frame's YOLO label and index it; True when new, False when updated, None when a person had
        decided about it already (then nothing is touched: a frame labeled again never undoes a review)."""
        text = yolo_text(boxes, record.width, record.height).encode()
        dets = json.dumps(boxes, separators=(",", ":"))
        size = image_bytes + (len(text) if "yolo" in self.formats else 0)
        with self.lock:
            db = self.db
            old = db.execute("SELECT state, n_detections, bytes FROM records WHERE id = ?", (record.id,)).fetchone()
            if old is not None and old["state"] in REVIEWED:
                return None
            if "yolo" in self.formats:
                write_atomic(self._dir_ready(self.root / label), text)
            with db:
                db.execute(_UPSERT, (record.id, record.source, record.frame_key, record.frame_index, image, label,
                                     record.width, record.height, record.captured_at, dets, len(boxes), time.time(),
                                     decision.state, decision.uncertainty, dets, size, record.captured_ts,
                                     record.model.name, record.frame_sha256))
            self._count(old, (decision.state, len(boxes), size))
            self.coco_dirty = True
            return old is None

    # ------------------------------------------------------------------ review decisions (web threads)

    def update_review(self, record_id: str, *, action: str, state: str, detections: list[dict[str, Any]], by: str,
                      at: str, expect_version: int | None = None, detail: dict[str, Any] | None = None,
                      write_coco: bool = True) -> tuple[sqlite3.Row, sqlite3.Row]:
        """Apply one review decision: the index first (one transaction, with a log entry), then the frame's
        files (label rewritten or removed, image moved in or out of rejected/), then the COCO file.

        Raises KeyError (no such frame), VersionConflict, or OSError/sqlite3.Error (the decision is then
        either not saved, or saved and its files are completed on the next open).
        """
        dets = json.dumps(detections, separators=(",", ":"))
        with self.lock:
            db = self.db
            before = db.execute("SELECT rowid, * FROM records WHERE id = ?", (record_id,)).fetchone()
            if before is None:
                raise KeyError(record_id)
            if expect_version is not None and before["version"] != expect_version:
                raise VersionConflict(before["version"])
            with db:
                # model_detections keeps the detector's boxes: COALESCE reads the row as it was before this UPDATE
                db.execute(
                    "UPDATE records SET state = ?, detections = ?, n_detections = ?, reviewed_by = ?, reviewed_at = ?,"
                    " version = version + 1, synced = 0, model_detections = COALESCE(model_detections, detections)"
                    " WHERE id = ?", (state, dets, len(detections), by, at, record_id))
                db.execute(
                    "INSERT INTO review_log (record_id, action, state, previous_state, by, at, version, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (record_id, action, state, before["state"], by, at, before["version"] + 1,
                     json.dumps(detail, separators=(",", ":")) if detail else None))
            after = db.execute("SELECT rowid, * FROM records WHERE id = ?", (record_id,)).fetchone()
            self._count((before["state"], before["n_detections"], before["bytes"]), (state, len(detections), before["bytes"]))
            self.coco_dirty = True
            self._finish_files(after)
            after = db.execute("SELECT rowid, * FROM records WHERE id = ?", (record_id,)).fetchone()
        if write_coco:
            self.write_coco()  # after the lock (unless the caller holds it): see write_coco
        return before, after

    def _finish_files(self, row: sqlite3.Row) -> None:
        """Make the row's files match its state (idempotent), then clear its unsynced mark and update its size."""
        rejected = row["state"] == "rejected"
        img = row["image_path"]
        image_size = 0
        if img and not Path(img).is_absolute():
            normal, moved = self.root / img, self.root / REJECTED_DIR / img
            src, dst = (normal, moved) if rejected else (moved, normal)
            if src.exists():
                os.replace(src, self._dir_ready(dst))
            image_size = _size(dst)
        label = self.root / row["label_path"]
        label_size = 0
        if "yolo" in self.formats:
            if rejected:
                label.unlink(missing_ok=True)
            else:
                text = yolo_text(json.loads(row["detections"]), row["width"], row["height"]).encode()
                write_atomic(self._dir_ready(label), text)
                label_size = len(text)
        size = image_size + label_size
        with self.db:
            self.db.execute("UPDATE records SET synced = 1, bytes = ? WHERE id = ?", (size, row["id"]))
        with self._counts_lock:
            self._bytes += size - int(row["bytes"])

    # ------------------------------------------------------------------ COCO

    def write_coco(self) -> bool:
        """Regenerate the COCO file from the index (tmp + fsync + rename) if anything changed; True if written.

        Incremental: each row's JSON is kept with its ``version`` (bumped by every change to the row), so a
        rewrite serialises only the rows that changed and splices the rest -- a review decision on a dataset
        of 20 000 frames costs a fraction of a second, not seconds; the file itself is written after the index
        lock is released (``bench/review_lock.py``).
        """
        if "coco" not in self.formats:
            return False
        with self.lock:
            if not self.coco_dirty:
                return False
            db, cache = self.db, self._coco_cache
            heads = db.execute("SELECT rowid, id, version FROM records WHERE state != 'rejected' ORDER BY rowid").fetchall()
            stale = [rowid for rowid, rid, version in heads
                     if (rowid not in cache or cache[rowid][0] != rid or cache[rowid][1] != version)]
            for i in range(0, len(stale), 500):
                chunk = stale[i:i + 500]
                for r in db.execute(
                        "SELECT rowid, id, source, frame_key, image_path, label_path, width, height, captured_at,"
                        " detections, state, reviewed_by, reviewed_at, version, model FROM records"
                        f" WHERE rowid IN ({','.join('?' * len(chunk))})", chunk):
                    cache[r["rowid"]] = _coco_fragments(r)
            if len(cache) > len(heads):
                alive = {h[0] for h in heads}
                for rowid in [k for k in cache if k not in alive]:
                    del cache[rowid]
            entries = [cache[h[0]] for h in heads]  # immutable fragments: joined after the lock is released
            names, model_name = list(self._names), self.model_name
            self.coco_dirty = False
            self._coco_built += 1
            built = self._coco_built
        extra = {cls: name for e in entries for cls, name in e[4]}
        categories = [{"id": i + 1, "name": n, "supercategory": "object", "edgelabel_class_id": i}
                      for i, n in enumerate(names)]
        categories += [{"id": c + 1, "name": extra[c], "supercategory": "object", "edgelabel_class_id": c}
                       for c in sorted(extra) if c >= len(names)]
        data = b"".join((
            b'{"info":', _json(_coco_info(model_name)), b',"licenses":[],"images":[',
            b",".join(e[2] for e in entries), b'],"annotations":[',
            b",".join(e[3] for e in entries if e[3]), b'],"categories":', _json(categories), b"}",
        ))
        # Joined and written after the index lock is released (a caller that holds it keeps it, by reentry):
        # joining and fsyncing a file of many MB was most of a review decision's hold on the lock, during which
        # the sink thread could not index a frame.  Writers are ordered by their own lock; an older snapshot never
        # replaces a newer one.
        # (Whoever holds the write lock takes no other lock: a thread holding the index lock may wait for it.)
        failed: BaseException | None = None
        with self._coco_write_lock:
            if built <= self._coco_written:
                return True
            try:
                write_atomic(self.root / COCO_FILE, data, fsync=True)
                self._coco_written = built
            except BaseException as exc:
                failed = exc
        if failed is not None:
            with self.lock:
                self.coco_dirty = True  # written by the next call
            raise failed
        with self._counts_lock:
            self._coco_bytes = len(data)
        return True

    # ------------------------------------------------------------------ quota

    def rotate(self, *, max_images: int = 0, max_bytes: int = 0, free_bytes: int = 0,
               keep_reviewed: bool = False) -> Rotation:
        """Remove the oldest frames, lowest tier first, until under ``max_images``/``max_bytes`` (0 = no limit)
        and ``free_bytes`` are freed; ``keep_reviewed`` never touches accepted/corrected frames.

        Rows go first (one transaction per batch), then their files, so a crash leaves at worst an orphan
        file, never a row without its image -- except on a disk so full that SQLite cannot even record the
        deletion: then the files go first, to make the room it needs.
        """
        removed = freed = reviewed = 0
        where = " WHERE state NOT IN ('accepted', 'corrected')" if keep_reviewed else ""
        with self.lock:
            db = self.db
            while True:
                counts = self.counts()
                need_images = max(0, counts["images"] - max_images) if max_images else 0
                over_bytes = max(0, counts["bytes"] - max_bytes) if max_bytes else 0
                need_free = max(0, free_bytes - freed)
                if not (need_images or over_bytes or need_free):
                    break
                rows = db.execute(
                    f"SELECT id, image_path, label_path, bytes, state, n_detections FROM records{where}"
                    f" ORDER BY {_TIER}, created LIMIT ?", (max(need_images, ROTATE_BATCH),)).fetchall()
                if not rows:
                    break
                take, gained = [], 0
                for r in rows:
                    if len(take) >= need_images and gained >= max(over_bytes, need_free):
                        break
                    take.append(r)
                    gained += int(r["bytes"])
                files_gone = False
                try:
                    with db:
                        db.executemany("DELETE FROM records WHERE id = ?", [(r["id"],) for r in take])
                except sqlite3.OperationalError as exc:
                    if getattr(exc, "sqlite_errorname", "") != "SQLITE_FULL" and "full" not in str(exc):
                        raise
                    log.warning("dataset: the disk is full; deleting %d old frame(s)' files before their rows", len(take))
                    for r in take:
                        freed += self._delete_files(r)
                    files_gone = True
                    with db:
                        db.executemany("DELETE FROM records WHERE id = ?", [(r["id"],) for r in take])
                for r in take:
                    self._count((r["state"], r["n_detections"], r["bytes"]), None)
                    if not files_gone:
                        freed += self._delete_files(r)
                    removed += 1
                    reviewed += r["state"] in ("accepted", "corrected")
                self.coco_dirty = True
        return Rotation(removed, freed, reviewed)

    def _delete_files(self, row: sqlite3.Row) -> int:
        """Delete the files the dataset owns for a removed row (never a referenced original); bytes freed."""
        freed = 0
        paths = [self.root / row["label_path"]]
        img = row["image_path"]
        if img and not Path(img).is_absolute():
            paths += [self.root / img, self.root / REJECTED_DIR / img]
        for p in paths:
            try:
                size = p.stat().st_size
                p.unlink()
                freed += size
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("dataset: cannot delete %s while rotating: %s", p, exc.strerror or exc)
        return freed

    # ------------------------------------------------------------------ helpers

    def _count(self, old: Any, new: tuple[str, int, int] | None) -> None:
        """Move the in-memory counters from a row's old (state, n_detections, bytes) to its new ones."""
        with self._counts_lock:
            if old is not None:
                state, n, size = old[0], int(old[1]), int(old[2])
                self._images -= 1
                self._annotations -= n
                self._bytes -= size
                self._by_state[state] -= 1
            if new is not None:
                state, n, size = new
                self._images += 1
                self._annotations += n
                self._bytes += size
                self._by_state[state] += 1

    def _dir_ready(self, path: Path) -> Path:
        """Create ``path``'s folder on first use; returns ``path``."""
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        return path

    def forget_dirs(self) -> None:
        """A folder may have vanished (unmounted, deleted): create folders again on the next write."""
        self._dirs.clear()


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns of this version to an older index (idempotent; safe when two processes race)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(records)")}
    for name, decl in _COLUMNS:
        if name in have:
            continue
        try:
            db.execute(f"ALTER TABLE records ADD COLUMN {name} {decl}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise
    db.commit()


#: annotation ids are ``rowid * ANN_ID_STRIDE + n``: unique, and stable across rewrites (COCO needs unique ints only)
ANN_ID_STRIDE = 10_000


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _coco_info(model_name: str) -> dict[str, Any]:
    return {
        "description": (
            f"edgelabel auto-labels by {model_name}. category_id = model class_id + 1. "
            "file_name is relative to the dataset root for stored copies and absolute for referenced "
            "originals; edgelabel_label_file is the YOLO label of each image. Rejected frames are left out."
        ),
        "version": "1",
        "year": time.gmtime().tm_year,
        "contributor": "edgelabel",
        "date_created": iso_utc(time.time()),
        "edgelabel_model": model_name,
    }


def _coco_fragments(r: Any) -> tuple[str, int, bytes, bytes, tuple[tuple[int, str], ...]]:
    """One index row as COCO JSON: (record id, version, its image object, its annotation objects joined by
    commas, (class id, name) of every class it uses, for the category list)."""
    rowid = r["rowid"]
    image = {
        "id": rowid,
        # not a file when the frame was not kept (save_images: never on a camera): the frame key
        "file_name": r["image_path"] if r["image_path"] is not None else r["frame_key"],
        "width": r["width"],
        "height": r["height"],
        "edgelabel_record_id": r["id"],
        "captured_at": r["captured_at"],
        "edgelabel_source": r["source"],
        "edgelabel_frame_key": r["frame_key"],
        "edgelabel_label_file": r["label_path"],
        "edgelabel_review_state": r["state"],
        "edgelabel_reviewed_by": r["reviewed_by"],
        "edgelabel_reviewed_at": r["reviewed_at"],
        "edgelabel_model": r["model"],
    }
    anns: list[bytes] = []
    classes: dict[int, str] = {}
    for n, det in enumerate(json.loads(r["detections"])):
        cls = det["class_id"]
        classes.setdefault(cls, det["label"])
        x1, y1, x2, y2 = det["box"]
        w, h = x2 - x1, y2 - y1
        ann: dict[str, Any] = {
            "id": rowid * ANN_ID_STRIDE + n + 1,
            "image_id": rowid,
            "category_id": cls + 1,
            "bbox": [x1, y1, round(w, 2), round(h, 2)],
            "area": round(w * h, 2),
            "iscrowd": 0,
            "segmentation": [],
        }
        if det.get("score") is not None:
            ann["score"] = det["score"]
        anns.append(_json(ann))
    return r["id"], r["version"], _json(image), b",".join(anns), tuple(sorted(classes.items()))


# ---------------------------------------------------------------------- the sink


@dataclass(frozen=True)
class _Plan:
    """What ``prepare`` decided for one record, used by ``write``."""

    image: str | None = None  # COCO file_name; None when no pixels are kept anywhere
    label: str = ""  # YOLO txt relative to the root
    image_bytes: int = 0  # size of the stored copy (0 for a referenced original)
    decision: CaptureDecision = SKIP
    failed: bool = False  # the stored copy could not be written: skip the record
    skip: bool = False  # the policy (or the disk guard) keeps this frame out of the dataset
    keep: bool = False  # a person decided about this frame already: leave it as it is


@dataclass
class _RotationLog:
    """Quota rotations since start, and when they were last reported."""

    removed: int = 0
    reviewed: int = 0
    unreported: int = 0
    last_log: float = float("-inf")
    last_full_log: float = float("-inf")
    reasons: set[str] = field(default_factory=set)


class DatasetSink(Sink):
    """Writes the captured frames' pixels, YOLO labels, a COCO file and the index under ``root``."""

    name = "dataset"

    def __init__(self, cfg: DatasetConfig, root: Path, class_names: list[str], model_name: str,
                 zones: dict[str, dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.class_names = list(class_names)
        self.model_name = model_name
        self.formats = set(cfg.formats)
        self.index = DatasetIndex(self.root, formats=self.formats, names=self.class_names, model_name=model_name)
        self.capture = CaptureSelector(cfg.capture, zones)  # zones: source -> its zones (capture gating)
        self._plan: tuple[str, _Plan] | None = None
        self._coco_due = 0.0  # time.monotonic() after which write() may regenerate the COCO file
        self._lock = threading.Lock()
        self._errors = 0
        self._ok = True
        self._last_write_at: float | None = None
        self._last_error: str | None = None
        self._last_error_log = float("-inf")
        self._unlogged_errors = 0
        self._last_image_bytes = 256 * 1024  # what the next stored frame may need (the disk guard's margin)
        self._skipped_disk = 0
        self._last_disk_log = float("-inf")
        self._rotations = _RotationLog()
        self._lock_fd: int | None = None  # holds <root>/edgelabel.lock while this sink writes the dataset
        self._refused = False  # another process holds the dataset: this sink writes nothing

    # ------------------------------------------------------------------ Sink API

    def open(self) -> None:
        """Lock the dataset, create the layout and the index.

        Raises ConfigError when another process writes this dataset (one writer per dataset, like the
        state_dir); any other failure is reported and retried on the next write.
        """
        self._ensure_open(strict=True)

    def prepare(self, record: LabelRecord, frame: Frame) -> None:
        """Ask the capture policy; store the pixels of a captured frame and point ``record.frame_path`` at them.

        Runs before any sink's ``write`` so the MQTT record names the exact stored pixels.  A frame the
        policy leaves out keeps what the pipeline set (its original file, or nothing for a camera).
        """
        self._plan = (record.id, self._plan_for(record, frame))

    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Index a captured record and write its YOLO label; the COCO file follows at most every coco_interval."""
        plan = self._plan[1] if self._plan and self._plan[0] == record.id else self._plan_for(record, frame)
        self._plan = None
        if plan.failed or plan.skip or plan.keep or not self._ensure_open():
            return
        boxes = _clipped_boxes(record)
        label_path = self.root / plan.label
        try:
            self.index.add_frame(record, image=plan.image, label=plan.label, boxes=boxes,
                                 image_bytes=plan.image_bytes, decision=plan.decision)
        except (OSError, sqlite3.Error) as exc:
            self._report_error("write labels for", label_path if isinstance(exc, OSError) else self.index.path, exc)
            self._salvage_index(exc)
            return
        with self._lock:
            self._last_write_at = time.time()
        self._report_success()
        self._enforce_quota()
        if time.monotonic() >= self._coco_due:
            self._write_coco()

    def flush(self) -> None:
        """Regenerate the COCO file now if anything changed since the last one; data.yaml names the models."""
        with self._lock:
            errors = self._errors
        self._write_coco()
        with self._lock:
            failed = self._errors != errors
        if self.index.is_open and not failed:  # one report per flush on a failing disk
            try:
                self.index.refresh_data_yaml()
            except (OSError, sqlite3.Error) as exc:
                self._report_error("write", self.root / "data.yaml", exc)

    def close(self) -> None:
        """Write the final COCO file, close the index and release the dataset's lock."""
        if self._refused:
            return
        self.flush()
        try:
            self.index.close()
        except sqlite3.Error as exc:  # pragma: no cover - close only fails on a broken database
            self._report_error("close", self.index.path, exc)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def status(self) -> dict[str, Any]:
        counts = self.index.counts()
        with self._lock:
            return {
                "path": str(self.root),
                "images": counts["images"],
                "annotations": counts["annotations"],
                "errors": self._errors,
                "ok": self._ok,
                "last_write_at": self._last_write_at,
                "last_error": self._last_error,
                "bytes": counts["bytes"],
                "states": counts["states"],
                "capture": self.capture.status(),
                "index": self.index.loss_status(),
                "quota": {
                    "max_images": self.cfg.max_images,
                    "max_bytes": self.cfg.max_bytes,
                    "min_free_bytes": self.cfg.min_free_bytes,
                    "rotated": self._rotations.removed,
                    "rotated_reviewed": self._rotations.reviewed,
                    "skipped_disk": self._skipped_disk,
                },
            }

    # ------------------------------------------------------------------ set-up

    def _ensure_open(self, strict: bool = False) -> bool:
        """Lock the dataset, open the index and write the class files once; False (reported) while impossible.

        ``strict`` (at open) raises ConfigError when another process holds the dataset's lock.
        """
        if self.index.is_open:
            return True
        if self._refused:
            return False
        if self._lock_fd is None:
            try:
                self._lock_fd = lock_dataset(self.root)
            except ConfigError:
                if strict:
                    self._refused = True
                    raise
                self._report_error("lock", self.root / LOCK_FILE, OSError(errno.EWOULDBLOCK, "held by another process"))
                return False
            except OSError as exc:
                self._report_error("lock the dataset at", self.root, exc)
                return False
        try:
            self.index.open()
        except (OSError, sqlite3.Error) as exc:
            self._report_error("open the dataset at", self.root, exc)
            return False
        counts = self.index.counts()
        log.info("dataset: %s (%d image(s), %d annotation(s) so far)", self.root, counts["images"], counts["annotations"])
        return True

    # ------------------------------------------------------------------ per frame

    def _plan_for(self, record: LabelRecord, frame: Frame) -> _Plan:
        """The policy's decision, then the pixels of a captured frame (unless a person reviewed it already)."""
        decision = self.capture.decide(record, frame.live)
        if not decision.capture:
            return _Plan(skip=True, decision=decision)
        try:  # an index that cannot be opened now is reported by write(); storing the pixels names the disk's error
            existing = self.index.row(record.id) if self.index.is_open else None
        except sqlite3.Error as exc:
            self._report_error("read", self.index.path, exc)
            return _Plan(failed=True)
        if existing is not None and existing["state"] in REVIEWED:
            # labeled again (a restart, --fresh): the person's decision and files stay as they are
            if existing["state"] != "rejected" and existing["image_path"]:
                record.frame_path = existing["image_path"]
            return _Plan(keep=True, decision=decision)
        if not self._room_for_frame():
            return _Plan(skip=True, decision=decision)
        return self._store_frame(record, frame, decision)

    def _store_frame(self, record: LabelRecord, frame: Frame, decision: CaptureDecision) -> _Plan:
        """Apply save_images: store a copy of the pixels, or reference the original file, or keep nothing.

        A file frame stored with ``always`` keeps the original's bytes (a hard link on the same disk, else a
        copy): no second JPEG generation, no extra space; formats a trainer may not read are encoded instead.
        """
        source = dataset_component(record.source)
        short = record.id[:8]
        mode = self.cfg.save_images
        original = os.path.abspath(frame.path) if frame.path else None
        named = text_path(original) if original else None  # for file names and the index (not UTF-8: escaped)
        if mode == "always" or (mode == "auto" and (original is None or named != original)):
            # auto: a file whose name is not UTF-8 cannot be referenced from the index, so it is copied
            stem = f"{Path(named).stem}_{short}" if named else f"{frame.index:08d}_{short}"
            suffix = Path(original).suffix.lower() if original else ""
            as_is = original is not None and suffix in TRAINABLE_SUFFIXES
            rel = f"images/{source}/{stem}{suffix if as_is else '.' + self.cfg.image_format}"
            try:
                target = self.index._dir_ready(self.root / rel)
                if as_is and original is not None:
                    size, digest = _link_or_copy(Path(original), target)
                else:
                    data = self._encode(frame.image)
                    write_atomic(target, data)
                    size, digest = len(data), hashlib.sha256(data).hexdigest()
            except (OSError, ValueError) as exc:
                self._report_error("store frame", self.root / rel, exc)
                record.frame_path, record.frame_sha256 = named, None  # never point at pixels that are not there
                return _Plan(None, f"labels/{source}/{stem}.txt", failed=True)
            self._last_image_bytes = size
            record.frame_path, record.frame_sha256 = rel, digest
            return _Plan(rel, f"labels/{source}/{stem}.txt", size, decision)
        if original is not None and named is not None:
            # the source hashed the bytes it decoded: the labeled pixels, without reading the file again
            digest = frame.extra.get("sha256")
            record.frame_path, record.frame_sha256 = named, digest if isinstance(digest, str) else _file_sha256(original)
            return _Plan(named, f"labels/{source}/{Path(named).stem}_{short}.txt", 0, decision)
        record.frame_path, record.frame_sha256 = None, None
        return _Plan(None, f"labels/{source}/{frame.index:08d}_{short}.txt", 0, decision)

    def _encode(self, image: np.ndarray) -> bytes:
        if self.cfg.image_format == "png":
            ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast: edge CPUs are slow
        else:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image.shape} {image.dtype} frame as {self.cfg.image_format}")
        return buf.tobytes()

    # ------------------------------------------------------------------ quota

    def _room_for_frame(self) -> bool:
        """The disk guard: keep ``min_free_bytes`` free, rotating old frames out; False = do not store this one."""
        want = self.cfg.min_free_bytes
        if not want:
            return True
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return True  # cannot tell: the write itself reports a full disk
        if free >= want + self._last_image_bytes:
            return True
        # a disk short of space is not the dataset's doing alone: a person's accepted/corrected frames stay
        self._rotate("min_free_bytes", free_bytes=want + self._last_image_bytes - free, keep_reviewed=True)
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return True
        if free >= want:
            return True
        now = time.monotonic()
        with self._lock:
            self._skipped_disk += 1
            skipped = self._skipped_disk
            due = now - self._last_disk_log >= ERROR_LOG_INTERVAL
            if due:
                self._last_disk_log = now
        if due:
            log.error("dataset: only %s free on the disk of %s (dataset.min_free_bytes = %s) and nothing left to "
                      "remove: frames are not stored (%d so far); labels still go to the other sinks",
                      _mb(free), self.root, _mb(want), skipped)
        return False

    def _enforce_quota(self) -> None:
        cfg = self.cfg
        if not (cfg.max_images or cfg.max_bytes):
            return
        counts = self.index.counts()
        if (cfg.max_images and counts["images"] > cfg.max_images) or (cfg.max_bytes and counts["bytes"] > cfg.max_bytes):
            self._rotate("max_images" if cfg.max_images and counts["images"] > cfg.max_images else "max_bytes",
                         max_images=cfg.max_images, max_bytes=cfg.max_bytes)
            states = self.index.counts()["states"]
            lower = states["rejected"] + states["auto_accepted"]
            if not lower and states["needs_review"] + states["accepted"] + states["corrected"]:
                now = time.monotonic()
                with self._lock:
                    due = now - self._rotations.last_full_log >= ROTATION_LOG_INTERVAL
                    if due:
                        self._rotations.last_full_log = now
                if due:
                    log.warning("dataset: the quota is taken by frames that need or had a person's review: new "
                                "auto_accepted frames are removed as they come; review, export or raise the quota")

    def _rotate(self, reason: str, **limits: Any) -> None:
        try:
            result = self.index.rotate(**limits)
        except (OSError, sqlite3.Error) as exc:
            self._report_error("remove old frames from", self.index.path, exc)
            return
        if not result.removed:
            return
        rl = self._rotations
        now = time.monotonic()
        with self._lock:
            first = rl.removed == 0
            rl.removed += result.removed
            rl.reviewed += result.reviewed
            rl.unreported += result.removed
            rl.reasons.add(reason)
            due = first or now - rl.last_log >= ROTATION_LOG_INTERVAL
            if due:
                rl.last_log, count, reasons, rl.unreported = now, rl.unreported, sorted(rl.reasons), 0
                rl.reasons = set()
        if result.reviewed:
            log.warning("dataset: %s: removed %d frame(s) a person had accepted or corrected (nothing else was left);"
                        " export them or raise the quota", reason, result.reviewed)
        if due:
            log.info("dataset: quota (%s) reached: removed %d oldest frame(s) (%s freed); rejected go first, then "
                     "auto_accepted, then needs_review, reviewed last", ", ".join(reasons), count, _mb(result.freed))

    # ------------------------------------------------------------------ COCO

    def _write_coco(self) -> None:
        """Regenerate the COCO file from the index if anything changed, at most every coco_interval."""
        if "coco" not in self.formats or not self.index.coco_dirty or not self._ensure_open():
            return
        t0 = time.monotonic()
        try:
            written = self.index.write_coco()
        except (OSError, sqlite3.Error) as exc:
            self._report_error("write", self.root / COCO_FILE if isinstance(exc, OSError) else self.index.path, exc)
            return
        if not written:
            return
        spent = time.monotonic() - t0
        # a big dataset makes every rewrite slower: space them out so they never dominate the sink thread
        self._coco_due = time.monotonic() + max(self.cfg.coco_interval, COCO_BUDGET * spent)
        log.debug("dataset: wrote %s in %.3f s", self.root / COCO_FILE, spent)

    # ------------------------------------------------------------------ reporting

    def _salvage_index(self, exc: BaseException) -> None:
        """A malformed page met while writing: salvage the index now, so the next frames are kept again."""
        try:
            self.index.salvage(exc)
        except (OSError, sqlite3.Error) as err:
            self._report_error("salvage the index", self.index.path, err)

    def _report_error(self, what: str, path: Path | str, exc: BaseException) -> None:
        """Count the failure, mark the dataset unhealthy and log it (ERROR, rate-limited while it lasts)."""
        if isinstance(exc, OSError) and exc.errno is not None:
            where = exc.filename or path
            detail = f"{exc.strerror or os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
        else:
            where = path
            code = getattr(exc, "sqlite_errorname", None)
            detail = f"{exc} ({code})" if code else str(exc)
        self.index.forget_dirs()
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


def lock_dataset(root: Path) -> int:
    """Hold ``<root>/edgelabel.lock`` for this process (the fd); ConfigError naming the holder when it is taken.

    Two daemons writing one dataset would overwrite each other's COCO file and data.yaml and fight over
    its index; the state_dir is locked the same way (``edge.pipeline.lock_state_dir``).  ``flock`` is
    released by the kernel when the process dies, so a kill -9 leaves no stale lock.  Readers (exports,
    the review page of the same process) do not lock.  Raises OSError when the folder cannot be created.
    """
    root.mkdir(parents=True, exist_ok=True)
    try:
        return hold_lock(root)
    except LockHeld as held:
        raise ConfigError([f"dataset.path: {root} is in use by another edgelabel process ({held.holder}); give "
                           "each daemon its own dataset.path (with --state-dir and no dataset.path configured, "
                           "the dataset is <state_dir>/dataset), or stop that process"]) from None


_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def remove_unfinished_writes(root: Path, older_than: float = 3600.0) -> int:
    """Delete the temporary files of :func:`write_atomic` calls a kill interrupted (hidden ``.name.xxxxxxxx.tmp``).

    They are invisible to the index and to every export, but an image-sized
    one per kill adds up on a small disk.  Only files older than ``older_than``
    seconds go, so a write in progress elsewhere is never touched.
    """
    cutoff = time.time() - older_than
    removed = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not _TMP_NAME.match(name):
                continue
            path = Path(folder) / name
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
    if removed:
        log.info("dataset: removed %d unfinished temporary file(s) left by an interrupted run", removed)
    return removed


def write_atomic(path: Path, data: bytes, fsync: bool = False) -> None:
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _safe_component(name: str) -> str:
    """A source name as one path component (config names are already safe; '.' and '..' are not)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "_"


safe_component = _safe_component


def dataset_component(name: str) -> str:
    """A source's folder under ``images/`` and ``labels/``.

    Ultralytics finds a label by replacing the *last* ``/images/`` of the image path with ``/labels/``, so
    a source folder called ``images`` (``edgelabel label photos/images``) would send it to
    ``images/labels/...``; such a source gets the folder ``images_src``.
    """
    cleaned = _safe_component(name)
    return f"{cleaned}_src" if cleaned == "images" else cleaned


def _link_or_copy(src: Path, dst: Path) -> tuple[int, str]:
    """Put ``src``'s bytes at ``dst`` (a hard link when on the same disk, else a copy); (size, sha256)."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            exc.filename = str(dst)
        raise
    digest = _file_sha256(str(dst))
    if digest is None:
        raise OSError(errno.EIO, "cannot read the stored copy back", str(dst))
    return dst.stat().st_size, digest


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



"""``edgelabel export --db DSN --frames DIR``: one YOLO or COCO dataset from the plant store, merged over appliances.

The appliance's own export (``edge/export.py``) reads its local dataset index; this one reads PostgreSQL (what
ingest stored) and the frame store (what the fetcher put there), so it runs on a plant host without the
daemon's runtime (no OpenCV, no ONNX Runtime) and imports nothing of it.  The layouts are the same as the
appliance's, so a trainer reads either:

    yolo   data.yaml, classes.txt, images/<train|val>/<name>, labels/<train|val>/<stem>.txt
    coco   annotations/instances_default.json (category_id = class_id + 1, bbox [x, y, w, h]), images/default/

Rules:

* the boxes are the reviewed ones where a person decided (``records.reviewed_detections``, as the
  ``label_records`` view shows them), else the detector's; frames whose last review is ``rejected`` are left out;
* only frames the store holds (``frames.status = 'fetched'``), re-verified against their sha256 as they are
  copied; every other record is listed in ``edgelabel-export.json`` (``not_exported``) with the reason
  (pending, failed and why, no frame named, damaged in the store, a width/height or a box that is not a
  number where one is needed: ingest keeps any JSON object) and counted in the log;
* file names are ``<device>__<source>__<frame_index>_<record id[:8]>.<ext>`` (64 characters of each name at
  most): unique across appliances and
  the same every time (records in device, source, capture order);
* class names come from the records (``class_id`` -> ``label``); two names for one id are a warning and the
  first in that order wins;
* the output is built as ``.<OUT>.partial-*`` and renamed at the end: an interrupted export never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.rows import dict_row

from edgelabel.edge.formats import replace_folder, yolo_text
from edgelabel.ingest.framestore import FrameStore, safe_part

log = logging.getLogger("edgelabel.ingest.export")

FORMATS = ("yolo", "coco")
MANIFEST = "edgelabel-export.json"
#: log a progress line every this many frames
PROGRESS_EVERY = 500

_QUERY = """
SELECT r.id::text AS id, r.device, r.source, r.frame_index, r.captured_at,
       COALESCE(r.reviewed_detections, r.record -> 'detections') AS detections,
       r.review_state, r.reviewed_by, r.reviewed_at,
       r.record -> 'width' AS width, r.record -> 'height' AS height,
       r.record -> 'model' ->> 'name' AS model,
       f.status AS frame_status, f.location, f.last_error, f.frame_sha256
FROM records r LEFT JOIN frames f ON f.record_id = r.id
WHERE r.review_state IS DISTINCT FROM 'rejected'
  AND (%(devices)s::text[] IS NULL OR r.device = ANY(%(devices)s::text[]))
ORDER BY r.device, r.source, r.captured_at, r.id
"""


class CentralExportError(ValueError):
    """The export cannot be made as asked; one line says why and what to do."""


@dataclass
class CentralExportResult:
    path: Path
    format: str
    images: int = 0
    annotations: int = 0
    devices: dict[str, int] = field(default_factory=dict)  # images per appliance
    reviewed: int = 0  # images whose boxes a person decided
    not_exported: list[dict[str, Any]] = field(default_factory=list)  # {record_id, device, source, reason}


def _fraction(record_id: str) -> float:
    """A stable number in [0, 1) per record (the appliance's split rule): the same frame, the same split."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 2**32


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return None if value is None else str(value)


class _Folder:
    """The output folder, built under a temporary name beside OUT and renamed into place."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir()

    def add(self, name: str, data: bytes) -> None:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def commit(self) -> None:
        replace_folder(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def export_central(conn: psycopg.Connection, store: FrameStore, fmt: str, out: Path, *, val_fraction: float = 0.0,
                   devices: list[str] | None = None, overwrite: bool = False) -> CentralExportResult:
    """Write the plant store's frames as one ``fmt`` dataset at ``out`` (a folder); see the module text."""
    if fmt not in FORMATS:
        raise CentralExportError(f"--format {fmt!r}: the central export writes {' or '.join(FORMATS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise CentralExportError(f"--val {val_fraction}: must be in [0, 1)")
    out = Path(out)
    if out.suffix.lower() == ".zip":
        raise CentralExportError(f"{out}: the central export writes a folder; give a folder name")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CentralExportError(f"{out} exists and is not empty: choose another OUT, or add --overwrite")
    try:
        rows = conn.cursor(row_factory=dict_row).execute(_QUERY, {"devices": devices or None}).fetchall()
    except psycopg.errors.UndefinedTable:
        raise CentralExportError("the database has no frames table: start edgelabel ingest once with this "
                                 "version (it migrates the schema)") from None
    result = CentralExportResult(out, fmt)
    for r in rows:  # ingest stores any JSON object: a malformed record is listed, it does not stop the export
        r["boxes_error"] = None
        try:
            r["detections"] = _clean_boxes(r["detections"])
        except ValueError as exc:
            r["detections"], r["boxes_error"] = [], str(exc)
    names = _class_names(rows)
    target = _Folder(out)
    t0 = time.monotonic()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    used: set[str] = set()
    try:
        for n, r in enumerate(rows, start=1):
            reason = _why_not(r)
            data = None
            if reason is None:
                try:
                    data = store.read(r["location"])
                except OSError as exc:
                    reason = f"cannot read {r['location']} from the store: {exc}"
                else:
                    if hashlib.sha256(data).hexdigest() != r["frame_sha256"]:
                        reason = f"{r['location']} in the store does not match its sha256 (damaged); requeue it"
            if reason is not None or data is None:
                result.not_exported.append({"record_id": r["id"], "device": r["device"], "source": r["source"],
                                            "frame_status": r["frame_status"], "reason": reason})
                continue
            ext = r["location"].rsplit(".", 1)[-1]
            # 64 characters of each name at most (the daemon's limit): the file name stays under 255 bytes
            stem = f"{safe_part(r['device'])[:64]}__{safe_part(r['source'])[:64]}__{r['frame_index']:08d}_{r['id'][:8]}"
            dets = r["detections"]
            if fmt == "yolo":
                subset = "val" if val_fraction and _fraction(r["id"]) < val_fraction else "train"
                used.add(subset)
                target.add(f"images/{subset}/{stem}.{ext}", data)
                target.add(f"labels/{subset}/{stem}.txt", yolo_text(dets, r["width"], r["height"]).encode())
            else:
                image_id = len(images) + 1
                target.add(f"images/default/{stem}.{ext}", data)
                images.append({"id": image_id, "file_name": f"{stem}.{ext}", "width": r["width"],
                               "height": r["height"], "edgelabel_record_id": r["id"], "edgelabel_device": r["device"],
                               "edgelabel_source": r["source"], "edgelabel_review_state": r["review_state"],
                               "edgelabel_reviewed_by": r["reviewed_by"],
                               "edgelabel_reviewed_at": _iso(r["reviewed_at"]), "captured_at": _iso(r["captured_at"])})
                for d in dets:
                    x1, y1, x2, y2 = d["box"]
                    w, h = x2 - x1, y2 - y1
                    ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": image_id,
                                           "category_id": d["class_id"] + 1, "bbox": [x1, y1, round(w, 2), round(h, 2)],
                                           "area": round(w * h, 2), "iscrowd": 0, "segmentation": []}
                    if d.get("score") is not None:
                        ann["score"] = d["score"]
                    annotations.append(ann)
            result.images += 1
            result.annotations += len(dets)
            result.devices[r["device"]] = result.devices.get(r["device"], 0) + 1
            result.reviewed += r["review_state"] is not None
            if n % PROGRESS_EVERY == 0:
                log.info("export: %d of %d records read, %d image(s) written (%.0f s)", n, len(rows), result.images,
                         time.monotonic() - t0)
        _finish(target, fmt, names, used, images, annotations)
        target.add(MANIFEST, json.dumps({
            "format": fmt, "source": "plant store (edgelabel ingest)", "store": getattr(store, "describe", ""),
            "images": result.images, "annotations": result.annotations, "devices": result.devices,
            "reviewed_images": result.reviewed, "classes": names,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "boxes": "reviewed where a person decided, else the detector's; review_state rejected left out",
            "not_exported": result.not_exported}, indent=2, default=str).encode())
        target.commit()
    except BaseException:
        target.abort()
        raise
    for miss in result.not_exported[:5]:
        log.warning("export: %s/%s record %s not exported: %s", miss["device"], miss["source"], miss["record_id"],
                    miss["reason"])
    if len(result.not_exported) > 5:
        log.warning("export: %d more records not exported (all listed in %s)", len(result.not_exported) - 5, MANIFEST)
    log.info("export: %d image(s) from %d appliance(s), %d box(es) as %s to %s in %.1f s", result.images,
             len(result.devices), result.annotations, fmt, out, time.monotonic() - t0)
    return result


def _why_not(r: dict[str, Any]) -> str | None:
    """Why a record's frame is not in the store (None when it is)."""
    status = r["frame_status"]
    if status is None:
        return "the record names no stored frame (frame_sha256 empty)"
    if status == "pending":
        return "not fetched yet (pending)" + (f"; last try: {r['last_error']}" if r["last_error"] else "")
    if status == "failed":
        return f"fetch failed: {r['last_error']}"
    if not all(isinstance(r[k], int) and not isinstance(r[k], bool) and r[k] > 0 for k in ("width", "height")):
        return f"the record's width/height ({r['width']!r}, {r['height']!r}) are not positive integers"
    if r["boxes_error"]:
        return f"the {'reviewed' if r['review_state'] else 'detector' + chr(39) + 's'} boxes: {r['boxes_error']}"
    return None


def _clean_boxes(dets: Any) -> list[dict[str, Any]]:
    """The boxes as the export writes them (class_id an integer >= 0, box four finite numbers); ValueError
    names the first one that is not (a review's detections reach the database unchecked)."""
    if not isinstance(dets, list):
        raise ValueError(f"detections is {type(dets).__name__}, not a list")
    out = []
    for i, d in enumerate(dets):
        cid = d.get("class_id") if isinstance(d, dict) else None
        box = d.get("box") if isinstance(d, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise ValueError(f"detections[{i}].class_id is {cid!r}, not an integer >= 0")
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"detections[{i}].box is {box!r}, not four numbers")
        score = d.get("score")
        out.append({**d, "class_id": cid, "box": [float(v) for v in box],
                    "score": score if isinstance(score, (int, float)) and not isinstance(score, bool) else None})
    return out


def _class_names(rows: list[dict[str, Any]]) -> list[str]:
    """Names indexed by class id, from the boxes themselves; ids without a box get ``class<N>``."""
    seen: dict[int, str] = {}
    for r in rows:
        for d in r["detections"]:
            cid, name = int(d["class_id"]), str(d.get("label") or "")
            if cid not in seen:
                seen[cid] = name
            elif name and seen[cid] != name:
                log.warning("export: class %d is %r on %s/%s but %r before; %r is kept", cid, name, r["device"],
                            r["source"], seen[cid], seen[cid])
    if not seen:
        return []
    return [seen.get(i) or f"class{i}" for i in range(max(seen) + 1)]


def _finish(target: _Folder, fmt: str, names: list[str], used: set[str], images: list[dict[str, Any]],
            annotations: list[dict[str, Any]]) -> None:
    if fmt == "yolo":
        train = "images/train" if "train" in used or not used else "images/val"
        data = {"train": train, "val": "images/val" if "val" in used else train, "names": dict(enumerate(names))}
        header = "# edgelabel central export; no 'path': Ultralytics takes this file's folder as the dataset root\n"
        target.add("data.yaml", (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode())
        target.add("classes.txt", "".join(f"{n}\n" for n in names).encode())
        return
    doc = {"info": {"description": "edgelabel central export; category_id = class_id + 1", "version": "1",
                    "contributor": "edgelabel",
                    "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
           "licenses": [], "images": images, "annotations": annotations,
           "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]}
    target.add("annotations/instances_default.json", json.dumps(doc, ensure_ascii=False).encode())


def main(dsn: str, frames: str | None, fmt: str, out: str, *, val: float = 0.0, devices: list[str] | None = None,
         overwrite: bool = False, config: str | None = None, say: Callable[[str], None] = print) -> int:
    """The command: 0 done, 2 asked wrong, 1 failed (database, store)."""
    from edgelabel.ingest.config import ConfigError, load_ingest_config
    from edgelabel.ingest.framestore import FolderStore, open_store

    try:
        cfg = load_ingest_config(config, db=dsn)
    except ConfigError as exc:
        for p in exc.problems:
            log.error("config: %s", p)
        return 2
    try:
        store: Any = FolderStore(frames) if frames else open_store(cfg.frames) if cfg.frames.store == "s3" else None
    except (OSError, RuntimeError) as exc:
        log.error("export: the frame store: %s", exc)
        return 1
    if store is None:
        if not cfg.frames.folder:
            log.error("export: give the frame folder with --frames DIR (or -c ingest.yaml with frames.folder / s3)")
            return 2
        store = FolderStore(cfg.frames.folder)
    if isinstance(store, FolderStore) and not store.root.is_dir():
        log.error("export: %s is not a folder (the frame store that edgelabel ingest fills)", store.root)
        return 2
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
    if cfg.database.password:
        kwargs["password"] = cfg.database.password
    try:
        with psycopg.connect(cfg.database.dsn, **kwargs) as conn:
            res = export_central(conn, store, fmt, Path(out), val_fraction=val, devices=devices, overwrite=overwrite)
    except CentralExportError as exc:
        log.error("export: %s", exc)
        return 2
    except (psycopg.Error, OSError) as exc:
        from edgelabel.edge.redact import redact

        log.error("export failed: %s", redact(" ".join(str(exc).split())))
        return 1
    skipped = f"; {len(res.not_exported)} record(s) not exported (listed in {MANIFEST})" if res.not_exported else ""
    say(f"exported {res.images} image(s), {res.annotations} box(es) from {len(res.devices)} appliance(s) as "
        f"{res.format} to {res.path} ({res.reviewed} reviewed){skipped}")
    return 0

"""Export the dataset for training and labeling tools: YOLO, COCO, Pascal VOC, CVAT for images 1.1, Label Studio.

``edgelabel export --format F [--state S,...] OUT`` and the review page's export button both call
:func:`export_dataset`.  It reads the frames in the chosen review states from ``index.sqlite``
(default: accepted, corrected, auto_accepted -- never needs_review or rejected unless asked),
copies their images (a hard link when the export is on the dataset's disk) and writes the
annotations.  ``OUT`` is a folder, or a zip when it ends in ``.zip``; either is built under a
temporary name and renamed at the end, so an interrupted export never looks finished.

Layouts (each is what the format's own tools import; the tests load every one with an
independent reader -- pycocotools, Datumaro, the Label Studio SDK)::

    yolo         data.yaml (names; train/val), classes.txt, images/<train|val>/, labels/<train|val>/*.txt
    coco         annotations/instances_default.json, images/default/
    voc          Annotations/*.xml, JPEGImages/, ImageSets/Main/default.txt, labelmap.txt
    cvat         annotations.xml (CVAT for images 1.1), images/
    labelstudio  tasks.json (predictions, reviewed frames also as annotations), label_config.xml, images/

Every export also has ``edgelabel-export.json``: what was exported, from where, and the conventions below.

Conventions: boxes are the dataset's ``[x1, y1, x2, y2]`` pixels.  COCO ``bbox`` is ``[x, y, w, h]``
and ``category_id = class_id + 1``; the detector's score is kept on its boxes.  VOC uses 1-based
inclusive integer pixels: ``xmin = floor(x1) + 1``, ``xmax = ceil(x2)`` (what the VOC devkit and
Datumaro's ``voc-one-based`` mode read back).  CVAT boxes are float pixels, ``source="auto"`` for the
detector's boxes and ``"manual"`` for boxes a person drew or changed.  Label Studio coordinates are
percentages of ``original_width/height``; each task carries the detector's boxes as a prediction
(``model_version`` = the model, ``score`` = its lowest box score, so Label Studio can sort the least
sure first), and a frame a person accepted or corrected carries its boxes as an annotation too.
Image names are ``<source>_<stem>.<ext>``, unique in the export.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree as ET

import yaml

from edgelabel.edge.formats import replace_folder, yolo_text
from edgelabel.edge.records import iso_utc
from edgelabel.edge.sinks.dataset import INDEX_FILE, STATES, DatasetIndex, safe_component

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("yolo", "coco", "voc", "cvat", "labelstudio")
DEFAULT_STATES = ("accepted", "corrected", "auto_accepted")
MANIFEST = "edgelabel-export.json"
#: Label Studio tag names used in label_config.xml and in every result's from_name/to_name
LS_IMAGE, LS_LABELS = "image", "label"
#: what a Label Studio task's image URL starts with when no prefix is given (local files storage)
LS_LOCAL_FILES = "/data/local-files/?d="


class ExportError(ValueError):
    """The export cannot be made as asked (unknown format or state, no dataset, OUT exists); one line says why."""


@dataclass(frozen=True)
class ExportItem:
    """One frame to export."""

    record_id: str
    source: str
    frame_index: int
    state: str
    width: int
    height: int
    image: Path  # the file with its pixels
    name: str  # the image's file name in the export (unique)
    detections: list[dict[str, Any]]  # the labels now
    model_detections: list[dict[str, Any]]  # what the detector said
    captured_at: str
    reviewed_by: str | None
    reviewed_at: str | None
    #: an original input file (not a copy the dataset stored): its bytes as labeled, and how to read it
    #: (``DatasetIndex.read_original``: never through a symlink into the daemon's own files)
    sha256: str | None = None
    read: Callable[[Path], bytes] | None = None

    @property
    def stem(self) -> str:
        return Path(self.name).stem


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    format: str
    states: tuple[str, ...]
    images: int = 0
    annotations: int = 0
    missing: list[str] = field(default_factory=list)  # record ids whose image no longer exists (skipped)


def parse_states(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"accepted,corrected"`` (or a list) as a tuple of known states; ExportError names an unknown one."""
    if text is None or text == "":
        return DEFAULT_STATES
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    for p in parts:
        if p not in STATES:
            raise ExportError(f"unknown review state {p!r} (use {', '.join(STATES)})")
    if not parts:
        raise ExportError("no review state given")
    return tuple(dict.fromkeys(parts))


def _original(index: DatasetIndex, row: Any) -> dict[str, Any]:
    """ExportItem fields for a row that references an original input file (empty for a stored copy)."""
    sha = row["image_sha256"] if "image_sha256" in row.keys() else None
    if not Path(row["image_path"] or "").is_absolute():
        return {}
    # read the guarded way even without a sha256 (a row from before hashes were kept): a hard link or copy of
    # the path would follow a symlink swapped in to the daemon's own files
    return {"sha256": sha or None, "read": index.read_original}


def _add_image(target: _Target, name: str, it: ExportItem) -> None:
    """The frame's image into the export.  An original is read once more and its bytes checked again: what was
    verified when the export began may have been swapped since (a symlink to another file)."""
    if it.read is None:
        target.add_file(name, it.image)
        return
    try:
        data = it.read(it.image)
    except OSError as exc:
        raise ExportError(f"{it.image} could not be read while it was exported ({exc}); export again") from None
    if it.sha256 is not None and hashlib.sha256(data).hexdigest() != it.sha256:
        raise ExportError(f"{it.image} changed while it was exported (not the labeled bytes); export again")
    target.add_bytes(name, data)


def collect(index: DatasetIndex, states: Sequence[str]) -> tuple[list[ExportItem], list[str]]:
    """The frames in ``states`` whose image still exists, oldest first; and the ids of those without one."""
    marks = ",".join("?" * len(states))
    rows = index.select(f"state IN ({marks})", list(states), order="rowid")
    items: list[ExportItem] = []
    missing: list[str] = []
    taken: set[str] = set()
    for r in rows:
        image = index.image_file(r)
        if image is None or not image.is_file() or index.original_changed(r, image):
            missing.append(r["id"])
            continue
        stem = f"{safe_component(r['source'])}_{Path(r['label_path']).stem}"
        while stem in taken:  # label stems are unique per source already; this is a guard, not a scheme
            stem += "_"
        taken.add(stem)
        current = json.loads(r["detections"])
        items.append(ExportItem(
            record_id=r["id"], source=r["source"], frame_index=r["frame_index"], state=r["state"],
            width=int(r["width"]), height=int(r["height"]), image=image, name=stem + image.suffix.lower(),
            detections=current,
            model_detections=json.loads(r["model_detections"]) if r["model_detections"] else current,
            captured_at=r["captured_at"], reviewed_by=r["reviewed_by"], reviewed_at=r["reviewed_at"],
            **_original(index, r)))
    return items, missing


def export_dataset(dataset: Path | DatasetIndex, fmt: str, out: Path, *, states: Sequence[str] = DEFAULT_STATES,
                   val_fraction: float = 0.0, image_prefix: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export the frames of ``dataset`` (a folder, or an open index) in ``states`` as ``fmt`` to ``out``.

    ``out`` ending in ``.zip`` makes a zip, anything else a folder (which must not exist, or be empty,
    unless ``overwrite``).  ``val_fraction`` (yolo) puts that share of the frames, chosen by record id,
    in ``val``; ``image_prefix`` (labelstudio) starts every task's image URL (default
    ``/data/local-files/?d=<OUT name>/``, i.e. Label Studio's local files with the export's parent as
    document root).  Raises ExportError, or OSError/sqlite3.Error when reading or writing fails.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    states = parse_states(states)
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"val fraction {val_fraction} must be in [0, 1)")
    out = Path(out)
    as_zip = out.suffix.lower() == ".zip"
    if out.exists() and not overwrite and (as_zip or not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a folder with files in it"
        raise ExportError(f"{out} exists ({what}): choose another OUT, or add --overwrite to replace it")
    if isinstance(dataset, DatasetIndex):
        index, owned = dataset, False
    else:
        root = Path(dataset)
        if not (root / INDEX_FILE).is_file():
            raise ExportError(f"{root.resolve()}: no dataset here ({INDEX_FILE} not found); name the dataset folder "
                              "with --dataset DIR, or the config that sets its dataset.path with -c CONFIG")
        index, owned = DatasetIndex(root, repair=False), True  # read-only use: a running daemon owns the repairs
        index.open()
    try:
        items, missing = collect(index, states)
        names, model = index.names, index.model_name
        source_root = str(index.root)
    finally:
        if owned:
            index.close()
    for rid in missing[:5]:
        log.warning("export: the image of frame %s no longer exists; skipped", rid)
    if len(missing) > 5:
        log.warning("export: %d more frames without their image skipped", len(missing) - 5)
    name = out.name[:-4] if as_zip else out.name
    prefix = image_prefix if image_prefix is not None else f"{LS_LOCAL_FILES}{name}/"
    target: _Target = _ZipTarget(out) if as_zip else _FolderTarget(out, overwrite)
    result = ExportResult(out, fmt, states, images=len(items), missing=missing)
    try:
        writer = _WRITERS[fmt]
        result.annotations = writer(items, names, model, target, _Options(val_fraction, prefix))
        target.add_bytes(MANIFEST, json.dumps({
            "format": fmt, "states": list(states), "images": result.images, "annotations": result.annotations,
            "skipped_missing_image": len(missing), "classes": names, "model": model, "dataset": source_root,
            "created": iso_utc(time.time()), "conventions": _CONVENTIONS[fmt]}, indent=2).encode())
        target.commit()
    except BaseException:
        target.abort()
        raise
    log.info("export: %d image(s), %d box(es) as %s to %s", result.images, result.annotations, fmt, out)
    return result


# ---------------------------------------------------------------------- output targets


class _Target(Protocol):
    def add_bytes(self, name: str, data: bytes) -> None: ...

    def add_file(self, name: str, path: Path) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class _FolderTarget:
    """A folder built as ``.<name>.partial-*`` next to OUT and renamed into place by ``commit``."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        self.overwrite = overwrite
        self.tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self._dirs: set[Path] = set()

    def _path(self, name: str) -> Path:
        p = self.tmp / name
        if p.parent not in self._dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(p.parent)
        return p

    def add_bytes(self, name: str, data: bytes) -> None:
        self._path(name).write_bytes(data)

    def add_file(self, name: str, path: Path) -> None:
        dst = self._path(name)
        try:
            os.link(path, dst)  # same disk: no second copy of every image on a small appliance disk
        except OSError:
            shutil.copyfile(path, dst)

    def commit(self) -> None:
        replace_folder(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _ZipTarget:
    """A zip written as ``.<name>.partial-*`` next to OUT and renamed into place by ``commit``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        self.zip = zipfile.ZipFile(self.tmp, "w", allowZip64=True)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.zip.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)

    def add_file(self, name: str, path: Path) -> None:
        self.zip.write(path, name, compress_type=zipfile.ZIP_STORED)  # JPEG/PNG do not compress further

    def commit(self) -> None:
        self.zip.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            self.zip.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- formats


@dataclass(frozen=True)
class _Options:
    val_fraction: float
    image_prefix: str


def _fraction(record_id: str) -> float:
    """A stable number in [0, 1) per record: the same frame always lands in the same split."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 2**32


def _write_yolo(items: list[ExportItem], names: list[str], model: str, target: _Target, opts: _Options) -> int:
    used: set[str] = set()
    boxes = 0
    for it in items:
        subset = "val" if opts.val_fraction and _fraction(it.record_id) < opts.val_fraction else "train"
        used.add(subset)
        _add_image(target, f"images/{subset}/{it.name}", it)
        target.add_bytes(f"labels/{subset}/{it.stem}.txt", yolo_text(it.detections, it.width, it.height).encode())
        boxes += len(it.detections)
    train = "images/train" if "train" in used or not used else "images/val"
    data = {"train": train, "val": "images/val" if "val" in used else train, "names": dict(enumerate(names))}
    header = f"# edgelabel export ({model}); no 'path': Ultralytics takes this file's folder as the dataset root\n"
    target.add_bytes("data.yaml", (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode())
    target.add_bytes("classes.txt", "".join(f"{n}\n" for n in names).encode())
    return boxes


def _write_coco(items: list[ExportItem], names: list[str], model: str, target: _Target, opts: _Options) -> int:
    images, annotations = [], []
    for image_id, it in enumerate(items, start=1):
        _add_image(target, f"images/default/{it.name}", it)
        images.append({"id": image_id, "file_name": it.name, "width": it.width, "height": it.height,
                       "edgelabel_record_id": it.record_id, "edgelabel_source": it.source,
                       "edgelabel_review_state": it.state, "edgelabel_reviewed_by": it.reviewed_by,
                       "edgelabel_reviewed_at": it.reviewed_at, "captured_at": it.captured_at})
        for d in it.detections:
            x1, y1, x2, y2 = d["box"]
            w, h = x2 - x1, y2 - y1
            ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": image_id, "category_id": d["class_id"] + 1,
                                   "bbox": [x1, y1, round(w, 2), round(h, 2)], "area": round(w * h, 2),
                                   "iscrowd": 0, "segmentation": []}
            if d.get("score") is not None:
                ann["score"] = d["score"]
            annotations.append(ann)
    doc = {
        "info": {"description": f"edgelabel export ({model}); category_id = class_id + 1", "version": "1",
                 "year": time.gmtime().tm_year, "contributor": "edgelabel", "date_created": iso_utc(time.time())},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)],
    }
    target.add_bytes("annotations/instances_default.json", json.dumps(doc, ensure_ascii=False).encode())
    return len(annotations)


def _voc_box(box: list[float], w: int, h: int) -> tuple[int, int, int, int]:
    """1-based inclusive pixels covering the box, clipped to the image (see the module doc)."""
    x1, y1, x2, y2 = box
    xmin, ymin = min(max(math.floor(x1) + 1, 1), w), min(max(math.floor(y1) + 1, 1), h)
    xmax, ymax = min(max(math.ceil(x2), xmin), w), min(max(math.ceil(y2), ymin), h)
    return xmin, ymin, xmax, ymax


def _write_voc(items: list[ExportItem], names: list[str], model: str, target: _Target, opts: _Options) -> int:
    boxes = 0
    for it in items:
        _add_image(target, f"JPEGImages/{it.name}", it)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "JPEGImages"
        ET.SubElement(root, "filename").text = it.name
        src = ET.SubElement(root, "source")
        ET.SubElement(src, "database").text = f"edgelabel {it.source}"
        size = ET.SubElement(root, "size")
        for tag, value in (("width", it.width), ("height", it.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        ET.SubElement(root, "segmented").text = "0"
        for d in it.detections:
            xmin, ymin, xmax, ymax = _voc_box(d["box"], it.width, it.height)
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = d["label"]
            ET.SubElement(obj, "pose").text = "Unspecified"
            touches = xmin == 1 or ymin == 1 or xmax == it.width or ymax == it.height
            ET.SubElement(obj, "truncated").text = "1" if touches else "0"
            ET.SubElement(obj, "difficult").text = "0"
            ET.SubElement(obj, "occluded").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
                ET.SubElement(bb, tag).text = str(value)
            boxes += 1
        ET.indent(root)
        target.add_bytes(f"Annotations/{it.stem}.xml", ET.tostring(root, encoding="utf-8", xml_declaration=True))
    target.add_bytes("ImageSets/Main/default.txt", "".join(f"{it.stem}\n" for it in items).encode())
    lines = ["# label:color_rgb:parts:actions\n"] + [f"{n}:{','.join(map(str, _rgb(i)))}::\n" for i, n in enumerate(names)]
    target.add_bytes("labelmap.txt", "".join(lines).encode())
    return boxes


def _write_cvat(items: list[ExportItem], names: list[str], model: str, target: _Target, opts: _Options) -> int:
    now = iso_utc(time.time())
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    for tag, value in (("name", f"edgelabel export ({model})"), ("size", str(len(items))), ("mode", "annotation"),
                       ("overlap", "0"), ("created", now), ("updated", now)):
        ET.SubElement(task, tag).text = value
    labels = ET.SubElement(task, "labels")
    for i, n in enumerate(names):
        lab = ET.SubElement(labels, "label")
        ET.SubElement(lab, "name").text = n
        ET.SubElement(lab, "color").text = _hex(i)
        ET.SubElement(lab, "type").text = "rectangle"
        ET.SubElement(lab, "attributes")
    ET.SubElement(meta, "dumped").text = now
    boxes = 0
    for frame, it in enumerate(items):
        _add_image(target, f"images/{it.name}", it)
        img = ET.SubElement(root, "image", id=str(frame), name=it.name, width=str(it.width), height=str(it.height))
        model_boxes = {_box_key(d) for d in it.model_detections}
        for d in it.detections:
            x1, y1, x2, y2 = d["box"]
            ET.SubElement(img, "box", label=d["label"], source="auto" if _box_key(d) in model_boxes else "manual",
                          occluded="0", xtl=f"{x1:.2f}", ytl=f"{y1:.2f}", xbr=f"{x2:.2f}", ybr=f"{y2:.2f}", z_order="0")
            boxes += 1
    ET.indent(root)
    target.add_bytes("annotations.xml", ET.tostring(root, encoding="utf-8", xml_declaration=True))
    return boxes


def _ls_results(it: ExportItem, dets: list[dict[str, Any]], scores: bool) -> list[dict[str, Any]]:
    out = []
    for i, d in enumerate(dets):
        x1, y1, x2, y2 = d["box"]
        result: dict[str, Any] = {
            "id": f"{it.record_id[:8]}-{'p' if scores else 'a'}{i}",
            "type": "rectanglelabels",
            "from_name": LS_LABELS,
            "to_name": LS_IMAGE,
            "original_width": it.width,
            "original_height": it.height,
            "image_rotation": 0,
            "value": {"x": round(100.0 * x1 / it.width, 4), "y": round(100.0 * y1 / it.height, 4),
                      "width": round(100.0 * (x2 - x1) / it.width, 4), "height": round(100.0 * (y2 - y1) / it.height, 4),
                      "rotation": 0, "rectanglelabels": [d["label"]]},
        }
        if scores and d.get("score") is not None:
            result["score"] = d["score"]
        out.append(result)
    return out


def _write_labelstudio(items: list[ExportItem], names: list[str], model: str, target: _Target, opts: _Options) -> int:
    tasks = []
    boxes = 0
    for it in items:
        _add_image(target, f"images/{it.name}", it)
        scored = [d["score"] for d in it.model_detections if d.get("score") is not None]
        prediction: dict[str, Any] = {"model_version": model, "result": _ls_results(it, it.model_detections, True)}
        if scored:
            prediction["score"] = min(scored)
        task: dict[str, Any] = {
            "data": {LS_IMAGE: f"{opts.image_prefix}images/{it.name}", "edgelabel_record_id": it.record_id,
                     "edgelabel_source": it.source, "edgelabel_review_state": it.state},
            "predictions": [prediction],
        }
        if it.state in ("accepted", "corrected"):
            task["annotations"] = [{"result": _ls_results(it, it.detections, False), "ground_truth": False}]
        tasks.append(task)
        boxes += len(it.detections)
    target.add_bytes("tasks.json", json.dumps(tasks, indent=1, ensure_ascii=False).encode())
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=LS_IMAGE, value=f"${LS_IMAGE}")
    rl = ET.SubElement(view, "RectangleLabels", name=LS_LABELS, toName=LS_IMAGE)
    for i, n in enumerate(names):
        ET.SubElement(rl, "Label", value=n, background=_hex(i))
    ET.indent(view)
    target.add_bytes("label_config.xml", ET.tostring(view, encoding="utf-8"))
    return boxes


_WRITERS = {"yolo": _write_yolo, "coco": _write_coco, "voc": _write_voc, "cvat": _write_cvat,
            "labelstudio": _write_labelstudio}
_CONVENTIONS = {
    "yolo": "class cx cy w h, normalised to [0, 1]; class ids index data.yaml names",
    "coco": "bbox [x, y, w, h] in pixels; category_id = class_id + 1; score kept on the detector's boxes",
    "voc": "1-based inclusive integer pixels: xmin = floor(x1) + 1, xmax = ceil(x2)",
    "cvat": "CVAT for images 1.1; xtl/ytl/xbr/ybr float pixels; source auto = the detector's box, manual = a person's",
    "labelstudio": "percent of original_width/height; predictions = the detector, annotations = a person's accepted "
                   "or corrected boxes; from_name 'label', to_name 'image' as in label_config.xml",
}


def _box_key(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["class_id"], *(round(float(v), 1) for v in d["box"]))


def _hex(i: int) -> str:
    r, g, b = _rgb(i)
    return f"#{r:02x}{g:02x}{b:02x}"


def _rgb(i: int) -> tuple[int, int, int]:
    """A stable, distinct colour per class (golden-ratio hues), for label maps and editors."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


__all__ = ["DEFAULT_STATES", "EXPORT_FORMATS", "ExportError", "ExportItem", "ExportResult", "collect",
           "export_dataset", "parse_states"]

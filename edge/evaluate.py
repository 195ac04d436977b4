"""Accuracy of a detector on a labeled YOLO folder: COCO mAP50-95 and mAP50, overall and per class.

Why this exists: an auto-labeler is only as good as its model on *this* site's images, and the
question "is this model (or this INT8 engine) good enough here?" needs a number measured on the
operator's own labeled frames, with the metric everyone quotes (COCO mAP).  The metric itself is
pycocotools' reference implementation, not a re-implementation: published YOLO figures come from it,
and a home-made AP always differs in some interpolation detail.

One function (:func:`_coco_scores`) builds the ground-truth and detection COCO objects and runs
``COCOeval``; both :func:`evaluate` (labels from disk are the truth) and
:func:`map_against_reference` (another detector's output is the truth: the INT8 gate) go through it,
so the two can never disagree on how a score is computed.

pycocotools pitfalls handled there, once:

* image, annotation and category ids start at 1: ``COCOeval`` stores the *id* of the matched
  annotation and reads 0 as "unmatched", so an annotation with id 0 is never counted as found;
  category id = class id + 1, as in the dataset sink's COCO file;
* ``COCO.loadRes([])`` fails on an empty list, so the detection object is built directly (an empty
  detection set is legitimate: its AP is 0 for every class that has ground truth);
* every annotation carries ``area`` (the area-range filter) and ``iscrowd: 0``;
* pycocotools prints progress to stdout; it is redirected, so library code stays silent;
* a class without ground truth gets precision -1 from ``COCOeval``: it is left out of the mean and
  reported as n/a (``None``);
* ``COCOeval``'s precision is ``tp / (tp + fp + eps)``, so a perfect score reads 0.9999999999999998;
  APs are rounded to 9 decimals so identical detections give exactly 1.0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import yaml

from edgelabel.edge.progress import Progress
from edgelabel.edge.sources import IMAGE_EXTENSIONS
from edgelabel.edge.sources.imageio import ImageRejected, decode_image_file
from edgelabel.engines.base import Detection

if TYPE_CHECKING:  # the detector is only called, never constructed here
    from edgelabel.engines.detector import Detector

log = logging.getLogger(__name__)

#: a normalized coordinate may overshoot [0, 1] by this much (rounding in label tools) before it is an error
_COORD_TOLERANCE = 1e-3
#: APs are rounded to this many decimals (see the module docstring)
_AP_DECIMALS = 9


class DatasetError(ValueError):
    """The labeled folder cannot be used; the message names the file (and line) and what to fix."""


class NoGroundTruthError(ValueError):
    """There is no ground-truth box at all, so mAP is undefined (nothing to find)."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class GroundTruthBox:
    """One labeled object, normalized as in the YOLO txt file (centre, size; 0..1 of the image)."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def to_xyxy(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Corner box in pixels of a ``width`` x ``height`` image, clipped to the image."""
        x1 = min(max((self.cx - self.w / 2.0) * width, 0.0), float(width))
        y1 = min(max((self.cy - self.h / 2.0) * height, 0.0), float(height))
        x2 = min(max((self.cx + self.w / 2.0) * width, 0.0), float(width))
        y2 = min(max((self.cy + self.h / 2.0) * height, 0.0), float(height))
        return (x1, y1, x2, y2)


@dataclass
class YoloDataset:
    """A labeled folder: image paths, their boxes (same order) and the class names.

    An image without a label file is a negative (an empty list): it still counts, because boxes a
    detector invents on it are false positives.
    """

    root: Path
    images: list[Path]
    ground_truth: list[list[GroundTruthBox]]
    #: class names, index = class id; empty when the folder has neither data.yaml names nor classes.txt
    names: list[str]
    #: images that had no label file at all (negatives by omission, reported so a wrong layout shows)
    unlabeled: int = 0

    @property
    def boxes(self) -> int:
        """Number of ground-truth boxes."""
        return sum(len(g) for g in self.ground_truth)


def _names_from(value: object, source: Path) -> list[str]:
    """``names:`` as a list or as an ``{id: name}`` mapping (both are written by Ultralytics tools)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        try:
            table = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: names: keys must be class ids (0, 1, ...), got {list(value)[:5]}") from None
        if table and min(table) < 0:
            raise DatasetError(f"{source}: names: class ids must be >= 0")
        return [table.get(i, str(i)) for i in range(max(table) + 1)] if table else []
    raise DatasetError(f"{source}: names: expected a list or a mapping of class id to name, got {type(value).__name__}")


def _read_names(root: Path) -> list[str] | None:
    """Class names from ``data.yaml`` (or ``dataset.yaml``), else ``classes.txt``; None when neither exists."""
    for candidate in ("data.yaml", "data.yml", "dataset.yaml"):
        path = root / candidate
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DatasetError(f"{path}: cannot read it ({exc}); fix or delete it") from None
        if isinstance(data, dict) and "names" in data:
            return _names_from(data["names"], path)
        log.warning("%s has no 'names'; looking for classes.txt", path)
    classes = root / "classes.txt"
    if classes.is_file():
        return [ln.strip() for ln in classes.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return None


def _parse_number(text: str, path: Path, lineno: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}:{lineno}: {what} is {text}")
    return value


def parse_label_file(path: Path) -> list[GroundTruthBox]:
    """Read one YOLO label file: ``class cx cy w h`` per line, normalized to 0..1.

    Also accepted, as Ultralytics does: a sixth column (a confidence written by ``save_conf``,
    ignored) and polygon lines (``class x1 y1 x2 y2 x3 y3 ...``, turned into their bounding box).
    Blank lines are skipped; anything else is a :class:`DatasetError` naming the file and line,
    because a silently dropped label would make the model look worse than it is.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the label file ({exc})") from None
    boxes: list[GroundTruthBox] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        n = len(parts)
        if n < 5 or (n > 6 and n % 2 == 0):
            raise DatasetError(
                f"{path}:{lineno}: expected 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 x2 y2 x3 y3 ...', "
                f"got {n} field(s): {line.strip()[:80]!r}"
            )
        cls = _parse_number(parts[0], path, lineno, "class id")
        if cls < 0 or cls != int(cls):
            raise DatasetError(f"{path}:{lineno}: class id {parts[0]!r} must be a whole number >= 0")
        if n <= 6:
            cx, cy, w, h = (_parse_number(p, path, lineno, f) for p, f in zip(parts[1:5], ("cx", "cy", "w", "h"), strict=True))
        else:
            coords = [_parse_number(p, path, lineno, "polygon coordinate") for p in parts[1:]]
            xs, ys = coords[0::2], coords[1::2]
            x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            raise DatasetError(f"{path}:{lineno}: box width and height must be > 0, got w={w:g} h={h:g}")
        lo, hi = -_COORD_TOLERANCE, 1 + _COORD_TOLERANCE
        if not (lo <= cx - w / 2 and cx + w / 2 <= hi and lo <= cy - h / 2 and cy + h / 2 <= hi):
            raise DatasetError(
                f"{path}:{lineno}: box cx={cx:g} cy={cy:g} w={w:g} h={h:g} leaves the 0..1 range "
                "(YOLO labels are normalized by the image size; pixel coordinates must be divided by width/height)"
            )
        boxes.append(GroundTruthBox(int(cls), cx, cy, w, h))
    return boxes


def _images_dir(root: Path, split: str | None) -> tuple[Path, Path]:
    """The images folder to scan and its labels twin, for both supported layouts.

    ``ROOT/images/**`` + ``ROOT/labels/**`` (with ``split``: ``ROOT/images/<split>`` +
    ``ROOT/labels/<split>``, the Ultralytics layout), or ``ROOT/<split>/images`` +
    ``ROOT/<split>/labels`` (Roboflow's export of the same format).
    """
    if split:
        for images, labels in ((root / "images" / split, root / "labels" / split), (root / split / "images", root / split / "labels")):
            if images.is_dir():
                return images, labels
        splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        hint = f" (splits found: {', '.join(splits)})" if splits else ""
        raise DatasetError(f"{root}: no split {split!r}: neither images/{split}/ nor {split}/images/ exists{hint}")
    images = root / "images"
    if not images.is_dir():
        raise DatasetError(
            f"{root}: no images/ folder; expected ROOT/images/** with labels in ROOT/labels/** (same relative path, .txt)"
        )
    return images, root / "labels"


def load_yolo_dataset(root: str | Path, split: str | None = None) -> YoloDataset:
    """Load a YOLO-format labeled folder (the layout ``edgelabel`` writes and Ultralytics reads).

    ``root`` holds ``images/`` and ``labels/``; the label of ``images/a/b.jpg`` is
    ``labels/a/b.txt``.  ``split`` selects ``images/<split>`` (or ``<split>/images``).  Class
    names come from ``data.yaml`` ``names`` (list or mapping), else ``classes.txt``, else the
    class ids found.  ``root`` may also be the ``data.yaml`` file itself.

    Raises :class:`DatasetError` for a missing folder, a missing ``labels/`` folder, a malformed
    label line (file and line named) or a class id outside ``names``.
    """
    root = Path(root)
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        root = root.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (give the dataset folder that holds images/ and labels/)")
    images_dir, labels_dir = _images_dir(root, split)
    if not labels_dir.is_dir():
        raise DatasetError(
            f"{labels_dir}: missing; every image would count as having no objects. "
            f"Put one .txt per image there (same relative path as under {images_dir})"
        )
    images: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(images_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        images.extend(
            Path(dirpath) / fn for fn in sorted(filenames) if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS
        )
    if not images:
        raise DatasetError(f"{images_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    ground_truth: list[list[GroundTruthBox]] = []
    unlabeled = 0
    for image in images:
        label = (labels_dir / image.relative_to(images_dir)).with_suffix(".txt")
        if label.is_file():
            ground_truth.append(parse_label_file(label))
        else:
            unlabeled += 1
            ground_truth.append([])
    names = _read_names(root)
    seen = {b.class_id for boxes in ground_truth for b in boxes}
    if names is None:
        log.info("%s: no data.yaml names nor classes.txt; class names will be the model's", root)
        names = []
    elif seen and max(seen) >= len(names):
        bad = max(seen)
        where = next(
            (labels_dir / img.relative_to(images_dir)).with_suffix(".txt")
            for img, boxes in zip(images, ground_truth, strict=True)
            if any(b.class_id == bad for b in boxes)
        )
        raise DatasetError(f"{where}: class id {bad} but the dataset names only {len(names)} classes (ids 0..{len(names) - 1})")
    if unlabeled:
        log.info("%s: %d of %d images have no label file; they count as images without objects", root, unlabeled, len(images))
    return YoloDataset(root=root, images=images, ground_truth=ground_truth, names=names, unlabeled=unlabeled)


# --------------------------------------------------------------------------- COCO scoring


class ClassAP(NamedTuple):
    """AP of one class; ``None`` (shown as n/a) when the class has no ground truth."""

    name: str
    ap50_95: float | None
    ap50: float | None
    n_gt: int


@dataclass
class _CocoScores:
    map50_95: float
    map50: float
    per_class: dict[int, tuple[float | None, float | None]]  # class id -> (ap50_95, ap50)


Box = tuple[float, float, float, float]


def _coco_scores(
    truth: Sequence[Sequence[tuple[int, Box]]],
    detections: Sequence[Sequence[Detection]],
    image_sizes: Sequence[tuple[int, int]],
    class_ids: Sequence[int],
) -> _CocoScores:
    """COCO bbox evaluation of ``detections`` against ``truth`` (both per image, xyxy pixels).

    ``image_sizes`` are (width, height); ``class_ids`` the categories to score (classes outside it
    are ignored on both sides).  Raises :class:`NoGroundTruthError` when ``truth`` holds no box.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not (len(truth) == len(detections) == len(image_sizes)):
        raise ValueError(f"{len(truth)} truth lists, {len(detections)} detection lists and {len(image_sizes)} image sizes")
    cats = sorted(set(class_ids))
    wanted = set(cats)
    images = [{"id": i + 1, "width": int(w), "height": int(h)} for i, (w, h) in enumerate(image_sizes)]
    categories = [{"id": c + 1, "name": str(c)} for c in cats]

    def ann(aid: int, img: int, cls: int, box: Box) -> dict[str, object] | None:
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:  # zero-area boxes cannot overlap anything; pycocotools would count a miss
            return None
        return {"id": aid, "image_id": img, "category_id": cls + 1, "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}

    gt_anns: list[dict[str, object]] = []
    for i, boxes in enumerate(truth):
        for cls, box in boxes:
            if cls in wanted and (a := ann(len(gt_anns) + 1, i + 1, cls, box)) is not None:
                gt_anns.append(a)
    if not gt_anns:
        raise NoGroundTruthError("no ground-truth box: mAP is undefined")
    dt_anns: list[dict[str, object]] = []
    for i, dets in enumerate(detections):
        for d in dets:
            if d.class_id in wanted and (a := ann(len(dt_anns) + 1, i + 1, d.class_id, d.box)) is not None:
                a["score"] = float(d.score)
                dt_anns.append(a)

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.catIds = [c + 1 for c in cats]
        ev.evaluate()
        ev.accumulate()
    # precision: [iou thresholds (0.50:0.05:0.95), recall points, classes, area ranges (0 = all), max dets (-1 = 100)]
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class: dict[int, tuple[float | None, float | None]] = {}
    valid50_95: list[float] = []
    valid50: list[float] = []
    for k, cls in enumerate(cats):
        p = precision[:, :, k]
        if (p < 0).all():  # no ground truth for this class
            per_class[cls] = (None, None)
            continue
        ap = round(float(np.mean(p[p > -1])), _AP_DECIMALS)
        p50 = p[0]
        ap50 = round(float(np.mean(p50[p50 > -1])), _AP_DECIMALS)
        per_class[cls] = (ap, ap50)
        valid50_95.append(ap)
        valid50.append(ap50)
    return _CocoScores(
        map50_95=round(float(np.mean(valid50_95)), _AP_DECIMALS),
        map50=round(float(np.mean(valid50)), _AP_DECIMALS),
        per_class=per_class,
    )


def map_against_reference(
    reference: Sequence[Sequence[Detection]],
    candidate: Sequence[Sequence[Detection]],
    image_sizes: Sequence[tuple[int, int]],
) -> tuple[float, float]:
    """(mAP50-95, mAP50) of ``candidate`` scored with ``reference``'s detections as the ground truth.

    Why: to judge a faster build of a model (INT8) without labeled data, the trusted build (FP16)
    is the truth; a candidate that reproduces it exactly scores 1.0.  Reference scores are
    ignored (every reference box is a true object).  ``image_sizes`` are (width, height) per image.
    Raises :class:`NoGroundTruthError` when the reference found nothing on any image.
    """
    truth = [[(d.class_id, d.box) for d in dets] for dets in reference]
    classes = {d.class_id for dets in reference for d in dets} | {d.class_id for dets in candidate for d in dets}
    scores = _coco_scores(truth, candidate, image_sizes, sorted(classes))
    return scores.map50_95, scores.map50


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """mAP of one detector on one dataset (0..1), per class, and how long it took."""

    map50_95: float
    map50: float
    per_class: list[ClassAP]
    images: int
    seconds: float
    boxes: int = 0
    #: images that could not be decoded ("path: reason"); they are left out of the score
    skipped: list[str] = field(default_factory=list)


def evaluate(detector: Detector, dataset: YoloDataset, progress: bool = True) -> EvalResult:
    """Run ``detector.detect`` on every image of ``dataset`` and score it with COCO mAP.

    Scores depend on the detector's confidence threshold: mAP is meant to be measured with a low
    one (``yolo val`` uses 0.001) so the whole precision/recall curve is seen; at the operating
    threshold (0.25) it is lower.  Class ids are compared by number: a model whose class 0 is not
    the dataset's class 0 scores near zero (a warning says so when the names differ).

    An image that cannot be decoded is logged, listed in ``skipped`` and left out.  Raises
    :class:`NoGroundTruthError` when the dataset has no box at all (mAP would be undefined).
    """
    if dataset.boxes == 0:
        raise NoGroundTruthError(
            f"{dataset.root}: no labeled box in {len(dataset.images)} images; mAP needs at least one object to find"
        )
    _warn_name_mismatch(dataset, detector.names)
    truth: list[list[tuple[int, Box]]] = []
    found: list[list[Detection]] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[str] = []
    bar = Progress(total=len(dataset.images), label="evaluating", enabled=progress)
    started = time.perf_counter()
    try:
        for path, gt in zip(dataset.images, dataset.ground_truth, strict=True):
            try:  # the folder source's decoder: every way a file can be unusable is one ImageRejected
                image = decode_image_file(str(path)).image
            except ImageRejected as exc:  # one bad file must not end the run, nor silently change the score
                log.warning("%s: skipped (%s)", path, exc.reason)
                skipped.append(f"{path}: {exc.reason}")
                bar.update()
                continue
            height, width = image.shape[:2]
            truth.append([(b.class_id, b.to_xyxy(width, height)) for b in gt])
            found.append(detector.detect(image).detections)
            sizes.append((width, height))
            bar.update()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    n_gt: dict[int, int] = {}
    for boxes in truth:
        for cls, _ in boxes:
            n_gt[cls] = n_gt.get(cls, 0) + 1
    # scored: every class the dataset declares or labels; a detection of any other class cannot be judged
    classes = sorted(set(range(len(dataset.names))) | set(n_gt))
    scores = _coco_scores(truth, found, sizes, classes)
    per_class = [ClassAP(_class_name(cls, dataset.names, detector.names), *scores.per_class[cls], n_gt.get(cls, 0)) for cls in classes]
    return EvalResult(
        map50_95=scores.map50_95,
        map50=scores.map50,
        per_class=per_class,
        images=len(sizes),
        seconds=seconds,
        boxes=sum(n_gt.values()),
        skipped=skipped,
    )


def _class_name(cls: int, dataset_names: list[str], model_names: list[str]) -> str:
    if 0 <= cls < len(dataset_names):
        return dataset_names[cls]
    if 0 <= cls < len(model_names):
        return model_names[cls]
    return str(cls)


def _warn_name_mismatch(dataset: YoloDataset, model_names: list[str]) -> None:
    """Class ids are compared by number; say so loudly when the two name lists disagree."""
    used = sorted({b.class_id for boxes in dataset.ground_truth for b in boxes})
    differ = [
        (c, dataset.names[c], model_names[c])
        for c in used
        if c < len(dataset.names) and c < len(model_names) and dataset.names[c] != str(c) and dataset.names[c] != model_names[c]
    ]
    if differ:
        c, ours, theirs = differ[0]
        log.warning(
            "%s: class %d is %r in the dataset but %r in the model (%d class(es) differ); classes are matched by id",
            dataset.root,
            c,
            ours,
            theirs,
            len(differ),
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_result(result: EvalResult) -> str:
    """A plain-text table: the overall line, one line per class with ground truth, then the n/a classes."""
    rows = [("all", str(result.boxes), _fmt(result.map50_95), _fmt(result.map50))]
    rows += [(c.name, str(c.n_gt), _fmt(c.ap50_95), _fmt(c.ap50)) for c in result.per_class if c.n_gt]
    absent = [c.name for c in result.per_class if not c.n_gt]
    head = ("class", "boxes", "mAP50-95", "mAP50")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: tuple[str, str, str, str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 4)])

    rate = result.images / result.seconds if result.seconds > 0 else 0.0
    out = [line(head), *(line(r) for r in rows)]
    if absent:
        shown = ", ".join(absent[:8]) + (f", ... ({len(absent)} classes)" if len(absent) > 8 else "")
        out.append(f"n/a (no ground truth, left out of the mean): {shown}")
    out.append(f"{result.images} images, {result.boxes} boxes, {result.seconds:.1f} s ({rate:.1f} images/s)")
    if result.skipped:
        more = " ..." if len(result.skipped) > 1 else ""
        out.append(f"{len(result.skipped)} image(s) skipped (unreadable): {result.skipped[0]}{more}")
    return "\n".join(out)

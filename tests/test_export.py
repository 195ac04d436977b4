"""Exports, each loaded back with an independent reader: pycocotools (COCO), Datumaro (Pascal VOC, CVAT for
images 1.1, YOLO), the Label Studio SDK (and the documented task format as a JSON Schema).

The dataset is built through the real dataset sink from the shared images (folder images referenced in
place, camera frames stored as copies), then reviewed: one frame accepted, one corrected (a box
re-classed, one moved, one drawn), one rejected, one sent back to review, two left auto_accepted (one
without any box, one with a box touching the frame's edge).  Every reader must give back the boxes the
index holds for the exported states, in pixels, within the format's precision.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import pytest
import yaml
from pycocotools.coco import COCO

from edgelabel.edge.config import CaptureConfig, CaptureSection, DatasetConfig
from edgelabel.edge.export import DEFAULT_STATES, EXPORT_FORMATS, MANIFEST, ExportError, collect, export_dataset, parse_states
from edgelabel.edge.frame import Frame
from edgelabel.edge.review import ReviewStore
from edgelabel.edge.sinks.dataset import DatasetIndex, DatasetSink
from tests.conftest import ASSETS
from tests.helpers import NAMES, label_record, run_edgelabel

DEVICE = "export-dev"


def _frame(name: str, index: int, camera: bool) -> Frame:
    path = ASSETS / "images" / name
    image = cv2.imread(str(path))
    assert image is not None, path
    if camera:  # a camera frame: no file behind it, the dataset stores a copy
        return Frame("cam", index, image, 1_800_000_000.0 + index, f"rtsp://10.0.0.9/s@{index}", live=True)
    return Frame("shots", index, image, 1_800_000_000.0 + index, str(path), path=str(path))


@dataclass
class Dataset:
    root: Path
    ids: dict[str, str]  # role -> record id
    expected: dict[str, dict[str, Any]]  # record id -> the index's view (state, width, height, detections)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    if not (ASSETS / "images" / "bus.jpg").is_file():
        pytest.fail(f"asset mirror not found at {ASSETS} (set EDGELABEL_MIRROR to the shared folder)")
    root = tmp_path_factory.mktemp("export") / "ds"
    capture = CaptureSection(storage=CaptureConfig(review="all"), live=CaptureConfig(review="none"))
    sink = DatasetSink(DatasetConfig(path=str(root), capture=capture, min_free_bytes=0), root, NAMES, "yolo11n_int8")
    sink.open()
    plan = {
        "accepted": _frame("bus.jpg", 0, camera=False),
        "corrected": _frame("zidane.jpg", 1, camera=False),
        "rejected": _frame("street.jpg", 2, camera=True),
        "review": _frame("highway.jpg", 3, camera=True),
        "edge": _frame("dog.jpg", 4, camera=True),
        "empty": _frame("classroom.jpg", 5, camera=True),
    }
    dets: dict[str, list[tuple[int, float, tuple[float, float, float, float]]]] = {
        "accepted": [(0, 0.91, (50.4, 400.2, 250.7, 900.9)), (5, 0.88, (10.0, 230.0, 800.0, 750.0)),
                     (0, 0.41, (670.0, 380.0, 810.0, 880.0))],
        "corrected": [(0, 0.85, (100.0, 50.0, 600.0, 720.0)), (0, 0.62, (700.0, 40.0, 1150.0, 715.5))],
        "rejected": [(2, 0.7, (10.0, 10.0, 100.0, 80.0))],
        "review": [(2, 0.33, (200.0, 300.0, 400.0, 420.0))],
        "edge": [(1, 0.77, (0.0, 0.0, float(plan["edge"].width), plan["edge"].height / 2))],
        "empty": [],
    }
    ids = {}
    for role, frame in plan.items():
        rec = label_record(frame, dets[role], DEVICE)
        sink.prepare(rec, frame)
        sink.write(rec, frame)
        ids[role] = rec.id
    store = ReviewStore(sink.index)
    store.decide(ids["accepted"], "accept", by="alice")
    item = store.item(ids["corrected"])
    d0, d1 = item["detections"]
    store.decide(ids["corrected"], "update", by="bob", detections=[
        {**d0, "class_id": 1},  # re-classed
        {**d1, "box": [690.25, 35.5, 1140.75, 700.0]},  # moved and resized
        {"class_id": 7, "box": [1000.3, 600.6, 1279.9, 719.4]},  # drawn by a person
    ])
    store.decide(ids["rejected"], "reject", by="carol")
    store.decide(ids["review"], "reopen", by="carol")
    sink.close()
    index = DatasetIndex(root, repair=False)
    index.open()
    expected = {}
    for rid in ids.values():
        row = index.row(rid)
        expected[rid] = {"state": row["state"], "width": row["width"], "height": row["height"],
                         "detections": json.loads(row["detections"]),
                         "model_detections": json.loads(row["model_detections"])}
    index.close()
    assert [expected[ids[r]]["state"] for r in plan] == ["accepted", "corrected", "rejected", "needs_review",
                                                          "auto_accepted", "auto_accepted"]
    yield Dataset(root, ids, expected)


def names_to_ids(ds: Dataset, states: tuple[str, ...] = DEFAULT_STATES) -> dict[str, str]:
    """Export image stem -> record id (the export names images <source>_<label stem>)."""
    index = DatasetIndex(ds.root, repair=False)
    index.open()
    try:
        items, _ = collect(index, states)
    finally:
        index.close()
    return {it.stem: it.record_id for it in items}


def exported(ds: Dataset, states: tuple[str, ...] = DEFAULT_STATES) -> dict[str, dict[str, Any]]:
    return {rid: e for rid, e in ds.expected.items() if e["state"] in states}


def by_label(dets: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    return sorted((d["label"], [float(v) for v in d["box"]]) for d in dets)


def assert_boxes(got: list[tuple[str, list[float]]], want: list[dict[str, Any]], tol: float) -> None:
    want_sorted = by_label(want)
    got_sorted = sorted(got)
    assert [g[0] for g in got_sorted] == [w[0] for w in want_sorted]
    for (_, g), (_, w) in zip(got_sorted, want_sorted, strict=True):
        assert g == pytest.approx(w, abs=tol), (g, w)


def export(ds: Dataset, fmt: str, tmp_path: Path, *, as_zip: bool = False, **kw: Any) -> Path:
    out = tmp_path / (f"{fmt}.zip" if as_zip else fmt)
    result = export_dataset(ds.root, fmt, out, **kw)
    states = tuple(kw.get("states", DEFAULT_STATES))
    assert result.images == len(exported(ds, states)) and not result.missing
    assert result.annotations == sum(len(e["detections"]) for e in exported(ds, states).values())
    if not as_zip:
        return out
    folder = tmp_path / f"{fmt}-unzipped"
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        z.extractall(folder)
    return folder


def datumaro() -> Any:
    return pytest.importorskip("datumaro", reason="Datumaro is not installed (pip install datumaro; see the test extra)")


def assert_loaded_like_dataset(dm: Any, loaded: Any, ds: Dataset, tol: Callable[[dict[str, Any]], float]) -> tuple[
        dict[str, tuple[Any, list[tuple[str, list[float]]]]], dict[str, str], dict[str, dict[str, Any]]]:
    """Datumaro read back every exported frame with its class list, size and boxes (``tol(frame)`` pixels).

    Returns (items by stem, stem -> record id, exported frames by record id) for format-specific checks.
    """
    assert [c.name for c in loaded.categories()[dm.AnnotationType.label]] == NAMES
    stems = names_to_ids(ds)
    want = exported(ds)
    items = datumaro_boxes(loaded)
    assert {stems[k] for k in items} == set(want)
    for stem, (item, boxes) in items.items():
        e = want[stems[stem]]
        assert item.media.size == (e["height"], e["width"])
        assert_boxes(boxes, e["detections"], tol=tol(e))
    return items, stems, want


def datumaro_boxes(ds_obj: Any) -> dict[str, tuple[Any, list[tuple[str, list[float]]]]]:
    from datumaro.components.annotation import AnnotationType

    cats = ds_obj.categories()[AnnotationType.label]
    out = {}
    for item in ds_obj:
        boxes = []
        for a in item.annotations:
            if a.type == AnnotationType.bbox:
                x, y, w, h = a.get_bbox()
                boxes.append((cats[a.label].name, [x, y, x + w, y + h]))
        out[Path(item.id).name] = (item, boxes)
    return out


# --------------------------------------------------------------------------- COCO: pycocotools


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_coco_export_loads_in_pycocotools(dataset: Dataset, tmp_path: Path, as_zip: bool) -> None:
    out = export(dataset, "coco", tmp_path, as_zip=as_zip)
    coco = COCO(str(out / "annotations" / "instances_default.json"))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(i + 1, n) for i, n in enumerate(NAMES)]
    want = exported(dataset)
    assert {img["edgelabel_record_id"] for img in coco.dataset["images"]} == set(want)
    for img in coco.dataset["images"]:
        e = want[img["edgelabel_record_id"]]
        assert (img["width"], img["height"], img["edgelabel_review_state"]) == (e["width"], e["height"], e["state"])
        pixels = cv2.imread(str(out / "images" / "default" / img["file_name"]))
        assert pixels is not None and pixels.shape[:2] == (e["height"], e["width"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        got = [(NAMES[a["category_id"] - 1], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                              a["bbox"][1] + a["bbox"][3]]) for a in anns]
        assert_boxes(got, e["detections"], tol=0.011)
        for a in anns:
            assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=1e-3) and a["iscrowd"] == 0
    # the detector's boxes keep their score (usable as a results file), a drawn box has none
    scored = [a for a in coco.dataset["annotations"] if "score" in a]
    assert len(scored) == len(coco.dataset["annotations"]) - 1
    res = coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in scored])
    assert len(res.getAnnIds()) == len(scored)


# --------------------------------------------------------------------------- Datumaro: VOC, CVAT, YOLO


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_voc_export_loads_in_datumaro(dataset: Dataset, tmp_path: Path, as_zip: bool) -> None:
    dm = datumaro()
    out = export(dataset, "voc", tmp_path, as_zip=as_zip)
    loaded = dm.Dataset.import_from(str(out), "voc", coordinate_mode="voc-one-based")
    # 1-based inclusive integer pixels: floor(x1) + 1 .. ceil(x2), read back as floor(x1) .. ceil(x2)
    items, stems, want = assert_loaded_like_dataset(dm, loaded, dataset, tol=lambda e: 1.0)
    for stem, (_item, boxes) in items.items():
        e = want[stems[stem]]
        for _, (x1, y1, x2, y2) in boxes:
            assert all(float(v).is_integer() for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= e["width"] and 0 <= y1 < y2 <= e["height"]
    # the raw XML follows the VOC devkit: 1-based, clipped to [1, W] x [1, H]
    edge_stem = next(k for k, v in stems.items() if v == dataset.ids["edge"])
    xml = (out / "Annotations" / f"{edge_stem}.xml").read_text()
    e = dataset.expected[dataset.ids["edge"]]
    assert "<xmin>1</xmin>" in xml and f"<xmax>{e['width']}</xmax>" in xml and "<truncated>1</truncated>" in xml


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_cvat_export_loads_in_datumaro(dataset: Dataset, tmp_path: Path, as_zip: bool) -> None:
    dm = datumaro()
    out = export(dataset, "cvat", tmp_path, as_zip=as_zip)
    loaded = dm.Dataset.import_from(str(out), "cvat")
    _, _, want = assert_loaded_like_dataset(dm, loaded, dataset, tol=lambda e: 0.006)
    text = (out / "annotations.xml").read_text()
    # a person's boxes (the re-classed, the moved, the drawn one) are manual; the detector's auto
    assert "<version>1.1</version>" in text and text.count('source="manual"') == 3
    assert text.count("<box ") == sum(len(e["detections"]) for e in want.values())


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_yolo_export_loads_in_datumaro(dataset: Dataset, tmp_path: Path, as_zip: bool) -> None:
    dm = datumaro()
    out = export(dataset, "yolo", tmp_path, as_zip=as_zip)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {"train": "images/train", "val": "images/train", "names": dict(enumerate(NAMES))}
    assert (out / "classes.txt").read_text().splitlines() == NAMES
    loaded = dm.Dataset.import_from(str(out), "yolo")
    items, _, _ = assert_loaded_like_dataset(dm, loaded, dataset, tol=lambda e: 1e-6 * max(e["width"], e["height"]) * 2)
    for stem in items:
        assert (out / "images" / "train" / f"{stem}.jpg").is_file()


def test_yolo_val_split_is_stable(dataset: Dataset, tmp_path: Path) -> None:
    dm = datumaro()
    a = export(dataset, "yolo", tmp_path / "a", val_fraction=0.5)
    b = export(dataset, "yolo", tmp_path / "b", val_fraction=0.5)
    listing = sorted(str(p.relative_to(a)) for p in a.rglob("*.txt"))
    assert listing == sorted(str(p.relative_to(b)) for p in b.rglob("*.txt"))
    data = yaml.safe_load((a / "data.yaml").read_text())
    subsets = {p.parent.name for p in (a / "labels").rglob("*.txt")}
    assert data["val"] == ("images/val" if "val" in subsets else data["train"])
    loaded = dm.Dataset.import_from(str(a), "yolo")
    assert set(loaded.subsets()) == subsets and len(loaded) == len(exported(dataset))


def test_the_dataset_folder_itself_is_an_ultralytics_dataset(tmp_path: Path) -> None:
    """With every frame stored (cameras, videos, or save_images: always) the dataset folder is what Ultralytics
    trains from: data.yaml + images/<source>/ + labels/<source>/; a rejected frame is out of both."""
    dm = datumaro()
    root = tmp_path / "ds"
    sink = DatasetSink(DatasetConfig(path=str(root), save_images="always", min_free_bytes=0), root, NAMES, "m")
    sink.open()
    recs = []
    for i, name in enumerate(("bus.jpg", "zidane.jpg", "dog.jpg")):
        frame = _frame(name, i, camera=False)
        rec = label_record(frame, [(i, 0.8, (10.0, 20.0, 300.0, 400.0))], DEVICE)
        sink.prepare(rec, frame)
        sink.write(rec, frame)
        recs.append(rec)
    ReviewStore(sink.index).decide(recs[1].id, "reject")
    sink.close()
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["train"] == data["val"] == "images" and data["names"] == dict(enumerate(NAMES))
    loaded = dm.Dataset.import_from(str(root), "yolo")
    items = datumaro_boxes(loaded)
    assert sorted(items) == sorted(Path(r.frame_path).stem for r in (recs[0], recs[2]))
    for rec in (recs[0], recs[2]):
        item, boxes = items[Path(rec.frame_path).stem]
        assert item.media.size == (rec.height, rec.width)
        assert_boxes(boxes, [{"label": rec.detections[0].label, "box": rec.detections[0].box}], tol=0.01)


# --------------------------------------------------------------------------- Label Studio


#: Label Studio's documented import format for tasks with pre-annotations (https://labelstud.io/guide/predictions,
#: https://labelstud.io/guide/task_format), for the rectangle results this export writes
LS_RESULT = {
    "type": "object",
    "required": ["id", "type", "from_name", "to_name", "original_width", "original_height", "value"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "type": {"const": "rectanglelabels"},
        "from_name": {"const": "label"},
        "to_name": {"const": "image"},
        "original_width": {"type": "integer", "minimum": 1},
        "original_height": {"type": "integer", "minimum": 1},
        "image_rotation": {"type": "number"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "value": {
            "type": "object",
            "required": ["x", "y", "width", "height", "rectanglelabels"],
            "properties": {
                "x": {"type": "number", "minimum": 0, "maximum": 100},
                "y": {"type": "number", "minimum": 0, "maximum": 100},
                "width": {"type": "number", "minimum": 0, "maximum": 100},
                "height": {"type": "number", "minimum": 0, "maximum": 100},
                "rotation": {"type": "number"},
                "rectanglelabels": {"type": "array", "items": {"enum": NAMES}, "minItems": 1, "maxItems": 1},
            },
        },
    },
}
LS_TASKS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data", "predictions"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}},
            "predictions": {"type": "array", "items": {
                "type": "object", "required": ["model_version", "result"],
                "properties": {"model_version": {"type": "string"}, "score": {"type": "number"},
                               "result": {"type": "array", "items": LS_RESULT}}}},
            "annotations": {"type": "array", "items": {
                "type": "object", "required": ["result"], "properties": {"result": {"type": "array", "items": LS_RESULT}}}},
        },
    },
}


def ls_pixels(result: dict[str, Any]) -> tuple[str, list[float]]:
    v = result["value"]
    w, h = result["original_width"], result["original_height"]
    return v["rectanglelabels"][0], [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100,
                                     (v["y"] + v["height"]) * h / 100]


def check_ls_tasks(ds: Dataset, out: Path, prefix: str) -> list[dict[str, Any]]:
    tasks = json.loads((out / "tasks.json").read_text())
    jsonschema.validate(tasks, LS_TASKS)
    want = exported(ds)
    assert {t["data"]["edgelabel_record_id"] for t in tasks} == set(want)
    for t in tasks:
        e = want[t["data"]["edgelabel_record_id"]]
        assert t["data"]["image"].startswith(prefix)
        assert (out / t["data"]["image"][len(prefix):]).is_file()
        (pred,) = t["predictions"]
        assert pred["model_version"] == "yolo11n_int8"
        assert_boxes([ls_pixels(r) for r in pred["result"]], e["model_detections"], tol=0.01)
        for r in pred["result"]:
            assert (r["original_width"], r["original_height"]) == (e["width"], e["height"])
        scores = [d["score"] for d in e["model_detections"]]
        assert pred.get("score") == (min(scores) if scores else None)
        if e["state"] in ("accepted", "corrected"):
            (ann,) = t["annotations"]
            assert_boxes([ls_pixels(r) for r in ann["result"]], e["detections"], tol=0.01)
            assert all("score" not in r for r in ann["result"])
        else:
            assert "annotations" not in t
    return tasks


def test_labelstudio_export_matches_the_documented_format(dataset: Dataset, tmp_path: Path) -> None:
    out = export(dataset, "labelstudio", tmp_path)
    check_ls_tasks(dataset, out, "/data/local-files/?d=labelstudio/")
    config = (out / "label_config.xml").read_text()
    assert '<Image name="image" value="$image"' in config and '<RectangleLabels name="label" toName="image">' in config
    for n in NAMES:
        assert f'value="{n}"' in config


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_labelstudio_export_validates_with_the_sdk(dataset: Dataset, tmp_path: Path, as_zip: bool) -> None:
    sdk = pytest.importorskip("label_studio_sdk.label_interface",
                              reason="the Label Studio SDK is not installed (pip install label-studio-sdk; it is not in the test extra)")
    types = pytest.importorskip("label_studio_sdk.types", reason="the Label Studio SDK is not installed")
    out = export(dataset, "labelstudio", tmp_path, as_zip=as_zip, image_prefix="/data/local-files/?d=exports/")
    tasks = check_ls_tasks(dataset, out, "/data/local-files/?d=exports/")
    li = sdk.LabelInterface((out / "label_config.xml").read_text())
    assert sorted(li.get_control("label").labels) == sorted(NAMES)
    for n, task in enumerate(tasks, start=1):
        for pred in task["predictions"]:
            assert li.validate_prediction(pred, return_errors=True) == [], pred
            types.PredictionRequest.model_validate({**pred, "task": n})  # what POST /api/predictions takes
        for ann in task.get("annotations", []):
            assert li.validate_annotation(ann) is True, ann
        # the import API's task model wants each prediction's task id, which Label Studio assigns on import
        types.ImportApiRequest.model_validate({**task, "predictions": [{**p, "task": n} for p in task["predictions"]]})
    # a wrong label is caught by the same checks, so they are not vacuous
    bad = json.loads(json.dumps(tasks[0]["predictions"][0]))
    bad["result"][0]["value"]["rectanglelabels"] = ["unicorn"]
    assert li.validate_prediction(bad, return_errors=True)


# --------------------------------------------------------------------------- choices, errors, the CLI


def test_states_choose_what_is_exported(dataset: Dataset, tmp_path: Path) -> None:
    assert parse_states(None) == DEFAULT_STATES == ("accepted", "corrected", "auto_accepted")
    assert parse_states("rejected, needs_review") == ("rejected", "needs_review")
    with pytest.raises(ExportError, match="unknown review state 'done'"):
        parse_states("accepted,done")
    out = export(dataset, "coco", tmp_path, states=("rejected", "needs_review"))
    coco = json.loads((out / "annotations" / "instances_default.json").read_text())
    assert {img["edgelabel_record_id"] for img in coco["images"]} == {dataset.ids["rejected"], dataset.ids["review"]}
    for img in coco["images"]:  # a rejected frame's image comes from rejected/
        assert (out / "images" / "default" / img["file_name"]).stat().st_size > 1000
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["states"] == ["rejected", "needs_review"] and manifest["images"] == 2 and manifest["classes"] == NAMES


def test_existing_outputs_and_missing_images(dataset: Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists"):
        export_dataset(dataset.root, "voc", out)
    export_dataset(dataset.root, "voc", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "labelmap.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    with pytest.raises(ExportError, match="unknown export format"):
        export_dataset(dataset.root, "tfrecord", tmp_path / "x")
    with pytest.raises(ExportError, match="no dataset here"):
        export_dataset(tmp_path / "nothing", "coco", tmp_path / "y")
    # an image that vanished is skipped with a warning, the rest is exported
    copy = tmp_path / "copy"
    shutil.copytree(dataset.root, copy)
    index = DatasetIndex(copy, repair=False)
    index.open()
    row = index.row(dataset.ids["edge"])
    index.close()
    (copy / row["image_path"]).unlink()
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.export")
    result = export_dataset(copy, "cvat", tmp_path / "cvat.zip")
    assert result.missing == [dataset.ids["edge"]] and result.images == len(exported(dataset)) - 1
    assert any(dataset.ids["edge"] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_zips_cleanly(dataset: Dataset, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"{fmt}.zip"
    export_dataset(dataset.root, fmt, out)
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        assert MANIFEST in names and len(names) == len(set(names))
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
        assert json.loads(z.read(MANIFEST))["format"] == fmt
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no partial file left beside it


def test_cli_export(dataset: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "train.zip"
    res = run_edgelabel("export", "--dataset", str(dataset.root), "--format", "yolo", "--state", "accepted,corrected",
                        str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"exported 2 image(s), 6 box(es) as yolo (accepted, corrected) to {out}"
    with zipfile.ZipFile(out) as z:
        assert sum(1 for n in z.namelist() if n.startswith("labels/train/")) == 2
    # a config file names the dataset
    cfg = tmp_path / "edgelabel.yaml"
    cfg.write_text(json.dumps({"model": {"path": "m.onnx"}, "sources": {"a": {"uri": "/tmp/in/"}},
                               "dataset": {"path": str(dataset.root)}}))
    res = run_edgelabel("export", "-c", str(cfg), "--format", "coco", str(tmp_path / "coco"))
    assert res.returncode == 0 and "exported 4 image(s)" in res.stdout, res.stderr
    for args, needle in (
        (["--format", "coco", "--state", "done", str(tmp_path / "a")], "unknown review state 'done'"),
        (["--format", "coco", str(out)], "exists"),
    ):
        res = run_edgelabel("export", "--dataset", str(dataset.root), *args)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = run_edgelabel("export", "--dataset", str(tmp_path / "none"), "--format", "voc", str(tmp_path / "v"))
    assert res.returncode == 2 and "no dataset here" in res.stderr


def test_cli_export_errors_say_where_and_what_next(dataset: Dataset, tmp_path: Path) -> None:
    """Without --dataset or -c the export looks in ./dataset: the error names that folder and both ways to
    point elsewhere; an existing OUT names --overwrite (which then works)."""
    res = run_edgelabel("export", "--format", "yolo", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2
    assert str(tmp_path / "dataset") in res.stderr and "no dataset here" in res.stderr
    assert "--dataset DIR" in res.stderr and "-c CONFIG" in res.stderr
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    res = run_edgelabel("export", "--dataset", str(dataset.root), "--format", "yolo", str(out))
    assert res.returncode == 2 and str(out) in res.stderr and "--overwrite" in res.stderr, res.stderr
    res = run_edgelabel("export", "--dataset", str(dataset.root), "--format", "yolo", "--overwrite", str(out))
    assert res.returncode == 0 and not (out / "mine.txt").exists(), res.stderr
    assert math.isclose(len(exported(dataset)), 4)

"""``edgelabel label``: the output folder is a training set as it is (Ultralytics, ``edgelabel eval``, Datumaro),
labeling again follows the model, the dataset is locked, and the default review sends the uncertain frames to
a person.  Real models and the shared images throughout."""

from __future__ import annotations

import glob
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ASSETS
from tests.helpers import edgelabel, run_edgelabel
from tests.test_export import assert_boxes, datumaro, datumaro_boxes

FAST = ASSETS / "models" / "yolox_nano.onnx"
OTHER = ASSETS / "models" / "yolo11n_int8.onnx"
#: what Ultralytics (ultralytics/data/utils.py IMG_FORMATS) takes as an image when it scans a train folder
ULTRALYTICS_IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"}


def ultralytics_label_path(image: str) -> str:
    """ultralytics.data.utils.img2label_paths: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def ultralytics_images(data_yaml: Path, split: str) -> list[str]:
    """The images Ultralytics trains on for ``split``: ``path`` + the split's folder, scanned recursively."""
    data = yaml.safe_load(data_yaml.read_text())
    root = Path(data.get("path") or data_yaml.parent)
    assert root.is_absolute(), "a relative path is taken from Ultralytics' datasets folder, not from data.yaml"
    folder = root / data[split]
    assert folder.is_dir(), f"{split}: {folder} does not exist"
    files = glob.glob(str(folder / "**" / "*.*"), recursive=True)
    return sorted(f for f in files if f.rsplit(".", 1)[-1].lower() in ULTRALYTICS_IMG_FORMATS)


def coco_boxes(out: Path) -> dict[str, list[dict[str, object]]]:
    """The dataset's own COCO file: image file stem -> its boxes as {label, box xyxy}."""
    coco = json.loads((out / "annotations.coco.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes: dict[str, list[dict[str, object]]] = {Path(i["file_name"]).stem: [] for i in coco["images"]}
    by_id = {i["id"]: Path(i["file_name"]).stem for i in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[by_id[a["image_id"]]].append({"label": names[a["category_id"]], "box": [x, y, x + w, y + h]})
    return boxes


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared images (a folder called ``images``) labeled by YOLO11n (int8) with the defaults."""
    if not FAST.is_file():
        pytest.fail(f"asset mirror not found at {ASSETS} (set EDGELABEL_MIRROR to the shared folder)")
    out = tmp_path_factory.mktemp("label") / "out"
    res = run_edgelabel("label", str(ASSETS / "images"), "--model", str(OTHER), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "labeled 6 frame(s)" in res.stdout, res.stdout
    (out.parent / "summary.txt").write_text(res.stdout)
    return out


def test_label_output_is_an_ultralytics_dataset(labeled: Path) -> None:
    data = yaml.safe_load((labeled / "data.yaml").read_text())
    assert Path(data["path"]) == labeled.resolve()
    assert isinstance(data["names"], dict) and data["names"][0] == "person" and len(data["names"]) == 80
    want = coco_boxes(labeled)
    for split in ("train", "val"):
        images = ultralytics_images(labeled / "data.yaml", split)
        assert len(images) == 6
        for image in images:
            label = Path(ultralytics_label_path(image))
            assert label.is_file(), f"{image}: Ultralytics looks for its label at {label}, which does not exist"
            lines = [ln for ln in label.read_text().splitlines() if ln.strip()]
            assert len(lines) == len(want[Path(image).stem])


def test_label_output_is_accepted_by_eval(labeled: Path) -> None:
    res = run_edgelabel("eval", "--data", str(labeled / "data.yaml"), "--model", str(OTHER))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "6 images" in res.stdout
    overall = next(ln for ln in res.stdout.splitlines() if ln.startswith("all"))
    assert float(overall.split()[2]) > 0.9  # the model against its own labels


def test_label_output_reads_back_in_datumaro(labeled: Path) -> None:
    dm = datumaro()
    loaded = dm.Dataset.import_from(str(labeled), "yolo")
    items = datumaro_boxes(loaded)
    want = coco_boxes(labeled)
    assert sorted(items) == sorted(want)
    for stem, (_item, boxes) in items.items():
        assert_boxes(boxes, want[stem], tol=0.01 * 1330)


def test_stored_copies_are_the_original_bytes(labeled: Path) -> None:
    with sqlite3.connect(labeled / "index.sqlite") as db:
        paths = [r[0] for r in db.execute("SELECT image_path FROM records")]
    assert len(paths) == 6 and all(p.startswith("images/images_src/") for p in paths)
    for p in paths:
        original = ASSETS / "images" / (Path(p).stem.rsplit("_", 1)[0] + Path(p).suffix)
        assert (labeled / p).read_bytes() == original.read_bytes()


def test_defaults_send_near_threshold_frames_to_review(labeled: Path) -> None:
    """With the default storage policy every frame is kept; those with a detection scored in [0.25, 0.5) are
    needs_review (the others auto_accepted), and the summary counts them."""
    with sqlite3.connect(labeled / "index.sqlite") as db:
        rows = db.execute("SELECT image_path, state, detections FROM records").fetchall()
    assert len(rows) == 6
    near = {p for p, _s, dets in rows if any(0.25 <= d["score"] < 0.5 for d in json.loads(dets))}
    sure = {p for p, _s, _d in rows} - near
    assert near and sure, "the shared images give both kinds of frame with YOLO11n at conf 0.25"
    assert {p for p, state, _d in rows if state == "needs_review"} == near
    assert {p for p, state, _d in rows if state == "auto_accepted"} == sure
    summary = (labeled.parent / "summary.txt").read_text()
    assert f"review: {len(near)} frame(s) of this run need a person's look" in summary, summary
    assert "[0.25, 0.5)" in summary and "--state needs_review" in summary


def label(inp: Path, out: Path, model: Path, *extra: str) -> str:
    res = run_edgelabel("label", str(inp), "--model", str(model), "--out", str(out), *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def index_boxes(out: Path) -> dict[str, list[tuple[int, float, list[float]]]]:
    """record id -> its boxes (class, score, xyxy), from the index."""
    with sqlite3.connect(out / "index.sqlite") as db:
        rows = db.execute("SELECT id, detections FROM records").fetchall()
    return {rid: sorted((d["class_id"], d["score"], d["box"]) for d in json.loads(dets)) for rid, dets in rows}


def test_labeling_again_with_another_model_labels_again(tmp_path: Path) -> None:
    """The second model's run labels every frame again, and the dataset names only the model that made its
    boxes; the same model with the same thresholds skips the frames and says so, naming --fresh."""
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("bus.jpg", "zidane.jpg", "dog.jpg"):
        (inp / name).write_bytes((ASSETS / "images" / name).read_bytes())
    out, reference = tmp_path / "out", tmp_path / "reference"
    label(inp, out, FAST)
    first = index_boxes(out)

    again = label(inp, out, FAST)
    assert "labeled 0 frame(s)" in again and "skipped 3 frame(s)" in again and "--fresh" in again

    text = label(inp, out, OTHER)
    assert "labeled 3 frame(s)" in text, text
    assert "labeled again" in text  # the log says why
    label(inp, reference, OTHER)  # what the second model alone writes
    second = index_boxes(out)
    assert second == index_boxes(reference) and second != first
    coco = json.loads((out / "annotations.coco.json").read_text())
    assert coco["info"]["edgelabel_model"] == "yolo11n_int8" and "yolox_nano" not in coco["info"]["description"]
    assert {img["edgelabel_model"] for img in coco["images"]} == {"yolo11n_int8"}
    header = (out / "data.yaml").read_text().splitlines()[0]
    assert "yolo11n_int8" in header and "yolox_nano" not in header

    # another threshold is another job too
    text = label(inp, out, OTHER, "--conf", "0.5")
    assert "labeled 3 frame(s)" in text
    assert all(d[1] >= 0.5 for boxes in index_boxes(out).values() for d in boxes)


# --------------------------------------------------------------------------- one writer per dataset


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_second_writer_of_a_dataset_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    dataset = tmp_path / "shared-dataset"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(FAST), "family": "yolox"},
        "sources": {"clip": {"uri": str(ASSETS / "videos" / "cars.mp4"), "loop": True}},
        "mqtt": {"enabled": False},
        "dataset": {"path": str(dataset)},
    }))
    first = edgelabel("run", "-c", str(cfg), "--state-dir", str(tmp_path / "a"), cwd=tmp_path)
    try:
        lock = dataset / "edgelabel.lock"
        assert _wait_for(lambda: lock.is_file() and lock.read_text().strip() == f"pid {first.pid}"), \
            first.stderr.read() if first.poll() is not None else "the first daemon never locked the dataset"
        second = run_edgelabel("run", "-c", str(cfg), "--state-dir", str(tmp_path / "b"), cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("edgelabel:")]
        assert len(errors) == 1 and str(dataset) in errors[0] and f"pid {first.pid}" in errors[0], second.stderr
        assert "dataset.path" in errors[0]
        assert first.poll() is None  # the holder is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 0
    # the lock went with its holder: the dataset can be written again
    res = run_edgelabel("label", str(ASSETS / "images" / "bus.jpg"), "--model", str(FAST), "--out", str(dataset))
    assert res.returncode == 0, res.stderr[-3000:]


def test_quick_start_daemons_keep_their_dataset_in_their_state_dir(tmp_path: Path) -> None:
    """Two `run --state-dir` daemons with the bundled config (which says dataset: ./dataset) at once: each writes
    the dataset in its own state dir, and nothing lands in the shared ./dataset."""
    procs = {name: edgelabel("run", "--source", str(ASSETS / "images" / "bus.jpg"), "--model", str(FAST),
                             "--mqtt", "off", "--state-dir", str(tmp_path / name), cwd=tmp_path)
             for name in ("a", "b")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    assert not (tmp_path / "dataset").exists()
    for name in procs:
        with sqlite3.connect(tmp_path / name / "dataset" / "index.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1

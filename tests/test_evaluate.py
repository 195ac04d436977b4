"""edgelabel.edge.evaluate: YOLO folder loading, COCO mAP against known answers, and a real two-model check."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgelabel.edge.evaluate import (
    ClassAP,
    DatasetError,
    EvalResult,
    NoGroundTruthError,
    YoloDataset,
    evaluate,
    format_result,
    load_yolo_dataset,
    map_against_reference,
    parse_label_file,
)
from edgelabel.engines.base import Detection
from edgelabel.engines.detector import DetectResult, load_detector
from tests.conftest import IMAGES, MODELS

W, H = 200, 100


def write_image(path: Path, width: int = W, height: int = H) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))
    return path


def write_labels(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return path


def yolo_line(cls: int, x1: float, y1: float, x2: float, y2: float, w: int = W, h: int = H) -> str:
    return f"{cls} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"


def det(cls: int, box: tuple[float, float, float, float], score: float = 0.9) -> Detection:
    return Detection(class_id=cls, label=str(cls), score=score, box=box)


class ScriptedDetector:
    """A stand-in for engines.detector.Detector: returns prepared detections per call, in order."""

    def __init__(self, per_image: list[list[Detection]], names: list[str] | None = None) -> None:
        self.per_image = list(per_image)
        self.names = names or ["a", "b", "c"]
        self.calls = 0

    def detect(self, image: np.ndarray) -> DetectResult:
        self.calls += 1
        return DetectResult(detections=self.per_image.pop(0))


def dataset(tmp_path: Path, boxes: list[list[tuple[int, tuple[float, float, float, float]]]], names: str | None = None) -> YoloDataset:
    """A folder with one image per entry of ``boxes`` (an empty entry: a negative with an empty label file)."""
    root = tmp_path / "ds"
    for i, img_boxes in enumerate(boxes):
        write_image(root / "images" / f"{i:03d}.png")
        write_labels(root / "labels" / f"{i:03d}.txt", [yolo_line(c, *b) for c, b in img_boxes])
    if names is not None:
        (root / "data.yaml").write_text(names)
    return load_yolo_dataset(root)


# --------------------------------------------------------------------------- loading


def test_layout_nested_negatives_and_names(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image(root / "images" / "cam1" / "a.jpg")
    write_image(root / "images" / "cam1" / "b.png")
    write_image(root / "images" / "c.jpg")  # no label file: a negative
    write_image(root / "images" / ".hidden.jpg")  # dot files are ignored, as in the folder source
    (root / "images" / "notes.txt").write_text("not an image")
    write_labels(root / "labels" / "cam1" / "a.txt", [yolo_line(1, 10, 10, 50, 50), "", yolo_line(0, 0, 0, 200, 100)])
    write_labels(root / "labels" / "cam1" / "b.txt", [])  # empty: a negative
    (root / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames:\n  0: person\n  1: helmet\n")
    ds = load_yolo_dataset(root)
    assert [p.relative_to(root / "images").as_posix() for p in ds.images] == ["c.jpg", "cam1/a.jpg", "cam1/b.png"]
    assert [len(g) for g in ds.ground_truth] == [0, 2, 0]
    assert ds.names == ["person", "helmet"]
    assert ds.unlabeled == 1 and ds.boxes == 2
    box = ds.ground_truth[1][0]
    assert box.class_id == 1
    assert box.to_xyxy(W, H) == pytest.approx((10, 10, 50, 50))
    # the data.yaml file itself is accepted as the root
    assert load_yolo_dataset(root / "data.yaml").images == ds.images


def test_names_from_list_and_classes_txt(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image(root / "images" / "a.jpg")
    write_labels(root / "labels" / "a.txt", [yolo_line(2, 1, 1, 9, 9)])
    (root / "classes.txt").write_text("x\ny\nz\n")
    assert load_yolo_dataset(root).names == ["x", "y", "z"]
    (root / "data.yaml").write_text("names: [cat, dog, cow]\n")
    assert load_yolo_dataset(root).names == ["cat", "dog", "cow"]


def test_no_names_file_leaves_names_empty(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image(root / "images" / "a.jpg")
    write_labels(root / "labels" / "a.txt", [yolo_line(4, 1, 1, 9, 9)])
    assert load_yolo_dataset(root).names == []


def test_ultralytics_and_roboflow_split_layouts(tmp_path: Path) -> None:
    ul = tmp_path / "ul"
    write_image(ul / "images" / "train" / "t.jpg")
    write_image(ul / "images" / "val" / "v.jpg")
    write_labels(ul / "labels" / "train" / "t.txt", [yolo_line(0, 1, 1, 9, 9)])
    write_labels(ul / "labels" / "val" / "v.txt", [yolo_line(0, 1, 1, 9, 9), yolo_line(0, 20, 20, 40, 40)])
    val = load_yolo_dataset(ul, split="val")
    assert [p.name for p in val.images] == ["v.jpg"] and val.boxes == 2
    assert len(load_yolo_dataset(ul).images) == 2  # no split: everything under images/
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits found: train, val"):
        load_yolo_dataset(ul, split="test")
    rf = tmp_path / "rf"
    write_image(rf / "valid" / "images" / "v.jpg")
    write_labels(rf / "valid" / "labels" / "v.txt", [yolo_line(0, 1, 1, 9, 9)])
    assert load_yolo_dataset(rf, split="valid").boxes == 1


def test_polygon_and_confidence_columns(tmp_path: Path) -> None:
    path = write_labels(tmp_path / "l.txt", ["3 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6", "1 0.5 0.5 0.2 0.2 0.87"])
    poly, with_conf = parse_label_file(path)
    assert (poly.class_id, poly.cx, poly.cy, poly.w, poly.h) == pytest.approx((3, 0.3, 0.4, 0.4, 0.4))
    assert (with_conf.class_id, with_conf.w) == (1, 0.2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", r"l\.txt:2: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.2 0.2 0.3 0.1 0.4", r"l\.txt:2: expected .* got 8 field"),
        ("person 0.5 0.5 0.2 0.2", r"l\.txt:2: class id 'person' is not a number"),
        ("1.5 0.5 0.5 0.2 0.2", r"l\.txt:2: class id '1\.5' must be a whole number"),
        ("-1 0.5 0.5 0.2 0.2", r"l\.txt:2: class id '-1' must be a whole number >= 0"),
        ("0 0.5 x 0.2 0.2", r"l\.txt:2: cy 'x' is not a number"),
        ("0 0.5 0.5 nan 0.2", r"l\.txt:2: w is nan"),
        ("0 0.5 0.5 0 0.2", r"l\.txt:2: box width and height must be > 0"),
        ("0 320 240 64 48", r"l\.txt:2: box .* leaves the 0\.\.1 range .*divided by width/height"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_labels(tmp_path / "l.txt", ["0 0.5 0.5 0.2 0.2", line])
    with pytest.raises(DatasetError, match=message):
        parse_label_file(path)


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        load_yolo_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"no images/ folder"):
        load_yolo_dataset(tmp_path)
    root = tmp_path / "ds"
    write_image(root / "images" / "a.jpg")
    with pytest.raises(DatasetError, match=r"labels: missing; every image would count as having no objects"):
        load_yolo_dataset(root)
    write_labels(root / "labels" / "a.txt", [yolo_line(5, 1, 1, 9, 9)])
    (root / "data.yaml").write_text("names: [a, b]\n")
    with pytest.raises(DatasetError, match=r"a\.txt: class id 5 but the dataset names only 2 classes"):
        load_yolo_dataset(root)
    (root / "data.yaml").write_text("names: {x: a}\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: names: keys must be class ids"):
        load_yolo_dataset(root)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_yolo_dataset(empty)


# --------------------------------------------------------------------------- known answers

BOX = (50.0, 20.0, 150.0, 80.0)  # 100 x 60


def test_detections_equal_to_ground_truth_score_exactly_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = [[(0, BOX), (1, (10.0, 10.0, 40.0, 90.0))], [(0, (0.0, 0.0, 30.0, 30.0))], []]
    ds = dataset(tmp_path, gt, names="names: [a, b, c]\n")
    fake = ScriptedDetector([[det(c, b) for c, b in img] for img in gt])
    result = evaluate(fake, ds, progress=False)  # type: ignore[arg-type]
    assert (result.map50_95, result.map50) == (1.0, 1.0)
    assert result.images == 3 and result.boxes == 3 and fake.calls == 3
    assert result.per_class == [ClassAP("a", 1.0, 1.0, 2), ClassAP("b", 1.0, 1.0, 1), ClassAP("c", None, None, 0)]
    out, _ = capsys.readouterr()
    assert out == ""  # pycocotools' prints are swallowed


def test_shifted_boxes_have_the_known_ap(tmp_path: Path) -> None:
    # a 100-wide box shifted by 16 px: IoU = 84 / 116 = 0.724, a match at IoU 0.50 ... 0.70 (5 of 10 thresholds)
    ds = dataset(tmp_path, [[(0, BOX)], [(0, BOX)]])
    x1, y1, x2, y2 = BOX
    fake = ScriptedDetector([[det(0, (x1 + 16, y1, x2 + 16, y2))] for _ in range(2)])
    result = evaluate(fake, ds, progress=False)  # type: ignore[arg-type]
    assert result.map50 == 1.0
    assert result.map50_95 == pytest.approx(0.5)


def test_half_found_and_ranked_false_positives(tmp_path: Path) -> None:
    # one of two objects found: recall 0.5 -> precision 1 at 51 of COCO's 101 recall points
    ds = dataset(tmp_path, [[(0, BOX)], [(0, BOX)]])
    result = evaluate(ScriptedDetector([[det(0, BOX)], []]), ds, progress=False)  # type: ignore[arg-type]
    assert result.map50 == pytest.approx(51 / 101)
    # a false positive ranked above the only true positive: precision 1/2 at every recall point
    ds = dataset(tmp_path, [[(0, BOX)], []])
    fake = ScriptedDetector([[det(0, BOX, score=0.5)], [det(0, BOX, score=0.9)]])  # the second image is a negative
    assert evaluate(fake, ds, progress=False).map50 == pytest.approx(0.5)  # type: ignore[arg-type]
    # ranked below it, the false positive costs nothing
    ds = dataset(tmp_path, [[(0, BOX)], []])
    fake = ScriptedDetector([[det(0, BOX, score=0.9)], [det(0, BOX, score=0.5)]])
    assert evaluate(fake, ds, progress=False).map50 == 1.0  # type: ignore[arg-type]


def test_no_detection_at_all_scores_zero(tmp_path: Path) -> None:
    """The path where pycocotools' loadRes([]) would fail."""
    ds = dataset(tmp_path, [[(0, BOX)], [(1, BOX)]])
    result = evaluate(ScriptedDetector([[], []]), ds, progress=False)  # type: ignore[arg-type]
    assert (result.map50_95, result.map50) == (0.0, 0.0)
    assert [(c.ap50, c.n_gt) for c in result.per_class] == [(0.0, 1), (0.0, 1)]


def test_class_without_ground_truth_is_na_and_left_out_of_the_mean(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [[(0, BOX)]], names="names: [person, helmet, vest]\n")
    # a perfect class 0 plus a class-2 detection: class 2 has no ground truth, so it must not pull the mean down
    fake = ScriptedDetector([[det(0, BOX), det(2, (0.0, 0.0, 20.0, 20.0))]])
    result = evaluate(fake, ds, progress=False)  # type: ignore[arg-type]
    assert result.map50 == 1.0
    assert result.per_class[2] == ClassAP("vest", None, None, 0)
    table = format_result(result)
    assert "person" in table and "n/a (no ground truth, left out of the mean): helmet, vest" in table
    assert table.splitlines()[1].split() == ["all", "1", "1.000", "1.000"]


def test_class_names_fall_back_to_the_model(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [[(1, BOX)]])
    result = evaluate(ScriptedDetector([[det(1, BOX)]], names=["person", "car"]), ds, progress=False)  # type: ignore[arg-type]
    assert [c.name for c in result.per_class] == ["car"]


def test_name_mismatch_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = dataset(tmp_path, [[(0, BOX)]], names="names: [helmet]\n")
    with caplog.at_level(logging.WARNING, logger="edgelabel.edge.evaluate"):
        evaluate(ScriptedDetector([[det(0, BOX)]], names=["person"]), ds, progress=False)  # type: ignore[arg-type]
    assert "class 0 is 'helmet' in the dataset but 'person' in the model" in caplog.text


def test_dataset_without_boxes_is_refused_before_running(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [[], []])
    fake = ScriptedDetector([[], []])
    with pytest.raises(NoGroundTruthError, match="no labeled box in 2 images"):
        evaluate(fake, ds, progress=False)  # type: ignore[arg-type]
    assert fake.calls == 0


def test_unreadable_image_is_skipped_and_reported(tmp_path: Path) -> None:
    ds = dataset(tmp_path, [[(0, BOX)], [(0, BOX)]])
    ds.images[1].write_bytes(b"")  # zero-byte file
    result = evaluate(ScriptedDetector([[det(0, BOX)]]), ds, progress=False)  # type: ignore[arg-type]
    assert result.images == 1 and result.map50 == 1.0
    assert len(result.skipped) == 1 and "zero-byte file" in result.skipped[0]
    assert "1 image(s) skipped (unreadable)" in format_result(result)


def test_format_result_table() -> None:
    result = EvalResult(0.5, 0.75, [ClassAP("person", 0.5, 0.75, 12), ClassAP("dog", None, None, 0)], images=4, seconds=2.0, boxes=12)
    lines = format_result(result).splitlines()
    assert lines[0].split() == ["class", "boxes", "mAP50-95", "mAP50"]
    assert lines[1].split() == ["all", "12", "0.500", "0.750"]
    assert lines[2].split() == ["person", "12", "0.500", "0.750"]
    assert lines[3] == "n/a (no ground truth, left out of the mean): dog"
    assert lines[4] == "4 images, 12 boxes, 2.0 s (2.0 images/s)"


# --------------------------------------------------------------------------- reference as ground truth


def test_map_against_reference() -> None:
    ref = [[det(0, BOX), det(1, (0.0, 0.0, 30.0, 30.0))], [det(0, (10.0, 10.0, 60.0, 60.0))], []]
    sizes = [(W, H)] * 3
    assert map_against_reference(ref, ref, sizes) == (1.0, 1.0)
    # scores of the reference do not matter: every reference box is an object
    rescored = [[Detection(d.class_id, d.label, 0.3, d.box) for d in img] for img in ref]
    assert map_against_reference(rescored, ref, sizes) == (1.0, 1.0)
    assert map_against_reference(ref, [[], [], []], sizes) == (0.0, 0.0)
    x1, y1, x2, y2 = BOX
    shifted = [[det(0, (x1 + 16, y1, x2 + 16, y2)), ref[0][1]], ref[1], []]
    map50_95, map50 = map_against_reference(ref, shifted, sizes)
    assert map50 == 1.0 and 0.5 < map50_95 < 1.0
    with pytest.raises(NoGroundTruthError):
        map_against_reference([[], [], []], ref, sizes)
    with pytest.raises(ValueError, match="3 truth lists, 2 detection lists"):
        map_against_reference(ref, ref[:2], sizes)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mirror's photographs labeled by yolox_nano (the 'ground truth' for this check)."""
    root = tmp_path_factory.mktemp("real")
    labeler = load_detector(MODELS / "yolox_nano.onnx", engine="onnxruntime", providers=["cpu"])
    try:
        for src in sorted(IMAGES.glob("*.jpg")):
            shutil.copy(src, write_image(root / "images" / src.name))
            image = cv2.imread(str(src))
            h, w = image.shape[:2]
            lines = [yolo_line(d.class_id, *d.box, w=w, h=h) for d in labeler.detect(image).detections]
            write_labels(root / "labels" / f"{src.stem}.txt", lines)
        (root / "classes.txt").write_text("\n".join(labeler.names) + "\n")
    finally:
        labeler.close()
    return root


def test_real_models(assets: Path, real_dataset: Path) -> None:
    ds = load_yolo_dataset(real_dataset)
    assert len(ds.images) == 6 and ds.boxes > 20
    same = load_detector(MODELS / "yolox_nano.onnx", engine="onnxruntime", providers=["cpu"])
    other = load_detector(MODELS / "yolo11n_int8.onnx", engine="onnxruntime", providers=["cpu"], conf=0.001)
    try:
        self_result = evaluate(same, ds, progress=False)
        assert (self_result.map50_95, self_result.map50) == (1.0, 1.0)
        result = evaluate(other, ds, progress=False)
    finally:
        same.close()
        other.close()
    assert 0.0 < result.map50_95 < result.map50 < 1.0
    person = next(c for c in result.per_class if c.name == "person")
    assert person.n_gt > 5 and person.ap50 is not None and person.ap50 > 0.5
    assert result.images == 6 and result.seconds > 0
    assert "person" in format_result(result)


def test_eval_command(real_dataset: Path) -> None:
    """``edgelabel eval`` prints overall and per-class mAP; a bad folder is a usage error naming it."""
    from tests.helpers import run_edgelabel

    res = run_edgelabel("eval", "--data", str(real_dataset), "--model", str(MODELS / "yolox_nano.onnx"),
                        "--family", "yolox", "--conf", "0.25", "--iou", "0.45")
    assert res.returncode == 0, res.stderr
    assert "yolox_nano.onnx on" in res.stdout and "onnxruntime" in res.stdout
    assert "person" in res.stdout and "1.000" in res.stdout  # the labeler scored against its own labels
    bad = run_edgelabel("eval", "--data", str(real_dataset / "nope"), "--model", str(MODELS / "yolox_nano.onnx"))
    assert bad.returncode == 2 and "nope" in bad.stderr

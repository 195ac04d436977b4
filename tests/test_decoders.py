"""Decoders, letterbox, NMS, class names and family detection (no model run except the v5 check)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgelabel.engines.base import EngineError, TensorSpec
from edgelabel.engines.models.base import LetterboxInfo, PreprocessSpec
from edgelabel.engines.models.detect import DECODERS, UnsupportedModelError, detect_family, input_size
from edgelabel.engines.models.end2end import EndToEndDecoder
from edgelabel.engines.models.names import COCO80, load_labels_file, names_from_metadata, resolve_names
from edgelabel.engines.models.nms import batched_nms, nms
from edgelabel.engines.models.preprocess import letterbox
from edgelabel.engines.models.yolov5 import YoloV5Decoder
from edgelabel.engines.models.yolov8 import YoloV8Decoder
from edgelabel.engines.models.yolox import YoloxDecoder, grid_cells

CENTERED = PreprocessSpec(center=True, pad_value=114, rgb=True, scale=1.0 / 255.0)
TOP_LEFT = PreprocessSpec(center=False, pad_value=114, rgb=False, scale=1.0)
ULTRA_META = {"stride": "32", "names": "{0: 'person', 1: 'bicycle'}", "task": "detect", "imgsz": "[640, 640]"}


def _frame_to_input(box: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """The forward mapping the letterbox applies (inverse of ``to_frame``)."""
    out = box.astype(np.float64).copy()
    out[:, [0, 2]] = out[:, [0, 2]] * info.ratio + info.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * info.ratio + info.pad_y
    return out


def _bright_box(channel: np.ndarray, thresh: float) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(channel > thresh)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# -- letterbox ---------------------------------------------------------------


def test_letterbox_centered_layout_and_round_trip() -> None:
    frame = np.zeros((1080, 810, 3), np.uint8)
    frame[300:700, 100:500] = 255  # a white square in frame pixels
    tensor, info = letterbox(frame, (640, 640), CENTERED)
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    # 810x1080 -> 480x640, 160 px of horizontal padding split 80/80
    assert info.ratio == pytest.approx(640 / 1080)
    assert (info.pad_x, info.pad_y) == (80.0, 0.0)
    assert tensor[0, :, :, :80].max() == pytest.approx(114 / 255) and tensor[0, :, :, 560:].min() == pytest.approx(114 / 255)
    found = np.array([_bright_box(tensor[0, 0], 0.9)], np.float32)
    expected = _frame_to_input(np.array([[100, 300, 500, 700]], np.float32), info)
    assert np.abs(found - expected).max() <= 1.0
    back = info.to_frame(found)
    assert np.abs(back - np.array([[100, 300, 500, 700]])).max() <= 2.0


def test_letterbox_odd_padding_goes_bottom_right() -> None:
    frame = np.full((100, 101, 3), 255, np.uint8)
    tensor, info = letterbox(frame, (64, 64), CENTERED)
    r = 64 / 101
    new_h = round(100 * r)  # 63 -> one pad row, which must go to the bottom
    assert info.pad_y == 0.0 and new_h == 63
    assert tensor[0, 0, 63].max() == pytest.approx(114 / 255)
    assert tensor[0, 0, 0].min() == pytest.approx(1.0)


def test_letterbox_top_left_yolox_style() -> None:
    frame = np.zeros((1080, 810, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30  # B, G, R
    frame[540:1080, 405:810] = 200
    tensor, info = letterbox(frame, (416, 416), TOP_LEFT)
    # YOLOX uses int(W*r), int(H*r): 312x416, image at the top-left, padding right only
    assert (info.pad_x, info.pad_y) == (0.0, 0.0)
    assert tensor[0, :, :, 312:].min() == 114.0 and tensor[0, :, :, 312:].max() == 114.0
    # BGR kept and no scaling
    assert tensor[0, 0, 0, 0] == 10.0 and tensor[0, 1, 0, 0] == 20.0 and tensor[0, 2, 0, 0] == 30.0
    found = np.array([_bright_box(tensor[0, 0], 150)], np.float32)
    back = info.to_frame(found)
    assert np.abs(back - np.array([[405, 540, 810, 1080]])).max() <= 3.0


def test_letterbox_channel_order_scale_and_dtype() -> None:
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[..., 0], frame[..., 2] = 51, 255  # blue 0.2, red 1.0
    tensor, info = letterbox(frame, (32, 32), CENTERED, dtype=np.float16)
    assert tensor.dtype == np.float16 and info.ratio == 1.0
    assert float(tensor[0, 0, 5, 5]) == pytest.approx(1.0, abs=1e-3)  # R first
    assert float(tensor[0, 2, 5, 5]) == pytest.approx(0.2, abs=1e-3)


def test_letterbox_accepts_gray_and_bgra() -> None:
    gray = np.full((48, 64), 100, np.uint8)
    bgra = np.dstack([np.full((48, 64), v, np.uint8) for v in (10, 20, 30, 255)])
    t_gray, _ = letterbox(gray, (64, 64), CENTERED)
    t_bgra, _ = letterbox(bgra, (64, 64), CENTERED)
    assert t_gray.shape == t_bgra.shape == (1, 3, 64, 64)
    assert t_gray[0, :, 32, 32] == pytest.approx([100 / 255] * 3)
    assert t_bgra[0, :, 32, 32] == pytest.approx([30 / 255, 20 / 255, 10 / 255])


# -- NMS ---------------------------------------------------------------------


def test_nms_suppresses_overlaps_and_orders_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.1], np.float32)
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]
    assert nms(boxes, scores, 0.45, max_det=1).tolist() == [1]
    assert nms(np.empty((0, 4)), np.empty(0), 0.5).size == 0


def test_batched_nms_is_class_aware_unless_agnostic() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    classes = np.array([0, 1, 0])
    assert batched_nms(boxes, scores, classes, 0.45).tolist() == [0, 1]
    assert batched_nms(boxes, scores, classes, 0.45, agnostic=True).tolist() == [0]


# -- names -------------------------------------------------------------------


def test_coco80_matches_ultralytics_metadata_and_shared_names(assets: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(assets / "models" / "yolov8n_int8.onnx"), providers=["CPUExecutionProvider"])
    assert names_from_metadata(session.get_modelmeta().custom_metadata_map) == COCO80
    # the YOLOX/darknet list in shared/ is the same 80 classes, with a few older spellings
    shared = load_labels_file(assets / "models" / "coco80.names")
    assert len(shared) == 80
    differ = {(a, b) for a, b in zip(shared, COCO80, strict=True) if a != b}
    assert differ == {
        ("motorbike", "motorcycle"),
        ("aeroplane", "airplane"),
        ("sofa", "couch"),
        ("pottedplant", "potted plant"),
        ("diningtable", "dining table"),
        ("tvmonitor", "tv"),
    }


def test_names_from_metadata_literal_only() -> None:
    assert names_from_metadata({"names": "{0: 'person', 2: 'car'}"}) == ["person", "class_1", "car"]
    assert names_from_metadata({"names": "['a', 'b']"}) == ["a", "b"]
    assert names_from_metadata({}) is None
    # must never execute code found in a model file
    assert names_from_metadata({"names": "__import__('os').getcwd()"}) is None


def test_load_labels_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\n\n  dog  \n", encoding="utf-8")
    assert load_labels_file(path) == ["cat", "dog"]
    with pytest.raises(EngineError, match="missing.txt: labels file not found"):
        load_labels_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(EngineError, match="empty.txt"):
        load_labels_file(tmp_path / "empty.txt")


def test_resolve_names_priority_and_mismatch_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels = tmp_path / "l.txt"
    labels.write_text("a\nb\nc\n", encoding="utf-8")
    meta = {"names": "{0: 'x', 1: 'y', 2: 'z'}"}
    assert resolve_names(meta, labels, 3) == ["a", "b", "c"]
    assert resolve_names(meta, None, 3) == ["x", "y", "z"]
    assert resolve_names({}, None, 80) == COCO80
    assert resolve_names({}, None, 2) == ["class_0", "class_1"]
    with caplog.at_level(logging.WARNING):
        names = resolve_names(meta, None, 5)
    assert names == ["x", "y", "z", "class_3", "class_4"]
    assert "3 class names but the model outputs 5" in caplog.text


# -- family detection ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "meta", "hw", "family"),
    [
        ((1, 84, 8400), {}, None, "yolov8"),
        ((1, 84, None), {}, None, "yolov8"),
        ((1, 300, 6), {}, None, "end2end"),
        ((1, 300, 6), {"end2end": "True"}, None, "end2end"),
        ((1, 25200, 7), {"stride": "32", "names": "{0: 'a', 1: 'b'}"}, None, "yolov5"),
        ((1, 3549, 85), {}, (416, 416), "yolox"),
        ((1, 8400, 85), {}, (640, 640), "yolox"),
        ((1, 25200, 85), {}, (640, 640), "yolov5"),
    ],
)
def test_detect_family_auto(shape: tuple, meta: dict, hw: tuple | None, family: str) -> None:
    assert detect_family([shape], meta, "auto", input_hw=hw) == family


def test_detect_family_ambiguous_without_metadata() -> None:
    with pytest.raises(UnsupportedModelError, match="set model.family to yolov5 or yolox"):
        detect_family([(1, 3549, 85)], {})


@pytest.mark.parametrize(
    ("shapes", "meta", "match"),
    [
        ([(1, 1000)], {}, "not a detector layout"),
        ([(1, 116, 8400), (1, 32, 160, 160)], {}, "2 outputs"),
        ([(1, 56, 8400)], {"task": "pose", "kpt_shape": "[17, 3]"}, "pose model"),
        ([(1, 116, 8400)], {"names": "{0: 'person'}"}, "segmentation or pose head"),
    ],
)
def test_detect_family_rejects_non_detectors(shapes: list, meta: dict, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        detect_family(shapes, meta)


def test_detect_family_validates_hints() -> None:
    assert detect_family([(1, 3549, 85)], {}, "yolox") == "yolox"
    assert detect_family([(1, 84, 8400)], {}, "yolov8") == "yolov8"
    with pytest.raises(UnsupportedModelError, match="model.family is 'yolov8'.*try yolov5 or yolox"):
        detect_family([(1, 3549, 85)], {}, "yolov8")
    with pytest.raises(UnsupportedModelError, match="model.family is 'yolox'.*try yolov8"):
        detect_family([(1, 84, 8400)], {}, "yolox")
    with pytest.raises(UnsupportedModelError, match="end2end output is"):
        detect_family([(1, 84, 8400)], {}, "end2end")
    with pytest.raises(UnsupportedModelError, match="unknown model family 'yolov9'"):
        detect_family([(1, 84, 8400)], {}, "yolov9")


def test_input_size_sources() -> None:
    static = [TensorSpec("images", (1, 3, 416, 320))]
    dynamic = [TensorSpec("images", (None, 3, None, None))]
    assert input_size(static, {}) == (416, 320)
    assert input_size(dynamic, {"imgsz": "[480, 640]"}) == (480, 640)
    assert input_size(dynamic, {"imgsz": "320"}) == (320, 320)
    assert input_size(dynamic, {}) == (640, 640)
    assert set(DECODERS) == {"yolov8", "yolov5", "yolox", "end2end", "efficientnms"}


# -- decoders on synthetic outputs -----------------------------------------------


def test_yolox_grid_decode() -> None:
    grid, stride = grid_cells((64, 64), (8, 16, 32))
    assert grid.shape == (64 + 16 + 4, 2) and stride[0, 0] == 8 and stride[-1, 0] == 32
    out = np.zeros((1, 84, 7), np.float32)
    cell = 64 + 5  # stride-16 map is 4x4: index 5 is x=1, y=1
    out[0, cell] = [0.5, 0.5, np.log(2.0), np.log(1.0), 0.9, 0.1, 0.8]
    dec = YoloxDecoder(["a", "b"], (64, 64))
    info = LetterboxInfo(ratio=0.5, pad_x=0.0, pad_y=0.0, width=128, height=128)
    dets = dec.decode([out], info, 0.25, 0.45)
    assert len(dets) == 1 and dets[0].label == "b" and dets[0].score == pytest.approx(0.72)
    # centre (1.5*16, 1.5*16) = (24, 24), size 32x16 in input px -> x2 in the frame
    assert dets[0].box == pytest.approx((16.0, 32.0, 80.0, 64.0))
    with pytest.raises(EngineError, match="3549 rows but a 64x64 input gives 84"):
        dec.decode([np.zeros((1, 3549, 7), np.float32)], info, 0.25, 0.45)


def test_end2end_threshold_only() -> None:
    out = np.array([[[10, 20, 30, 40, 0.9, 1], [10, 20, 30, 40, 0.8, 1], [0, 0, 5, 5, 0.1, 0]]], np.float32)
    info = LetterboxInfo(ratio=1.0, pad_x=0.0, pad_y=0.0, width=100, height=100)
    dets = EndToEndDecoder(["a", "b"], (64, 64)).decode([out], info, 0.25, 0.45)
    assert [(d.label, round(d.score, 2)) for d in dets] == [("b", 0.9), ("b", 0.8)]  # no NMS for e2e
    assert dets[0].box == (10.0, 20.0, 30.0, 40.0) and isinstance(dets[0].score, float)


def test_yolov5_decoder_matches_yolov8_on_real_outputs(assets: Path) -> None:
    """Turn YOLOv8's [1,84,N] on bus.jpg into YOLOv5's [1,N,85] with objectness 1: same detections."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(assets / "models" / "yolov8n_int8.onnx"), providers=["CPUExecutionProvider"])
    image = cv2.imread(str(assets / "images" / "bus.jpg"))
    tensor, info = letterbox(image, (640, 640), YoloV8Decoder.preprocess)
    (out,) = session.run(None, {session.get_inputs()[0].name: tensor})
    v8 = YoloV8Decoder(COCO80, (640, 640)).decode([out], info, 0.25, 0.45)

    rows = out[0].T  # (N, 84)
    v5_out = np.concatenate([rows[:, :4], np.ones((rows.shape[0], 1), np.float32), rows[:, 4:]], axis=1)[None]
    assert v5_out.shape == (1, 8400, 85)
    v5 = YoloV5Decoder(COCO80, (640, 640)).decode([v5_out], info, 0.25, 0.45)
    assert len(v8) >= 4
    assert [(d.class_id, d.label) for d in v5] == [(d.class_id, d.label) for d in v8]
    for a, b in zip(v5, v8, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert a.box == pytest.approx(b.box, abs=1e-3)

    # and a real objectness scales the score (obj * cls)
    v5_out[0, :, 4] = 0.5
    halved = YoloV5Decoder(COCO80, (640, 640)).decode([v5_out], info, 0.25, 0.45)
    assert all(d.score > 0.25 for d in halved)
    assert halved[0].score == pytest.approx(v8[0].score * 0.5, abs=1e-6)


def test_letterbox_divides_by_255_like_the_reference():
    """x / 255, not x * (1/255): they differ by one ulp on many values, which dynamic-INT8 models amplify."""
    from edgelabel.engines.models.base import PreprocessSpec
    from edgelabel.engines.models.preprocess import letterbox

    img = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    tensor, _ = letterbox(img, (16, 16), PreprocessSpec())
    expected = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(tensor[0], expected)
    assert not np.array_equal(tensor[0], img[:, :, ::-1].transpose(2, 0, 1) * np.float32(1 / 255))
    padded, _ = letterbox(img[:8], (16, 16), PreprocessSpec())
    assert padded[0, 0, 0, 0] == np.float32(114) / np.float32(255)

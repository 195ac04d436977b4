"""EfficientNMS_TRT decoder and family detection by output names (synthetic arrays, no model run)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelabel.engines.base import EngineError
from edgelabel.engines.models.base import LetterboxInfo
from edgelabel.engines.models.detect import DECODERS, UnsupportedModelError, detect_family
from edgelabel.engines.models.efficientnms import EfficientNMSDecoder, order_from_arrays, order_from_names, shapes_fit

IDENTITY = LetterboxInfo(ratio=1.0, pad_x=0.0, pad_y=0.0, width=640, height=640)
NAMES = ["person", "bicycle", "car"]
STD_NAMES = ["num_detections", "detection_boxes", "detection_scores", "detection_classes"]
STD_SHAPES = [(1, 1), (1, 100, 4), (1, 100), (1, 100)]


def _outputs(rows: list[tuple[float, float, float, float, float, int]], k: int = 8, pad_value: float = 0.9) -> list[np.ndarray]:
    """EfficientNMS outputs in the plugin's order; rows past num are filled with plausible-looking junk."""
    num = np.array([[len(rows)]], np.int32)
    boxes = np.full((1, k, 4), 5.0, np.float32)
    scores = np.full((1, k), pad_value, np.float32)  # padding rows score high: they must still be ignored
    classes = np.full((1, k), 2, np.int32)
    for i, (x1, y1, x2, y2, score, cls) in enumerate(rows):
        boxes[0, i] = (x1, y1, x2, y2)
        scores[0, i] = score
        classes[0, i] = cls
    return [num, boxes, scores, classes]


ROWS = [(10, 20, 110, 220, 0.92, 0), (300, 300, 400, 420, 0.55, 2), (50, 60, 70, 80, 0.20, 1)]


def test_decodes_valid_rows_only_and_ignores_padding() -> None:
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    dets = dec.decode(_outputs(ROWS), IDENTITY, conf=0.25, iou=0.45)
    assert [(d.class_id, d.label) for d in dets] == [(0, "person"), (2, "car")]
    assert dets[0].score == pytest.approx(0.92) and dets[1].score == pytest.approx(0.55)
    assert dets[0].box == pytest.approx((10, 20, 110, 220))
    assert all(isinstance(d.score, float) and isinstance(d.class_id, int) for d in dets)


def test_conf_threshold_and_sorting() -> None:
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    rows = [(0, 0, 10, 10, 0.3, 1), (0, 0, 20, 20, 0.8, 0), (0, 0, 30, 30, 0.5, 2)]
    dets = dec.decode(_outputs(rows), IDENTITY, conf=0.1, iou=0.45)
    assert [d.score for d in dets] == pytest.approx([0.8, 0.5, 0.3])
    assert dec.decode(_outputs(rows), IDENTITY, conf=0.6, iou=0.45)[0].score == pytest.approx(0.8)
    assert dec.decode(_outputs(rows), IDENTITY, conf=0.9, iou=0.45) == []


def test_zero_and_oversized_num_detections() -> None:
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    assert dec.decode(_outputs([]), IDENTITY, 0.25, 0.45) == []
    outs = _outputs(ROWS, k=3)
    outs[0][:] = 99  # a count larger than K must not read past the arrays
    assert len(dec.decode(outs, IDENTITY, 0.1, 0.45)) == 3


def test_letterbox_mapping_to_frame() -> None:
    # a 1280x720 frame letterboxed into 640x640: ratio 0.5, 140 px of padding on top
    info = LetterboxInfo(ratio=0.5, pad_x=0.0, pad_y=140.0, width=1280, height=720)
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    (det,) = dec.decode(_outputs([(100, 190, 300, 390, 0.9, 1)]), info, 0.25, 0.45)
    assert det.box == pytest.approx((200, 100, 600, 500))
    # boxes reaching into the padding are clipped to the frame
    (clipped,) = dec.decode(_outputs([(-10, 100, 700, 600, 0.9, 1)]), info, 0.25, 0.45)
    assert clipped.box == pytest.approx((0, 0, 1280, 720))


@pytest.mark.parametrize("perm", [(2, 0, 3, 1), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_shuffled_outputs_found_by_name(perm: tuple[int, ...]) -> None:
    outs = _outputs(ROWS)
    shuffled = [outs[i] for i in perm]
    names = [STD_NAMES[i] for i in perm]
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    dec.set_output_names(names)
    assert dec.output_order == order_from_names(names)
    expected = EfficientNMSDecoder(NAMES, (640, 640)).decode(outs, IDENTITY, 0.25, 0.45)
    assert dec.decode(shuffled, IDENTITY, 0.25, 0.45) == expected


@pytest.mark.parametrize("perm", [(2, 0, 3, 1), (3, 2, 1, 0), (0, 1, 2, 3)])
def test_shuffled_outputs_found_by_shape_and_dtype(perm: tuple[int, ...]) -> None:
    """Without names the int32 count/classes and the [B,K,4] boxes identify every output."""
    outs = _outputs(ROWS)
    shuffled = [outs[i] for i in perm]
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    dets = dec.decode(shuffled, IDENTITY, 0.25, 0.45)
    assert [(d.class_id, round(d.score, 2)) for d in dets] == [(0, 0.92), (2, 0.55)]
    assert dec.output_order == tuple(perm.index(i) for i in range(4))


def test_float_classes_are_rounded() -> None:
    outs = _outputs(ROWS)
    outs[3] = outs[3].astype(np.float32)
    dec = EfficientNMSDecoder(NAMES, (640, 640), output_order=(0, 1, 2, 3))
    assert [d.class_id for d in dec.decode(outs, IDENTITY, 0.25, 0.45)] == [0, 2]
    # both [B,K] float: the plugin order (scores, then classes) is assumed
    assert order_from_arrays(outs) == (0, 1, 2, 3)


def test_bad_outputs_are_refused() -> None:
    dec = EfficientNMSDecoder(NAMES, (640, 640))
    with pytest.raises(EngineError, match="4 outputs"):
        dec.decode(_outputs(ROWS)[:3], IDENTITY, 0.25, 0.45)
    with pytest.raises(EngineError, match="not the four EfficientNMS outputs"):
        dec.set_output_names(["a", "b", "c", "d"])
    with pytest.raises(EngineError, match="are not"):
        order_from_arrays([np.zeros((1, 1)), np.zeros((1, 8, 5)), np.zeros((1, 8)), np.zeros((1, 8))])


@pytest.mark.parametrize(
    ("names", "order"),
    [
        (STD_NAMES, (0, 1, 2, 3)),
        (["num_dets", "det_boxes", "det_scores", "det_classes"], (0, 1, 2, 3)),  # YOLOv7 end2end
        (["num_dets", "bboxes", "scores", "labels"], (0, 1, 2, 3)),  # YOLOv8-TensorRT style
        (["detection_classes", "detection_scores", "num_detections", "detection_boxes"], (2, 3, 1, 0)),
        (["NUM_DETECTIONS", "Boxes", "Scores", "Classes"], (0, 1, 2, 3)),
    ],
)
def test_order_from_names(names: list[str], order: tuple[int, ...]) -> None:
    assert order_from_names(names) == order


@pytest.mark.parametrize(
    "names",
    [
        ["output0"],
        ["num_detections", "detection_boxes", "detection_scores"],
        ["a", "b", "c", "d"],
        ["num_detections", "detection_boxes", "detection_scores", "detection_boxes2"],  # two box outputs, no classes
        ["num_boxes", "detection_boxes", "detection_scores", "detection_classes"],  # 'num_boxes' matches two roles
    ],
)
def test_order_from_names_refuses_non_matches(names: list[str]) -> None:
    assert order_from_names(names) is None


def test_shapes_fit() -> None:
    assert shapes_fit(STD_SHAPES, (0, 1, 2, 3)) is None
    assert shapes_fit([(None, 1), (None, None, 4), (None, None), (None, None)], (0, 1, 2, 3)) is None
    assert "K" in (shapes_fit([(1, 1), (1, 100, 4), (1, 50), (1, 100)], (0, 1, 2, 3)) or "")
    assert "detection_boxes" in (shapes_fit([(1, 1), (1, 100, 5), (1, 100), (1, 100)], (0, 1, 2, 3)) or "")


# -- family detection ------------------------------------------------------------


def test_registered_decoder() -> None:
    assert DECODERS["efficientnms"] is EfficientNMSDecoder
    assert EfficientNMSDecoder.preprocess.center and EfficientNMSDecoder.preprocess.rgb


def test_detect_family_by_names_in_any_order() -> None:
    assert detect_family(STD_SHAPES, {}, output_names=STD_NAMES) == "efficientnms"
    perm = (3, 1, 0, 2)
    shapes = [STD_SHAPES[i] for i in perm]
    names = [STD_NAMES[i] for i in perm]
    assert detect_family(shapes, {}, "auto", output_names=names) == "efficientnms"
    assert detect_family(shapes, {"names": "{0: 'a'}"}, output_names=names) == "efficientnms"


def test_detect_family_four_outputs_without_names_still_refused() -> None:
    """The existing behaviour stays: four unnamed outputs are not guessed, and the message points at efficientnms."""
    with pytest.raises(UnsupportedModelError, match="efficientnms"):
        detect_family(STD_SHAPES, {})
    with pytest.raises(UnsupportedModelError, match="4 outputs"):
        detect_family(STD_SHAPES, {}, output_names=["a", "b", "c", "d"])


def test_detect_family_hint_efficientnms() -> None:
    assert detect_family(STD_SHAPES, {}, "efficientnms") == "efficientnms"
    assert detect_family(STD_SHAPES, {}, "efficientnms", output_names=STD_NAMES) == "efficientnms"
    with pytest.raises(UnsupportedModelError, match="not the four EfficientNMS outputs"):
        detect_family(STD_SHAPES, {}, "efficientnms", output_names=["a", "b", "c", "d"])
    with pytest.raises(UnsupportedModelError, match="efficientnms.*detection_boxes"):
        detect_family([(1, 1), (1, 100, 5), (1, 100), (1, 100)], {}, "efficientnms")
    with pytest.raises(UnsupportedModelError, match="4 outputs"):
        detect_family([(1, 84, 8400)], {}, "efficientnms")


def test_single_output_models_unaffected_by_names() -> None:
    assert detect_family([(1, 84, 8400)], {}, output_names=["output0"]) == "yolov8"
    assert detect_family([(1, 300, 6)], {}, output_names=["output0"]) == "end2end"
    with pytest.raises(UnsupportedModelError, match="efficientnms"):
        detect_family([(1, 300, 6)], {}, "efficientnms", output_names=["output0"])


def test_wrong_shapes_with_nms_names_are_not_efficientnms() -> None:
    shapes = [(1, 1), (1, 100, 5), (1, 100), (1, 100)]
    with pytest.raises(UnsupportedModelError, match="4 outputs"):
        detect_family(shapes, {}, output_names=STD_NAMES)


def test_detector_path_with_names() -> None:
    """What engines.detector does once it passes the output names: detect, build the decoder, order it by name."""
    perm = (2, 0, 3, 1)
    names = [STD_NAMES[i] for i in perm]
    family = detect_family([STD_SHAPES[i] for i in perm], {}, output_names=names)
    decoder = DECODERS[family](NAMES, (640, 640))
    decoder.set_output_names(names)  # type: ignore[attr-defined]
    outs = _outputs(ROWS)
    dets = decoder.decode([outs[i] for i in perm], IDENTITY, 0.25, 0.45)
    assert [d.label for d in dets] == ["person", "car"]

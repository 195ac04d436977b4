"""edgelabel.edge.int8gate: the INT8-vs-FP16 accuracy gate with real ONNX Runtime detectors, its arithmetic and its cache."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgelabel.edge.int8gate import GATE_JSON_VERSION, GateResult, judge, run_gate
from edgelabel.engines.detector import Detector, load_detector
from tests.conftest import IMAGES, MODELS


@pytest.fixture(scope="module")
def yolox(assets: Path) -> Iterator[Detector]:
    det = load_detector(MODELS / "yolox_nano.onnx", engine="onnxruntime", providers=["cpu"])
    yield det
    det.close()


@pytest.fixture(scope="module")
def yolo11(assets: Path) -> Iterator[Detector]:
    det = load_detector(MODELS / "yolo11n_int8.onnx", engine="onnxruntime", providers=["cpu"])
    yield det
    det.close()


@pytest.fixture(scope="module")
def photos(assets: Path) -> list[Path]:
    return sorted(IMAGES.glob("*.jpg"))


def test_same_model_is_accepted_with_full_score(yolox: Detector, photos: list[Path]) -> None:
    result = run_gate(yolox, yolox, photos, progress=False)
    assert result.accepted
    assert (result.map50, result.map50_95, result.drop_points) == (1.0, 1.0, 0.0)
    assert result.images == len(photos)
    assert result.reason == f"INT8 accepted: mAP50 vs FP16 is 100.0 (drop 0.0 <= 2.0 points, {len(photos)} images)"
    assert result.candidate_sha256 == result.reference_sha256 == yolox.engine.sha256


def test_different_model_is_refused_with_a_large_drop(yolox: Detector, yolo11: Detector, photos: list[Path]) -> None:
    result = run_gate(yolo11, yolox, photos, progress=False)
    assert not result.accepted
    assert result.drop_points > 20.0
    assert 0.0 < result.map50_95 < result.map50 < 0.8
    assert re.fullmatch(r"INT8 refused: mAP50 vs FP16 is \d+\.\d \(drop \d+\.\d > 2\.0 points\)", result.reason)
    assert result.candidate_sha256 == yolo11.engine.sha256 and result.reference_sha256 == yolox.engine.sha256
    # a margin wider than the drop lets the same measurement through
    wide = run_gate(yolo11, yolox, photos, margin_points=99.0, progress=False)
    assert wide.accepted and wide.map50 == result.map50


def test_no_held_back_images_is_refused_with_advice(yolox: Detector) -> None:
    result = run_gate(yolox, yolox, [], progress=False)
    assert not result.accepted and result.images == 0
    assert "no held-back images" in result.reason and "give more calibration images" in result.reason
    assert "using" not in result.reason  # what runs instead is the loader's to say (it asks the engine)


def test_unreadable_images_are_skipped(yolox: Detector, photos: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    result = run_gate(yolox, yolox, [bad, photos[0]], progress=False)
    assert result.accepted and result.images == 1
    only_bad = run_gate(yolox, yolox, [bad], progress=False)
    assert not only_bad.accepted and "none of the 1 held-back images could be read" in only_bad.reason


def test_reference_that_finds_nothing_cannot_judge(assets: Path, yolox: Detector, photos: list[Path]) -> None:
    blind = load_detector(MODELS / "yolox_nano.onnx", engine="onnxruntime", providers=["cpu"], conf=0.9999)
    try:
        result = run_gate(yolox, blind, photos, progress=False)
    finally:
        blind.close()
    assert not result.accepted
    assert "FP16 finds no object on the 6 held-back images, so INT8 cannot be judged" in result.reason


@pytest.mark.parametrize(
    ("map50", "margin", "accepted", "drop"),
    [
        (0.98, 2.0, True, 2.0),  # exactly the margin: 100 * (1 - 0.98) is 2.0000000000000018 before rounding
        (0.9799999, 2.0, False, 2.00001),
        (0.979, 2.0, False, 2.1),
        (1.0, 0.0, True, 0.0),
        (0.9999999, 0.0, False, 0.00001),
        (0.5, 50.0, True, 50.0),
        (0.0, 2.0, False, 100.0),
    ],
)
def test_margin_arithmetic(map50: float, margin: float, accepted: bool, drop: float) -> None:
    result = judge(map50, map50 * 0.7, images=10, margin_points=margin)
    assert result.accepted is accepted
    assert result.drop_points == pytest.approx(drop, abs=1e-9)
    assert result.reason.startswith("INT8 accepted" if accepted else "INT8 refused")


def test_reason_never_prints_a_refused_drop_equal_to_the_margin() -> None:
    result = judge(0.9795, 0.7, images=10, margin_points=2.0)
    assert not result.accepted
    assert "(drop 2.05 > 2.0 points)" in result.reason


def test_bad_margin_is_an_error(yolox: Detector) -> None:
    with pytest.raises(ValueError, match="margin_points must be a number >= 0"):
        judge(0.9, 0.8, images=1, margin_points=-1.0)
    with pytest.raises(ValueError, match="margin_points"):
        run_gate(yolox, yolox, [], margin_points=float("nan"), progress=False)


def test_json_round_trip_and_cache_identity() -> None:
    result = judge(0.951, 0.8, images=40, margin_points=2.0, candidate_sha256="c" * 64, reference_sha256="r" * 64)
    text = result.to_json()
    assert json.loads(text)["version"] == GATE_JSON_VERSION
    again = GateResult.from_json(text)
    assert again == result
    assert again.matches("c" * 64, "r" * 64, 2.0)
    assert not again.matches("x" * 64, "r" * 64, 2.0)
    assert not again.matches("c" * 64, "r" * 64, 3.0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("accepted"), r"field 'accepted' is missing"),
        (lambda d: d.update(accepted="yes"), r"field 'accepted' has the wrong type \(str\)"),
        (lambda d: d.update(images=True), r"field 'images' has the wrong type \(bool\)"),
        (lambda d: d.update(version=99), r"version 99 \(this edgelabel reads version 1\)"),
        (lambda d: d.update(extra=1), r"unknown field\(s\) extra"),
    ],
)
def test_from_json_rejects_a_bad_cache(mutate: Callable[[dict[str, Any]], object], message: str) -> None:
    data = json.loads(judge(0.99, 0.9, images=5).to_json())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        GateResult.from_json(json.dumps(data))


def test_from_json_rejects_non_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        GateResult.from_json("{truncated")
    with pytest.raises(ValueError, match="expected a JSON object"):
        GateResult.from_json("[1, 2]")

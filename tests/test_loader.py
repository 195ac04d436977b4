"""The INT8-or-FP16 decision around the accuracy gate, with real ONNX Runtime detectors standing in.

The gate itself needs no GPU: it compares the detections of two detectors.
Here the "INT8" and "FP16" builds are ONNX Runtime detectors of real models:
the same model twice (the gate must accept) or two different models (it must
refuse), so the decision, the reasons, the cached verdict and the fallbacks
are all exercised on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgelabel.edge.config import config_from_dict
from edgelabel.edge.loader import calibration_folder, load_int8_gated, load_model
from edgelabel.engines.base import EngineError
from edgelabel.engines.detector import Detector, load_detector


@pytest.fixture()
def site_images(tmp_path: Path, assets: Path) -> Path:
    """Ten site images (the six shared pictures, some twice): two are held back for the gate."""
    folder = tmp_path / "site"
    folder.mkdir()
    pictures = sorted((assets / "images").glob("*.jpg"))
    for i in range(10):
        shutil.copy(pictures[i % len(pictures)], folder / f"img_{i:02d}.jpg")
    return folder


class Maker:
    """``make(precision, calib)`` that records its calls and returns ONNX Runtime detectors."""

    def __init__(self, assets: Path, int8_model: str, fp16_model: str = "yolo11n_int8", fail_int8: bool = False):
        self.assets = assets
        self.models = {"int8": int8_model, "fp16": fp16_model}
        self.fail_int8 = fail_int8
        self.calls: list[tuple[str, int | None]] = []
        self.made: list[Detector] = []

    def __call__(self, precision: str, calib: list[Path] | None) -> Detector:
        self.calls.append((precision, None if calib is None else len(calib)))
        if precision == "int8" and self.fail_int8:
            raise EngineError("model.onnx: TensorRT 11 has no INT8 calibrator; use fp16 or a QDQ-quantized ONNX")
        det = load_detector(self.assets / "models" / f"{self.models[precision]}.onnx", providers=["cpu"], threads=1)
        det.label_precision = precision  # which build this stands for
        self.made.append(det)
        return det


def test_same_model_passes_the_gate_and_the_verdict_is_cached(tmp_path, assets, site_images):
    make = Maker(assets, "yolo11n_int8")
    det = load_int8_gated(make, site_images, 500, 2.0, tmp_path / "engines", "auto: test")
    assert det.label_precision == "int8"
    assert det.int8_gate.accepted and det.int8_gate.map50 == pytest.approx(1.0)
    assert det.engine_reason.startswith("auto: test; INT8 accepted: mAP50 vs FP16 is 100.0")
    assert make.calls == [("int8", 8), ("fp16", None)]  # 10 images: 8 calibrate, 2 judge
    verdict = tmp_path / "engines" / "yolo11n_int8-int8.gate.json"
    assert verdict.is_file()
    det.close()

    again = Maker(assets, "yolo11n_int8")
    det = load_int8_gated(again, site_images, 500, 2.0, tmp_path / "engines", "auto: test")
    assert again.calls == [("int8", 8)]  # accepted before: no FP16 build, no second check
    assert det.int8_gate.accepted
    det.close()


def test_a_different_model_is_refused_and_fp16_runs(tmp_path, assets, site_images):
    make = Maker(assets, "yolox_nano")
    det = load_int8_gated(make, site_images, 500, 2.0, tmp_path / "engines", "auto: test")
    assert det.label_precision == "fp16"
    assert not det.int8_gate.accepted and det.int8_gate.drop_points > 2.0
    # the stand-in "FP16" build is yolo11n_int8, a dynamic-int8 graph on ONNX Runtime: the reason says so
    assert "INT8 refused" in det.engine_reason
    assert det.engine_reason.endswith("; using INT8 on onnxruntime (CPUExecutionProvider)"), det.engine_reason
    with pytest.raises(EngineError, match="closed"):
        make.made[0].infer(None)  # the refused INT8 detector was released


def test_a_wider_margin_is_checked_again_not_read_from_the_cache(tmp_path, assets, site_images):
    load_int8_gated(Maker(assets, "yolox_nano"), site_images, 500, 2.0, tmp_path / "e", "r").close()
    make = Maker(assets, "yolox_nano")
    det = load_int8_gated(make, site_images, 500, 100.0, tmp_path / "e", "r")
    assert det.label_precision == "int8" and det.int8_gate.margin_points == 100.0
    det.close()


def test_no_calibration_images_means_fp16_with_a_reason(tmp_path, assets):
    make = Maker(assets, "yolo11n_int8")
    empty = tmp_path / "empty"
    empty.mkdir()
    det = load_int8_gated(make, empty, 500, 2.0, tmp_path / "engines", "auto: test")
    assert make.calls == [("fp16", None)]
    assert f"no calibration images in {empty}" in det.engine_reason and "model.calibration" in det.engine_reason
    det.close()


def test_an_int8_build_failure_means_fp16_with_the_cause(tmp_path, assets, site_images):
    make = Maker(assets, "yolo11n_int8", fail_int8=True)
    det = load_int8_gated(make, site_images, 500, 2.0, tmp_path / "engines", "auto: test")
    assert det.label_precision == "fp16"
    assert "INT8 build failed" in det.engine_reason and "QDQ" in det.engine_reason
    det.close()


def test_the_fallback_reason_says_what_actually_runs_not_fp16(tmp_path, assets, site_images):
    """When the FP16 engine is ONNX Runtime on an FP32 graph (the TensorRT build fell back), FP32 runs."""
    make = Maker(assets, "yolo11n_int8", fp16_model="yolox_nano", fail_int8=True)
    det = load_int8_gated(make, site_images, 500, 2.0, tmp_path / "engines", "auto: test")
    assert det.engine_reason.endswith("; using FP32 on onnxruntime (CPUExecutionProvider)"), det.engine_reason
    assert "FP16" not in det.engine_reason
    det.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    det = load_int8_gated(make, empty, 500, 2.0, tmp_path / "engines", "auto: test")
    assert det.engine_reason.endswith("; using FP32 on onnxruntime (CPUExecutionProvider)"), det.engine_reason
    det.close()


def test_calibration_images_are_capped_evenly(tmp_path, assets, site_images):
    make = Maker(assets, "yolo11n_int8")
    load_int8_gated(make, site_images, 5, 2.0, tmp_path / "engines", "r").close()
    assert make.calls[0] == ("int8", 4)  # 5 of 10 kept, one of them held back


def test_int8_on_onnxruntime_says_it_applies_to_tensorrt_only(tmp_path, assets):
    cfg = config_from_dict({
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "engine": "onnxruntime",
                  "precision": "int8", "providers": ["cpu"]},
        "sources": {"a": {"uri": str(assets / "images")}},
    })
    det = load_model(cfg)
    assert det.engine.type_name == "onnxruntime"
    assert det.engine_reason == ("model.engine is onnxruntime; model.precision int8 applies to native TensorRT only; "
                                 "using FP32 on onnxruntime (CPUExecutionProvider)")
    det.close()
    assert calibration_folder(cfg) == cfg.resolve(cfg.dataset.path) / "images"


def test_the_calibration_choice_is_kept_while_the_folder_grows(tmp_path, site_images):
    from edgelabel.edge.loader import calibration_split

    manifest = tmp_path / "engines" / "m-calibration.json"
    first = calibration_split(site_images, 500, manifest)
    assert len(first[0]) == 8 and len(first[1]) == 2 and manifest.is_file()
    shutil.copy(site_images / "img_00.jpg", site_images / "img_99.jpg")  # the dataset grew
    assert calibration_split(site_images, 500, manifest) == first  # same images: same engine, no new gate
    assert calibration_split(site_images, 500) != first  # without the manifest the new image is taken
    first[0][0].unlink()  # an image of the choice is gone: choose again
    again = calibration_split(site_images, 500, manifest)
    assert again != first and all(p.is_file() for p in again[0] + again[1])

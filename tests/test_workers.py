"""Several inference workers on one engine: order, completeness, equal detections; engine selection."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from edgelabel.edge.config import config_from_dict
from edgelabel.edge.loader import cpu_plan, load_model, worker_count
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.sinks.base import Sink
from edgelabel.engines.base import EngineError
from edgelabel.engines.detector import load_detector
from edgelabel.engines.select import choose_engine, is_serialized_engine, tensorrt_importable


class RecordingSink(Sink):
    """Keeps every record it is given, in delivery order."""

    name = "recording"

    def __init__(self) -> None:
        self.records = []

    def write(self, record, frame) -> None:
        self.records.append(record)


class JitterDetector:
    """A real detector whose engine call takes a random extra moment, so workers finish out of order."""

    def __init__(self, inner, seed: int = 7) -> None:
        self._inner = inner
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def infer(self, tensor):
        with self._lock:
            pause = self._rng.choice((0.0, 0.0, 0.03))
        time.sleep(pause)
        return self._inner.infer(tensor)


def _cfg(tmp_path: Path, assets: Path, sources: dict, **model) -> dict:
    return {
        "device_id": "wrk",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", **model},
        "sources": sources,
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
    }


def _run(cfg, detector) -> list:
    sink = RecordingSink()
    pipe = Pipeline(cfg, detector=detector, sinks=[sink], show_progress=False)
    assert pipe.run() == 0
    return sink.records


def test_cpu_plan_defaults_and_overrides():
    cfg = config_from_dict({"model": {"path": "m.onnx"}, "sources": {"a": {"uri": "x.mp4"}}})
    assert cpu_plan(cfg.model, cores=2) == (1, 2)  # one single-threaded call per core
    assert cpu_plan(cfg.model, cores=1) == (0, 1)  # one worker: ONNX Runtime picks its threads
    assert cpu_plan(cfg.model, cores=32) == (1, 4)
    cfg.model.workers, cfg.model.threads = 1, 2
    assert cpu_plan(cfg.model, cores=8) == (2, 1)


def test_two_workers_deliver_every_frame_once_in_order_with_the_same_detections(tmp_path, assets):
    video = {"cars": {"uri": str(assets / "videos" / "cars.mp4")}}
    one = config_from_dict(_cfg(tmp_path / "one", assets, video, workers=1, threads=1))
    two = config_from_dict(_cfg(tmp_path / "two", assets, video, workers=2, threads=1))
    detector = load_model(two)
    assert worker_count(two, detector) == 2 and worker_count(one, detector) == 1
    serial = _run(one, detector)  # the pipeline closes its detector at the end
    parallel = _run(two, JitterDetector(load_model(two)))
    assert [r.frame_index for r in parallel] == list(range(268))
    assert [r.id for r in parallel] == [r.id for r in serial]
    for a, b in zip(serial, parallel, strict=True):
        assert [(d.class_id, d.box) for d in a.detections] == [(d.class_id, d.box) for d in b.detections]


def test_workers_keep_each_source_in_order(tmp_path, assets):
    sources = {"a": {"uri": str(assets / "videos" / "cars.mp4")},
               "b": {"uri": str(assets / "images")}}
    cfg = config_from_dict(_cfg(tmp_path, assets, sources, workers=3, threads=1))
    records = _run(cfg, JitterDetector(load_model(cfg)))
    by_source: dict[str, list[int]] = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r.frame_index)
    assert by_source["a"] == list(range(268))
    assert by_source["b"] == sorted(by_source["b"]) and len(by_source["b"]) == len(set(by_source["b"]))


def test_a_failing_frame_does_not_hold_back_the_rest(tmp_path, assets):
    class FailEveryFifth(JitterDetector):
        def __init__(self, inner) -> None:
            super().__init__(inner)
            self.calls = 0

        def infer(self, tensor):
            with self._lock:
                self.calls += 1
                n = self.calls
            if n % 5 == 0:
                raise EngineError("simulated engine failure")
            return super().infer(tensor)

    video = {"cars": {"uri": str(assets / "videos" / "cars.mp4")}}
    cfg = config_from_dict(_cfg(tmp_path, assets, video, workers=2, threads=1))
    records = _run(cfg, FailEveryFifth(load_model(cfg)))
    indexes = [r.frame_index for r in records]
    assert indexes == sorted(indexes)
    assert 268 - 268 // 5 - 1 <= len(indexes) <= 268 - 268 // 5 + 1


def test_status_reports_engine_choice_and_workers(tmp_path, assets):
    video = {"cars": {"uri": str(assets / "videos" / "cars.mp4")}}
    cfg = config_from_dict(_cfg(tmp_path, assets, video, workers=2, threads=1, engine="onnxruntime"))
    pipe = Pipeline(cfg, sinks=[RecordingSink()], show_progress=False)
    pipe.run()
    model = pipe.status()["model"]
    assert model["engine"] == "onnxruntime"
    assert model["engine_reason"] == "model.engine is onnxruntime"
    assert model["inference_workers"] == 2


def test_choose_engine_rules(tmp_path):
    onnx = tmp_path / "m.onnx"
    assert choose_engine("onnxruntime", onnx).engine == "onnxruntime"
    assert choose_engine("tensorrt", onnx).engine == "tensorrt"
    plan = choose_engine("auto", tmp_path / "m.engine")
    assert plan.engine == "tensorrt" and "serialized TensorRT engine" in plan.reason
    assert is_serialized_engine("x.plan") and not is_serialized_engine("x.onnx")
    auto = choose_engine("auto", onnx)
    if not tensorrt_importable():
        assert auto == choose_engine("auto", onnx)
        assert auto.engine == "onnxruntime" and "not installed" in auto.reason
    with pytest.raises(ValueError, match="unknown engine type 'tflite'"):
        choose_engine("tflite", onnx)
@pytest.mark.skipif(tensorrt_importable(), reason="checks the fallback taken where TensorRT is not installed")
def test_tensorrt_unavailable_falls_back_to_onnxruntime(assets, caplog):
    det = load_detector(assets / "models" / "yolox_nano.onnx", engine="tensorrt", family="yolox",
                        providers=["cpu"], precision="fp16")
    try:
        assert det.engine.type_name == "onnxruntime"
        assert "fell back to ONNX Runtime" in det.engine_reason
        assert "falling back to ONNX Runtime" in caplog.text
    finally:
        det.close()


def test_serialized_engine_without_tensorrt_is_a_clear_error(tmp_path):
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"\x00" * 64)
    if tensorrt_importable():
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    with pytest.raises(EngineError, match="model.engine"):
        load_detector(plan)


def test_an_engine_that_fails_every_frame_stops_feeding_the_watchdog(tmp_path, assets, caplog):
    class Broken(JitterDetector):
        def infer(self, tensor):
            raise EngineError("CUDA error: an illegal memory access was encountered")

    video = {"cars": {"uri": str(assets / "videos" / "cars.mp4")}}
    cfg = config_from_dict(_cfg(tmp_path, assets, video, workers=2, threads=1))
    pipe = Pipeline(cfg, detector=Broken(load_model(cfg)), sinks=[RecordingSink()], show_progress=False)
    pipe.run()
    assert not pipe.alive(max_age=3600)
    assert "the last 100 frames all failed in the engine" in caplog.text

    healthy = Pipeline(cfg, detector=JitterDetector(load_model(cfg)), sinks=[RecordingSink()], show_progress=False)
    healthy.run()
    assert healthy.alive(max_age=3600)


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path, assets):
    from edgelabel.edge.config import ConfigError

    video = {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 10}}
    cfg = config_from_dict(_cfg(tmp_path, assets, video, workers=1, threads=1))
    first = Pipeline(cfg, sinks=[RecordingSink()], show_progress=False)
    first.start()
    try:
        second = Pipeline(config_from_dict(_cfg(tmp_path, assets, video)), sinks=[RecordingSink()], show_progress=False)
        with pytest.raises(ConfigError, match=r"is in use by another edgelabel process \(pid \d+\)"):
            second.run()
    finally:
        first.shutdown()
    third = Pipeline(config_from_dict(_cfg(tmp_path, assets, {"i": {"uri": str(assets / "images")}})),
                     sinks=[RecordingSink()], show_progress=False)
    assert third.run() == 0  # released at shutdown

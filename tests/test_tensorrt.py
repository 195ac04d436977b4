"""TensorRT back end without a GPU: cache keys and files, engine headers, calibration, and the build/load logic.

The TensorRT and CUDA calls are exercised against small fake modules that
mimic the attribute sets of TensorRT 8.6, 10.x and 11.x (checked against the
real bindings: see docs/tensorrt.md).  The test at the end runs the real
thing and skips unless TensorRT and an NVIDIA GPU are present.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import edgelabel.engines.tensorrt as trt_engine
from edgelabel.engines.base import EngineError, TensorSpec
from edgelabel.engines.calibration import (
    IMAGE_EXTENSIONS,
    CalibrationBatcher,
    calibration_hash,
    list_images,
    make_entropy_calibrator,
    split_calibration,
)
from edgelabel.engines.models.base import PreprocessSpec
from edgelabel.engines.models.detect import input_size
from edgelabel.engines.models.names import names_from_metadata
from edgelabel.engines.models.preprocess import letterbox
from edgelabel.engines.trtcache import (
    CacheKey,
    atomic_write,
    engine_filename,
    load_or_build,
    load_timing_cache,
    metadata_to_strings,
    parse_engine_header,
    parse_onnx_summary,
    read_engine_file,
    read_onnx_summary,
    read_sidecar,
    save_timing_cache,
    sidecar_path,
    timing_cache_path,
    write_sidecar,
)
from tests.conftest import IMAGES, MODELS

YOLOX_SPEC = PreprocessSpec(center=False, pad_value=114, rgb=False, scale=1.0)
ULTRA_SPEC = PreprocessSpec()

KEY = CacheKey(
    onnx_sha256="a" * 64,
    trt_version="10.13.3.9",
    gpu_name="NVIDIA Orin (nvgpu)",
    compute_capability="8.7",
    precision="fp16",
    input_shape=(1, 3, 640, 640),
    calib_hash=None,
)


# -- cache keys and file names ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("onnx_sha256", "b" * 64),
        ("trt_version", "10.3.0"),
        ("gpu_name", "NVIDIA GeForce RTX 4090"),
        ("compute_capability", "8.9"),
        ("precision", "int8"),
        ("input_shape", (1, 3, 480, 640)),
        ("calib_hash", "c" * 64),
        ("format", "edgelabel-trt-2"),
    ],
)
def test_every_key_component_changes_the_digest(field: str, value: Any) -> None:
    changed = dataclasses.replace(KEY, **{field: value})
    assert changed.digest() != KEY.digest()
    assert engine_filename("yolo11n", changed) != engine_filename("yolo11n", KEY)


def test_digest_is_stable_and_canonical() -> None:
    again = CacheKey(**{f.name: getattr(KEY, f.name) for f in dataclasses.fields(KEY)})
    assert again.digest() == KEY.digest() and len(KEY.digest()) == 64
    assert json.loads(json.dumps(KEY.fields()))["input_shape"] == [1, 3, 640, 640]


def test_engine_filename_is_readable() -> None:
    name = engine_filename("yolo11n", KEY)
    assert name == f"yolo11n-fp16-640x640-{KEY.digest()[:16]}.engine"
    odd = engine_filename("my model (v2)!", dataclasses.replace(KEY, input_shape=(1, 3, 480, 640), precision="int8"))
    assert odd.startswith("my-model-v2-int8-480x640-") and " " not in odd and "(" not in odd


def test_timing_cache_path_per_gpu_and_version(tmp_path: Path) -> None:
    path = timing_cache_path(tmp_path, "10.3.0", "NVIDIA Orin (nvgpu)", "8.7")
    assert path.parent == tmp_path and path.name == "timing-NVIDIA-Orin-nvgpu-sm87-trt10.3.0.cache"
    assert timing_cache_path(tmp_path, "10.3.0", "NVIDIA Orin (nvgpu)", "8.6") != path
    assert timing_cache_path(tmp_path, "8.6.2", "NVIDIA Orin (nvgpu)", "8.7") != path


# -- atomic files, sidecar, timing cache ----------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.engine"
    atomic_write(target, b"first")
    atomic_write(target, lambda fh: fh.write(b"second"))
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == []


def test_atomic_write_failing_writer_leaves_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "x.engine"
    target.write_bytes(b"old complete engine")

    def half_then_fail(fh: Any) -> None:
        fh.write(b"new partial bytes")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old complete engine"
    assert _leftovers(tmp_path) == []

    fresh = tmp_path / "fresh.engine"
    with pytest.raises(OSError):
        atomic_write(fresh, half_then_fail)
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_sidecar_round_trip(tmp_path: Path) -> None:
    engine = tmp_path / engine_filename("yolox_nano", KEY)
    io = [{"name": "images", "mode": "input", "shape": [1, 3, 640, 640], "dtype": "float32"}]
    write_sidecar(engine, KEY, source="/models/yolox_nano.onnx", build_seconds=12.3456, precision="fp16", io=io, extra={"cuda": "x"})
    assert sidecar_path(engine).name == engine.name + ".json"
    doc = read_sidecar(engine)
    assert doc is not None
    assert doc["key"] == KEY.fields() and doc["digest"] == KEY.digest()
    assert doc["precision"] == "fp16" and doc["build_seconds"] == 12.346 and doc["io"] == io and doc["cuda"] == "x"
    assert doc["source"] == "/models/yolox_nano.onnx" and doc["built_at"]
    sidecar_path(engine).write_text("{not json")
    assert read_sidecar(engine) is None
    assert read_sidecar(tmp_path / "missing.engine") is None


def test_timing_cache_load_save(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    assert load_timing_cache(path) == b""
    save_timing_cache(path, b"")  # nothing to save: no file
    assert not path.exists()
    save_timing_cache(path, b"TIMING")
    assert load_timing_cache(path) == b"TIMING"


# -- build-or-load fallback -------------------------------------------------------------


class _Builds:
    """A build function that counts its calls and returns a fixed plan."""

    def __init__(self, plan: bytes = b"GOOD-PLAN") -> None:
        self.plan = plan
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.plan


def _deserialize(plan: bytes) -> dict[str, bytes] | None:
    """Fake runtime.deserialize_cuda_engine: None for anything not built "here"."""
    return {"plan": plan} if plan.startswith(b"GOOD") else None


def test_cached_engine_is_loaded_without_building(tmp_path: Path) -> None:
    path = tmp_path / "m.engine"
    path.write_bytes(b"GOOD-CACHED")
    build = _Builds()
    result = load_or_build(path, _deserialize, build)
    assert build.calls == 0 and not result.built and result.engine == {"plan": b"GOOD-CACHED"}


def test_stale_cached_engine_is_rebuilt_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.engine"
    path.write_bytes(b"PLAN-FROM-ANOTHER-TENSORRT")
    build = _Builds()
    with caplog.at_level(logging.WARNING):
        result = load_or_build(path, _deserialize, build)
    assert build.calls == 1 and result.built and result.rebuilt_stale
    assert result.engine == {"plan": b"GOOD-PLAN"} and path.read_bytes() == b"GOOD-PLAN"
    assert "does not deserialize" in caplog.text
    # the next start finds the rebuilt file
    assert not load_or_build(path, _deserialize, build).built and build.calls == 1


def test_unloadable_fresh_build_raises_instead_of_looping(tmp_path: Path) -> None:
    path = tmp_path / "m.engine"
    path.write_bytes(b"STALE")
    build = _Builds(b"BAD-EVEN-WHEN-FRESH")
    with pytest.raises(EngineError, match="cannot deserialize"):
        load_or_build(path, _deserialize, build)
    assert build.calls == 1


def test_unloadable_fresh_build_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "m.engine"
    with pytest.raises(EngineError, match="cannot deserialize"):
        load_or_build(path, _deserialize, _Builds(b"BAD-EVEN-WHEN-FRESH"))
    assert not path.exists()  # the next start builds again instead of finding a useless file


def test_a_build_that_never_finished_is_not_started_again(tmp_path: Path) -> None:
    """A build killed mid-way (OOM killer, power cut) leaves a marker; the restarted service must not loop."""
    path = tmp_path / "m.engine"

    class Killed(_Builds):
        def __call__(self) -> bytes:
            assert (tmp_path / "m.engine.building").is_file()  # the marker exists while building
            raise SystemExit("simulated kill")  # nothing after this runs in a killed process

    marker = tmp_path / "m.engine.building"
    with pytest.raises(SystemExit):
        load_or_build(path, _deserialize, Killed())
    marker.write_text("pid 1 started earlier\n")  # what a SIGKILL leaves behind (a clean exit removes it)
    build = _Builds()
    with pytest.raises(EngineError, match=r"did not finish.*delete .*m\.engine\.building to build again"):
        load_or_build(path, _deserialize, build)
    assert build.calls == 0
    marker.unlink()
    assert load_or_build(path, _deserialize, build).built and not marker.exists()


def test_a_build_error_leaves_no_marker(tmp_path: Path) -> None:
    class Fails(_Builds):
        def __call__(self) -> bytes:
            raise EngineError("parser: unsupported operator")

    with pytest.raises(EngineError, match="unsupported operator"):
        load_or_build(tmp_path / "m.engine", _deserialize, Fails())
    assert not (tmp_path / "m.engine.building").exists()


def test_missing_engine_is_built_and_unwritable_cache_still_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build = _Builds()
    result = load_or_build(tmp_path / "new.engine", _deserialize, build)
    assert result.built and (tmp_path / "new.engine").read_bytes() == b"GOOD-PLAN"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        result = load_or_build(blocker / "m.engine", _deserialize, build)
    assert result.built and result.engine == {"plan": b"GOOD-PLAN"}
    assert "cannot write the engine cache" in caplog.text


def test_empty_build_raises(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="empty engine"):
        load_or_build(tmp_path / "m.engine", _deserialize, _Builds(b""))


# -- Ultralytics .engine headers ----------------------------------------------------------

ULTRA_META = {
    "description": "Ultralytics YOLO11n model",
    "stride": 32,
    "task": "detect",
    "batch": 1,
    "imgsz": [640, 640],
    "names": {"0": "person", "1": "bicycle", "2": "car"},
    "args": {"half": True, "int8": False, "dynamic": False},
    "end2end": False,
}


def _ultralytics_engine(meta: dict[str, Any], plan: bytes) -> bytes:
    header = json.dumps(meta).encode("utf-8")
    return len(header).to_bytes(4, "little", signed=True) + header + plan


def test_read_ultralytics_engine(tmp_path: Path) -> None:
    plan = b"ftrt\x00\x01fake plan bytes" * 10
    path = tmp_path / "yolo11n.engine"
    path.write_bytes(_ultralytics_engine(ULTRA_META, plan))
    meta, body = read_engine_file(path)
    assert meta == ULTRA_META and body == plan


def test_read_raw_plan_without_header(tmp_path: Path) -> None:
    raw = b"ftrt" + bytes(range(256)) * 4
    path = tmp_path / "model.plan"
    path.write_bytes(raw)
    assert read_engine_file(path) == (None, raw)


@pytest.mark.parametrize(
    "data",
    [
        (20).to_bytes(4, "little") + b"[1, 2, 3]" + b"x" * 40,  # JSON, but not an object
        (10).to_bytes(4, "little") + b"{not json}" + b"x" * 40,  # braces, not JSON
        (10_000).to_bytes(4, "little") + b"{" + b"x" * 40,  # length past the end
        (5 << 20).to_bytes(4, "little") + b"{" * 100,  # absurd length
        (0).to_bytes(4, "little") + b"{}" + b"x",
        (-5).to_bytes(4, "little", signed=True) + b"{}xxxxxxxx",
        b"{}",
    ],
)
def test_header_detection_is_strict(data: bytes) -> None:
    assert parse_engine_header(data) == (None, data)


def test_header_with_nothing_after_it_is_not_a_header() -> None:
    data = _ultralytics_engine({"a": 1}, b"")
    assert parse_engine_header(data) == (None, data)


def test_empty_engine_file(tmp_path: Path) -> None:
    (tmp_path / "e.engine").write_bytes(b"")
    with pytest.raises(EngineError, match="empty"):
        read_engine_file(tmp_path / "e.engine")


def test_ultralytics_metadata_as_onnx_strings() -> None:
    strings = metadata_to_strings(ULTRA_META)
    assert strings["names"] == "{0: 'person', 1: 'bicycle', 2: 'car'}"
    assert names_from_metadata(strings) == ["person", "bicycle", "car"]
    assert strings["imgsz"] == "[640, 640]" and strings["stride"] == "32" and strings["task"] == "detect"
    assert strings["end2end"] == "False"
    assert input_size([TensorSpec("images", (1, 3, None, None))], strings) == (640, 640)
    assert all(isinstance(v, str) for v in strings.values())


# -- ONNX summary -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["yolox_nano", "yolov8n_int8", "yolo26n_int8"])
def test_onnx_summary_matches_onnxruntime(assets: Path, model: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / f"{model}.onnx"
    summary = read_onnx_summary(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(s.name, list(s.shape)) for s in summary.inputs] == [(i.name, i.shape) for i in session.get_inputs()]
    assert [(s.name, list(s.shape)) for s in summary.outputs] == [(o.name, o.shape) for o in session.get_outputs()]
    assert summary.metadata == dict(session.get_modelmeta().custom_metadata_map)
    assert summary.inputs[0].dtype == "float32" and not summary.has_qdq


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb(number: int, value: bytes | int | str) -> bytes:
    if isinstance(value, int):
        return _pb_varint(number << 3) + _pb_varint(value)
    raw = value.encode() if isinstance(value, str) else value
    return _pb_varint((number << 3) | 2) + _pb_varint(len(raw)) + raw


def tiny_onnx(dims: list[int | str], *, ops: tuple[str, ...] = ("Conv",), meta: dict[str, str] | None = None) -> bytes:
    """A minimal ONNX ModelProto: one float input with ``dims`` (str = dynamic), one output, some nodes."""

    def value_info(name: str, shape: list[int | str], elem: int = 1) -> bytes:
        dim_msgs = b"".join(_pb(1, _pb(2, d) if isinstance(d, str) else _pb(1, d)) for d in shape)
        tensor_type = _pb(1, elem) + _pb(2, dim_msgs)
        return _pb(1, name) + _pb(2, _pb(1, tensor_type))

    nodes = b"".join(_pb(1, _pb(1, "images") + _pb(2, f"t{i}") + _pb(4, op)) for i, op in enumerate(ops))
    weight = _pb(5, _pb(8, "conv.weight") + _pb(9, b"\x00" * 16))
    graph = nodes + _pb(2, "g") + weight + _pb(11, value_info("conv.weight", [4])) + _pb(11, value_info("images", dims))
    graph += _pb(12, value_info("output0", [1, 84, 8400]))
    props = b"".join(_pb(14, _pb(1, k) + _pb(2, v)) for k, v in (meta or {}).items())
    return _pb(1, 8) + _pb(2, "tiny") + _pb(7, graph) + props


def test_onnx_summary_dynamic_dims_initializers_and_qdq() -> None:
    data = tiny_onnx(["batch", 3, "height", "width"], ops=("QuantizeLinear", "DequantizeLinear", "Conv"), meta={"imgsz": "[480, 640]"})
    summary = parse_onnx_summary(data)
    assert summary.inputs == [TensorSpec("images", (None, 3, None, None), "float32")]  # conv.weight dropped
    assert summary.outputs == [TensorSpec("output0", (1, 84, 8400), "float32")]
    assert summary.metadata == {"imgsz": "[480, 640]"} and summary.producer == "tiny"
    assert summary.has_qdq and summary.op_types == {"QuantizeLinear", "DequantizeLinear", "Conv"}


def test_onnx_summary_rejects_non_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf at all \xff\xff\xff")
    with pytest.raises(EngineError, match="bad.onnx: is not a valid ONNX model"):
        read_onnx_summary(bad)


# -- calibration ------------------------------------------------------------------------


def test_image_extensions_match_the_sources() -> None:
    from edgelabel.edge.sources import IMAGE_EXTENSIONS as SOURCE_EXTENSIONS

    assert IMAGE_EXTENSIONS == SOURCE_EXTENSIONS


def test_list_images(assets: Path, tmp_path: Path) -> None:
    found = list_images(IMAGES)
    assert [p.name for p in found] == sorted(p.name for p in IMAGES.iterdir() if p.suffix.lower() == ".jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.PNG").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.jpg", "sub/b.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpg"]
    with pytest.raises(EngineError, match="not found"):
        list_images(tmp_path / "missing")


def test_split_every_fifth_held_back_deterministically() -> None:
    paths = [f"/cal/img{i:02d}.jpg" for i in range(12)]
    calib, held = split_calibration(list(reversed(paths)), holdout=0.2)
    assert [p.name for p in held] == ["img04.jpg", "img09.jpg"]
    assert len(calib) == 10 and not set(calib) & set(held)
    assert split_calibration(paths, 0.2) == (calib, held)
    assert split_calibration(paths, 0.0) == ([Path(p) for p in paths], [])
    assert len(split_calibration(paths, 0.5)[1]) == 6
    with pytest.raises(ValueError):
        split_calibration(paths, 1.0)


def test_split_shared_images(assets: Path) -> None:
    calib, held = split_calibration(list_images(IMAGES), holdout=0.2)
    assert len(held) == 1 and len(calib) == len(list_images(IMAGES)) - 1


def test_batcher_letterboxes_like_inference(assets: Path, tmp_path: Path) -> None:
    images = list_images(IMAGES)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    batcher = CalibrationBatcher([images[0], broken, *images[1:]], (416, 416), YOLOX_SPEC, batch_size=2)
    assert batcher.shape == (2, 3, 416, 416) and batcher.nbytes == 2 * 3 * 416 * 416 * 4
    batches = list(batcher)
    assert len(batches) == len(images) // 2 and batcher.skipped == [broken]
    first = batches[0]
    assert first.dtype == np.float32 and first.flags.c_contiguous and first.shape == (2, 3, 416, 416)
    expected, _ = letterbox(cv2.imread(str(images[0])), (416, 416), YOLOX_SPEC)
    np.testing.assert_array_equal(first[0], expected[0])
    expected2, _ = letterbox(cv2.imread(str(images[1])), (416, 416), YOLOX_SPEC)
    np.testing.assert_array_equal(first[1], expected2[0])
    assert first.max() > 1.0  # YOLOX keeps 0-255; an Ultralytics spec scales to 0-1
    ultra = next(iter(CalibrationBatcher(images[:1], (320, 320), ULTRA_SPEC)))
    assert ultra.shape == (1, 3, 320, 320) and ultra.max() <= 1.0


def test_calibration_hash(assets: Path, tmp_path: Path) -> None:
    images = list_images(IMAGES)[:3]
    digest = calibration_hash(images)
    assert calibration_hash(list(reversed(images))) == digest  # order does not matter
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    copies = [Path(shutil.copy2(p, copy_dir / p.name)) for p in images]
    os.utime(copies[0], (1, 1))
    assert calibration_hash(copies) == digest  # another folder, other mtimes: same images
    copies[1].write_bytes(copies[1].read_bytes() + b"\0")
    assert calibration_hash(copies) != digest  # same name, different content
    renamed = copies[2].rename(copy_dir / "renamed.jpg")
    assert calibration_hash([copies[0], images[1], renamed]) != digest
    assert calibration_hash(images[:2]) != digest
    with pytest.raises(EngineError, match="cannot be read"):
        calibration_hash([tmp_path / "missing.jpg"])


class FakeCuda(trt_engine.CudaApi):
    """Device memory as numpy buffers keyed by fake pointers; copies are plain memcpy."""

    backend = "fake"
    name = "Fake GPU"
    compute_capability = (8, 7)

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.next_ptr = 0x1000
        self.active = 0
        self.closed = False
        self.freed: list[int] = []

    def activate(self):  # type: ignore[override]
        outer = self

        class _Ctx:
            def __enter__(self) -> None:
                outer.active += 1

            def __exit__(self, *exc: Any) -> None:
                outer.active -= 1

        return _Ctx()

    def _need_active(self) -> None:
        assert self.active > 0, "CUDA call outside activate()"

    def alloc(self, nbytes: int) -> trt_engine.DeviceBuffer:
        self._need_active()
        ptr = self.next_ptr
        self.next_ptr += 0x1000 + nbytes
        self.memory[ptr] = np.zeros(max(1, nbytes), np.uint8)
        return trt_engine.DeviceBuffer(ptr, nbytes, lambda: self.freed.append(ptr))

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self._need_active()
        return np.zeros(shape, dtype)

    def free_pinned(self, array: np.ndarray) -> None:
        self._need_active()

    def create_stream(self) -> Any:
        self._need_active()
        return "stream"

    def stream_handle(self, stream: Any) -> int:
        return 7

    def destroy_stream(self, stream: Any) -> None:
        self._need_active()

    def htod_async(self, dst: trt_engine.DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        self._need_active()
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        self.memory[int(dst)][: raw.size] = raw

    def dtoh_async(self, dst: np.ndarray, src: trt_engine.DeviceBuffer, stream: Any) -> None:
        self._need_active()
        dst.view(np.uint8).reshape(-1)[:] = self.memory[int(src)][: dst.nbytes]

    def synchronize(self, stream: Any) -> None:
        self._need_active()

    def copy_htod(self, dst: trt_engine.DeviceBuffer, src: np.ndarray) -> None:
        self.htod_async(dst, src, None)

    def close(self) -> None:
        self.closed = True


def _fake_calibrator_trt(with_class: bool = True) -> types.ModuleType:
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.13.3.9" if with_class else "11.4.0.106"
    if with_class:

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                self.base_initialised = True

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return mod


def test_entropy_calibrator_feeds_batches_and_caches(assets: Path, tmp_path: Path) -> None:
    images = list_images(IMAGES)[:3]
    batcher = CalibrationBatcher(images, (64, 64), ULTRA_SPEC, batch_size=1)
    cuda = FakeCuda()
    cache = tmp_path / "model.calib"
    with cuda.activate():
        calib = make_entropy_calibrator(batcher, cache, trt=_fake_calibrator_trt(), cuda=cuda)
        assert calib.base_initialised and calib.get_batch_size() == 1
        assert calib.read_calibration_cache() is None
        expected = list(batcher)
        for batch in expected:
            (ptr,) = calib.get_batch(["images"])
            np.testing.assert_array_equal(cuda.memory[ptr].view(np.float32).reshape(batch.shape), batch)
        assert calib.get_batch(["images"]) is None and calib.batches_fed == 3
        calib.write_calibration_cache(b"SCALES")
        assert cache.read_bytes() == b"SCALES" and calib.read_calibration_cache() == b"SCALES"
        calib.free()
        assert cuda.freed


def test_tensorrt_11_has_no_implicit_int8(tmp_path: Path) -> None:
    batcher = CalibrationBatcher([], (64, 64), ULTRA_SPEC)
    with pytest.raises(EngineError, match=r"11\.4.*removed.*fp16.*QDQ"):
        make_entropy_calibrator(batcher, tmp_path / "c", trt=_fake_calibrator_trt(with_class=False), cuda=FakeCuda())


# -- missing libraries ----------------------------------------------------------------------


def test_import_engines_tensorrt_needs_no_tensorrt() -> None:
    """Importing the back end (and the cache/calibration helpers) loads neither TensorRT nor a CUDA binding."""
    code = (
        "import sys, engines.tensorrt, engines.trtcache, engines.calibration, engines.models.efficientnms\n"
        "loaded = [m for m in ('tensorrt', 'pycuda', 'pycuda.driver', 'cuda.bindings.runtime', 'cuda.cudart') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
    assert trt_engine.TensorRTEngine.type_name == "tensorrt"


def test_no_tensorrt_error_says_what_to_install(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineError, match="python3-libnvinfer") as err:
        trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx")
    assert "pip install tensorrt" in str(err.value) and "onnxruntime" in str(err.value)


def test_no_cuda_binding_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pycuda", "pycuda.driver", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(EngineError, match="pip install pycuda") as err:
        trt_engine.load_cuda(0)
    assert "cuda-python" in str(err.value)


def test_bad_options_fail_before_touching_tensorrt(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="precision 'int4'"):
        trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx", precision="int4")
    other = tmp_path / "model.tflite"
    other.write_bytes(b"x")
    with pytest.raises(EngineError, match=r"\.onnx model or a serialized \.engine"):
        trt_engine.TensorRTEngine(other)
    with pytest.raises(EngineError, match="not found"):
        trt_engine.TensorRTEngine(tmp_path / "missing.onnx")


# -- input shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (640, (640, 640)), ("480x640", (480, 640)), ([320, 416], (320, 416)), ((512,), (512, 512)), ("416", (416, 416))],
)
def test_normalize_input_size(value: Any, expected: Any) -> None:
    assert trt_engine.normalize_input_size(value) == expected


@pytest.mark.parametrize("value", ["big", [1, 2, 3], 0, "640x-1"])
def test_normalize_input_size_rejects(value: Any) -> None:
    with pytest.raises(EngineError):
        trt_engine.normalize_input_size(value)


def test_resolve_input_shape(caplog: pytest.LogCaptureFixture) -> None:
    dynamic = TensorSpec("images", (None, 3, None, None))
    assert trt_engine.resolve_input_shape(dynamic, None) == (1, 3, 640, 640)
    assert trt_engine.resolve_input_shape(dynamic, (480, 640)) == (1, 3, 480, 640)
    assert trt_engine.resolve_input_shape(TensorSpec("x", (None, None, 416, 416)), None) == (1, 3, 416, 416)
    static = TensorSpec("images", (1, 3, 416, 416))
    with caplog.at_level(logging.WARNING):
        assert trt_engine.resolve_input_shape(static, (640, 640), "m.onnx") == (1, 3, 416, 416)
    assert "input_size 640x640 ignored" in caplog.text
    with pytest.raises(EngineError, match="NCHW"):
        trt_engine.resolve_input_shape(TensorSpec("tokens", (1, 77)), None)


# -- builder logic against fake TensorRT modules -------------------------------------------------

VERSIONS = {8: "8.6.1", 10: "10.13.3.9", 11: "11.4.0.106"}


class _NS:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakePlanEngine:
    """A deserialized engine: I/O from the plan's JSON; 'inference' writes input statistics to the outputs."""

    def __init__(self, trt: Any, spec: dict[str, Any]) -> None:
        self.trt = trt
        self.io = spec["io"]
        self.num_io_tensors = len(self.io)

    def _entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.io if e["name"] == name)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i]["name"]

    def get_tensor_mode(self, name: str) -> str:
        return self.trt.TensorIOMode.INPUT if self._entry(name)["mode"] == "input" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def get_tensor_dtype(self, name: str) -> str:
        return self._entry(name)["dtype"]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self._entry(name)["profile"]]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakePlanEngine) -> None:
        self.engine = engine
        self.shapes = {e["name"]: tuple(e["shape"]) for e in engine.io}
        self.addresses: dict[str, int] = {}
        self.runs = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        memory = self.engine.trt.cuda.memory
        inp = next(e for e in self.engine.io if e["mode"] == "input")
        shape = self.shapes[inp["name"]]
        x = memory[self.addresses[inp["name"]]][: int(np.prod(shape)) * 4].view(np.float32)
        stats = np.array([x.sum(), x.mean(), x.min(), x.max()], np.float32)
        for e in self.engine.io:
            if e["mode"] == "output":
                buf = memory[self.addresses[e["name"]]]
                if e["dtype"] == "INT32":
                    buf[:4] = np.array([self.runs + 1], np.int32).view(np.uint8)
                else:
                    buf[:16] = stats.view(np.uint8)
        self.runs += 1
        return True


def make_fake_trt(
    major: int = 10,
    *,
    fast_fp16: bool = True,
    fast_int8: bool = True,
    input_dims: tuple[int, ...] = (1, 3, 416, 416),
    parse_errors: tuple[str, ...] = (),
    build_fails: bool = False,
    old_workspace_api: bool = False,
    cuda: FakeCuda | None = None,
) -> types.ModuleType:
    """A module with the attribute set of TensorRT ``major`` that records what the code asked for."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSIONS[major]
    trt.calls = []  # type: ignore[attr-defined]
    trt.cuda = cuda  # type: ignore[attr-defined]
    trt.accept = lambda plan: plan.startswith(b"FAKEPLAN:")  # type: ignore[attr-defined]
    trt.BuilderFlag = _NS(TF32="TF32") if major >= 11 else _NS(FP16="FP16", INT8="INT8", TF32="TF32")
    creation: dict[str, int] = {}
    if major < 11:
        creation["EXPLICIT_BATCH"] = 0
    if major >= 10:
        creation["STRONGLY_TYPED"] = 3
    trt.NetworkDefinitionCreationFlag = _NS(**creation)
    trt.MemoryPoolType = _NS(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = _NS(INPUT="IN", OUTPUT="OUT")
    trt.nptype = lambda dt: {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32}[dt]
    trt.init_libnvinfer_plugins = lambda logger, namespace: trt.calls.append(("plugins", namespace)) or True

    class ILogger:
        Severity = _NS(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.num_inputs = 1

        def get_input(self, i: int) -> Any:
            return _NS(name="images", shape=trt.input_dims)

    class Profile:
        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            trt.calls.append(("profile", name, tuple(lo), tuple(opt), tuple(hi)))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+updated"

    class Config:
        def __init__(self) -> None:
            self.flags_set: list[str] = []
            self.int8_calibrator = None
            self.max_workspace_size = 0
            self.timing_cache: TimingCache | None = None

        def set_flag(self, flag: str) -> None:
            self.flags_set.append(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            trt.calls.append(("add_profile",))
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.timing_cache = cache
            return True

        if not old_workspace_api:

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                trt.calls.append(("pool", pool, size))

        if major < 11:

            def set_calibration_profile(self, profile: Profile) -> bool:
                trt.calls.append(("calibration_profile",))
                return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            if major < 11:
                self.platform_has_fast_fp16 = fast_fp16
                self.platform_has_fast_int8 = fast_int8
            if major < 10:
                self.max_batch_size = 1

        def create_network(self, flags: int = 0) -> Network:
            trt.calls.append(("network_flags", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            trt.config = Config()  # type: ignore[attr-defined]
            return trt.config  # type: ignore[attr-defined]

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            trt.calls.append(("build", tuple(config.flags_set)))
            if build_fails:
                self.logger.log(self.logger_severity_error(), "out of tactics")
                return None
            io = [
                {"name": "images", "mode": "input", "shape": list(trt.input_dims), "dtype": "FLOAT", "profile": trt.profile_shapes},
                {"name": "stats", "mode": "output", "shape": [1, 4], "dtype": "FLOAT"},
                {"name": "runs", "mode": "output", "shape": [1, 1], "dtype": "INT32"},
            ]
            return b"FAKEPLAN:" + json.dumps({"io": io}).encode()

        @staticmethod
        def logger_severity_error() -> int:
            return ILogger.ERROR

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            trt.calls.append(("parse", path))
            self.num_errors = len(parse_errors)
            return not parse_errors

        def get_error(self, i: int) -> str:
            return parse_errors[i]

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> FakePlanEngine | None:
            trt.calls.append(("deserialize", len(plan)))
            if not trt.accept(plan):
                return None
            return FakePlanEngine(trt, json.loads(bytes(plan)[len(b"FAKEPLAN:") :]))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.profile_shapes = [[1, 3, 32, 32], [1, 3, 416, 416], [1, 3, 640, 640]]  # type: ignore[attr-defined]
    trt.input_dims = input_dims  # type: ignore[attr-defined]  (the network input TensorRT's parser reports)
    return trt


def _build(trt: Any, tmp_path: Path, precision: str = "fp16", **kw: Any) -> trt_engine.BuildOutput:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"unused by the fake parser")
    shape = kw.pop("shape", (1, 3, 416, 416))
    return trt_engine.build_plan(trt, onnx, shape, precision, logger=trt_engine.trt_logger(trt), **kw)


@pytest.mark.parametrize(("major", "expected"), [(8, 1 << 0), (10, 0), (11, 1 << 3)])
def test_network_flags_by_feature(major: int, expected: int) -> None:
    trt = make_fake_trt(major)
    assert trt_engine.network_flags(trt, trt.Builder(None)) == expected


def test_build_fp16_static_input(tmp_path: Path) -> None:
    trt = make_fake_trt(10)
    out = _build(trt, tmp_path, "fp16", workspace_bytes=256 << 20, timing_cache=b"OLD")
    assert out.precision == "fp16" and out.plan.startswith(b"FAKEPLAN:")
    assert trt.config.flags_set == ["FP16"]
    assert ("pool", "WORKSPACE", 256 << 20) in trt.calls
    assert not any(c[0] == "add_profile" for c in trt.calls)  # static input: no profile
    assert out.timing_cache == b"OLD+updated"
    assert out.input_name == "images" and out.input_shape == (1, 3, 416, 416)


def test_build_dynamic_input_gets_one_shape_profile(tmp_path: Path) -> None:
    trt = make_fake_trt(10, input_dims=(-1, 3, -1, -1))
    _build(trt, tmp_path, "fp32", shape=(1, 3, 480, 640))
    assert ("profile", "images", (1, 3, 480, 640), (1, 3, 480, 640), (1, 3, 480, 640)) in trt.calls
    assert trt.config.flags_set == []


def test_build_old_workspace_api(tmp_path: Path) -> None:
    trt = make_fake_trt(8, old_workspace_api=True)
    _build(trt, tmp_path, "fp32", workspace_bytes=123)
    assert trt.config.max_workspace_size == 123


def test_fp16_without_fast_fp16_builds_fp32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = make_fake_trt(10, fast_fp16=False)
    with caplog.at_level(logging.WARNING):
        out = _build(trt, tmp_path, "fp16")
    assert out.precision == "fp32" and trt.config.flags_set == [] and "no fast fp16" in caplog.text


def test_parser_errors_one_per_line(tmp_path: Path) -> None:
    trt = make_fake_trt(10, parse_errors=("node 12 (EfficientNMS_TRT): plugin not found", "node 40: unsupported op Foo"))
    with pytest.raises(EngineError) as err:
        _build(trt, tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("TensorRT's ONNX parser rejected the model (2 error(s)):")
    assert lines[1].strip() == "node 12 (EfficientNMS_TRT): plugin not found" and lines[2].strip() == "node 40: unsupported op Foo"


def test_failed_build_reports_tensorrt_errors(tmp_path: Path) -> None:
    trt = make_fake_trt(10, build_fails=True)
    with pytest.raises(EngineError, match="failed to build.*out of tactics"):
        _build(trt, tmp_path)


def test_static_input_mismatch(tmp_path: Path) -> None:
    trt = make_fake_trt(10, input_dims=(1, 3, 416, 416))
    with pytest.raises(EngineError, match="cannot build it for"):
        _build(trt, tmp_path, shape=(1, 3, 640, 640))


def test_int8_needs_calibrator_or_qdq(tmp_path: Path) -> None:
    trt = make_fake_trt(10)
    with pytest.raises(EngineError, match="calibration images"):
        _build(trt, tmp_path, "int8")
    calibrator = object()
    out = _build(trt, tmp_path, "int8", calibrator=calibrator)
    assert out.precision == "int8" and trt.config.flags_set == ["INT8", "FP16"] and trt.config.int8_calibrator is calibrator
    trt = make_fake_trt(10)
    out = _build(trt, tmp_path, "int8", qdq=True)
    assert out.precision == "int8" and trt.config.int8_calibrator is None


def test_int8_dynamic_input_sets_calibration_profile(tmp_path: Path) -> None:
    trt = make_fake_trt(10, input_dims=(-1, 3, -1, -1))
    _build(trt, tmp_path, "int8", calibrator=object(), shape=(1, 3, 320, 320))
    assert ("calibration_profile",) in trt.calls


def test_qdq_model_builds_int8_whatever_was_asked(tmp_path: Path) -> None:
    trt = make_fake_trt(10)
    out = _build(trt, tmp_path, "fp16", qdq=True)
    assert out.precision == "int8" and "INT8" in trt.config.flags_set


def test_int8_without_fast_int8_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = make_fake_trt(10, fast_int8=False)
    with caplog.at_level(logging.WARNING):
        out = _build(trt, tmp_path, "int8", calibrator=object())
    assert out.precision == "fp16" and trt.config.flags_set == ["FP16"] and "no fast INT8" in caplog.text


def test_tensorrt_11_strongly_typed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = make_fake_trt(11)
    with caplog.at_level(logging.WARNING):
        out = _build(trt, tmp_path, "fp16")
    assert out.precision == "fp32" and "strongly typed" in caplog.text
    assert ("network_flags", 1 << 3) in trt.calls
    with pytest.raises(EngineError, match="removed implicit INT8"):
        _build(make_fake_trt(11), tmp_path, "int8", calibrator=object())
    assert _build(make_fake_trt(11), tmp_path, "int8", qdq=True).precision == "int8"


def test_plugin_registration_failure_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    trt = make_fake_trt(10)
    trt.init_libnvinfer_plugins = lambda logger, namespace: False
    with caplog.at_level(logging.WARNING):
        trt_engine.init_plugins(trt, None)
        trt_engine.init_plugins(trt, None)
    assert caplog.text.count("plugins could not be registered") == 1


def test_trt_logger_forwards_and_keeps_errors(caplog: pytest.LogCaptureFixture) -> None:
    trt = make_fake_trt(10)
    bridge = trt_engine.trt_logger(trt)
    assert trt_engine.trt_logger(trt) is bridge  # one per process
    with caplog.at_level(logging.DEBUG, logger="edgelabel.engines.tensorrt.trt"):
        bridge.log(trt.ILogger.VERBOSE, "noise")
        bridge.log(trt.ILogger.WARNING, "careful")
        bridge.log(trt.ILogger.ERROR, "broken")
    assert "noise" not in caplog.text and "careful" in caplog.text and "broken" in caplog.text
    assert list(bridge.errors)[-1] == "broken"


# -- the engine class end to end with fakes ----------------------------------------------------


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, FakeCuda]:
    cuda = FakeCuda()
    trt = make_fake_trt(10, cuda=cuda)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_engine, "load_cuda", lambda device_id=0: cuda)
    return trt, cuda


def test_engine_builds_caches_and_runs(assets: Path, tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    trt, cuda = fake_env
    model = MODELS / "yolox_nano.onnx"
    engine = trt_engine.TensorRTEngine(model, precision="fp16", cache_dir=tmp_path / "engines", providers=["cpu"])
    try:
        assert not engine.cache_hit and engine.engine_file is not None and engine.engine_file.is_file()
        assert engine.engine_file.name.startswith("yolox_nano-fp16-416x416-")
        doc = read_sidecar(engine.engine_file)
        assert doc is not None and doc["precision"] == "fp16" and doc["key"]["gpu_name"] == "Fake GPU"
        assert doc["key"]["onnx_sha256"] == engine.sha256 and [e["name"] for e in doc["io"]] == ["images", "stats", "runs"]
        assert list((tmp_path / "engines").glob("timing-Fake-GPU-sm87-trt10.13.3.9.cache"))
        assert engine.inputs == [TensorSpec("images", (1, 3, 416, 416), "float32")]
        assert [o.name for o in engine.outputs] == ["stats", "runs"] and engine.outputs[1].dtype == "int32"
        x = np.random.default_rng(0).random((1, 3, 416, 416), dtype=np.float32)
        stats, runs = engine.infer(x)
        assert stats[0] == pytest.approx([x.sum(), x.mean(), x.min(), x.max()], rel=1e-4) and runs[0, 0] == 1
        info = engine.info()
        assert info.backend == "tensorrt" and info.provider == "TensorRT 10.13.3.9 on Fake GPU sm_87" and info.precision == "fp16"
        assert info.extra["cache_hit"] is False and info.extra["cuda_binding"] == "fake"
        with pytest.raises(EngineError, match="does not match"):
            engine.infer(np.zeros((1, 3, 320, 320), np.float32))
    finally:
        engine.close()
    assert cuda.closed and cuda.active == 0
    with pytest.raises(EngineError, match="closed"):
        engine.infer(np.zeros((1, 3, 416, 416), np.float32))

    assert trt.calls.count(("plugins", "")) == 1  # EfficientNMS_TRT & co. registered once per process
    builds = sum(1 for c in trt.calls if c[0] == "build")
    again = trt_engine.TensorRTEngine(model, precision="fp16", cache_dir=tmp_path / "engines")
    try:
        assert again.cache_hit and again.info().precision == "fp16"
        assert sum(1 for c in trt.calls if c[0] == "build") == builds  # second start: no build
    finally:
        again.close()


def test_engine_rebuilds_a_stale_cache_file(assets: Path, tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    trt, _ = fake_env
    model = MODELS / "yolox_nano.onnx"
    first = trt_engine.TensorRTEngine(model, cache_dir=tmp_path)
    path = first.engine_file
    first.close()
    assert path is not None
    path.write_bytes(b"a plan from another TensorRT")
    second = trt_engine.TensorRTEngine(model, cache_dir=tmp_path)
    second.close()
    assert not second.cache_hit and path.read_bytes().startswith(b"FAKEPLAN:")
    assert sum(1 for c in trt.calls if c[0] == "build") == 2


def test_engine_dynamic_onnx_uses_input_size_and_metadata(tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    trt, _ = fake_env
    trt.profile_shapes = [[1, 3, 32, 32], [1, 3, 480, 640], [1, 3, 1024, 1024]]
    trt.input_dims = (-1, 3, -1, -1)  # what TensorRT's parser reports for this file
    model = tmp_path / "dyn.onnx"
    model.write_bytes(tiny_onnx(["batch", 3, "h", "w"], meta={"names": "{0: 'a', 1: 'b'}", "stride": "32"}))
    engine = trt_engine.TensorRTEngine(model, precision="fp32", cache_dir=tmp_path / "c", input_size="480x640")
    try:
        assert ("profile", "images", (1, 3, 480, 640), (1, 3, 480, 640), (1, 3, 480, 640)) in trt.calls
        assert engine.engine_file is not None and "-480x640-" in engine.engine_file.name
        assert engine.metadata == {"names": "{0: 'a', 1: 'b'}", "stride": "32"}
        assert engine.inputs[0].shape == (1, 3, 480, 640)  # bound at the profile's shape
        (stats, _) = engine.infer(np.ones((1, 3, 480, 640), np.float32))
        assert stats[0, 0] == pytest.approx(3 * 480 * 640)
        # another size inside the profile rebinds the buffers; one outside is refused
        (stats, _) = engine.infer(np.full((1, 3, 320, 320), 2.0, np.float32))
        assert stats[0, 0] == pytest.approx(2 * 3 * 320 * 320) and engine.inputs[0].shape == (1, 3, 320, 320)
        with pytest.raises(EngineError, match="does not accept input shape"):
            engine.infer(np.zeros((1, 3, 2048, 2048), np.float32))
    finally:
        engine.close()


def test_engine_int8_requires_calibration(tmp_path: Path, assets: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    with pytest.raises(EngineError, match="int8 needs calib_images"):
        trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx", precision="int8", cache_dir=tmp_path)


def test_engine_int8_calibrates_with_images(tmp_path: Path, assets: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    trt, cuda = fake_env

    class Calib:
        def __init__(self) -> None:
            pass

    trt.IInt8EntropyCalibrator2 = Calib
    images = list_images(IMAGES)[:2]
    engine = trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx", precision="int8", cache_dir=tmp_path, calib_images=images)
    try:
        assert engine.info().precision == "int8"
        assert trt.config.flags_set == ["INT8", "FP16"] and isinstance(trt.config.int8_calibrator, Calib)
        assert trt.config.int8_calibrator.batcher.spec == YOLOX_SPEC  # the decoder's preprocessing (yolox by grid size)
        doc = read_sidecar(engine.engine_file)  # type: ignore[arg-type]
        assert doc is not None and doc["key"]["calib_hash"] == calibration_hash(images) and doc["calibration_images"] == 2
    finally:
        engine.close()
    # other calibration images -> another engine file
    other_images = list_images(IMAGES)[2:4]
    other = trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx", precision="int8", cache_dir=tmp_path, calib_images=other_images)
    other.close()
    assert other.engine_file != engine.engine_file


def test_engine_refuses_onnxruntime_quantized_models(assets: Path, tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    with pytest.raises(EngineError, match="quantized for ONNX Runtime.*ConvInteger"):
        trt_engine.TensorRTEngine(MODELS / "yolov8n_int8.onnx", cache_dir=tmp_path)


def test_engine_loads_ultralytics_engine_file(tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    trt, _ = fake_env
    io = [
        {"name": "images", "mode": "input", "shape": [1, 3, 640, 640], "dtype": "FLOAT", "profile": trt.profile_shapes},
        {"name": "output0", "mode": "output", "shape": [1, 84, 8400], "dtype": "FLOAT"},
    ]
    path = tmp_path / "yolo11n.engine"
    path.write_bytes(_ultralytics_engine(ULTRA_META, b"FAKEPLAN:" + json.dumps({"io": io}).encode()))
    engine = trt_engine.TensorRTEngine(path)
    try:
        assert names_from_metadata(engine.metadata) == ["person", "bicycle", "car"]
        assert engine.metadata["imgsz"] == "[640, 640]" and engine.info().precision == "fp16"
        assert [o.shape for o in engine.outputs] == [(1, 84, 8400)]
    finally:
        engine.close()


def test_engine_file_from_another_tensorrt_is_a_clear_error(tmp_path: Path, fake_env: tuple[Any, FakeCuda]) -> None:
    path = tmp_path / "old.engine"
    path.write_bytes(_ultralytics_engine(ULTRA_META, b"PLAN-FOR-TENSORRT-8.5"))
    with pytest.raises(EngineError, match="only run on the TensorRT version and GPU they were built with.*give the ONNX"):
        trt_engine.TensorRTEngine(path)
    assert fake_env[1].closed  # the context reference was released on the failed start


# -- the real thing (skipped without TensorRT and a GPU) ---------------------------------------


def test_real_tensorrt_build_and_infer(assets: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT Python bindings not installed (JetPack python3-libnvinfer or pip tensorrt)")
    try:
        cuda = trt_engine.load_cuda(0)
    except EngineError as exc:
        pytest.skip(f"no usable NVIDIA GPU / CUDA binding: {exc}")
    cuda.close()
    engine = trt_engine.TensorRTEngine(MODELS / "yolox_nano.onnx", precision="fp16", cache_dir=tmp_path)
    try:
        (out,) = engine.infer(np.zeros((1, 3, 416, 416), np.float32))
        assert out.shape == (1, 3549, 85) and np.isfinite(out).all()
        assert engine.info().provider.startswith("TensorRT ")
    finally:
        engine.close()


def test_unfinished_temporary_files_are_removed_when_old(tmp_path: Path) -> None:
    """A SIGKILL during a cache write leaves `.name.XXXX.tmp`; an old one goes, a young one may be a live build."""
    import os
    import time

    from edgelabel.engines.trtcache import remove_stale_temps

    old = tmp_path / ".m.engine.abc123.tmp"
    young = tmp_path / ".m.engine.def456.tmp"
    keep = tmp_path / "m.engine"
    for f in (old, young, keep):
        f.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert remove_stale_temps(tmp_path) == 1
    assert not old.exists() and young.exists() and keep.exists()


def test_a_cuda_failure_is_a_device_error_and_onnx_models_fall_back(
        tmp_path: Path, fake_env: tuple[Any, FakeCuda], monkeypatch: pytest.MonkeyPatch) -> None:
    """pycuda raises its own types (out of memory); they must become DeviceError, never escape as themselves."""
    from edgelabel.engines.base import DeviceError
    from edgelabel.engines.detector import load_detector

    _, cuda = fake_env

    class CudaOutOfMemory(Exception):  # what pycuda.driver.MemoryError looks like from here
        pass

    def no_memory(nbytes: int) -> Any:
        raise CudaOutOfMemory("cuMemAlloc failed: out of memory")

    monkeypatch.setattr(cuda, "alloc", no_memory)
    model = MODELS / "yolox_nano.onnx"
    with pytest.raises(DeviceError, match="TensorRT/CUDA failed: CudaOutOfMemory: cuMemAlloc failed"):
        trt_engine.TensorRTEngine(model, cache_dir=tmp_path / "engines")
    det = load_detector(model, engine="tensorrt", family="yolox", providers=["cpu"], cache_dir=str(tmp_path / "e2"))
    try:
        assert det.engine.type_name == "onnxruntime" and "CudaOutOfMemory" in det.engine_reason
    finally:
        det.close()

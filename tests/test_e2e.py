"""End to end: the daemon as a real process, a real broker, real models and footage."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import jsonschema
import pytest
from pycocotools.coco import COCO

from edgelabel.edge.records import load_schema
from tests.helpers import Collector, edgelabel, run_edgelabel

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def write_config(tmp_path: Path, assets: Path, port: int, sources: dict, model: str = "yolox_nano", **extra) -> Path:
    family = "yolox" if model == "yolox_nano" else "auto"
    cfg = {
        "device_id": "test-dev",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / f"{model}.onnx"), "family": family, "conf": 0.3},
        "sources": sources,
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": "el", "qos": 1},
        "dataset": {"path": str(tmp_path / "dataset")},
        **extra,
    }
    path = tmp_path / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def assert_valid(records: list[dict]) -> None:
    for rec in records:
        errors = sorted(VALIDATOR.iter_errors(rec), key=str)
        assert not errors, errors[0]


def test_video_every_frame_exactly_one_valid_message(tmp_path, assets, broker):
    col = Collector(broker.port)
    cfg = write_config(tmp_path, assets, broker.port, {"cars": {"uri": str(assets / "videos" / "cars.mp4")}})
    res = run_edgelabel("run", "-c", str(cfg), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert col.wait_for(lambda: len(col.labels()) >= 268, 20)
    time.sleep(0.3)
    recs = col.labels()
    assert len(recs) == 268
    assert sorted(r["frame_index"] for r in recs) == list(range(268))
    assert len({r["id"] for r in recs}) == 268
    assert_valid(recs)
    assert all(r["source"] == "cars" and r["device_id"] == "test-dev" for r in recs)
    assert all(r["model"]["family"] == "yolox" and r["model"]["provider"] == "CPUExecutionProvider" for r in recs)
    cars = sum(1 for r in recs for d in r["detections"] if d["label"] == "car")
    assert cars > 268  # a highway: several cars per frame
    # every label points at stored pixels whose sha256 it carries
    first = min(recs, key=lambda r: r["frame_index"])
    stored = tmp_path / "dataset" / first["frame_path"]
    assert stored.is_file()
    import hashlib

    assert hashlib.sha256(stored.read_bytes()).hexdigest() == first["frame_sha256"]
    assert col.last("el/test-dev/status") == b"stopped"
    assert col.last("el/test-dev/cars/status") == b"finished"
    col.close()
    coco = COCO(str(tmp_path / "dataset" / "annotations.coco.json"))
    assert len(coco.getImgIds()) == 268


def test_folder_job_with_bad_files(tmp_path, assets, broker):
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((assets / "images").glob("*.jpg")):
        shutil.copy(p, images / p.name)
    (images / "zero.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("this is not an image")
    (images / "truncated.jpg").write_bytes((assets / "images" / "bus.jpg").read_bytes()[:20000])
    col = Collector(broker.port)
    cfg = write_config(tmp_path, assets, broker.port, {"folder": {"uri": f"file://{images}/"}}, model="yolo11n_int8")
    res = run_edgelabel("run", "-c", str(cfg), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert col.wait_for(lambda: len(col.labels()) >= 6, 10)
    time.sleep(0.3)
    recs = col.labels()
    assert sorted(Path(r["frame_key"]).name for r in recs) == sorted(p.name for p in (assets / "images").glob("*.jpg"))
    assert_valid(recs)
    bus = next(r for r in recs if r["frame_key"].endswith("bus.jpg"))
    assert {d["label"] for d in bus["detections"]} == {"bus", "person"}
    assert bus["frame_path"] == str(images / "bus.jpg")  # folder images are referenced, not copied
    report = (tmp_path / "state" / "rejected.csv").read_text()
    for name in ("zero.jpg", "notes.jpg", "truncated.jpg"):
        assert name in report
    assert "rejected" in res.stderr
    col.close()


@pytest.mark.slow
def test_folder_job_resumes_after_kill9_exactly_once(tmp_path, assets, broker):
    images = tmp_path / "in"
    images.mkdir()
    sources = sorted((assets / "images").glob("*.jpg"))
    n = 60
    for i in range(n):
        shutil.copy(sources[i % len(sources)], images / f"img_{i:03d}.jpg")
    col = Collector(broker.port)
    cfg = write_config(tmp_path, assets, broker.port, {"folder": {"uri": str(images), "fps": 25}})
    ledger = tmp_path / "state" / "ledger.sqlite"

    def done() -> int:
        try:
            with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1) as db:
                return db.execute("SELECT COUNT(*) FROM done").fetchone()[0]
        except sqlite3.Error:
            return 0

    kills = 0
    for target in (12, 30):
        proc = edgelabel("run", "-c", str(cfg))
        deadline = time.time() + 60
        while done() < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 2 and done() < n
    res = run_edgelabel("run", "-c", str(cfg), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already labeled in a previous run" in res.stderr
    assert col.wait_for(lambda: len({r["id"] for r in col.labels()}) >= n, 15)
    time.sleep(0.5)
    recs = col.labels()
    ids = {r["id"] for r in recs}
    keys = {r["frame_key"] for r in recs}
    assert len(ids) == n and len(keys) == n  # every image labeled, de-duplicated by id
    assert len(recs) - n <= 4  # only frames in flight at a kill may be redelivered (same id)
    assert done() == n
    with sqlite3.connect(tmp_path / "dataset" / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    coco = COCO(str(tmp_path / "dataset" / "annotations.coco.json"))
    names = [img["file_name"] for img in coco.dataset["images"]]
    assert len(names) == n == len(set(names))
    col.close()


def test_sigterm_flushes_and_absent_camera_does_not_block_others(tmp_path, assets, broker):
    col = Collector(broker.port)
    sources = {
        "cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 30},
        "usb": {"uri": "v4l2:///dev/video99", "reconnect": {"initial": 0.2, "max": 1}},
    }
    # a looped video is a stand-in camera (the live capture policy samples it): keep every frame here, so that
    # the dataset can be compared with what was published
    cfg = write_config(tmp_path, assets, broker.port, sources,
                       dataset={"path": str(tmp_path / "dataset"), "capture": {"sources": {"cars": {}}}})
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert col.wait_for(lambda: len(col.on("/cars/labels")) >= 40, 60), "video source stalled"
        assert col.wait_for(lambda: col.last("el/test-dev/usb/status") in (b"offline", b"reconnecting"), 10)
        assert col.last("el/test-dev/status") == b"online"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert col.wait_for(lambda: col.last("el/test-dev/status") == b"stopped", 10)
    published = len(col.labels())
    with sqlite3.connect(tmp_path / "dataset" / "index.sqlite") as db:
        stored = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert stored == published  # nothing inferred was lost on the way out
    col.close()


def test_missing_model_one_line_exit_2(tmp_path, assets):
    res = run_edgelabel("label", str(assets / "images" / "bus.jpg"), "--model", str(tmp_path / "nope.onnx"),
                        "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope.onnx" in lines[0] and "not found" in lines[0]


def test_not_a_detector_one_line_exit_2(tmp_path, assets):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    res = run_edgelabel("label", str(assets / "images" / "bus.jpg"), "--model", str(fake), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    err_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("edgelabel:")]
    assert len(err_lines) == 1 and "fake.onnx" in err_lines[0], res.stderr


def test_label_command_writes_dataset_and_summary(tmp_path, assets):
    out = tmp_path / "out"
    res = run_edgelabel("label", str(assets / "images"), "--model", str(assets / "models" / "yolo11n_int8.onnx"),
                        "--out", str(out), "--conf", "0.3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "labeled 6 frame(s)" in res.stdout and "person" in res.stdout
    coco = COCO(str(out / "annotations.coco.json"))
    assert len(coco.getImgIds()) == 6
    assert (out / "classes.txt").read_text().splitlines()[0] == "person"
    assert all("score" in a for a in coco.dataset["annotations"])
    assert len(list((out / "labels").rglob("*.txt"))) == 6

"""DatasetSink: stored pixels, YOLO txt, COCO JSON (checked with pycocotools), idempotence, disk errors."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import sqlite3
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pycocotools.coco import COCO

from edgelabel.edge.config import CaptureConfig, CaptureSection, DatasetConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id
from edgelabel.edge.sinks.dataset import DatasetSink
from edgelabel.engines.base import Detection

DEVICE = "edge-test-01"
NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]
MODEL = ModelInfo(
    name="yolo11n_int8",
    sha256=hashlib.sha256(b"yolo11n_int8.onnx test stand-in").hexdigest(),
    family="yolov8",
    engine="onnxruntime",
    provider="CPUExecutionProvider",
    precision="int8",
    input_size=(640, 640),
)
#: these tests are about storage, not sampling: keep every camera frame too (the default samples cameras)
EVERY_FRAME = CaptureSection(live=CaptureConfig())
YOLO_LINE = re.compile(r"^\d+ [01]\.\d{6} [01]\.\d{6} [01]\.\d{6} [01]\.\d{6}$")


def folder_frame(path: Path, index: int, source: str = "folder") -> Frame:
    image = cv2.imread(str(path))
    assert image is not None, path
    return Frame(source, index, image, 1_700_000_000.0 + index, str(path), path=str(path))


def camera_frame(index: int, shape: tuple[int, int] = (120, 160), source: str = "cam1") -> Frame:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ts = 1_700_000_100.0 + index / 25
    return Frame(source, index, image, ts, f"rtsp://10.0.0.7/main@{int(ts * 1e9)}", live=True)


def make_record(frame: Frame, dets: list[Detection]) -> LabelRecord:
    """What the pipeline builds for a frame (frame_path starts as the original file, if any)."""
    w, h = frame.width, frame.height
    return LabelRecord(
        id=record_id(DEVICE, frame.source, frame.key),
        device_id=DEVICE,
        source=frame.source,
        frame_index=frame.index,
        frame_key=frame.key,
        captured_at=iso_utc(frame.captured_at),
        captured_ts=frame.captured_at,
        width=w,
        height=h,
        model=MODEL,
        inference_ms=23.4,
        detections=[DetectionRecord.from_detection(d, w, h) for d in dets],
        frame_path=frame.path,
    )


def put(sink: DatasetSink, frame: Frame, dets: list[Detection]) -> LabelRecord:
    rec = make_record(frame, dets)
    sink.prepare(rec, frame)
    sink.write(rec, frame)
    return rec


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def yolo_expected(box: tuple[float, float, float, float], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]


def read_yolo(path: Path) -> list[tuple[int, list[float]]]:
    text = path.read_text()
    out = []
    for line in text.splitlines():
        assert YOLO_LINE.match(line), line
        cls, *vals = line.split()
        out.append((int(cls), [float(v) for v in vals]))
    return out


def test_folder_and_camera_frames_make_a_consistent_dataset(tmp_path: Path, assets: Path) -> None:
    root = tmp_path / "ds"
    sink = DatasetSink(DatasetConfig(path=str(root), image_format="png", capture=EVERY_FRAME), root, NAMES, "yolo11n_int8")
    sink.open()
    bus_dets = [Detection(0, "person", 0.91, (50.0, 400.0, 250.0, 900.0)), Detection(5, "bus", 0.88, (10.0, 230.0, 800.0, 750.0))]
    bus = put(sink, folder_frame(assets / "images" / "bus.jpg", 0), bus_dets)
    empty = put(sink, folder_frame(assets / "images" / "zidane.jpg", 1), [])
    cam_frame = camera_frame(7)
    cam_dets = [Detection(2, "car", 0.6543, (10.5, 20.25, 60.0, 100.0))]
    cam = put(sink, cam_frame, cam_dets)
    sink.close()

    # pixels: camera frames are stored (png: lossless), folder images are referenced
    short = cam.id[:8]
    assert cam.frame_path == f"images/cam1/00000007_{short}.png"
    stored = root / cam.frame_path
    assert sha256(stored) == cam.frame_sha256
    assert np.array_equal(cv2.imread(str(stored)), cam_frame.image)
    assert bus.frame_path == str(assets / "images" / "bus.jpg")
    assert bus.frame_sha256 == sha256(assets / "images" / "bus.jpg")
    assert not (root / "images" / "folder").exists()
    assert sorted(p.name for p in root.rglob("*.tmp")) == []

    # YOLO
    bus_txt = root / "labels" / "folder" / f"bus_{bus.id[:8]}.txt"
    got = read_yolo(bus_txt)
    assert [c for c, _ in got] == [0, 5]
    for (_, vals), det in zip(got, bus_dets, strict=True):
        assert vals == pytest.approx(yolo_expected(det.box, 810, 1080), abs=1e-6)
        assert all(0.0 <= v <= 1.0 for v in vals)
    assert (root / "labels" / "folder" / f"zidane_{empty.id[:8]}.txt").read_text() == ""
    (cls, vals), = read_yolo(root / "labels" / "cam1" / f"00000007_{short}.txt")
    assert cls == 2 and vals == pytest.approx(yolo_expected(cam_dets[0].box, 160, 120), abs=1e-6)
    assert (root / "classes.txt").read_text().splitlines() == NAMES
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data == {"path": str(root.resolve()), "train": "images", "val": "images", "names": dict(enumerate(NAMES))}

    # COCO
    coco = COCO(str(root / "annotations.coco.json"))
    assert [c["id"] for c in coco.dataset["categories"]] == list(range(1, len(NAMES) + 1))
    assert coco.cats[6]["name"] == "bus" and coco.cats[6]["edgelabel_class_id"] == 5
    images = {img["edgelabel_record_id"]: img for img in coco.dataset["images"]}
    assert set(images) == {bus.id, empty.id, cam.id}
    assert images[bus.id]["file_name"] == str(assets / "images" / "bus.jpg")
    assert images[bus.id]["edgelabel_label_file"] == f"labels/folder/bus_{bus.id[:8]}.txt"
    assert (images[bus.id]["width"], images[bus.id]["height"]) == (810, 1080)
    assert images[cam.id]["file_name"] == cam.frame_path and images[cam.id]["captured_at"] == cam.captured_at
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[images[bus.id]["id"]]))
    assert [a["category_id"] for a in anns] == [1, 6]
    assert anns[0]["bbox"] == pytest.approx([50.0, 400.0, 200.0, 500.0])
    assert anns[0]["area"] == pytest.approx(200.0 * 500.0) and anns[0]["score"] == pytest.approx(0.91)
    assert all(a["iscrowd"] == 0 and a["segmentation"] == [] for a in anns)
    assert coco.getAnnIds(imgIds=[images[empty.id]["id"]]) == []
    (cam_ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[images[cam.id]["id"]]))
    assert cam_ann["bbox"] == pytest.approx([10.5, 20.25, 49.5, 79.75]) and cam_ann["score"] == pytest.approx(0.6543)
    # usable as a predictions file too (scores are kept)
    preds = coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in coco.dataset["annotations"]])
    assert len(preds.getAnnIds()) == 3

    with sqlite3.connect(root / "index.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 3
    st = sink.status()
    assert (st["images"], st["annotations"], st["errors"], st["ok"]) == (3, 3, 0, True)
    assert st["path"] == str(root) and st["last_write_at"] is not None


def test_same_record_twice_leaves_one_image_and_one_annotation_set(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    cfg = DatasetConfig(path=str(root), image_format="jpg", jpeg_quality=90, capture=EVERY_FRAME)
    frame = camera_frame(3, shape=(96, 128))
    dets = [Detection(0, "person", 0.8, (5.0, 6.0, 50.0, 90.0)), Detection(7, "truck", 0.4, (60.0, 10.0, 127.0, 80.0))]
    sink = DatasetSink(cfg, root, NAMES, "m")
    sink.open()
    first = put(sink, frame, dets)
    put(sink, frame, dets)
    again = make_record(frame, dets)
    sink.write(again, frame)  # without prepare: the sink decides the pixels itself
    sink.close()
    restarted = DatasetSink(cfg, root, NAMES, "m")  # after a crash the frame is processed again
    restarted.open()
    assert restarted.status()["images"] == 1 and restarted.status()["annotations"] == 2
    last = put(restarted, frame, dets)
    restarted.close()

    assert first.frame_path == last.frame_path == again.frame_path
    assert first.frame_sha256 == last.frame_sha256
    assert [p.name for p in (root / "images" / "cam1").iterdir()] == [Path(first.frame_path).name]
    assert len(list((root / "labels").rglob("*.txt"))) == 1
    stored = root / first.frame_path
    assert sha256(stored) == last.frame_sha256
    assert cv2.imread(str(stored)).shape == frame.image.shape
    coco = COCO(str(root / "annotations.coco.json"))
    assert len(coco.getImgIds()) == 1 and len(coco.getAnnIds()) == 2
    assert restarted.status()["images"] == 1 and restarted.status()["annotations"] == 2


def test_save_images_always_never_and_formats(tmp_path: Path, assets: Path) -> None:
    bus_path = assets / "images" / "bus.jpg"
    det = [Detection(5, "bus", 0.9, (10.0, 230.0, 800.0, 750.0))]

    always = tmp_path / "always"
    sink = DatasetSink(DatasetConfig(save_images="always", formats=["yolo"]), always, NAMES, "m")
    sink.open()
    rec = put(sink, folder_frame(bus_path, 0), det)
    sink.close()
    assert rec.frame_path == f"images/folder/bus_{rec.id[:8]}.jpg" and sha256(always / rec.frame_path) == rec.frame_sha256
    assert (always / "labels" / "folder" / f"bus_{rec.id[:8]}.txt").is_file()
    assert not (always / "annotations.coco.json").exists()  # coco not asked for

    never = tmp_path / "never"
    sink = DatasetSink(DatasetConfig(save_images="never", formats=["coco"], capture=EVERY_FRAME), never, NAMES, "m")
    sink.open()
    cam = put(sink, camera_frame(1), det[:0])
    ref = put(sink, folder_frame(bus_path, 0), det)
    sink.close()
    assert cam.frame_path is None and cam.frame_sha256 is None
    assert ref.frame_path == str(bus_path) and ref.frame_sha256 == sha256(bus_path)
    assert not (never / "images").exists() and not (never / "labels").exists() and not (never / "classes.txt").exists()
    coco = json.loads((never / "annotations.coco.json").read_text())
    names = sorted(img["file_name"] for img in coco["images"])
    assert names == sorted([cam.frame_key, str(bus_path)])


def test_coco_rewrites_are_rate_limited(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink = DatasetSink(DatasetConfig(coco_interval=3600, capture=EVERY_FRAME), root, NAMES, "m")
    sink.open()
    put(sink, camera_frame(0, (32, 32)), [])
    coco_path = root / "annotations.coco.json"
    assert len(json.loads(coco_path.read_text())["images"]) == 1  # the first write publishes a file at once
    for i in range(1, 20):
        put(sink, camera_frame(i, (32, 32)), [])
    assert len(json.loads(coco_path.read_text())["images"]) == 1  # not rewritten per frame
    sink.flush()
    assert len(json.loads(coco_path.read_text())["images"]) == 20
    sink.close()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 512 KiB tmpfs, so the disk can really fill up (and be remounted read-only)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_disk_full_and_read_only_are_reported_and_recovered(small_fs: Path, assets: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.dataset")
    root = small_fs / "ds"
    sink = DatasetSink(DatasetConfig(image_format="png", capture=EVERY_FRAME, min_free_bytes=0), root, NAMES, "m")
    sink.open()
    det = [Detection(2, "car", 0.7, (1.0, 2.0, 30.0, 40.0))]
    ok_rec = put(sink, camera_frame(0, (48, 64)), det)  # the first write also writes the COCO file
    ok_rec2 = put(sink, camera_frame(9, (48, 64)), det)  # indexed; COCO not due for coco_interval (10 s)
    assert sink.status()["ok"]

    filler = small_fs / "filler.bin"
    fill(filler)
    lost_frame = camera_frame(1, (64, 64))
    lost = put(sink, lost_frame, det)  # must not raise
    ref = put(sink, folder_frame(assets / "images" / "bus.jpg", 0), det)  # label + index only, no copy
    sink.flush()  # the COCO rewrite fails too
    st = sink.status()
    assert st["ok"] is False and st["errors"] == 3 and "No space left on device" in st["last_error"]
    assert st["last_error"].startswith(str(root / "annotations.coco.json"))
    assert lost.frame_path is None and lost.frame_sha256 is None  # the record never names missing pixels
    assert not list(root.rglob("*.tmp")), "partial files left behind"
    assert not (root / "images" / "cam1" / f"00000001_{lost.id[:8]}.png").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and str(root) in errors[0] and "No space left on device" in errors[0] and "ENOSPC" in errors[0]
    assert len(COCO(str(root / "annotations.coco.json")).getImgIds()) == 1  # the old file survived intact

    filler.unlink()  # space returns
    again = put(sink, lost_frame, det)
    sink.flush()
    assert sink.status()["ok"] is True
    assert sha256(root / again.frame_path) == again.frame_sha256
    coco = COCO(str(root / "annotations.coco.json"))
    assert {img["edgelabel_record_id"] for img in coco.dataset["images"]} == {ok_rec.id, ok_rec2.id, again.id}
    assert ref.id not in {img["edgelabel_record_id"] for img in coco.dataset["images"]}

    sink.close()

    # a read-only disk at start-up (Linux refuses a read-only remount while files are open for writing)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    ro = DatasetSink(DatasetConfig(image_format="png", capture=EVERY_FRAME, min_free_bytes=0), root, NAMES, "m")
    ro.open()  # must not raise
    put(ro, camera_frame(2, (48, 64)), det)
    st = ro.status()
    assert st["ok"] is False and st["errors"] >= 2
    assert "Read-only file system" in st["last_error"] or "readonly" in st["last_error"]
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    put(ro, camera_frame(3, (48, 64)), det)  # the index is opened again on this write
    ro.close()
    st = ro.status()
    assert st["ok"] is True and st["images"] == 4 and st["annotations"] == 4
    assert len(COCO(str(root / "annotations.coco.json")).getImgIds()) == 4


def test_unfinished_writes_of_a_killed_run_are_removed_at_open(tmp_path):
    """A kill between write and rename leaves `.name.xxxxxxxx.tmp`; the next open removes old ones only."""
    import os
    import time

    from edgelabel.edge.sinks.dataset import DatasetIndex, remove_unfinished_writes

    root = tmp_path / "ds"
    (root / "images" / "cam").mkdir(parents=True)
    old = root / "images" / "cam" / ".00000007_abcd1234.jpg.0123abcd.tmp"
    young = root / "images" / "cam" / ".00000008_abcd1234.jpg.4567cdef.tmp"
    mine = root / "images" / "cam" / "notes.tmp"  # not ours: never touched
    for f in (old, young, mine):
        f.write_bytes(b"half an image")
    past = time.time() - 7200
    os.utime(old, (past, past))
    index = DatasetIndex(root)
    index.open()
    index.close()
    assert not old.exists() and young.exists() and mine.exists()
    assert remove_unfinished_writes(root, older_than=0.0) == 1 and not young.exists()

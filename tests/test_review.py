"""Review: the queue, decisions and their files, crash repair, the quota's tiers, MQTT, and the web API."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest
import yaml
from flask import Flask
from pycocotools.coco import COCO

from edgelabel.edge.config import CaptureConfig, CaptureSection, Config, DatasetConfig, MqttConfig, config_from_dict
from edgelabel.edge.frame import Frame
from edgelabel.edge.records import LabelRecord
from edgelabel.edge.review import ReviewError, ReviewStore, clean_reviewer, diff_boxes, load_schema, same_boxes
from edgelabel.edge.sinks.dataset import INDEX_FILE, DatasetSink, VersionConflict, yolo_text
from edgelabel.edge.sinks.mqtt import MqttSink
from edgelabel.web.app import create_app
from edgelabel.web.sink import WebSink
from tests.fuzzing import examples
from tests.helpers import NAMES, Collector, label_record

DEVICE = "review-dev"
TOKEN = "review-test-token-0123456789abcdef"
SECRET_KEY = "review-secret-key-" + "x" * 32
#: every camera frame enters the dataset, and every one needs review
REVIEW_ALL = CaptureSection(live=CaptureConfig(review="all"), storage=CaptureConfig(review="all"))
SCORES = [0.9, 0.55, 0.7, 0.35, 0.48, 0.8]  # uncertainty 1 - |2s - 1|: .2 .9 .6 .7 .96 .4


def camera_frame(index: int, shape: tuple[int, int] = (96, 128), source: str = "cam") -> Frame:
    image = np.random.default_rng(index).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ts = 1_800_000_000.0 + index
    return Frame(source, index, image, ts, f"rtsp://10.0.0.9/s@{int(ts * 1e9)}", live=True)


def frame_dets(i: int) -> list[tuple[int, float, tuple[float, float, float, float]]]:
    return [(0, SCORES[i % len(SCORES)], (10.0, 12.0, 50.0, 80.0)), (2, 0.95, (60.0, 20.0, 120.0, 70.0))]


def put(sink: DatasetSink, frame: Frame, dets: Any) -> LabelRecord:
    rec = label_record(frame, dets, DEVICE)
    sink.prepare(rec, frame)
    sink.write(rec, frame)
    return rec


def build(root: Path, n: int = 6, capture: CaptureSection = REVIEW_ALL, **extra: Any) -> tuple[DatasetSink, list[LabelRecord]]:
    cfg = DatasetConfig(path=str(root), capture=capture, min_free_bytes=extra.pop("min_free_bytes", 0), **extra)
    sink = DatasetSink(cfg, root, NAMES, "yolo11n_int8")
    sink.open()
    recs = [put(sink, camera_frame(i), frame_dets(i)) for i in range(n)]
    sink.flush()
    return sink, recs


def yolo_lines(root: Path, rel: str) -> list[list[float]]:
    return [[float(v) for v in ln.split()] for ln in (root / rel).read_text().splitlines()]


def coco_images(root: Path) -> dict[str, dict[str, Any]]:
    coco = COCO(str(root / "annotations.coco.json"))
    out = {}
    for img in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        out[img["edgelabel_record_id"]] = {**img, "anns": anns}
    return out


def assert_files_match_index(root: Path) -> None:
    """Every row's YOLO file says what the index says; COCO lists exactly the rows that are not rejected."""
    with sqlite3.connect(root / INDEX_FILE) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM records").fetchall()
    for r in rows:
        label = root / r["label_path"]
        assert r["synced"] == 1
        if r["state"] == "rejected":
            assert not label.exists()
            assert not (root / r["image_path"]).exists() and (root / "rejected" / r["image_path"]).is_file()
        else:
            assert label.read_text() == yolo_text(json.loads(r["detections"]), r["width"], r["height"])
            assert (root / r["image_path"]).is_file()
    images = coco_images(root)
    assert set(images) == {r["id"] for r in rows if r["state"] != "rejected"}
    for r in rows:
        if r["state"] != "rejected":
            img = images[r["id"]]
            assert img["edgelabel_review_state"] == r["state"] and img["edgelabel_reviewed_by"] == r["reviewed_by"]
            assert sorted(a["category_id"] - 1 for a in img["anns"]) == sorted(d["class_id"] for d in json.loads(r["detections"]))
    assert not list(root.rglob("*.tmp"))


# --------------------------------------------------------------------------- the store


def test_queue_is_most_uncertain_first(tmp_path: Path) -> None:
    sink, recs = build(tmp_path / "ds")
    store = ReviewStore(sink.index)
    q = store.queue()
    assert q["total"] == 6 and [it["id"] for it in q["items"]] == [recs[i].id for i in (4, 1, 3, 2, 5, 0)]
    assert [it["uncertainty"] for it in q["items"]] == pytest.approx([0.96, 0.9, 0.7, 0.6, 0.4, 0.2])
    assert store.queue(limit=2, offset=1)["items"][0]["id"] == recs[1].id
    assert store.counts()["needs_review"] == 6 and store.next_id(recs[4].id) == recs[1].id
    with pytest.raises(ReviewError):
        store.queue(state="bogus")
    sink.close()


def test_decisions_rewrite_the_files_at_once(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, recs = build(root)
    published: list[dict[str, Any]] = []
    store = ReviewStore(sink.index, publish=lambda doc: published.append(doc) or True)
    a, b, c, d = (r.id for r in recs[:4])

    res = store.decide(a, "accept", by="alice")
    assert res["published"] and res["item"]["state"] == "accepted" and res["item"]["reviewed_by"] == "alice"
    assert res["item"]["version"] == 2 and res["item"]["history"][-1]["action"] == "accept"

    # change a class: corrected, the YOLO file and the COCO file say so before any flush
    item = store.item(b)
    dets = item["detections"]
    dets[0]["class_id"] = 1
    res = store.decide(b, "update", by="bob", detections=dets, version=item["version"])
    assert res["item"]["state"] == "corrected" and res["item"]["detections"][0]["label"] == "bicycle"
    assert [int(ln[0]) for ln in yolo_lines(root, res["item"]["history"] and store.index.row(b)["label_path"])] == [1, 2]
    coco_b = coco_images(root)[b]
    assert sorted(a_["category_id"] for a_ in coco_b["anns"]) == [2, 3] and coco_b["edgelabel_review_state"] == "corrected"
    # the detector's boxes are kept beside the corrected ones
    assert [m["class_id"] for m in res["item"]["model_detections"]] == [0, 2]
    # undoing the edit by hand makes it accepted again
    back = [{**dets[0], "class_id": 0}, dets[1]]
    assert store.decide(b, "update", by="bob", detections=back)["item"]["state"] == "accepted"

    # delete a box, move one, draw one: each saved, scores kept on the detector's box, none on the drawn one
    item = store.item(d)
    moved = {**item["detections"][1], "box": [70.0, 25.0, 125.0, 80.0]}
    drawn = {"class_id": 7, "box": [1.0, 1.0, 30.0, 40.0]}
    res = store.decide(d, "update", detections=[moved, drawn], version=item["version"])
    got = res["item"]["detections"]
    assert res["item"]["state"] == "corrected" and res["item"]["reviewed_by"] == "operator"
    assert [(g["label"], g["score"]) for g in got] == [("car", 0.95), ("truck", None)]
    lines = yolo_lines(root, store.index.row(d)["label_path"])
    assert [int(ln[0]) for ln in lines] == [2, 7]
    assert lines[0][1:] == pytest.approx([97.5 / 128, 52.5 / 96, 55 / 128, 55 / 96], abs=1e-6)
    anns = coco_images(root)[d]["anns"]
    assert [("score" in x) for x in anns] == [True, False]
    assert json.loads(store.index.db.execute("SELECT detail FROM review_log WHERE record_id = ? ORDER BY seq DESC",
                                             (d,)).fetchone()[0])["changes"] == {
        "kept": 0, "reclassed": 0, "moved": 1, "removed": 1, "added": 1}

    # reject: out of the training data; reopen brings it back as it was
    row = store.index.row(c)
    res = store.decide(c, "reject", by="carol")
    assert res["item"]["state"] == "rejected" and res["item"]["image_available"]
    assert not (root / row["label_path"]).exists() and not (root / row["image_path"]).exists()
    assert (root / "rejected" / row["image_path"]).is_file() and c not in coco_images(root)
    assert store.image_path(c) == root / "rejected" / row["image_path"]
    assert_files_match_index(root)
    res = store.decide(c, "reopen", by="carol")
    assert res["item"]["state"] == "needs_review" and (root / row["image_path"]).is_file() and (root / row["label_path"]).is_file()
    assert_files_match_index(root)

    assert [p["action"] for p in published] == ["accept", "update", "update", "update", "reject", "reopen"]
    schema = load_schema()
    for doc in published:
        jsonschema.validate({**doc, "device_id": DEVICE}, schema)
    assert published[1]["detections"][0]["box_norm"] == pytest.approx([10 / 128, 12 / 96, 50 / 128, 80 / 96], abs=1e-6)
    assert store.counts() == {"auto_accepted": 0, "needs_review": 3, "accepted": 2, "corrected": 1, "rejected": 0}
    sink.close()


def test_bad_decisions_are_refused_and_change_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, recs = build(root, n=2)
    store = ReviewStore(sink.index)
    rid = recs[0].id
    before = store.item(rid)
    bad = [
        ("update", None, "update needs"),
        ("update", [{"class_id": 8, "box": [1, 1, 9, 9]}], "not a class"),
        ("update", [{"class_id": True, "box": [1, 1, 9, 9]}], "not a class"),
        ("update", [{"class_id": 0, "box": [1, 1, 9]}], "expected [x1, y1, x2, y2]"),
        ("update", [{"class_id": 0, "box": [1, 1, float("nan"), 9]}], "expected [x1, y1, x2, y2]"),
        ("update", [{"class_id": 0, "box": [500, 500, 600, 600]}], "smaller than"),
        ("update", "boxes", "must be a list"),
        ("approve", None, "unknown action"),
    ]
    for action, dets, msg in bad:
        with pytest.raises(ReviewError, match=re.escape(msg)):
            store.decide(rid, action, detections=dets)
    with pytest.raises(VersionConflict) as conflict:
        store.decide(rid, "accept", version=7)
    assert conflict.value.current == 1
    with pytest.raises(KeyError):
        store.decide("00000000-0000-5000-8000-000000000000", "accept")
    assert store.item(rid) == before
    # boxes are clipped into the frame and sorted; a reversed box is fine
    res = store.decide(rid, "update", detections=[{"class_id": 0, "box": [140, 100, -5, 50], "score": 7}])
    assert res["item"]["detections"] == [{"class_id": 0, "label": "person", "score": None, "box": [0.0, 50.0, 128.0, 96.0]}]
    assert clean_reviewer(" a\nb\x00 " + "x" * 100) == ("a b " + "x" * 100)[:64] and clean_reviewer("\t") == "operator"
    sink.close()


def test_box_helpers() -> None:
    a = [{"class_id": 0, "box": [0, 0, 10, 10]}, {"class_id": 2, "box": [20, 20, 40, 40]}]
    assert same_boxes(a, list(reversed(a))) and same_boxes(a, [{**a[0], "box": [0.4, 0, 10, 10]}, a[1]])
    assert not same_boxes(a, a[:1]) and not same_boxes(a, [{**a[0], "class_id": 1}, a[1]])
    assert diff_boxes(a, [a[1], {"class_id": 5, "box": [0, 0, 10, 10]}, {"class_id": 1, "box": [60, 60, 70, 70]}]) == {
        "kept": 1, "reclassed": 1, "moved": 0, "removed": 0, "added": 1}


def test_a_frame_labeled_again_never_undoes_a_review(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, recs = build(root, n=3)
    store = ReviewStore(sink.index)
    item = store.item(recs[0].id)
    store.decide(recs[0].id, "update", detections=item["detections"][:1])
    store.decide(recs[1].id, "reject")
    label = root / store.index.row(recs[0].id)["label_path"]
    text = label.read_text()
    for i in range(3):  # the same frames come through the pipeline again (a restart, --fresh)
        again = put(sink, camera_frame(i), frame_dets(i))
        if i == 0:
            assert again.frame_path == store.index.row(recs[0].id)["image_path"]
    sink.flush()
    assert label.read_text() == text and store.item(recs[0].id)["state"] == "corrected"
    assert store.item(recs[1].id)["state"] == "rejected" and store.item(recs[2].id)["state"] == "needs_review"
    assert not (root / store.index.row(recs[1].id)["image_path"]).exists()  # still out of images/
    assert_files_match_index(root)
    sink.close()


def test_an_interrupted_decision_is_completed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, recs = build(root, n=2)
    sink.close()
    # a crash after the index committed a rejection, before its files were touched
    with sqlite3.connect(root / INDEX_FILE) as db:
        db.execute("UPDATE records SET state = 'rejected', synced = 0, version = version + 1 WHERE id = ?", (recs[0].id,))
        db.execute("UPDATE records SET detections = '[]', n_detections = 0, state = 'corrected', synced = 0 WHERE id = ?",
                   (recs[1].id,))
    again = DatasetSink(DatasetConfig(path=str(root), capture=REVIEW_ALL, min_free_bytes=0), root, NAMES, "m")
    again.open()
    again.flush()
    assert_files_match_index(root)
    assert (root / again.index.row(recs[1].id)["label_path"]).read_text() == ""
    again.close()


def test_an_index_from_before_review_is_migrated(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "labels" / "cam").mkdir(parents=True)
    with sqlite3.connect(root / INDEX_FILE) as db:  # the schema of the previous version, one row
        db.execute("""CREATE TABLE records (id TEXT PRIMARY KEY, source TEXT NOT NULL, frame_key TEXT NOT NULL,
            frame_index INTEGER NOT NULL, image_path TEXT, label_path TEXT NOT NULL, width INTEGER NOT NULL,
            height INTEGER NOT NULL, captured_at TEXT NOT NULL, detections TEXT NOT NULL, n_detections INTEGER NOT NULL,
            created REAL NOT NULL)""")
        dets = [{"class_id": 2, "label": "car", "score": 0.5, "box": [1.0, 2.0, 30.0, 40.0]}]
        db.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   ("6b1d6f7c-0000-5000-8000-000000000001", "cam", "k", 0, None, "labels/cam/a.txt", 64, 48,
                    "2026-01-01T00:00:00.000Z", json.dumps(dets), 1, 1.0))
    (root / "classes.txt").write_text("person\nbicycle\ncar\n")
    store = ReviewStore.open(root)
    try:
        assert store.names == ["person", "bicycle", "car"]
        item = store.item("6b1d6f7c-0000-5000-8000-000000000001")
        assert item["state"] == "auto_accepted" and item["version"] == 1 and not item["image_available"]
        res = store.decide(item["id"], "update", detections=[{**dets[0], "class_id": 0}])
        assert res["item"]["state"] == "corrected" and res["item"]["model_detections"] == dets  # the old boxes kept
        assert (root / "labels/cam/a.txt").read_text().startswith("0 ")
        assert COCO(str(root / "annotations.coco.json")).dataset["images"][0]["edgelabel_review_state"] == "corrected"
    finally:
        store.close()


def test_decisions_and_frames_from_two_threads_stay_consistent(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, recs = build(root, n=10, coco_interval=0.0)
    store = ReviewStore(sink.index)
    errors: list[BaseException] = []

    def reviewer() -> None:
        try:
            for k in range(60):
                rid = recs[k % 10].id
                item = store.item(rid)
                action = ("accept", "update", "reject", "reopen")[k % 4]
                dets = [{**item["detections"][0], "class_id": k % 8}] if action == "update" and item["detections"] else None
                store.decide(rid, action if dets is not None or action != "update" else "accept", detections=dets)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reviewer)
    t.start()
    for i in range(10, 70):  # the sink thread keeps adding frames meanwhile
        put(sink, camera_frame(i), frame_dets(i))
    t.join(60)
    sink.flush()
    assert not errors, errors
    assert_files_match_index(root)
    counts = sink.status()
    with sqlite3.connect(root / INDEX_FILE) as db:
        assert counts["images"] == db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 70
        assert counts["annotations"] == db.execute("SELECT SUM(n_detections) FROM records").fetchone()[0]
        for state, n in db.execute("SELECT state, COUNT(*) FROM records GROUP BY state"):
            assert counts["states"][state] == n
    sink.close()


# --------------------------------------------------------------------------- quota


def test_rotation_goes_rejected_auto_review_then_reviewed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ds"
    mixed = CaptureSection(live=CaptureConfig(every_n=1, near_threshold=None, review="none"))
    sink, recs = build(root, n=8, capture=mixed)  # all auto_accepted, oldest first: 0..7
    store = ReviewStore(sink.index)
    for i, action in ((0, "accept"), (1, "reject"), (2, "reopen"), (3, "update"), (5, "reject")):
        item = store.item(recs[i].id)
        store.decide(recs[i].id, action, detections=item["detections"][:1] if action == "update" else None)
    states = {r.id: store.item(r.id)["state"] for r in recs}
    assert [states[r.id] for r in recs] == ["accepted", "rejected", "needs_review", "corrected", "auto_accepted",
                                             "rejected", "auto_accepted", "auto_accepted"]
    assert sink.index.rotate(free_bytes=10**9, keep_reviewed=True).removed == 6  # the disk guard's way: 0 and 3 stay
    assert {x["frame_index"] for x in sink.index.select()} == {0, 3}
    sink.close()
    sink, recs = build(root := tmp_path / "again", n=8, capture=mixed)
    store = ReviewStore(sink.index)
    for i, action in ((0, "accept"), (1, "reject"), (2, "reopen"), (3, "update"), (5, "reject")):
        item = store.item(recs[i].id)
        store.decide(recs[i].id, action, detections=item["detections"][:1] if action == "update" else None)
    order: list[int] = []
    for _ in range(8):
        images = sink.index.counts()["images"]
        result = sink.index.rotate(max_images=images - 1) if images > 1 else sink.index.rotate(free_bytes=1)
        assert result.removed == 1
        order.append(next(r.frame_index for r in recs
                          if r.id not in {x["id"] for x in sink.index.select()} and r.frame_index not in order))
    assert order == [1, 5, 4, 6, 7, 2, 0, 3]  # rejected, auto (oldest first), needs_review, then accepted/corrected
    assert not list((root / "images").rglob("*.jpg")) and not list((root / "rejected").rglob("*.jpg"))
    assert not list((root / "labels").rglob("*.txt"))
    sink.close()

    # through the sink: a quota full of reviewed frames turns new auto frames away; lowering it removes
    # the oldest reviewed frame, with a warning
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.dataset")
    root2 = tmp_path / "ds2"
    sink, recs = build(root2, n=3, capture=mixed, max_images=3)
    store = ReviewStore(sink.index)
    for r in recs:
        store.decide(r.id, "accept")
    put(sink, camera_frame(3), frame_dets(3))
    assert {x["frame_index"] for x in sink.index.select()} == {0, 1, 2}  # the new auto frame went first
    assert sink.status()["quota"]["rotated"] == 1 and sink.status()["quota"]["rotated_reviewed"] == 0
    assert any("quota is taken by frames" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert any("quota (max_images) reached" in r.getMessage() for r in caplog.records)
    sink.cfg.max_images = 2
    put(sink, camera_frame(4), frame_dets(4))
    assert {x["frame_index"] for x in sink.index.select()} == {1, 2}
    assert sink.status()["quota"]["rotated_reviewed"] == 1
    assert any("accepted or corrected" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    sink.flush()  # rotations mark the COCO file for the next (rate-limited) rewrite
    assert_files_match_index(root2)
    sink.close()


def test_incremental_coco_survives_a_reused_rowid(tmp_path: Path) -> None:
    """SQLite gives the rowid of a deleted last row to the next one: the COCO cache must not serve the old row."""
    root = tmp_path / "ds"
    sink, recs = build(root, n=3, capture=CaptureSection(live=CaptureConfig()), coco_interval=0.0)
    newest = sink.index.row(recs[2].id)
    with sink.index.lock, sink.index.db:  # the newest frame leaves (as a full quota does with a new auto frame)
        sink.index.db.execute("DELETE FROM records WHERE id = ?", (recs[2].id,))
    other = put(sink, camera_frame(9), [(7, 0.6, (1.0, 1.0, 20.0, 20.0))])
    assert sink.index.row(other.id)["rowid"] == newest["rowid"]  # the same rowid, another frame
    sink.flush()
    images = coco_images(root)
    assert set(images) == {recs[0].id, recs[1].id, other.id}
    assert [a["category_id"] for a in images[other.id]["anns"]] == [8] and images[other.id]["id"] == newest["rowid"]
    ann_ids = [a["id"] for img in images.values() for a in img["anns"]]
    assert len(ann_ids) == len(set(ann_ids))
    sink.close()


def test_max_bytes_counts_images_labels_and_coco(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    sink, _ = build(root, n=4, capture=CaptureSection(live=CaptureConfig()), image_format="png", coco_interval=0.0)
    per_frame = sink.status()["bytes"] // 4
    limit = per_frame * 6
    sink.cfg.max_bytes = limit
    for i in range(4, 30):
        put(sink, camera_frame(i), frame_dets(i))
        assert sink.status()["bytes"] <= limit + per_frame  # over by at most the frame just written, until rotated
    sink.flush()
    owned = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".txt", ".json"))
    assert owned - (root / "classes.txt").stat().st_size <= limit and sink.status()["quota"]["rotated"] > 0
    assert {x["frame_index"] for x in sink.index.select()} == set(range(30 - sink.status()["images"], 30))
    sink.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that really fills up (roomy enough for SQLite's WAL, up to ~4 MB, beside the frames)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to make a small disk (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_min_free_bytes_never_lets_the_disk_fill(small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.dataset")
    root = small_fs / "ds"
    keep_free = 6_000_000
    shape = (240, 320)  # random pixels: ~230 KB per PNG, 100 of them would need 23 MB
    sink = DatasetSink(DatasetConfig(path=str(root), capture=CaptureSection(live=CaptureConfig()), image_format="png",
                                     min_free_bytes=keep_free), root, NAMES, "m")
    sink.open()
    first = put(sink, camera_frame(0, shape), frame_dets(0))
    ReviewStore(sink.index).decide(first.id, "accept")
    for i in range(1, 100):
        put(sink, camera_frame(i, shape), frame_dets(i))
        assert sink.status()["errors"] == 0, sink.status()["last_error"]
        assert shutil.disk_usage(small_fs).free >= keep_free - 512 * 1024
    st = sink.status()
    assert st["ok"] and st["quota"]["rotated"] > 50 and st["quota"]["skipped_disk"] == 0
    kept = {x["frame_index"] for x in sink.index.select()}
    assert 0 in kept and 99 in kept and len(kept) >= 10  # the accepted frame outlives every auto one
    assert st["quota"]["rotated_reviewed"] == 0
    # something else fills the disk: the dataset gives up its auto frames (even when SQLite itself has no room
    # left), then skips new frames (counted, logged) -- never an ENOSPC error, never the accepted frame
    fillers = [small_fs / "filler1.bin", small_fs / "filler2.bin"]
    for i, filler in zip((100, 101), fillers, strict=True):
        fill(filler)
        for k in range(3):
            put(sink, camera_frame(i * 10 + k, shape), frame_dets(i))
    st = sink.status()
    assert st["errors"] == 0 and st["quota"]["skipped_disk"] >= 1
    assert any("nothing left to remove" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert {x["frame_index"] for x in sink.index.select()} == {0}  # only the accepted frame is left
    assert st["quota"]["rotated_reviewed"] == 0
    for filler in fillers:
        filler.unlink()
    sink.close()


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


# --------------------------------------------------------------------------- MQTT


def test_decisions_are_published_on_the_review_topic(tmp_path: Path, broker: Any) -> None:
    col = Collector(broker.port, "el/#")
    mqtt = MqttSink(MqttConfig(host="127.0.0.1", port=broker.port, prefix="el"), DEVICE, state_dir=tmp_path / "state")
    mqtt.open()
    sink, recs = build(tmp_path / "ds", n=3)
    store = ReviewStore(sink.index, publish=mqtt.publish_review)
    try:
        assert store.decide(recs[0].id, "accept", by="alice")["published"]
        item = store.item(recs[1].id)
        store.decide(recs[1].id, "update", by="bob", detections=[{**item["detections"][0], "class_id": 3}])
        store.decide(recs[2].id, "reject", by="carol")
        assert col.wait_for(lambda: len(col.on("el/review-dev/review")) >= 3, 15)
    finally:
        mqtt.close()
        sink.close()
    msgs = [json.loads(p) for p in col.on("el/review-dev/review")]
    col.close()
    schema = load_schema()
    for m in msgs:
        jsonschema.validate(m, schema)
    assert [(m["action"], m["state"], m["by"], m["device_id"]) for m in msgs] == [
        ("accept", "accepted", "alice", DEVICE), ("update", "corrected", "bob", DEVICE), ("reject", "rejected", "carol", DEVICE)]
    assert msgs[1]["detections"][0]["label"] == "motorcycle" and msgs[1]["previous_state"] == "needs_review"
    assert msgs[2]["image"].startswith("images/cam/") and len({m["id"] for m in msgs}) == 3


# --------------------------------------------------------------------------- the web API


@dataclass
class FakePipeline:
    """What the web page uses of a pipeline, with the sinks the review page looks for."""

    cfg: Config
    sinks: list[Any] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {"device_id": self.cfg.device_id, "running": True, "sources": {}, "sinks": {}}

    def set_source_paused(self, name: str, paused: bool) -> None:
        raise KeyError(name)


@dataclass
class Web:
    app: Flask
    root: Path
    sink: DatasetSink
    recs: list[LabelRecord]
    published: list[dict[str, Any]]


def web_cfg(tmp: Path, **dataset: Any) -> Config:
    return config_from_dict({
        "device_id": DEVICE, "state_dir": str(tmp / "state"),
        "model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "v4l2:///dev/video9"}},
        "mqtt": {"enabled": False}, "dataset": {"path": str(tmp / "ds"), **dataset}, "web": {"enabled": True},
    }, base_dir=tmp)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    cfg = web_cfg(tmp_path)
    sink, recs = build(tmp_path / "ds")
    published: list[dict[str, Any]] = []

    class Publisher:
        name = "mqtt"

        def publish_review(self, doc: dict[str, Any]) -> bool:
            published.append(doc)
            return True

    app = create_app(cfg, FakePipeline(cfg, [sink, Publisher()]), WebSink(cfg),
                     test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY})
    yield Web(app, tmp_path / "ds", sink, recs, published)
    sink.close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def test_review_needs_the_token_even_with_public_read(web: Web) -> None:
    c = web.app.test_client()
    page = c.get("/review")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login?next=/review")
    rid = web.recs[0].id
    for url in ("/api/review/queue", f"/api/review/items/{rid}", f"/api/review/items/{rid}/image",
                "/api/review/export?format=coco"):
        assert c.get(url).status_code == 401, url
    assert c.post(f"/api/review/items/{rid}", json={"action": "accept"}).status_code == 401
    assert c.get("/api/review/queue", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert not web.published


def test_review_api_with_a_bearer_token(web: Web) -> None:
    c = web.app.test_client()
    q = c.get("/api/review/queue?limit=3", headers=BEARER).get_json()
    assert q["total"] == 6 and len(q["items"]) == 3 and q["classes"] == NAMES and q["counts"]["needs_review"] == 6
    rid = q["items"][0]["id"]
    item = c.get(f"/api/review/items/{rid}", headers=BEARER).get_json()
    assert item["image_url"] == f"/api/review/items/{rid}/image?v=1" and len(item["detections"]) == 2
    img = c.get(item["image_url"], headers=BEARER)
    assert img.status_code == 200 and img.mimetype == "image/jpeg"
    assert img.data == (web.root / item["image"]).read_bytes()
    img.close()

    dets = item["detections"]
    dets[1]["class_id"] = 7
    r = c.post(f"/api/review/items/{rid}", headers=BEARER, json={"action": "update", "detections": dets, "version": 1,
                                                                  "by": "dana"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    # the name is the authenticated operator's (web.token: "operator"), never the typed "by"
    assert body["item"]["state"] == "corrected" and body["item"]["reviewed_by"] == "operator" and body["published"]
    assert body["next_id"] == q["items"][1]["id"] and body["counts"]["corrected"] == 1
    stale = c.post(f"/api/review/items/{rid}", headers=BEARER, json={"action": "accept", "version": 1})
    assert stale.status_code == 409 and stale.get_json()["item"]["version"] == 2
    r = c.post(f"/api/review/items/{rid}", headers=BEARER, json={"action": "accept", "version": 2})
    assert r.get_json()["item"]["state"] == "corrected" and r.get_json()["item"]["reviewed_by"] == "operator"
    assert [p["action"] for p in web.published] == ["update", "accept"]
    assert json.loads(web.sink.index.db.execute(
        "SELECT detail FROM review_log ORDER BY seq DESC").fetchone()[0])["via"] == "bearer"

    for body_, code in (({"action": "approve"}, 400), ({"action": "update", "detections": [{"class_id": 99, "box": [1, 1, 5, 5]}]}, 400),
                        ({"action": "accept", "version": "2"}, 400), ([], 400)):
        assert c.post(f"/api/review/items/{rid}", headers=BEARER, json=body_).status_code == code, body_
    assert c.post("/api/review/items/00000000-0000-5000-8000-000000000000", headers=BEARER,
                  json={"action": "accept"}).status_code == 404
    assert c.get("/api/review/items/not-a-uuid", headers=BEARER).status_code == 400
    for url in ("/api/review/queue?state=bogus", "/api/review/queue?state=", "/api/review/queue?limit=0",
                "/api/review/queue?limit=201", "/api/review/queue?offset=-1", "/api/review/queue?offset=1000000001",
                "/api/review/queue?limit=x", "/api/review/export", "/api/review/export?format=",
                "/api/review/export?format=coco&state=", "/api/review/export?format=coco&state=accepted,",
                "/api/review/export?format=coco&val=1", "/api/review/export?format=coco&val=nan"):
        assert c.get(url, headers=BEARER).status_code == 400, url


def test_hostile_json_bodies_get_400_never_500(web: Web) -> None:
    """Operator-only JSON is still untrusted: deep nesting made the parser raise RecursionError and 1e400
    parsed as infinity and broke the box arithmetic, both answered 500 with a traceback in the log."""
    c = web.app.test_client()
    rid = c.get("/api/review/queue?limit=1", headers=BEARER).get_json()["items"][0]["id"]
    url = f"/api/review/items/{rid}"
    box = {"class_id": 0, "box": [1, 1, 5, 5]}
    hostile = {
        "deep nesting": '{"action": "update", "detections": ' + "[" * 30000 + "]" * 30000 + "}",
        "moderate nesting": '{"action": "update", "detections": [' + "[" * 20 + "]" * 20 + "]}",
        "1e400": json.dumps({"action": "update", "detections": [{**box, "box": [1, 1, 5, 5]}]}).replace("5, 5", "5, 1e400"),
        "huge integer": json.dumps({"action": "update", "detections": [box]}).replace("5, 5", "5, " + "9" * 400),
        "NaN": json.dumps({"action": "update", "detections": [box]}).replace("5, 5", "5, NaN"),
        "Infinity": json.dumps({"action": "update", "detections": [box]}).replace("5, 5", "5, -Infinity"),
        "not JSON": "{action: accept}",
        "empty": "",
        "a list": "[]",
        "truncated": '{"action": "acc',
    }
    for what, body in hostile.items():
        resp = c.post(url, headers={**BEARER, "Content-Type": "application/json"}, data=body)
        assert resp.status_code == 400, (what, resp.status_code, resp.text[:200])
        assert resp.get_json()["error"], what
    ok = c.post(url, headers=BEARER, json={"action": "update", "detections": [box]})
    assert ok.status_code == 200, ok.text  # a sane body still works


def test_review_api_answers_match_the_openapi_document(web: Web) -> None:
    doc = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("web", "openapi.yaml").read_text())
    from tests.test_web_api import _json_schema

    components = {"schemas": _json_schema(doc["components"]["schemas"])}

    def check(data: Any, schema: str) -> None:
        validator = jsonschema.Draft202012Validator({"components": components, "$ref": f"#/components/schemas/{schema}"})
        errors = sorted(validator.iter_errors(data), key=str)
        assert not errors, f"{schema}: {errors[0]}"

    c = web.app.test_client()
    q = c.get("/api/review/queue", headers=BEARER).get_json()
    check(q, "ReviewQueue")
    rid = q["items"][0]["id"]
    check(c.get(f"/api/review/items/{rid}", headers=BEARER).get_json(), "ReviewItem")
    res = c.post(f"/api/review/items/{rid}", headers=BEARER, json={"action": "reject"}).get_json()
    check(res, "ReviewResult")
    check(c.post(f"/api/review/items/{rid}", headers=BEARER, json={"action": "bogus"}).get_json(), "Error")
    for path in ("/api/review/queue", "/api/review/items/{record_id}", "/api/review/items/{record_id}/image",
                 "/api/review/export"):
        assert path in doc["paths"], path


def test_review_page_with_a_session_and_csrf(web: Web) -> None:
    c = web.app.test_client()
    html = c.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    assert c.post("/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/review"}).status_code == 302
    page = c.get("/review")
    assert page.status_code == 200
    text = page.text
    assert 'id="review-classes"' in text and "review.js" in text and "review.css" in text
    assert "<script>" not in text and " style=" not in text  # nothing inline: the CSP forbids it
    for url in re.findall(r'(?:src|href)="([^"]+)"', text):
        assert not re.match(r"^(https?:)?//", url), url
    token = re.search(r'name="csrf-token" content="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    rid = web.recs[0].id
    assert c.post(f"/api/review/items/{rid}", json={"action": "accept"}).status_code == 403  # no CSRF header
    r = c.post(f"/api/review/items/{rid}", json={"action": "accept"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.get_json()["item"]["reviewed_by"] == "operator"
    for asset in ("review.js", "review.css"):
        resp = c.get(f"/static/{asset}")
        assert resp.status_code == 200
        resp.close()


def test_export_from_the_web_api(web: Web) -> None:
    c = web.app.test_client()
    store = ReviewStore(web.sink.index)
    for r in web.recs[:2]:
        store.decide(r.id, "accept")
    resp = c.get("/api/review/export?format=coco&state=accepted", headers=BEARER)
    assert resp.status_code == 200 and resp.mimetype == "application/zip"
    assert re.match(r'attachment; filename=edgelabel-review-dev-coco-\d{8}-\d{6}\.zip', resp.headers["Content-Disposition"])
    assert resp.headers["X-Edgelabel-Images"] == "2"
    data = resp.data
    resp.close()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        coco = json.loads(z.read("annotations/instances_default.json"))
        assert {img["edgelabel_record_id"] for img in coco["images"]} == {r.id for r in web.recs[:2]}
        for img in coco["images"]:
            assert hashlib.sha256(z.read(f"images/default/{img['file_name']}")).hexdigest() == hashlib.sha256(
                (web.root / web.sink.index.row(img["edgelabel_record_id"])["image_path"]).read_bytes()).hexdigest()
    multi = c.get("/api/review/export?format=yolo&state=accepted&state=needs_review", headers=BEARER)
    assert multi.headers["X-Edgelabel-Images"] == "6"
    multi.close()
    assert c.get("/api/review/export?format=pdf", headers=BEARER).status_code == 400
    assert c.get("/api/review/export?format=coco&state=nope", headers=BEARER).status_code == 400
    time.sleep(0.05)
    assert not [p for p in (web.root.parent / "state" / "exports").rglob("*") if p.is_file()]  # removed once sent


def test_review_without_a_dataset(tmp_path: Path) -> None:
    cfg = web_cfg(tmp_path, enabled=False)
    app = create_app(cfg, FakePipeline(cfg), WebSink(cfg),
                     test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY})
    c = app.test_client()
    assert c.get("/api/review/queue", headers=BEARER).status_code == 404
    page = c.get("/review", headers=BEARER)
    assert page.status_code == 200 and "dataset.enabled: false" in page.text


def test_review_opens_the_dataset_itself_without_a_sink(tmp_path: Path) -> None:
    sink, recs = build(tmp_path / "ds", n=2)
    sink.close()
    cfg = web_cfg(tmp_path)
    app = create_app(cfg, FakePipeline(cfg), WebSink(cfg),
                     test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY})
    c = app.test_client()
    assert c.get("/api/review/queue", headers=BEARER).get_json()["total"] == 2
    r = c.post(f"/api/review/items/{recs[0].id}", headers=BEARER, json={"action": "reject"})
    assert r.status_code == 200 and r.get_json()["published"] is False
    app.extensions["edgelabel_review"].close()
    assert_files_match_index(tmp_path / "ds")


def test_stored_images_are_real_jpegs(tmp_path: Path) -> None:
    sink, recs = build(tmp_path / "ds", n=1)
    path = tmp_path / "ds" / sink.index.row(recs[0].id)["image_path"]
    assert cv2.imread(str(path)).shape == (96, 128, 3)
    sink.close()


#: valid values for the parameters an operation requires, so that the parameter under test is the only bad one
REQUIRED_VALUES = {"format": "yolo"}


def typed_query_parameters() -> list[tuple[str, str, dict[str, Any]]]:
    """(path, name, schema) of every typed query parameter (number, integer, enum) of a GET without path
    parameters, read from the OpenAPI document so that a new parameter is covered as soon as it is declared."""
    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "web" / "openapi.yaml").read_text())
    found = []
    for path, item in doc["paths"].items():
        op = item.get("get")
        if not op or "{" in path:
            continue
        for param in op.get("parameters", []):
            schema = param.get("schema", {})
            if param["in"] == "query" and (schema.get("type") in ("integer", "number") or "enum" in schema):
                found.append((path, param["name"], schema))
    return found


def test_every_typed_query_parameter_refuses_an_empty_or_malformed_value(web: Web) -> None:
    """``?limit=`` is not a number: 400 naming the parameter, as for ``?limit=abc`` (the OpenAPI document says
    integer; answering 200 made the schema fuzzers fail on the runs that happened to send an empty value)."""
    params = typed_query_parameters()
    assert {(p, n) for p, n, _ in params} >= {("/api/review/queue", "limit"), ("/api/review/queue", "offset"),
                                              ("/api/review/queue", "state"), ("/api/labels", "limit"),
                                              ("/api/logs", "since"), ("/api/review/export", "val")}
    client = web.app.test_client()
    for path, name, schema in params:
        base = {k: v for k, v in REQUIRED_VALUES.items() if k != name}
        bad = ["", " ", "abc", "nan", "inf", "1e400"]
        if schema.get("type") == "integer":
            bad += ["1.5", "0x10", "٣"]  # an Arabic-Indic digit: int() takes it, the schema does not
        for value in bad:
            resp = client.get(path, query_string={**base, name: value}, headers=BEARER)
            assert resp.status_code == 400, f"{path}?{name}={value!r}: {resp.status_code} {resp.text[:200]}"
            assert name in resp.text, f"{path}?{name}={value!r}: the answer does not name the parameter: {resp.text[:200]}"
        if "maximum" in schema:  # one past the top
            over = schema["maximum"] + 1
            resp = client.get(path, query_string={**base, name: str(over)}, headers=BEARER)
            assert resp.status_code == 400, f"{path}?{name}={over}: {resp.status_code}"
    # absent parameters take their defaults; a valid one is taken
    assert client.get("/api/review/queue", headers=BEARER).status_code == 200
    assert client.get("/api/review/queue?limit=3&offset=0&state=needs_review", headers=BEARER).status_code == 200
    assert client.get("/api/labels?limit=5", headers=BEARER).status_code == 200
    assert client.get("/api/labels?cursor=", headers=BEARER).status_code == 400


def test_schemathesis_finds_no_5xx_in_the_review_api_with_a_dataset(web: Web) -> None:
    """Fuzz every review operation (valid and invalid requests) against a real dataset: never a 5xx, every
    answer as documented.  400 is expected too: a box must lie inside its frame, which no schema can say.

    Invalid requests are not required to be refused: schemathesis also counts undeclared query parameters and
    headers as invalid, and this API, like any, ignores those.  The declared parameters' checks are asserted
    one by one in test_review_api_with_a_bearer_token."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
    hypothesis = pytest.importorskip("hypothesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import negative_data_rejection
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]}}})
    schema = schemathesis.openapi.from_wsgi("/api/openapi.yaml", web.app, config=config)
    ops = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith(("/api/review/", "/api/dataset/"))]
    assert len(ops) == 6
    failures: list[str] = []
    calls = [0]

    def fuzz(op: Any, mode: Any) -> None:
        @hypothesis.settings(max_examples=examples(20), deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            calls[0] += 1
            if mode is GenerationMode.POSITIVE and "record_id" in (case.path_parameters or {}) and calls[0] % 2:
                case.path_parameters["record_id"] = web.recs[calls[0] % len(web.recs)].id  # a frame that exists
            if mode is GenerationMode.NEGATIVE:
                case.call_and_validate(headers=BEARER, excluded_checks=[negative_data_rejection])
            else:
                case.call_and_validate(headers=BEARER)

        run()

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for op in ops:
            try:
                fuzz(op, mode)
            except Exception as exc:  # schemathesis raises an exception group per operation
                failures.append(f"{mode.value} {op.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert calls[0] > 100
    assert_files_match_index(web.root)  # whatever was thrown at it, the dataset is consistent


def test_dataset_frame_serves_the_stored_bytes_to_a_viewer_and_refuses_changed_ones(tmp_path: Path) -> None:
    """``/api/dataset/frames/<id>``: what the plant's ingest fetches.  The bytes exactly as stored (their sha256
    is the record's frame_sha256), for a viewer token; ranges and ETags; a changed file is refused, not served."""
    cfg = config_from_dict({
        "device_id": DEVICE, "state_dir": str(tmp_path / "state"), "model": {"path": "m.onnx"},
        "sources": {"cam": {"uri": "v4l2:///dev/video9"}}, "mqtt": {"enabled": False},
        "dataset": {"path": str(tmp_path / "ds")},
        "web": {"enabled": True, "operators": {"plant": {"role": "viewer", "token": "plant-viewer-token-0123456789"}}},
    }, base_dir=tmp_path)
    sink, recs = build(tmp_path / "ds", n=3)
    app = create_app(cfg, FakePipeline(cfg, [sink]), WebSink(cfg),
                     test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN, "SECRET_KEY": SECRET_KEY})
    c = app.test_client()
    viewer = {"Authorization": "Bearer plant-viewer-token-0123456789"}
    try:
        rec = recs[0]
        url = f"/api/dataset/frames/{rec.id}"
        assert c.get(url).status_code == 401
        r = c.get(url, headers=viewer)
        assert r.status_code == 200 and r.mimetype == "image/jpeg"
        stored = (tmp_path / "ds" / str(rec.frame_path)).read_bytes()
        assert r.data == stored and hashlib.sha256(r.data).hexdigest() == rec.frame_sha256
        assert r.headers["X-Content-SHA256"] == rec.frame_sha256 and r.headers["ETag"] == f'"{rec.frame_sha256}"'
        assert c.get(url, headers={**viewer, "If-None-Match": f'"{rec.frame_sha256}"'}).status_code == 304
        part = c.get(url, headers={**viewer, "Range": "bytes=10-19"})
        assert part.status_code == 206 and part.data == stored[10:20]
        assert c.get(url, headers={**viewer, "Range": f"bytes={len(stored) + 5}-"}).status_code == 416
        # unknown and malformed ids
        missing = c.get("/api/dataset/frames/00000000-0000-4000-8000-000000000000", headers=viewer)
        assert missing.status_code == 404 and "no such frame" in missing.get_json()["error"]
        assert c.get("/api/dataset/frames/not-a-uuid", headers=viewer).status_code == 400
        # the stored copy rewritten behind the dataset's back: refused with a reason, never served
        (tmp_path / "ds" / str(recs[1].frame_path)).write_bytes(b"other pixels")
        bad = c.get(f"/api/dataset/frames/{recs[1].id}", headers=viewer)
        assert bad.status_code == 404 and "no longer matches" in bad.get_json()["error"]
        # gone from disk (rotated, deleted)
        (tmp_path / "ds" / str(recs[2].frame_path)).unlink()
        assert c.get(f"/api/dataset/frames/{recs[2].id}", headers=viewer).status_code == 404
    finally:
        sink.close()


def test_a_bad_decision_is_refused_without_waiting_for_the_dataset_lock(web: Web) -> None:
    """A decision's body (size, box count, box shape, action, version) is checked before the dataset is
    touched: while the sink thread holds the lock, bad requests still get their 400 at once; the largest
    valid update (MAX_BOXES boxes) is accepted once the lock is free, one more box is refused."""
    from edgelabel.edge.review import MAX_BOXES

    c = web.app.test_client()
    rid = web.recs[0].id
    url = f"/api/review/items/{rid}"
    box = {"class_id": 0, "box": [1, 1, 5, 5]}
    bad = {
        "one box too many": {"action": "update", "detections": [box] * (MAX_BOXES + 1)},
        "a box of three numbers": {"action": "update", "detections": [{"class_id": 0, "box": [1, 2, 3]}]},
        "a class name": {"action": "update", "detections": [{"class_id": "car", "box": [1, 1, 5, 5]}]},
        "detections as an object": {"action": "update", "detections": {"0": box}},
        "update without boxes": {"action": "update"},
        "unknown action": {"action": "approve"},
        "version as text": {"action": "accept", "version": "1"},
    }
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with web.sink.index.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        for what, body in bad.items():
            t0 = time.monotonic()
            resp = c.post(url, headers=BEARER, json=body)
            took = time.monotonic() - t0
            assert resp.status_code == 400, (what, resp.status_code, resp.text[:200])
            assert resp.get_json()["error"], what
            assert took < 5.0, f"{what}: answered after {took:.1f} s: it waited for the dataset lock"
        assert str(MAX_BOXES) in c.post(url, headers=BEARER, json=bad["one box too many"]).get_json()["error"]
    finally:
        release.set()
        holder.join()
    many = [{"class_id": i % len(NAMES), "box": [i % 100, i // 100, i % 100 + 20, i // 100 + 20]} for i in range(MAX_BOXES)]
    ok = c.post(url, headers=BEARER, json={"action": "update", "detections": many, "version": 1})
    assert ok.status_code == 200, ok.text[:300]
    assert len(ok.get_json()["item"]["detections"]) == MAX_BOXES and ok.get_json()["item"]["version"] == 2


def test_the_coco_file_is_written_after_the_dataset_lock_is_released(
        web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining and fsyncing the COCO file was most of a decision's hold on the dataset lock (the sink thread
    could not index a frame meanwhile): while a decision's COCO file is being written the lock is free, and the
    file written is the decision's."""
    import edgelabel.edge.sinks.dataset as dataset_mod

    real = dataset_mod.write_atomic
    writing, go_on = threading.Event(), threading.Event()

    def slow(path: Path, data: bytes, **kw: Any) -> None:
        if path.name == "annotations.coco.json" and not go_on.is_set():
            writing.set()
            go_on.wait(30)
        real(path, data, **kw)

    monkeypatch.setattr(dataset_mod, "write_atomic", slow)
    store = ReviewStore(web.sink.index)
    rid = web.recs[0].id
    box = {"class_id": 1, "box": [5, 5, 40, 40]}
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(store.decide(rid, "update", detections=[box])))
    worker.start()
    try:
        assert writing.wait(10), "the COCO file was not written"
        got = web.sink.index.lock.acquire(timeout=5)
        assert got, "the dataset lock was held while the COCO file was written"
        web.sink.index.lock.release()
    finally:
        go_on.set()
        worker.join(30)
    assert done and done[0]["item"]["state"] == "corrected"
    assert len(coco_images(web.root)[rid]["anns"]) == 1

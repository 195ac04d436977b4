"""Fault: the daemon is SIGKILLed 5 times during a folder job, then finishes it.

Injected for real: ``edgelabel run`` on a folder of 60 images (dataset with stored copies, YOLO
labels, a COCO file rewritten every 0.3 s; MQTT with its durable outbox) gets SIGKILL at 5 points
of the job, each a little after a different number of frames was marked done (plus 0-90 ms of
jitter, so kills land in every phase: decoding, inference, the dataset's writes, the outbox commit,
the COCO rewrite).  After each kill, before the next start, the files it left are inspected.

Must happen: after every kill the COCO file parses, every YOLO label file is well formed, and the
dataset index, the outbox and the job ledger pass SQLite's integrity check; the final run finishes
the job; every image is labeled exactly once (one index row, one label file, one stored copy, one
COCO image and one distinct MQTT record id per image; the ledger, the index and MQTT agree on the
ids); only frames in flight at a kill are published twice, with the same id.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from tests.conftest import Broker
from tests.helpers import Collector
from tests.test_faults_support import (
    HAVE_MOSQUITTO,
    DaemonProc,
    measure,
    sqlite_check,
    sqlite_scalar,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")]

N_IMAGES = 60
KILL_AFTER = (6, 17, 28, 39, 50)  # frames done before each kill
YOLO_LINE = re.compile(r"^\d+ [01]\.\d{6} [01]\.\d{6} [01]\.\d{6} [01]\.\d{6}$")


def check_files_after_kill(dataset: Path, state: Path) -> dict[str, int]:
    """What a kill may leave: old or new files, never torn ones; sound databases."""
    coco_path = dataset / "annotations.coco.json"
    images = 0
    if coco_path.exists():
        doc = json.loads(coco_path.read_text())  # raises on a torn file
        images = len(doc["images"])
    for label in (dataset / "labels").rglob("*.txt") if (dataset / "labels").is_dir() else []:
        if label.name.startswith("."):
            continue
        for line in label.read_text().splitlines():
            assert YOLO_LINE.match(line), f"{label}: {line!r}"
    for db in (dataset / "index.sqlite", state / "outbox.sqlite", state / "ledger.sqlite"):
        if db.exists():
            assert sqlite_check(db) == "ok", db
    temp = [p for p in dataset.rglob(".*.tmp")]
    return {"coco_images": images, "temp_files": len(temp)}


def test_daemon_sigkilled_5_times_in_a_folder_job_every_image_once(tmp_path: Path, assets: Path, broker: Broker) -> None:
    images = tmp_path / "in"
    images.mkdir()
    originals = sorted((assets / "images").glob("*.jpg"))
    for i in range(N_IMAGES):
        shutil.copy(originals[i % len(originals)], images / f"img_{i:03d}.jpg")
    dataset, state = tmp_path / "dataset", tmp_path / "state"
    cfg = write_config(tmp_path, broker.port, {"folder": {"uri": str(images)}},
                       dataset={"enabled": True, "path": str(dataset), "save_images": "always", "image_format": "jpg",
                                "jpeg_quality": 80, "coco_interval": 0.3})
    collector = Collector(broker.port, "el/#")
    ledger = state / "ledger.sqlite"

    def done() -> int:
        return int(sqlite_scalar(ledger, "SELECT COUNT(*) FROM done") or 0)

    rng = random.Random(20261125)
    after_kill: list[dict[str, int]] = []
    runs_s: list[float] = []
    try:
        for target in KILL_AFTER:
            daemon = DaemonProc(cfg)
            t0 = time.monotonic()
            try:
                assert wait_until(lambda t=target, d=daemon: done() >= t or not d.alive(), 90, step=0.01)
                assert daemon.alive(), "the job ended before the kill\n" + daemon.log()[-3000:]
                time.sleep(rng.uniform(0, 0.09))
                daemon.kill()
            finally:
                daemon.ensure_dead()
            runs_s.append(round(time.monotonic() - t0, 2))
            after_kill.append({"done": done(), **check_files_after_kill(dataset, state)})
        assert done() < N_IMAGES
        final = DaemonProc(cfg)
        code = final.wait(120)
        assert code == 0, final.log()[-4000:]
        assert "already labeled in a previous run" in final.log()
        assert wait_until(lambda: len({r["id"] for r in collector.labels()}) >= N_IMAGES, 20)
        time.sleep(0.5)
    finally:
        collector.close()

    recs = collector.labels()
    ids = {r["id"] for r in recs}
    keys = {r["frame_key"] for r in recs}
    assert len(ids) == N_IMAGES and len(keys) == N_IMAGES  # every image labeled, de-duplicated by id
    duplicates = len(recs) - N_IMAGES
    by_id: dict[str, list[dict]] = {}
    for r in recs:
        by_id.setdefault(r["id"], []).append(r)
    def boxes(rec: dict) -> list[tuple]:  # track ids restart with the daemon; the labels themselves must not change
        return [(d["class_id"], d["score"], tuple(d["box"])) for d in rec["detections"]]

    for copies in by_id.values():  # a duplicate carries the same id and the same labels
        assert all(boxes(c) == boxes(copies[0]) for c in copies)
    # two kinds of duplicate: the frame in flight at a kill, labeled again on restart (a new inference time; the
    # capture time is the file's and stays), and outbox rows the broker had acknowledged but the killed daemon
    # had not yet deleted, sent again (identical)
    relabeled = sum(1 for copies in by_id.values() if len({c["inference_ms"] for c in copies}) > 1)
    resent = duplicates - relabeled
    assert relabeled <= len(KILL_AFTER), f"{relabeled} frames labeled twice for {len(KILL_AFTER)} kills"
    final_check = check_files_after_kill(dataset, state)
    with sqlite3.connect(ledger) as db:
        ledger_ids = {row[0] for row in db.execute("SELECT record_id FROM done")}
    with sqlite3.connect(dataset / "index.sqlite") as db:
        index_ids = {row[0] for row in db.execute("SELECT id FROM records")}
    assert ledger_ids == index_ids == ids
    coco = COCO(str(dataset / "annotations.coco.json"))
    coco_ids = {img["edgelabel_record_id"] for img in coco.dataset["images"]}
    assert coco_ids == ids and len(coco.dataset["images"]) == N_IMAGES
    stored = [p for p in (dataset / "images").rglob("*.jpg") if not p.name.startswith(".")]
    labels = [p for p in (dataset / "labels").rglob("*.txt") if not p.name.startswith(".")]
    assert len(stored) == N_IMAGES and len(labels) == N_IMAGES
    for img in coco.dataset["images"]:
        assert (dataset / img["file_name"]).is_file() and (dataset / img["edgelabel_label_file"]).is_file()
    assert sqlite_scalar(state / "outbox.sqlite", "SELECT COUNT(*) FROM outbox") == 0
    measure("daemon_sigkill_x5_folder_job", images=N_IMAGES, kills=len(KILL_AFTER),
            done_at_each_kill=[a["done"] for a in after_kill], seconds_per_killed_run=runs_s,
            records_published=len(recs), unique_ids=len(ids), duplicates=duplicates,
            relabeled_in_flight=relabeled, resent_from_outbox=resent,
            torn_json=0, integrity_checks_ok=3 * len(KILL_AFTER) + 3,
            orphan_temp_files_after_kills=[a["temp_files"] for a in after_kill],
            orphan_temp_files_at_end=final_check["temp_files"])

"""A damaged job ledger or dataset index costs only what is damaged: bytes overwritten inside the real files.

Before, a malformed page in the ledger made the daemon fail at start ("database disk image is malformed")
after every restart; a malformed dataset index failed every frame's write for ever.  Now the readable rows
are copied into a new file (the damaged one kept beside it), the unreadable ones counted, an alarm raised
(``ledger_lost`` / ``dataset_index_lost``), and the job goes on.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edgelabel.edge.health import device_alarms, loss_alarms
from edgelabel.edge.ledger import Job, Ledger
from edgelabel.edge.sinks.dataset import DatasetIndex

N = 3000
JOB = Job("ab" * 32, 0.3, 0.45, "m")


def leaf_pages(path: Path, table: str) -> list[int]:
    """1-based page numbers of ``table``'s leaf pages (from the b-tree, read before the damage)."""
    with sqlite3.connect(path) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    out: list[int] = []

    def walk(n: int) -> None:
        off = (n - 1) * page
        hdr = off + (100 if n == 1 else 0)
        kind = data[hdr]
        if kind == 0x0D:
            out.append(n)
            return
        assert kind == 0x05, kind
        cells = int.from_bytes(data[hdr + 3:hdr + 5], "big")
        for i in range(cells):
            ptr = int.from_bytes(data[hdr + 12 + 2 * i:hdr + 14 + 2 * i], "big")
            walk(int.from_bytes(data[off + ptr:off + ptr + 4], "big"))
        walk(int.from_bytes(data[hdr + 8:hdr + 12], "big"))

    walk(root)
    return out


def garble(path: Path, page_no: int) -> int:
    """Overwrite one page with garbage; returns the rows (cells) it held."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    off = (page_no - 1) * page
    cells = int.from_bytes(data[off + 3:off + 5], "big")
    data[off:off + page] = bytes([0xA5]) * page
    path.write_bytes(bytes(data))
    return cells


def test_a_garbage_page_in_the_ledger_loses_only_its_rows_and_the_job_goes_on(tmp_path: Path, caplog) -> None:
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path, JOB)
    for i in range(N):
        led.mark_done("folder", f"img{i:05d}.jpg", f"id-{i}")
    led.mark_rejected("folder", "bad.jpg", "zero-byte file")
    led.close()  # the last connection: the WAL is checkpointed into the file
    leaves = leaf_pages(path, "done")
    on_page = garble(path, leaves[len(leaves) // 2])
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.DatabaseError, match="malformed"):
        db.execute("SELECT record_id FROM done").fetchall()  # before, any read or REPLACE of those rows failed

    caplog.set_level(logging.ERROR)
    led = Ledger(path, JOB)
    assert led.done_count() == N - on_page and led.lost == on_page
    missing = [i for i in range(N) if not led.is_done("folder", f"img{i:05d}.jpg")]
    assert len(missing) == on_page and missing == list(range(missing[0], missing[0] + on_page))  # one page
    assert led.rejected()[0][1] == "bad.jpg" and led.job() == JOB
    assert list(tmp_path.glob("ledger.sqlite.corrupt-*")), "the damaged file is kept for a post-mortem"
    line = next(r.getMessage() for r in caplog.records if "job ledger" in r.getMessage())
    assert f"{on_page} row(s) could not be read" in line and "labeled again" in line and "same record ids" in line
    [alarm] = device_alarms({"ledger": led.stats()})
    assert alarm["id"] == "ledger_lost" and alarm["severity"] == "error" and str(on_page) in alarm["message"]
    assert not loss_alarms({"ledger": led.stats()}, now=led.last_loss_at + 3601), "the alarm clears in time"
    led.mark_done("folder", f"img{missing[0]:05d}.jpg", f"id-{missing[0]}")  # labeled again: the job goes on
    led.close()
    again = Ledger(path, JOB)
    assert again.done_count() == N - on_page + 1 and again.lost == 0 and not device_alarms({"ledger": again.stats()})
    again.close()


def test_a_ledger_with_a_bad_header_is_replaced_and_its_rows_counted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path, JOB)
    for i in range(N):
        led.mark_done("folder", f"img{i:05d}.jpg", f"id-{i}")
    led.close()
    with open(path, "r+b") as fh:
        fh.write(b"not an sqlite file")
    led = Ledger(path, JOB)
    assert led.done_count() == 0 and N * 0.9 <= led.lost <= N * 1.1  # estimated from the leaf pages
    assert [a["id"] for a in device_alarms({"ledger": led.stats()})] == ["ledger_lost"]
    led.close()


def _fill_index(root: Path, n: int) -> None:
    idx = DatasetIndex(root, names=["person"], model_name="m")
    idx.open()
    with idx.db:
        idx.db.executemany(
            "INSERT INTO records (id, source, frame_key, frame_index, image_path, label_path, width, height,"
            " captured_at, detections, n_detections, created) VALUES (?, 's', ?, ?, ?, ?, 64, 48, 't', '[]', 0, 0)",
            [(f"rec-{i:05d}", f"k{i}", i, f"images/s/{i}.jpg", f"labels/s/{i}.txt") for i in range(n)])
    idx.close()


def test_a_garbage_page_in_the_dataset_index_loses_only_its_rows_and_keeps_every_file(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ds"
    _fill_index(root, N)
    img = root / "images" / "s" / "7.jpg"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"\xff\xd8 stored pixels")
    path = root / "index.sqlite"
    leaves = leaf_pages(path, "records")
    on_page = garble(path, leaves[len(leaves) // 3])
    caplog.set_level(logging.ERROR)
    idx = DatasetIndex(root, names=["person"], model_name="m")
    idx.open()  # before: every write failed with "database disk image is malformed"
    n = idx.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert n == N - on_page and idx.lost == on_page
    rowids = {r[0]: r[1] for r in idx.db.execute("SELECT id, rowid FROM records")}
    assert rowids["rec-00000"] == 1 and rowids[f"rec-{N - 1:05d}"] == N  # COCO image ids stay the same
    assert img.read_bytes() == b"\xff\xd8 stored pixels", "a stored image was touched"
    assert list(root.glob("index.sqlite.corrupt-*"))
    st = {"sinks": {"dataset": {"ok": True, "index": idx.loss_status()}}}
    [alarm] = device_alarms(st)
    assert alarm["id"] == "dataset_index_lost" and str(on_page) in alarm["message"]
    assert any("left out of the COCO" in r.getMessage() for r in caplog.records)
    idx.close()


def test_an_export_never_rewrites_a_corrupt_index(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _fill_index(root, 100)
    with open(root / "index.sqlite", "r+b") as fh:
        fh.write(b"garbage header!!")
    idx = DatasetIndex(root, repair=False)
    with pytest.raises(sqlite3.DatabaseError):
        idx.open()
    assert not list(root.glob("index.sqlite.corrupt-*"))


def test_a_folder_job_goes_on_after_its_ledger_and_index_headers_are_destroyed(tmp_path: Path) -> None:
    """``edgelabel label`` twice on a folder; between the runs the first bytes of both files are overwritten."""
    from tests.conftest import ASSETS
    from tests.helpers import run_edgelabel

    out = tmp_path / "out"
    model = str(ASSETS / "models" / "yolox_nano.onnx")
    first = run_edgelabel("label", str(ASSETS / "images"), "--model", model, "--out", str(out), timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = {r[0] for r in sqlite3.connect(out / "index.sqlite").execute("SELECT id FROM records")}
    assert len(ids) == 6
    for f in (out / ".edgelabel" / "ledger.sqlite", out / "index.sqlite"):
        with open(f, "r+b") as fh:
            fh.write(b"\0" * 100)
    second = run_edgelabel("label", str(ASSETS / "images"), "--model", model, "--out", str(out), timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    err = second.stderr
    assert "job ledger" in err and "was corrupt" in err and "dataset index" in err, err[-3000:]
    assert "Traceback" not in err
    again = {r[0] for r in sqlite3.connect(out / "index.sqlite").execute("SELECT id FROM records")}
    assert again == ids, "labeled again under the same record ids"


def test_the_losses_are_counted_in_the_stats_message() -> None:
    import json

    import jsonschema

    from edgelabel.edge.config import MqttConfig
    from edgelabel.edge.sinks.mqtt import MqttSink

    schema = json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "stats.v1.json").read_text())
    sink = MqttSink(MqttConfig(), "dev")
    snap = {"ledger": {"lost": 95, "last_loss": "x", "last_loss_at": 1.0},
            "sinks": {"dataset": {"ok": True, "errors": 0, "last_error": None, "index": {"lost": 41}}}}
    doc = sink.build_stats(snap)
    jsonschema.validate(doc, schema)
    assert doc["drops"]["ledger_lost"] == 95 and doc["drops"]["dataset_index_lost"] == 41
    sink.close()

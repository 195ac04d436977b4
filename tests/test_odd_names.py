"""A file name that is not UTF-8 (a Latin-1 name from an SMB share or a USB stick) is labeled like any other.

It stopped the folder source for good: the ledger could not store the name (``UnicodeEncodeError``), the
source went ``offline`` and the files after it were never labeled.  Its frame key, the record's
``frame_path``, the dataset's file names, the index, COCO and MQTT payloads now carry the name with its
non-UTF-8 bytes written ``\\xNN``; the file is read by its real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import IMAGES, Broker
from tests.helpers import Collector, run_edgelabel

LATIN1 = b"caf\xe9 n\xb0 1.jpg"  # "café n° 1.jpg" in Latin-1
SHOWN = "caf\\xe9 n\\xb0 1"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(IMAGES / "zidane.jpg", os.path.join(os.fsencode(src), LATIN1))
    shutil.copy(IMAGES / "bus.jpg", src / "later.jpg")  # sorted after it: it used to be never labeled
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    os.rename(src / "broken.jpg", os.path.join(os.fsencode(src), b"bad \xff.jpg"))  # rejected, and listed
    return src


def test_label_takes_a_latin1_name_and_the_files_after_it(folder: Path, tmp_path: Path, assets: Path) -> None:
    out = tmp_path / "out"
    model = str(assets / "models" / "yolox_nano.onnx")
    proc = run_edgelabel("label", str(folder), "--model", model, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labeled 2 frame(s)" in proc.stdout and "1 rejected" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    stored = sorted(p.name for p in (out / "images" / "in").iterdir())
    assert any(n.startswith(SHOWN) for n in stored) and any(n.startswith("later") for n in stored), stored
    coco = json.loads((out / "annotations.coco.json").read_bytes().decode("utf-8"))  # valid UTF-8 throughout
    assert any(SHOWN in img["file_name"] for img in coco["images"])

    again = run_edgelabel("label", str(folder), "--model", model, "--out", str(out))
    assert again.returncode == 0 and "labeled 0 frame(s)" in again.stdout, again.stdout  # the same keys


def test_a_latin1_name_reaches_mqtt_as_valid_json(folder: Path, tmp_path: Path, broker: Broker, assets: Path) -> None:
    collector = Collector(broker.port)
    try:
        proc = run_edgelabel("run", "--source", str(folder), "--model", str(assets / "models" / "yolox_nano.onnx"),
                             "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--state-dir", str(tmp_path / "state"),
                             "--device", "odd-names", timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert collector.wait_for(lambda: len(collector.labels()) == 2, 30), collector.labels()
    finally:
        collector.close()
    keys = sorted(r["frame_key"] for r in collector.labels())
    assert keys[0].endswith(f"{SHOWN}.jpg") and keys[1].endswith("later.jpg"), keys
    rejected = (tmp_path / "state" / "rejected.csv").read_text(encoding="utf-8")
    assert "bad \\xff.jpg" in rejected

"""Progress without a terminal: a first line, a line every interval, a final line; short jobs are not silent."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from edgelabel.edge.progress import Progress
from tests.helpers import run_edgelabel


def test_a_job_shorter_than_the_interval_logs_a_first_and_a_final_line(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="edgelabel.progress")
    bar = Progress(total=3, label="labeling", interval=3600.0)  # stderr is not a terminal under pytest
    for _ in range(3):
        bar.update()
    bar.close()
    bar.close()  # twice is harmless
    lines = [r.getMessage() for r in caplog.records if r.name == "edgelabel.progress"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("labeling: 1/3 frames")
    assert lines[1].startswith("labeling: 3/3 frames") and "after" in lines[1]


def test_no_final_line_repeats_the_last_one_and_disabled_is_silent(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="edgelabel.progress")
    one = Progress(total=1, label="one", interval=3600.0)
    one.update()
    one.close()
    Progress(total=5, label="off", enabled=False).close()
    lines = [r.getMessage() for r in caplog.records if r.name == "edgelabel.progress"]
    assert lines == [lines[0]] and lines[0].startswith("one: 1/1 frames"), lines


def test_edgelabel_label_in_a_pipe_prints_progress(tmp_path: Path, assets: Path):
    """Two images label in well under the 5 s interval: the output still shows the progress lines."""
    images = tmp_path / "in"
    images.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(assets / "images" / name, images / name)
    res = run_edgelabel("label", str(images), "--model", str(assets / "models" / "yolox_nano.onnx"),
                        "--out", str(tmp_path / "out"), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    progress = [ln for ln in res.stderr.splitlines() if "edgelabel.progress" in ln]
    assert any("labeling: 1/2 frames" in ln for ln in progress), res.stderr[-3000:]
    assert any("labeling: 2/2 frames" in ln and "after" in ln for ln in progress), res.stderr[-3000:]

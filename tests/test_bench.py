"""Smoke run of the benchmark command, so it keeps working (its figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_writes_the_table_and_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("raw engine, 1 thread, ", "pipeline, video", "capture->PUBACK latency", "outbox alone",
                "## Against the targets (this run)", "pipeline >= 0.8 x B on the video (yolox_nano)"):
        assert row in text, row
    assert "lost 0, duplicates 0" in text

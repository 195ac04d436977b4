"""Dataset layouts shared by the appliance's export and the plant's central export (``ingest/export.py``).

Standard library only: the plant-side ingest package imports this module and must not load the daemon's
runtime (OpenCV, ONNX Runtime, the pipeline).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def yolo_text(boxes: Iterable[dict[str, Any]], width: int, height: int) -> str:
    """YOLO label lines (``class cx cy w h``, normalised, 6 decimals) for boxes in pixels."""
    lines = []
    for b in boxes:
        x1, y1, x2, y2 = b["box"]
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"{b['class_id']} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
    return "".join(lines)


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``: a reader sees the old export or the new one, never half of one.

    An existing ``out`` is renamed aside first and removed only after the new one is in place.
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

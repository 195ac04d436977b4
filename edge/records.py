"""The label record: one per processed frame, the unit every sink receives.

Serialised with ``to_json``; the JSON Schema is ``edge/schemas/label-record.v1.json``
(``SCHEMA_PATH``).  Record ids are uuid5 of device, source and frame key, so the
same frame processed twice (after a crash) gets the same id and consumers can
de-duplicate.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgelabel.engines.base import Detection

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "label-record.v1.json"
_NAMESPACE = uuid.UUID("6a1f6c8e-3b0e-5b7a-9d1e-2f4c8a9b0c11")


def record_id(device_id: str, source: str, frame_key: str) -> str:
    """Stable id of the record for one frame of one source on one device."""
    return str(uuid.uuid5(_NAMESPACE, f"{device_id}\x1f{source}\x1f{frame_key}"))


def iso_utc(epoch: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a record, and how it ran."""

    name: str
    sha256: str
    family: str
    engine: str
    provider: str
    precision: str
    input_size: tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class DetectionRecord:
    class_id: int
    label: str
    score: float
    box: list[float]  # x1, y1, x2, y2 in frame pixels
    box_norm: list[float]  # the same divided by width/height
    track_id: int | None = None  # set when tracking is on

    @classmethod
    def from_detection(cls, det: Detection, width: int, height: int, track_id: int | None = None) -> DetectionRecord:
        return cls(
            class_id=int(det.class_id),
            label=det.label,
            score=round(float(det.score), 5),
            box=[round(float(v), 2) for v in det.box],
            box_norm=[round(float(v), 6) for v in det.box_norm(width, height)],
            track_id=track_id,
        )


@dataclass
class LabelRecord:
    """Everything known about one processed frame."""

    id: str
    device_id: str
    source: str
    frame_index: int
    frame_key: str
    captured_at: str  # ISO-8601 UTC: capture time (live), media time (video files), file mtime (images)
    captured_ts: float  # epoch seconds, the same instant
    width: int
    height: int
    model: ModelInfo
    inference_ms: float
    detections: list[DetectionRecord]
    frame_sha256: str | None = None  # sha256 of the stored image bytes
    frame_path: str | None = None  # where the exact pixels are stored (or the original file)
    # seconds from the start of the video file (video files only; left out of the JSON otherwise, so a
    # consumer validating against the first v1 schema still accepts image and camera records)
    media_time: float | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types, fields in declaration order.

        Built by hand rather than with ``dataclasses.asdict``: asdict deep-copies
        every value through a generic recursion, and this runs once per frame
        on the sink thread (it was the largest Python cost in the outbox bench).
        """
        m = self.model
        d: dict[str, Any] = {
            "id": self.id,
            "device_id": self.device_id,
            "source": self.source,
            "frame_index": self.frame_index,
            "frame_key": self.frame_key,
            "captured_at": self.captured_at,
            "captured_ts": self.captured_ts,
            "width": self.width,
            "height": self.height,
            "model": {"name": m.name, "sha256": m.sha256, "family": m.family, "engine": m.engine,
                      "provider": m.provider, "precision": m.precision, "input_size": list(m.input_size)},
            "inference_ms": self.inference_ms,
            "detections": [
                {"class_id": x.class_id, "label": x.label, "score": x.score, "box": list(x.box),
                 "box_norm": list(x.box_norm), "track_id": x.track_id}
                for x in self.detections
            ],
            "frame_sha256": self.frame_sha256,
            "frame_path": self.frame_path,
        }
        if self.media_time is not None:
            d["media_time"] = self.media_time
        d["schema_version"] = self.schema_version
        if self.extra:
            d["extra"] = copy.deepcopy(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

"""LabelRecord serialisation: the hand-written to_dict must equal the generic dataclass walk."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import jsonschema

from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, load_schema
from edgelabel.engines.base import Detection


def _record(extra=None, media_time=None) -> LabelRecord:
    model = ModelInfo("m", "0" * 64, "yolox", "onnxruntime", "CPUExecutionProvider", "fp32", (416, 416))
    dets = [DetectionRecord.from_detection(Detection(2, "car", 0.912345678, (1.0, 2.5, 30.25, 40.0)), 640, 480, 7),
            DetectionRecord.from_detection(Detection(0, "person", 0.5, (0.0, 0.0, 640.0, 480.0)), 640, 480)]
    return LabelRecord(id="r1", device_id="d", source="s", frame_index=3, frame_key="3", captured_at="2026-01-01T00:00:00Z",
                       captured_ts=1.5, width=640, height=480, model=model, inference_ms=4.2, detections=dets,
                       frame_sha256="f" * 64, frame_path="/x.jpg", media_time=media_time, extra=extra or {})


def _generic(record: LabelRecord) -> dict:
    d = asdict(record)
    d["model"]["input_size"] = list(record.model.input_size)
    if not d["extra"]:
        del d["extra"]
    if d["media_time"] is None:
        del d["media_time"]
    return d


def test_to_dict_matches_every_field_in_order():
    for extra in (None, {"review": {"reason": "low score", "scores": [0.3]}}):
        for media_time in (None, 0.0, 3.2):
            record = _record(extra, media_time)
            assert json.dumps(record.to_dict()) == json.dumps(_generic(record))


def test_to_dict_covers_new_fields():
    """A field added to a record class must be added to to_dict too (this fails until it is)."""
    names = [f.name for f in fields(LabelRecord)]
    assert list(_record({"x": 1}, media_time=1.0).to_dict()) == names
    assert list(_record().to_dict()["detections"][0]) == [f.name for f in fields(DetectionRecord)]
    assert list(_record().to_dict()["model"]) == [f.name for f in fields(ModelInfo)]


def test_extra_is_copied_not_shared():
    record = _record({"k": [1]})
    d = record.to_dict()
    d["extra"]["k"].append(2)
    assert record.extra == {"k": [1]}


def test_media_time_is_optional_in_the_v1_schema():
    """Video records carry media_time; image and camera records leave it out, as the first v1 records did."""
    validator = jsonschema.Draft202012Validator(load_schema())
    with_media = _record(media_time=3.2).to_dict()
    without = _record().to_dict()
    assert with_media["media_time"] == 3.2 and "media_time" not in without
    for doc in (with_media, without):
        doc["id"] = "6a1f6c8e-3b0e-5b7a-9d1e-2f4c8a9b0c11"
        doc["captured_at"] = "2026-01-01T00:00:00.000Z"
        assert not sorted(validator.iter_errors(doc), key=str)
    assert sorted(validator.iter_errors({**with_media, "media_time": -1.0}), key=str)

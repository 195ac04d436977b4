"""Zones and lines on scripted trajectories: exact counts and directions, no double count on jitter."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from edgelabel.edge.config import ConfigError, LineConfig, ZoneConfig, config_from_dict
from edgelabel.edge.zones import TrackedBox, ZoneCounter

SCHEMA = json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "zone-event.v1.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
W = H = 1000  # frame size; 1 % of the diagonal (the default hysteresis) is 14 px
T0 = 1_750_000_000.0
UID = "00000000-0000-4000-8000-000000000001"


def person(x: float, y: float, tid: int = 1, label: str = "person") -> TrackedBox:
    """A 40 x 100 box whose bottom centre (the default anchor) is at (x, y)."""
    return TrackedBox(tid, UID, 0 if label == "person" else 2, label, (x - 20, y - 100, x + 20, y))


def feed(counter: ZoneCounter, path: list[list[TrackedBox]], ended: dict[int, list[int]] | None = None):
    events = []
    for i, boxes in enumerate(path):
        events += counter.update(boxes, T0 + i * 0.1, W, H, f"rec-{i}", i, ended=(ended or {}).get(i, ()))
    for e in events:
        errors = sorted(VALIDATOR.iter_errors({**e, "device_id": "dev"}), key=str)
        assert not errors, errors[0]
    return events


def belt(**kw) -> ZoneCounter:
    return ZoneCounter("cam1", {}, {"belt": LineConfig(points=[[0.0, 0.5], [1.0, 0.5]], **kw)})


def test_a_line_counts_each_crossing_once_with_its_direction() -> None:
    down = [[person(500, y)] for y in range(300, 701, 50)]  # top to bottom: onto the right of the arrow
    up = [[person(500, y)] for y in range(700, 299, -50)]
    events = feed(counter := belt(), down + up)
    assert [(e["type"], e["line"], e["direction"], e["count"]) for e in events] == [
        ("line_cross", "belt", "right", 1), ("line_cross", "belt", "left", 1)]
    assert events[0]["point"] == [500.0, 550.0] and events[0]["frame_index"] == 5
    assert counter.counts()["lines"]["belt"]["by_class"] == {"person": {"right": 1, "left": 1}}


def test_jitter_on_the_line_does_not_double_count() -> None:
    wobble = [[person(500, 500 + (8 if i % 2 else -8))] for i in range(30)]  # +-8 px, inside the 14 px band
    path = [[person(500, 400)]] + wobble + [[person(500, 600)]] + wobble + [[person(500, 620)]]
    events = feed(belt(), path)
    assert [e["direction"] for e in events] == ["right"]
    # without hysteresis the same wobble counts every frame
    assert len(feed(belt(hysteresis=0.0), path)) > 20


def test_a_crossing_beside_the_segment_and_other_classes_do_not_count() -> None:
    short = ZoneCounter("cam1", {}, {"gate": LineConfig(points=[[0.0, 0.5], [0.3, 0.5]], classes=["car"])})
    beside = [[person(800, y, tid=1, label="car")] for y in range(300, 701, 100)]  # x = 0.8, gate ends at 0.3
    person_through = [[person(100, y, tid=2)] for y in range(300, 701, 100)]  # through it, but a person
    car_through = [[person(100, y, tid=3, label="car")] for y in range(300, 701, 100)]
    events = feed(short, beside + person_through + car_through)
    assert [(e["track_id"], e["label"], e["direction"]) for e in events] == [(3, "car", "right")]


def test_a_zone_reports_enter_and_exit_with_dwell_time_once() -> None:
    cell = ZoneCounter("cam1", {"cell": ZoneConfig(points=[[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6]])}, {})
    walk = [[person(x, 500)] for x in range(300, 501, 50)]  # into the cell (its left edge is x = 400)
    walk += [[person(400 + (6 if i % 2 else -6), 500)] for i in range(10)]  # back on the edge, jittering
    walk += [[person(x, 500)] for x in range(450, 751, 50)]  # through and out at the right edge (x = 600)
    events = feed(cell, walk)
    assert [(e["type"], e["zone"], e["count"]) for e in events] == [("zone_enter", "cell", 1), ("zone_exit", "cell", 1)]
    enter, leave = events
    assert enter["frame_index"] == 3  # x = 450: 50 px inside; x = 400 is on the edge
    assert leave["reason"] == "left" and leave["frame_index"] == 19  # x = 650
    assert leave["dwell_s"] == pytest.approx((19 - 3) * 0.1)
    assert cell.counts()["zones"]["cell"] == {"inside": 0, "by_class": {"person": {"enter": 1, "exit": 1}}}


def test_a_track_that_ends_or_a_source_that_stops_exits_the_zone() -> None:
    cell = ZoneCounter("cam1", {"cell": ZoneConfig(points=[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])}, {})
    path = [[person(500, 500, tid=1), person(300, 300, tid=2)]] * 3 + [[person(300, 300, tid=2)]] * 2
    events = feed(cell, path, ended={4: [1]})
    assert [(e["type"], e["track_id"]) for e in events] == [("zone_enter", 1), ("zone_enter", 2), ("zone_exit", 1)]
    assert events[-1]["reason"] == "track_end" and events[-1]["frame_index"] == 2  # its last frame inside
    assert cell.counts()["zones"]["cell"]["inside"] == 1
    stop = cell.finish(T0 + 1)
    assert [(e["type"], e["track_id"], e["reason"]) for e in stop] == [("zone_exit", 2, "source_stopped")]
    assert cell.counts()["zones"]["cell"]["inside"] == 0


def test_ignore_zones_drop_detections_of_their_classes_and_make_no_events() -> None:
    from edgelabel.engines.base import Detection

    poster = ZoneConfig(points=[[0.0, 0.0], [0.3, 0.0], [0.3, 0.3], [0.0, 0.3]], ignore=True, classes=["person"])
    counter = ZoneCounter("cam1", {"poster": poster}, {})
    dets = [Detection(0, "person", 0.9, (100, 100, 140, 200)),  # on the poster
            Detection(2, "car", 0.9, (100, 100, 180, 200)),  # on the poster, another class
            Detection(0, "person", 0.9, (600, 600, 640, 700))]  # elsewhere
    assert [d.label for d in counter.drop_ignored(dets, W, H)] == ["car", "person"]
    assert counter.drop_ignored(dets, W, H)[1].box[0] == 600
    assert feed(counter, [[person(120, 200)], [person(620, 700)]]) == []
    assert counter.counts() == {"zones": {}, "lines": {}}
    # an ignore zone needs no tracker
    cfg = config_from_dict({"model": {"path": "m.onnx"}, "tracking": {"enabled": False}, "sources": {"cam": {
        "uri": "/tmp/x.mp4", "zones": {"poster": {"points": [[0, 0], [0.3, 0], [0.3, 0.3]], "ignore": True}}}}})
    assert cfg.sources["cam"].zones["poster"].ignore


def test_zone_and_line_settings_are_checked_by_name() -> None:
    base = {"model": {"path": "m.onnx"}}
    good = {"uri": "/tmp/x.mp4", "zones": {"cell": {"points": [[0.1, 0.1], [0.5, 0.1], [0.5, 0.5]]}},
            "lines": {"belt": {"points": [[0, 600], [1920, 600]], "units": "pixels", "classes": ["car"]}}}
    cfg = config_from_dict({**base, "sources": {"cam": good}})
    assert cfg.sources["cam"].lines["belt"].units == "pixels"
    bad = {"uri": "/tmp/x.mp4", "zones": {"cell": {"points": [[0.1, 0.1], [1.5, 0.1], [0.5, 0.5]]}},
           "lines": {"belt": {"points": [[0, 0.5]]}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "sources": {"cam": bad}})
    text = str(exc.value)
    assert "sources.cam.zones.cell.points[1]" in text and "units: pixels" in text
    assert "sources.cam.lines.belt.points: exactly 2" in text
    with pytest.raises(ConfigError, match=r"sources.cam.zones: needs tracking"):
        config_from_dict({**base, "tracking": {"enabled": False}, "sources": {"cam": good}})


def test_the_daemon_publishes_zone_events_for_its_tracks(tmp_path: Path, assets: Path) -> None:
    """The real pipeline on a short clip with a zone over the whole frame: every track enters once and exits once."""
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sinks.base import Sink
    from tests.test_tracking import short_clip

    clip = short_clip(tmp_path, assets)

    class Recorder(Sink):
        name = "recorder"

        def __init__(self) -> None:
            self.ids: set[int] = set()
            self.seen: list[dict] = []
            self.persons = self.left_persons = 0

        def write(self, record, frame) -> None:  # noqa: ANN001
            self.ids.update(d.track_id for d in record.detections if d.track_id is not None)
            people = [d for d in record.detections if d.label == "person"]
            self.persons += len(people)
            self.left_persons += sum(1 for d in people if (d.box[0] + d.box[2]) / 2 < record.width / 2)

        def events(self, events) -> None:  # noqa: ANN001
            self.seen.extend(events)

    def run(zones: dict) -> tuple[Recorder, Pipeline]:
        cfg = config_from_dict({
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
            "sources": {"walk": {"uri": str(clip), "zones": zones}},
            "mqtt": {"enabled": False}, "dataset": {"enabled": False},
        }, base_dir=tmp_path)
        rec = Recorder()
        pipeline = Pipeline(cfg, extra_sinks=[rec], show_progress=False, fresh=True)
        assert pipeline.run() == 0
        return rec, pipeline

    # an ignore zone over the left half: no person whose feet are there is recorded, tracked or counted
    left = {"points": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]], "classes": ["person"], "ignore": True}
    everything = {"points": [[0, 0], [1, 0], [1, 1], [0, 1]], "classes": ["person"], "hysteresis": 0}
    rec_all, _ = run({"all": everything})
    rec_ign, _ = run({"left": left, "all": everything})
    assert 0 < rec_ign.persons < rec_all.persons and rec_ign.left_persons == 0 < rec_all.left_persons

    rec, pipeline = run({"all": everything})
    zone = [e for e in rec.seen if e["type"].startswith("zone_")]
    enters = {e["track_id"] for e in zone if e["type"] == "zone_enter"}
    exits = [e["track_id"] for e in zone if e["type"] == "zone_exit"]
    person_tracks = {e["track_id"] for e in rec.seen if e["type"] == "new" and e["label"] == "person"}
    assert person_tracks and enters == person_tracks and sorted(exits) == sorted(enters)
    for e in zone:
        errors = sorted(VALIDATOR.iter_errors({**e, "device_id": "dev"}), key=str)
        assert not errors, errors[0]
    counts = pipeline.zone_counts()["walk"]["zones"]["all"]
    assert counts["inside"] == 0 and counts["by_class"]["person"]["enter"] == len(enters)
    # the same counters in the status snapshot, which the stats topic, /api/status and /metrics read
    zones = pipeline.status()["zones"]
    assert zones == {"walk": {"zones": {"all": counts}, "lines": {}}}
    stats_schema = json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "stats.v1.json").read_text())
    jsonschema.validate(zones, {"$defs": stats_schema["$defs"], **stats_schema["properties"]["zones"]})


def test_zone_counters_become_prometheus_metrics() -> None:
    from edgelabel.web.metrics import EdgelabelCollector

    zones = {"cam1": {"zones": {"cell": {"inside": 2, "by_class": {"person": {"enter": 5, "exit": 3}}}},
                      "lines": {"belt": {"by_class": {"car": {"left": 4, "right": 1}}}}}}
    families = {m.name: m for m in EdgelabelCollector._zones(None, zones)}  # type: ignore[arg-type]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families.values() for s in m.samples}
    assert samples[("edgelabel_zone_inside", (("source", "cam1"), ("zone", "cell")))] == 2
    key = ("edgelabel_zone_events_total",
           (("class", "car"), ("event", "left"), ("kind", "line"), ("name", "belt"), ("source", "cam1")))
    assert samples[key] == 4
    assert len(samples) == 1 + 4


def test_the_live_view_shows_zones_and_lines() -> None:
    """The web page's live view (and dashboard thumbnail) of a source with zones and a line draws them."""
    import time

    import cv2
    import numpy as np

    from edgelabel.edge.annotate import IGNORE_COLOR, ZONE_COLOR
    from edgelabel.edge.frame import Frame
    from edgelabel.web.sink import WebSink
    from tests.helpers import label_record

    cfg = config_from_dict({"model": {"path": "m.onnx"}, "web": {"stream_width": 640}, "sources": {
        "cam": {"uri": "/tmp/x.mp4",
                "zones": {"cell": {"points": [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]},
                          "poster": {"points": [[10, 10], [200, 10], [200, 200]], "units": "pixels", "ignore": True}},
                "lines": {"belt": {"points": [[0, 0.9], [1, 0.9]]}}},
        "plain": {"uri": "/tmp/y.mp4"}}})
    sink = WebSink(cfg)
    sink.open()
    try:
        views = {}
        for name in ("cam", "plain"):
            frame = Frame(name, 0, np.zeros((720, 1280, 3), np.uint8), T0, f"{name}#0")
            sink.write(label_record(frame, [], "dev"), frame)
            deadline = time.monotonic() + 10
            jpeg = None
            while jpeg is None and time.monotonic() < deadline:
                _, jpeg = sink.wait_jpeg(name, 0, 1.0)
            assert jpeg is not None
            views[name] = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)
    finally:
        sink.close()

    def amber(img: np.ndarray) -> np.ndarray:  # ZONE_COLOR after JPEG: red and green high, blue well below
        b, g, r = img[..., 0], img[..., 1], img[..., 2]
        return (r > 120) & (g > 90) & (b < r - 60)

    def grey(img: np.ndarray) -> np.ndarray:  # IGNORE_COLOR after JPEG
        return (img.min(axis=-1) > 50) & (img.max(axis=-1) - img.min(axis=-1) < 40)

    assert ZONE_COLOR[2] > ZONE_COLOR[0] and len(set(IGNORE_COLOR)) == 1
    cam = views["cam"]  # 640 x 360: the cell's edges at x = 160 / 480 and y = 90 / 270, the belt at y = 324
    assert cam.shape[:2] == (360, 640)
    assert amber(cam[89:92, 200:440]).any(axis=0).mean() > 0.8 and amber(cam[200, 157:164]).any()
    assert amber(cam[322:327, 50:600]).any(axis=0).mean() > 0.8
    assert grey(cam[3:8, 10:100]).any(axis=0).mean() > 0.5  # the ignore zone (pixel units, halved) at y = 5
    assert not amber(views["plain"]).any() and not grey(views["plain"]).any()


def test_capture_can_be_gated_by_zones() -> None:
    """dataset.capture.sources.<name>.zones: only detections whose point is in those zones count."""
    import numpy as np

    from edgelabel.edge.capture import CaptureSelector
    from edgelabel.edge.frame import Frame
    from tests.helpers import label_record

    cfg = config_from_dict({"model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "/tmp/x.mp4", "zones": {
        "cell": {"points": [[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]], "classes": ["person"]}}}},
        "dataset": {"capture": {"sources": {"cam": {"zones": ["cell"]}}}}})
    selector = CaptureSelector(cfg.dataset.capture, {n: s.zones for n, s in cfg.sources.items()})
    frame = Frame("cam", 0, np.zeros((100, 200, 3), np.uint8), T0, "cam#0")

    def decide(*dets: tuple[int, tuple[float, float, float, float]]) -> bool:
        return selector.decide(label_record(frame, [(c, 0.9, b) for c, b in dets], "dev"), live=False).capture

    assert decide((0, (20, 10, 40, 45)))  # a person standing in the cell (feet at 30, 45)
    assert not decide((0, (20, 10, 40, 60)))  # feet below the cell
    assert not decide((0, (150, 10, 170, 45)))  # right of the cell
    assert not decide((2, (20, 10, 40, 45)))  # a car in the cell: the zone counts persons only
    assert decide((2, (20, 10, 40, 45)), (0, (60, 5, 80, 40)))
    assert selector.status()["cam"]["filtered_out"] == 3


def test_capture_zones_must_exist_on_their_source() -> None:
    base = {"model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "/tmp/x.mp4", "zones": {
        "cell": {"points": [[0, 0], [0.5, 0], [0.5, 0.5]]}, "poster": {"points": [[0, 0], [1, 0], [1, 1]], "ignore": True}}}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "dataset": {"capture": {"sources": {"cam": {"zones": ["cell", "door", "poster"]}},
                                                          "live": {"zones": ["cell"]}}}})
    text = str(exc.value)
    assert "dataset.capture.sources.cam.zones: 'door' is not a zone of source cam (its zones: cell" in text
    assert "'poster' is not a zone" in text  # an ignore zone drops detections; it cannot select frames
    assert "dataset.capture.live.zones: zones are per source" in text


def test_a_reload_that_changes_a_sources_zones_takes_effect_and_closes_the_old_stays() -> None:
    from edgelabel.edge.pipeline import Pipeline

    def cfg(zone_points: list[list[float]]):  # noqa: ANN202
        return config_from_dict({"model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "/tmp/x.mp4", "zones": {
            "cell": {"points": zone_points}}}, "plain": {"uri": "/tmp/y.mp4"}}})

    square = [[0, 0], [1, 0], [1, 1], [0, 1]]
    pipeline = Pipeline(cfg(square), show_progress=False)  # not started: only its zone bookkeeping is used
    counter, events = pipeline._zone_counter("cam")
    assert events == [] and pipeline._zone_counter("plain") == (None, [])
    counter.update([person(500, 500)], T0, W, H, "r0", 0)  # a track is inside
    pipeline.cfg = cfg(square)  # a reload with the same zones: same counter, nothing ends
    assert pipeline._zone_counter("cam") == (counter, [])
    pipeline.cfg = cfg([[0, 0], [0.5, 0], [0.5, 0.5]])
    again, events = pipeline._zone_counter("cam")
    assert again is not counter and [(e["type"], e["reason"]) for e in events] == [("zone_exit", "source_stopped")]
    assert pipeline.zone_counts()["cam"]["zones"]["cell"]["inside"] == 0

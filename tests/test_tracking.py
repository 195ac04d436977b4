"""The per-source tracker: stable ids, two-stage matching, class consistency, events and their rate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgelabel.edge.config import TrackingConfig
from edgelabel.edge.records import record_id
from edgelabel.edge.tracking import Tracker, TrackIdStore, iou_matrix, optimal_match
from edgelabel.engines.base import Detection

EVENT_SCHEMA = json.loads((Path(__file__).parent.parent / "edge" / "schemas" / "event.v1.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)
T0 = 1_750_000_000.0


def det(box, score: float = 0.9, class_id: int = 0, label: str = "person") -> Detection:
    return Detection(class_id, label, score, tuple(float(v) for v in box))


def rid(i: int) -> str:
    return record_id("dev", "cam1", f"cam1#{i}")


def run(tracker: Tracker, frames, fps: float = 10.0, start: int = 0):
    """Feed frames (lists of detections); returns per-frame ids and all events."""
    all_ids, events = [], []
    for k, dets in enumerate(frames):
        i = start + k
        ids, evs = tracker.update(dets, T0 + i / fps, rid(i), i)
        all_ids.append(ids)
        events += evs
    return all_ids, events


def valid(ev: dict) -> dict:
    doc = {**ev, "device_id": "dev"}  # the MQTT sink adds the device
    errors = sorted(VALIDATOR.iter_errors(doc), key=str)
    assert not errors, errors[0]
    return ev


def test_iou_and_optimal_matching() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], float)
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1] == pytest.approx(50 / 150) and m[1, 2] == 0.0
    assert iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)
    # the assignment maximises the total: greedy would take (0, 0) first and leave row 1 unmatched
    scores = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(optimal_match(scores, 0.3)) == [(0, 1), (1, 0)]
    assert sorted(optimal_match(np.array([[0.9, 0.8], [0.85, 0.8]]), 0.3)) == [(0, 0), (1, 1)]
    # a pair under the threshold is never returned, and does not distort the others
    assert optimal_match(np.array([[0.2]]), 0.3) == []
    assert optimal_match(np.array([[0.9, 0.25], [0.5, 0.0]]), 0.3) == [(0, 0)]
    assert optimal_match(np.zeros((0, 3)), 0.3) == []


def test_ids_stay_stable_for_a_moving_box_and_confirm_after_min_hits() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=2))
    frames = [[det((100 + 8 * i, 50, 180 + 8 * i, 210))] for i in range(30)]
    ids, events = run(tracker, frames)
    assert ids[0] == [None]  # one detection is not a track yet
    assert {i[0] for i in ids[1:]} == {1}
    new = [e for e in events if e["type"] == "new"]
    assert len(new) == 1 and new[0]["track_id"] == 1 and new[0]["hits"] == 2
    assert new[0]["record_id"] == rid(1) and new[0]["frame_index"] == 1
    assert tracker.confirmed == 1


def test_a_fast_object_is_followed_by_its_velocity() -> None:
    """An 80 px box accelerating to 60 px per frame: consecutive boxes overlap far less than tracking.iou."""
    speeds = [20, 30, 40, 50] + [60] * 10
    xs = [0] + list(itertools.accumulate(speeds))
    frames = [[det((x, 100, x + 80, 180))] for x in xs]
    raw = [iou_matrix(np.array([a[0].box]), np.array([b[0].box]))[0, 0] for a, b in zip(frames[:-1], frames[1:], strict=True)]
    assert max(raw[4:]) < 0.15  # without a prediction these would never match at iou 0.3
    ids, events = run(Tracker("cam1", TrackingConfig(min_hits=2, iou=0.3)), frames)
    assert {i[0] for i in ids[1:]} == {1}
    assert [e["type"] for e in events] == ["new"]


def test_two_objects_keep_separate_ids() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=1))
    frames = [[det((10 + 5 * i, 10, 60 + 5 * i, 100)), det((300 - 5 * i, 10, 350 - 5 * i, 100))] for i in range(10)]
    ids, events = run(tracker, frames)
    assert all(i == [1, 2] for i in ids)
    assert [e["track_id"] for e in events if e["type"] == "new"] == [1, 2]
    # detection order inside a frame does not matter
    ids2, _ = tracker.update(list(reversed(frames[-1])), T0 + 1.0, rid(10), 10)
    assert ids2 == [2, 1]


def test_new_update_end_events_with_confidence_and_best_frame() -> None:
    cfg = TrackingConfig(min_hits=3, update_interval=1.0, max_age=0.5)
    tracker = Tracker("cam1", cfg)
    scores = [0.6, 0.7, 0.95, 0.8] + [0.75] * 31  # 35 frames = 3.4 s at 10 fps
    frames = [[det((100 + i, 100, 200 + i, 300), s)] for i, s in enumerate(scores)]
    frames += [[] for _ in range(10)]  # gone
    _, events = run(tracker, frames)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "new" and kinds[-1] == "end" and kinds.count("new") == 1 and kinds.count("end") == 1
    for e in events:
        valid(e)
    new = events[0]
    assert new["frame_index"] == 2 and new["hits"] == 3
    updates = [e for e in events if e["type"] == "update"]
    # one update per second while matched (new at t=0.2 s, last match at 3.4 s)
    assert [u["frame_index"] for u in updates] == [12, 22, 32]
    end = events[-1]
    assert end["end_reason"] == "lost" and end["hits"] == 35
    assert end["last_ts"] == pytest.approx(T0 + 3.4) and end["first_ts"] == pytest.approx(T0)
    assert end["duration_s"] == pytest.approx(3.4)
    assert end["confidence"] == pytest.approx(float(np.mean(scores)), abs=1e-4) and end["score_max"] == 0.95
    best = end["best"]
    assert best["record_id"] == rid(2) and best["frame_index"] == 2 and best["score"] == 0.95
    assert best["box"] == [102.0, 100.0, 202.0, 300.0]
    assert end["record_id"] == rid(34) and end["box"] == [134.0, 100.0, 234.0, 300.0]
    # the end comes once max_age (0.5 s) has passed without a match: at the 6th empty frame (3.4 + 0.6 s)
    assert end["at"] > end["last_seen"]
    assert len({e["id"] for e in events}) == len(events)  # every event has its own id
    assert len({e["track_uid"] for e in events}) == 1


@pytest.mark.parametrize(("interval", "expected"), [(0.0, 16), (0.5, 2), (5.0, 0)])
def test_update_events_are_rate_limited_per_track(interval: float, expected: int) -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=2, update_interval=interval))
    frames = [[det((100, 100, 200, 200)), det((400, 100, 500, 200), class_id=2, label="car")] for _ in range(10)]
    _, events = run(tracker, frames)  # 1 s at 10 fps: confirmed at frame 1, then 8 matched frames per track
    updates = [e for e in events if e["type"] == "update"]
    per_track = {1: 0, 2: 0}
    for u in updates:
        per_track[u["track_id"]] += 1
    assert len(updates) == expected
    assert per_track[1] == per_track[2]  # each track has its own clock


def test_a_class_switch_starts_a_new_track_and_the_old_one_ends() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=2, max_age=0.3))
    box = (100, 100, 200, 200)
    frames = [[det(box, class_id=2, label="car")] for _ in range(5)]
    frames += [[det(box, class_id=7, label="truck")] for _ in range(6)]
    ids, events = run(tracker, frames)
    assert [i[0] for i in ids] == [None, 1, 1, 1, 1, None, 2, 2, 2, 2, 2]
    new = [e for e in events if e["type"] == "new"]
    assert [(e["track_id"], e["label"]) for e in new] == [(1, "car"), (2, "truck")]
    ends = [e for e in events if e["type"] == "end"]
    assert [(e["track_id"], e["label"], e["end_reason"]) for e in ends] == [(1, "car", "lost")]


def test_low_scores_keep_a_confirmed_track_alive_but_never_start_one() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=2, high_score=0.5, max_age=0.15))
    frames = [[det((100, 100, 200, 200), 0.9)]] * 3 + [[det((102, 100, 202, 200), 0.3)]] * 5  # partly hidden
    frames += [[det((500, 100, 600, 200), 0.3)]] * 5  # a weak false positive elsewhere
    ids, events = run(tracker, frames)
    assert [i[0] for i in ids[:8]] == [None, 1, 1, 1, 1, 1, 1, 1]
    assert all(i == [None] for i in ids[8:])  # weak detections alone never become a track
    assert [e["type"] for e in events] == ["new", "end"]


def test_finish_ends_confirmed_tracks_only_and_ids_keep_counting() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=2))
    run(tracker, [[det((0, 0, 50, 50)), det((100, 0, 150, 50))]] * 3)
    tracker.update([det((300, 0, 350, 50))], T0 + 0.3, rid(3), 3)  # unconfirmed
    events = tracker.finish(T0 + 0.4)
    assert [(e["type"], e["track_id"], e["end_reason"]) for e in events] == [("end", 1, "finished"), ("end", 2, "finished")]
    for e in events:
        valid(e)
    assert tracker.finish(T0 + 0.5) == [] and tracker.confirmed == 0
    ids, _ = run(tracker, [[det((0, 0, 50, 50))]] * 2, start=10)
    assert ids[1] == [3]  # ids are never reused while the daemon runs


def test_empty_frames_and_a_clock_step_back_are_harmless() -> None:
    tracker = Tracker("cam1", TrackingConfig(min_hits=1, max_age=1.0))
    assert tracker.update([], T0, rid(0), 0) == ([], [])
    ids, _ = tracker.update([det((0, 0, 10, 10))], T0 + 1, rid(1), 1)
    ids2, events = tracker.update([det((0, 0, 10, 10))], T0 - 100, rid(2), 2)  # NTP stepped back
    assert ids == ids2 == [1] and not [e for e in events if e["type"] == "end"]


def test_finish_defaults_to_the_last_frame_time() -> None:
    """A file runs on media time: tracks end at its last frame, not at the wall clock of the end of labeling."""
    tracker = Tracker("cam1", TrackingConfig(min_hits=2))
    run(tracker, [[det((10 + i, 10, 50 + i, 90))] for i in range(5)])  # frames at T0 .. T0 + 0.4
    (end,) = tracker.finish()
    assert end["type"] == "end" and end["end_reason"] == "finished"
    assert end["at"] == end["last_seen"] and end["last_ts"] == pytest.approx(T0 + 0.4)
    assert tracker.finish() == []


def walker(x0: float, y0: float, vx: float, vy: float = 0.0, w: float = 50, h: float = 120):
    """A box moving at (vx, vy) pixels per second: its detection at time t (seconds)."""
    def at(t: float, **kw) -> Detection:
        x, y = x0 + vx * t, y0 + vy * t
        return det((x, y, x + w, y + h), **kw)
    return at


@pytest.mark.parametrize("hidden", [5, 15, 25])
def test_identity_is_kept_through_an_occlusion_of_n_frames(hidden: int) -> None:
    """A walker hidden for ``hidden`` frames at 30 fps reappears where the Kalman filter expects it, same id.

    At 300 px/s a 50 px wide box has moved 50 to 250 px while hidden: without a motion model it would
    overlap nothing it left behind.
    """
    fps = 30.0
    a = walker(0, 100, 300)
    frames = [[a(i / fps)] if not 20 <= i < 20 + hidden else [] for i in range(60)]
    ids, events = run(Tracker("cam1", TrackingConfig(min_hits=2, max_age=1.0)), frames, fps=fps)
    seen = {i[0] for i in ids[1:] if i}
    assert seen == {1}
    assert [e["type"] for e in events] == ["new"]


def test_an_occlusion_longer_than_max_age_ends_the_track() -> None:
    fps = 30.0
    a = walker(0, 100, 300)
    frames = [[a(i / fps)] if not 20 <= i < 35 else [] for i in range(50)]  # 0.5 s hidden
    ids, events = run(Tracker("cam1", TrackingConfig(min_hits=2, max_age=0.3)), frames, fps=fps)
    assert [e["type"] for e in events] == ["new", "end", "new"]
    assert ids[19] == [1] and ids[36] == [2]


def test_two_people_crossing_keep_their_ids() -> None:
    """Two walkers pass each other; the one behind is hidden for the frames where they overlap most."""
    fps = 30.0
    a = walker(0, 100, 240)  # left to right
    b = walker(600, 110, -240)  # right to left, a bit lower
    frames = []
    for i in range(75):
        t = i / fps
        da, db = a(t), b(t)
        overlap = iou_matrix(np.array([da.box]), np.array([db.box]))[0, 0]
        frames.append([da] if overlap > 0.3 else [db, da])  # b is behind a while they overlap
    ids, events = run(Tracker("cam1", TrackingConfig(min_hits=2, max_age=1.0)), frames, fps=fps)
    tracks_a = {f[-1] for f in ids[1:]}
    tracks_b = {f[0] for f in ids[1:] if len(f) == 2}
    assert len(tracks_a) == 1 and len(tracks_b) == 1 and tracks_a != tracks_b and None not in tracks_a
    assert any(len(f) == 1 for f in frames)  # the crossing did hide b
    assert [e["type"] for e in events] == ["new", "new"]


def test_matching_is_class_aware_when_boxes_of_two_classes_overlap() -> None:
    """A person riding past a parked bicycle: the boxes overlap, each keeps its class and id."""
    person = walker(0, 100, 150)
    bike = det((100, 130, 200, 220), class_id=1, label="bicycle")
    frames = [[person(i / 10), bike] if i % 3 else [bike, person(i / 10)] for i in range(20)]
    ids, _ = run(Tracker("cam1", TrackingConfig(min_hits=1)), frames)
    assert iou_matrix(np.array([person(1.0).box]), np.array([bike.box]))[0, 0] > 0.3  # they do overlap
    per_frame = [{d.label: tid for d, tid in zip(f, i, strict=True)} for f, i in zip(frames, ids, strict=True)]
    assert all(got == per_frame[0] for got in per_frame) and sorted(per_frame[0].values()) == [1, 2]


def test_irregular_timestamps_and_dt_zero() -> None:
    """Jittered frame times, dropped frames and repeated timestamps: one track, a prediction on the path.

    The box moves at a constant speed in media time, so positions follow the timestamps, not the
    frame count; a tracker that assumed a fixed frame interval would predict the wrong place after
    every gap.
    """
    rng = np.random.default_rng(7)
    a = walker(0, 100, 250, 30)  # a gap of 4 frames moves the 50 px wide box by 33 px
    ts, t = [], 0.0
    for _ in range(80):
        t += float(rng.choice([0.0, 1 / 30, 1 / 30, 2 / 30, 4 / 30])) + float(rng.uniform(-0.004, 0.004))
        ts.append(max(t, 0.0))
    tracker = Tracker("cam1", TrackingConfig(min_hits=2, max_age=1.0))
    got, events = set(), []
    for i, t in enumerate(ts):
        ids, evs = tracker.update([a(t)], T0 + t, rid(i), i)
        got.update(ids)
        events += evs
    assert got - {None} == {1} and [e["type"] for e in events] == ["new"]
    # the filter's velocity is in pixels per second: predicting 0.2 s ahead lands on the true box
    tracker.update([], T0 + ts[-1] + 0.2, rid(99), 99)
    (tid, box), = tracker.predicted_boxes()
    truth = a(ts[-1] + 0.2).box
    assert tid == 1 and np.all(np.isfinite(box))
    assert abs(box[0] - truth[0]) < 10 and abs(box[1] - truth[1]) < 10


def test_weak_detections_below_low_score_are_ignored_and_new_tracks_need_new_track_score() -> None:
    cfg = TrackingConfig(min_hits=1, high_score=0.5, low_score=0.2, new_track_score=0.7)
    tracker = Tracker("cam1", cfg)
    ids, _ = tracker.update([det((0, 0, 50, 50), 0.6)], T0, rid(0), 0)
    assert ids == [None]  # strong, but not enough to start a track
    ids, _ = tracker.update([det((0, 0, 50, 50), 0.8)], T0 + 0.1, rid(1), 1)
    assert ids == [1]
    ids, _ = tracker.update([det((0, 0, 50, 50), 0.3)], T0 + 0.2, rid(2), 2)
    assert ids == [1]  # weak keeps it alive
    ids, _ = tracker.update([det((0, 0, 50, 50), 0.1)], T0 + 0.3, rid(3), 3)
    assert ids == [None]  # below low_score: not seen by the tracker


def test_contradicting_tracking_settings_are_rejected_by_name() -> None:
    from edgelabel.edge.config import ConfigError, config_from_dict

    base = {"model": {"path": "m.onnx"}, "sources": {"cam1": {"uri": "file:///tmp/x.mp4"}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "tracking": {"low_score": 0.6, "high_score": 0.5}})
    assert "tracking.low_score" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "tracking": {"new_track_score": 0.2}})
    assert "tracking.new_track_score" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "tracking": {"low_iou": 1.5}})
    assert "tracking.low_iou" in str(exc.value)
    per_source = {"cam1": {"uri": "file:///tmp/x.mp4", "tracking": {"low_score": 0.6}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**base, "sources": per_source})
    assert "sources.cam1.tracking.low_score: 0.6 is above sources.cam1.tracking.high_score" in str(exc.value)


# --------------------------------------------------------------------------- ids across restarts


def test_track_ids_continue_after_a_restart_and_are_per_source(tmp_path: Path) -> None:
    path = tmp_path / "state" / "track-ids.json"
    store = TrackIdStore(path, block=3)
    assert [store.next_id("cam1") for _ in range(4)] == [1, 2, 3, 4]
    assert store.next_id("cam2") == 1
    assert json.loads(path.read_text())["next"] == {"cam1": 7, "cam2": 4}  # reserved blocks, not every id
    # a restart (or a crash) resumes at the reserved mark: ids 5 and 6 are skipped, never reused
    again = TrackIdStore(path, block=3)
    assert again.next_id("cam1") == 7 and again.next_id("cam2") == 4
    # through the tracker: the first track after the restart gets a fresh id
    tracker = Tracker("cam1", TrackingConfig(min_hits=1), ids=TrackIdStore(path, block=3))
    ids, events = tracker.update([det((0, 0, 50, 50))], T0, rid(0), 0)
    assert ids == [10] and events[0]["track_id"] == 10


def test_an_unreadable_id_file_is_logged_and_counting_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "track-ids.json"
    path.write_text("{not json")
    store = TrackIdStore(path)
    assert "track-ids.json" in caplog.text and "Delete the file" in caplog.text
    assert store.next_id("cam1") == 1
    assert json.loads(path.read_text())["next"] == {"cam1": 1001}  # rewritten whole


def short_clip(tmp_path: Path, assets: Path, frames: int = 8) -> Path:
    """The first frames of people-walking.mp4 as a clip of its own (a pipeline run of a second or two)."""
    import cv2

    clip = tmp_path / "clip.mp4"
    cap = cv2.VideoCapture(str(assets / "videos" / "people-walking.mp4"))
    ok, frame = cap.read()
    out = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 25, (frame.shape[1], frame.shape[0]))
    for _ in range(frames):
        out.write(frame)
        ok, frame = cap.read()
    out.release()
    cap.release()
    return clip


def test_the_daemon_keeps_track_ids_unique_across_restarts(tmp_path: Path, assets: Path) -> None:
    """Two runs of the real pipeline on one state dir: the second run's track ids are all new."""
    from edgelabel.edge.config import config_from_dict
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sinks.base import Sink

    clip = short_clip(tmp_path, assets)

    class Ids(Sink):
        name = "ids"

        def __init__(self) -> None:
            self.ids: set[int] = set()

        def write(self, record, frame) -> None:  # noqa: ANN001
            self.ids.update(d.track_id for d in record.detections if d.track_id is not None)

    runs = []
    for _ in range(2):
        cfg = config_from_dict({
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
            "sources": {"walk": {"uri": str(clip)}},
            "mqtt": {"enabled": False}, "dataset": {"enabled": False},
        }, base_dir=tmp_path)
        sink = Ids()
        assert Pipeline(cfg, extra_sinks=[sink], show_progress=False, fresh=True).run() == 0
        runs.append(sink.ids)
    assert runs[0] and runs[1]
    assert min(runs[1]) > max(runs[0])
    assert (tmp_path / "state" / "track-ids.json").is_file()


def test_a_lost_track_that_a_newer_track_took_over_ends_at_once() -> None:
    """The same object under a second id: the lost first id ends instead of waiting to take the box back.

    A detection that moved 20 px while its score fell is too weak to match the old track (IoU 0.67 x
    score 0.35 < tracking.iou), so it starts a second track; once that one is confirmed on top of the
    lost one, the lost one ends (it would otherwise be matched again later: an id switch).
    """
    cfg = TrackingConfig(min_hits=2, high_score=0.3, new_track_score=0.3, iou=0.25, max_age=3.0)
    tracker = Tracker("cam1", cfg)
    frames = [[det((100, 100, 200, 300), 0.9)]] * 5 + [[det((120, 100, 220, 300), 0.35)]] * 3
    ids, events = run(tracker, frames)
    assert [i[0] for i in ids] == [None, 1, 1, 1, 1, None, 2, 2]
    assert [(e["type"], e["track_id"]) for e in events] == [("new", 1), ("new", 2), ("end", 1)]
    assert events[2]["at"] == events[1]["at"]  # in the frame that confirmed the second track, not max_age later
    assert events[2]["end_reason"] == "lost" and events[2]["frame_index"] == 4
    assert tracker.confirmed == 1


def test_a_source_can_have_its_own_tracking_settings(tmp_path: Path, assets: Path) -> None:
    """sources.<name>.tracking replaces the top-level section for that source: here it turns tracking off."""
    from edgelabel.edge.config import config_from_dict
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sinks.base import Sink

    clip = short_clip(tmp_path, assets)

    class Ids(Sink):
        name = "ids"

        def __init__(self) -> None:
            self.ids: dict[str, set[int | None]] = {"on": set(), "off": set()}

        def write(self, record, frame) -> None:  # noqa: ANN001
            self.ids[record.source].update(d.track_id for d in record.detections)

    cfg = config_from_dict({
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": {"on": {"uri": str(clip)}, "off": {"uri": str(clip), "tracking": {"enabled": False}}},
        "mqtt": {"enabled": False}, "dataset": {"enabled": False},
    }, base_dir=tmp_path)
    sink = Ids()
    assert Pipeline(cfg, extra_sinks=[sink], show_progress=False).run() == 0
    assert sink.ids["off"] == {None} and len(sink.ids["on"] - {None}) >= 3

"""The per-source tracker: stable ids, two-stage matching, class consistency, events and their rate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge.config import TrackingConfig
from edge.records import record_id
from edge.tracking import Tracker, greedy_match, iou_matrix
from engines.base import Detection

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


def test_iou_and_greedy_matching() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], float)
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1] == pytest.approx(50 / 150) and m[1, 2] == 0.0
    assert iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)
    # greedy takes the best pair first and uses each row/column once
    scores = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_match(scores, 0.3) == [(0, 0)]  # (1, 0) and (0, 1) lose: their row or column is taken
    assert greedy_match(np.array([[0.9, 0.8], [0.85, 0.7]]), 0.3) == [(0, 0), (1, 1)]
    assert greedy_match(np.array([[0.2]]), 0.3) == []


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

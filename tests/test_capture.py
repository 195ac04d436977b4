"""Capture policies: the rules alone (synthetic records), then on a shared video through the real pipeline.

The video test runs YOLOX-nano once over ``videos/cars.mp4`` with several dataset sinks side by side,
each with its own policy, plus a sink that records every label record and track event.  The expected
count of every policy is computed here from those records, written out plainly rather than with
edge.capture, and compared with what each dataset's index holds.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgelabel.edge.capture import AUTO_ACCEPTED, NEEDS_REVIEW, CapturePolicy, CaptureSelector, RateLimiter, describe, uncertainty
from edgelabel.edge.config import (
    BandConfig,
    CaptureConfig,
    CaptureSection,
    ConfigError,
    DatasetConfig,
    RateConfig,
    config_from_dict,
)
from edgelabel.edge.frame import Frame
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo
from edgelabel.edge.sinks.base import Sink
from edgelabel.edge.sinks.dataset import DatasetSink
from tests.conftest import ASSETS

MODEL = ModelInfo("m", "0" * 64, "yolox", "onnxruntime", "CPUExecutionProvider", "fp32", (416, 416))


def rec(i: int, dets: list[tuple[str, float, int | None]], ts: float | None = None, source: str = "cam") -> LabelRecord:
    """A record with detections given as (label, score, track id); class ids follow the labels."""
    ids = {"person": 0, "bicycle": 1, "car": 2, "motorcycle": 3, "bus": 5, "train": 6, "truck": 7}
    return LabelRecord(
        id=f"00000000-0000-5000-8000-{i:012d}", device_id="d", source=source, frame_index=i, frame_key=f"k{i}",
        captured_at="2026-01-01T00:00:00.000Z", captured_ts=1_800_000_000.0 + i if ts is None else ts,
        width=100, height=100, model=MODEL, inference_ms=1.0,
        detections=[DetectionRecord(ids.get(lab, 9), lab, s, [1.0, 1.0, 9.0, 9.0], [0.01, 0.01, 0.09, 0.09], t)
                    for lab, s, t in dets])


# --------------------------------------------------------------------------- rules


def test_rate_limiter_sliding_windows() -> None:
    lim = RateLimiter(RateConfig(per_minute=3, per_hour=5))
    assert [lim.allow(t) for t in (0, 1, 2, 3, 59.9)] == [True, True, True, False, False]
    assert lim.allow(60.0)  # the frame at t=0 left the minute
    assert lim.allow(61.0)  # 5 in the hour now
    assert not lim.allow(125.0) and not lim.allow(3599.0)  # the minute has room, the hour has not
    assert lim.allow(3600.0)  # t=0 left the hour
    day = RateLimiter(RateConfig(per_day=2))
    assert [day.allow(t) for t in (0, 10, 86_399, 86_400, 86_410)] == [True, True, False, True, True]
    back = RateLimiter(RateConfig(per_minute=1))
    assert back.allow(100.0) and not back.allow(50.0)  # a clock that steps back does not reopen the window
    assert RateLimiter(RateConfig()).allow(0) and not RateLimiter(RateConfig()).active


def test_no_trigger_means_every_frame_auto_accepted() -> None:
    p = CapturePolicy(CaptureConfig())
    decisions = [p.decide(rec(i, [("car", 0.3, None)] * (i % 3))) for i in range(10)]
    assert all(d.capture and d.state == AUTO_ACCEPTED and d.reasons == ("all",) for d in decisions)
    assert p.counts["captured"] == 10 and p.counts["needs_review"] == 0


def test_filters_classes_and_detection_counts() -> None:
    p = CapturePolicy(CaptureConfig(classes=["car"], min_detections=2, max_detections=3))
    frames = {
        0: [("person", 0.9, None)] * 4,  # no car: out
        1: [("car", 0.9, None)],  # one car: too few
        2: [("car", 0.9, None)] * 2 + [("person", 0.9, None)] * 5,  # two cars (persons do not count): in
        3: [("car", 0.9, None)] * 3,  # in
        4: [("car", 0.9, None)] * 4,  # too many
    }
    kept = [i for i, dets in frames.items() if p.decide(rec(i, dets)).capture]
    assert kept == [2, 3]
    assert p.counts["filtered_out"] == 3


def test_every_n_counts_filtered_frames() -> None:
    p = CapturePolicy(CaptureConfig(every_n=3, classes=["car"]))
    seq = [[("car", 0.9, None)] if i % 2 == 0 else [] for i in range(20)]  # cars on even frames only
    kept = [i for i, dets in enumerate(seq) if p.decide(rec(i, dets)).capture]
    assert kept == [0, 6, 12, 18]  # the 1st, 4th, 7th, 10th frame with a car


def test_near_threshold_band_goes_to_review_most_uncertain_first() -> None:
    band = BandConfig(low=0.3, high=0.5)
    p = CapturePolicy(CaptureConfig(near_threshold=band))
    assert not p.decide(rec(0, [("car", 0.8, None)])).capture  # only the band triggers
    at_centre = p.decide(rec(1, [("car", 0.4, None), ("car", 0.9, None)]))
    near_edge = p.decide(rec(2, [("car", 0.31, None)]))
    assert at_centre.capture and at_centre.state == NEEDS_REVIEW and at_centre.reasons == ("near_threshold",)
    assert at_centre.uncertainty == pytest.approx(1.0) and near_edge.uncertainty == pytest.approx(0.1)
    assert not p.decide(rec(3, [("car", 0.5, None)])).capture  # the band is [low, high)
    assert uncertainty(0.5, None) == 1.0 and uncertainty(0.75, None) == 0.5 and uncertainty(0.9, band) == 0.0
    # review: none keeps them as auto_accepted, review: all sends everything captured to review
    assert CapturePolicy(CaptureConfig(near_threshold=band, review="none")).decide(rec(4, [("car", 0.4, None)])).state \
        == AUTO_ACCEPTED
    assert CapturePolicy(CaptureConfig(review="all")).decide(rec(5, [("car", 0.9, None)])).state == NEEDS_REVIEW
    # another trigger on a frame with an uncertain detection still sends it to review
    both = CapturePolicy(CaptureConfig(every_n=1, near_threshold=band)).decide(rec(6, [("car", 0.35, None)]))
    assert both.state == NEEDS_REVIEW and set(both.reasons) == {"every_n", "near_threshold"}


def test_new_tracks_are_the_first_appearance_of_an_id() -> None:
    p = CapturePolicy(CaptureConfig(new_tracks=True, classes=["car"]))
    seq = [
        [("car", 0.9, None)],  # not yet a track
        [("car", 0.9, 1)],  # track 1 confirmed: new
        [("car", 0.9, 1)],
        [("car", 0.9, 1), ("person", 0.9, 2)],  # a new person track: not a counted class
        [("car", 0.9, 1), ("person", 0.9, 2), ("car", 0.8, 3)],  # track 3: new
        [("car", 0.9, 3)],
    ]
    kept = [i for i, dets in enumerate(seq) if p.decide(rec(i, dets)).capture]
    assert kept == [1, 4]


def test_random_is_reproducible_with_a_seed_and_roughly_that_share() -> None:
    records = [rec(i, []) for i in range(2000)]

    def run(seed: int | None) -> list[int]:
        p = CapturePolicy(CaptureConfig(random=10.0, seed=seed), source="cam")
        return [r.frame_index for r in records if p.decide(r).capture]

    a, b, c = run(42), run(42), run(43)
    assert a == b and a != c
    assert 140 <= len(a) <= 260  # 200 expected; this band is > 99.9 % of Binomial(2000, 0.1)


def test_rate_limit_has_the_last_word() -> None:
    p = CapturePolicy(CaptureConfig(rate=RateConfig(per_minute=5)))
    # 30 frames a second for 2 minutes: 5 in each minute
    kept = [i for i in range(3600) if p.decide(rec(i, [], ts=1_800_000_000.0 + i / 30)).capture]
    assert len(kept) == 10 and kept[:5] == [0, 1, 2, 3, 4] and kept[5] == 1800
    assert p.counts["limited"] == 3590


def test_disabled_policy_and_selector_defaults() -> None:
    assert not CapturePolicy(CaptureConfig(enabled=False)).decide(rec(0, [("car", 0.4, 1)])).capture
    section = CaptureSection(sources={"gate": CaptureConfig(every_n=2)})
    sel = CaptureSelector(section)
    # storage sources: every frame; a score in the near-threshold band sends it to review, a sure one does not
    near = [sel.decide(rec(i, [("car", 0.4, None)], source="clip"), live=False) for i in range(5)]
    sure = [sel.decide(rec(i, [("car", 0.9, None)], source="clip"), live=False) for i in range(5, 10)]
    assert all(d.capture and d.state == NEEDS_REVIEW for d in near)
    assert all(d.capture and d.state == AUTO_ACCEPTED for d in sure)
    # live sources: the sampled default (every 300th frame, uncertain scores, new tracks, rate limits)
    live = section.live
    assert (live.every_n, live.new_tracks, live.near_threshold) == (300, True, BandConfig(0.25, 0.5))
    assert (live.rate.per_minute, live.rate.per_hour, live.rate.per_day) == (12, 240, 2000)
    cam = [sel.decide(rec(i, [("car", 0.9, None)], source="cam"), live=True).capture for i in range(600)]
    assert cam.count(True) == 2  # frames 0 and 300 (the rest have a confident car and no new track)
    # a per-source policy replaces the default
    assert [sel.decide(rec(i, [], source="gate"), live=True).capture for i in range(4)] == [True, False, True, False]
    st = sel.status()
    assert st["clip"]["captured"] == 10 and st["clip"]["needs_review"] == 5 and st["cam"]["frames"] == 600 and st["gate"]["captured"] == 2
    assert "every 300th frame" in describe(live) and "<= 12/minute" in describe(live)


def test_capture_config_is_validated() -> None:
    base = {"model": {"path": "m.onnx"}, "sources": {"a": {"uri": "/tmp/in/"}}}
    cfg = config_from_dict({**base, "dataset": {"capture": {"sources": {"a": {
        "near_threshold": {"low": 0.3, "high": 0.6}, "classes": "car,truck", "rate": {"per_hour": 10}}}}}})
    a = cfg.dataset.capture.sources["a"]
    assert a.classes == ["car", "truck"] and a.near_threshold == BandConfig(0.3, 0.6) and a.rate.per_hour == 10
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "dataset": {"capture": {"live": {
            "near_threshold": {"low": 0.6, "high": 0.3}, "min_detections": 3, "max_detections": 1, "review": "maybe",
            "random": 150}}}})
    text = str(err.value)
    for needle in ("dataset.capture.live.near_threshold: low 0.6 must be below high 0.3",
                   "dataset.capture.live.max_detections: 1 is below min_detections 3",
                   "dataset.capture.live.review: 'maybe' is not allowed", "dataset.capture.live.random: 150"):
        assert needle in text, text


# --------------------------------------------------------------------------- on a shared video


class Recorder(Sink):
    """Keeps what the policies see: each record's detections and time, and the tracker's events."""

    name = "recorder"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events_seen: list[dict[str, Any]] = []

    def write(self, record: LabelRecord, frame: Frame) -> None:
        self.records.append({"id": record.id, "index": record.frame_index, "ts": record.captured_ts,
                             "dets": [(d.label, d.score, d.track_id) for d in record.detections]})

    def events(self, events: list[dict[str, Any]]) -> None:
        self.events_seen.extend(events)


POLICIES: dict[str, CaptureConfig] = {
    "every10": CaptureConfig(every_n=10),
    "band": CaptureConfig(near_threshold=BandConfig(0.3, 0.45)),
    "cars5to8": CaptureConfig(classes=["car"], min_detections=5, max_detections=8),
    "tracks": CaptureConfig(new_tracks=True),
    "random": CaptureConfig(random=20.0, seed=7),
    "rate": CaptureConfig(rate=RateConfig(per_minute=15)),
    "combined": CaptureConfig(classes=["car"], every_n=25, near_threshold=BandConfig(0.3, 0.4), new_tracks=True,
                              rate=RateConfig(per_minute=20)),
}
QUOTA = 20


@dataclass
class VideoRun:
    recorder: Recorder
    roots: dict[str, Path]
    sinks: dict[str, DatasetSink]
    seconds: float


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VideoRun]:
    if not (ASSETS / "models" / "yolox_nano.onnx").is_file():
        pytest.fail(f"asset mirror not found at {ASSETS} (set EDGELABEL_MIRROR to the shared folder)")
    tmp = tmp_path_factory.mktemp("capture")
    cfg = config_from_dict({
        "device_id": "capture-test",
        "state_dir": str(tmp / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": {"cars": {"uri": str(ASSETS / "videos" / "cars.mp4")}},
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
    }, base_dir=tmp)
    recorder = Recorder()
    roots: dict[str, Path] = {}
    sinks: dict[str, DatasetSink] = {}
    names = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]
    for name, policy in POLICIES.items():  # labels and index only: the counts are what matters here
        roots[name] = tmp / name
        dcfg = DatasetConfig(path=str(roots[name]), formats=["yolo"], save_images="never", min_free_bytes=0,
                             capture=CaptureSection(storage=policy))
        sinks[name] = DatasetSink(dcfg, roots[name], names, "yolox_nano")
    roots["quota"] = tmp / "quota"  # every frame, stored as JPEG, at most QUOTA of them
    sinks["quota"] = DatasetSink(DatasetConfig(path=str(roots["quota"]), max_images=QUOTA, min_free_bytes=0),
                                 roots["quota"], names, "yolox_nano")
    pipeline = Pipeline(cfg, sinks=[recorder, *sinks.values()], show_progress=False)
    t0 = time.monotonic()
    assert pipeline.run() == 0
    yield VideoRun(recorder, roots, sinks, time.monotonic() - t0)


def index_rows(root: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(root / "index.sqlite") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM records ORDER BY frame_index").fetchall()


def sliding_ok(accepted: list[float], ts: float, span: float, limit: int) -> bool:
    return sum(1 for t in accepted if ts - span < t <= ts) < limit


def expected(name: str, run: VideoRun) -> dict[int, str]:
    """frame index -> review state, for each policy, from the recorded records (a plain re-statement of the rules)."""
    recs = run.recorder.records
    out: dict[int, str] = {}
    if name == "every10":
        return {r["index"]: AUTO_ACCEPTED for k, r in enumerate(recs) if k % 10 == 0}
    if name == "band":
        return {r["index"]: NEEDS_REVIEW for r in recs if any(0.3 <= s < 0.45 for _, s, _ in r["dets"])}
    if name == "cars5to8":
        return {r["index"]: AUTO_ACCEPTED for r in recs if 5 <= sum(1 for lab, _, _ in r["dets"] if lab == "car") <= 8}
    if name == "tracks":  # the frames of the tracker's "new" events
        new_records = {e["record_id"] for e in run.recorder.events_seen if e["type"] == "new"}
        return {r["index"]: AUTO_ACCEPTED for r in recs if r["id"] in new_records}
    if name == "rate":
        accepted: list[float] = []
        for r in recs:
            if sliding_ok(accepted, r["ts"], 60.0, 15):
                accepted.append(r["ts"])
                out[r["index"]] = AUTO_ACCEPTED
        return out
    if name == "combined":
        accepted, seen, position, top = [], 0, 0, 0
        for r in recs:
            cars = [(s, t) for lab, s, t in r["dets"] if lab == "car"]
            ids = [t for _, _, t in r["dets"] if t is not None]
            new_car = any(t is not None and t > top for _, t in cars)
            top = max([top, *ids])
            if not cars:
                continue
            in_band = any(0.3 <= s < 0.4 for s, _ in cars)
            hit = position % 25 == 0 or in_band or new_car
            position += 1
            seen += 1
            if hit and sliding_ok(accepted, r["ts"], 60.0, 20):
                accepted.append(r["ts"])
                out[r["index"]] = NEEDS_REVIEW if in_band else AUTO_ACCEPTED
        return out
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["every10", "band", "cars5to8", "tracks", "rate", "combined"])
def test_video_counts_match_the_policy(video_run: VideoRun, name: str) -> None:
    recs = video_run.recorder.records
    assert len(recs) == 268 and [r["index"] for r in recs] == list(range(268))
    want = expected(name, video_run)
    rows = index_rows(video_run.roots[name])
    got = {r["frame_index"]: r["state"] for r in rows}
    assert got == want, f"{name}: {len(got)} captured, {len(want)} expected"
    assert 0 < len(got) < 268, f"{name}: the video should exercise this policy ({len(got)} captured)"
    status = video_run.sinks[name].status()
    cap = status["capture"]["cars"]
    assert cap["frames"] == 268 and cap["captured"] == len(want)
    assert cap["needs_review"] == sum(1 for s in want.values() if s == NEEDS_REVIEW)
    assert status["states"]["needs_review"] == cap["needs_review"] and status["images"] == len(want)
    # exactly the captured frames have label files, each with its boxes
    labels = sorted((video_run.roots[name] / "labels" / "cars").glob("*.txt"))
    assert len(labels) == len(want)
    by_index = {r["index"]: r for r in recs}
    for row in rows[:5]:
        text = (video_run.roots[name] / row["label_path"]).read_text()
        assert len(text.splitlines()) == len(by_index[row["frame_index"]]["dets"])


def test_video_rate_limit_and_band_details(video_run: VideoRun) -> None:
    rate = video_run.sinks["rate"].status()["capture"]["cars"]
    if video_run.seconds < 60:  # the whole video fits in one minute: exactly the limit
        assert rate["captured"] == 15 and rate["limited"] == 268 - 15
    band_rows = index_rows(video_run.roots["band"])
    for row in band_rows:  # the queue order key: 1 at the band's centre (0.375), 0 at its edges
        scores = [d["score"] for d in json.loads(row["detections"]) if 0.3 <= d["score"] < 0.45]
        assert row["uncertainty"] == pytest.approx(max(1 - abs(s - 0.375) / 0.075 for s in scores), abs=1e-5)


def test_video_random_share(video_run: VideoRun) -> None:
    n = len(index_rows(video_run.roots["random"]))
    mean, sd = 268 * 0.2, math.sqrt(268 * 0.2 * 0.8)
    assert abs(n - mean) < 4 * sd, n
    again = CapturePolicy(POLICIES["random"], source="cars")  # the same seed picks the same frames
    replay = {r["index"] for r in video_run.recorder.records
              if again.decide(rec(r["index"], [(lab, s, t) for lab, s, t in r["dets"]], source="cars")).capture}
    assert replay == {r["frame_index"] for r in index_rows(video_run.roots["random"])}


def test_video_quota_keeps_the_newest_frames(video_run: VideoRun) -> None:
    root = video_run.roots["quota"]
    rows = index_rows(root)
    assert [r["frame_index"] for r in rows] == list(range(268 - QUOTA, 268))
    stored = sorted((root / "images" / "cars").glob("*.jpg"))
    assert len(stored) == QUOTA and sorted(p.name for p in stored) == sorted(Path(r["image_path"]).name for r in rows)
    assert len(list((root / "labels" / "cars").glob("*.txt"))) == QUOTA
    status = video_run.sinks["quota"].status()
    assert status["images"] == QUOTA and status["quota"]["rotated"] == 268 - QUOTA
    assert status["bytes"] == sum(p.stat().st_size for p in stored) + sum(
        p.stat().st_size for p in (root / "labels" / "cars").glob("*.txt")) + (root / "annotations.coco.json").stat().st_size
    coco = json.loads((root / "annotations.coco.json").read_text())
    assert sorted(img["edgelabel_record_id"] for img in coco["images"]) == sorted(r["id"] for r in rows)

"""Which clock frames run on: media time for video files, file time for images, capture time for live ones.

A file is labeled faster (or slower) than it was recorded; the tracker, track events and the capture
rate limits must see the recording's time, not ours.  A looped video stands in for a camera: it is read
at its own frame rate and is a live source for the dataset's capture policy.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edgelabel.edge.config import SourceConfig, config_from_dict
from edgelabel.edge.frame import Frame
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.records import SCHEMA_PATH, LabelRecord
from edgelabel.edge.sinks.base import Sink
from edgelabel.edge.sources.folder import FolderSource
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.image import ImageSource
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.edge.sources.video import VideoSource
from tests.conftest import ASSETS

PEOPLE = ASSETS / "videos" / "people-walking.mp4"  # 314 frames at 29.97 fps: 10.48 s
CARS = ASSETS / "videos" / "cars.mp4"
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def source_cfg(uri: str, name: str = "src", **kw: Any) -> SourceConfig:
    return SourceConfig(uri=uri, name=name, **kw)


# --------------------------------------------------------------------------- video files


def test_video_frames_run_on_media_time_anchored_at_the_recording_start(assets: Path) -> None:
    src = VideoSource("people", source_cfg(str(PEOPLE)), str(PEOPLE))
    src.open()
    fps = src.fps
    assert fps is not None and abs(fps - 29.97) < 0.01
    duration = src.duration()
    assert duration is not None and abs(duration - 10.48) < 0.01
    frames: list[Frame] = []
    while (f := src.read()) is not None:
        frames.append(f)
    src.close()
    assert len(frames) == 314
    # read in well under the clip's 10.5 s, yet the frames span the clip
    assert [f.media_time for f in frames[:3]] == [0.0, pytest.approx(1 / fps), pytest.approx(2 / fps)]
    assert frames[-1].media_time == pytest.approx(313 / fps)
    steps = [b.captured_at - a.captured_at for a, b in itertools.pairwise(frames)]
    assert all(abs(s - 1 / fps) < 1e-6 for s in steps)
    start = os.stat(PEOPLE).st_mtime - duration  # the recording ends when the file was last written
    assert frames[0].captured_at == pytest.approx(start, abs=1e-6)
    assert frames[-1].captured_at == pytest.approx(start + 313 / fps, abs=1e-6)
    assert all(not f.live for f in frames)
    assert all(f.read_at >= frames[0].read_at for f in frames)  # our clock is kept beside it


def test_a_relabeled_video_frame_gets_the_same_time(assets: Path) -> None:
    """Resuming (skip) and a second run give a frame the time it had: records of one frame stay identical."""
    first = VideoSource("people", source_cfg(str(PEOPLE)), str(PEOPLE))
    first.open()
    want = [first.read() for _ in range(12)]
    again = VideoSource("people", source_cfg(str(PEOPLE)), str(PEOPLE))
    again.skip = lambda key: not key.endswith("#10")
    again.open()
    got = again.read()
    assert got is not None and got.index == 10
    assert got.captured_at == want[10].captured_at and got.media_time == want[10].media_time


# --------------------------------------------------------------------------- image files


def test_images_carry_their_file_time(tmp_path: Path, assets: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    times = {"a.jpg": 1_700_000_000.25, "b.jpg": 1_600_000_000.5, "c.jpg": 1_800_000_000.0}
    for name, mtime in times.items():
        shutil.copyfile(assets / "images" / "dog.jpg", folder / name)
        os.utime(folder / name, (mtime, mtime))
    src = FolderSource("imgs", source_cfg(str(folder)), str(folder))
    src.open()
    frames = [src.read() for _ in times]
    assert src.read() is None
    assert {Path(f.key).name: f.captured_at for f in frames if f is not None} == times
    assert all(f is not None and f.media_time is None for f in frames)
    one = ImageSource("one", source_cfg(str(folder / "b.jpg")), str(folder / "b.jpg"))
    one.open()
    frame = one.read()
    assert frame is not None and frame.captured_at == times["b.jpg"]


# --------------------------------------------------------------------------- through the pipeline


class Recorder(Sink):
    """Keeps every record and track event."""

    name = "recorder"

    def __init__(self) -> None:
        self.records: list[LabelRecord] = []
        self.events_seen: list[dict[str, Any]] = []

    def write(self, record: LabelRecord, frame: Frame) -> None:
        self.records.append(record)

    def events(self, events: list[dict[str, Any]]) -> None:
        self.events_seen.extend(events)


def pipeline_cfg(tmp_path: Path, sources: dict[str, Any], **sections: Any) -> Any:
    return config_from_dict({
        "device_id": "time-test",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources,
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
        **sections,
    }, base_dir=tmp_path)


@pytest.mark.slow
def test_labeled_clip_records_span_the_clip_in_frame_steps(tmp_path: Path, assets: Path) -> None:
    """people-walking.mp4 (10.5 s at 30 fps) labeled at whatever speed: records 1/30 s apart over 10.5 s."""
    recorder = Recorder()
    cfg = pipeline_cfg(tmp_path, {"people": {"uri": str(PEOPLE)}})
    t0 = time.monotonic()
    assert Pipeline(cfg, sinks=[recorder], show_progress=False).run() == 0
    took = time.monotonic() - t0
    recs = recorder.records
    assert len(recs) == 314
    fps = 30000 / 1001
    ts = [r.captured_ts for r in recs]
    assert ts[-1] - ts[0] == pytest.approx(313 / fps, abs=1e-3)  # 10.44 s, however long labeling took
    assert all(abs((b - a) - 1 / fps) < 1e-5 for a, b in itertools.pairwise(ts))
    assert [r.media_time for r in recs[:2]] == [0.0, pytest.approx(1 / fps, abs=1e-6)]
    for r in recs[:: 50]:
        doc = r.to_dict()
        assert not list(VALIDATOR.iter_errors(doc))
        assert doc["media_time"] == r.media_time
    # the tracker ran on the same clock: every track lies inside the clip, and ends at its last frame
    ends = [e for e in recorder.events_seen if e["type"] == "end"]
    assert ends and all(ts[0] <= e["first_ts"] <= e["last_ts"] <= ts[-1] for e in ends)
    assert max(e["duration_s"] for e in ends) <= 313 / fps + 1e-3
    assert max(e["duration_s"] for e in ends) > 3.0  # people stay in view for seconds of the clip
    finished = [e for e in ends if e["end_reason"] == "finished"]
    # ended at the last frame's time (ISO strings of one format compare like times), not at the wall clock
    assert finished and all(e["last_seen"] <= e["at"] <= recs[-1].captured_at for e in finished)
    logging.getLogger(__name__).info("labeled 10.48 s of video in %.1f s", took)


# --------------------------------------------------------------------------- a looped video: a stand-in camera


def test_a_looped_clip_is_read_at_its_own_frame_rate(assets: Path) -> None:
    """Without ``fps``, a looping 30 fps clip gives ~30 frames a second (it used to race at the decoder's speed)."""
    hub, stop = FrameHub(), threading.Event()
    src = VideoSource("cars", source_cfg(str(CARS), name="cars", loop=True), str(CARS))
    runner = SourceRunner(src, hub, lambda *a: None, stop)
    frames: list[Frame] = []
    runner.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        f = hub.get(timeout=0.05)
        if f is not None:
            frames.append(f)
    elapsed = time.monotonic() - t0
    stop.set()
    hub.close()
    assert runner.join(5)
    rate = len(frames) / elapsed
    assert 5 <= rate <= 40, rate  # 30 fps; a loaded machine may decode slower; free-running it was 164 fps here
    assert all(f.live for f in frames)  # capture policy, outbox and ledger treat it as a camera
    assert len({f.key for f in frames}) == len(frames) and all("@" in f.key for f in frames)
    wall = [f.captured_at for f in frames]
    assert wall == sorted(wall) and abs(wall[-1] - time.time()) < 5  # capture time, like a camera
    assert all(f.media_time is not None and 0 <= f.media_time < 9.0 for f in frames)


def test_fps_set_explicitly_wins_over_the_clip_rate(assets: Path) -> None:
    explicit = VideoSource("cars", source_cfg(str(CARS), loop=True, fps=5), str(CARS))
    native = VideoSource("cars", source_cfg(str(CARS), loop=True), str(CARS))
    once = VideoSource("cars", source_cfg(str(CARS)), str(CARS))
    for s in (explicit, native, once):
        s.open()
        s.close()
    assert explicit.pace() == 5
    assert native.pace() == pytest.approx(30.0, abs=0.1)
    assert once.pace() == 0  # a job: as fast as the detector takes frames


def test_a_looped_clip_takes_the_live_capture_policy(tmp_path: Path, assets: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The dataset keeps a looped clip's frames by ``dataset.capture.live``, not every frame by ``storage``."""
    from edgelabel.edge.sinks.dataset import DatasetSink

    cfg = pipeline_cfg(tmp_path, {"cars": {"uri": str(CARS), "loop": True}},
                       dataset={"enabled": True, "path": str(tmp_path / "dataset"), "save_images": "never",
                                "min_free_bytes": 0})
    pipeline = Pipeline(cfg, show_progress=False)
    with caplog.at_level(logging.INFO):
        pipeline.start()
        try:
            deadline = time.monotonic() + 30
            while pipeline.totals.frames < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            pipeline.shutdown()
    assert pipeline.totals.frames >= 20
    assert "dataset: cars keeps" in caplog.text and "(dataset.capture.live)" in caplog.text
    dataset = next(s for s in pipeline.sinks or [] if isinstance(s, DatasetSink))
    counts = dataset.capture.status()["cars"]
    assert counts["captured"] < counts["frames"]  # the live default samples; storage would keep every frame

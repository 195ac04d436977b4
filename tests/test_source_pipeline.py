"""Sources as the daemon uses them: names given on the command line, tracking of stills, one log line per file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import cv2
import pytest

from edgelabel.edge.cli import _source_name
from edgelabel.edge.config import config_from_dict
from edgelabel.edge.frame import Frame
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.records import LabelRecord
from edgelabel.edge.sinks.base import Sink
from edgelabel.edge.sources import suggest_name
from tests.conftest import ASSETS


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("gst://videotestsrc pattern=ball ! video/x-raw,format=BGR ! appsink", "videotestsrc"),
        ("gst://rtspsrc location=rtsp://admin:s3cret@cam1.local:554/s latency=0 ! rtph264depay ! avdec_h264 ! "
         "videoconvert ! video/x-raw,format=BGR ! appsink", "rtspsrc-cam1.local"),
        ("gst://souphttpsrc location='http://u:pw@host:8080/x.mjpg' ! jpegdec ! videoconvert ! appsink",
         "souphttpsrc-host"),
        ('gst://filesrc location="/data/line 1.mp4" ! decodebin ! videoconvert ! appsink', "filesrc-line_1"),
        ("gst://v4l2src device=/dev/video2 ! videoconvert ! appsink", "v4l2src-video2"),
        ("/videos/cars.mp4", "cars"),
        ("/data/in/", "in"),
        ("rtsp://admin:s3cret@cam/stream1", "stream1"),
        ("rtsp://admin:s3cret@cam", "cam"),
        ("v4l2:///dev/video0", "video0"),
        ("0", "0"),
    ],
)
def test_a_source_is_named_after_what_it_reads(uri: str, name: str) -> None:
    """gst:// used to be named after its tail (``x-raw_format_BGR_appsink``); now after its first element."""
    assert suggest_name(uri) == name
    assert _source_name(uri, set()) == name
    assert "s3cret" not in name and "pw" not in name


@pytest.mark.parametrize(
    "uri",
    [
        "rtsp://admin:ab#cSECRET@cam/live",  # a raw # in the password ends urllib's authority early
        "rtsp://admin:a/SECRET@cam",  # a raw / in the password starts urllib's path early
        "rtsp://admin:p@SECRET@cam/stream",
        "rtsp://cam/user=admin&password=SECRET",
        "gst://rtspsrc location=rtsp://admin:ab#SECRET@cam/x ! decodebin ! videoconvert ! appsink",
        "gst://rtspsrc location=rtsp://cam/x user-id=admin user-pw=SECRET ! decodebin ! appsink",
    ],
)
def test_a_name_never_carries_a_credential(uri: str) -> None:
    name = suggest_name(uri)
    assert name and "SECRET" not in name and "admin" not in name, name


def test_names_stay_unique_and_valid() -> None:
    taken: set[str] = set()
    uri = "gst://videotestsrc ! video/x-raw,format=BGR ! appsink"
    assert [_source_name(uri, taken) for _ in range(3)] == ["videotestsrc", "videotestsrc_2", "videotestsrc_3"]
    assert _source_name("gst://  ! appsink", set()) == "source"  # nothing usable: the generic name


# --------------------------------------------------------------------------- through the pipeline


class Recorder(Sink):
    name = "recorder"

    def __init__(self) -> None:
        self.records: list[LabelRecord] = []
        self.events_seen: list[dict[str, Any]] = []

    def write(self, record: LabelRecord, frame: Frame) -> None:
        self.records.append(record)

    def events(self, events: list[dict[str, Any]]) -> None:
        self.events_seen.extend(events)


def run_pipeline(tmp_path: Path, sources: dict[str, Any], **sections: Any) -> Recorder:
    cfg = config_from_dict({
        "device_id": "src-test",
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources,
        "mqtt": {"enabled": False},
        "dataset": {"enabled": False},
        **sections,
    }, base_dir=tmp_path)
    recorder = Recorder()
    assert Pipeline(cfg, sinks=[recorder], show_progress=False, fresh=True).run() == 0
    return recorder


def stills(tmp_path: Path) -> Path:
    """Three copies of one photograph: the same people in the same place, the easiest case to (wrongly) track."""
    folder = tmp_path / "stills"
    folder.mkdir()
    for i in range(3):
        shutil.copyfile(ASSETS / "images" / "bus.jpg", folder / f"shot{i}.jpg")
    return folder


def test_the_images_of_a_folder_are_not_tracked_by_default(tmp_path: Path, assets: Path) -> None:
    folder = stills(tmp_path)
    rec = run_pipeline(tmp_path, {"shots": {"uri": str(folder) + "/"}})
    assert len(rec.records) == 3 and all(r.detections for r in rec.records)
    assert all(d.track_id is None for r in rec.records for d in r.detections)
    assert rec.events_seen == []


def test_tracking_folders_turns_it_on(tmp_path: Path, assets: Path) -> None:
    folder = stills(tmp_path)
    rec = run_pipeline(tmp_path, {"shots": {"uri": str(folder) + "/"}}, tracking={"folders": True})
    assert any(d.track_id is not None for d in rec.records[-1].detections)
    assert any(e["type"] == "new" for e in rec.events_seen)


def short_clip(tmp_path: Path, frames: int = 6) -> Path:
    """A few frames of bus.jpg as an MJPG AVI (derived here; the shared folder is only read)."""
    image = cv2.resize(cv2.imread(str(ASSETS / "images" / "bus.jpg")), (320, 416))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 416))
    assert writer.isOpened()
    for _ in range(frames):
        writer.write(image)
    writer.release()
    return path


def test_each_file_is_announced_once(tmp_path: Path, assets: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pipeline opens a file to count it and the runner opens it again: one INFO line, not two."""
    clip = short_clip(tmp_path)
    folder = stills(tmp_path)
    with caplog.at_level(logging.INFO):
        rec = run_pipeline(tmp_path, {"clip": {"uri": str(clip)}, "shots": {"uri": str(folder) + "/"}})
    assert len(rec.records) == 6 + 3
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("VideoSource(" in m for m in info) == 1, info
    assert sum("FolderSource(" in m for m in info) == 1, info
    # the video is tracked (the same bus in every frame): tracking stays on for videos
    assert any(d.track_id is not None for r in rec.records if r.source == "clip" for d in r.detections)

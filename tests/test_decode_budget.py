"""Bounded decoding: a small hostile JPEG must not stall a source.

A progressive JPEG may hold any number of scans, and the decoder passes over the whole picture once per
scan: a file of a few hundred kilobytes made of thousands of nearly empty scans kept a folder source busy for
minutes.  Such a file is now rejected from its markers, before the decoder sees it; what encoders write
(OpenCV/libjpeg's progressive script) still decodes.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgelabel.edge.sources.imageio import MAX_JPEG_SCANS, ImageRejected, decode_image_bytes, decode_image_file, jpeg_scan_count
from tests.conftest import IMAGES


def progressive(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def first_sos(data: bytes) -> int:
    return data.index(b"\xff\xda")  # the header segments of an OpenCV JPEG hold no 0xFFDA


def many_scans(data: bytes, copies: int) -> bytes:
    """The file's scans repeated ``copies`` times between its header and its end marker: a valid marker
    structure (each scan is a well-formed SOS segment with its entropy-coded data) with copies x the scans."""
    sos, eoi = first_sos(data), data.rindex(b"\xff\xd9")
    return data[:sos] + data[sos:eoi] * copies + data[eoi:]


@pytest.fixture(scope="module")
def bus() -> np.ndarray:
    image = cv2.imread(str(IMAGES / "bus.jpg"))
    assert image is not None
    return image


def test_an_encoders_progressive_jpeg_is_counted_and_decoded(bus: np.ndarray) -> None:
    data = progressive(bus)
    scans = jpeg_scan_count(data, first_sos(data))
    assert 2 <= scans <= 20, scans  # libjpeg's standard progression for colour is 10 scans
    image, fmt = decode_image_bytes(data)
    assert fmt == "jpeg" and image.shape == bus.shape


def test_a_baseline_jpeg_has_one_scan(bus: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", bus)
    data = buf.tobytes()
    assert jpeg_scan_count(data, first_sos(data)) == 1


def test_a_jpeg_of_thousands_of_scans_is_rejected_before_decoding(tmp_path: Path) -> None:
    small = np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = progressive(small)
    per_file = jpeg_scan_count(data, first_sos(data))
    hostile = many_scans(data, (MAX_JPEG_SCANS * 20) // per_file)
    assert len(hostile) < 4 << 20  # small enough to pass every size guard
    path = tmp_path / "scans.jpg"
    path.write_bytes(hostile)
    started = time.monotonic()
    with pytest.raises(ImageRejected) as info:
        decode_image_file(str(path))
    assert f"more than {MAX_JPEG_SCANS} scans" in info.value.reason
    assert "re-encode" in info.value.reason  # says what to do
    assert time.monotonic() - started < 5.0  # judged from the markers, not by decoding


def test_just_under_the_limit_still_decodes() -> None:
    small = np.full((32, 32, 3), 128, np.uint8)
    data = progressive(small)
    per_file = jpeg_scan_count(data, first_sos(data))
    copies = MAX_JPEG_SCANS // per_file
    crafted = many_scans(data, copies)
    assert jpeg_scan_count(crafted, first_sos(crafted)) == copies * per_file <= MAX_JPEG_SCANS
    image, _ = decode_image_bytes(crafted)  # libjpeg warns about the repeated progression and decodes
    assert image.shape == (32, 32, 3)


def test_marker_like_bytes_inside_a_segment_are_not_counted() -> None:
    """0xFFDA inside a comment segment is data (segments are jumped over by their length)."""
    ok, buf = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = buf.tobytes()
    sos = first_sos(data)
    comment = b"\xff\xda" * 200
    com = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    crafted = data[:sos] + com + data[sos:]
    assert jpeg_scan_count(crafted, sos) == 1
    decode_image_bytes(crafted)


# --------------------------------------------------------------------------- the time budget of one decode


def slow_jpeg() -> bytes:
    """A legal progressive JPEG (4000x4000, exactly MAX_JPEG_SCANS scans: under the scan limit) that takes about
    a second to decode here."""
    image = cv2.resize(cv2.imread(str(IMAGES / "bus.jpg")), (4000, 4000))
    data = progressive(image)
    return many_scans(data, MAX_JPEG_SCANS // jpeg_scan_count(data, first_sos(data)))


def test_a_decode_over_its_time_budget_is_abandoned_and_rejected_with_the_reason() -> None:
    from edgelabel.edge.sources.imageio import OVER_BUDGET, given_up

    data = slow_jpeg()
    decode_image_bytes(data, budget=60.0)  # warm the decode child: its start-up is not the file's time
    started = time.monotonic()
    image, _ = decode_image_bytes(data, budget=60.0)
    full = time.monotonic() - started
    assert image.shape == (4000, 4000, 3)
    budget = min(0.25, full / 3)
    started = time.monotonic()
    with pytest.raises(ImageRejected) as info:
        decode_image_bytes(data, budget=budget)
    took = time.monotonic() - started
    assert info.value.reason.startswith(OVER_BUDGET) and given_up(info.value.reason), info.value.reason
    assert "re-encode" in info.value.reason and "EDGELABEL_DECODE_BUDGET_S" in info.value.reason
    assert took < budget + 2.0, f"the source waited {took:.2f} s (full decode {full:.2f} s)"  # not the whole decode
    image, _ = decode_image_bytes(data, budget=60.0)  # the next costly file gets a fresh child
    assert image.shape == (4000, 4000, 3)


def test_a_folder_job_rejects_an_over_budget_file_once_and_does_not_retry_it_on_the_next_start(tmp_path: Path) -> None:
    import csv
    import shutil

    from tests.conftest import ASSETS
    from tests.helpers import run_edgelabel

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(IMAGES / "bus.jpg", folder / "bus.jpg")
    (folder / "slow.jpg").write_bytes(slow_jpeg())
    out = tmp_path / "out"
    args = ("label", str(folder), "--model", str(ASSETS / "models" / "yolox_nano.onnx"), "--out", str(out))
    env = {"EDGELABEL_DECODE_BUDGET_S": "0.2"}
    first = run_edgelabel(*args, env=env, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "slow.jpg: decoding took longer than the decode budget" in first.stderr, first.stderr[-3000:]
    rows = list(csv.DictReader(open(out / ".edgelabel" / "rejected.csv")))
    assert [Path(r["path"]).name for r in rows] == ["slow.jpg"] and "decode budget" in rows[0]["reason"], rows
    assert (out / "labels" / "in").exists() or list(out.rglob("bus*.txt")), "bus.jpg was not labeled"
    second = run_edgelabel(*args, env=env, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "slow.jpg: decoding took" not in second.stderr, "decoded again on the next start"
    rows = list(csv.DictReader(open(out / ".edgelabel" / "rejected.csv")))
    assert [Path(r["path"]).name for r in rows] == ["slow.jpg"], "still listed"
    time.sleep(0.05)
    shutil.copy(IMAGES / "bus.jpg", folder / "slow.jpg")  # replaced by a file that decodes at once: tried again
    third = run_edgelabel(*args, env=env, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    import sqlite3

    keys = [r[0] for r in sqlite3.connect(out / "index.sqlite").execute("SELECT frame_key FROM records")]
    assert any("slow.jpg" in k for k in keys), (keys, third.stderr[-2000:])


def test_a_video_frame_over_the_budget_ends_the_file_and_it_is_not_read_again(monkeypatch) -> None:
    """A frame read cannot be stopped half-way; one that went over the budget ends the video (the frames after it
    would take as long), listed with its reason; a source told the file was given up does not decode it again."""
    from edgelabel.edge.config import SourceConfig
    from edgelabel.edge.sources import imageio
    from edgelabel.edge.sources.imageio import given_up
    from edgelabel.edge.sources.video import VideoSource
    from tests.conftest import ASSETS

    video = str(ASSETS / "videos" / "cars.mp4")
    first = VideoSource("v", SourceConfig(uri=video, name="v"), video)
    first.open()
    assert first.read() is not None  # within the default budget
    monkeypatch.setattr(imageio, "DECODE_BUDGET_S", 1e-6)  # every frame is over it now
    rejected: list[tuple[str, str]] = []
    first.on_reject = lambda p, r: rejected.append((p, r))
    assert first.read() is None and first.read() is None  # the video ends there
    first.close()
    [(path, reason)] = rejected
    assert path == video and given_up(reason) and "frame 1" in reason, reason
    monkeypatch.setattr(imageio, "DECODE_BUDGET_S", 10.0)
    again = VideoSource("v", SourceConfig(uri=video, name="v"), video)
    again.given_up = lambda path: path == video  # what the pipeline answers from the ledger's rejection
    again.on_reject = lambda p, r: rejected.append((p, r))
    again.open()
    assert again.read() is None and len(rejected) == 1  # not decoded, not listed twice
    again.close()


def test_a_given_up_file_is_skipped_until_it_is_written_again(tmp_path: Path) -> None:
    """What the pipeline answers a source from the ledger (``Pipeline._given_up``, part of ``_skip``)."""
    import os
    from types import SimpleNamespace

    from edgelabel.edge.ledger import Ledger
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sources.imageio import over_budget

    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    os.utime(video, (time.time() - 60, time.time() - 60))
    led = Ledger(tmp_path / "ledger.sqlite")
    me = SimpleNamespace(ledger=led)
    me._given_up = lambda source, key: Pipeline._given_up(me, source, key)
    led.mark_rejected("v", str(video), "corrupt or cut-off video: read failed at frame 3 of 9")
    assert not Pipeline._skip(me, "v", str(video))  # an ordinary rejection is tried again on every start
    led.mark_rejected("v", str(video), over_budget("reading and decoding frame 3 of the video", 10))
    assert Pipeline._skip(me, "v", str(video))
    video.write_bytes(b"new")  # written after it was given up
    assert not Pipeline._skip(me, "v", str(video))
    led.close()

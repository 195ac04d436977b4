"""Storage inputs that used to stall or lose work silently: oversized video frames, reused file names,
copies that pause half-way, videos still being written, and reads that make no progress.

Every fault is made for real in tmp_path (a real MJPG written by OpenCV, real JPEG bytes cut and appended).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgelabel.edge.config import SourceConfig
from edgelabel.edge.health import device_alarms
from edgelabel.edge.sources.folder import FolderSource
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.imageio import MAX_IMAGE_PIXELS, MAX_JPEG_SCANS, jpeg_scan_count
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.edge.sources.video import VideoSource
from tests.conftest import IMAGES
from tests.helpers import run_edgelabel


def cfg(uri: str, name: str = "src", **kw: Any) -> SourceConfig:
    return SourceConfig(uri=uri, name=name, **kw)


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


# --------------------------------------------------------------------------- video frames over the pixel limit

#: a side whose square is over the 100 MP limit (a multiple of 16, so the MJPG encoder pads nothing)
BIG_SIDE = 10016


class _CountingCapture:
    """Delegates to a real capture and counts the calls that decode or demux a frame."""

    def __init__(self, cap: cv2.VideoCapture) -> None:
        self._cap = cap
        self.decodes = 0

    def read(self) -> tuple[bool, Any]:
        self.decodes += 1
        return self._cap.read()

    def grab(self) -> bool:
        self.decodes += 1
        return self._cap.grab()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cap, name)


@pytest.fixture(scope="module")
def huge_mjpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two all-black 10016x10016 MJPG frames (~1.5 MB on disk), written by a child process so the ~0.5 GB the
    encoder needs is not kept by the test process."""
    path = tmp_path_factory.mktemp("huge") / "huge.avi"
    code = (
        "import sys, cv2, numpy as np\n"
        f"w = cv2.VideoWriter(sys.argv[1], cv2.VideoWriter_fourcc(*'MJPG'), 5, ({BIG_SIDE}, {BIG_SIDE}))\n"
        f"f = np.zeros(({BIG_SIDE}, {BIG_SIDE}, 3), np.uint8)\n"
        "w.write(f); w.write(f); w.release()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    assert BIG_SIDE * BIG_SIDE > MAX_IMAGE_PIXELS
    return path


def test_a_video_whose_frames_exceed_the_pixel_limit_is_rejected_before_decoding(huge_mjpg: Path) -> None:
    src = VideoSource("v", cfg(str(huge_mjpg), name="v"), str(huge_mjpg))
    rejects: list[tuple[str, str]] = []
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert src._cap is not None
    counting = _CountingCapture(src._cap)
    src._cap = counting  # type: ignore[assignment]
    assert src.read() is None
    assert counting.decodes == 0  # refused on the declared size: no frame was decoded
    assert src.total() == 0
    assert len(rejects) == 1 and rejects[0][0] == str(huge_mjpg)
    assert f"{BIG_SIDE}x{BIG_SIDE} exceeds limit (100 MP)" in rejects[0][1]
    assert src.read() is None and len(rejects) == 1  # listed once
    src.close()


def test_the_runner_finishes_an_oversized_video_with_one_rejection(huge_mjpg: Path) -> None:
    hub, stop = FrameHub(), threading.Event()
    seen: list[str] = []
    reported: list[tuple[str, str, str]] = []
    src = VideoSource("v", cfg(str(huge_mjpg), name="v"), str(huge_mjpg))
    runner = SourceRunner(src, hub, lambda n, s: seen.append(s), stop, on_reject=lambda *a: reported.append(a))
    runner.start()
    assert runner.join(20)
    stats = runner.stats()
    assert stats.status == "finished" and stats.frames_in == 0 and stats.rejected == 1
    assert reported and "exceeds limit" in reported[0][2]
    assert hub.get(timeout=0) is None


# --------------------------------------------------------------------------- a file name reused for new content


def _ids_by_key(out: Path) -> dict[str, str]:
    db = sqlite3.connect(str(out / "index.sqlite"))
    try:
        return {Path(key).name: rid for rid, key in db.execute("SELECT id, frame_key FROM records")}
    finally:
        db.close()


def test_a_new_picture_under_an_old_name_is_labeled_with_a_new_record_id(tmp_path: Path, assets: Path) -> None:
    images = assets / "images"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images / "bus.jpg", folder / "a.jpg")
    shutil.copy(images / "zidane.jpg", folder / "b.jpg")
    out = tmp_path / "out"
    model = str(assets / "models" / "yolox_nano.onnx")

    def label(*extra: str) -> str:
        proc = run_edgelabel("label", str(folder), "--model", model, "--out", str(out), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "labeled 2 frame(s)" in label()
    first = _ids_by_key(out)
    assert set(first) == {"a.jpg", "b.jpg"}

    # the same name, another picture (a camera that reuses its file names, a re-upload)
    (folder / "a.jpg").write_bytes((images / "dog.jpg").read_bytes())
    assert "labeled 1 frame(s)" in label()  # was: labeled 0 (the ledger said a.jpg was done)
    second = _ids_by_key(out)
    new_keys = set(second) - set(first)
    assert len(new_keys) == 1 and next(iter(new_keys)).startswith("a.jpg#"), second
    assert second[next(iter(new_keys))] not in first.values()  # a consumer de-duplicating by id keeps it
    assert "labeled 0 frame(s)" in label()  # unchanged files are not labeled twice

    # touched (new mtime, same bytes): still the same file
    os.utime(folder / "b.jpg", (time.time() + 60, time.time() + 60))
    assert "labeled 0 frame(s)" in label()

    # --fresh labels everything again: b.jpg keeps its id, the new a.jpg keeps its own (not the old picture's)
    assert "labeled 2 frame(s)" in label("--fresh")
    fresh = _ids_by_key(out)
    assert fresh["b.jpg"] == first["b.jpg"]
    assert fresh[next(iter(new_keys))] == second[next(iter(new_keys))]


# --------------------------------------------------------------------------- watched folders: paused copies, rewrites


def _watching(folder: Path) -> tuple[SourceRunner, FrameHub, threading.Event, list[tuple[str, str, str]]]:
    hub, stop = FrameHub(), threading.Event()
    rejects: list[tuple[str, str, str]] = []
    src = FolderSource("w", cfg(str(folder), name="w", watch=True, watch_interval=0.05), str(folder))
    runner = SourceRunner(src, hub, lambda n, s: None, stop, on_reject=lambda *a: rejects.append(a))
    runner.start()
    assert wait_for(lambda: runner.status == "online")  # listed: from now on a new file waits until it holds still
    return runner, hub, stop, rejects


def test_a_copy_that_pauses_half_way_is_labeled_once_it_completes(tmp_path: Path, assets: Path) -> None:
    data = (assets / "images" / "bus.jpg").read_bytes()
    target = tmp_path / "slow.jpg"
    runner, hub, stop, rejects = _watching(tmp_path)
    try:
        target.write_bytes(data[: len(data) // 2])  # the link stalls here for longer than two polls
        assert wait_for(lambda: any("cut off" in r[2] for r in rejects)), rejects
        assert hub.get(timeout=0) is None
        with open(target, "ab") as fh:  # the copy resumes and completes
            fh.write(data[len(data) // 2 :])
        frame = hub.get(timeout=10)  # was: never (retried only after a restart)
        assert frame is not None and frame.key == str(target) and frame.image.shape == (1080, 810, 3)
        assert len(rejects) == 1, rejects
    finally:
        stop.set()
        assert runner.join(5)


def test_a_watched_file_rewritten_with_a_new_picture_is_labeled_again(tmp_path: Path, assets: Path) -> None:
    images = assets / "images"
    target = tmp_path / "cam.jpg"
    shutil.copy(images / "bus.jpg", target)
    runner, hub, stop, rejects = _watching(tmp_path)
    try:
        first = hub.get(timeout=10)
        assert first is not None and first.key == str(target)
        os.utime(target, (time.time() + 5, time.time() + 5))  # touched: the same picture, not labeled again
        assert hub.get(timeout=0.5) is None  # ten polls
        tmp = tmp_path / ".cam.jpg.part"
        shutil.copy(images / "dog.jpg", tmp)
        os.replace(tmp, target)  # the camera saves its next picture under the same name
        second = hub.get(timeout=10)  # was: never (a path was read once per run)
        assert second is not None and second.key.startswith(f"{target}#") and second.image.shape == (576, 768, 3)
        assert hub.get(timeout=0.5) is None and not rejects
    finally:
        stop.set()
        assert runner.join(5)


# --------------------------------------------------------------------------- a video still being written


def _numbered_frame(i: int, rng: np.random.Generator) -> np.ndarray:
    """Noise (so each MJPG frame is ~100 KB and reaches the disk at once) with a block whose grey level is i."""
    frame = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    frame[:64, :64] = 8 * i
    return frame


def test_a_video_still_being_written_is_followed_to_its_real_end(tmp_path: Path) -> None:
    path = tmp_path / "recording.avi"
    total, written = 30, threading.Event()
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(10):
        writer.write(_numbered_frame(i, rng))

    def record_on() -> None:  # the recorder keeps writing while the file is labeled
        for i in range(10, total):
            time.sleep(0.05)
            writer.write(_numbered_frame(i, rng))
        writer.release()
        written.set()

    src = VideoSource("v", cfg(str(path), name="v"), str(path))
    src.grow_grace = 3.0  # the recorder writes every 0.05 s; this is how long a pause may last
    rejects: list[tuple[str, str]] = []
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert src.total() is None  # a file being written declares no frame count
    threading.Thread(target=record_on, daemon=True).start()
    frames = []
    while (frame := src.read()) is not None:
        frames.append(frame)
    src.close()
    assert written.is_set()
    # was: the 10 frames present at open, then "finished" without a word
    assert [f.index for f in frames] == list(range(total))
    levels = [int(round(float(f.image[16:48, 16:48].mean()) / 8)) for f in frames]
    assert levels == list(range(total)), levels  # each frame once, in order: nothing skipped or repeated
    assert [f.key for f in frames] == [f"{path}#{i}" for i in range(total)]
    assert not rejects


# --------------------------------------------------------------------------- a read that makes no progress


def _slow_jpeg() -> bytes:
    """A legal progressive JPEG (4000x4000, exactly MAX_JPEG_SCANS scans) that takes about a second to decode."""
    image = cv2.resize(cv2.imread(str(IMAGES / "bus.jpg")), (4000, 4000))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    data = buf.tobytes()
    sos, eoi = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    per_file = jpeg_scan_count(data, sos)
    return data[:sos] + data[sos:eoi] * (MAX_JPEG_SCANS // per_file) + data[eoi:]


def test_a_storage_read_without_progress_raises_an_alarm_that_clears(tmp_path: Path) -> None:
    hub, stop = FrameHub(), threading.Event()
    src = FolderSource("w", cfg(str(tmp_path), name="w", watch=True, watch_interval=0.05, read_timeout=0.1),
                       str(tmp_path))
    runner = SourceRunner(src, hub, lambda n, s: None, stop)

    def alarms() -> list[dict[str, Any]]:
        return device_alarms({"sources": {"w": runner.stats().__dict__}})

    runner.start()
    try:
        time.sleep(0.5)  # five read timeouts waiting for files: waiting is not a stall
        assert runner.stats().stalled_s is None and alarms() == []
        hidden = tmp_path / ".slow.jpg.part"
        hidden.write_bytes(_slow_jpeg())
        os.replace(hidden, tmp_path / "slow.jpg")
        seen: list[list[dict[str, Any]]] = []
        assert wait_for(lambda: bool(seen.append(alarms()) or seen[-1]) or hub.pending("w") > 0, 30)
        raised = [a for a in seen if a]
        assert raised, "no alarm while the decode ran past read_timeout"  # was: "online", nothing else
        alarm = raised[0][0]
        assert alarm["id"] == "source_stalled:w" and alarm["severity"] == "error"
        assert "slow.jpg" in alarm["message"] and "stalled" in alarm["message"]
        frame = hub.get(timeout=30)  # the decode finishes: the frame comes and the alarm clears
        assert frame is not None and frame.image.shape == (4000, 4000, 3)
        assert runner.stats().stalled_s is None and alarms() == []
    finally:
        stop.set()
        assert runner.join(5)


def test_a_ledger_from_before_identities_keeps_its_ids_and_then_sees_a_replacement(tmp_path: Path, assets: Path) -> None:
    images = assets / "images"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images / "bus.jpg", folder / "a.jpg")
    out = tmp_path / "out"
    model = str(assets / "models" / "yolox_nano.onnx")

    def label() -> str:
        proc = run_edgelabel("label", str(folder), "--model", model, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "labeled 1 frame(s)" in label()
    ledgers = list(out.rglob("ledger.sqlite"))
    assert len(ledgers) == 1
    db = sqlite3.connect(str(ledgers[0]))
    db.execute("DROP TABLE identity")  # as a ledger written before identities were kept
    db.commit()
    db.close()
    assert "labeled 0 frame(s)" in label()  # done by name, as before: nothing labeled again, the id unchanged
    assert set(_ids_by_key(out)) == {"a.jpg"}
    (folder / "a.jpg").write_bytes((images / "dog.jpg").read_bytes())
    assert "labeled 1 frame(s)" in label()  # a replacement after the upgrade is seen
    assert {k.split("#")[0] for k in _ids_by_key(out)} == {"a.jpg"} and len(_ids_by_key(out)) == 2


def test_a_single_image_replaced_under_its_name_is_labeled_again(tmp_path: Path, assets: Path) -> None:
    target = tmp_path / "snap.jpg"
    shutil.copy(assets / "images" / "bus.jpg", target)
    out = tmp_path / "out"

    def label() -> str:
        proc = run_edgelabel("label", str(target), "--model", str(assets / "models" / "yolox_nano.onnx"),
                             "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "labeled 1 frame(s)" in label()
    assert "labeled 0 frame(s)" in label()
    target.write_bytes((assets / "images" / "dog.jpg").read_bytes())
    assert "labeled 1 frame(s)" in label()  # was: labeled 0
    assert sorted(k.split("#")[0] for k in _ids_by_key(out)) == ["snap.jpg", "snap.jpg"]

"""Sources, the frame hub and the source runner, on the shared images and videos.

Derived files (bad images, corrupt videos) are made in tmp_path; the shared
folder is only read.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgelabel.edge.config import ReconnectConfig, SourceConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.sources import create_source, parse_uri, source_kind
from edgelabel.edge.sources.base import Source, SourceError
from edgelabel.edge.sources.folder import FolderSource, natural_key
from edgelabel.edge.sources.gstreamer import NO_GSTREAMER, CsiSource, GstSource, csi_pipeline, gstreamer_available
from edgelabel.edge.sources.hub import FrameHub
from edgelabel.edge.sources.image import ImageSource
from edgelabel.edge.sources.imageio import ImageRejected, declared_size, decode_image_bytes, sniff_format
from edgelabel.edge.sources.rtsp import RtspSource, capture_options, mask_credentials
from edgelabel.edge.sources.runner import SourceRunner
from edgelabel.edge.sources.v4l2 import V4l2Source
from edgelabel.edge.sources.video import VideoSource

IMAGE_SHAPES = {
    "bus.jpg": (1080, 810, 3),
    "classroom.jpg": (480, 640, 3),
    "dog.jpg": (576, 768, 3),
    "highway.jpg": (360, 640, 3),
    "street.jpg": (1330, 1330, 3),
    "zidane.jpg": (720, 1280, 3),
}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cfg(uri: str, name: str = "src", **kw: Any) -> SourceConfig:
    return SourceConfig(uri=uri, name=name, **kw)


def read_all(src: Source, limit: int = 10_000) -> list[Frame]:
    frames: list[Frame] = []
    while len(frames) < limit:
        f = src.read()
        if f is None:
            break
        frames.append(f)
    return frames


class Statuses:
    """Collects on_status calls (thread-safe enough for list.append)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, name: str, status: str) -> None:
        self.seen.append((name, status))

    def of(self, name: str) -> list[str]:
        return [s for n, s in self.seen if n == name]


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def drain(hub: FrameHub, runners: list[SourceRunner], timeout: float = 20.0) -> list[Frame]:
    """Consume the hub until every runner has ended and nothing is pending."""
    out: list[Frame] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = hub.get(timeout=0.05)
        if f is not None:
            out.append(f)
        elif all(not r.is_alive() for r in runners):
            f = hub.get(timeout=0)
            if f is None:
                break
            out.append(f)
    return out


# --------------------------------------------------------------------------- parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/in/", ("file", "/data/in/")),
        ("file:///data/in", ("file", "/data/in")),
        ("0", ("v4l2", "0")),
        ("v4l2:///dev/video0", ("v4l2", "/dev/video0")),
        ("rtsp://u:p@cam.local:554/s1", ("rtsp", "rtsp://u:p@cam.local:554/s1")),
        ("rtsps://cam/s", ("rtsp", "rtsps://cam/s")),
        ("csi://1", ("csi", "1")),
        ("gst://videotestsrc ! appsink", ("gst", "videotestsrc ! appsink")),
    ],
)
def test_parse_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("rtps://x", "unsupported scheme 'rtps' (use file, v4l2, rtsp, csi, gst)"),
        ("", "empty URI"),
        ("rtsp:///nohost", "has no host"),
        ("csi://a", "must be a number"),
        ("gst://videotestsrc ! fakesink", "must end in an appsink"),
    ],
)
def test_parse_uri_errors(uri: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_uri(uri)
    assert message in str(err.value)


def test_source_kind_and_factory(assets: Path) -> None:
    assert source_kind(str(assets / "images"))[0] == "folder"
    assert source_kind(str(assets / "images" / "bus.jpg"))[0] == "image"
    assert source_kind(str(assets / "videos" / "cars.mp4"))[0] == "video"
    assert isinstance(create_source(cfg(str(assets / "images"))), FolderSource)
    assert isinstance(create_source(cfg("rtsp://h/s")), RtspSource)
    assert isinstance(create_source(cfg("csi://0")), CsiSource)


# --------------------------------------------------------------------------- image decoding


def test_declared_size_parsers(tmp_path: Path, assets: Path) -> None:
    img = cv2.imread(str(assets / "images" / "dog.jpg"))
    h, w = img.shape[:2]
    cases = {
        ".png": [],
        ".bmp": [],
        ".ppm": [],
        ".webp": [cv2.IMWRITE_WEBP_QUALITY, 80],
    }
    for ext, params in cases.items():
        ok, buf = cv2.imencode(ext, img, params)
        assert ok
        data = buf.tobytes()
        fmt = sniff_format(data)
        assert fmt is not None, ext
        assert declared_size(fmt, data) == (w, h), ext
    ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless: VP8L header
    assert declared_size("webp", buf.tobytes()) == (w, h)
    jpeg = (assets / "images" / "dog.jpg").read_bytes()
    assert declared_size("jpeg", jpeg) == (w, h)
    decoded, fmt = decode_image_bytes(jpeg)
    assert fmt == "jpeg" and decoded.shape == (h, w, 3)


def test_grey_and_16bit_png_become_bgr8() -> None:
    ok, buf = cv2.imencode(".png", np.full((20, 30), 4000, np.uint16))
    image, _ = decode_image_bytes(buf.tobytes())
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8


# --------------------------------------------------------------------------- folder


def test_folder_yields_images_in_order(assets: Path) -> None:
    src = FolderSource("imgs", cfg(str(assets / "images")), str(assets / "images"))
    src.open()
    assert src.total() == 6
    frames = read_all(src)
    names = [Path(f.key).name for f in frames]
    assert names == sorted(IMAGE_SHAPES)
    for i, f in enumerate(frames):
        assert f.index == i
        assert f.key == f.path == str((assets / "images" / names[i]).absolute())
        assert os.path.isabs(f.key)
        assert f.image.shape == IMAGE_SHAPES[names[i]] and f.image.dtype == np.uint8
        assert f.source == "imgs" and not f.live
    assert src.read() is None


def test_folder_skip_does_not_decode(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgelabel.edge.sources.folder as folder_mod

    decoded: list[str] = []
    real = folder_mod.read_image_bytes

    def spy(path: str, *args: Any) -> Any:
        decoded.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(folder_mod, "read_image_bytes", spy)  # a skipped file is not even read
    src = FolderSource("imgs", cfg(str(assets / "images")), str(assets / "images"))
    done = {str((assets / "images" / n).absolute()) for n in ("bus.jpg", "dog.jpg")}
    src.skip = lambda key: key in done
    src.open()
    frames = read_all(src)
    assert [Path(f.key).name for f in frames] == ["classroom.jpg", "highway.jpg", "street.jpg", "zidane.jpg"]
    assert [f.index for f in frames] == [1, 3, 4, 5]  # position in the listing, skipped ones included
    assert decoded == ["classroom.jpg", "highway.jpg", "street.jpg", "zidane.jpg"]


def test_natural_order_recursion_and_extension_policy(tmp_path: Path, assets: Path) -> None:
    bus = (assets / "images" / "bus.jpg").read_bytes()
    ok, png = cv2.imencode(".png", np.zeros((8, 12, 3), np.uint8))
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("img10.jpg", "img2.JPG", "sub/a1.jpg", "img1.jpeg"):
        (tmp_path / name).write_bytes(bus)
    (tmp_path / "really_png.jpg").write_bytes(png.tobytes())  # decoded by content
    (tmp_path / "notes.txt").write_text("not considered")
    (tmp_path / ".partial.jpg").write_bytes(bus[:100])  # hidden: ignored, not rejected
    (tmp_path / ".hidden" / "x.jpg").write_bytes(bus)
    rejects: list[tuple[str, str]] = []
    src = FolderSource("f", cfg(str(tmp_path)), str(tmp_path))
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    frames = read_all(src)
    rel = [os.path.relpath(f.key, tmp_path) for f in frames]
    assert rel == ["img1.jpeg", "img2.JPG", "img10.jpg", "really_png.jpg", os.path.join("sub", "a1.jpg")]
    assert frames[3].image.shape == (8, 12, 3)
    assert rejects == []
    assert natural_key("a/b2.png") < natural_key("a/b10.png") < natural_key("b/a.png")


def _write_bad_files(folder: Path, assets: Path) -> dict[str, str]:
    """Bad files next to good ones; returns file name -> expected reason fragment."""
    bus = (assets / "images" / "bus.jpg").read_bytes()
    good = cv2.imread(str(assets / "images" / "highway.jpg"))
    ok, png = cv2.imencode(".png", good)
    png_bytes = bytearray(png.tobytes())
    (folder / "a_good.jpg").write_bytes(bus)
    shutil.copy(assets / "images" / "zidane.jpg", folder / "z_good.jpg")
    rng = np.random.default_rng(7)
    (folder / "b_random.png").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    corrupt = bytearray(png_bytes)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 64] = bytes(64)  # inside IDAT: CRC mismatch
    (folder / "c_corrupt.png").write_bytes(bytes(corrupt))
    (folder / "d_truncated.jpg").write_bytes(bus[: len(bus) // 2])
    (folder / "e_empty.jpg").write_bytes(b"")
    (folder / "f_text.jpg").write_text("hello, I am not a picture\n")
    bomb = bytearray(png_bytes)
    bomb[16:24] = (50000).to_bytes(4, "big") + (50000).to_bytes(4, "big")
    (folder / "g_bomb.png").write_bytes(bytes(bomb))
    (folder / "h_truncated.png").write_bytes(bytes(png_bytes[: len(png_bytes) * 2 // 3]))
    os.symlink(folder / "does-not-exist.jpg", folder / "i_broken_link.jpg")
    os.mkfifo(folder / "j_fifo.jpg")  # opening it for reading would block forever
    return {
        "b_random.png": "not an image (unknown content",
        "c_corrupt.png": "truncated or corrupt image data",
        "d_truncated.jpg": "truncated or corrupt image data",
        "e_empty.jpg": "zero-byte file",
        "f_text.jpg": "not an image (text file)",
        "g_bomb.png": "declared size 50000x50000 exceeds limit",
        "h_truncated.png": "truncated or corrupt image data",
        "i_broken_link.jpg": "broken symlink",
        "j_fifo.jpg": "not a regular file (FIFO)",
    }


def test_folder_rejects_bad_files_and_keeps_going(tmp_path: Path, assets: Path) -> None:
    expected = _write_bad_files(tmp_path, assets)
    hub = FrameHub()
    statuses = Statuses()
    reported: list[tuple[str, str, str]] = []
    stop = threading.Event()
    src = FolderSource("bad", cfg(str(tmp_path), name="bad"), str(tmp_path))
    runner = SourceRunner(src, hub, statuses, stop, on_reject=lambda n, p, r: reported.append((n, p, r)))
    runner.start()
    frames = drain(hub, [runner])
    assert runner.join(5)
    assert [Path(f.key).name for f in frames] == ["a_good.jpg", "z_good.jpg"]
    reasons = {Path(p).name: r for _, p, r in reported}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    st = runner.stats()
    assert st.status == "finished" and st.rejected == len(expected) and st.frames_in == 2
    assert st.total == 2 + len(expected)
    assert len(runner.recent_rejects()) == len(expected)
    assert statuses.of("bad") == ["online", "finished"]


@pytest.mark.skipif(IS_ROOT, reason="root can read a chmod 000 file; the FIFO and broken-symlink cases cover it")
def test_folder_rejects_unreadable_file(tmp_path: Path, assets: Path) -> None:
    shutil.copy(assets / "images" / "dog.jpg", tmp_path / "locked.jpg")
    os.chmod(tmp_path / "locked.jpg", 0)
    rejects: list[tuple[str, str]] = []
    src = FolderSource("f", cfg(str(tmp_path)), str(tmp_path))
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert read_all(src) == []
    assert rejects == [(str(tmp_path / "locked.jpg"), "permission denied")]


def test_permission_denied_reason_even_as_root(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root reads chmod 000 files, so simulate the EACCES an unprivileged daemon gets
    locked = tmp_path / "locked.jpg"
    shutil.copy(assets / "images" / "dog.jpg", locked)
    real_open = os.open

    def deny(path: str, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    rejects: list[tuple[str, str]] = []
    src = FolderSource("f", cfg(str(tmp_path)), str(tmp_path))
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert read_all(src) == []
    assert rejects == [(str(locked), "permission denied")]


def test_folder_missing_is_offline(tmp_path: Path) -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    missing = tmp_path / "nope"
    runner = SourceRunner(FolderSource("m", cfg(str(missing), name="m"), str(missing)), hub, statuses, stop)
    runner.start()
    assert runner.join(5)
    assert statuses.of("m") == ["offline"]
    assert "not found" in (runner.stats().last_error or "")


def test_watch_mode_picks_up_new_files(tmp_path: Path, assets: Path) -> None:
    shutil.copy(assets / "images" / "dog.jpg", tmp_path / "a.jpg")
    src = FolderSource("w", cfg(str(tmp_path), watch=True, watch_interval=0.05), str(tmp_path))
    src.stop_event = threading.Event()
    src.open()
    assert src.total() == 1
    first = src.read()
    assert first is not None and first.index == 0

    def add_later() -> None:
        time.sleep(0.2)
        shutil.copy(assets / "images" / "highway.jpg", tmp_path / "b.jpg")

    threading.Thread(target=add_later, daemon=True).start()
    t0 = time.monotonic()
    second = src.read()  # blocks until b.jpg shows up and is stable
    assert second is not None and Path(second.key).name == "b.jpg" and second.index == 1
    assert second.image.shape == IMAGE_SHAPES["highway.jpg"]
    assert time.monotonic() - t0 < 5
    threading.Timer(0.15, src.stop_event.set).start()
    assert src.read() is None  # stop ends the watch
    assert src.total() == 1


def test_watching_runner_stops_promptly_without_finishing(tmp_path: Path, assets: Path) -> None:
    shutil.copy(assets / "images" / "dog.jpg", tmp_path / "a.jpg")
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    src = FolderSource("w", cfg(str(tmp_path), name="w", watch=True, watch_interval=5), str(tmp_path))
    runner = SourceRunner(src, hub, statuses, stop)
    runner.start()
    assert hub.get(timeout=5) is not None
    time.sleep(0.1)  # now waiting out the 5 s poll interval
    t0 = time.monotonic()
    stop.set()
    assert runner.join(2) and time.monotonic() - t0 < 1
    assert statuses.of("w") == ["online"]


def test_watch_defers_a_file_still_being_written(tmp_path: Path, assets: Path) -> None:
    data = (assets / "images" / "bus.jpg").read_bytes()
    src = FolderSource("w", cfg(str(tmp_path), watch=True, watch_interval=0.05), str(tmp_path))
    src.open()
    target = tmp_path / "growing.jpg"
    target.write_bytes(data[:1000])
    assert src._poll() == 0  # first sighting
    with open(target, "ab") as fh:
        fh.write(data[1000:5000])
    assert src._poll() == 0  # size changed: still deferred
    with open(target, "ab") as fh:
        fh.write(data[5000:])
    assert src._poll() == 0
    assert src._poll() == 1  # unchanged across two polls: ready
    frame = src.read()
    assert frame is not None and frame.image.shape == IMAGE_SHAPES["bus.jpg"]


def test_watch_rejects_a_file_that_stays_empty_past_the_grace(tmp_path: Path, assets: Path) -> None:
    """An empty new file may be a copy that has not started; one that stays empty is reported, not kept forever."""
    src = FolderSource("w", cfg(str(tmp_path), watch=True, watch_interval=0.05), str(tmp_path))
    src.empty_grace = 0.3
    rejects: list[tuple[str, str]] = []
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    late = tmp_path / "late.jpg"
    late.write_bytes(b"")
    stuck = tmp_path / "stuck.jpg"
    stuck.write_bytes(b"")
    assert src._poll() == 0 and src._poll() == 0  # empty: deferred
    late.write_bytes((assets / "images" / "bus.jpg").read_bytes())  # the copy arrives within the grace
    time.sleep(0.35)
    assert src._poll() == 1  # stuck.jpg: empty past the grace, its signature unchanged -> read (late.jpg: changed)
    assert src._poll() == 1  # late.jpg: unchanged across two polls
    frame = src.read()
    assert frame is not None and frame.path.endswith("late.jpg")
    assert rejects == [(str(stuck), "zero-byte file")]


# --------------------------------------------------------------------------- single image


def test_image_source(assets: Path, tmp_path: Path) -> None:
    path = str(assets / "images" / "zidane.jpg")
    src = ImageSource("one", cfg(path), path)
    src.open()
    assert src.total() == 1
    f = src.read()
    assert f is not None and f.key == f.path == os.path.abspath(path) and f.image.shape == (720, 1280, 3)
    assert src.read() is None

    bad = tmp_path / "bad.jpg"
    bad.write_bytes((assets / "images" / "zidane.jpg").read_bytes()[:5000])
    rejects: list[tuple[str, str]] = []
    src = ImageSource("bad", cfg(str(bad)), str(bad))
    src.on_reject = lambda p, r: rejects.append((p, r))
    src.open()
    assert src.read() is None
    assert rejects and "truncated" in rejects[0][1]

    with pytest.raises(SourceError, match="not found"):
        ImageSource("x", cfg(str(tmp_path / "no.jpg")), str(tmp_path / "no.jpg")).open()


# --------------------------------------------------------------------------- video


def test_video_frames_and_keys(assets: Path) -> None:
    path = str(assets / "videos" / "cars.mp4")
    src = VideoSource("cars", cfg(path), path)
    src.open()
    assert src.total() == 268
    frames = read_all(src)
    src.close()
    assert len(frames) == 268
    apath = os.path.abspath(path)
    assert [f.key for f in frames[:3]] == [f"{apath}#0", f"{apath}#1", f"{apath}#2"]
    assert frames[-1].key == f"{apath}#267" and frames[-1].index == 267
    assert frames[0].image.shape == (720, 1280, 3) and frames[0].path is None


def test_video_skip_resumes(assets: Path) -> None:
    path = str(assets / "videos" / "cars.mp4")
    src = VideoSource("cars", cfg(path), path)
    apath = os.path.abspath(path)
    src.skip = lambda key: key.endswith(("#0", "#1"))  # resume: grabbed, not returned
    src.open()
    frames = read_all(src, limit=3)
    src.close()
    assert [f.index for f in frames] == [2, 3, 4] and frames[0].key == f"{apath}#2"


def test_video_loop_is_a_stand_in_camera(assets: Path) -> None:
    path = str(assets / "videos" / "cars.mp4")
    src = VideoSource("cars", cfg(path, loop=True), path)
    apath = os.path.abspath(path)
    asked: list[str] = []
    src.skip = lambda key: asked.append(key) or True  # a looped file has nothing to resume: never asked
    src.open()
    assert src.total() is None
    frames = read_all(src, limit=280)
    src.close()
    assert not asked and frames[0].index == 0
    keys = [f.key for f in frames]
    assert len(set(keys)) == len(keys) == 280  # unique across passes (and restarts): keyed by capture time
    assert all(k.startswith(f"{apath}@") for k in keys) and all(f.live for f in frames)
    assert frames[-1].index == 279
    assert frames[268].extra["pass"] == 1 and frames[268].extra["position"] == 0 and frames[268].media_time == 0.0


def test_video_corrupt_middle_finishes_with_warning(
    assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = bytearray((assets / "videos" / "cars.mp4").read_bytes())
    moov = data.find(b"moov") - 4
    assert moov > len(data) // 2, "expected the index at the end of cars.mp4"
    data[len(data) // 2 : moov] = bytes(moov - len(data) // 2)  # zero the second half of the media data
    bad = tmp_path / "zeroed.mp4"
    bad.write_bytes(bytes(data))
    src = VideoSource("z", cfg(str(bad)), str(bad))
    src.open()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="edgelabel.edge.sources.video"):
        frames = read_all(src)
    assert time.monotonic() - t0 < 10
    assert 0 < len(frames) < 268
    assert any(f"read failed at frame {len(frames)} of 268" in r.getMessage() for r in caplog.records)


def test_video_unopenable(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    with pytest.raises(SourceError, match=str(fake)):
        VideoSource("v", cfg(str(fake)), str(fake)).open()
    with pytest.raises(SourceError, match="not found"):
        VideoSource("v", cfg(str(tmp_path / "none.mp4")), str(tmp_path / "none.mp4")).open()


# --------------------------------------------------------------------------- runner


def test_storage_fps_cap_throttles(assets: Path) -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    folder = str(assets / "images")
    runner = SourceRunner(FolderSource("slow", cfg(folder, name="slow", fps=10), folder), hub, statuses, stop)
    t0 = time.monotonic()
    runner.start()
    frames = drain(hub, [runner])
    elapsed = time.monotonic() - t0
    assert len(frames) == 6
    assert elapsed >= 0.4  # 6 frames at 10 fps: at least 5 intervals of 0.1 s
    assert runner.stats().frames_skipped_fps == 0 and hub.dropped("slow") == 0


def test_disabled_source_does_nothing(assets: Path) -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    folder = str(assets / "images")
    runner = SourceRunner(FolderSource("off", cfg(folder, name="off", enabled=False), folder), hub, statuses, stop)
    runner.start()
    assert runner.join(0.1) and not runner.is_alive()
    assert statuses.of("off") == ["disabled"] and runner.stats().status == "disabled"


def test_v4l2_absent_backs_off_and_others_run(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[float] = []
    real_open = V4l2Source.open

    def counting_open(self: V4l2Source) -> None:
        attempts.append(time.monotonic())
        real_open(self)

    monkeypatch.setattr(V4l2Source, "open", counting_open)
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    cam_cfg = cfg("v4l2:///dev/video99", name="cam", reconnect=ReconnectConfig(initial=0.05, max=0.2))
    cam = SourceRunner(V4l2Source("cam", cam_cfg, "/dev/video99"), hub, statuses, stop)
    folder = str(assets / "images")
    files = SourceRunner(FolderSource("files", cfg(folder, name="files"), folder), hub, statuses, stop)
    cam.start()
    files.start()
    frames = drain(hub, [files])
    assert len(frames) == 6 and all(f.source == "files" for f in frames)
    assert wait_for(lambda: len(attempts) >= 6, timeout=5)
    stop.set()
    assert cam.join(3) and files.join(3)
    assert statuses.of("cam") == ["offline"]  # never opened: offline with the reason, not "reconnecting"
    assert cam.stats().status == "offline"
    st = cam.stats()
    assert st.live and st.reconnects >= 5
    assert "camera /dev/video99 not found; check the cable and `ls /dev/video*`" in (st.last_error or "")
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[2] > gaps[0] * 1.5  # 0.05, 0.1, 0.2 ...
    assert max(gaps) < 0.6  # capped at reconnect.max
    assert statuses.of("files") == ["online", "finished"]


def test_v4l2_permission_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = tmp_path / "video0"
    dev.write_bytes(b"")
    monkeypatch.setattr("edgelabel.edge.sources.v4l2.os.access", lambda p, mode: False)
    with pytest.raises(SourceError, match="`video` group"):
        V4l2Source("c", cfg(str(dev)), str(dev)).open()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rtsp_closed_port_reconnects_and_stops_promptly(caplog: pytest.LogCaptureFixture) -> None:
    url = f"rtsp://admin:s3cret@127.0.0.1:{_closed_port()}/stream"
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    rc = ReconnectConfig(initial=0.1, max=0.4)
    runner = SourceRunner(RtspSource("ipcam", cfg(url, name="ipcam", read_timeout=2, reconnect=rc), url),
                          hub, statuses, stop)
    with caplog.at_level(logging.DEBUG):
        runner.start()
        assert wait_for(lambda: runner.stats().reconnects >= 2, timeout=15)
        t0 = time.monotonic()
        stop.set()
        assert runner.join(3)
        assert time.monotonic() - t0 < 3
    assert statuses.of("ipcam") == ["offline"]  # it never answered: offline until it first opens
    err = runner.stats().last_error or ""
    assert "admin:***@127.0.0.1" in err
    assert "s3cret" not in err and not any("s3cret" in r.getMessage() for r in caplog.records)
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ or os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")


def test_mask_credentials_and_keys() -> None:
    assert mask_credentials("rtsp://admin:pa@ss@cam:554/s") == "rtsp://admin:***@cam:554/s"
    assert mask_credentials("rtsp://cam/s") == "rtsp://cam/s"
    assert mask_credentials("rtspsrc location=rtsp://u:p@h/x ! a", None) == "rtspsrc location=rtsp://h/x ! a"
    src = RtspSource("c", cfg("rtsp://u:pw@h/s"), "rtsp://u:pw@h/s")
    assert src.key_base() == "rtsp://h/s" and "pw" not in src.describe()
    assert capture_options(None) == "rtsp_transport;tcp"
    assert capture_options("stimeout;5000000") == "rtsp_transport;tcp|stimeout;5000000"
    assert capture_options("rtsp_transport;udp") == "rtsp_transport;udp"


# A live source whose read hangs forever, like cv2.VideoCapture.read on a vanished camera.
_release_hung = threading.Event()


class HangingSource(Source):
    live = True
    instances: list[HangingSource] = []

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self.closed = threading.Event()
        HangingSource.instances.append(self)

    def open(self) -> None:
        return None

    def read(self) -> Frame | None:
        _release_hung.wait(30)
        raise SourceError("released")

    def close(self) -> None:
        self.closed.set()


def test_hung_live_read_is_abandoned() -> None:
    HangingSource.instances.clear()
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    c = cfg("x", name="hang", read_timeout=0.2, reconnect=ReconnectConfig(initial=0.05, max=0.1))
    runner = SourceRunner(HangingSource("hang", c, "x"), hub, statuses, stop)
    try:
        runner.start()
        assert wait_for(lambda: len(HangingSource.instances) >= 3, timeout=5)
        assert statuses.of("hang")[:2] == ["online", "reconnecting"]
        assert "took longer than 0.2 s" in (runner.stats().last_error or "")
        t0 = time.monotonic()
        stop.set()
        assert runner.join(3) and time.monotonic() - t0 < 1.5
    finally:
        _release_hung.set()
    # each abandoned object is closed by its helper once the hung call returns
    assert wait_for(lambda: all(s.closed.is_set() for s in HangingSource.instances[:2]), timeout=5)


class FastLive(Source):
    live = True

    def __init__(self, name: str, cfg: SourceConfig, target: str, fail_after: int = 0) -> None:
        super().__init__(name, cfg, target)
        self.n = 0
        self.fail_after = fail_after

    def open(self) -> None:
        return None

    def read(self) -> Frame | None:
        time.sleep(0.005)
        self.n += 1
        if self.fail_after and self.n % self.fail_after == 0:
            raise RuntimeError("driver bug")
        return Frame(self.name, self.n, np.zeros((4, 4, 3), np.uint8), time.time(), f"x@{self.n}", live=True)


def test_live_fps_cap_skips_and_hub_drops(caplog: pytest.LogCaptureFixture) -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    runner = SourceRunner(FastLive("fast", cfg("x", name="fast", fps=20), "x"), hub, statuses, stop)
    runner.start()
    time.sleep(0.6)
    stop.set()
    assert runner.join(3)
    st = runner.stats()
    forwarded = st.frames_in - st.frames_skipped_fps
    assert st.frames_skipped_fps > 0 and 5 <= forwarded <= 16
    assert st.frames_dropped == forwarded - hub.pending("fast")  # nobody consumed: all but the newest dropped
    assert st.fps_in > 30


def test_unexpected_exception_becomes_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    c = cfg("x", name="buggy", reconnect=ReconnectConfig(initial=0.05, max=0.05))
    runner = SourceRunner(FastLive("buggy", c, "x", fail_after=3), hub, statuses, stop)
    with caplog.at_level(logging.ERROR, logger="edgelabel.edge.sources.runner"):
        runner.start()
        assert wait_for(lambda: runner.stats().reconnects >= 2, timeout=5)
        stop.set()
        assert runner.join(3)
    assert "RuntimeError: driver bug" in (runner.stats().last_error or "")
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    assert statuses.of("buggy")[:3] == ["online", "reconnecting", "online"]


class BrokenStorage(Source):
    def open(self) -> None:
        return None

    def read(self) -> Frame | None:
        raise ValueError("boom")


def test_storage_exception_goes_offline() -> None:
    hub, statuses, stop = FrameHub(), Statuses(), threading.Event()
    runner = SourceRunner(BrokenStorage("broken", cfg("x", name="broken"), "x"), hub, statuses, stop)
    runner.start()
    assert runner.join(3)
    assert statuses.of("broken") == ["online", "offline"]
    assert "ValueError: boom" in (runner.stats().last_error or "")


# --------------------------------------------------------------------------- hub


def _frame(source: str, i: int) -> Frame:
    return Frame(source, i, np.zeros((2, 2, 3), np.uint8), time.time(), f"{source}#{i}")


def test_hub_live_keeps_newest_and_counts_drops() -> None:
    hub = FrameHub()
    hub.register("cam", live=True)
    for i in range(5):
        assert hub.put(_frame("cam", i))
    assert hub.pending("cam") == 1 and hub.dropped("cam") == 4
    f = hub.get(timeout=0.1)
    assert f is not None and f.index == 4
    assert hub.get(timeout=0.01) is None


def test_hub_storage_blocks_and_never_drops() -> None:
    hub = FrameHub()
    hub.register("file", live=False, capacity=2)
    max_pending = 0

    def producer() -> None:
        for i in range(20):
            assert hub.put(_frame("file", i))

    t = threading.Thread(target=producer)
    t.start()
    got = []
    while len(got) < 20:
        max_pending = max(max_pending, hub.pending("file"))
        f = hub.get(timeout=2)
        assert f is not None
        got.append(f.index)
        time.sleep(0.002)
    t.join(2)
    assert got == list(range(20)) and hub.dropped("file") == 0 and max_pending <= 2
    hub.put(_frame("file", 20))
    hub.put(_frame("file", 21))
    assert hub.put(_frame("file", 22), timeout=0.05) is False  # full: a timed put gives up
    with pytest.raises(KeyError):
        hub.put(_frame("unknown", 0))


def test_hub_round_robin_is_fair() -> None:
    hub = FrameHub()
    hub.register("video", live=False, capacity=8)
    hub.register("cam", live=True)
    for i in range(8):
        hub.put(_frame("video", i))
    order = []
    for i in range(3):
        hub.put(_frame("cam", i))
        order.append(hub.get(timeout=0.1).source)  # type: ignore[union-attr]
        order.append(hub.get(timeout=0.1).source)  # type: ignore[union-attr]
    assert order.count("cam") == 3  # the camera is served every other frame despite the video backlog


def test_hub_close_wakes_waiters() -> None:
    hub = FrameHub()
    hub.register("file", live=False, capacity=1)
    hub.put(_frame("file", 0))
    results: dict[str, object] = {}

    def blocked_put() -> None:
        results["put"] = hub.put(_frame("file", 1))

    empty = FrameHub()
    empty.register("x", live=True)

    def blocked_get() -> None:
        results["get"] = empty.get(timeout=10)

    threads = [threading.Thread(target=blocked_put), threading.Thread(target=blocked_get)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    hub.close()
    empty.close()
    for t in threads:
        t.join(2)
    assert time.monotonic() - t0 < 1
    assert results == {"put": False, "get": None}
    assert hub.get(timeout=0) is None


# --------------------------------------------------------------------------- GStreamer / CSI


def test_csi_pipeline_string() -> None:
    assert csi_pipeline(0) == (
        "nvarguscamerasrc sensor-id=0 ! "
        "video/x-raw(memory:NVMM),width=1280,height=720,format=NV12,framerate=30/1 ! "
        "nvvidconv flip-method=0 ! video/x-raw,width=1280,height=720,format=BGRx ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
    )
    p = csi_pipeline(1, 1920, 1080, 29.97)
    assert "sensor-id=1" in p and "width=1920,height=1080" in p and "framerate=30000/1001" in p
    assert p.endswith("video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    src = CsiSource("csi", cfg("csi://1", width=640, height=480, fps=15), "1")
    assert src.pipeline == csi_pipeline(1, 640, 480, 15) and src.key_base() == "csi://1"


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gstreamer_missing_is_explained() -> None:
    for src in (CsiSource("csi", cfg("csi://0"), "0"), GstSource("g", cfg("gst://x ! appsink"), "videotestsrc ! appsink")):
        with pytest.raises(SourceError) as err:
            src.open()
        assert str(err.value) == NO_GSTREAMER
        assert "JetPack's OpenCV (see README: 'Jetson install')" in str(err.value)


def test_image_rejected_is_an_exception_with_reason() -> None:
    with pytest.raises(ImageRejected) as err:
        decode_image_bytes(b"%PDF-1.4 ...")
    assert err.value.reason == "not an image (PDF document)"


def test_a_source_rebuilt_after_a_hang_keeps_what_the_pipeline_told_it(tmp_path: Path) -> None:
    """A source stuck in a call is replaced by a fresh object: the replacement must keep the pipeline's hooks
    (files done, identities, files given up after a decode over budget, protected paths), or a rebuilt source
    would label done files again and decode a given-up file once more."""
    hub, stop = FrameHub(), threading.Event()
    src = FolderSource("f", cfg(str(tmp_path), name="f"), str(tmp_path))
    hooks = {"skip": lambda key: True, "identity_of": lambda path: None, "adopt_identity": lambda *a: None,
             "given_up": lambda path: True}
    for name, hook in hooks.items():
        setattr(src, name, hook)
    runner = SourceRunner(src, hub, Statuses(), stop)
    new = runner._replacement(src)
    assert new is not src
    for name, hook in hooks.items():
        assert getattr(new, name) is hook, name
    assert new.protected == src.protected

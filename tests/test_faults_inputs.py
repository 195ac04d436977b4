"""Fault: hostile inputs -- corrupt videos and bad image files -- while the daemon runs.

Injected for real, into a running daemon (``edgelabel run``, three sources):

* ``flipped.mp4``: a copy of ``cars.mp4`` with every 997th byte of its middle 400 KB inverted
  (corrupt H.264 packets; FFmpeg conceals what it can);
* ``cut.mp4``: a copy whose second half of media data is zeroed (reads fail before the declared end);
* a watched drop folder that receives, in rounds, good images and bad ones: truncated, zero-byte,
  wrong extension (an MP4 and a text file named as images), permission denied, and decompression
  bombs (a PNG and a JPEG whose headers declare 100000x100000 and 65000x65000 pixels).  The first
  round is there at start-up; a zero-byte file only in that one, because a watched folder defers a
  new empty file until it has content (it may still be being copied) -- see RELIABILITY.md.

The permission case needs a daemon that cannot bypass file modes: as root the daemon runs without
CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (``setpriv``), like the unprivileged service user.

Must happen: every bad file is rejected with its reason (ledger and ``rejected.csv``), the cut
video is reported once with the frame where it broke, the flipped one is labeled to its end; no
source crashes, good images keep being labeled within seconds of arriving, the daemon exits 0 on
SIGTERM; RSS does not grow with the number of rejected files and its peak stays far below what a
bomb would allocate.  Measured: RSS before/after/peak, per-round labeling latency, counts.
"""

from __future__ import annotations

import csv
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import Broker
from tests.test_faults_support import (
    HAVE_MOSQUITTO,
    IS_ROOT,
    DaemonProc,
    TimedCollector,
    measure,
    rss_kib,
    sqlite_scalar,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")]

ROUNDS = 8  # after the warm-up round
SETPRIV = shutil.which("setpriv")
NO_DAC = ["--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]

#: bad file (name suffix) -> a fragment of the reason it must be rejected with
EXPECTED = {
    "zero.jpg": "zero-byte file",
    "truncated.jpg": "truncated or corrupt image data",
    "clip.jpg": "not an image (a video/ISO media file)",
    "notes.png": "not an image (text file)",
    "bomb.png": "declared size 100000x100000 exceeds limit",
    "bomb.jpg": "declared size 65000x65000 exceeds limit",
    "locked.jpg": "permission denied",
}


def png_bomb() -> bytes:
    """A valid-looking PNG whose header declares 100000x100000 RGB pixels (30 GB decoded); 100 bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + chunk(b"IEND", b"")


def jpeg_bomb(real: bytes) -> bytes:
    """A real JPEG with its frame header (SOF0/SOF2) patched to declare 65000x65000."""
    data = bytearray(real)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            data[at + 5:at + 9] = struct.pack(">HH", 65_000, 65_000)
            return bytes(data)
    raise AssertionError("no SOF marker in the sample JPEG")


def corrupt_videos(src: Path, tmp: Path) -> tuple[Path, Path]:
    data = bytes(src.read_bytes())
    flipped = bytearray(data)
    mid = len(data) // 2
    for i in range(mid - 200_000, mid + 200_000, 997):
        flipped[i] ^= 0xFF
    cut = bytearray(data)
    moov = data.find(b"moov") - 4
    assert moov > mid, "expected the index at the end of the sample video"
    cut[mid:moov] = bytes(moov - mid)
    (tmp / "flipped.mp4").write_bytes(bytes(flipped))
    (tmp / "cut.mp4").write_bytes(bytes(cut))
    return tmp / "flipped.mp4", tmp / "cut.mp4"


def drop_round(drop: Path, r: int, assets: Path, can_lock: bool) -> list[str]:
    """Write one round of files (good and bad) into the watched folder; returns the bad names."""
    images = assets / "images"
    staging = drop.parent / "staging"
    staging.mkdir(exist_ok=True)
    bus = (images / "bus.jpg").read_bytes()
    files: dict[str, bytes] = {
        f"r{r:02d}_good.jpg": (images / "zidane.jpg").read_bytes(),
        f"r{r:02d}_png_named.jpg": _png_of(images / "dog.jpg"),  # a PNG named .jpg: decoded by content, accepted
        f"r{r:02d}_truncated.jpg": bus[:20_000],
        f"r{r:02d}_clip.jpg": (assets / "videos" / "cars.mp4").read_bytes()[:200_000],
        f"r{r:02d}_notes.png": b"this is a shopping list, not an image\n" * 20,
        f"r{r:02d}_bomb.png": png_bomb(),
        f"r{r:02d}_bomb.jpg": jpeg_bomb((images / "classroom.jpg").read_bytes()),
    }
    if can_lock:
        files[f"r{r:02d}_locked.jpg"] = (images / "highway.jpg").read_bytes()
    if r == 0:  # present at start-up: the first listing reads it (later, an empty new file waits for content)
        files[f"r{r:02d}_zero.jpg"] = b""
    for name, content in files.items():  # written aside, then renamed in: the watcher sees whole files
        tmp = staging / name
        tmp.write_bytes(content)
        if name.endswith("locked.jpg"):
            tmp.chmod(0)
        os.replace(tmp, drop / name)
    return [n for n in files if "good" not in n and "png_named" not in n]


_PNG_CACHE: dict[Path, bytes] = {}


def _png_of(path: Path) -> bytes:
    if path not in _PNG_CACHE:
        import cv2

        ok, buf = cv2.imencode(".png", cv2.imread(str(path)))
        assert ok
        _PNG_CACHE[path] = buf.tobytes()
    return _PNG_CACHE[path]


def test_bad_inputs_rejected_with_reasons_pipeline_keeps_going_memory_bounded(
    tmp_path: Path, assets: Path, broker: Broker
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    flipped, cut = corrupt_videos(assets / "videos" / "cars.mp4", tmp_path)
    prefix: list[str] = []
    if IS_ROOT and SETPRIV:
        prefix = [SETPRIV, *NO_DAC]
    can_lock = not IS_ROOT or bool(prefix)
    cfg = write_config(tmp_path, broker.port, {
        "drop": {"uri": f"{drop}/", "watch": True, "watch_interval": 0.2},
        "flipped": {"uri": str(flipped)},
        "cut": {"uri": str(cut)},
    })
    ledger = tmp_path / "state" / "ledger.sqlite"

    def rejected() -> int:
        return int(sqlite_scalar(ledger, "SELECT COUNT(*) FROM rejected WHERE source = 'drop'") or 0)

    def labeled(source: str) -> int:
        return int(sqlite_scalar(ledger, f"SELECT COUNT(*) FROM done WHERE source = '{source}'") or 0)

    col = TimedCollector(broker.port)
    expected_bad = drop_round(drop, 0, assets, can_lock)  # the warm-up round, there from the start
    t0 = time.monotonic()
    daemon = DaemonProc(cfg, prefix=prefix)
    latencies: list[float] = []
    try:
        # labeled while both damaged videos are being decoded: the folder does not wait for them
        assert wait_until(lambda: labeled("drop") >= 2 and rejected() >= len(expected_bad), 60), \
            f"{labeled('drop')} labeled, {rejected()} rejected\n" + daemon.log()[-3000:]
        latencies.append(round(time.monotonic() - t0, 2))  # includes the daemon's start-up
        assert wait_until(lambda: all(col.last(f"/{s}/status") == b"finished" for s in ("flipped", "cut")), 120), \
            daemon.log()[-3000:]
        after_videos = rss_kib(daemon.pid)
        samples: list[dict[str, int]] = []
        for r in range(1, ROUNDS + 1):
            t0 = time.monotonic()
            expected_bad += drop_round(drop, r, assets, can_lock)
            assert wait_until(lambda n=2 * (r + 1), m=len(expected_bad): labeled("drop") >= n and rejected() >= m, 30), \
                f"round {r}: {labeled('drop')} labeled, {rejected()} rejected\n" + daemon.log()[-3000:]
            latencies.append(round(time.monotonic() - t0, 2))
            samples.append(rss_kib(daemon.pid))
        base, end = samples[0], samples[-1]  # from the first bad-file round after the videos to the last
        assert daemon.alive()
        code = daemon.stop(30)
    finally:
        daemon.ensure_dead()
        col.close()
    assert code == 0, daemon.log()[-4000:]
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]
    with open(tmp_path / "state" / "rejected.csv", newline="", encoding="utf-8") as fh:
        report = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(fh)}
    for name in expected_bad:
        suffix = name.split("_", 1)[1]
        assert name in report, f"{name} not in rejected.csv"
        assert EXPECTED[suffix] in report[name], (name, report[name])
    assert "cut.mp4" in report and "corrupt or cut-off video" in report["cut.mp4"]
    assert "flipped.mp4" not in report  # concealed by the decoder: labeled, not rejected
    drop_labels = [p for _, p in col.labels("drop")]
    assert len({r["frame_key"] for r in drop_labels}) == 2 * (ROUNDS + 1)
    assert all("good" in r["frame_key"] or "png_named" in r["frame_key"] for r in drop_labels)
    flipped_n = len({r["id"] for _, r in col.labels("flipped")})
    cut_n = len({r["id"] for _, r in col.labels("cut")})
    growth_mib = (end["VmRSS"] - base["VmRSS"]) / 1024
    measure("bad_inputs", daemon_without_dac_override=bool(prefix), bad_files_rejected=len(expected_bad),
            reasons={k: v for k, v in sorted(report.items()) if k.startswith("r00_") or k.endswith(".mp4")},
            flipped_video_frames_labeled=f"{flipped_n}/268", cut_video_frames_labeled=f"{cut_n}/268",
            rss_mib_when_videos_done=round(after_videos["VmRSS"] / 1024, 1),
            rss_mib_per_round=[round(x["VmRSS"] / 1024, 1) for x in samples],
            rss_growth_mib_round1_to_last=round(growth_mib, 1), rss_peak_mib=round(end["VmHWM"] / 1024, 1),
            rounds=ROUNDS, seconds_per_round=latencies)
    assert flipped_n == 268  # every frame decoded (concealed) and labeled
    assert 0 < cut_n < 268
    assert growth_mib < 25, f"RSS grew {growth_mib:.1f} MiB over {ROUNDS} rounds of bad files"
    assert end["VmHWM"] < 1024 * 1024, "peak RSS above 1 GiB: something was decoded at its declared size"
    assert max(latencies) < 10
    if not can_lock:
        pytest.skip("permission denied not exercised: root without setpriv can read a chmod 000 file")

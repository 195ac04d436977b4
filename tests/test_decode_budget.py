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

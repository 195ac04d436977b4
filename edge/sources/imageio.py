"""Decoding helpers shared by the sources: safe image-file decoding and a cv2 capture base.

Image files come from places we do not control (camera uploads, rsync drops,
operators' USB sticks), so ``decode_image_file`` treats every file as hostile:
it reads the bytes itself (so permission errors, FIFOs and broken symlinks are
reported instead of hanging or raising), recognises the format by its content,
checks the size the header *declares* before asking OpenCV to allocate it
(decompression bombs), and rejects JPEG/PNG files that stop before their end
marker (OpenCV would return a half-grey picture with only a warning on stderr).
Every problem becomes an ``ImageRejected`` with a short human reason that the
runner forwards to the rejected-files report.

``CaptureSource`` is the common base of the live sources (V4L2, RTSP, CSI,
GStreamer): they differ only in how the ``cv2.VideoCapture`` is opened.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import multiprocessing
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

# OpenCV reads this limit once, when the library is loaded: it only takes effect
# if this module is the first to import cv2.  The header check below is the
# guard we rely on; this is a second line for formats we cannot parse cheaply
# (TIFF, JPEG 2000).
MAX_IMAGE_PIXELS = int(os.environ.get("EDGELABEL_MAX_IMAGE_PIXELS", "100000000"))
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edgelabel.edge.config import SourceConfig  # noqa: E402
from edgelabel.edge.frame import Frame  # noqa: E402
from edgelabel.edge.sources.base import Source, SourceError  # noqa: E402
from edgelabel.edge.sources.pathguard import PathGuard  # noqa: E402

logger = logging.getLogger(__name__)

#: files bigger than this are not read into memory at all (a 100 MP BMP is ~300 MB)
MAX_FILE_BYTES = 512 * 1024 * 1024
#: progressive JPEG scans allowed in one file.  Each scan makes the decoder pass over the whole coefficient
#: buffer again, so a small file of thousands of nearly empty scans takes minutes to decode.  Encoders write
#: far fewer (OpenCV/libjpeg's progressive script: 10 for colour; mozjpeg's searched scripts: a few dozen).
MAX_JPEG_SCANS = 100
#: wall-clock seconds one image file or one video frame may take to decode (``EDGELABEL_DECODE_BUDGET_S``).
#: A file over it is rejected with that reason (``rejected.csv``) and not tried again on the next start
#: (:func:`given_up`); a video stops at the frame that went over it.
DECODE_BUDGET_S = float(os.environ.get("EDGELABEL_DECODE_BUDGET_S", "10"))
#: an image whose estimated decode work (pixels x progressive scans) reaches this, or whose size its header
#: does not say, is decoded in a child process that is killed at the budget: a decode in a thread cannot be
#: stopped, and would go on taking a core and up to 300 MB after the source moved on.  Smaller ones (a
#: 20 MP baseline or a 12 MP progressive JPEG of libjpeg's 10 scans: well under a second here) are decoded in
#: the source's thread: a child costs a copy of the pixels each way.
CHILD_DECODE_WORK = 200_000_000
#: the first words of the reason of a decode over the budget (:func:`given_up`)
OVER_BUDGET = "decoding took longer than the decode budget"


class ImageRejected(Exception):
    """One input file cannot be used; ``reason`` is the short text for the rejected-files report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedImage:
    """A decoded file plus the facts about it that callers log or attach to frames."""

    image: np.ndarray  # HxWx3 uint8 BGR
    format: str  # "jpeg", "png", ... as recognised from the content
    size_bytes: int
    mtime: float


CORRUPT = "truncated or corrupt image data"


# --------------------------------------------------------------------------- format sniffing


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None when it is not one OpenCV decodes here."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or data.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3] in b" \t\r\n#":
        return "pnm"
    return None


def _describe_non_image(data: bytes) -> str:
    """Why the content is not an image, in words an operator recognises."""
    head = data[:64]
    if head.startswith(b"GIF8"):
        return "not an image (GIF is not supported; convert to PNG or JPEG)"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "not an image (HEIC is not supported by OpenCV; convert to JPEG)"
        if brand in (b"avif", b"avis"):
            return "not an image (AVIF is not supported; convert to PNG or JPEG)"
        return "not an image (a video/ISO media file)"
    if head.startswith(b"%PDF"):
        return "not an image (PDF document)"
    if head.startswith(b"PK\x03\x04"):
        return "not an image (ZIP archive)"
    if head.startswith(b"\x7fELF"):
        return "not an image (executable)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "not an image (text file)"
    return f"not an image (unknown content starting {head[:8].hex(' ')})"


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first SOS marker) from the JPEG markers before the scan."""
    sof = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    size: tuple[int, int] | None = None
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageRejected(f"{CORRUPT} (bad JPEG marker at byte {i})")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            raise ImageRejected(f"{CORRUPT} (JPEG ends before any image data)")
        seglen = int.from_bytes(data[i + 2 : i + 4], "big")
        if seglen < 2:
            raise ImageRejected(f"{CORRUPT} (bad JPEG segment length)")
        if marker in sof:
            if i + 9 > n:
                break
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            size = (width, height)
        elif marker == 0xDA:
            if size is None:
                raise ImageRejected(f"{CORRUPT} (JPEG has no frame header)")
            return size[0], size[1], i
        i += 2 + seglen
    raise ImageRejected(f"{CORRUPT} (JPEG ends inside its header)")


#: any marker inside entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart marker nor fill
_ENTROPY_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scan_count(data: bytes, sos: int, limit: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS segments) from the first one on; ImageRejected past ``limit``.

    Walks the segments (their lengths are trusted only to jump) and the entropy-coded data between them,
    which holds no marker but stuffed 0xFF00 and restart markers.
    """
    scans = 0
    i = sos
    n = len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            break
        seglen = int.from_bytes(data[i + 2 : i + 4], "big")
        if seglen < 2:
            raise ImageRejected(f"{CORRUPT} (bad JPEG segment length)")
        i += 2 + seglen
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                raise ImageRejected(f"progressive JPEG with more than {limit} scans (decoding it would stall the "
                                    "source; re-encode the file)")
            found = _ENTROPY_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    return scans


_PNM_RE = re.compile(rb"^P[1-6](?:\s|#[^\n]*\n)+(\d+)(?:\s|#[^\n]*\n)+(\d+)")


def declared_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header without decoding; None where we do not parse that format.

    Raises ImageRejected when the header itself is cut off or malformed.
    """
    if fmt == "jpeg":
        w, h, _ = _jpeg_header(data)
        return w, h
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageRejected(f"{CORRUPT} (PNG header missing)")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "bmp":
        w = int.from_bytes(data[18:22], "little", signed=True)
        h = int.from_bytes(data[22:26], "little", signed=True)
        return abs(w), abs(h)
    if fmt == "webp":
        chunk = data[12:16]
        if chunk == b"VP8 " and len(data) >= 30:
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            b0, b1, b2, b3 = data[21:25]
            return 1 + (b0 | (b1 & 0x3F) << 8), 1 + ((b1 >> 6) | b2 << 2 | (b3 & 0x0F) << 10)
        if chunk == b"VP8X" and len(data) >= 30:
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        raise ImageRejected(f"{CORRUPT} (WebP header missing)")
    if fmt == "pnm":
        m = _PNM_RE.match(data[:1024])
        if not m:
            raise ImageRejected(f"{CORRUPT} (PNM header missing)")
        return int(m.group(1)), int(m.group(2))
    return None


def check_complete(fmt: str, data: bytes) -> None:
    """Reject JPEG/PNG data that stops before its end marker (a file cut off in transfer)."""
    if fmt == "jpeg":
        _, _, sos = _jpeg_header(data)
        # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed), so its
        # absence after the first scan means the file was cut off; trailing
        # bytes after EOI (some cameras append data) are tolerated.
        if data.find(b"\xff\xd9", sos) < 0:
            raise ImageRejected(f"{CORRUPT} (JPEG end-of-image marker missing; file cut off?)")
        jpeg_scan_count(data, sos)
    elif fmt == "png" and data.rfind(b"IEND", 33) < 0:
        raise ImageRejected(f"{CORRUPT} (PNG IEND chunk missing; file cut off?)")


# --------------------------------------------------------------------------- decoding


def _read_bytes(path: str, guard: PathGuard | None = None) -> tuple[bytes, os.stat_result]:
    """The whole file, opened non-blocking so a FIFO named like an image cannot hang us.

    With a ``guard`` (storage sources), where the path leads is checked before opening it, and what was
    opened is checked again before a byte is read (``edge.sources.pathguard``)."""
    if guard is not None:
        why = guard.refusal(path)
        if why is not None:
            raise ImageRejected(why)
        try:  # a device is not even opened (opening some has effects: a watchdog starts, a tape rewinds)
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0  # the open below says what is wrong
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise ImageRejected("not a regular file (device)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise ImageRejected("permission denied") from None
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageRejected(f"broken symlink (points to {os.readlink(path)})") from None
        raise ImageRejected("file disappeared before it was read") from None
    except OSError as exc:
        raise ImageRejected(f"cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        why = guard.check_fd(fd, path, st) if guard is not None else None
        if why is not None:
            raise ImageRejected(why)
        if not stat.S_ISREG(st.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else "device"
            raise ImageRejected(f"not a regular file ({kind})")
        if st.st_size == 0:
            raise ImageRejected("zero-byte file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageRejected(f"file too large ({st.st_size >> 20} MiB > {MAX_FILE_BYTES >> 20} MiB)")
        chunks: list[bytes] = []
        remaining = st.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 22))
            if not chunk:
                break  # shrank while we read it
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks), st
    except PermissionError:
        raise ImageRejected("permission denied") from None
    except OSError as exc:
        raise ImageRejected(f"read error ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def over_budget(what: str, budget: float) -> str:
    """The rejection reason of a decode that went over ``budget`` seconds (starts with OVER_BUDGET)."""
    return (f"{OVER_BUDGET} ({what} took over {budget:g} s, EDGELABEL_DECODE_BUDGET_S); not tried again "
            "until the file changes: re-encode it (smaller, baseline JPEG) or raise the budget")


def given_up(reason: str) -> bool:
    """A rejection that is not tried again on the next start (the same bytes would take as long again)."""
    return reason.startswith(OVER_BUDGET)


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                       budget: float | None = None) -> tuple[np.ndarray, str]:
    """Decode by content (the extension is not trusted) into HxWx3 uint8 BGR, or raise ImageRejected.

    ``budget``: wall-clock seconds (default DECODE_BUDGET_S); an image that may need long is decoded in a
    child process killed at the budget (CHILD_DECODE_WORK), and rejected with ``over_budget``'s reason.
    """
    budget = DECODE_BUDGET_S if budget is None else budget
    if not data:
        raise ImageRejected("zero-byte file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(_describe_non_image(data))
    size = declared_size(fmt, data)
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0:
            raise ImageRejected(f"{CORRUPT} (declared size {w}x{h})")
        if w * h > max_pixels:
            raise ImageRejected(f"declared size {w}x{h} exceeds limit ({max_pixels / 1e6:g} MP)")
    check_complete(fmt, data)
    work = None if size is None else size[0] * size[1]
    if fmt == "jpeg" and work is not None:
        work *= max(1, jpeg_scan_count(data, _jpeg_header(data)[2]))
    if work is None or work >= CHILD_DECODE_WORK:
        return _CHILD.decode(data, fmt, budget)
    return _decode_here(data, fmt)


def _decode_here(data: bytes, fmt: str) -> tuple[np.ndarray, str]:
    """cv2.imdecode with its failures as ImageRejected (the checks before it are done)."""
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        text = str(exc)
        if "MAX_IMAGE" in text:
            raise ImageRejected(f"declared size exceeds OpenCV's limit (OPENCV_IO_MAX_IMAGE_PIXELS, {fmt})") from None
        raise ImageRejected(f"{CORRUPT} ({fmt}: {text.strip().splitlines()[-1][:120]})") from None
    if image is None or image.size == 0:
        raise ImageRejected(f"{CORRUPT} ({fmt} decoder failed)")
    return ensure_bgr(image), fmt


def _child_main(conn: Any) -> None:
    """The decode child's loop: (bytes, format) in, ("ok", pixels) or ("rejected", reason) out."""
    conn.send(("ready", None))
    while True:
        try:
            data, fmt = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _decode_here(data, fmt)[0]))
        except ImageRejected as exc:
            conn.send(("rejected", exc.reason))


class _DecodeChild:
    """One child process (started on first use, kept) that decodes the costly images; killed at the budget.

    One decode at a time (a lock): at most one costly decode's memory and one core, however many sources.
    ``spawn``, not ``fork``: the daemon has threads (an inference runtime's among them) a fork would copy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child,), name="edgelabel-decode", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(60.0):  # start-up (imports) is not the file's time: waited for apart
            proc.kill()
            raise ImageRejected("decode process did not start (see the log)")
        parent.recv()
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.join(5.0)

    def decode(self, data: bytes, fmt: str, budget: float) -> tuple[np.ndarray, str]:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._kill()
                self._start()
            started = time.monotonic()
            try:
                self._conn.send((data, fmt))
                if not self._conn.poll(budget):
                    self._kill()  # the only way to stop a decode; the next costly file starts a new child
                    raise ImageRejected(over_budget(f"decoding this {fmt}", budget))
                kind, value = self._conn.recv()
            except (EOFError, OSError) as exc:  # the child died (killed for memory, a decoder crash)
                self._kill()
                raise ImageRejected(f"{CORRUPT} ({fmt}: the decoder process ended: {exc or 'killed'})") from None
        logger.debug("decoded a costly %s in a child process in %.2f s", fmt, time.monotonic() - started)
        if kind == "rejected":
            raise ImageRejected(value)
        return ensure_bgr(value), fmt


_CHILD = _DecodeChild()


def read_image_bytes(path: str, guard: PathGuard | None = None) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its stat (of the open file), or ImageRejected (FIFO, unreadable, too large, a
    symlink the ``guard`` refuses...)."""
    return _read_bytes(path, guard)


def file_content(data: bytes, st: os.stat_result) -> str:
    """A file's identity as the ledger keeps it: ``size:mtime_ns:sha256``."""
    return f"{len(data)}:{st.st_mtime_ns}:{hashlib.sha256(data).hexdigest()}"


def content_key(src: Source, path: str, path_key: str,
                seen: str | None = None) -> tuple[str, bytes | None, os.stat_result | None]:
    """The frame key of the file's current content, and its bytes when they had to be read to tell.

    The first content labeled under a name (``src.identity_of``, else ``seen``: emitted earlier in this run)
    keeps the plain key, so the record ids of files labeled before stay; a file whose size or mtime differ
    from it is hashed: other bytes get ``<key>#<sha256[:16]>`` (a new record id), the same bytes (a ``touch``,
    a copy that did not keep times) keep the plain key.  A path done before identities were kept adopts the
    file's size and mtime as they are now (``src.adopt_identity``; nothing is read).  Raises ImageRejected.
    """
    known = src.identity_of(path_key) or seen
    if known is None and not src.skip(path_key):
        return path_key, None, None  # never labeled: the plain key
    try:
        st = os.stat(path)
    except OSError:
        return path_key, None, None  # the read reports it
    if known is None:
        src.adopt_identity(path_key, f"{st.st_size}:{st.st_mtime_ns}:")
        return path_key, None, None
    if known.startswith(f"{st.st_size}:{st.st_mtime_ns}:"):
        return path_key, None, None
    data, st = read_image_bytes(path, getattr(src, "guard", None))
    sha = hashlib.sha256(data).hexdigest()
    return (path_key if sha == known.rsplit(":", 1)[-1] else f"{path_key}#{sha[:16]}"), data, st


def decode_image_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Read and decode one file; every way it can be unusable becomes ImageRejected (never another error)."""
    data, st = _read_bytes(path)
    image, fmt = decode_image_bytes(data, max_pixels)
    return DecodedImage(image=image, format=fmt, size_bytes=len(data), mtime=st.st_mtime)


def ensure_bgr(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: cameras and odd files can give grey, BGRA or 16-bit pixels, the pipeline expects BGR."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


# --------------------------------------------------------------------------- live capture base


def build_info_has(feature: str) -> bool:
    """Whether ``cv2.getBuildInformation()`` lists a Video I/O backend as YES (e.g. GStreamer, FFMPEG)."""
    info = cv2.getBuildInformation()
    return re.search(rf"^\s*{re.escape(feature)}:\s*YES", info, re.MULTILINE | re.IGNORECASE) is not None


class CaptureSource(Source):
    """A live source read through ``cv2.VideoCapture``; subclasses only say how to open it.

    Frames are keyed ``<uri>@<capture ns>`` (never a password: ``key_base``
    must be credential-free) and carry a per-source index that keeps counting
    across reconnects so it stays unique for the life of the daemon.
    """

    live = True

    def __init__(self, name: str, cfg: SourceConfig, target: str) -> None:
        super().__init__(name, cfg, target)
        self._cap: cv2.VideoCapture | None = None
        self._index = 0

    @abc.abstractmethod
    def _open_capture(self) -> cv2.VideoCapture:
        """Create the capture (raise SourceError with a fix for known problems)."""

    @abc.abstractmethod
    def display(self) -> str:
        """How to name this source in logs and errors (credentials masked)."""

    @abc.abstractmethod
    def key_base(self) -> str:
        """The stable, credential-free URI that prefixes frame keys."""

    def open_failed_hint(self) -> str:
        """Appended to the error when OpenCV opens nothing without saying why."""
        return ""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.display()})"

    def open(self) -> None:
        self.close()
        try:
            cap = self._open_capture()
        except SourceError:
            raise
        except cv2.error as exc:
            raise SourceError(f"{self.display()}: OpenCV failed to open it ({str(exc).strip()[:200]})") from None
        if not cap.isOpened():
            cap.release()
            hint = self.open_failed_hint()
            raise SourceError(f"cannot open {self.display()}" + (f" ({hint})" if hint else ""))
        self._cap = cap
        logger.debug("%s: opened", self.display())

    def read(self) -> Frame | None:
        cap = self._cap  # local: close() from another thread must not swap it under us
        if cap is None:
            raise SourceError(f"{self.display()}: not open")
        try:
            ok, image = cap.read()
        except cv2.error as exc:
            raise SourceError(f"{self.display()}: read failed ({str(exc).strip()[:200]})") from None
        if not ok or image is None or image.size == 0:
            raise SourceError(f"{self.display()}: no frame (stream lost or read timed out)")
        ns = time.time_ns()
        frame = Frame(
            source=self.name,
            index=self._index,
            image=ensure_bgr(image),
            captured_at=ns / 1e9,
            key=f"{self.key_base()}@{ns}",
            live=True,
        )
        self._index += 1
        return frame

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            try:
                cap.release()
            except cv2.error as exc:  # releasing a dead stream must not stop a reconnect
                logger.debug("%s: release failed: %s", self.display(), exc)

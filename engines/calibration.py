"""INT8 calibration for the TensorRT back end: image lists, hold-out split, batches, calibrator.

TensorRT's implicit INT8 mode needs a few hundred representative images run
through the network to pick per-tensor scales.  The same images must not be
used to judge whether the INT8 engine is good enough (the INT8 gate), so
:func:`split_calibration` holds a deterministic share of them back.  Batches
are letterboxed exactly as the detector letterboxes frames at run time
(``engines.models.preprocess.letterbox`` with the decoder's
:class:`~engines.models.base.PreprocessSpec`), because scales calibrated on
differently prepared pixels are wrong scales.

Everything except :func:`make_entropy_calibrator` is numpy/OpenCV only and is
tested without TensorRT.  TensorRT 11 removed implicit INT8 calibration (no
``IInt8EntropyCalibrator2``, no ``BuilderFlag.INT8``); there the calibrator
factory raises :class:`EngineError` telling the user to use fp16 or a
pre-quantized (QDQ) ONNX.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgelabel.engines.base import EngineError
from edgelabel.engines.models.base import PreprocessSpec
from edgelabel.engines.models.preprocess import letterbox
from edgelabel.engines.trtcache import atomic_write

log = logging.getLogger(__name__)

#: same set as ``edge.sources.IMAGE_EXTENSIONS`` (``engines`` never imports ``edge``; a test keeps them equal)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm", ".pbm"})

#: below this many calibration images TensorRT's scales are noisy; warn (do not refuse)
MIN_RECOMMENDED_IMAGES = 100


def list_images(directory: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``directory`` (by extension, sorted, dot-files skipped).

    Sorted so the calibration set, the split and the calibration hash are the
    same on every run and machine.
    """
    root = Path(directory)
    if not root.is_dir():
        raise EngineError(f"{root}: calibration image folder not found")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found)


def resolve_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (listed with :func:`list_images`) or a list of paths, as sorted Paths."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list_images(path) if path.is_dir() else [path]
    return sorted(Path(p) for p in images)


def split_calibration(paths: Sequence[str | Path], holdout: float = 0.2) -> tuple[list[Path], list[Path]]:
    """Deterministically split images into ``(calibration, held_back)``.

    The paths are sorted, and image ``i`` is held back when
    ``floor((i+1)*holdout) > floor(i*holdout)``: with ``holdout=0.2`` that is
    every 5th image (indices 4, 9, 14, ...), and in general exactly
    ``floor(n*holdout)`` images spread evenly over the set.  Evenly spread
    rather than "the last 20%" because image folders are usually in capture
    order, and the tail of a capture is not representative of the whole.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    ordered = sorted(Path(p) for p in paths)
    calib: list[Path] = []
    held: list[Path] = []
    for i, path in enumerate(ordered):
        if int((i + 1) * holdout) > int(i * holdout):
            held.append(path)
        else:
            calib.append(path)
    return calib, held


def calibration_hash(paths: Sequence[str | Path]) -> str:
    """sha256 over the sorted ``(file name, sha256 of contents)`` pairs of the calibration images.

    Contents rather than sizes and modification times: copying the folder to
    another device, or touching the files, must not force a (long) rebuild,
    while replacing an image with a different one of the same name must.
    File names without their folders so a moved folder hashes the same.  The
    cost is one read of each image, small next to the calibration itself.
    """
    entries: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise EngineError(f"{path}: calibration image cannot be read ({exc.strerror or exc})") from None
        entries.append((path.name, digest.hexdigest()))
    outer = hashlib.sha256()
    for name, digest_hex in sorted(entries):
        outer.update(name.encode("utf-8") + b"\0" + digest_hex.encode("ascii") + b"\n")
    return outer.hexdigest()


class CalibrationBatcher:
    """Letterboxed, contiguous float32 NCHW batches of calibration images.

    Unreadable images are skipped with a warning (a calibration set copied
    from a camera often has a few broken files); the last partial batch is
    dropped because TensorRT expects every batch to have the same size.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        input_size: tuple[int, int],
        spec: PreprocessSpec,
        batch_size: int = 1,
        dtype: type[np.floating] | np.dtype = np.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths = [Path(p) for p in paths]
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.spec = spec
        self.batch_size = int(batch_size)
        self.dtype = np.dtype(dtype)
        self.skipped: list[Path] = []

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of every batch: ``(batch, 3, H, W)``."""
        return (self.batch_size, 3, self.input_size[0], self.input_size[1])

    @property
    def nbytes(self) -> int:
        """Bytes of one batch (the device buffer the calibrator allocates)."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        """Upper bound of the number of full batches (unreadable images may make it fewer)."""
        return len(self.paths) // self.batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        batch = np.empty(self.shape, dtype=self.dtype)
        filled = 0
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None or image.size == 0:
                log.warning("%s: calibration image cannot be decoded; skipped", path)
                self.skipped.append(path)
                continue
            tensor, _ = letterbox(image, self.input_size, self.spec, dtype=self.dtype)
            batch[filled] = tensor[0]
            filled += 1
            if filled == self.batch_size:
                yield batch.copy()  # a fresh array: the consumer may keep it while the next one fills
                filled = 0
        if filled:
            log.debug("dropping the last %d calibration image(s): not a full batch of %d", filled, self.batch_size)


def make_entropy_calibrator(
    batcher: CalibrationBatcher,
    cache_file: str | Path,
    *,
    trt: Any = None,
    cuda: Any = None,
) -> Any:
    """An ``IInt8EntropyCalibrator2`` that feeds ``batcher`` to TensorRT and caches the scales.

    The class is defined inside this function because its base class lives
    in ``tensorrt``, which is imported only here (and only on a machine that
    has it).  ``cuda`` is the engine's CUDA helper (``engines.tensorrt``): the
    calibrator allocates one device buffer of :attr:`CalibrationBatcher.nbytes`
    and copies each batch into it; TensorRT calls :meth:`get_batch` from the
    thread that runs the build, where the engine's CUDA context is current.

    The scales are read from / written to ``cache_file``: a second build with
    the same images (for example after a TensorRT timing change) skips the
    calibration pass.  Delete the file to recalibrate.
    """
    if trt is None:
        from edgelabel.engines.tensorrt import import_tensorrt

        trt = import_tensorrt()
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise EngineError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no IInt8EntropyCalibrator2: implicit INT8 calibration was "
            "removed (TensorRT 11); use precision fp16, or a pre-quantized (QDQ) ONNX model built with precision int8"
        )
    if cuda is None:
        raise EngineError("the INT8 calibrator needs the engine's CUDA helper (cuda=...)")
    cache_path = Path(cache_file)
    if len(batcher.paths) < MIN_RECOMMENDED_IMAGES and not _cache_present(cache_path):
        log.warning(
            "INT8 calibration with %d images; %d or more representative images give more stable scales",
            len(batcher.paths),
            MIN_RECOMMENDED_IMAGES,
        )

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        """Feeds letterboxed batches to TensorRT; keeps the scale cache on disk."""

        def __init__(self) -> None:
            base.__init__(self)  # pybind11 classes need the base __init__ called explicitly
            self.batcher = batcher
            self.cache_path = cache_path
            self.batches_fed = 0
            self._batches: Iterator[np.ndarray] | None = None
            self._device = cuda.alloc(batcher.nbytes)

        def get_batch_size(self) -> int:
            return self.batcher.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._batches is None:
                self._batches = iter(self.batcher)
            try:
                batch = next(self._batches)
            except StopIteration:
                log.info("INT8 calibration: %d batch(es) fed", self.batches_fed)
                return None
            cuda.copy_htod(self._device, batch)
            self.batches_fed += 1
            if self.batches_fed % 50 == 0:
                log.info("INT8 calibration: %d/%d batches", self.batches_fed, len(self.batcher))
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            if _cache_present(self.cache_path):
                log.info("%s: using the INT8 calibration cache", self.cache_path)
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                atomic_write(self.cache_path, bytes(memoryview(cache)))
            except OSError as exc:
                log.warning("%s: cannot save the INT8 calibration cache (%s)", self.cache_path, exc)

        def free(self) -> None:
            """Release the device buffer (after the build; the engine no longer needs it)."""
            if self._device is not None:
                self._device.free()
                self._device = None

    return EntropyCalibrator()


def _cache_present(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False

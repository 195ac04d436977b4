"""The TensorRT engine cache: keys, file names, atomic writes, sidecars, engine headers.

Building a TensorRT engine takes seconds on a desktop GPU and minutes on a
Jetson, and an engine only runs on the TensorRT version and GPU it was built
for.  So engines are cached on disk under a key made of everything that
changes the result, and a cached file that no longer deserializes (a JetPack
upgrade, a different module) is rebuilt with a warning instead of failing the
start.  Everything here is plain Python (hashlib, json, os) so it is unit-tested
on machines without TensorRT or a GPU; ``engines.tensorrt`` plugs the real
TensorRT calls into :func:`load_or_build`.

What goes into the key (see :class:`CacheKey`):

* the sha256 of the ONNX file (any re-export changes it),
* the TensorRT version and the GPU name and compute capability (plans are not
  portable across either),
* the precision and the input shape the optimisation profile was built for,
* for INT8, the hash of the calibration images (``engines.calibration``),
* a format tag, bumped when this module changes how engines are built.

The builder workspace size is deliberately not in the key: it only limits
which tactics TensorRT may try, and an engine built with a smaller workspace is
still correct.

This module also reads two things without TensorRT: the header of an
Ultralytics ``.engine`` file (:func:`read_engine_file`) and the input shapes,
metadata and operator types of an ONNX file (:func:`read_onnx_summary`), which
the cache key and the detector need before (or instead of) a build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from edgelabel.engines.base import EngineError, TensorSpec

log = logging.getLogger(__name__)

#: bump when the way engines are built changes (flags, profile rules), to invalidate old caches
CACHE_FORMAT = "edgelabel-trt-1"
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
#: an Ultralytics metadata header larger than this is not a header but plan bytes
MAX_HEADER_BYTES = 1 << 20

T = TypeVar("T")


# -- hashing -------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks so large models do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that makes a built engine differ; its :meth:`digest` names the cached file."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str  # fp32 | fp16 | int8 (as requested)
    input_shape: tuple[int, ...]  # the optimisation profile's shape, e.g. (1, 3, 640, 640)
    calib_hash: str | None = None  # engines.calibration.calibration_hash of the INT8 images
    format: str = CACHE_FORMAT

    def fields(self) -> dict[str, Any]:
        """The key as plain JSON values (written to the sidecar so a human can see why a rebuild happened)."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of :meth:`fields` (stable across Python versions)."""
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _slug(text: str, limit: int = 48) -> str:
    """File-name-safe rendering of a model stem or GPU name ("NVIDIA Orin (nvgpu)" -> "NVIDIA-Orin-nvgpu")."""
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")
    return (cleaned or "model")[:limit]


def shape_text(shape: tuple[int, ...]) -> str:
    """``HxW`` of an NCHW shape, or the dims joined by ``x`` for anything else."""
    if len(shape) == 4:
        return f"{shape[2]}x{shape[3]}"
    return "x".join(str(d) for d in shape) or "scalar"


def engine_filename(model_stem: str, key: CacheKey) -> str:
    """``<model-stem>-<precision>-<HxW>-<digest[:16]>.engine``: readable, and unique per key."""
    return f"{_slug(model_stem)}-{key.precision}-{shape_text(key.input_shape)}-{key.digest()[:16]}{ENGINE_SUFFIX}"


def sidecar_path(engine_path: str | Path) -> Path:
    """The JSON written next to a cached engine (``x.engine`` -> ``x.engine.json``)."""
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def timing_cache_path(cache_dir: str | Path, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """One timing cache per GPU and TensorRT version, shared by every model built there.

    The timing cache remembers which kernel won for each layer configuration,
    so the second model built on a device (or a rebuild after a precision
    change) skips most of the autotuning.  TensorRT refuses a cache from another
    device or version, hence the name carries both.
    """
    cc = compute_capability.replace(".", "")
    return Path(cache_dir) / f"timing-{_slug(gpu_name)}-sm{cc}-trt{_slug(trt_version)}.cache"


# -- atomic files --------------------------------------------------------------


def atomic_write(path: str | Path, data: bytes | bytearray | memoryview | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and
    fsync'ed, then renamed over ``path`` with :func:`os.replace`.  A crash, a
    full disk or an exception in the writer therefore leaves either the old
    file or the new one, never a truncated engine that would fail to
    deserialize on every later start.  The temporary file is removed on failure.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600: give it the usual mode, so an engine built ahead of time by another
        # user (edgelabel build-engine as root) is readable by the service instead of being rebuilt
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def remove_stale_temps(folder: str | Path, older_than: float = 3600.0) -> int:
    """Delete temporary files that :func:`atomic_write` left behind when its process was killed.

    An engine is hundreds of MB and a Jetson's eMMC is small, so a SIGKILL during
    a cache write (watchdog, OOM killer) must not leave its half-file there for
    good.  Only files older than ``older_than`` seconds go: a younger one may
    belong to a build that is running now (``edgelabel build-engine`` beside
    the service).  Returns how many were removed.
    """
    removed = 0
    cutoff = time.time() - older_than
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return 0
    for tmp in candidates:
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("%s: removed %d unfinished temporary file(s) of an interrupted cache write", folder, removed)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_sidecar(
    engine_path: str | Path,
    key: CacheKey,
    *,
    source: str | Path,
    build_seconds: float,
    precision: str,
    io: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<engine>.json``: what went into the key, the effective precision, build time and I/O.

    ``precision`` is what the engine really runs (fp16 requested on a GPU
    without fast fp16 builds fp32); the key keeps the requested one so the same
    request finds the same file.
    """
    doc: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "key": key.fields(),
        "digest": key.digest(),
        "source": str(source),
        "precision": precision,
        "build_seconds": round(float(build_seconds), 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "io": io,
    }
    if extra:
        doc.update(extra)
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return atomic_write(sidecar_path(engine_path), text.encode("utf-8"))


def read_sidecar(engine_path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a cached engine, or None when it is missing or unreadable (it is informative only)."""
    path = sidecar_path(engine_path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: engine sidecar unreadable (%s); ignoring it", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def load_timing_cache(path: str | Path) -> bytes:
    """The serialized timing cache, or ``b""`` (TensorRT then starts an empty one)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        log.warning("%s: timing cache unreadable (%s); starting an empty one", path, exc)
        return b""


def save_timing_cache(path: str | Path, data: bytes) -> None:
    """Save the timing cache atomically; a failure only costs build time later, so it is a warning."""
    if not data:
        return
    try:
        atomic_write(path, data)
    except OSError as exc:
        log.warning("%s: cannot save the TensorRT timing cache (%s)", path, exc)


# -- build or load -------------------------------------------------------------


@dataclass
class LoadResult:
    """What :func:`load_or_build` did: the deserialized engine, and whether (and how long) it built."""

    engine: Any
    built: bool
    build_seconds: float = 0.0
    plan_bytes: int = 0
    rebuilt_stale: bool = False  # a cached file existed but would not deserialize


def load_or_build(
    engine_path: str | Path,
    deserialize: Callable[[bytes], T | None],
    build: Callable[[], bytes],
) -> LoadResult:
    """Load the cached plan at ``engine_path``, building (once) when it is missing or unusable.

    ``deserialize`` returns None when TensorRT rejects the bytes (the
    documented result of ``IRuntime.deserialize_cuda_engine`` for a plan from
    another TensorRT version or GPU); that cached file is then rebuilt with a
    warning.  A freshly built plan that still does not deserialize raises
    :class:`EngineError` - there is no retry loop.  The new plan is written
    atomically; when the cache folder is not writable the engine still runs
    from memory and the next start builds again (a warning says so).
    """
    path = Path(engine_path)
    stale = False
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("%s: cached engine unreadable (%s); rebuilding", path, exc)
            data = b""
        engine = deserialize(data) if data else None
        if engine is not None:
            log.info("%s: loaded cached TensorRT engine", path.name)
            return LoadResult(engine=engine, built=False, plan_bytes=len(data))
        stale = True
        log.warning(
            "%s: cached engine does not deserialize (built by another TensorRT version or GPU, or damaged); rebuilding it",
            path,
        )

    # a build that never finished (killed by the kernel's OOM killer, a crash, a power cut) leaves this
    # marker; building again at every service restart would loop, so refuse and let the caller fall back
    marker = path.with_name(path.name + ".building")
    if marker.exists():
        raise EngineError(
            f"{path}: a previous build of this engine did not finish (out of memory or a crash?), see {marker}; "
            f"lower model.workspace_mb or free memory, then delete {marker} to build again"
        )
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"pid {os.getpid()} started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    except OSError:
        marker = None  # read-only cache: nothing is kept either way, so nothing can loop
    started = time.perf_counter()
    try:
        plan = build()
    except BaseException:
        if marker is not None:  # a clean failure (parser error, exception) is not a crash: allow a retry
            marker.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    if marker is not None:
        marker.unlink(missing_ok=True)
    if not plan:
        raise EngineError(f"{path}: TensorRT returned an empty engine (see the TensorRT errors logged above)")
    engine = deserialize(plan)  # before caching it: a plan that does not load must not be found next time
    if engine is None:
        raise EngineError(
            f"{path}: TensorRT built an engine but cannot deserialize it on this device "
            "(see the TensorRT errors logged above; check that the TensorRT runtime and builder libraries match)"
        )
    try:
        atomic_write(path, plan)
    except OSError as exc:
        log.warning("%s: cannot write the engine cache (%s); the next start will build again", path, exc)
    log.info("%s: built TensorRT engine in %.1f s (%d bytes)", path.name, seconds, len(plan))
    return LoadResult(engine=engine, built=True, build_seconds=seconds, plan_bytes=len(plan), rebuilt_stale=stale)


# -- Ultralytics .engine files -------------------------------------------------


def parse_engine_header(data: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """Split an Ultralytics engine (4-byte LE length, JSON metadata, plan) from a raw TensorRT plan.

    Ultralytics' exporter writes ``len(meta).to_bytes(4, "little", signed=True)``,
    the JSON, then the plan.  A raw plan starts with TensorRT's own binary
    header, so the header is accepted only when all of these hold: the length
    is positive, small (< 1 MiB) and inside the file, the JSON starts with ``{``
    and parses to an object, and plan bytes follow.  Anything else is treated
    as a raw plan, unchanged.
    """
    if len(data) < 6:
        return None, data
    length = int.from_bytes(data[:4], "little", signed=True)
    if length <= 1 or length > MAX_HEADER_BYTES or 4 + length >= len(data) or data[4:5] != b"{":
        return None, data
    try:
        meta = json.loads(data[4 : 4 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, data
    if not isinstance(meta, dict):
        return None, data
    return meta, data[4 + length :]


def read_engine_file(path: str | Path) -> tuple[dict[str, Any] | None, bytes]:
    """Read a ``.engine``/``.plan`` file: ``(Ultralytics metadata or None, plan bytes)``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise EngineError(f"{p}: cannot read the engine file ({exc.strerror or exc})") from None
    if not data:
        raise EngineError(f"{p}: engine file is empty")
    return parse_engine_header(data)


def metadata_to_strings(meta: dict[str, Any]) -> dict[str, str]:
    """Ultralytics JSON metadata -> the ``str(value)`` form its ONNX exports carry.

    ``engines.models.names`` and ``detect`` parse ``names`` with
    ``ast.literal_eval`` and compare ``end2end`` with ``"True"``, as written by
    the ONNX exporter (``{k: str(v)}``).  JSON turns the integer class ids of
    ``names`` into strings, so they are turned back into ints first; the
    result is then exactly what an ONNX file of the same model would say.
    """
    out: dict[str, str] = {}
    for key, value in meta.items():
        if value is None:
            continue
        if key == "names" and isinstance(value, dict):
            value = {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): v for k, v in value.items()}
        out[str(key)] = value if isinstance(value, str) else str(value)
    return out


# -- ONNX summary without the onnx package ---------------------------------------

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# onnx.TensorProto.DataType -> numpy dtype name
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


@dataclass
class OnnxSummary:
    """What the TensorRT engine needs to know about an ONNX file before building it."""

    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    op_types: frozenset[str] = frozenset()
    producer: str = ""

    @property
    def has_qdq(self) -> bool:
        """True for explicitly quantized (QDQ) graphs, which TensorRT builds as INT8 without calibration."""
        return "QuantizeLinear" in self.op_types and "DequantizeLinear" in self.op_types


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> list[tuple[int, int, Any]]:
    """Top-level ``(field number, wire type, value)`` of one protobuf message (values not decoded further)."""
    out: list[tuple[int, int, Any]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _I64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == _I32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _value_info(buf: memoryview) -> TensorSpec:
    """ValueInfoProto -> TensorSpec (name=1, type=2 -> tensor_type=1 -> elem_type=1, shape=2 -> dim=1)."""
    name, dtype, dims = "", "float32", []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _LEN:
            name = _text(value)
        elif number == 2 and wire == _LEN:
            for tnum, twire, tval in _fields(value):
                if tnum != 1 or twire != _LEN:
                    continue  # sequence/map types: not an image tensor
                for fnum, fwire, fval in _fields(tval):
                    if fnum == 1 and fwire == _VARINT:
                        dtype = _ONNX_DTYPES.get(fval, str(fval))
                    elif fnum == 2 and fwire == _LEN:
                        for dnum, dwire, dval in _fields(fval):
                            if dnum != 1 or dwire != _LEN:
                                continue
                            size: int | None = None
                            for xnum, xwire, xval in _fields(dval):
                                if xnum == 1 and xwire == _VARINT:
                                    size = xval if xval < (1 << 63) else None
                            dims.append(size if size is not None and size > 0 else None)
    return TensorSpec(name=name, shape=tuple(dims), dtype=dtype)


def parse_onnx_summary(data: bytes) -> OnnxSummary:
    """Inputs, outputs, metadata_props and operator types of a serialized ONNX ModelProto.

    A small protobuf reader instead of the ``onnx`` package, which is not a
    dependency (it is large); only the fields below are read:
    ModelProto ``producer_name=2, graph=7, metadata_props=14``; GraphProto
    ``node=1 (op_type=4), initializer=5 (name=8), input=11, output=12``.
    Graph inputs that are also initializers (old exporters list weights as
    inputs) are dropped.  Raises ValueError for bytes that are not an ONNX model.
    """
    buf = memoryview(data)
    summary = OnnxSummary()
    graph: memoryview | None = None
    for number, wire, value in _fields(buf):
        if number == 2 and wire == _LEN:
            summary.producer = _text(value)
        elif number == 7 and wire == _LEN:
            graph = value
        elif number == 14 and wire == _LEN:
            key = val = ""
            for enum_, ewire, evalue in _fields(value):
                if enum_ == 1 and ewire == _LEN:
                    key = _text(evalue)
                elif enum_ == 2 and ewire == _LEN:
                    val = _text(evalue)
            if key:
                summary.metadata[key] = val
    if graph is None:
        raise ValueError("no graph in the file (not an ONNX model)")
    inputs: list[TensorSpec] = []
    initializers: set[str] = set()
    ops: set[str] = set()
    for number, wire, value in _fields(graph):
        if wire != _LEN:
            continue
        if number == 1:
            for nnum, nwire, nval in _fields(value):
                if nnum == 4 and nwire == _LEN:
                    ops.add(_text(nval))
        elif number == 5:
            for inum, iwire, ival in _fields(value):
                if inum == 8 and iwire == _LEN:
                    initializers.add(_text(ival))
        elif number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            summary.outputs.append(_value_info(value))
    summary.inputs = [spec for spec in inputs if spec.name not in initializers]
    summary.op_types = frozenset(ops)
    return summary


def read_onnx_summary(path: str | Path) -> OnnxSummary:
    """:func:`parse_onnx_summary` of a file, with an :class:`EngineError` naming the file on failure."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise EngineError(f"{p}: cannot read the ONNX file ({exc.strerror or exc})") from None
    try:
        summary = parse_onnx_summary(data)
    except (ValueError, IndexError) as exc:
        raise EngineError(f"{p}: is not a valid ONNX model ({exc})") from None
    if not summary.inputs:
        raise EngineError(f"{p}: ONNX graph has no inputs (expected one image input [1,3,H,W])")
    return summary

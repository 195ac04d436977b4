"""The plant's frame store: a folder (a NAS mount) or an S3-compatible bucket, content-addressed.

A frame lives at ``<device>/<source>/<sha256[:2]>/<sha256>.<ext>`` in either: the name says which bytes it
holds, so a frame already there (a restart, a second worker, the same image named by two records) is never
downloaded again, and a half-written one is never mistaken for a whole one:

* folder: written to a temporary name in the same directory, ``fsync``-ed, renamed, the directory ``fsync``-ed;
  a file at the final name is therefore whole.  ``has`` still hashes it (a NAS can lose a write).
* S3: one ``PUT`` (objects appear whole or not at all) carrying the sha256 as user metadata; ``has`` compares it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Protocol

from edgelabel.ingest.frames_config import FramesSection

log = logging.getLogger("edgelabel.ingest.frames")

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")
_EXT_RE = re.compile(r"^\.[a-z0-9]{1,5}$")
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp",
                 "webp": "image/webp", "tif": "image/tiff", "tiff": "image/tiff"}


def safe_part(name: str) -> str:
    """A device or source name as one path component: other characters become ``_``; never ``.``/``..``."""
    out = _SAFE_RE.sub("_", name)[:128]
    return out if out.strip(".") else out.replace(".", "_") or "_"


def frame_ext(frame_path: str | None) -> str:
    """The file extension the appliance stored the frame with (``jpg`` when it does not say)."""
    suffix = os.path.splitext(frame_path or "")[1].lower()
    return suffix[1:] if _EXT_RE.match(suffix) else "jpg"


def frame_location(device: str, source: str, sha256: str, ext: str) -> str:
    """Where a frame lives in the store, relative to its root: ``<device>/<source>/<sha[:2]>/<sha>.<ext>``."""
    return f"{safe_part(device)}/{safe_part(source)}/{sha256[:2]}/{sha256}.{ext}"


class FrameStore(Protocol):
    """What the fetcher and the central export need of a store."""

    describe: str

    def has(self, location: str, sha256: str) -> bool:
        """Whether the object is there with exactly these bytes."""

    def put(self, location: str, data: bytes, sha256: str) -> None:
        """Store the bytes whole at ``location`` (or raise OSError)."""

    def read(self, location: str) -> bytes:
        """The object's bytes (OSError when it cannot be read)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FolderStore:
    """Frames as files under a root folder (a NAS mount)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.describe = f"folder {self.root}"

    def path(self, location: str) -> Path:
        p = (self.root / location).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise OSError(f"{location!r} leaves the frame folder {self.root}")
        return p

    def has(self, location: str, sha256: str) -> bool:
        try:
            return _sha256_file(self.path(location)) == sha256
        except OSError:
            return False

    def put(self, location: str, data: bytes, sha256: str) -> None:
        if not self.root.is_dir():  # never create the root: an unmounted NAS would fill the local disk
            raise OSError(f"the frame folder {self.root} is not there (is the NAS mounted?); frames wait until it is")
        path = self.path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    def read(self, location: str) -> bytes:
        return self.path(location).read_bytes()


class S3Store:
    """Frames as objects in an S3-compatible bucket, through the maintained ``minio`` client."""

    def __init__(self, cfg: FramesSection) -> None:
        try:
            from minio import Minio
        except ImportError as exc:  # pragma: no cover - the ingest extra brings it
            raise RuntimeError(f"frames.store: s3 needs the minio client ({exc}): pip install 'edgelabel[ingest]'") \
                from None
        s3 = cfg.s3
        self.client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure,
                            region=s3.region)
        self.bucket = s3.bucket
        self.prefix = s3.prefix.strip("/") + "/" if s3.prefix.strip("/") else ""
        self.describe = f"s3 {'https' if s3.secure else 'http'}://{s3.endpoint}/{s3.bucket}/{self.prefix}"

    def ensure_bucket(self) -> None:
        """Make the bucket when it is not there (raises OSError with the server's reason)."""
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except Exception as exc:  # noqa: BLE001 - S3Error, or urllib3's connection errors: the server's reason
            raise OSError(f"{self.describe}: {exc}") from None

    def key(self, location: str) -> str:
        return self.prefix + location

    def has(self, location: str, sha256: str) -> bool:
        try:
            stat = self.client.stat_object(self.bucket, self.key(location))
        except Exception:  # noqa: BLE001 - not there (S3Error) or not reachable: fetch, and put says why
            return False
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        return meta.get("x-amz-meta-sha256") == sha256

    def put(self, location: str, data: bytes, sha256: str) -> None:
        ext = location.rsplit(".", 1)[-1]
        try:
            self.client.put_object(self.bucket, self.key(location), io.BytesIO(data), len(data),
                                   content_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
                                   metadata={"sha256": sha256})
        except Exception as exc:  # noqa: BLE001 - S3Error, or urllib3's connection errors
            raise OSError(f"{self.describe}: {exc}") from None

    def read(self, location: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, self.key(location))
        except Exception as exc:  # noqa: BLE001 - S3Error, or urllib3's connection errors
            raise OSError(f"{self.describe}{location}: {exc}") from None
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()


def open_store(cfg: FramesSection) -> FolderStore | S3Store:
    """The store ``frames.store`` names."""
    if cfg.store == "s3":
        store = S3Store(cfg)
        store.ensure_bucket()
        return store
    folder = FolderStore(cfg.folder or ".")
    if not folder.root.is_dir():
        raise OSError(f"frames.folder: {folder.root} is not a folder (mount the NAS there, or create it)")
    return folder

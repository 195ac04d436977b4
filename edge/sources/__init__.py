"""Sources, chosen by URI scheme: file, v4l2, rtsp, csi, gst.

``parse_uri`` is shared by config validation and ``create_source``; each
scheme's reader lives in its own module and is imported only when used.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgelabel.edge.config import SOURCE_SCHEMES, SourceConfig
from edgelabel.edge.redact import redact
from edgelabel.edge.sources.base import Source, SourceError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".ts", ".mpg", ".mpeg", ".wmv", ".flv", ".h264", ".h265"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm", ".pbm"})


def parse_uri(uri: str) -> tuple[str, str]:
    """Split a source URI into (scheme, target) or raise ValueError saying what is allowed.

    ``file:///data/in/`` and a plain path -> ("file", path); an integer or
    ``v4l2:///dev/video0`` -> ("v4l2", device); ``rtsp://...`` and
    ``rtsps://...`` -> ("rtsp", url); ``csi://0`` -> ("csi", sensor id);
    ``gst://<pipeline>`` -> ("gst", pipeline).
    """
    text = str(uri).strip()
    if not text:
        raise ValueError("empty URI")
    if text.isdigit():
        return "v4l2", text
    if "://" not in text:
        return "file", text
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        path = unquote(urlparse(text).path)
        if not path:
            raise ValueError(f"{text!r} has no path (write file:///absolute/path)")
        return "file", path
    if scheme == "v4l2":
        target = rest if rest else ""
        if not target:
            raise ValueError(f"{text!r} names no device (write v4l2:///dev/video0 or a camera index)")
        return "v4l2", target
    if scheme in ("rtsp", "rtsps"):
        from edgelabel.edge.sources.rtsp import host_port

        if not host_port(text)[0]:
            raise ValueError(f"{redact(text)!r} has no host (write rtsp://[user:pass@]host[:port]/path)")
        return "rtsp", text
    if scheme == "csi":
        sensor = rest.strip("/") or "0"
        if not sensor.isdigit():
            raise ValueError(f"{text!r}: the CSI sensor id must be a number (csi://0)")
        return "csi", sensor
    if scheme == "gst":
        if "appsink" not in rest:
            raise ValueError(f"{redact(text)!r}: a GStreamer pipeline must end in an appsink (... ! video/x-raw,format=BGR ! appsink)")
        return "gst", rest
    raise ValueError(f"unsupported scheme {redact(scheme)!r} (use {', '.join(SOURCE_SCHEMES)})")


# kind -> "module:Class"
SOURCE_TYPES: dict[str, str] = {
    "folder": "edgelabel.edge.sources.folder:FolderSource",
    "image": "edgelabel.edge.sources.image:ImageSource",
    "video": "edgelabel.edge.sources.video:VideoSource",
    "v4l2": "edgelabel.edge.sources.v4l2:V4l2Source",
    "rtsp": "edgelabel.edge.sources.rtsp:RtspSource",
    "csi": "edgelabel.edge.sources.gstreamer:CsiSource",
    "gst": "edgelabel.edge.sources.gstreamer:GstSource",
}


def source_kind(uri: str) -> tuple[str, str]:
    """(kind, target): a ``file`` URI becomes folder, image or video by what is on disk."""
    scheme, target = parse_uri(uri)
    if scheme != "file":
        return scheme, target
    path = Path(target)
    if path.is_dir() or target.endswith("/"):
        return "folder", target
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video", target
    return "image", target


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _gst_name(pipeline: str) -> str:
    """``videotestsrc`` for ``videotestsrc ! ...``; ``rtspsrc-cam1`` for ``rtspsrc location=rtsp://u:p@cam1/s ! ...``.

    The first element says what the pipeline reads; the host (never the user info) or the file name of its
    ``location``/``uri``/``device`` property says from where.
    """
    head = pipeline.split("!", 1)[0]
    try:
        first = shlex.split(head)  # location="/data/a b.mp4"
    except ValueError:
        first = head.split()
    if not first:
        return ""
    element, where = first[0], ""
    for prop in first[1:]:
        key, _, value = prop.partition("=")
        if key not in ("location", "uri", "device") or not value:
            continue
        if "://" in value:
            where = urlparse(value).hostname or ""
        else:
            where = Path(value).stem or Path(value).name
        break
    return f"{element}-{where}" if where else element


def suggest_name(uri: str) -> str:
    """A readable source name for a URI given without one (``cars`` for ``/videos/cars.mp4``); never a credential.

    Files: the file or folder name; streams: the URL's last path part; GStreamer: see ``_gst_name``.
    Only letters, digits, ``_``, ``-`` and ``.`` remain (the config's rule for source names); "" when nothing does.
    """
    text = redact(uri.strip(), replacement=None).rstrip("/")  # no user info, credential parameters masked
    try:
        scheme, target = parse_uri(text)
    except ValueError:
        scheme, target = "", text
    if scheme == "gst":
        stem = _gst_name(target)
    elif "://" in text:
        stem = Path(urlparse(text).path).stem or (urlparse(text).hostname or "")
    else:
        stem = Path(text).stem or text
    return _NAME_UNSAFE.sub("_", stem).strip("_.")[:56]


def create_source(cfg: SourceConfig) -> Source:
    """Build the source for ``cfg.uri`` (does not open it)."""
    kind, target = source_kind(cfg.uri)
    module_name, class_name = SOURCE_TYPES[kind].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cfg.name, cfg, target)


__all__ = ["Source", "SourceError", "create_source", "parse_uri", "source_kind", "suggest_name"]

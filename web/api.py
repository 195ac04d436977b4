"""The JSON API under /api (documented in web/openapi.yaml, served at /api/openapi.yaml).

Why these rules:

* Frames are served by record id only: the id must be a canonical UUID and is
  looked up in the web sink's ring of recent records; the pixels come from the
  ring's own JPEG copy or from the ``frame_path`` that the pipeline put in that
  record.  Nothing in a request ever becomes a path.
* Live views (MJPEG) read the one JPEG the web sink encodes per source at most
  ``web.stream_fps`` times a second; each open view holds a server thread, so
  their number is capped below ``web.threads`` and the API always has threads
  left.
* Everything returned passes through the redactor (see ``web.redact``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from flask import Blueprint, Response, abort, jsonify, request, send_file

from edgelabel.edge.annotate import draw_detections, encode_jpeg
from edgelabel.edge.frame import text_path
from edgelabel.edge.sources.pathguard import PathGuard, protected_paths, read_checked
from edgelabel.web.auth import auth_method, require_operator
from edgelabel.web.context import WebContext, build_status, get_ctx, source_entry
from edgelabel.web.params import choice_arg, int_arg, str_arg
from edgelabel.web.sink import KeptRecord, scale_detections

log = logging.getLogger("edgelabel.web")

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
#: a live view that sees no new frame re-sends the last one this often (lets the server notice a closed tab)
STREAM_KEEPALIVE = 5.0
BOUNDARY = "frame"
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
#: how long a frame request waits for the web sink to finish the copy of a brand-new record's frame
FRAME_WAIT = 2.0
#: ``?raw=`` values that ask for the frame without boxes (the OpenAPI enum)
RAW_VALUES = ("1", "true", "yes")


# --------------------------------------------------------------------------- helpers


def _source_or_404(ctx: WebContext, name: str) -> dict[str, Any]:
    sources = ctx.pipeline.status().get("sources") or {}
    if name not in sources:
        abort(404, description=f"no source named {name!r}")
    return ctx.redactor.data(source_entry(ctx, name, sources[name]))  # type: ignore[no-any-return]


def record_json(ctx: WebContext, kept: KeptRecord) -> dict[str, Any]:
    """A kept record as the API returns it: the label record plus where its frame is."""
    d = kept.record.to_dict()
    d["received_at"] = kept.received_at
    d["frame_url"] = f"/api/frames/{kept.record.id}.jpg"
    d["frame_available"] = kept.jpeg is not None or kept.pending or bool(kept.record.frame_path)
    return ctx.redactor.data(d)  # type: ignore[no-any-return]


def parse_record_id(raw: str) -> str:
    """The canonical form of a record id; 400 for anything that is not a UUID."""
    try:
        value = uuid.UUID(raw)
    except ValueError:
        abort(400, description="not a record id (a UUID is expected)")
    if str(value) != raw.lower():
        abort(400, description="not a record id (a UUID is expected)")
    return str(value)


@functools.lru_cache(maxsize=4)
def _original_guard(protected: tuple[str, ...]) -> PathGuard:
    return PathGuard("/", follow_symlinks=True, protected=protected)


def _stored_frame(ctx: WebContext, frame_path: str, sha256: str | None = None) -> np.ndarray | None:
    """The pixels behind a record's ``frame_path`` (set by the pipeline, never from a request).

    An absolute path is the original input file (a folder job): read without following a symlink into the
    daemon's own files, and only while its bytes are the labeled ones (``sha256``), as the review page does."""
    p = Path(frame_path)
    if not p.is_absolute():
        root = ctx.cfg.resolve(ctx.cfg.dataset.path).resolve()
        p = (root / p).resolve()
        if not p.is_relative_to(root):
            log.warning("web: record frame path %s leaves the dataset folder; not served", frame_path)
            return None
        if not p.is_file():
            return None
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        return image if image is not None and image.size else None
    try:
        data = read_checked(p, _original_guard(protected_paths(ctx.cfg)))
    except PermissionError as exc:
        log.warning("web: the original %s %s; not served", text_path(str(p)), exc)
        return None
    except OSError:
        return None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        log.warning("web: %s changed since it was labeled; not served", text_path(str(p)))
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return image if image is not None and image.size else None


def frame_jpeg(ctx: WebContext, kept: KeptRecord, boxes: bool) -> bytes | None:
    """The record's frame as JPEG, with its boxes drawn unless ``boxes`` is false."""
    rec = kept.record
    if kept.jpeg is not None:
        if not boxes:
            return kept.jpeg
        image = cv2.imdecode(np.frombuffer(kept.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            return None
        return encode_jpeg(draw_detections(image, scale_detections(rec.detections, kept.scale), copy=False), 85)
    if rec.frame_path:
        image = _stored_frame(ctx, rec.frame_path, rec.frame_sha256)
        if image is None:
            return None
        scale = image.shape[1] / rec.width if rec.width else 1.0
        if boxes:
            image = draw_detections(image, scale_detections(rec.detections, scale), copy=False)
        return encode_jpeg(image, 90)
    return None


def _jpeg_response(data: bytes) -> Response:
    resp = Response(data, mimetype="image/jpeg")
    resp.headers["Content-Length"] = str(len(data))
    return resp


# --------------------------------------------------------------------------- status


@bp.get("/status")
def status() -> Any:
    """The whole daemon: engine, MQTT, sources, device, log counts."""
    ctx = get_ctx()
    data = build_status(ctx)
    data["web"]["authenticated"] = auth_method() is not None
    return jsonify(data)


@bp.get("/sources")
def sources() -> Any:
    """Every source with its stats."""
    ctx = get_ctx()
    data = build_status(ctx, include_device=False)
    return jsonify(sources=list(data["sources"].values()))


@bp.get("/sources/<name>")
def source(name: str) -> Any:
    """One source."""
    return jsonify(_source_or_404(get_ctx(), name))


def _set_paused(name: str, paused: bool) -> Any:
    ctx = get_ctx()
    _source_or_404(ctx, name)
    try:
        ctx.pipeline.set_source_paused(name, paused)
    except KeyError:
        abort(404, description=f"no source named {name!r}")
    log.info("web: source %s %s by the operator (%s, %s)", name, "paused" if paused else "resumed", auth_method(),
             request.remote_addr)
    return jsonify(_source_or_404(ctx, name))


@bp.post("/sources/<name>/pause")
@require_operator
def pause(name: str) -> Any:
    """Pause a source (operator token)."""
    return _set_paused(name, True)


@bp.post("/sources/<name>/resume")
@require_operator
def resume(name: str) -> Any:
    """Resume a source (operator token)."""
    return _set_paused(name, False)


@bp.get("/sources/<name>/snapshot.jpg")
def snapshot(name: str) -> Any:
    """The newest annotated frame of a source (the dashboard's thumbnail)."""
    ctx = get_ctx()
    _source_or_404(ctx, name)
    _, jpeg = ctx.sink.latest_jpeg(name)
    if jpeg is None:
        abort(404, description=f"no frame from {name!r} yet")
    return _jpeg_response(jpeg)


class _Stream:
    """The MJPEG body: frees its viewer slot when the server closes it, even if it never started."""

    def __init__(self, ctx: WebContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self._gen = self._frames()
        self._released = False

    def _frames(self) -> Iterator[bytes]:
        ctx, seq, last_sent = self.ctx, 0, 0.0
        interval = 1.0 / ctx.cfg.web.stream_fps
        while not ctx.closing.is_set():
            new_seq, jpeg = ctx.sink.wait_jpeg(self.name, seq, STREAM_KEEPALIVE, cancel=ctx.closing)
            if ctx.closing.is_set():
                return
            now = time.monotonic()
            if jpeg is None or (new_seq == seq and now - last_sent < STREAM_KEEPALIVE):
                continue
            wait = last_sent + interval - now
            if wait > 0 and ctx.closing.wait(wait):
                return
            seq, last_sent = new_seq, time.monotonic()
            yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode() \
                + jpeg + b"\r\n"

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def close(self) -> None:
        """Called by the WSGI server when the viewer leaves or the server stops."""
        self._gen.close()
        if not self._released:
            self._released = True
            self.ctx.release_stream()


@bp.get("/sources/<name>/stream.mjpg")
def stream(name: str) -> Any:
    """The live view: annotated frames as MJPEG, at most ``web.stream_fps``."""
    ctx = get_ctx()
    _source_or_404(ctx, name)
    if not ctx.try_stream():
        abort(503, description=f"too many live views open ({ctx.max_streams}); close one and retry")
    resp = Response(_Stream(ctx, name), mimetype=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                    direct_passthrough=True)
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


# --------------------------------------------------------------------------- labels and frames


def _present_cursor() -> str | None:
    """The ``cursor`` parameter as a record id; absent: None (from the newest); empty or malformed: 400."""
    raw = str_arg("cursor")
    if raw is None and "cursor" in request.args:
        abort(400, description="cursor: empty; leave it out to start from the newest, or pass a next_cursor")
    return None if raw is None else parse_record_id(raw)


def recent_page(ctx: WebContext) -> tuple[list[KeptRecord], int, int, int, str | None]:
    """(page, total, limit, offset, cursor) for the labels API and page: filters, limit/offset or a cursor.

    Records arrive all the time, so an offset shifts between two requests; ``cursor`` (the id of the last
    record of the previous page) does not.
    """
    limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_arg("offset", 0, 0, 10**9)
    cursor = _present_cursor()
    try:
        items = ctx.sink.recent(str_arg("source"), str_arg("class"), before=cursor)
    except KeyError:
        abort(410, description="the cursor's record is no longer kept; start again from the newest")
    return items[offset:offset + limit], len(items), limit, offset, cursor


@bp.get("/labels")
def labels() -> Any:
    """Recent records, newest first, filtered by source and class, paged by limit and offset or cursor."""
    ctx = get_ctx()
    page, total, limit, offset, _ = recent_page(ctx)
    more = offset + limit < total
    return jsonify(total=total, limit=limit, offset=offset, next_offset=offset + limit if more else None,
                   next_cursor=page[-1].record.id if more and page else None,
                   items=[record_json(ctx, k) for k in page])


@bp.get("/labels/<record_id>")
def label(record_id: str) -> Any:
    """One recent record by id."""
    ctx = get_ctx()
    kept = ctx.sink.get(parse_record_id(record_id))
    if kept is None:
        abort(404, description="no such record among the recent ones")
    return jsonify(record_json(ctx, kept))


@bp.get("/frames/<record_id>.jpg")
def frame(record_id: str) -> Any:
    """A record's frame with its boxes (``?raw=1``: without)."""
    ctx = get_ctx()
    kept = ctx.sink.get(parse_record_id(record_id), wait=FRAME_WAIT)
    if kept is None:
        abort(404, description="no such record among the recent ones")
    data = frame_jpeg(ctx, kept, boxes=choice_arg("raw", RAW_VALUES) is None)
    if data is None:
        abort(404, description="the frame of this record was not kept")
    return _jpeg_response(data)


@bp.get("/classes")
def classes() -> Any:
    """Class names seen so far, most frequent first (for filters)."""
    return jsonify(classes=get_ctx().sink.classes())


@bp.get("/logs")
def logs() -> Any:
    """Recent warnings and errors (``since``: only entries after that sequence number)."""
    ctx = get_ctx()
    since = int_arg("since", 0, 0, 2**62)
    limit = int_arg("limit", 100, 1, 1000)
    return jsonify(entries=ctx.logs.entries(since, limit), **ctx.logs.summary())


@bp.get("/openapi.yaml")
def openapi() -> Any:
    """This API's OpenAPI document."""
    return send_file(OPENAPI_PATH, mimetype="application/yaml", max_age=0)

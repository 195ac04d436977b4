"""The review page and its API: the needs_review queue, one frame's boxes, decisions, dataset exports.

Why these rules:

* Everything here needs the operator token, reads included, whatever ``web.public_read`` says:
  the page shows dataset frames (not just the live view) and every action changes the dataset.
* The page works on the daemon's own dataset index (the dataset sink's ``DatasetIndex``, found in
  ``pipeline.sinks``), so a decision and the sink thread's writes share one lock and cannot
  interleave.  Without a running dataset sink (a tool, a test) the index is opened here.
* A decision is saved at once (one transaction, then the frame's YOLO file and the COCO file are
  rewritten atomically: :mod:`edge.review`) and handed to the MQTT sink's ``publish_review``
  (``<prefix>/<device>/review``, through the outbox).  Requests may name the ``version`` they show;
  a stale one gets 409 and the current frame, so two reviewers cannot silently undo each other.
* Frames are found by record id only (a canonical UUID); the image file comes from the index (the
  pipeline wrote it), never from the request.
* An export is built as a zip in ``<state_dir>/exports`` and deleted once sent.
* ``/api/dataset/frames/<id>`` is how the plant's ingest fetches a frame: the bytes exactly as stored, with
  their sha256 (``ETag``, ``X-Content-SHA256``) so the fetcher can verify them against the label record.  A
  ``viewer`` token (one per appliance) may read it.  Bytes that do not match the hash the dataset kept are
  refused (404), never served.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request, send_file

from edgelabel.edge.export import DEFAULT_STATES, EXPORT_FORMATS, ExportError, export_dataset, parse_states
from edgelabel.edge.review import STATES, ReviewError, ReviewStore, VersionConflict, check_request, clean_reviewer
from edgelabel.edge.sources.pathguard import protected_paths
from edgelabel.web.api import parse_record_id
from edgelabel.web.auth import auth_method, current_operator, require_operator
from edgelabel.web.context import get_ctx
from edgelabel.web.params import choice_arg, float_arg, int_arg, json_object, str_arg

log = logging.getLogger("edgelabel.web")

bp = Blueprint("review", __name__)

QUEUE_LIMIT = 200
MAX_OFFSET = 10**9
_MIMETYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
              ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
_store_lock = threading.Lock()


def get_store() -> ReviewStore:
    """This app's review store over the daemon's dataset index (404 without a dataset, 503 while it cannot open)."""
    ext = current_app.extensions
    store: ReviewStore | None = ext.get("edgelabel_review")
    if store is not None:
        return store
    ctx = get_ctx()
    if not ctx.cfg.dataset.enabled:  # not an outage: this appliance keeps no dataset
        abort(404, description="the dataset is disabled (dataset.enabled: false): nothing to review")
    with _store_lock:
        store = ext.get("edgelabel_review")
        if store is None:
            sinks = list(getattr(ctx.pipeline, "sinks", None) or [])
            dataset = next((s for s in sinks if getattr(s, "name", "") == "dataset" and hasattr(s, "index")), None)
            mqtt = next((s for s in sinks if callable(getattr(s, "publish_review", None))), None)
            publish = mqtt.publish_review if mqtt is not None else None
            if dataset is not None:
                if not dataset.index.is_open:
                    abort(503, description="the dataset is not open yet (see the daemon log)")
                store = ReviewStore(dataset.index, publish=publish)
            else:
                try:
                    store = ReviewStore.open(ctx.cfg.resolve(ctx.cfg.dataset.path), formats=ctx.cfg.dataset.formats,
                                             publish=publish)
                except (OSError, sqlite3.Error) as exc:
                    log.error("web: cannot open the dataset for review: %s", exc)
                    abort(503, description=f"the dataset cannot be opened: {exc}")
            store.index.protected = protected_paths(ctx.cfg)  # an original never read from the daemon's files
            ext["edgelabel_review"] = store
    return store


def _item_json(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    out["image_url"] = f"/api/review/items/{item['id']}/image?v={item['version']}"
    return get_ctx().redactor.data(out)  # type: ignore[no-any-return]


def _limit_offset() -> tuple[int, int]:
    return int_arg("limit", 50, 1, QUEUE_LIMIT), int_arg("offset", 0, 0, MAX_OFFSET)


# --------------------------------------------------------------------------- the page


@bp.get("/review")
@require_operator
def page() -> Any:
    """The review page: queue, the frame with its boxes, decisions, export."""
    ctx = get_ctx()
    if not ctx.cfg.dataset.enabled:
        return render_template("review.html", enabled=False, names=[], counts={}, formats=EXPORT_FORMATS,
                               states=STATES, default_states=DEFAULT_STATES)
    store = get_store()
    return render_template("review.html", enabled=True, names=store.names, counts=store.counts(),
                           formats=EXPORT_FORMATS, states=STATES, default_states=DEFAULT_STATES)


# --------------------------------------------------------------------------- the API


@bp.get("/api/review/queue")
@require_operator
def queue() -> Any:
    """Frames in a review state (default needs_review), most uncertain first, with the counts per state."""
    store = get_store()
    limit, offset = _limit_offset()
    try:
        page = store.queue(state=choice_arg("state", STATES, "needs_review"), source=str_arg("source"),
                           limit=limit, offset=offset)
    except ReviewError as exc:
        abort(400, description=str(exc))
    return jsonify(**page, counts=store.counts(), classes=store.names)


@bp.get("/api/review/items/<record_id>")
@require_operator
def item(record_id: str) -> Any:
    """One frame: its boxes now, the detector's boxes, state, version, who and when, history."""
    store = get_store()
    try:
        return jsonify(_item_json(store.item(parse_record_id(record_id))))
    except KeyError:
        abort(404, description="no such frame in the dataset")


@bp.get("/api/review/items/<record_id>/image")
@require_operator
def image(record_id: str) -> Any:
    """The frame's pixels as labeled (a copy in the dataset, or the original file it references while its bytes
    are still the labeled ones: a file replaced since, or swapped for a symlink, is not served)."""
    store = get_store()
    try:
        found = store.image_bytes(parse_record_id(record_id))
    except KeyError:
        abort(404, description="no such frame in the dataset")
    except (OSError, sqlite3.Error) as exc:
        abort(503, description=f"the dataset could not be read ({exc}); try again when it can")
    if found is None:
        abort(404, description="the image of this frame is no longer there, or changed since it was labeled")
    data, suffix = found
    # the whole file, always: no ranges or conditional answers for a small, never-cached image
    resp = Response(data, mimetype=_MIMETYPES.get(suffix, "application/octet-stream"))
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/api/dataset/frames/<record_id>")
@require_operator
def dataset_frame(record_id: str) -> Any:
    """A record's frame bytes exactly as the dataset stored them, for the plant's ingest to fetch and verify.

    The same read as the review image (an original that changed since labeling is refused there); in addition
    a stored copy whose bytes no longer hash to the recorded sha256 is refused, so what is served always is
    what the label record names.  ``ETag`` is the sha256; ``If-None-Match`` and ``Range`` are answered.
    """
    store = get_store()
    rid = parse_record_id(record_id)
    try:
        found = store.image_bytes(rid)
        row = store.index.row(rid)
    except KeyError:
        abort(404, description="no such frame in the dataset (never stored, or rotated out)")
    except (OSError, sqlite3.Error) as exc:
        abort(503, description=f"the dataset could not be read ({exc}); try again when it can")
    if found is None or row is None:
        abort(404, description="the image of this frame is no longer there, or changed since it was labeled")
    data, suffix = found
    digest = hashlib.sha256(data).hexdigest()
    expected = row["image_sha256"] if "image_sha256" in row.keys() else None
    if expected and digest != expected:
        log.warning("web: the stored image of record %s no longer matches its sha256 (%s, now %s); not served",
                    rid, expected[:12], digest[:12])
        abort(404, description="the stored image no longer matches the sha256 recorded when it was labeled; "
                               "it is not served")
    resp = Response(data, mimetype=_MIMETYPES.get(suffix, "application/octet-stream"))
    resp.set_etag(digest)
    resp.headers["X-Content-SHA256"] = digest
    resp.headers["Cache-Control"] = "private, max-age=86400, immutable"  # content-addressed: never changes
    return resp.make_conditional(request, accept_ranges=True, complete_length=len(data))


@bp.post("/api/review/items/<record_id>")
@require_operator
def decide(record_id: str) -> Any:
    """A decision: ``{"action": accept|update|reject|reopen, "detections"?: [...], "version"?: n, "by"?: name}``."""
    rid = parse_record_id(record_id)
    # the body is read and checked (size, JSON depth and numbers, action, version, box count and shape) before
    # the dataset is touched: a bad request never waits for, or holds, the dataset lock
    body = json_object()
    action = body.get("action")
    detections = body.get("detections")
    try:
        check_request(action, detections)
    except ReviewError as exc:
        abort(400, description=str(exc))
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        abort(400, description="version must be an integer")
    store = get_store()
    method = auth_method()
    operator = current_operator()
    # the authenticated operator's name, never a typed one (a "by" in the body is ignored)
    by = clean_reviewer(operator.name if operator is not None else None)
    try:
        result = store.decide(rid, action, by=by, detections=detections, version=version,
                              context={"via": method, "address": request.remote_addr})
    except KeyError:
        abort(404, description="no such frame in the dataset")
    except ReviewError as exc:
        abort(400, description=str(exc))
    except VersionConflict as exc:
        resp = jsonify(error=str(exc), item=_item_json(store.item(rid)))
        resp.status_code = 409
        return resp
    except (OSError, sqlite3.Error) as exc:
        log.error("web: review decision about %s could not be written: %s", rid, exc)
        abort(503, description=f"the dataset could not be written ({exc}); the decision is completed when it can be")
    return jsonify(item=_item_json(result["item"]), published=result["published"], next_id=store.next_id(rid),
                   counts=store.counts())


@bp.get("/api/review/export")
@require_operator
def export() -> Any:
    """The dataset as a zip: ``format`` (yolo, coco, voc, cvat, labelstudio), ``state`` (repeat or comma list)."""
    ctx = get_ctx()
    store = get_store()
    fmt = choice_arg("format", EXPORT_FORMATS)
    raw_states = [part.strip() for v in request.args.getlist("state") for part in v.split(",")]
    try:
        if "" in raw_states:
            raise ExportError("an empty review state (use state=accepted&state=corrected, or a comma list)")
        states = parse_states(raw_states or None)
    except ExportError as exc:
        abort(400, description=str(exc))
    if fmt is None:
        abort(400, description=f"format: missing; give one of {', '.join(EXPORT_FORMATS)}")
    val = float_arg("val", 0.0, 0.0, 1.0, hi_inclusive=False)
    folder = ctx.cfg.state_path("exports")
    folder.mkdir(parents=True, exist_ok=True)
    _sweep(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"edgelabel-{ctx.cfg.device_id}-{fmt}-{stamp}"
    tmpdir = Path(tempfile.mkdtemp(prefix="export-", dir=folder))
    out = tmpdir / f"{name}.zip"
    try:
        result = export_dataset(store.index, fmt, out, states=states, val_fraction=val)
        # the open handle keeps the data until the response is sent; nothing is left behind, even if the
        # client goes away (send_file passes the file straight to the server, so on-close hooks never run)
        fh = open(out, "rb")  # noqa: SIM115 - closed by the response
    except ExportError as exc:
        abort(400, description=str(exc))
    except (OSError, sqlite3.Error) as exc:
        log.error("web: export failed: %s", exc)
        abort(503, description=f"the export failed: {exc}")
    finally:
        _remove(tmpdir)
    log.info("web: export %s (%s): %d image(s) by %s from %s", fmt, ",".join(states), result.images, auth_method(),
             request.remote_addr)
    resp = send_file(fh, mimetype="application/zip", as_attachment=True, download_name=out.name, max_age=0)
    resp.headers["X-Edgelabel-Images"] = str(result.images)
    resp.headers["X-Edgelabel-Annotations"] = str(result.annotations)
    return resp


def _remove(folder: Path) -> None:
    """Delete an export's temporary folder (an open file in it stays readable until closed)."""
    for p in folder.glob("*"):
        p.unlink(missing_ok=True)
    for p in folder.glob(".*"):
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def _sweep(folder: Path, max_age: float = 3600.0) -> None:
    """Remove what an export interrupted by a crash left behind."""
    now = time.time()
    for d in folder.glob("export-*"):
        try:
            if now - d.stat().st_mtime > max_age:
                _remove(d)
        except OSError:
            continue

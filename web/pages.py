"""The operator's pages: dashboard, live view, labels, logs.

Why pages are plain templates plus small scripts of our own: everything is
served by the appliance (no CDN, it works offline), and the scripts only poll
the same JSON the API offers, so the pages and the API cannot disagree.  The
dashboard embeds its first snapshot as a JSON data block (not a script, so the
Content-Security-Policy needs no exception) and draws it at once.  Labels and
logs are rendered on the server.  Pause/resume buttons are real forms with a
CSRF field, so they work without script too; the scripts submit them in the
background through the API.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for

from edgelabel.web.api import parse_record_id, recent_page, record_json
from edgelabel.web.auth import require_operator
from edgelabel.web.context import build_status, get_ctx
from edgelabel.web.params import str_arg

bp = Blueprint("pages", __name__)


@bp.app_template_filter("detection_counts")
def detection_counts(detections: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """``[(label, n), ...]`` of a record's detections, most frequent first (the labels table's chips)."""
    counts: dict[str, int] = {}
    for d in detections:
        counts[d["label"]] = counts.get(d["label"], 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


@bp.get("/")
def dashboard() -> Any:
    """Device, engine, MQTT, one card per source, recent warnings."""
    ctx = get_ctx()
    status = build_status(ctx)
    return render_template("dashboard.html", status=status, logs=list(reversed(ctx.logs.entries(0, 8))))


@bp.get("/sources/<name>")
def source(name: str) -> Any:
    """One source's live view and numbers."""
    ctx = get_ctx()
    status = build_status(ctx, include_device=False)
    src = status["sources"].get(name)
    if src is None:
        abort(404, description=f"There is no source named {name!r}.")
    return render_template("source.html", name=name, src=src, status=status)


def _set_paused(name: str, paused: bool) -> Any:
    ctx = get_ctx()
    try:
        ctx.pipeline.set_source_paused(name, paused)
    except KeyError:
        abort(404, description=f"There is no source named {name!r}.")
    back = request.form.get("back")
    return redirect(url_for("pages.source", name=name) if back == "source" else url_for("pages.dashboard"))


@bp.post("/sources/<name>/pause")
@require_operator
def pause(name: str) -> Any:
    """The pause form (without script)."""
    return _set_paused(name, True)


@bp.post("/sources/<name>/resume")
@require_operator
def resume(name: str) -> Any:
    """The resume form (without script)."""
    return _set_paused(name, False)


@bp.get("/labels")
def labels() -> Any:
    """Recent records with filters by source and class, newest first; "older" pages by cursor (stable)."""
    ctx = get_ctx()
    src = str_arg("source") or ""
    cls = str_arg("class") or ""
    page, total, limit, offset, cursor = recent_page(ctx)

    def page_url(**extra: Any) -> str:
        query = {"source": src or None, "class": cls or None, "limit": limit, **extra}
        return url_for("pages.labels", **{k: v for k, v in query.items() if v is not None})

    return render_template(
        "labels.html", items=[record_json(ctx, k) for k in page], total=total, limit=limit, offset=offset,
        source=src, cls=cls, sources=sorted(ctx.pipeline.cfg.sources), classes=ctx.sink.classes(),
        capacity=ctx.sink.capacity,
        newest_url=page_url() if cursor or offset else None,
        older_url=page_url(cursor=page[-1].record.id) if page and offset + limit < total else None,
    )


@bp.get("/labels/<record_id>")
def label(record_id: str) -> Any:
    """One record: its frame with boxes, its detections, the record itself."""
    ctx = get_ctx()
    kept = ctx.sink.get(parse_record_id(record_id))
    if kept is None:
        abort(404, description="This record is no longer among the recent ones.")
    return render_template("label.html", rec=record_json(ctx, kept))


@bp.get("/logs")
def logs() -> Any:
    """Recent warnings and errors, newest first."""
    ctx = get_ctx()
    return render_template("logs.html", entries=list(reversed(ctx.logs.entries(0, 1000))), summary=ctx.logs.summary())

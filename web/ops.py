"""Machine endpoints: ``/healthz`` for supervisors and load balancers, ``/metrics`` for Prometheus.

Why /healthz answers 503 with reasons: a supervisor needs one status code, a
person reading it needs to know which condition failed (model not loaded,
pipeline stopped, every source offline).  It stays reachable without the token
even when ``web.public_read`` is false, but then it lists no reasons (they
name sources).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client.exposition import choose_encoder

from edgelabel.web.auth import is_authenticated
from edgelabel.web.context import build_status, get_ctx, readiness

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """Liveness (this answer) and readiness (model loaded, pipeline running, a source not offline)."""
    ctx = get_ctx()
    status = build_status(ctx, include_device=False)
    reasons = readiness(status)
    ready = not reasons
    body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "live": True, "ready": ready}
    if ctx.cfg.web.public_read or is_authenticated():
        body["reasons"] = reasons
        body["checks"] = {
            "model_loaded": bool(status.get("engine")),
            "pipeline_running": bool(status.get("running")),
            "sources": {n: s.get("status") for n, s in (status.get("sources") or {}).items()},
        }
    resp = jsonify(body)
    resp.status_code = 200 if ready else 503
    return resp


@bp.get("/metrics")
def metrics() -> Any:
    """Prometheus text format 0.0.4 (or OpenMetrics when the scraper asks for it) from this app's own registry."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions["edgelabel_metrics"]), content_type=content_type)

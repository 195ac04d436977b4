"""``/metrics`` in the Prometheus text format, from a registry that belongs to one app.

Why a custom collector on a per-app ``CollectorRegistry``: the numbers already
exist (the pipeline's status snapshot, the web sink's counters), so they are
read at scrape time instead of being mirrored into global metric objects that
would outlive the app (and collide when tests create several apps).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edgelabel.web.context import WebContext, build_status

_STATES = ("online", "reconnecting", "offline", "finished", "disabled")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class EdgelabelCollector(Collector):
    """Reads the daemon's state at each scrape."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        """Every metric, built from one status snapshot and one copy of the sink's counters."""
        status = build_status(self.ctx, include_device=False)
        counters = self.ctx.sink.counters()

        up = GaugeMetricFamily("edgelabel_up", "1 while the pipeline runs")
        up.add_metric([], 1.0 if status.get("running") else 0.0)
        yield up
        uptime = GaugeMetricFamily("edgelabel_uptime_seconds", "Seconds since the daemon started")
        uptime.add_metric([], _num(status.get("uptime_s")))
        yield uptime

        engine = status.get("engine") or {}
        info = GaugeMetricFamily("edgelabel_model_info", "The model in use (value 1)",
                                 labels=["name", "sha256", "engine", "provider", "precision", "family"])
        if engine:
            info.add_metric([str(engine.get(k, "")) for k in ("name", "sha256", "engine", "provider", "precision",
                                                               "family")], 1.0)
        yield info

        frames = CounterMetricFamily("edgelabel_frames", "Frames labeled (records written), per source",
                                     labels=["source"])
        for name, n in sorted(counters.frames.items()):
            frames.add_metric([name], float(n))
        yield frames
        detections = CounterMetricFamily("edgelabel_detections", "Detections in labeled frames, per source and class",
                                         labels=["source", "class"])
        for (name, label), n in sorted(counters.detections.items()):
            detections.add_metric([name, label], float(n))
        yield detections
        rejected = CounterMetricFamily("edgelabel_rejected_inputs", "Inputs that could not be decoded")
        rejected.add_metric([], _num(status.get("rejected")))
        yield rejected

        lat = counters.latency
        hist = HistogramMetricFamily("edgelabel_inference_latency_seconds", "Model inference time per frame")
        hist.add_metric([], [("+Inf" if b == float("inf") else repr(b / 1000.0), float(n)) for b, n in lat.cumulative()],
                        sum_value=lat.sum_ms / 1000.0)
        yield hist

        yield from self._sources(status.get("sources") or {})
        yield from self._zones(status.get("zones") or {})
        yield from self._mqtt(status.get("mqtt") or {})

        not_kept = CounterMetricFamily("edgelabel_web_frames_not_kept",
                                       "Frames the web page could not keep a copy of (encoder behind)")
        not_kept.add_metric([], float(counters.not_kept))
        yield not_kept
        views = GaugeMetricFamily("edgelabel_web_live_views", "Open live views (MJPEG streams)")
        views.add_metric([], float(self.ctx.streams))
        yield views

    def _sources(self, sources: dict[str, Any]) -> Iterator[Metric]:
        fps = GaugeMetricFamily("edgelabel_source_fps", "Frame rate per source: read from the source (in) "
                                "and labeled (out)", labels=["source", "direction"])
        frames_in = CounterMetricFamily("edgelabel_source_frames_in", "Frames read from the source", labels=["source"])
        dropped = CounterMetricFamily("edgelabel_source_frames_dropped",
                                      "Live frames replaced before the detector took them", labels=["source"])
        skipped = CounterMetricFamily("edgelabel_source_frames_skipped_fps", "Frames thinned out by the fps cap",
                                      labels=["source"])
        reconnects = CounterMetricFamily("edgelabel_source_reconnects", "Attempts to reopen a live source",
                                         labels=["source"])
        state = GaugeMetricFamily("edgelabel_source_state", "1 for the state the source is in", labels=["source", "state"])
        paused = GaugeMetricFamily("edgelabel_source_paused", "1 while an operator paused the source", labels=["source"])
        for name, s in sorted(sources.items()):
            fps.add_metric([name, "in"], _num(s.get("fps_in")))
            fps.add_metric([name, "out"], _num(s.get("fps_out")))
            frames_in.add_metric([name], _num(s.get("frames_in")))
            dropped.add_metric([name], _num(s.get("frames_dropped")))
            skipped.add_metric([name], _num(s.get("frames_skipped_fps")))
            reconnects.add_metric([name], _num(s.get("reconnects")))
            for st in _STATES:
                state.add_metric([name, st], 1.0 if s.get("status") == st else 0.0)
            paused.add_metric([name], 1.0 if s.get("paused") else 0.0)
        yield from (fps, frames_in, dropped, skipped, reconnects, state, paused)

    def _zones(self, zones: dict[str, Any]) -> Iterator[Metric]:
        events = CounterMetricFamily("edgelabel_zone_events", "Zone enters / exits and line crossings per direction, "
                                     "per source, zone or line, and class", labels=["source", "kind", "name", "class", "event"])
        inside = GaugeMetricFamily("edgelabel_zone_inside", "Tracks inside a zone now", labels=["source", "zone"])
        for source, shapes in sorted(zones.items()):
            for kind, key in (("zone", "zones"), ("line", "lines")):
                for name, entry in sorted((shapes.get(key) or {}).items()):
                    if kind == "zone":
                        inside.add_metric([source, name], _num(entry.get("inside")))
                    for label, per in sorted((entry.get("by_class") or {}).items()):
                        for what, n in sorted(per.items()):
                            events.add_metric([source, kind, name, label, what], _num(n))
        yield from (events, inside)

    def _mqtt(self, mqtt: dict[str, Any]) -> Iterator[Metric]:
        connected = GaugeMetricFamily("edgelabel_mqtt_connected", "1 while connected to the broker (absent: MQTT off)")
        depth = GaugeMetricFamily("edgelabel_mqtt_outbox_depth", "Messages waiting for the broker")
        drops = CounterMetricFamily("edgelabel_mqtt_dropped", "Messages that will never be delivered")
        if mqtt.get("enabled") and mqtt.get("connected") is not None:
            connected.add_metric([], 1.0 if mqtt.get("connected") else 0.0)
        if mqtt.get("outbox_depth") is not None:
            depth.add_metric([], _num(mqtt.get("outbox_depth")))
        if mqtt.get("dropped") is not None:
            drops.add_metric([], _num(mqtt.get("dropped")))
        yield from (connected, depth, drops)


def make_registry(ctx: WebContext) -> CollectorRegistry:
    """A registry of this app's own (not prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgelabelCollector(ctx))
    return registry

"""What stops labeling or delivery, read from one ``Pipeline.status()`` snapshot: one place for every alarm.

The MQTT sink publishes these as the retained ``<prefix>/<device>/alarm`` (raised and cleared with the stats),
the web page's ``/healthz`` answers 503 while an ``error`` alarm is active and lists it among its reasons, and
the log gets a line when one is raised or cleared.  A new condition is one more check in ``device_alarms``:
every channel shows it at once.

An alarm is a dict: ``id`` (stable, for consumers), ``severity`` (``error``: labeling or delivery is
stopped or losing data; ``warning``: degraded), ``component``, ``message`` (what a technician reads, with
what to do), and optional figures.
"""

from __future__ import annotations

from typing import Any


def dataset_health(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """The dataset sink's health for the stats topic (None when the daemon keeps no dataset)."""
    ds = (snapshot.get("sinks") or {}).get("dataset")
    if not isinstance(ds, dict):
        return None
    return {"ok": ds.get("ok") is not False, "errors": int(ds.get("errors") or 0), "last_error": ds.get("last_error")}


def disk_skipped(snapshot: dict[str, Any]) -> int | None:
    """Frames the dataset's free-space guard (``dataset.min_free_bytes``) refused so far, if it reports them."""
    quota = ((snapshot.get("sinks") or {}).get("dataset") or {}).get("quota")
    value = quota.get("skipped_disk") if isinstance(quota, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


def device_alarms(snapshot: dict[str, Any], *, skipped_before: int | None = None) -> list[dict[str, Any]]:
    """The alarms a ``Pipeline.status()`` snapshot shows.

    ``dataset_write_failed``: dataset writes fail (disk full, read-only, I/O error);
    ``dataset_disk_low``: the free-space guard refused frames since the previous snapshot
    (``skipped_before`` is its count then), i.e. capture is stopped to keep ``min_free_bytes`` free.
    """
    alarms: list[dict[str, Any]] = []
    ds = dataset_health(snapshot)
    if ds is not None and not ds["ok"]:
        alarms.append({"id": "dataset_write_failed", "severity": "error", "component": "dataset",
                       "message": f"dataset capture stopped: {ds['last_error'] or 'writes fail'}", "errors": ds["errors"]})
    skipped = disk_skipped(snapshot)
    if skipped is not None and skipped_before is not None and skipped > skipped_before:
        alarms.append({"id": "dataset_disk_low", "severity": "error", "component": "dataset",
                       "message": f"dataset capture stopped: the disk is below dataset.min_free_bytes "
                                  f"({skipped - skipped_before} frame(s) not stored since the last check)",
                       "errors": skipped})
    alarms.extend(source_stall_alarms(snapshot))
    return alarms


def source_stall_alarms(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """``source_stalled:<name>``: a source's read has made no progress for longer than its ``read_timeout``.

    Storage sources read on their own thread without a time limit (a file must not be skipped because the
    machine is slow), so a decode that takes minutes, or a hung network mount, froze the source while it
    showed ``online``; the runner times the read in progress (``SourceStats.stalled_s``).  Clears when the
    read returns.
    """
    alarms: list[dict[str, Any]] = []
    for name, src in sorted((snapshot.get("sources") or {}).items()):
        stalled = src.get("stalled_s") if isinstance(src, dict) else None
        if not isinstance(stalled, (int, float)):
            continue
        what = src.get("stalled_input") or "its input"
        alarms.append({"id": f"source_stalled:{name}", "severity": "error", "component": f"source {name}",
                       "message": f"source {name} stalled: reading {what} has taken {stalled:.0f} s without a frame "
                                  "(files behind it wait); check the file (a huge or hostile image, a video that "
                                  "decodes slowly) and the disk or network mount it is on; remove or move the "
                                  "file to let the source go on",
                       "stalled_s": stalled})
    return alarms

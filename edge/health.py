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
    (``skipped_before`` is its count then), i.e. capture is stopped to keep ``min_free_bytes`` free;
    ``storage_blocked_*`` (``storage_alarms``) and ``worker_thread_died`` (``thread_alarms``).
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
    alarms += storage_alarms(snapshot)
    alarms += thread_alarms(snapshot)
    return alarms


def storage_alarms(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """``storage_blocked_<component>``: a record waits because the ledger or a sink cannot write (disk full,
    read-only file system, I/O error); it is retried until the cause goes, and labeling is held meanwhile."""
    alarms: list[dict[str, Any]] = []
    for fault in snapshot.get("storage_faults") or []:
        if not isinstance(fault, dict):
            continue
        component = str(fault.get("component") or "storage")
        alarms.append({"id": "storage_blocked_" + component.replace("sink ", "").replace(" ", "_"),
                       "severity": "error", "component": component,
                       "message": f"{component} cannot write {fault.get('where')} ({fault.get('error')}): labeling "
                                  "waits and retries; free space there, remount it read-write or check the disk"})
    return alarms


def thread_alarms(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """``worker_thread_died``: a pipeline thread ended on an exception; the daemon exits 1 so systemd restarts it."""
    died = snapshot.get("threads_died")
    if not isinstance(died, dict) or not died:
        return []
    return [{"id": "worker_thread_died", "severity": "error", "component": "pipeline",
             "message": "worker thread(s) died: " + "; ".join(f"{k}: {v}" for k, v in died.items())
                        + "; labeling stopped, the daemon exits with status 1 for systemd to restart it "
                          "(report the error with the log)"}]

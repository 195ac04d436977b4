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

import time
from typing import Any

#: seconds the outbox's oldest message may wait for the broker's acknowledgement before ``outbox_stuck`` is raised
OUTBOX_STUCK_AFTER = 120.0
#: seconds ``outbox_lost`` stays raised after a corrupt outbox file lost messages (the count stays in the stats)
OUTBOX_LOSS_ALARM = 3600.0
#: seconds the outbox may stay locked by one call before ``outbox_busy`` (a hung disk under it)
OUTBOX_BUSY_AFTER = 10.0


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


def outbox_status(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """The MQTT outbox's stats (``Outbox.stats``) from a pipeline snapshot (None without MQTT)."""
    mqtt = (snapshot.get("sinks") or {}).get("mqtt")
    ob = mqtt.get("outbox") if isinstance(mqtt, dict) else None
    return ob if isinstance(ob, dict) else None


def outbox_alarms(snapshot: dict[str, Any], *, stuck_after: float = OUTBOX_STUCK_AFTER,
                  now: float | None = None) -> list[dict[str, Any]]:
    """``outbox_stuck``: the oldest message has waited ``stuck_after`` s (broker down, or refusing it);
    ``outbox_busy``: a status request found the outbox locked by a call that has not returned for
    OUTBOX_BUSY_AFTER s (a write hung on the disk; the counters shown are the last ones read);
    ``outbox_lost``: a corrupt outbox file lost messages in the last OUTBOX_LOSS_ALARM s;
    ``outbox_dead_letter``: messages the broker refused for good wait in the dead-letter table."""
    ob = outbox_status(snapshot)
    if ob is None:
        return []
    alarms: list[dict[str, Any]] = []
    last_error = ((snapshot.get("sinks") or {}).get("mqtt") or {}).get("last_error")
    wait = ob.get("head_wait_s")
    if isinstance(wait, (int, float)) and wait >= stuck_after:
        alarms.append({"id": "outbox_stuck", "severity": "error", "component": "mqtt",
                       "message": f"MQTT delivery stopped: the oldest of {ob.get('depth')} message(s) in the outbox "
                                  f"has waited {wait:.0f} s for the broker ({last_error or 'no error reported'}); "
                                  "check the broker and the log", "waiting_s": wait})
    at = ob.get("last_loss_at")
    if ob.get("lost") and isinstance(at, (int, float)) and (now or time.time()) - at < OUTBOX_LOSS_ALARM:
        alarms.append({"id": "outbox_lost", "severity": "error", "component": "mqtt",
                       "message": f"{ob['lost']} MQTT message(s) lost to a corrupt outbox file: {ob.get('last_loss')}; "
                                  "check the disk (dmesg, smartctl)", "errors": ob["lost"]})
    busy = ob.get("busy_s")
    if isinstance(busy, (int, float)) and busy >= OUTBOX_BUSY_AFTER:
        alarms.append({"id": "outbox_busy", "severity": "error", "component": "mqtt",
                       "message": f"the MQTT outbox {ob.get('path')} has been locked by a write that does not "
                                  f"return for {busy:.0f} s: labels are neither stored nor sent; check the disk "
                                  "holding it (dmesg, mount, a hung network share)", "waiting_s": busy})
    if ob.get("dead_letter"):
        alarms.append({"id": "outbox_dead_letter", "severity": "warning", "component": "mqtt",
                       "message": f"{ob['dead_letter']} MQTT message(s) refused by the broker are set aside "
                                  f"({last_error or 'see the log'}); fix the broker (max_packet_size, ACL), then "
                                  f"edgelabel outbox requeue {ob.get('path')}",
                       "errors": ob["dead_letter"]})
    return alarms


def device_alarms(snapshot: dict[str, Any], *, skipped_before: int | None = None) -> list[dict[str, Any]]:
    """The alarms a ``Pipeline.status()`` snapshot shows.

    ``dataset_write_failed``: dataset writes fail (disk full, read-only, I/O error);
    ``dataset_disk_low``: the free-space guard refused frames since the previous snapshot
    (``skipped_before`` is its count then), i.e. capture is stopped to keep ``min_free_bytes`` free;
    the MQTT outbox's alarms (:func:`outbox_alarms`), ``source_stalled:<name>`` (:func:`source_stall_alarms`),
    ``storage_blocked_*`` (``storage_alarms``), ``worker_thread_died`` (``thread_alarms``) and
    ``ledger_lost`` / ``dataset_index_lost`` (``loss_alarms``) and ``publisher_stalled`` (``publisher_alarms``).
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
    alarms.extend(outbox_alarms(snapshot))
    alarms.extend(source_stall_alarms(snapshot))
    alarms += storage_alarms(snapshot)
    alarms += thread_alarms(snapshot)
    alarms += loss_alarms(snapshot)
    alarms += publisher_alarms(snapshot)
    return alarms


def publisher_alarms(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """``publisher_stalled``: the MQTT outbox publisher is dead, hangs in a call, or is connected with messages
    waiting and the broker has acknowledged none of them for ``stall_after`` s (``MqttSink.publisher``).
    Clears as soon as an acknowledgement arrives (or the outbox empties, or the link drops: ``outbox_stuck``)."""
    mqtt = (snapshot.get("sinks") or {}).get("mqtt")
    st = mqtt.get("publisher") if isinstance(mqtt, dict) else None
    if not isinstance(st, dict):
        return []
    broker = mqtt.get("broker") or "the broker"
    loop_age, stalled, limit = st.get("loop_age_s"), st.get("stalled_s"), st.get("stall_after") or 0
    if st.get("alive") is False:
        why = ("the MQTT publisher thread has ended: labels are stored in the outbox but nothing is sent; "
               "the daemon is restarted by its watchdog (report the log's error)")
    elif isinstance(loop_age, (int, float)) and loop_age >= limit:
        why = (f"the MQTT publisher has hung in one call for {loop_age:.0f} s: nothing is sent; the daemon is "
               "restarted by its watchdog; check the disk of the outbox and the network to the broker")
    elif isinstance(stalled, (int, float)):
        why = (f"connected to {broker}, but none of the {mqtt.get('pending')} waiting message(s) was acknowledged "
               f"for {stalled:.0f} s: the broker (or a proxy or firewall between) takes the connection but does "
               "not answer publishes; check the broker's log and load, then restart the broker")
    else:
        return []
    return [{"id": "publisher_stalled", "severity": "error", "component": "mqtt", "message": why}]


def loss_alarms(snapshot: dict[str, Any], *, now: float | None = None) -> list[dict[str, Any]]:
    """``ledger_lost`` / ``dataset_index_lost``: a corrupt job ledger or dataset index was salvaged and rows
    could not be read, in the last OUTBOX_LOSS_ALARM s (the counts stay in the status and the stats topic)."""
    alarms: list[dict[str, Any]] = []
    ds = (snapshot.get("sinks") or {}).get("dataset")
    found = [("ledger_lost", "ledger", snapshot.get("ledger")),
             ("dataset_index_lost", "dataset", ds.get("index") if isinstance(ds, dict) else None)]
    for alarm_id, component, st in found:
        if not isinstance(st, dict) or not st.get("lost"):
            continue
        at = st.get("last_loss_at")
        if not isinstance(at, (int, float)) or (now or time.time()) - at >= OUTBOX_LOSS_ALARM:
            continue
        alarms.append({"id": alarm_id, "severity": "error", "component": component,
                       "message": f"{st['lost']} row(s) lost to a corrupt file: {st.get('last_loss')}; "
                                  "check the disk (dmesg, smartctl) and replace it if errors repeat",
                       "errors": st["lost"]})
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

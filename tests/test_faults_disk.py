"""Fault: the dataset's disk fills up while the daemon runs, then space returns.

Injected for real: the dataset lives on a 6 MiB tmpfs the test mounts (skipped with the reason when
mounting is not permitted); once a few frames are stored, a filler file takes every free byte
(ENOSPC for the dataset's next image, label, index and COCO writes); a few seconds later the filler
is deleted.  The daemon's own state (ledger, MQTT outbox) is on another disk.  The dataset's
free-space guard (``dataset.min_free_bytes``) is set to 0 so that the disk really fills: this is
the case of another program filling the disk, or of a guard set too low.

Must happen: dataset capture stops with a status (``ok: false`` with the path and the OS error in
the dataset status and in the ``dataset`` field of the stats message) and a retained alarm on
``<prefix>/<device>/alarm``; labels keep flowing to MQTT (without ``frame_path`` while no pixels are
stored); nothing already written changes or breaks (same bytes, valid COCO, index integrity); when
space returns, capture resumes by itself and the alarm clears (a late subscriber sees it cleared).
Measured: alarm latency, labels published while the disk was full, recovery latency.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from edgelabel.edge.config import DatasetConfig
from edgelabel.edge.daemon import EXIT_UNDELIVERED
from edgelabel.edge.health import device_alarms
from tests.conftest import Broker
from tests.test_faults_support import (
    HAVE_MOSQUITTO,
    PREFIX,
    DaemonProc,
    TimedCollector,
    dataset_files,
    measure,
    sqlite_check,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return written


def alarms(col: TimedCollector) -> list[tuple[float, dict]]:
    return [(t, json.loads(p)) for t, p in col.on(f"{PREFIX}/fault-dev/alarm")]


def test_full_disk_stops_capture_with_an_alarm_labels_keep_flowing_capture_resumes(
    small_disk: Path, tmp_path: Path, assets: Path, broker: Broker
) -> None:
    root = small_disk / "dataset"
    # every frame of the looped clip (a stand-in camera, which the live capture policy would sample)
    dataset: dict[str, object] = {"enabled": True, "path": str(root), "coco_interval": 0.5, "jpeg_quality": 90,
                                  "capture": {"sources": {"cars": {}}}}
    if "min_free_bytes" in {f.name for f in dataclasses.fields(DatasetConfig)}:
        dataset["min_free_bytes"] = 0  # let the disk really fill (the guard's own case is checked below)
    cfg = write_config(tmp_path, broker.port, {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 4}},
                       dataset=dataset)
    col = TimedCollector(broker.port)
    daemon = DaemonProc(cfg)
    filler = small_disk / "filler.bin"

    def stored() -> int:
        return len(list((root / "images").rglob("*.jpg"))) if (root / "images").is_dir() else 0

    try:
        assert wait_until(lambda: stored() >= 4 and alarms(col), 60), "no frames stored\n" + daemon.log()[-3000:]
        assert alarms(col)[-1][1]["active"] is False  # the first stats tick states "no alarm", retained
        time.sleep(0.6)  # let the COCO file catch up with the stored frames
        before = {k: hashlib.sha256(v).hexdigest() for k, v in dataset_files(root).items()}
        filled = fill(filler)
        full_at = time.monotonic()
        labels_at_full = len(col.labels("cars"))
        assert wait_until(lambda: alarms(col)[-1][1]["active"], 15), "no alarm\n" + daemon.log()[-3000:]
        alarm_at, alarm = alarms(col)[-1]
        time.sleep(4.0)
        assert daemon.alive()
        labels_while_full = len(col.labels("cars")) - labels_at_full
        coco_during = COCO(str(root / "annotations.coco.json"))  # the last good file, still whole
        images_before_free = stored()
        filler.unlink()
        freed_at = time.monotonic()
        assert wait_until(lambda: not alarms(col)[-1][1]["active"], 15), "the alarm does not clear\n" + daemon.log()[-3000:]
        cleared_at = alarms(col)[-1][0]
        assert wait_until(lambda: stored() >= images_before_free + 3, 15), "capture does not resume"
        code = daemon.stop(30)
    finally:
        daemon.ensure_dead()
        col.close()
    assert code == 0, daemon.log()[-3000:]
    log = daemon.log()
    assert "Traceback" not in log
    # the alarm said why, the stats said it too
    assert alarm["alarms"][0]["id"] == "dataset_write_failed" and "No space left on device" in alarm["alarms"][0]["message"]
    stats = [json.loads(p) for _, p in col.on(f"{PREFIX}/fault-dev/stats")]
    assert any(s["dataset"] and s["dataset"]["ok"] is False and "No space left" in (s["dataset"]["last_error"] or "")
               for s in stats)
    assert stats[-1]["dataset"]["ok"] is True
    # nothing written before the disk filled changed
    after = {k: hashlib.sha256(v).hexdigest() for k, v in dataset_files(root).items()}
    changed = [k for k, h in before.items() if after.get(k) != h]
    assert not changed, f"{len(changed)} file(s) changed or vanished: {changed[:5]}"
    # the dataset is whole and consistent
    assert sqlite_check(root / "index.sqlite") == "ok"
    coco = COCO(str(root / "annotations.coco.json"))
    for img in coco.dataset["images"]:
        assert (root / img["file_name"]).is_file() and (root / img["edgelabel_label_file"]).is_file()
    assert not [p for p in root.rglob("*.tmp")], "partial files left behind"
    # every label that names stored pixels names pixels that are there, with the right hash
    recs = [r for _, r in col.labels("cars")]
    named = [r for r in recs if r["frame_path"]]
    for r in named:
        assert hashlib.sha256((root / r["frame_path"]).read_bytes()).hexdigest() == r["frame_sha256"]
    unstored = len(recs) - len(named)
    late = TimedCollector(broker.port, f"{PREFIX}/fault-dev/alarm")  # retained: whoever looks later sees it cleared
    assert wait_until(lambda: late.last("/alarm") is not None, 5)
    assert json.loads(late.last("/alarm") or b"{}")["active"] is False
    late.close()
    measure("full_disk", tmpfs_mib=6, filler_mib=round(filled / 2**20, 2), alarm_after_s=round(alarm_at - full_at, 2),
            labels_published_while_full=labels_while_full, labels_without_stored_pixels=unstored,
            coco_images_during=len(coco_during.getImgIds()), files_before_unchanged=len(before),
            alarm_cleared_after_s=round(cleared_at - freed_at, 2), images_at_end=stored(),
            alarm_message=alarm["alarms"][0]["message"])
    assert labels_while_full >= 8  # 4 fps for 4 s: labels never waited for the disk
    assert unstored >= labels_while_full - 2


def test_alarm_rules_from_a_status_snapshot() -> None:
    """The alarm topic's rules, on the status shapes the dataset sink reports."""
    healthy = {"sinks": {"dataset": {"ok": True, "errors": 0, "last_error": None}}}
    failing = {"sinks": {"dataset": {"ok": False, "errors": 3, "last_error": "/d/x.jpg: No space left on device (ENOSPC)"}}}
    assert device_alarms(healthy) == [] and device_alarms({"sinks": {}}) == [] and device_alarms({}) == []
    (alarm,) = device_alarms(failing)
    assert alarm["id"] == "dataset_write_failed" and "ENOSPC" in alarm["message"] and alarm["errors"] == 3
    # the free-space guard (dataset.min_free_bytes) refusing frames is capture stopped too, while it lasts
    guarded = {"sinks": {"dataset": {"ok": True, "errors": 0, "quota": {"skipped_disk": 7}}}}
    (low,) = device_alarms(guarded, skipped_before=4)
    assert low["id"] == "dataset_disk_low" and "3 frame(s)" in low["message"]
    assert device_alarms(guarded, skipped_before=7) == [] and device_alarms(guarded) == []


# --------------------------------------------------------------------------- the daemon's own state on a full disk


def _sigterm_seconds(daemon: DaemonProc) -> tuple[int, float]:
    t0 = time.monotonic()
    code = daemon.stop(30)
    return code, time.monotonic() - t0


def test_full_state_dir_holds_the_record_raises_an_alarm_and_resumes_when_space_returns(
    tmp_path: Path, broker: Broker
) -> None:
    """The state_dir (ledger, MQTT outbox) fills up while a storage job runs, and space returns.

    Before: ``ledger.mark_done`` raised "database or disk is full" out of the sink worker, which died: frames
    were still read, nothing more reached MQTT or the ledger, /healthz stayed 200 and SIGTERM hung.  Now the
    record waits (retried), a ``storage_blocked_*`` alarm is raised and cleared, every frame is published and
    marked done once space returns, and SIGTERM ends the daemon within seconds, also while the disk is full.
    """
    from tests.conftest import ASSETS

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    cfg = write_config(tmp_path, broker.port, {"clip": {"uri": str(ASSETS / "videos" / "bottle-detection.mp4"), "fps": 6}},
                       state_dir=str(mnt / "state"))
    col = TimedCollector(broker.port)
    daemon = DaemonProc(cfg)
    filler = mnt / "filler.bin"

    def state() -> tuple[bool, list[str]]:
        got = alarms(col)
        return (got[-1][1]["active"], [a["id"] for a in got[-1][1]["alarms"]]) if got else (False, [])

    try:
        assert wait_until(lambda: len(col.labels("clip")) >= 6 and alarms(col), 60), daemon.log()[-3000:]
        assert state() == (False, [])
        fill(filler)
        full_at = time.monotonic()
        assert wait_until(lambda: state()[0], 20), "no alarm while the state_dir is full\n" + daemon.log()[-3000:]
        alarm_after = time.monotonic() - full_at
        alarm = alarms(col)[-1][1]["alarms"][0]
        assert alarm["id"].startswith("storage_blocked_") and "full" in alarm["message"], alarm
        time.sleep(2.0)
        assert daemon.alive()
        held_at = len(col.labels("clip"))
        filler.unlink()
        freed_at = time.monotonic()
        assert wait_until(lambda: not state()[0], 20), "the alarm does not clear\n" + daemon.log()[-3000:]
        cleared_after = time.monotonic() - freed_at
        assert wait_until(lambda: len(col.labels("clip")) >= held_at + 12, 30), \
            "labels do not flow again after space returned\n" + daemon.log()[-3000:]
        # full once more, and SIGTERM while a record waits for the disk: the daemon ends within seconds
        fill(filler)
        assert wait_until(lambda: state()[0], 20), daemon.log()[-3000:]
        code, stop_s = _sigterm_seconds(daemon)
    finally:
        daemon.ensure_dead()
        col.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    log = daemon.log()
    # was 5.1-5.2 s (the MQTT close waited ACK_TIMEOUT for acknowledgements that could not be recorded); the
    # waits after a stop now end together within STOP_DRAIN_S (2.5 s) and sooner when nothing moves
    assert stop_s < 3.0, f"SIGTERM took {stop_s:.1f} s while the state_dir was full\n{log[-4000:]}"
    assert code in (0, EXIT_UNDELIVERED), log[-3000:]
    # the sink worker neither died nor gave a record up (the MQTT publisher thread's own retries log apart)
    assert "worker thread" not in log and "failed to write record" not in log and "failed on track" not in log, log[-3000:]
    assert "is not marked done" not in log.split("received SIGTERM")[0], "a frame was given up before the stop"
    # nothing was lost: the published frames are one unbroken run from the first frame on
    indexes = sorted({r["frame_index"] for _, r in col.labels("clip")})
    assert indexes == list(range(len(indexes))), f"frames missing: {sorted(set(range(indexes[-1] + 1)) - set(indexes))[:10]}"
    measure("full_state_dir", tmpfs_mib=16, alarm_after_s=round(alarm_after, 2),
            alarm_cleared_after_s=round(cleared_after, 2), sigterm_while_full_s=round(stop_s, 2),
            frames_published=len(indexes), exit_code=code, alarm_message=alarm["message"])


def test_ledger_on_a_full_disk_waits_and_the_sink_worker_survives(tmp_path: Path) -> None:
    """Only the ledger writes to the state_dir (no MQTT): ``mark_done`` meets "database or disk is full".

    Before, the exception escaped and killed the sink worker.  Now the record waits, ``storage_faults``
    names the ledger (alarm ``storage_blocked_ledger``), and every frame is marked done once space returns.
    """
    from edgelabel.edge.config import config_from_dict
    from edgelabel.edge.pipeline import Pipeline
    from edgelabel.edge.sinks.base import Sink
    from tests.conftest import ASSETS

    class Keep(Sink):
        name = "keep"

        def __init__(self) -> None:
            self.ids: list[str] = []

        def write(self, record, frame) -> None:  # type: ignore[no-untyped-def]
            self.ids.append(record.id)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    cfg = config_from_dict({
        "device_id": "ldg", "state_dir": str(mnt / "state"),
        "model": {"path": str(ASSETS / "models" / "yolox_nano.onnx"), "family": "yolox", "threads": 1},
        "sources": {"clip": {"uri": str(ASSETS / "videos" / "cars.mp4"), "fps": 25}},
        "mqtt": {"enabled": False, "stats_interval": 0.5}, "dataset": {"enabled": False}})
    sink = Keep()
    pipe = Pipeline(cfg, sinks=[sink], show_progress=False)
    filler = mnt / "filler.bin"
    try:
        pipe.start()
        assert wait_until(lambda: pipe.ledger is not None and pipe.ledger.done_count() >= 5, 60)
        fill(filler)
        assert wait_until(lambda: pipe.status()["storage_faults"], 20), "the full ledger is not reported"
        (fault,) = pipe.status()["storage_faults"]
        assert fault["component"] == "ledger" and "full" in fault["error"] and fault["where"].endswith("ledger.sqlite")
        assert [a["id"] for a in device_alarms(pipe.status())] == ["storage_blocked_ledger"]
        # /healthz reads the web page's status: the same alarm makes it answer 503 with the reason
        from edgelabel.web.context import readiness

        web_status = {**pipe.status(), "engine": {"name": "m"}}
        assert any(r.startswith("storage_blocked_ledger: ") for r in readiness(web_status))
        time.sleep(1.5)
        assert pipe.alive(max_age=10) and not pipe.died
        filler.unlink()
        assert wait_until(lambda: not pipe.status()["storage_faults"], 20)
        assert device_alarms(pipe.status()) == []
        assert pipe.wait(90), "the job does not finish after space returned"
        assert pipe.ledger is not None
        done = pipe.ledger.done_count("clip")
    finally:
        pipe.shutdown()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert pipe.exit_code() == 0 and not pipe.died
    assert len(sink.ids) == 268 and len(set(sink.ids)) == 268  # every frame of the clip, once
    assert done == 268, "every frame is marked done: none was given up while the disk was full"


# --------------------------------------------------------------------------- exit codes: a state_dir a remount fixes


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_read_only_or_full_state_dir_exits_1_naming_the_path(tmp_path: Path, broker: Broker, fault: str) -> None:
    """A state_dir on a read-only (``mount -o remount,ro``) or full file system at start.

    Before: exit 2 ("config error: mqtt.outbox.path: cannot open ..."), which the unit never restarts
    (``RestartPreventExitStatus=2``) although a remount fixes it.  Now exit 1 (restarted), one line naming
    the state_dir, the cause and what to check, and no traceback.
    """
    from tests.conftest import ASSETS

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        (mnt / "state").mkdir()
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:
            fill(mnt / "filler.bin")
        cfg = write_config(tmp_path, broker.port, {"img": {"uri": str(ASSETS / "images" / "bus.jpg")}},
                           state_dir=str(mnt / "state"))
        daemon = DaemonProc(cfg, env={"EDGELABEL_STATE_DIR_WAIT_S": "0"})  # no start-up wait: exit at once
        code = daemon.wait(60)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    log = daemon.log()
    assert code == 1, log[-3000:]
    assert "Traceback" not in log and "config error" not in log, log[-3000:]
    why = "Read-only file system" if fault == "read-only" else "No space left on device"
    line = next(ln for ln in log.splitlines() if f"state_dir: {mnt / 'state'}" in ln)
    assert why in line and "df -h" in line and "findmnt" in line, line


@pytest.mark.parametrize("then", ["remount", "sigterm"])
def test_start_waits_for_a_read_only_state_dir_to_be_remounted(tmp_path: Path, broker: Broker, then: str) -> None:
    """The service waits (``EDGELABEL_STATE_DIR_WAIT_S``, 150 s by default) for the state_dir instead of a quick
    series of restarts that StartLimitBurst would end: a remount read-write lets it start and finish the job;
    SIGTERM ends the wait at once."""
    from tests.conftest import ASSETS

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        (mnt / "state").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        cfg = write_config(tmp_path, broker.port, {"img": {"uri": str(ASSETS / "images" / "bus.jpg")}},
                           state_dir=str(mnt / "state"))
        col = TimedCollector(broker.port)
        daemon = DaemonProc(cfg, env={"EDGELABEL_STATE_DIR_WAIT_S": "60"})
        try:
            assert wait_until(lambda: "waiting up to" in daemon.log(), 30), daemon.log()[-3000:]
            assert daemon.alive()
            if then == "remount":
                subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
                code = daemon.wait(60)
            else:
                code, stop_s = _sigterm_seconds(daemon)
        finally:
            daemon.ensure_dead()
            col.close()
        log = daemon.log()
        if then == "remount":
            assert code == 0, log[-3000:]
            assert "writable again" in log and len(col.labels("img")) == 1
            assert (mnt / "state" / "ledger.sqlite").is_file()
        else:
            assert code == 1 and stop_s < 5, log[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_state_dir_whose_disk_is_not_mounted_exits_1(tmp_path: Path) -> None:
    """The state_dir is on a disk /etc/fstab lists but that is not mounted: not created on the root file system."""
    from edgelabel.edge.pipeline import StateUnavailable, check_state_dir, unmounted_mount_point

    mp = tmp_path / "ssd"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# comment\nUUID=1234 / ext4 defaults 0 1\nLABEL=ssd {mp} ext4 defaults,nofail 0 2\n")
    state = mp / "edgelabel" / "state"
    assert unmounted_mount_point(state, fstab) == str(mp)
    with pytest.raises(StateUnavailable, match="is not mounted"):
        check_state_dir(state, fstab)
    assert not (mp / "edgelabel").exists(), "nothing created on the file system below the missing mount"
    assert unmounted_mount_point(tmp_path / "elsewhere", fstab) is None
    check_state_dir(tmp_path / "elsewhere", fstab)  # an ordinary folder: created, writable
    assert (tmp_path / "elsewhere").is_dir() and not list((tmp_path / "elsewhere").iterdir())


def test_an_outbox_outside_state_dir_on_a_read_only_disk_exits_1_naming_the_path(tmp_path: Path, broker: Broker) -> None:
    """``mqtt.outbox.path`` given as an absolute path on another disk, mounted read-only; the state_dir is fine.

    Before: exit 2 (``config error: mqtt.outbox.path: cannot open ...``), never restarted by the unit
    (``RestartPreventExitStatus=2``) although a remount fixes it.  Now exit 1 with the path, the cause and
    what to check, like a read-only state_dir.
    """
    from tests.conftest import ASSETS

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        (mnt / "spool").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        outbox = mnt / "spool" / "outbox.sqlite"
        cfg = write_config(tmp_path, broker.port, {"img": {"uri": str(ASSETS / "images" / "bus.jpg")}},
                           mqtt_extra={"outbox": {"path": str(outbox)}})
        daemon = DaemonProc(cfg, env={"EDGELABEL_STATE_DIR_WAIT_S": "0"})
        code = daemon.wait(60)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    log = daemon.log()
    assert code == 1, log[-3000:]
    assert "Traceback" not in log and "config error" not in log, log[-3000:]
    line = next(ln for ln in log.splitlines() if f"mqtt.outbox.path: {outbox}" in ln)
    assert "findmnt" in line and "df -h" in line and ("Read-only" in line or "readonly" in line), line

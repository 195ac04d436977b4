"""edgelabel ingest against the real services: a private Mosquitto and PostgreSQL at 127.0.0.1:5432.

Each test makes its own database (``ingest_test_<random>``) and drops it.  Records, events and reviews are
built with the daemon's own classes and checked against its JSON schemas, so they have the real shape.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelabel.edge.records import SCHEMA_VERSION, DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id
from tests.conftest import ASSETS, ROOT, free_port
from tests.helpers import run_edgelabel

psycopg = pytest.importorskip("psycopg", reason="the ingest extra is not installed (pip install '.[ingest]')")

SCHEMAS = ROOT / "edge" / "schemas"
ADMIN_DSN = os.environ.get("EDGELABEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "s3cr3t-Pw-4-ingest"
MODEL = ModelInfo("yolox_nano", "0" * 64, "yolox", "onnxruntime", "CPUExecutionProvider", "fp32", (416, 416))


def _schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


LABEL_SCHEMA, EVENT_SCHEMA, REVIEW_SCHEMA = (_schema(n) for n in ("label-record.v1.json", "event.v1.json",
                                                                    "review.v1.json"))


@pytest.fixture
def pg_dsn():
    """A fresh database of our own, dropped afterwards."""
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_DSN} ({exc}); set EDGELABEL_TEST_PG")
    name = f"ingest_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def label(device: str, source: str, i: int, t0: float = 1_795_649_661.0) -> dict:
    """A label record as the daemon publishes it (LabelRecord.to_dict), checked against its schema."""
    key = f"/data/clips/{source}.mp4#{i}"
    w, h = 1280, 720
    x = i % 1000
    dets = [DetectionRecord(class_id=i % 3, label=("person", "bicycle", "car")[i % 3], score=0.5 + (i % 5) / 10,
                            box=[10.0 + x, 20.0, 110.0 + x, 220.0],
                            box_norm=[round((10.0 + x) / w, 6), 20 / h, round((110.0 + x) / w, 6), 220 / h],
                            track_id=i // 10 + 1),
            DetectionRecord(class_id=2, label="car", score=0.31, box=[500.0, 300.0, 700.0, 420.0],
                            box_norm=[500 / w, 300 / h, 700 / w, 420 / h])]
    rec = LabelRecord(id=record_id(device, source, key), device_id=device, source=source, frame_index=i,
                      frame_key=key, captured_at=iso_utc(t0 + i / 15), captured_ts=t0 + i / 15, width=w, height=h,
                      model=MODEL, inference_ms=14.8, detections=dets, media_time=i / 15).to_dict()
    LABEL_SCHEMA.validate(rec)
    return rec


def track_event(rec: dict, kind: str = "new") -> dict:
    d = rec["detections"][0]
    ev = {"schema_version": SCHEMA_VERSION, "id": str(uuid.uuid4()), "type": kind, "device_id": rec["device_id"],
          "source": rec["source"], "track_id": d["track_id"], "track_uid": str(uuid.uuid5(uuid.NAMESPACE_URL, rec["id"])),
          "class_id": d["class_id"], "label": d["label"], "confidence": d["score"], "score_max": d["score"],
          "hits": 1, "first_seen": rec["captured_at"], "first_ts": rec["captured_ts"],
          "last_seen": rec["captured_at"], "last_ts": rec["captured_ts"], "duration_s": 0.0, "record_id": rec["id"],
          "frame_index": rec["frame_index"], "box": d["box"],
          "best": {"record_id": rec["id"], "frame_index": rec["frame_index"], "box": d["box"], "score": d["score"],
                   "captured_at": rec["captured_at"]},
          "end_reason": None, "at": rec["captured_at"]}
    EVENT_SCHEMA.validate(ev)
    return ev


def review(rec: dict, version: int, state: str, boxes: list[list[float]]) -> dict:
    rv = {"schema_version": 1, "id": str(uuid.uuid4()), "type": "review", "device_id": rec["device_id"],
          "record_id": rec["id"], "source": rec["source"], "frame_index": rec["frame_index"],
          "frame_key": rec["frame_key"], "action": "update", "state": state,
          "previous_state": "needs_review", "by": "night shift", "at": f"2026-12-05T21:00:0{version}.000Z",
          "ts": 1796504400.0 + version, "version": version, "width": rec["width"], "height": rec["height"],
          "detections": [{"class_id": 7, "label": "truck", "score": None, "box": b,
                          "box_norm": [b[0] / 1280, b[1] / 720, b[2] / 1280, b[3] / 720]} for b in boxes],
          "image": None}
    REVIEW_SCHEMA.validate(rv)
    return rv


class Publisher:
    """A QoS 1 publisher that waits for every PUBACK (what the daemon's outbox does)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, topic: str, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.infos.append(self.client.publish(topic, data, qos=1))

    def close(self) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "the broker did not acknowledge a test message"
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def count(dsn: str, sql: str = "SELECT count(*) FROM records") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return None


class Worker:
    """``edgelabel ingest`` as a real process."""

    def __init__(self, tmp: Path, broker_port: int, dsn: str, client_id: str, group: str = "plant",
                 extra: tuple[str, ...] = (), user: str = "") -> None:
        self.http = free_port()
        self.log = tmp / f"ingest-{client_id}-{self.http}.log"
        cmd = [sys.executable, "-m", "edgelabel.edge.cli", "ingest", "--mqtt", f"mqtt://{user}127.0.0.1:{broker_port}",
               "--db", dsn, "--group", group, "--client-id", client_id, "--http", f"127.0.0.1:{self.http}", *extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "EDGELABEL_MQTT_PASSWORD": SECRET, "PGPASSWORD": SECRET})
        wait_for(lambda: (self.proc.poll() is None or self._died()) and (health(self.http) or {}).get("ok"),
                 30, f"ingest {client_id} to be healthy (log: {self.log})")

    def _died(self) -> bool:
        raise AssertionError(f"ingest exited with {self.proc.returncode}:\n{self.log.read_text()}")

    def stored(self) -> int:
        return (health(self.http) or {}).get("stored", {}).get("messages", 0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# --- the package stays apart from the daemon ---------------------------------------------------------------


def test_ingest_does_not_import_the_daemon_runtime():
    code = ("import sys, edgelabel.ingest, edgelabel.ingest.service, edgelabel.ingest.db;"
            "bad = sorted(m for m in sys.modules if m.startswith(('edgelabel.edge.pipeline', 'edgelabel.edge.sources',"
            " 'edgelabel.edge.sinks', 'edgelabel.engines', 'edgelabel.edge.daemon', 'edgelabel.web', 'cv2',"
            " 'onnxruntime')));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, f"ingest loaded the daemon's runtime: {out.stdout} {out.stderr}"


# --- config -------------------------------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path, monkeypatch):
    from edgelabel.ingest.config import ConfigError, load_ingest_config

    bad = tmp_path / "ingest.yaml"
    bad.write_text("mqtt: {port: 0, grup: x}\nbatch: {max_rows: 0}\ndatabase: {dsn: 'mysql://h/db'}\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(bad)
    text = str(err.value)
    for expected in ("mqtt.port: 0 is below the minimum 1", "mqtt.grup: unknown setting", "batch.max_rows: 0",
                     "database.dsn: expected postgresql://"):
        assert expected in text
    assert str(bad) in text
    with pytest.raises(ConfigError, match="EDGELABEL_MQTT_PASSWORD"):
        load_ingest_config(mqtt_url="mqtt://u:secret@broker:1883")
    with pytest.raises(ConfigError, match="PGPASSWORD") as err:
        load_ingest_config(db="postgresql://u:hunter2@db/plant")
    assert "hunter2" not in str(err.value)
    monkeypatch.setenv("EDGELABEL_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("PLANT_DB_PW", "pw")
    good = tmp_path / "good.yaml"
    good.write_text("mqtt: {host: broker.plant, prefix: plant/edgelabel}\n"
                    "database: {dsn: 'postgresql://ingest@db/plant', password: '${PLANT_DB_PW}'}\n")
    cfg = load_ingest_config(good, mqtt_url="mqtt://archive@b2:1884", group="line-3")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username, cfg.mqtt.password) == ("b2", 1884, "archive", "s3cret")
    assert (cfg.mqtt.group, cfg.mqtt.prefix, cfg.database.password) == ("line-3", "plant/edgelabel", "pw")


# --- schema ---------------------------------------------------------------------------------------------------


def test_migrations_run_once_when_workers_start_together(pg_dsn):
    from edgelabel.ingest.db import migrate, migrations

    results, errors = [], []

    def one():
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                results.append(migrate(conn))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    latest = len(migrations())
    assert results == [latest] * 4
    assert count(pg_dsn, "SELECT count(*) FROM schema_version") == latest
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        cols = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                           "table_name = 'label_records' ORDER BY ordinal_position")]
        assert cols[:8] == ["id", "device", "source", "frame_index", "captured_at", "model", "detections",
                            "review_state"]
        conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'future.sql')", (latest + 1,))
        with pytest.raises(RuntimeError, match="newer than this edgelabel"):
            migrate(conn)


# --- exactly once ---------------------------------------------------------------------------------------------


@pytest.fixture
def service(broker, pg_dsn):
    """An in-process worker (its /healthz, /metrics and counters are read directly)."""
    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    cfg = load_ingest_config(mqtt_url=f"mqtt://127.0.0.1:{broker.port}", db=pg_dsn, group="plant",
                             client_id="ingest-a", http="127.0.0.1:0")
    cfg.batch.max_rows = 50
    cfg.progress_interval = 0.5
    svc = IngestService(cfg)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    wait_for(lambda: svc.health()["ok"], 30, "the worker to connect")
    yield svc
    svc.stop()
    thread.join(30)
    assert not thread.is_alive(), "the worker did not stop"


def test_duplicates_and_early_reviews_are_stored_exactly_once(broker, pg_dsn, service, caplog):
    caplog.set_level(logging.INFO, logger="edgelabel.ingest")
    n = 300
    recs = [label("line3-cam", "gate", i) for i in range(n)]
    pub = Publisher(broker.port)
    early = review(recs[10], 1, "corrected", [[1.0, 2.0, 30.0, 40.0]])
    # a review before its label; a newer version before an older one
    pub.send("edgelabel/line3-cam/review", early)
    newer, older = (review(recs[20], 3, "corrected", [[5.0, 5.0, 50.0, 50.0]]),
                    review(recs[20], 2, "rejected", [[9.0, 9.0, 90.0, 90.0]]))
    events = [track_event(recs[i]) for i in range(0, n, 10)]
    for i, rec in enumerate(recs):
        pub.send("edgelabel/line3-cam/gate/labels", rec)
        if i % 7 == 0:  # redeliveries, as after a lost PUBACK
            pub.send("edgelabel/line3-cam/gate/labels", rec)
        if i % 10 == 0:
            pub.send("edgelabel/line3-cam/events", events[i // 10])
        if i == 25:
            pub.send("edgelabel/line3-cam/review", newer)
            pub.send("edgelabel/line3-cam/review", older)
            pub.send("edgelabel/line3-cam/review", newer)
    for ev in events[:5]:
        pub.send("edgelabel/line3-cam/events", ev)
    pub.send("edgelabel/line3-cam/status", "online")
    pub.send("edgelabel/line3-cam/gate/status", "finished")
    pub.close()

    wait_for(lambda: count(pg_dsn, "SELECT count(*) FROM reviews") == 3 and count(pg_dsn) == n
             and count(pg_dsn, "SELECT count(*) FROM track_events") == len(events)
             and count(pg_dsn, "SELECT count(*) FROM sources WHERE status = 'finished'") == 1,
             60, "every record, event and review in the database")
    time.sleep(0.5)  # anything still in flight would add rows now
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        ids = {str(r[0]) for r in conn.execute("SELECT id FROM label_records")}
        assert ids == {r["id"] for r in recs}
        assert count(pg_dsn, "SELECT count(*) FROM detections") == 2 * n
        assert count(pg_dsn, "SELECT count(*) FROM events") == len(events)
        state, dets, model_dets, version = conn.execute(
            "SELECT review_state, detections, model_detections, review_version FROM label_records WHERE id = %s",
            (recs[10]["id"],)).fetchone()
        assert (state, version) == ("corrected", 1)
        assert [d["box"] for d in dets] == [[1.0, 2.0, 30.0, 40.0]]
        assert model_dets == recs[10]["detections"], "the model's boxes are kept beside the person's"
        state, dets, version = conn.execute(
            "SELECT review_state, detections, review_version FROM label_records WHERE id = %s",
            (recs[20]["id"],)).fetchone()
        assert (state, version) == ("corrected", 3), "the highest version wins, whatever the arrival order"
        assert [d["box"] for d in dets] == [[5.0, 5.0, 50.0, 50.0]]
        assert count(pg_dsn, "SELECT count(*) FROM label_records WHERE review_state IS NOT NULL") == 2
        cars = conn.execute("SELECT count(*) FROM detections WHERE label = 'car' AND score >= 0.3 "
                            "AND device = 'line3-cam' AND captured_at >= %s", (recs[0]["captured_at"],)).fetchone()[0]
        assert cars == n + sum(1 for i in range(n) if i % 3 == 2)
        assert conn.execute("SELECT status FROM devices WHERE device = 'line3-cam'").fetchone()[0] == "online"
    h = service.health()
    assert h["ok"] and h["stored"]["duplicates"] >= n // 7 + 1 and h["stored"]["rejected"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'edgelabel_ingest_rows_total{{kind="labels"}} {float(n)}' in metrics
    assert "edgelabel_ingest_batch_seconds_count" in metrics and "edgelabel_ingest_lag_seconds" in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/healthz", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["db_ok"] is True
    wait_for(lambda: any("duplicates skipped" in r.getMessage() for r in caplog.records), 10, "a progress line")
    line = next(r.getMessage() for r in caplog.records if "duplicates skipped" in r.getMessage())
    assert re.search(r"ingest: \d+ messages in \d+ s \(\d+/s\), new rows: .*labels \d+", line), line


def test_bad_messages_are_kept_and_counted_not_dropped(broker, pg_dsn, service):
    pub = Publisher(broker.port)
    good = label("line3-cam", "gate", 1)
    pub.send("edgelabel/line3-cam/gate/labels", "not json")
    pub.send("edgelabel/line3-cam/gate/labels", {**label("line3-cam", "gate", 2), "id": "not-a-uuid"})
    pub.send("edgelabel/line3-cam/gate/labels", {"id": str(uuid.uuid4())})  # no fields
    pub.send("edgelabel/line3-cam/gate/labels", good)
    pub.close()
    wait_for(lambda: count(pg_dsn, "SELECT count(*) FROM rejected_messages") == 3 and count(pg_dsn) == 1,
             30, "three rejected messages and the good record")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        errors = [r[0] for r in conn.execute("SELECT error FROM rejected_messages ORDER BY id")]
    assert any("uuid" in e for e in errors), errors
    assert service.health()["stored"]["rejected"] == 3


@pytest.mark.slow
def test_kill9_mid_stream_then_restart_loses_and_duplicates_nothing(tmp_path, broker, pg_dsn):
    n = 3000
    recs = [label(f"cam-{i % 3}", "line", i) for i in range(n)]
    worker = Worker(tmp_path, broker.port, pg_dsn, "ingest-1")
    pub = Publisher(broker.port)
    done = threading.Event()

    def stream():
        for i, rec in enumerate(recs):
            pub.send(f"edgelabel/{rec['device_id']}/line/labels", rec)
            if i % 100 == 99:
                time.sleep(0.05)
        done.set()

    threading.Thread(target=stream, daemon=True).start()
    wait_for(lambda: count(pg_dsn) >= 300, 60, "the first records")
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    stored_at_kill = count(pg_dsn)
    assert stored_at_kill < n, "the stream was over before the kill; the test proves nothing"
    done.wait(60)
    pub.close()
    # the same client id resumes the session the broker kept: what was not acknowledged comes again
    again = Worker(tmp_path, broker.port, pg_dsn, "ingest-1")
    try:
        wait_for(lambda: count(pg_dsn) == n, 90, f"all {n} records after the restart")
        time.sleep(0.5)
        assert count(pg_dsn) == n
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            ids = {str(r[0]) for r in conn.execute("SELECT id FROM records")}
        assert ids == {r["id"] for r in recs}
        assert count(pg_dsn, "SELECT count(*) FROM detections") == 2 * n
    finally:
        assert again.stop() == 0


def test_two_workers_in_one_group_split_the_load(tmp_path, broker, pg_dsn):
    n = 1000
    recs = [label(f"cam-{i % 4}", "line", i) for i in range(n)]
    a = Worker(tmp_path, broker.port, pg_dsn, "ingest-a", user="plant@")
    b = Worker(tmp_path, broker.port, pg_dsn, "ingest-b", user="plant@")
    try:
        pub = Publisher(broker.port)
        for rec in recs:
            pub.send(f"edgelabel/{rec['device_id']}/line/labels", rec)
        pub.close()
        wait_for(lambda: count(pg_dsn) == n, 60, f"{n} records")
        wait_for(lambda: a.stored() + b.stored() >= n, 10, "both workers' counters")
        assert a.stored() > 0 and b.stored() > 0, (a.stored(), b.stored())
        assert a.stored() + b.stored() == n, "each message went to one worker of the group"
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    for w in (a, b):
        log = w.log.read_text()
        assert "ingest: stopped (" in log and "ingest: connected to" in log
        assert SECRET not in log


# --- operations -----------------------------------------------------------------------------------------------


def test_a_database_that_is_not_there_shows_in_healthz_until_it_is(broker):
    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_DSN} ({exc})")
    name = f"ingest_test_{uuid.uuid4().hex[:12]}"
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    cfg = load_ingest_config(mqtt_url=f"mqtt://127.0.0.1:{broker.port}", db=dsn, http="127.0.0.1:0")
    svc = IngestService(cfg)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.last_error, 30, "the database error")
        assert name in svc.last_error and not svc.health()["ok"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/healthz", timeout=5)
        assert err.value.code == 503
        admin.execute(f"CREATE DATABASE {name}")
        wait_for(lambda: svc.health()["ok"], 60, "the worker to recover once the database exists")
        assert svc.schema_version is not None
    finally:
        svc.stop()
        thread.join(30)
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_systemd_unit_verifies_and_the_example_config_is_valid(monkeypatch):
    from edgelabel.ingest.config import load_ingest_config

    cfg = load_ingest_config(ROOT / "systemd" / "ingest.example.yaml")
    assert (cfg.mqtt.group, cfg.batch.max_rows) == ("edgelabel-ingest", 500)
    unit = (ROOT / "systemd" / "edgelabel-ingest.service").read_text()
    assert "edgelabel ingest -c /etc/edgelabel/ingest.yaml" in unit and "RestartPreventExitStatus=2" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "edgelabel-ingest.service"
        copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", unit, flags=re.M))
        proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "edgelabel-ingest.service" not in output, output


def test_a_stopped_workers_share_waits_in_its_session_and_arrives_when_it_returns(tmp_path, broker, pg_dsn):
    """Mosquitto keeps routing a share group's messages to a member whose session persists while it is away:
    nothing is lost, that share waits for the same client id (docs/ingest.md, "Workers and sessions")."""
    n = 200
    a = Worker(tmp_path, broker.port, pg_dsn, "ingest-a")
    b = Worker(tmp_path, broker.port, pg_dsn, "ingest-b")
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    try:
        pub = Publisher(broker.port)
        recs = [label("cam-1", "line", i) for i in range(n)]
        for rec in recs:
            pub.send("edgelabel/cam-1/line/labels", rec)
        pub.close()
        wait_for(lambda: a.stored() > 0, 30, "worker a to store its share")
        time.sleep(1.0)
        away = count(pg_dsn)
        assert away < n, "the broker gave the away worker's share to the other one: update docs/ingest.md"
        back = Worker(tmp_path, broker.port, pg_dsn, "ingest-b")
        try:
            wait_for(lambda: count(pg_dsn) == n, 60, f"all {n} records once b is back")
        finally:
            assert back.stop() == 0
    finally:
        assert a.stop() == 0
    assert count(pg_dsn, "SELECT count(DISTINCT id) FROM records") == n


def test_a_newer_schema_stops_the_worker_with_exit_1(broker, pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO schema_version (version, name) VALUES (99, '099_future.sql')")
    out = subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", "ingest", "--mqtt",
                          f"mqtt://127.0.0.1:{broker.port}", "--db", pg_dsn, "--http", "off"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "schema is version 99, newer than this edgelabel" in out.stderr and "upgrade edgelabel" in out.stderr


def test_bad_flags_exit_2_and_name_the_problem():
    out = subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", "ingest", "--mqtt", "mqtt://u:pw@h:1883",
                          "--db", "postgresql://x@h/db", "--http", "off"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "--mqtt: the URL holds a password; set EDGELABEL_MQTT_PASSWORD" in out.stderr and ":pw@" not in out.stderr


def test_records_land_in_monthly_partitions_and_an_id_stays_unique_across_them(broker, pg_dsn, service):
    nov = label("cam-1", "gate", 1, t0=1_796_083_000.0)  # 2026-11-30 UTC
    dec = label("cam-1", "gate", 2, t0=1_796_090_000.0)  # 2026-12-01 UTC
    assert (nov["captured_at"][:7], dec["captured_at"][:7]) == ("2026-11", "2026-12")
    # the same record again with another captured_at (a file whose mtime changed): still one row
    moved = {**nov, "captured_at": "2027-01-15T10:00:00.000Z", "captured_ts": 1_799_964_000.0}
    pub = Publisher(broker.port)
    for rec in (nov, dec, moved):
        pub.send("edgelabel/cam-1/gate/labels", rec)
    pub.close()
    wait_for(lambda: service.health()["stored"]["messages"] == 3, 30, "three messages")
    assert count(pg_dsn) == 2 and count(pg_dsn, "SELECT count(*) FROM detections") == 4
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        parts = sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'records'::regclass"))
        assert parts[:2] == ["records_2026_11", "records_2026_12"]
        assert count(pg_dsn, "SELECT count(*) FROM records_2026_11") == 1
        assert count(pg_dsn, "SELECT count(*) FROM detections_2026_12") == 2
        where = conn.execute("SELECT tableoid::regclass::text FROM records WHERE id = %s", (nov["id"],)).fetchone()[0]
        assert where == "records_2026_11"


def test_retention_drops_whole_months_past_the_setting(pg_dsn):
    from datetime import datetime, timezone

    from edgelabel.ingest.config import ingest_config_from_dict
    from edgelabel.ingest.db import Message, Writer, drop_old_partitions, migrate

    assert ingest_config_from_dict({"retention": {"months": 3}}).retention.months == 3
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        recs = [label("cam-1", "gate", i, t0=t) for i, t in
                enumerate((1_792_000_000.0, 1_796_083_000.0, 1_796_090_000.0))]  # 2026-10, 2026-11, 2026-12
        writer = Writer(conn, "edgelabel")
        result = writer.write([Message("edgelabel/cam-1/gate/labels", json.dumps(r).encode(), i + 1, 1)
                               for i, r in enumerate(recs)])
        assert result.inserted["labels"] == 3
        assert drop_old_partitions(conn, 0) == []
        dropped = drop_old_partitions(conn, 1, now=datetime(2027, 1, 10, tzinfo=timezone.utc))
        assert dropped == [f"{t}_2026_{m}" for t in ("alarms", "detections", "device_status", "records", "track_events")
                           for m in ("10", "11")]
        ids = {str(r[0]) for r in conn.execute("SELECT id FROM label_records")}
        assert ids == {recs[2]["id"]}
        assert count(pg_dsn, "SELECT count(*) FROM record_keys") == 1
        # a dropped month's record arriving again is stored again (its partition is made anew)
        writer.partitions.clear()
        again = writer.write([Message("edgelabel/cam-1/gate/labels", json.dumps(recs[0]).encode(), 9, 1)])
        assert again.inserted["labels"] == 1


def test_history_tables_move_into_monthly_partitions_in_place_and_retention_drops_them(pg_dsn):
    """Migration 003 on a database with version-2 rows: every row kept, in its month's partition."""
    from datetime import datetime, timezone

    from edgelabel.ingest.db import Message, Writer, drop_old_partitions, migrate, migrations

    old = [m for m in migrations() if m[0] <= 2]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with conn.transaction():  # a database at version 2, as an earlier edgelabel left it
            conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
            for version, name, text in old:
                conn.execute(text)
                conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
        recs = [label("cam-1", "gate", i, t0=t) for i, t in enumerate((1_792_000_000.0, 1_796_090_000.0))]
        evs = [track_event(r) for r in recs]
        for ev in evs:
            conn.execute("INSERT INTO track_events (id, type, device, at, event) VALUES (%s, %s, %s, %s, %s)",
                         (ev["id"], ev["type"], ev["device_id"], ev["at"], json.dumps(ev)))
        conn.execute("INSERT INTO alarms (device, at, active, alarms) VALUES ('cam-1', '2026-10-05T10:00:00Z', true, "
                     "'[]'), ('cam-1', '2026-12-01T00:00:00Z', false, '[]')")
        conn.execute("INSERT INTO device_status (device, status, received_at) VALUES ('cam-1', 'online', "
                     "'2026-10-05T10:00:00Z'), ('cam-1', 'offline', '2026-12-02T00:00:00Z')")
        assert migrate(conn) == len(migrations())
        parts = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('track_events'::regclass, 'alarms'::regclass, 'device_status'::regclass)")}
        assert parts == {f"{t}_2026_{m}" for t in ("track_events", "alarms", "device_status") for m in ("10", "12")}
        assert {str(r[0]) for r in conn.execute("SELECT id FROM events")} == {e["id"] for e in evs}
        assert count(pg_dsn, "SELECT count(*) FROM alarms_2026_10") == 1
        assert count(pg_dsn, "SELECT count(*) FROM device_status_2026_12") == 1
        # the same event again is stored once; an event without its time is rejected, not dropped
        writer = Writer(conn, "edgelabel")
        bad = {**evs[0], "id": str(uuid.uuid4()), "at": None}
        result = writer.write([Message("edgelabel/cam-1/events", json.dumps(e).encode(), i + 1, 1)
                               for i, e in enumerate([evs[0], evs[1], bad])])
        assert result.inserted["events"] == 0 and result.duplicates == 2 and result.rejected == 1
        err = conn.execute("SELECT error FROM rejected_messages").fetchone()[0]
        assert err.startswith("at: None is not an ISO 8601 time")
        dropped = drop_old_partitions(conn, 1, now=datetime(2027, 1, 10, tzinfo=timezone.utc))
        assert {"track_events_2026_10", "alarms_2026_10", "device_status_2026_10"} <= set(dropped)
        assert {str(r[0]) for r in conn.execute("SELECT id FROM track_events")} == {evs[1]["id"]}


def test_timescaledb_hypertables_when_the_extension_is_installed(pg_dsn):
    """The TimescaleDB path of migration 003: the history tables become hypertables, retention drops chunks."""
    from datetime import datetime, timezone

    from edgelabel.ingest.db import Message, Writer, drop_old_partitions, migrate, timescale

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        available = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()[0]
        if not available:
            migrate(conn)  # the other path: CREATE EXTENSION fails, plain partitions, nothing reports hypertables
            assert timescale(conn) == []
            pytest.skip("TimescaleDB extension not installed on this PostgreSQL server (declarative partitions used)")
        migrate(conn)
        assert timescale(conn) == ["alarms", "device_status", "track_events"]
        recs = [label("cam-1", "gate", i, t0=t) for i, t in enumerate((1_792_000_000.0, 1_796_090_000.0))]
        evs = [track_event(r) for r in recs]
        Writer(conn, "edgelabel").write([Message("edgelabel/cam-1/events", json.dumps(e).encode(), i + 1, 1)
                                         for i, e in enumerate(evs)])
        assert drop_old_partitions(conn, 1, now=datetime(2027, 1, 10, tzinfo=timezone.utc))
        assert {str(r[0]) for r in conn.execute("SELECT id FROM track_events")} == {evs[1]["id"]}


def test_the_real_daemon_on_shared_images_lands_in_the_database(tmp_path, broker, pg_dsn, service):
    """edgelabel run on a folder of real images -> Mosquitto -> ingest -> PostgreSQL, every record once."""
    images = sorted((ASSETS / "images").glob("*.jpg"))
    proc = run_edgelabel("run", "--source", str(ASSETS / "images"), "--model", str(ASSETS / "models" / "yolox_nano.onnx"),
                         "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--state-dir", str(tmp_path / "state"),
                         "--device", "line1-cam", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wait_for(lambda: count(pg_dsn) == len(images)
             and count(pg_dsn, "SELECT count(*) FROM sources WHERE status = 'finished'") == 1
             and count(pg_dsn, "SELECT count(*) FROM devices WHERE status = 'stopped'") == 1,
             60, f"{len(images)} records, the source finished and the device stopped")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT device, model, jsonb_array_length(detections), frame_key "
                            "FROM label_records").fetchall()
        assert {r[0] for r in rows} == {"line1-cam"} and {r[1] for r in rows} == {"yolox_nano"}
        assert sorted(Path(r[3]).name for r in rows) == [p.name for p in images]
        boxes = sum(r[2] for r in rows)
        assert boxes > 0 and count(pg_dsn, "SELECT count(*) FROM detections") == boxes
        persons = conn.execute("SELECT count(*) FROM detections WHERE label = 'person' AND score >= 0.3").fetchone()[0]
        assert persons > 0
    assert service.health()["stored"]["rejected"] == 0


def test_database_connection_killed_mid_stream_loses_nothing(broker, pg_dsn, service):
    """pg_terminate_backend on the worker's connection while records stream in: it reconnects, nothing is lost."""
    n = 2000
    recs = [label(f"cam-{i % 2}", "line", i) for i in range(n)]
    pub = Publisher(broker.port)
    for rec in recs[: n // 2]:
        pub.send(f"edgelabel/{rec['device_id']}/line/labels", rec)
    wait_for(lambda: count(pg_dsn) > 0, 30, "the first records")
    name = pg_dsn.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = %s", (name,)).fetchone()[0]
    assert killed >= 1
    for rec in recs[n // 2:]:
        pub.send(f"edgelabel/{rec['device_id']}/line/labels", rec)
    pub.close()
    wait_for(lambda: count(pg_dsn) == n, 60, f"all {n} records after the reconnect")
    assert count(pg_dsn, "SELECT count(*) FROM detections") == 2 * n
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert re.search(r'^edgelabel_ingest_errors_total\{stage="db"\} [1-9]', metrics, re.M), "the failure was not counted"
    assert service.health()["ok"] and "terminat" in (service.last_error or "")

"""The plant path under restarts: three appliances -> a broker -> two ingest workers -> PostgreSQL.

Everything is real and of the test's own: three ``MqttSink`` instances (the daemon's MQTT sink, with its
durable SQLite outbox that deletes a message only after the broker's PUBACK) publish label records, track
events and review decisions of three devices; a private Mosquitto 2 with persistence; two
``edgelabel ingest`` processes in one share group; and a PostgreSQL server of its own (``initdb`` +
``pg_ctl`` on a free port) so that it can be restarted.  While the stream runs, one worker is killed with
SIGKILL and started again, PostgreSQL is restarted (immediate mode: a crash for the clients), and the broker
is restarted.  Afterwards the ids in the database must equal the ids the sinks published, with no duplicate
and every review applied.

``test_a_broker_killed_before_its_autosave_forgets_what_it_had_acknowledged`` pins down the one window the
product does not control: Mosquitto keeps its queues in memory and writes them to disk only on its
autosave and on a clean shutdown (docs/fleet.md, "Broker restarts").
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgelabel.edge.config import MqttConfig
from edgelabel.edge.frame import Frame
from edgelabel.edge.sinks.mqtt import MqttSink
from tests.conftest import free_port
from tests.helpers import label_record
from tests.test_ingest import Worker, review, track_event, wait_for
from tests.test_mqtt_faults import HAVE_MOSQUITTO, ConfBroker

psycopg = pytest.importorskip("psycopg", reason="the ingest extra is not installed (pip install '.[ingest]')")

PG_BIN = Path(os.environ.get("EDGELABEL_PG_BIN", "/usr/lib/postgresql/15/bin"))
DEVICES = ("line1-cam", "line2-cam", "line3-cam")
PER_DEVICE = 600
IMAGE = np.zeros((72, 128, 3), np.uint8)

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed"),
              pytest.mark.skipif(not (PG_BIN / "pg_ctl").exists(),
                                 reason=f"PostgreSQL server binaries not found in {PG_BIN} (set EDGELABEL_PG_BIN)")]


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb, pg_ctl) on a free port, restartable at will.

    As root, the server runs as the ``postgres`` user (``initdb`` refuses root) in a folder it owns.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgelabel-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "server.log"
        self.runas: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.runas = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nshared_buffers = 64MB\nmax_connections = 20\n")
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        out = subprocess.run([*self.runas, str(PG_BIN / exe), *args], capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"{exe} {' '.join(args)} failed ({out.returncode}): {out.stderr or out.stdout}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def restart(self) -> None:
        """Immediate mode: every client connection is cut as in a crash, the server recovers from its WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.start()

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg():
    try:
        pg = PrivatePostgres()
    except (RuntimeError, OSError, KeyError) as exc:
        pytest.skip(f"cannot start a private PostgreSQL from {PG_BIN}: {exc}")
    try:
        yield pg
    finally:
        pg.close()


def persistent_broker(tmp_path: Path, port: int | None = None, autosave: str = "autosave_interval 1") -> ConfBroker:
    """Mosquitto as a plant broker should run: persistence on, no cap on queued messages."""
    store = tmp_path / "mosquitto-store"
    store.mkdir(exist_ok=True)
    return ConfBroker(tmp_path, f"allow_anonymous true\npersistence true\npersistence_location {store}/\n"
                                f"{autosave}\nmax_queued_messages 0\n", port=port)


def device_records(device: str, n: int) -> list:
    """The records the pipeline would build for ``n`` frames of one camera (two boxes each)."""
    out = []
    for i in range(n):
        ts = 1_796_500_000.0 + i / 15
        frame = Frame("cam1", i, IMAGE, ts, f"rtsp://10.0.0.5:554/stream1@{int(ts * 1e9)}", live=False)
        x = float(i % 800)
        rec = label_record(frame, [(0, 0.91, (x, 20.0, x + 100.0, 220.0)), (2, 0.55, (500.0, 300.0, 700.0, 420.0))],
                           device)
        tracked = dataclasses.replace(rec.detections[0], track_id=i // 10 + 1)
        out.append(dataclasses.replace(rec, detections=[tracked, rec.detections[1]]))
    return out


def test_three_appliances_two_workers_kill_restart_everything_every_record_once(tmp_path, private_pg):
    broker = persistent_broker(tmp_path).start()
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, prefix="edgelabel")
    # after a broker restart the appliances reconnect later than the workers (1 s): Mosquitto 2.0.x drops
    # what reaches a share group before a member has subscribed again (docs/fleet.md, "Broker restarts";
    # test_what_mosquitto_keeps_over_a_restart shows it)
    cfg.reconnect.initial = cfg.reconnect.max = 3.0
    sinks, workers = [], []
    try:
        dsn = private_pg.dsn
        workers = [Worker(tmp_path, broker.port, dsn, f"plant-w{k}") for k in (1, 2)]
        for device in DEVICES:
            (tmp_path / device).mkdir()
            sink = MqttSink(cfg, device, state_dir=tmp_path / device, sources=["cam1"])
            sink.open()
            sinks.append(sink)
        records = {d: device_records(d, PER_DEVICE) for d in DEVICES}
        reviewed: dict[str, int] = {}  # record id -> the version that must win
        events: set[str] = set()

        def feed(sink: MqttSink, recs: list) -> None:
            for i, rec in enumerate(recs):
                sink.write(rec, Frame("cam1", i, IMAGE, rec.captured_ts, rec.frame_key, live=False))
                doc = rec.to_dict()
                if i % 10 == 0:
                    ev = track_event(doc)
                    sink.events([ev])
                    events.add(ev["id"])
                if i % 50 == 25:  # two versions, the newer first: the older must not win
                    boxes = [[1.0, 2.0, 30.0 + i % 7, 40.0]]
                    assert sink.publish_review(review(doc, 2, "corrected", boxes))
                    assert sink.publish_review(review(doc, 1, "rejected", []))
                    reviewed[doc["id"]] = 2
                time.sleep(0.012)  # ~80 records/s per appliance: the stream runs through every fault

        feeders = [threading.Thread(target=feed, args=(s, records[s.device_id])) for s in sinks]
        for t in feeders:
            t.start()
        total = sum(len(r) for r in records.values())

        def in_db(sql: str = "SELECT count(*) FROM records") -> int:
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
                    return conn.execute(sql).fetchone()[0]
            except psycopg.OperationalError:
                return -1

        # 1. SIGKILL a worker while it holds a batch (received, not yet committed), start it again
        wait_for(lambda: workers[0].stored() > 100, 30, "worker 1 to store its first batches")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # aim for a batch in hand; a full-speed stream nearly always is
            h = health_of(workers[0]) or {}
            if h.get("lag_s", 0) > 0 or h.get("waiting", 0) > 0:
                break
            time.sleep(0.005)
        workers[0].proc.send_signal(signal.SIGKILL)
        workers[0].proc.wait(10)
        killed_at = in_db()
        workers[0] = Worker(tmp_path, broker.port, dsn, "plant-w1")

        # 2. PostgreSQL goes down hard and comes back
        wait_for(lambda: in_db() > killed_at + 100, 30, "rows after the worker's restart")
        private_pg.restart()

        # 3. the broker restarts (SIGTERM: it saves its sessions and queues; same port, same store)
        wait_for(lambda: in_db() > killed_at + 300, 60, "rows after the database's restart")
        broker.stop()
        time.sleep(0.5)
        broker = persistent_broker(tmp_path, port=broker.port).start()

        for t in feeders:
            t.join(120)
        for sink in sinks:
            wait_for(lambda s=sink: s.backlog().pending == 0, 60, f"{sink.device_id}'s outbox to drain")
            sink.close()
        try:
            wait_for(lambda: in_db() == total and in_db("SELECT count(*) FROM track_events") == len(events), 60,
                     f"{total} records and {len(events)} events in the database")
        except AssertionError:
            raise AssertionError(missing_report(dsn, records, events)) from None
        time.sleep(1.0)  # redeliveries still on their way would show up as extra rows now

        with psycopg.connect(dsn, autocommit=True) as conn:
            published = {r.id for recs in records.values() for r in recs}
            stored = [str(r[0]) for r in conn.execute("SELECT id FROM records")]
            assert len(stored) == len(set(stored)) == total, "a record is stored twice"
            assert set(stored) == published
            assert conn.execute("SELECT count(*) FROM record_keys").fetchone()[0] == total
            assert conn.execute("SELECT count(*) FROM detections").fetchone()[0] == 2 * total
            ev_ids = {str(r[0]) for r in conn.execute("SELECT id FROM track_events")}
            assert ev_ids == events
            rows = dict(conn.execute("SELECT id::text, review_version FROM records "
                                     "WHERE review_version IS NOT NULL").fetchall())
            assert rows == reviewed, "every review applied, the newer version winning"
            states = {r[0] for r in conn.execute("SELECT review_state FROM label_records WHERE review_state IS NOT NULL")}
            assert states == {"corrected"}
            assert conn.execute("SELECT count(*) FROM reviews").fetchone()[0] == 2 * len(reviewed)
            per_device = dict(conn.execute("SELECT device, count(*) FROM records GROUP BY 1").fetchall())
            assert per_device == {d: PER_DEVICE for d in DEVICES}
        # the faults happened and were seen: the killed worker's successor and the others reconnected
        logs = "".join(w.log.read_text() for w in workers)
        assert "database" in logs and "ERROR" in logs, "the database restart was not noticed by any worker"
        assert "connection lost" in logs, "the broker restart was not noticed by any worker"
    finally:
        for sink in sinks:
            sink.close()
        for w in workers:
            w.stop()
        broker.stop()


def missing_report(dsn: str, records: dict, events: set[str]) -> str:
    """What did not arrive, by device and frame index: the failure message of the end-to-end test."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = {str(r[0]) for r in conn.execute("SELECT id FROM records")}
        stored_ev = {str(r[0]) for r in conn.execute("SELECT id FROM track_events")}
    lines = []
    for device, recs in records.items():
        gone = [r.frame_index for r in recs if r.id not in stored]
        lines.append(f"{device}: {len(recs) - len(gone)} of {len(recs)} records stored; missing frames {gone[:40]}"
                     f"{' ...' if len(gone) > 40 else ''}")
    lines.append(f"events: {len(stored_ev & events)} of {len(events)} stored")
    return "\n".join(lines)


def health_of(worker: Worker) -> dict | None:
    from tests.test_ingest import health

    return health(worker.http)


def _session(port: int, client_id: str, subscribe: str | None, got: list[str]) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    ready = threading.Event()
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, m: got.append(m.payload.decode())
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    if subscribe:
        c.subscribe(subscribe, qos=1)
        assert ready.wait(5)
    return c


def _publish(port: int, n: int) -> None:
    """n QoS 1 messages from an appliance, each acknowledged by the broker (its outbox would delete them)."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="appliance", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish("edgelabel/line1-cam/cam1/labels", str(i), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    assert all(i.is_published() for i in infos), "the broker acknowledged every message"
    pub.disconnect()
    pub.loop_stop()


@pytest.mark.parametrize("case, subscription, expected", [
    # queued for an absent worker, then a clean restart (SIGTERM): saved and delivered, shared queues included
    ("queued-then-sigterm", "$share/plant/edgelabel/#", 500),
    # queued, then a crash before the autosave: the session and its queue are gone
    ("queued-then-sigkill", "$share/plant/edgelabel/#", 0),
    # a clean restart, then published before the worker is back: a restored shared subscription is not
    # routed to until a member subscribes again, so these are acknowledged and dropped ...
    ("restart-then-published", "$share/plant/edgelabel/#", 0),
    # ... while a plain (non-shared) persistent subscription queues them
    ("restart-then-published", "edgelabel/#", 500),
])
def test_what_mosquitto_keeps_over_a_restart(tmp_path, case, subscription, expected):
    """Mosquitto 2.0.x (/usr/sbin/mosquitto): what a restart does to a worker's session (docs/fleet.md).

    A worker with a persistent session (fixed client id, clean_start off, an expiry) subscribes, then is
    away; an appliance publishes 500 QoS 1 messages and gets a PUBACK for each, so its outbox has deleted
    them.  The broker runs with persistence on and the default autosave (every 1800 s).  The worker comes
    back without subscribing again: what it receives is what its session kept.  The two zero rows are the
    broker's windows the product cannot close; docs/fleet.md says how a plant is run around them.
    """
    broker = persistent_broker(tmp_path, autosave="autosave_interval 1800").start()
    got: list[str] = []
    try:
        c = _session(broker.port, "worker-1", subscription, got)
        c.disconnect()
        c.loop_stop()
        assert broker.proc is not None
        if case.startswith("queued"):
            _publish(broker.port, 500)
        if case == "queued-then-sigkill":
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait(10)
        else:
            broker.stop()
        broker = persistent_broker(tmp_path, port=broker.port, autosave="autosave_interval 1800").start()
        if case == "restart-then-published":
            _publish(broker.port, 500)
        c = _session(broker.port, "worker-1", None, got)  # no SUBSCRIBE: only what the session kept
        if expected:  # what the session kept may take a while to arrive on a loaded machine: wait for it all
            deadline = time.monotonic() + 30
            while len(set(got)) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(1.5)  # then anything beyond it (or, expecting none, anything at all) would show up
        c.disconnect()
        c.loop_stop()
        assert len(set(got)) == expected, f"{len(set(got))} of 500 came back"
    finally:
        broker.stop()

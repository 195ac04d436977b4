"""Fault tests against real Mosquitto processes: outages, kill -9, a refused login, TLS, the Last Will.

What proves "nothing lost" here: the daemon keeps every undelivered message in
its outbox, so whatever a broker outage or a kill interrupts is published again
later.  The consumer is the shipped ``examples/consumer.py`` (persistent session,
QoS 1, de-duplication by id into a JSONL file); the tests read its file and
check that every frame of every source is there exactly once and in order.
For the broker outage the broker is restarted *with* persistence, as in
production, so the consumer's session (and what is queued for it) survives.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelabel.edge.config import MqttConfig, TlsConfig
from edgelabel.edge.sinks.mqtt import MqttSink
from tests.conftest import Broker, free_port
from tests.helpers import ROOT, edgelabel, run_edgelabel
from tests.test_mqtt_sink import Relay, make_record, storage_frame

DEVICE = "fault-dev"
PREFIX = "el"
CONSUMER = ROOT / "examples" / "consumer.py"
HAVE_MOSQUITTO = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")


class ConfBroker(Broker):
    """A private Mosquitto with extra configuration (persistence, passwords, TLS listeners)."""

    def __init__(self, workdir: Path, conf: str = "", port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.conf = conf
        self.log_path = workdir / f"mosquitto-{self.port}.log"

    def start(self) -> ConfBroker:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        # started as root, mosquitto drops to user "mosquitto", who cannot read the test's private tmp files
        conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n{self.conf}\n")
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, "-c", str(conf), "-v"], stdout=log, stderr=log)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited; see {self.log_path}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class ConsumerProc:
    """examples/consumer.py as a separate process, and its JSONL output."""

    def __init__(self, workdir: Path, port: int, client_id: str = "fault-consumer") -> None:
        self.out = workdir / "consumer.jsonl"
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(CONSUMER), "--port", str(port), "--prefix", PREFIX, "--device", DEVICE,
             "--client-id", client_id, "--out", str(self.out), "--state", str(workdir / "consumer.sqlite")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        self._subscribed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._subscribed.wait(15), "consumer did not subscribe:\n" + "".join(self.stderr)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "subscribed to" in line:
                self._subscribed.set()

    def messages(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_bytes().splitlines()
        return [json.loads(ln) for ln in lines if ln.endswith(b"}")]

    def labels(self) -> list[dict[str, Any]]:
        return [m["message"] for m in self.messages() if m["topic"].endswith("/labels")]

    def wait_labels(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            count = len(self.labels())
            if count >= n:
                return count
            time.sleep(0.2)
        return count

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        return "".join(self.stderr)


class Watcher:
    """A plain subscriber (optionally with a login) that keeps (topic, payload, retain)."""

    def __init__(self, port: int, topic: str, username: str | None = None, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert ready.wait(10), "watcher could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def payloads(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return bool(pred())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(tmp_path: Path, assets: Path, port: int, sources: dict, **mqtt_extra: Any) -> Path:
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources,
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": PREFIX, "qos": 1, "keepalive": 5,
                 "reconnect": {"initial": 0.3, "max": 2}, "stats_interval": 2, **mqtt_extra},
        "dataset": {"enabled": False},
    }
    path = tmp_path / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))
    return path


def outbox_depth(state_dir: Path) -> int:
    """Rows in the daemon's outbox (default path: inside state_dir), read beside the running daemon (WAL)."""
    path = state_dir / "outbox.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except sqlite3.Error:
        return -1


def assert_every_frame_once_in_order(labels: list[dict[str, Any]], expected: dict[str, int]) -> None:
    ids = [r["id"] for r in labels]
    assert len(ids) == len(set(ids)), "the consumer wrote a record twice"
    for source, n in expected.items():
        got = [r["frame_index"] for r in labels if r["source"] == source]
        missing = sorted(set(range(n)) - set(got))
        assert not missing, f"{source}: {len(missing)} frame(s) lost, e.g. {missing[:10]}"
        assert got == list(range(n)), f"{source}: out of order"


def wait_proc(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"edgelabel did not finish in {timeout} s\n{err[-4000:]}") from None


# ---------------------------------------------------------------------- broker outage and kill -9 (daemon)


@pytest.mark.slow
def test_broker_down_20s_mid_run_every_record_arrives_once_in_order(tmp_path: Path, assets: Path) -> None:
    broker = ConfBroker(tmp_path, f"allow_anonymous true\npersistence true\npersistence_location {tmp_path}/\n"
                                  "max_queued_messages 0\n").start()
    consumer = ConsumerProc(tmp_path, broker.port)
    videos = assets / "videos"
    sources = {"bottles": {"uri": str(videos / "bottle-detection.mp4"), "fps": 35},
               "cars": {"uri": str(videos / "cars.mp4"), "fps": 10}}
    expected = {"bottles": 1189, "cars": 268}  # 1457 frames
    cfg = write_config(tmp_path, assets, broker.port, sources)
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert consumer.wait_labels(100, 90) >= 100, "no labels before the outage"
        broker.stop()  # SIGTERM: mosquitto saves the consumer's session
        down = time.monotonic()
        while time.monotonic() - down < 21:
            assert proc.poll() is None, "the daemon must keep running while the broker is down"
            time.sleep(0.5)
        waiting = outbox_depth(tmp_path / "state")
        assert waiting > 100, f"only {waiting} message(s) waited in the outbox during a 21 s outage"
        assert proc.poll() is None, "the run ended during the outage: too short to prove the replay"
        broker.start()
        out, err = wait_proc(proc, 240)
        assert proc.returncode == 0, err[-4000:]
        total = sum(expected.values())
        assert consumer.wait_labels(total, 60) >= total, f"{len(consumer.labels())}/{total} labels arrived"
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        consumer_log = consumer.stop()
        broker.stop()
    assert_every_frame_once_in_order(consumer.labels(), expected)
    assert outbox_depth(tmp_path / "state") == 0
    assert "unreachable" in err and "again after" in err  # the outage was reported and its end too
    events = [m["message"] for m in consumer.messages() if m["topic"].endswith("/events")]
    assert any(e["type"] == "new" for e in events) and len({e["id"] for e in events}) == len(events)
    assert "Traceback" not in consumer_log


@pytest.mark.slow
def test_sigkill_while_publishing_then_restart_loses_nothing(tmp_path: Path, assets: Path, broker: Broker) -> None:
    consumer = ConsumerProc(tmp_path, broker.port)
    sources = {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "fps": 30}}
    cfg = write_config(tmp_path, assets, broker.port, sources)
    state = tmp_path / "state"
    proc = edgelabel("run", "-c", str(cfg))
    assert broker.proc is not None
    frozen = False
    try:
        assert consumer.wait_labels(50, 90) >= 50
        # freeze the broker: the daemon goes on committing records that nobody acknowledges
        os.kill(broker.proc.pid, signal.SIGSTOP)
        frozen = True
        deadline = time.monotonic() + 20
        while outbox_depth(state) < 15 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert outbox_depth(state) >= 15
        proc.kill()  # SIGKILL while publishing
        proc.wait(10)
        committed_unacked = outbox_depth(state)
        os.kill(broker.proc.pid, signal.SIGCONT)
        frozen = False
        res = run_edgelabel("run", "-c", str(cfg), timeout=180)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "from a previous run will be sent first" in res.stderr
        assert consumer.wait_labels(268, 60) >= 268, f"{len(consumer.labels())}/268 labels"
        time.sleep(0.5)
    finally:
        if frozen:
            os.kill(broker.proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
        consumer.stop()
    assert committed_unacked >= 15
    assert_every_frame_once_in_order(consumer.labels(), {"cars": 268})
    assert outbox_depth(state) == 0


def test_last_will_offline_when_the_daemon_is_killed(tmp_path: Path, assets: Path, broker: Broker) -> None:
    watcher = Watcher(broker.port, f"{PREFIX}/{DEVICE}/status")
    sources = {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5}}
    proc = edgelabel("run", "-c", str(write_config(tmp_path, assets, broker.port, sources)))
    try:
        assert watcher.wait_for(lambda: b"online" in watcher.payloads("/status"), 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert watcher.wait_for(lambda: watcher.payloads("/status")[-1:] == [b"offline"], 12)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    late = Watcher(broker.port, f"{PREFIX}/{DEVICE}/status")  # retained for whoever looks later
    assert late.wait_for(lambda: late.payloads("/status") == [b"offline"], 5)
    late.close()


# ---------------------------------------------------------------------- order across reconnects (in-process)


def drop_links(relay: Relay) -> None:
    """Close every connection through the relay (like a broker restart for its clients); keep listening."""
    socks, relay._socks = relay._socks, []
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def test_link_cut_mid_stream_replays_in_order_without_loss(tmp_path: Path, broker: Broker, caplog) -> None:
    """The sink's link dies with ~100 messages in flight; paho re-sends them first, nothing overtakes them."""
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt")
    relay = Relay(broker.port).start()
    watcher = Watcher(broker.port, f"{PREFIX}/#")
    cfg = MqttConfig(host="127.0.0.1", port=relay.port, prefix=PREFIX, keepalive=5)
    cfg.reconnect.initial = cfg.reconnect.max = 0.2
    sink = MqttSink(cfg, DEVICE, state_dir=tmp_path)
    sink.open()
    records = [make_record(src, i) for i in range(1500) for src in ("cam1", "cam2")]
    try:
        assert watcher.wait_for(lambda: sink.status()["connected"], 5)
        done = threading.Event()

        def pipeline() -> None:
            for rec in records:
                sink.write(rec, storage_frame(rec))
            done.set()

        threading.Thread(target=pipeline, daemon=True).start()
        assert watcher.wait_for(lambda: len(watcher.payloads("/labels")) >= 600, 30)
        drop_links(relay)  # both sides see the connection drop mid-stream; the relay accepts the reconnect
        assert done.wait(60)
        assert watcher.wait_for(lambda: len({json.loads(p)["id"] for p in watcher.payloads("/labels")}) >= 3000, 60)
        sink.flush()
        assert sink.status()["pending"] == 0 and sink.status()["dropped"] == 0
    finally:
        sink.close()
        watcher.close()
        relay.close()
    assert any("again after" in r.getMessage() for r in caplog.records)  # it did reconnect
    seen: set[str] = set()
    first: list[dict[str, Any]] = []
    for p in watcher.payloads("/labels"):
        doc = json.loads(p)
        if doc["id"] not in seen:  # what a consumer de-duplicating by id keeps
            seen.add(doc["id"])
            first.append(doc)
    assert_every_frame_once_in_order(first, {"cam1": 1500, "cam2": 1500})


# ---------------------------------------------------------------------- authentication


def make_password_file(path: Path, user: str, password: str) -> None:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("mosquitto_passwd not installed")
    subprocess.run([exe, "-b", "-c", str(path), user, password], check=True, capture_output=True)
    path.chmod(0o600)


def test_wrong_password_is_reported_retried_and_recovers(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)  # paho's own debug log included: no password anywhere
    secret, wrong = "s3cret-right-7421", "wr0ng-pass-9713"
    pwfile = tmp_path / "passwd"
    make_password_file(pwfile, "edge", secret)
    make_password_file(tmp_path / "watcher-pw", "watcher", "w")
    pwfile.write_text(pwfile.read_text() + (tmp_path / "watcher-pw").read_text())
    broker = ConfBroker(tmp_path, f"allow_anonymous false\npassword_file {pwfile}\npersistence false\n").start()
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, prefix=PREFIX, username="edge", password=wrong)
    cfg.reconnect.initial = cfg.reconnect.max = 0.3
    sink = MqttSink(cfg, DEVICE)
    sink.open()
    watcher = Watcher(broker.port, f"{PREFIX}/#", "watcher", "w")
    try:
        rec = make_record("cam1", 0)
        sink.write(rec, storage_frame(rec))
        assert watcher.wait_for(lambda: "not authorised" in (sink.status()["last_error"] or ""), 10)
        st = sink.status()
        assert st["connected"] is False and "user 'edge'" in st["last_error"] and st["pending"] == 1
        time.sleep(1.5)
        attempts = broker.log_text().count("not authorised")
        assert attempts >= 3, f"the sink should keep retrying ({attempts} attempt(s) seen by the broker)"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "edgelabel.edge.sinks.mqtt"]
        assert len(errors) == 1 and "not authorised" in errors[0] and "mqtt.password" in errors[0]
        assert "not authorised" in sink.status()["last_error"]  # later disconnects do not hide the cause
        # the operator fixes the broker's password file: the next retry gets in, the stored record is delivered
        make_password_file(pwfile, "edge", wrong)
        pwfile.write_text(pwfile.read_text() + (tmp_path / "watcher-pw").read_text())
        broker.reload()
        assert watcher.wait_for(lambda: len(watcher.payloads("/labels")) == 1, 15)
        assert sink.status()["connected"] is True
    finally:
        sink.close()
        watcher.close()
        broker.stop()
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert wrong not in everything and secret not in everything


def test_daemon_with_a_wrong_password_file_keeps_running_and_says_why(tmp_path: Path, assets: Path) -> None:
    pwfile = tmp_path / "passwd"
    make_password_file(pwfile, "edge", "right-one-5821")
    broker = ConfBroker(tmp_path, f"allow_anonymous false\npassword_file {pwfile}\npersistence false\n").start()
    (tmp_path / "mqtt-password").write_text("wrong-one-3390\n")
    sources = {"cars": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5}}
    cfg = write_config(tmp_path, assets, broker.port, sources, username="${EDGE_MQTT_USER}",
                       password_file=str(tmp_path / "mqtt-password"))
    proc = edgelabel("run", "-c", str(cfg), env={"EDGE_MQTT_USER": "edge"})
    try:
        deadline = time.monotonic() + 60
        while broker.log_text().count("not authorised") < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        assert broker.log_text().count("not authorised") >= 3  # it keeps retrying
        assert proc.poll() is None  # and keeps labeling
        proc.send_signal(signal.SIGTERM)
        _, err = wait_proc(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()
    assert proc.returncode == 75  # stopped with labels left in the outbox (EXIT_UNDELIVERED)
    errors = [ln for ln in err.splitlines() if " ERROR " in ln and "edgelabel.edge.sinks.mqtt:" in ln]
    assert len(errors) == 1 and "not authorised" in errors[0] and "user 'edge'" in errors[0], err[-3000:]
    assert "wrong-one-3390" not in err and "right-one-5821" not in err
    assert "stay in the outbox" in err  # nothing was delivered, nothing was lost


# ---------------------------------------------------------------------- TLS


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write(name: str, obj: Any) -> Path:
        p = d / name
        if isinstance(obj, x509.Certificate):
            p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))
        return p

    def cert(subject: str, pub: Any, issuer: x509.Name, signer: Any, ca: bool, san: list | None = None,
             usage: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        return b.sign(signer, hashes.SHA256())

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgelabel test CA")])
    ca = cert("edgelabel test CA", ca_key.public_key(), ca_name, ca_key, ca=True)
    srv_key, cli_key = key(), key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv = cert("localhost", srv_key.public_key(), ca_name, ca_key, ca=False, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cli = cert(DEVICE, cli_key.public_key(), ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other_key = key()
    other = cert("some other CA", other_key.public_key(),
                 x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")]), other_key, ca=True)
    return {"ca": write("ca.pem", ca), "server": write("server.pem", srv), "server_key": write("server.key", srv_key),
            "client": write("client.pem", cli), "client_key": write("client.key", cli_key), "other_ca": write("other.pem", other)}


def test_tls_with_ca_and_client_certificate_delivers_labels(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls_port = free_port()
    broker = ConfBroker(tmp_path, f"allow_anonymous true\npersistence false\n"
                                  f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
                                  f"keyfile {pki['server_key']}\nrequire_certificate true\n").start()
    watcher = Watcher(broker.port, f"{PREFIX}/#")  # the plain listener, for the test's eyes only
    good = MqttSink(MqttConfig(host="127.0.0.1", port=tls_port, prefix=PREFIX, tls=TlsConfig(
        ca=str(pki["ca"]), cert=str(pki["client"]), key=str(pki["client_key"]))), DEVICE)
    bad_cfg = MqttConfig(host="127.0.0.1", port=tls_port, prefix=PREFIX, client_id="untrusting",
                         tls=TlsConfig(ca=str(pki["other_ca"]), cert=str(pki["client"]), key=str(pki["client_key"])))
    bad_cfg.reconnect.initial = bad_cfg.reconnect.max = 0.3
    bad = MqttSink(bad_cfg, "other-dev")
    good.open()
    bad.open()
    try:
        records = [make_record("cam1", i) for i in range(20)]
        for rec in records:
            good.write(rec, storage_frame(rec))
            bad.write(rec, storage_frame(rec))
        assert watcher.wait_for(lambda: len(watcher.payloads(f"{DEVICE}/cam1/labels")) >= 20, 10)
        assert watcher.wait_for(lambda: bad.status()["last_error"] is not None, 5)
        assert good.status()["connected"] and not bad.status()["connected"]
        assert bad.status()["pending"] == 20  # kept, not lost, while the server is not trusted
    finally:
        good.close()
        bad.close()
        watcher.close()
        broker.stop()
    assert [json.loads(p)["id"] for p in watcher.payloads(f"{DEVICE}/cam1/labels")] == [r.id for r in records]
    assert not watcher.payloads("other-dev/cam1/labels")

"""Delivery promises of the daemon as a real process: real Mosquitto, real model, real footage.

What a consumer relies on and these tests check on the wire: a source's ``finished`` comes after its
last label; a clean stop leaves no source looking ``online``; the closing line's counters add up; a
finite job does not exit with labels still in the outbox while the broker may come back; a TLS
failure is named as such.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import pytest

from edgelabel.edge.config import MqttConfig, TlsConfig
from edgelabel.edge.daemon import EXIT_UNDELIVERED
from edgelabel.edge.sinks.mqtt import MqttSink
from tests.conftest import ROOT, Broker, free_port
from tests.helpers import Collector, edgelabel, run_edgelabel
from tests.test_mqtt_faults import ConfBroker
from tests.test_mqtt_sink import Relay, make_record, storage_frame

DEVICE = "deliv-dev"
PREFIX = "el"
HAVE_MOSQUITTO = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")


def short_video(src: Path, dst: Path, frames: int) -> Path:
    """The first ``frames`` frames of a real clip, re-encoded (a shorter job, same footage)."""
    cap = cv2.VideoCapture(str(src))
    ok, img = cap.read()
    assert ok, f"cannot read {src}"
    h, w = img.shape[:2]
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
    n = 0
    while ok and n < frames:
        out.write(img)
        n += 1
        ok, img = cap.read()
    out.release()
    cap.release()
    return dst


def write_config(tmp_path: Path, assets: Path, port: int, sources: dict[str, Any], **mqtt_extra: Any) -> Path:
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(tmp_path / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "conf": 0.3},
        "sources": sources,
        "mqtt": {"host": "127.0.0.1", "port": port, "prefix": PREFIX, "qos": 1,
                 "reconnect": {"initial": 0.2, "max": 0.5}, **mqtt_extra},
        "dataset": {"enabled": False},
    }
    path = tmp_path / "edgelabel.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def image_folder(tmp_path: Path, assets: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for img in sorted((assets / "images").glob("*.jpg")):
        shutil.copy(img, folder / img.name)
    return folder


def test_finished_follows_the_last_label_of_its_source(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """Every label of a video and of a folder reaches the broker before that source's ``finished``."""
    clip = short_video(assets / "videos" / "cars.mp4", tmp_path / "cars-40.mp4", 40)
    folder = image_folder(tmp_path, assets)
    n_images = len(list(folder.iterdir()))
    col = Collector(broker.port, f"{PREFIX}/#")
    cfg = write_config(tmp_path, assets, broker.port, {"clip": {"uri": str(clip)}, "photos": {"uri": str(folder)}})
    try:
        res = run_edgelabel("run", "-c", str(cfg), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"stopped", 10)
        with col._lock:
            wire = [(t, p) for t, p, _ in col.messages]
    finally:
        col.close()
    for source, expected in (("clip", 40), ("photos", n_images)):
        labels = [i for i, (t, _) in enumerate(wire) if t == f"{PREFIX}/{DEVICE}/{source}/labels"]
        finished = [i for i, (t, p) in enumerate(wire) if t == f"{PREFIX}/{DEVICE}/{source}/status" and p == b"finished"]
        assert len(labels) == expected, f"{source}: {len(labels)}/{expected} labels"
        assert len(finished) == 1, f"{source}: {len(finished)} 'finished' messages"
        late = [i for i in labels if i > finished[0]]
        assert not late, f"{source}: {len(late)} label(s) arrived after its 'finished'"
        events = [i for i, (t, p) in enumerate(wire) if t.endswith("/events") and json.loads(p)["source"] == source]
        assert all(i < finished[0] for i in events), f"{source}: track events after its 'finished'"
    clip_events = [json.loads(p) for t, p in wire if t.endswith("/events") and json.loads(p)["source"] == "clip"]
    assert any(e["type"] == "end" and e["end_reason"] == "finished" for e in clip_events)  # the tracks ended first


CLOSED = re.compile(r"MQTT: closed \((\d+) published = (\d+) acknowledged \+ (\d+) QoS 0 .*?\+ (\d+) refused by the broker "
                    r"\+ (\d+) unacknowledged; (\d+) dropped, (\d+) left in the outbox\)")


def test_closing_counters_reconcile_after_a_clean_run(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """published = acknowledged + QoS 0 + refused + unacknowledged, and a clean run leaves nothing unaccounted."""
    folder = image_folder(tmp_path, assets)
    col = Collector(broker.port, f"{PREFIX}/#")
    cfg = write_config(tmp_path, assets, broker.port, {"photos": {"uri": str(folder)}})
    try:
        res = run_edgelabel("run", "-c", str(cfg), timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"stopped", 10)
        with col._lock:
            qos0_topics = [t for t, _, _ in col.messages if t.endswith(("/stats", "/snapshot"))]
    finally:
        col.close()
    found = CLOSED.search(res.stderr)
    assert found, "no closing line with the reconciled counters:\n" + res.stderr[-2000:]
    published, acked, qos0, refused, unacked, dropped, left = map(int, found.groups())
    assert published == acked + qos0 + refused + unacked
    assert (refused, unacked, dropped, left) == (0, 0, 0, 0)
    assert qos0 == len(qos0_topics) >= 1  # the final stats message: QoS 0 has no acknowledgement


def retained_statuses(port: int, sources: list[str]) -> dict[str, bytes | None]:
    """What a subscriber arriving now reads on the device and source status topics (retained values)."""
    late = Collector(port, f"{PREFIX}/{DEVICE}/#")
    try:
        topics = {"device": f"{PREFIX}/{DEVICE}/status", **{s: f"{PREFIX}/{DEVICE}/{s}/status" for s in sources}}
        late.wait_for(lambda: all(late.last(t) is not None for t in topics.values()), 3)
        return {name: late.last(t) for name, t in topics.items()}
    finally:
        late.close()


def test_clean_stop_leaves_no_source_online(tmp_path: Path, assets: Path, broker: Broker) -> None:
    """SIGTERM: every running source's retained status becomes ``stopped``; a finished one keeps ``finished``."""
    folder = image_folder(tmp_path, assets)
    sources = {"cam": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5},
               "photos": {"uri": str(folder)}}
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(write_config(tmp_path, assets, broker.port, sources)))
    try:
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/photos/status") == b"finished"
                            and len(col.on("/cam/labels")) >= 3, 60), "no labels from the looping video"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert proc.returncode == 0, err[-3000:]
    assert retained_statuses(broker.port, ["cam", "photos"]) == {
        "device": b"stopped", "cam": b"stopped", "photos": b"finished"}


def test_a_clean_close_stops_a_source_that_never_reported(tmp_path: Path, broker: Broker) -> None:
    """A SIGTERM that comes before a slow camera has opened: its previous run's retained ``online`` must not
    outlive this run (seen when a loaded machine opened the source after the stop was asked for)."""
    stale = Collector(broker.port, f"{PREFIX}/#")
    stale.client.publish(f"{PREFIX}/{DEVICE}/cam/status", b"online", qos=1, retain=True).wait_for_publish(5)
    stale.close()
    sink = MqttSink(MqttConfig(host="127.0.0.1", port=broker.port, prefix=PREFIX), DEVICE, state_dir=tmp_path,
                    sources=["cam"])
    sink.open()
    try:
        deadline = time.time() + 10
        while not sink.status().get("connected") and time.time() < deadline:
            time.sleep(0.05)
        assert sink.status().get("connected"), sink.status().get("last_error")
    finally:
        sink.close()
    assert retained_statuses(broker.port, ["cam"]) == {"device": b"stopped", "cam": b"stopped"}


def test_after_kill_9_the_device_last_will_marks_source_statuses_stale(tmp_path: Path, assets: Path,
                                                                       broker: Broker) -> None:
    """kill -9 cannot update the sources: they keep ``online`` and the device's ``offline`` (Last Will) wins.

    docs/mqtt.md tells consumers to read a source's status only while the device is ``online``; the next
    start publishes every source's state again.
    """
    sources = {"cam": {"uri": str(assets / "videos" / "cars.mp4"), "loop": True, "fps": 5}}
    cfg = write_config(tmp_path, assets, broker.port, sources, keepalive=5)
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert col.wait_for(lambda: len(col.on("/cam/labels")) >= 3, 60), "no labels from the looping video"
        proc.kill()
        proc.wait(10)
        assert col.wait_for(lambda: col.last(f"{PREFIX}/{DEVICE}/status") == b"offline", 15)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert retained_statuses(broker.port, ["cam"]) == {"device": b"offline", "cam": b"online"}
    # the next start and a clean stop put things right
    col = Collector(broker.port, f"{PREFIX}/#")
    proc = edgelabel("run", "-c", str(cfg))
    try:
        assert col.wait_for(lambda: len(col.on("/cam/labels")) >= 1 and col.last(f"{PREFIX}/{DEVICE}/status") == b"online", 60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    assert proc.returncode == 0, err[-3000:]
    assert retained_statuses(broker.port, ["cam"]) == {"device": b"stopped", "cam": b"stopped"}


class Daemon:
    """``edgelabel run`` as a process whose log lines can be waited for while it runs."""

    def __init__(self, cfg: Path) -> None:
        self.proc = edgelabel("run", "-c", str(cfg))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_log(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                return text in self.log()
            time.sleep(0.05)
        return False

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"edgelabel did not exit within {timeout} s\n{self.log()[-3000:]}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def outbox_rows(state_dir: Path) -> int:
    with sqlite3.connect(f"file:{state_dir / 'outbox.sqlite'}?mode=ro", uri=True, timeout=2) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


WAITING = "message(s) left in the outbox, broker unreachable since"


def test_a_finished_job_waits_for_the_broker_and_delivers_before_exiting(tmp_path: Path, assets: Path,
                                                                         broker: Broker) -> None:
    """Broker unreachable while a folder job runs; it comes back while the daemon waits: all delivered, exit 0."""
    folder = image_folder(tmp_path, assets)
    n_images = len(list(folder.iterdir()))
    relay_port = free_port()  # the daemon's way to the broker: closed until the relay starts
    col = Collector(broker.port, f"{PREFIX}/#")
    cfg = write_config(tmp_path, assets, relay_port, {"photos": {"uri": str(folder)}}, drain_timeout=60)
    daemon = Daemon(cfg)
    relay = Relay(broker.port, port=relay_port)
    try:
        assert daemon.wait_log(WAITING, 60), "the daemon did not wait for the broker:\n" + daemon.log()[-3000:]
        assert daemon.proc.poll() is None
        time.sleep(1.0)  # still waiting, not just slow to exit
        assert daemon.proc.poll() is None, daemon.log()[-3000:]
        relay.start()  # the broker is reachable again
        code = daemon.wait(30)
        assert col.wait_for(lambda: len(col.on("/photos/labels")) >= n_images, 5)
    finally:
        daemon.kill()
        relay.close()
        col.close()
    assert code == 0, daemon.log()[-3000:]
    assert len({json.loads(p)["id"] for p in col.on("/photos/labels")}) == n_images
    assert "outbox empty: every message delivered" in daemon.log()
    assert outbox_rows(tmp_path / "state") == 0


def test_an_unreachable_broker_ends_the_wait_with_the_undelivered_exit_status(tmp_path: Path, assets: Path,
                                                                              broker: Broker) -> None:
    """mqtt.drain_timeout bounds the wait; exit 75 keeps the labels in the outbox; the next start sends them."""
    folder = image_folder(tmp_path, assets)
    n_images = len(list(folder.iterdir()))
    relay_port = free_port()
    cfg = write_config(tmp_path, assets, relay_port, {"photos": {"uri": str(folder)}}, drain_timeout=1.5)
    daemon = Daemon(cfg)
    try:
        code = daemon.wait(60)
    finally:
        daemon.kill()
    assert code == EXIT_UNDELIVERED == 75, daemon.log()[-3000:]
    assert WAITING in daemon.log() and "mqtt.drain_timeout (1.5 s) reached" in daemon.log()
    assert outbox_rows(tmp_path / "state") >= n_images  # labels, kept
    # someone starts it again with the broker back: the job is done, the outbox is delivered
    col = Collector(broker.port, f"{PREFIX}/#")
    relay = Relay(broker.port, port=relay_port).start()
    try:
        res = run_edgelabel("run", "-c", str(cfg), timeout=60)
        assert col.wait_for(lambda: len(col.on("/photos/labels")) >= n_images, 5)
    finally:
        relay.close()
        col.close()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "from a previous run will be sent first" in res.stderr
    assert outbox_rows(tmp_path / "state") == 0


def test_sigterm_ends_the_wait_for_the_broker(tmp_path: Path, assets: Path) -> None:
    folder = image_folder(tmp_path, assets)
    cfg = write_config(tmp_path, assets, free_port(), {"photos": {"uri": str(folder)}}, drain_timeout=300)
    daemon = Daemon(cfg)
    try:
        assert daemon.wait_log(WAITING, 60), daemon.log()[-3000:]
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.wait(20)  # not drain_timeout
    finally:
        daemon.kill()
    assert code == EXIT_UNDELIVERED, daemon.log()[-3000:]
    assert "stop requested while" in daemon.log()
    assert outbox_rows(tmp_path / "state") > 0


def test_systemd_restarts_an_exit_with_undelivered_labels_but_does_not_call_it_a_failure() -> None:
    unit = (ROOT / "systemd" / "edgelabel.service").read_text()
    values = {k: v for k, _, v in (ln.partition("=") for ln in unit.splitlines() if "=" in ln and ln[0] not in "#;")}
    assert "75" in values["RestartForceExitStatus"].split()
    assert "75" in values["SuccessExitStatus"].split()
    assert "75" not in values["RestartPreventExitStatus"].split()


def make_tls_files(d: Path, server_names: list[str]) -> dict[str, Path]:
    """A CA, a server certificate for ``server_names`` (DNS names) signed by it, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))

    def pem(path: Path, cert: x509.Certificate) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, other_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = build("test CA", ca_key, "test CA", ca_key, True).sign(ca_key, hashes.SHA256())
    other = build("other CA", other_key, "other CA", other_key, True).sign(other_key, hashes.SHA256())
    srv = (build(server_names[0], srv_key, "test CA", ca_key, False)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in server_names]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    key_path = d / "server.key"
    key_path.write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    return {"ca": pem(d / "ca.pem", ca), "other_ca": pem(d / "other-ca.pem", other),
            "server": pem(d / "server.pem", srv), "server_key": key_path}


def first_mqtt_error(caplog: pytest.LogCaptureFixture, sink: MqttSink) -> str:
    def found() -> str | None:
        return next((r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "edgelabel.edge.sinks.mqtt"),
                    None)
    deadline = time.monotonic() + 10
    while found() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return found() or ""


def test_a_tls_failure_is_named_not_reported_as_an_unreachable_broker(tmp_path: Path, caplog) -> None:
    """Wrong CA: "certificate verify failed", naming mqtt.tls.ca; wrong host: "hostname mismatch", naming mqtt.host."""
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt")
    files = make_tls_files(tmp_path, ["broker.plant.example"])
    broker = ConfBroker(tmp_path, f"allow_anonymous true\npersistence false\ncafile {files['ca']}\n"
                                  f"certfile {files['server']}\nkeyfile {files['server_key']}\n").start()

    def sink(ca: Path, host: str, insecure: bool = False) -> MqttSink:
        cfg = MqttConfig(host=host, port=broker.port, prefix=PREFIX, tls=TlsConfig(ca=str(ca), insecure=insecure))
        cfg.reconnect.initial = cfg.reconnect.max = 0.3
        return MqttSink(cfg, DEVICE)

    try:
        wrong_ca = sink(files["other_ca"], "127.0.0.1")
        wrong_ca.open()
        rec = make_record("cam1", 0)
        wrong_ca.write(rec, storage_frame(rec))
        try:
            error = first_mqtt_error(caplog, wrong_ca)
            status = wrong_ca.status()
        finally:
            wrong_ca.close()
        assert "certificate verify failed" in error and "mqtt.tls.ca" in error and str(files["other_ca"]) in error, error
        assert "is the broker running" not in error
        assert "certificate verify failed" in (status["last_error"] or "") and status["pending"] == 1

        caplog.clear()
        wrong_host = sink(files["ca"], "127.0.0.1")  # the certificate names broker.plant.example only
        wrong_host.open()
        try:
            error = first_mqtt_error(caplog, wrong_host)
        finally:
            wrong_host.close()
        assert "hostname mismatch" in error and "mqtt.host '127.0.0.1'" in error, error
        assert "is the broker running" not in error

        caplog.clear()
        insecure = sink(files["ca"], "127.0.0.1", insecure=True)  # the right CA, the host name not checked
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        insecure.open()
        try:
            assert wait_connected(insecure, 10), insecure.status()["last_error"]
        finally:
            insecure.close()
        assert any("mqtt.tls.insecure is true" in w for w in warnings), warnings
    finally:
        broker.stop()


def test_a_refused_client_certificate_and_a_plain_port_are_named_as_tls_problems(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edgelabel.edge.sinks.mqtt")
    files = make_tls_files(tmp_path, ["localhost"])
    needs_cert = ConfBroker(tmp_path, f"allow_anonymous true\npersistence false\ncafile {files['ca']}\n"
                                      f"certfile {files['server']}\nkeyfile {files['server_key']}\n"
                                      "require_certificate true\n").start()
    plain = ConfBroker(tmp_path, "allow_anonymous true\npersistence false\n").start()
    try:
        for port, expected in ((needs_cert.port, ["rejected the client certificate", "mqtt.tls.cert"]),
                               (plain.port, ["TLS handshake failed", "is a TLS listener"])):
            caplog.clear()
            cfg = MqttConfig(host="localhost", port=port, prefix=PREFIX, tls=TlsConfig(ca=str(files["ca"])))
            cfg.reconnect.initial = cfg.reconnect.max = 0.3
            sink = MqttSink(cfg, DEVICE)
            sink.open()
            try:
                error = first_mqtt_error(caplog, sink)
                time.sleep(1.0)  # a few retries: still one ERROR, and no raw socket errors from the client library
                errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            finally:
                sink.close()
            assert all(e in error for e in expected) and "is the broker running" not in error, error
            assert len(errors) == 1, [r.getMessage() for r in errors]
    finally:
        needs_cert.stop()
        plain.stop()


def wait_connected(sink: MqttSink, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.status()["connected"]:
            return True
        time.sleep(0.05)
    return False

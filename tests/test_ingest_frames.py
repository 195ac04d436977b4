"""Frames into the plant store, and the central export, against real services.

Appliances are the real web app over a real dataset (the dataset sink writes the JPEGs and its index), served
over HTTP on a free port; ingest runs in-process or as a real ``edgelabel ingest`` process; the broker is a
private Mosquitto and the database a fresh PostgreSQL database.  Every request an appliance answers is counted,
so "fetched once" and the rate limit are measured where the requests arrive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_ingest
from tests.conftest import ROOT, free_port
from tests.test_ingest import Publisher, Worker, health, review, wait_for

psycopg = pytest.importorskip("psycopg", reason="the ingest extra is not installed (pip install '.[ingest]')")

from edgelabel.edge.config import CaptureConfig, CaptureSection, DatasetConfig, config_from_dict  # noqa: E402
from edgelabel.edge.records import LabelRecord  # noqa: E402
from edgelabel.edge.sinks.dataset import DatasetSink  # noqa: E402
from edgelabel.ingest.framestore import frame_location  # noqa: E402
from edgelabel.web.app import create_app  # noqa: E402
from edgelabel.web.sink import WebSink  # noqa: E402
from tests.helpers import NAMES, label_record  # noqa: E402
from tests.test_review import FakePipeline, camera_frame, frame_dets  # noqa: E402

pg_dsn = test_ingest.pg_dsn  # the fixture: a fresh database, dropped afterwards
ALL = CaptureSection(live=CaptureConfig(review="all"), storage=CaptureConfig(review="all"))


class Appliance:
    """One appliance's web app over its own real dataset, on a real HTTP port; counts the frame requests."""

    def __init__(self, tmp: Path, device: str, n: int, token: str, offset: int = 0, tls: bool = False) -> None:
        self.device, self.token = device, token
        self.root = tmp / device / "ds"
        cfg = config_from_dict({
            "device_id": device, "state_dir": str(tmp / device / "state"), "model": {"path": "m.onnx"},
            "sources": {"cam": {"uri": "v4l2:///dev/video9"}}, "mqtt": {"enabled": False},
            "dataset": {"path": str(self.root)},
            "web": {"enabled": True, "operators": {"plant": {"role": "viewer", "token": token}},
                    **({"tls": "auto"} if tls else {})},
        }, base_dir=tmp / device)
        self.ssl = None
        if tls:  # the appliance's own self-signed certificate (web.tls: auto)
            from edgelabel.web.tls import server_context, tls_files

            self.cert, key = tls_files(cfg)  # type: ignore[misc]
            self.ssl = server_context(self.cert, key)
        self.sink = DatasetSink(DatasetConfig(path=str(self.root), capture=ALL, min_free_bytes=0), self.root, NAMES,
                                "yolo11n_int8")
        self.sink.open()
        self.recs: list[LabelRecord] = []
        for i in range(offset, offset + n):
            frame = camera_frame(i)
            rec = label_record(frame, frame_dets(i), device)
            self.sink.prepare(rec, frame)
            self.sink.write(rec, frame)
            self.recs.append(rec)
        self.sink.flush()
        assert all(r.frame_sha256 for r in self.recs)
        app = create_app(cfg, FakePipeline(cfg, [self.sink]), WebSink(cfg),
                         test_config={"TESTING": True, "EDGELABEL_TOKEN": "admin-" + token, "SECRET_KEY": "k" * 40})
        self.requests: list[tuple[float, str, int]] = []  # (monotonic time, path, status)
        self._lock = threading.Lock()

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")

            def start(status: str, headers: Any, exc_info: Any = None) -> Any:
                if path.startswith("/api/dataset/frames/"):
                    with self._lock:
                        self.requests.append((time.monotonic(), path.rsplit("/", 1)[-1], int(status[:3])))
                return start_response(status, headers, exc_info)

            return app(environ, start)

        self._wsgi = counting
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.serve()

    def serve(self) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True, ssl_context=self.ssl)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def unplug(self) -> None:
        """The appliance goes off the network: its port refuses connections."""
        self.server.shutdown()
        self.server.server_close()

    def fetches(self, record_id: str) -> int:
        with self._lock:
            return sum(1 for _, rid, _ in self.requests if rid == record_id)

    def file(self, rec: LabelRecord) -> Path:
        return self.root / str(rec.frame_path)

    def close(self) -> None:
        self.unplug()
        self.sink.close()


@pytest.fixture
def appliances(tmp_path: Path) -> Iterator[list[Appliance]]:
    made: list[Appliance] = []

    def make(device: str, n: int, token: str, offset: int = 0, tls: bool = False) -> Appliance:
        made.append(Appliance(tmp_path, device, n, token, offset, tls))
        return made[-1]

    yield make  # type: ignore[misc]
    for a in made:
        a.close()


def frames_rows(dsn: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return {str(r["record_id"]): r for r in cur.execute("SELECT * FROM frames").fetchall()}


def ingest_yaml(tmp: Path, broker_port: int, dsn: str, frames: dict[str, Any]) -> Path:
    import yaml

    path = tmp / f"ingest-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": broker_port, "group": "plant"},
                                    "database": {"dsn": dsn}, "batch": {"max_rows": 50},
                                    "progress_interval": 0.5, "frames": frames}))
    return path


def publish(port: int, recs: list[dict[str, Any]], reviews: list[dict[str, Any]] = ()) -> None:
    pub = Publisher(port)
    for r in recs:
        pub.send(f"edgelabel/{r['device_id']}/{r['source']}/labels", r)
    for rv in reviews:
        pub.send(f"edgelabel/{rv['device_id']}/review", rv)
    pub.close()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_frames_are_fetched_once_verified_stored_and_failures_listed_then_exported(
        tmp_path, broker, pg_dsn, appliances, monkeypatch):
    """Two appliances, each with its own viewer token: every frame fetched once and verified; a frame changed
    on the appliance, one deleted there and one whose record names other bytes are failed with their reason
    (listed by the command, counted in /metrics and /healthz); one already in the store is not downloaded; the
    per-appliance rate holds; then the central export merges both appliances with the reviewed boxes."""
    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    a = appliances("line1-cam", 8, "viewer-token-line1-0123456789")
    b = appliances("line2-cam", 5, "viewer-token-line2-9876543210", offset=100)
    monkeypatch.setenv("LINE1_TOKEN", a.token)
    monkeypatch.setenv("LINE2_TOKEN", b.token)
    nas = tmp_path / "nas"
    rate = 4.0
    cfg_path = ingest_yaml(tmp_path, broker.port, pg_dsn, {
        "enabled": True, "store": "folder", "folder": str(nas), "rate": rate, "workers": 2, "batch": 4,
        "backoff_min": 0.2, "backoff_max": 1.0, "max_attempts": 3,
        "appliances": {a.device: {"url": a.url, "token": "${LINE1_TOKEN}"},
                       b.device: {"url": b.url, "token": "${LINE2_TOKEN}"}}})
    recs = [r.to_dict() for r in a.recs + b.recs]
    changed, deleted, lying = a.recs[2], b.recs[1], a.recs[5]
    a.file(changed).write_bytes(b"not the labeled pixels")  # the appliance refuses it (404)
    deleted_bytes = b.file(deleted).read_bytes()
    b.file(deleted).unlink()  # rotated out (404)
    lie = next(r for r in recs if r["id"] == lying.id)
    lie["frame_sha256"] = hashlib.sha256(b"other").hexdigest()  # the appliance serves bytes that do not match
    pre = a.recs[0]  # already in the store (a run killed after the write): never downloaded
    pre_loc = frame_location(pre.device_id, pre.source, str(pre.frame_sha256), "jpg")
    (nas / pre_loc).parent.mkdir(parents=True)
    shutil.copyfile(a.file(pre), nas / pre_loc)
    corrected = a.recs[3]
    fix = review(corrected.to_dict(), 2, "corrected", [[1.0, 2.0, 30.0, 40.0]])

    cfg = load_ingest_config(cfg_path, mqtt_url=f"mqtt://127.0.0.1:{broker.port}", db=pg_dsn,
                             client_id="ingest-frames", http="127.0.0.1:0")
    svc = IngestService(cfg)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.health()["ok"], 30, "ingest to connect")
        t0 = time.monotonic()
        publish(broker.port, recs, [fix])
        wait_for(lambda: len(frames_rows(pg_dsn)) == len(recs) and all(
            r["status"] != "pending" for r in frames_rows(pg_dsn).values()), 60, "every frame fetched or failed")
        elapsed = time.monotonic() - t0
        rows = frames_rows(pg_dsn)
        failed = {rid: r for rid, r in rows.items() if r["status"] == "failed"}
        assert set(failed) == {changed.id, deleted.id, lying.id}, failed
        assert "no longer matches" in failed[changed.id]["last_error"]
        assert "no such frame" in failed[deleted.id]["last_error"] or "no longer there" in failed[deleted.id]["last_error"]
        assert "sha256 mismatch" in failed[lying.id]["last_error"]
        for app_ in (a, b):
            for rec in app_.recs:
                row = rows[rec.id]
                # once per frame, failures included (a 404 or a mismatch is final); none for the one already there
                assert app_.fetches(rec.id) == (0 if rec.id == pre.id else 1), rec.id
                if row["status"] == "fetched":
                    assert row["location"] == frame_location(rec.device_id, rec.source, str(rec.frame_sha256), "jpg")
                    stored = (nas / row["location"]).read_bytes()
                    assert hashlib.sha256(stored).hexdigest() == rec.frame_sha256
                    assert stored == app_.file(rec).read_bytes()
        assert not list(nas.rglob("*.part")), "a temporary file was left in the store"
        # the rate per appliance (loose: the machine is shared): 7 requests to line1 take >= 6 / rate seconds
        times = sorted(t for t, _, _ in a.requests)
        assert len(times) == 7 and times[-1] - times[0] >= (len(times) - 1) / rate * 0.8, (times, elapsed)
        # counted and shown
        wait_for(lambda: (svc.health().get("frames") or {}).get("failed") == 3, 15, "the failed count in /healthz")
        h = svc.health()["frames"]
        assert h["fetched"] == len(recs) - 3 and h["this_run"]["already_stored"] == 1 and h["this_run"]["failed"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'edgelabel_ingest_frames_total{result="failed"} 3.0' in metrics
        assert 'edgelabel_ingest_frame_rows{status="failed"} 3.0' in metrics
        # the view shows where each frame is (columns appended to label_records)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            view = dict(conn.execute("SELECT id::text, frame_status FROM label_records").fetchall())
        assert view[changed.id] == "failed" and view[b.recs[0].id] == "fetched"
        # the command lists the failed ones with their reasons; tokens appear nowhere
        listed = run_cli("ingest", "frames", "--failed", "--db", pg_dsn, "--json")
        assert listed.returncode == 0, listed.stderr
        assert {r["record_id"] for r in json.loads(listed.stdout)} == set(failed)
        log_text = "\n".join(m for m in (listed.stdout, listed.stderr))
        assert a.token not in log_text and b.token not in log_text

        # the deleted frame comes back on the appliance (restored from a backup): requeued, fetched
        b.file(deleted).write_bytes(deleted_bytes)
        again = run_cli("ingest", "frames", "--requeue", "--device", b.device, "--db", pg_dsn)
        assert again.returncode == 0 and "requeued 1" in again.stdout, again.stdout + again.stderr
        wait_for(lambda: frames_rows(pg_dsn)[deleted.id]["status"] == "fetched", 30, "the requeued frame fetched")
        assert b.fetches(deleted.id) == 2
    finally:
        svc.stop()
        thread.join(30)
    assert not thread.is_alive()

    # --- the central export over both appliances ---------------------------------------------------------
    out = tmp_path / "export-yolo"
    res = run_cli("export", "--db", pg_dsn, "--frames", str(nas), "--format", "yolo", str(out))
    assert res.returncode == 0, res.stderr
    assert "exported 11 image(s)" in res.stdout and "from 2 appliance(s)" in res.stdout and "2 record(s) not" in res.stdout
    assert "export:" in res.stderr  # progress and the records left out are in the log
    images = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert len(images) == 11 and len({p.split("__")[0] for p in images}) == 2
    manifest = json.loads((out / "edgelabel-export.json").read_text())
    assert {m["record_id"] for m in manifest["not_exported"]} == {changed.id, lying.id}
    assert manifest["devices"] == {a.device: 6, b.device: 5}
    fixed = next(p for p in images if corrected.id[:8] in p)
    assert (out / "labels" / "train" / (Path(fixed).stem + ".txt")).read_text().split() == \
        ["7", f"{15.5 / corrected.width:.6f}", f"{21 / corrected.height:.6f}", f"{29 / corrected.width:.6f}",
         f"{38 / corrected.height:.6f}"]
    other = next(p for p in images if a.recs[4].id[:8] in p)
    assert len((out / "labels" / "train" / (Path(other).stem + ".txt")).read_text().splitlines()) == 2  # the model's
    for name in images:
        data = (out / "images" / "train" / name).read_bytes()
        rec = next(r for r in a.recs + b.recs if r.id[:8] in name)
        assert hashlib.sha256(data).hexdigest() == rec.frame_sha256
    # the same run again gives the same names (deterministic)
    out2 = tmp_path / "export-coco"
    res = run_cli("export", "--db", pg_dsn, "--frames", str(nas), "--format", "coco", str(out2))
    assert res.returncode == 0, res.stderr
    from pycocotools.coco import COCO

    coco = COCO(str(out2 / "annotations" / "instances_default.json"))
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == images
    img = next(i for i in coco.dataset["images"] if i["edgelabel_record_id"] == corrected.id)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
    assert img["edgelabel_review_state"] == "corrected" and [x["bbox"] for x in anns] == [[1.0, 2.0, 29.0, 38.0]]
    assert anns[0]["category_id"] == 8
    # asked wrong: a clear line and exit 2
    bad = run_cli("export", "--db", pg_dsn, "--frames", str(nas), "--format", "voc", str(tmp_path / "v"))
    assert bad.returncode == 2 and "writes yolo or coco" in bad.stderr
    bad = run_cli("export", "--db", pg_dsn, "--frames", str(nas), "--format", "yolo", str(out))
    assert bad.returncode == 2 and "--overwrite" in bad.stderr
    bad = run_cli("export", "--db", pg_dsn, "--frames", str(tmp_path / "no-nas"), "--format", "yolo", str(tmp_path / "y"))
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
    # a password on the command line (readable by every local user): refused, PGPASSWORD named
    bad = run_cli("export", "--db", "postgresql://plant:s3cret-pw@127.0.0.1/x", "--frames", str(nas), "--format", "yolo",
                  str(tmp_path / "p"))
    assert bad.returncode == 2 and "PGPASSWORD" in bad.stderr and "s3cret-pw" not in bad.stderr


def test_frames_config_errors_name_the_field(monkeypatch):
    from edgelabel.ingest.config import ConfigError, ingest_config_from_dict

    with pytest.raises(ConfigError) as err:
        ingest_config_from_dict({"frames": {"enabled": "maybe", "store": "ftp", "rate": 0, "colour": 1,
                                            "url": "https://admin:pw@{device}:8080",
                                            "appliances": {"line1": {"url": "ftp://x", "tokn": "t"}},
                                            "s3": {"secure": "perhaps"}}})
    text = "\n".join(err.value.problems)
    for expected in ("frames.enabled: expected true or false", "frames.store: 'ftp' is not one of folder, s3",
                     "frames.rate: 0.0 is below the minimum", "frames.colour: unknown setting",
                     "frames.url: holds user info", "frames.appliances.line1.url: expected http(s)://",
                     "frames.appliances.line1.tokn: unknown setting", "frames.s3.secure: expected true or false"):
        assert expected in text, (expected, text)
    assert ":pw@" not in text  # a password in a URL is never repeated
    with pytest.raises(ConfigError) as err:
        ingest_config_from_dict({"frames": {"enabled": True, "store": "s3", "s3": {"endpoint": "https://minio:9000"}}})
    text = "\n".join(err.value.problems)
    assert "frames.s3.bucket: missing" in text and "frames.s3.endpoint: give host[:port] without a scheme" in text
    assert "frames.url: missing" in text
    monkeypatch.setenv("LINE1_TOKEN", "t0ken")
    cfg = ingest_config_from_dict({"frames": {"enabled": True, "folder": "/mnt/nas", "url": "https://{device}.plant:8080",
                                              "token": "default-token",
                                              "appliances": {"line1": {"token": "${LINE1_TOKEN}"}}}})
    assert cfg.frames.appliance("line1") == ("https://line1.plant:8080", "t0ken")
    assert cfg.frames.appliance("line2") == ("https://line2.plant:8080", "default-token")
    assert not ingest_config_from_dict({}).frames.enabled


@pytest.mark.faults
def test_a_killed_fetcher_resumes_without_fetching_again_what_it_stored(tmp_path, broker, pg_dsn, appliances):
    """``edgelabel ingest`` as a process, killed with SIGKILL mid-way: after the restart every frame gets
    stored, and none that was stored before the kill is requested again (the store is content-addressed and a
    claimed frame's lease runs out)."""
    a = appliances("line3-cam", 12, "viewer-token-line3-0123456789")
    nas = tmp_path / "nas"
    cfg_path = ingest_yaml(tmp_path, broker.port, pg_dsn, {
        "enabled": True, "folder": str(nas), "rate": 3.0, "workers": 1, "batch": 2, "lease": 2.0,
        "url": "http://127.0.0.1:1/{device}", "token": a.token,
        "appliances": {a.device: {"url": a.url}}})
    worker = Worker(tmp_path, broker.port, pg_dsn, "ingest-k", extra=("-c", str(cfg_path)))
    try:
        publish(broker.port, [r.to_dict() for r in a.recs])
        # the NAS is not mounted yet: nothing is fetched (nor written on the local disk), /healthz says why
        wait_for(lambda: "is not a folder" in str(((health(worker.http) or {}).get("frames") or {}).get("last_error")),
                 30, "the missing frame folder in /healthz")
        assert not a.requests and not nas.exists()
        nas.mkdir()
        wait_for(lambda: sum(r["status"] == "fetched" for r in frames_rows(pg_dsn).values()) >= 4, 60,
                 "a few frames fetched")
        worker.proc.kill()
        worker.proc.wait(10)
        before = {rid for rid, r in frames_rows(pg_dsn).items() if r["status"] == "fetched"}
        assert 4 <= len(before) < 12, "the kill came too late to test a resume; lower frames.rate"
        worker = Worker(tmp_path, broker.port, pg_dsn, "ingest-k", extra=("-c", str(cfg_path)))
        wait_for(lambda: all(r["status"] == "fetched" for r in frames_rows(pg_dsn).values())
                 and len(frames_rows(pg_dsn)) == 12, 60, "every frame fetched after the restart")
    finally:
        worker.stop()
    for rec in a.recs:
        n = a.fetches(rec.id)
        assert n == 1 if rec.id in before else 1 <= n <= 2, (rec.id, n)  # 2: in flight when killed
    assert sum(a.fetches(r.id) for r in a.recs) <= 12 + 2
    for row in frames_rows(pg_dsn).values():
        assert hashlib.sha256((nas / row["location"]).read_bytes()).hexdigest() == row["frame_sha256"]
    logs = "".join(p.read_text() for p in tmp_path.glob("ingest-ingest-k-*.log"))
    assert "frames: fetching into folder" in logs and a.token not in logs


def _moto_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("no S3-compatible server to test against: moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    log = open(tmp / "moto.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited: {(tmp / 'moto.log').read_text()}")
            time.sleep(0.2)
    proc.kill()
    pytest.fail("moto_server did not listen within 30 s")


def test_frames_into_an_s3_bucket_and_the_export_reads_them_from_there(tmp_path, broker, pg_dsn, appliances,
                                                                        monkeypatch):
    """store: s3 against a real S3-compatible server (moto_server on a free port): objects keyed by content, the
    sha256 in their metadata, a second pass downloads nothing, and the central export reads the bucket."""
    pytest.importorskip("minio", reason="the minio client is not installed (pip install '.[ingest]')")
    from minio import Minio

    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    proc, port = _moto_server(tmp_path)
    try:
        a = appliances("line4-cam", 4, "viewer-token-line4-0123456789")
        monkeypatch.setenv("S3_KEY", "AKIAEXAMPLE")
        monkeypatch.setenv("S3_SECRET", "s3-secret-never-logged")
        frames = {"enabled": True, "store": "s3", "rate": 50.0,
                  "s3": {"endpoint": f"127.0.0.1:{port}", "bucket": "plant-frames", "access_key": "${S3_KEY}",
                         "secret_key": "${S3_SECRET}", "secure": False, "region": "us-east-1", "prefix": "edgelabel"},
                  "appliances": {a.device: {"url": a.url, "token": a.token}}}
        cfg_path = ingest_yaml(tmp_path, broker.port, pg_dsn, frames)
        cfg = load_ingest_config(cfg_path, client_id="ingest-s3", http="127.0.0.1:0")
        svc = IngestService(cfg)
        thread = threading.Thread(target=svc.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: svc.health()["ok"], 30, "ingest to connect")
            publish(broker.port, [r.to_dict() for r in a.recs])
            wait_for(lambda: len(frames_rows(pg_dsn)) == 4 and all(
                r["status"] == "fetched" for r in frames_rows(pg_dsn).values()), 60, "the frames in the bucket")
        finally:
            svc.stop()
            thread.join(30)
        client = Minio(f"127.0.0.1:{port}", access_key="AKIAEXAMPLE", secret_key="s3-secret-never-logged",
                       secure=False, region="us-east-1")
        for rec in a.recs:
            key = "edgelabel/" + frame_location(rec.device_id, rec.source, str(rec.frame_sha256), "jpg")
            stat = client.stat_object("plant-frames", key)
            assert {k.lower(): v for k, v in stat.metadata.items()}["x-amz-meta-sha256"] == rec.frame_sha256
            resp = client.get_object("plant-frames", key)
            assert hashlib.sha256(resp.read()).hexdigest() == rec.frame_sha256
            resp.close()
            assert a.fetches(rec.id) == 1
        # requeue everything by hand: the objects are there, nothing is downloaded again
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE frames SET status = 'pending', location = NULL, next_try_at = now()")
        svc = IngestService(load_ingest_config(cfg_path, client_id="ingest-s3", http="127.0.0.1:0"))
        thread = threading.Thread(target=svc.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: all(r["status"] == "fetched" for r in frames_rows(pg_dsn).values()), 30, "resume")
        finally:
            svc.stop()
            thread.join(30)
        assert all(a.fetches(rec.id) == 1 for rec in a.recs)
        out = tmp_path / "out"
        res = run_cli("export", "--ingest-config", str(cfg_path), "--db", pg_dsn, "--format", "yolo", str(out))
        assert res.returncode == 0, res.stderr
        assert "exported 4 image(s)" in res.stdout and "s3-secret-never-logged" not in res.stderr + res.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_refused_token_fails_after_max_attempts_and_an_unreachable_appliance_keeps_its_frames(
        tmp_path, broker, pg_dsn, appliances, caplog):
    """A wrong viewer token: each try costs an attempt, then the frame is failed with the reason.  An appliance
    off the network: backed off as a whole, its frames stay pending without using attempts, and are fetched
    once it is back."""
    import logging

    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    caplog.set_level(logging.INFO, logger="edgelabel.ingest")
    c = appliances("line5-cam", 2, "viewer-token-line5-0123456789")
    d = appliances("line6-cam", 3, "viewer-token-line6-0123456789", offset=50)
    d.unplug()
    wrong = "wrong-token-never-logged-42"
    nas = tmp_path / "nas"
    nas.mkdir()
    cfg_path = ingest_yaml(tmp_path, broker.port, pg_dsn, {
        "enabled": True, "folder": str(nas), "rate": 50.0, "max_attempts": 3, "backoff_min": 0.2,
        "backoff_max": 1.0, "appliances": {c.device: {"url": c.url, "token": wrong},
                                           d.device: {"url": d.url, "token": d.token}}})
    svc = IngestService(load_ingest_config(cfg_path, client_id="ingest-r", http="127.0.0.1:0"))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.health()["ok"], 30, "ingest to connect")
        publish(broker.port, [r.to_dict() for r in c.recs + d.recs])
        wait_for(lambda: len(frames_rows(pg_dsn)) == 5 and all(
            frames_rows(pg_dsn)[r.id]["status"] == "failed" for r in c.recs), 30, "the refused frames failed")
        rows = frames_rows(pg_dsn)
        for rec in c.recs:
            assert rows[rec.id]["attempts"] == 3 and c.fetches(rec.id) == 3
            assert "gave up after 3 attempts" in rows[rec.id]["last_error"] and "401" in rows[rec.id]["last_error"]
            assert "viewer token of line5-cam" in rows[rec.id]["last_error"]
        backed = wait_for(lambda: (svc.health()["frames"] or {}).get("appliances_backed_off"), 10, "the backoff")
        assert d.device in backed and "refused" in str(backed[d.device]["error"]).lower()
        for rec in d.recs:
            assert rows[rec.id]["status"] == "pending" and rows[rec.id]["attempts"] == 0
        d.serve()  # back on the network
        wait_for(lambda: all(frames_rows(pg_dsn)[r.id]["status"] == "fetched" for r in d.recs), 30,
                 "the frames of the appliance that came back")
        assert all(frames_rows(pg_dsn)[r.id]["attempts"] == 1 and d.fetches(r.id) == 1 for r in d.recs)
    finally:
        svc.stop()
        thread.join(30)
    assert "cannot be reached" in caplog.text and "reachable again" in caplog.text
    assert wrong not in caplog.text and d.token not in caplog.text


def test_the_frame_fetcher_and_the_central_export_do_not_import_the_daemon_runtime():
    code = ("import sys, edgelabel.ingest.frames, edgelabel.ingest.framestore, edgelabel.ingest.export;"
            "bad = sorted(m for m in sys.modules if m.startswith(('edgelabel.edge.pipeline', 'edgelabel.edge.sources',"
            " 'edgelabel.edge.sinks', 'edgelabel.edge.records', 'edgelabel.engines', 'edgelabel.edge.daemon',"
            " 'edgelabel.web', 'cv2', 'onnxruntime', 'numpy')));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_https_appliances_are_verified_against_the_plant_ca(tmp_path, broker, pg_dsn, appliances):
    """An appliance on HTTPS with its own self-signed certificate (web.tls: auto): refused while ingest does not
    trust it (the frames wait, the reason in /healthz), fetched with ``frames.ca_file`` naming it."""
    from edgelabel.ingest.config import load_ingest_config
    from edgelabel.ingest.service import IngestService

    a = appliances("line7-cam", 2, "viewer-token-line7-0123456789", tls=True)
    nas = tmp_path / "nas"
    nas.mkdir()
    frames = {"enabled": True, "folder": str(nas), "backoff_min": 0.2, "backoff_max": 1.0,
              "appliances": {a.device: {"url": a.url, "token": a.token}}}
    svc = IngestService(load_ingest_config(ingest_yaml(tmp_path, broker.port, pg_dsn, frames), client_id="ingest-t",
                                           http="127.0.0.1:0"))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.health()["ok"], 30, "ingest to connect")
        publish(broker.port, [r.to_dict() for r in a.recs])
        backed = wait_for(lambda: svc.health()["frames"]["appliances_backed_off"], 30, "the untrusted appliance")
        assert "CERTIFICATE_VERIFY_FAILED" in backed[a.device]["error"]
        assert all(r["status"] == "pending" and r["attempts"] == 0 for r in frames_rows(pg_dsn).values())
    finally:
        svc.stop()
        thread.join(30)
    frames["ca_file"] = str(a.cert)
    svc = IngestService(load_ingest_config(ingest_yaml(tmp_path, broker.port, pg_dsn, frames), client_id="ingest-t",
                                           http="127.0.0.1:0"))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(frames_rows(pg_dsn)) == 2 and all(
            r["status"] == "fetched" for r in frames_rows(pg_dsn).values()), 30, "the frames over verified HTTPS")
    finally:
        svc.stop()
        thread.join(30)

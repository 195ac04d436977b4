"""Throughput of ``edgelabel ingest``: label records from a private Mosquitto into a PostgreSQL database of its own.

Usage::

    python bench/ingest.py                    # 20000 records, 1 worker
    python bench/ingest.py --workers 2        # 2 workers in one share group
    python bench/ingest.py -n 50000 --pg postgresql://postgres@127.0.0.1:5432/postgres

It starts ``mosquitto`` on a free loopback port, creates ``ingest_bench_<random>`` (dropped at the end), starts
the workers as real ``edgelabel ingest`` processes, publishes N label records (~1 KB, two detections, ten
devices) at QoS 1 from this process as fast as the broker acknowledges them, and reports:

* ``stored``: records per second from the first publish to the last row committed (every id checked);
* ``batches``: how many transactions and their mean size (from each worker's /metrics);
* ``bytes/record``: the database's size divided by N (tables, indexes, JSONB record kept whole).

On a 2-core machine the broker, PostgreSQL, the publisher and the workers share the cores: the figure is a
floor for a plant server, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id  # noqa: E402

MODEL = ModelInfo("yolox_nano", "0" * 64, "yolox", "onnxruntime", "CPUExecutionProvider", "fp32", (416, 416))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(n: int) -> list[tuple[str, str, str]]:
    """(topic, id, payload) of n label records from ten devices."""
    out = []
    t0 = time.time() - n / 15
    for i in range(n):
        device, key = f"bench-{i % 10:02d}", f"/data/clips/line.mp4#{i}"
        dets = [DetectionRecord(0, "person", 0.82, [560.46, 330.05, 631.29, 498.54],
                                [0.437859, 0.458403, 0.493195, 0.692417], i // 30 + 1),
                DetectionRecord(2, "car", 0.41, [10.0, 12.0, 50.0, 80.0], [0.007812, 0.016667, 0.039062, 0.111111])]
        rec = LabelRecord(id=record_id(device, "line", key), device_id=device, source="line", frame_index=i,
                          frame_key=key, captured_at=iso_utc(t0 + i / 15), captured_ts=t0 + i / 15, width=1280,
                          height=720, model=MODEL, inference_ms=14.8, detections=dets, media_time=i / 15)
        out.append((f"edgelabel/{device}/line/labels", rec.id, rec.to_json()))
    return out


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_workers(n: int, port: int, dsn: str, work: Path, tag: str) -> list[tuple[subprocess.Popen[bytes], int]]:
    """n ``edgelabel ingest`` processes (client ids bench-<run>-0, -1, ...) and wait until each is healthy."""
    workers: list[tuple[subprocess.Popen[bytes], int]] = []
    # a share group of this run only: a stopped worker's session left by an earlier run on the same broker
    # stays a member and keeps its share of this run's records (docs/ingest.md, "Workers and sessions")
    run = uuid.uuid4().hex[:6]
    for w in range(n):
        http = free_port()
        log = open(work / f"worker-{w}-{tag}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "edgelabel.edge.cli", "ingest", "--mqtt",
                                 f"mqtt://127.0.0.1:{port}", "--db", dsn, "--group", f"bench-{run}", "--client-id",
                                 f"bench-{run}-{w}", "--http", f"127.0.0.1:{http}"], stdout=log, stderr=log, cwd=ROOT)
        workers.append((proc, http))
    for proc, http in workers:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as r:
                    if json.loads(r.read())["ok"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"a worker did not become healthy; see {work}")
            time.sleep(0.1)
    return workers


def stop_workers(workers: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for proc, _ in workers:
        if proc.poll() is None:
            proc.terminate()
    for proc, _ in workers:
        proc.wait(30)


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def wait_rows(dsn: str, n: int, t0: float) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM records").fetchone()[0] < n:
            if time.monotonic() - t0 > 120:
                raise SystemExit("not every record was stored within 120 s")
            time.sleep(0.02)
    return time.monotonic() - t0


def check_ids(dsn: str, msgs: list[tuple[str, str, str]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [str(r[0]) for r in conn.execute("SELECT id FROM records")]
    assert len(ids) == len(set(ids)) and set(ids) == {i for _, i, _ in msgs}, "stored ids differ from the published"


def run_throughput(args: argparse.Namespace, n_workers: int, mode: str, port: int, dsn: str, work: Path) -> str:
    """``live``: publish while the workers run (the publisher shares the cores); ``preloaded``: the workers
    are paused (SIGSTOP) while every record is published, so the records wait on the broker, then resumed:
    ingest, the broker's delivery and PostgreSQL without the publisher."""
    msgs = records(args.n)
    workers = start_workers(n_workers, port, dsn, work, mode)
    try:
        if mode == "preloaded":
            for proc, _ in workers:  # paused: the broker keeps what they have not taken in their sessions
                proc.send_signal(signal.SIGSTOP)
        client = publisher(port)
        t0 = time.monotonic()
        infos = [client.publish(topic, payload, qos=1) for topic, _, payload in msgs]
        for info in infos:
            info.wait_for_publish(60)
        published = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
        if mode == "preloaded":
            t0 = time.monotonic()
            for proc, _ in workers:
                proc.send_signal(signal.SIGCONT)
        stored = wait_rows(dsn, args.n, t0)
        check_ids(dsn, msgs)
        batches = sum(metric(h, "edgelabel_ingest_batch_messages_count") for _, h in workers)
        in_batches = sum(metric(h, "edgelabel_ingest_batch_messages_sum") for _, h in workers)
    finally:
        stop_workers(workers)
    what = (f"published in {published:.1f} s, stored {stored:.1f} s after the first publish" if mode == "live"
            else f"queued in {published:.1f} s, stored {stored:.1f} s after the workers' start")
    return (f"workers {n_workers}, {mode:9s}: {args.n} records, {what} -> {args.n / stored:,.0f} records/s; "
            f"{batches:.0f} batches of {in_batches / max(batches, 1):.0f}")


def run_latency(args: argparse.Namespace, n_workers: int, port: int, dsn: str, work: Path) -> str:
    """Broker-to-row latency at a fixed offered rate: from the publish call to the row's insert.

    Each record's ``captured_at`` is its publish time; the bench's own database gets a column
    ``record_keys.stored_at DEFAULT clock_timestamp()`` (the moment the worker's statement wrote the row, a
    few ms before its commit: ``edgelabel_ingest_batch_seconds``), so the latency is computed in SQL
    afterwards and nothing polls while the records flow.  It includes the batch wait (``batch.max_wait``).
    """
    n = int(args.rate * args.seconds)
    workers = start_workers(n_workers, port, dsn, work, "latency")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE record_keys ADD COLUMN stored_at timestamptz DEFAULT clock_timestamp()")
    client = publisher(port)
    try:
        t_start = time.time()
        infos = []
        for i in range(n):
            delay = t_start + i / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            topic, _, payload = one_record(i, time.time())
            infos.append(client.publish(topic, payload, qos=1))
        achieved = n / (time.time() - t_start)
        for info in infos:
            info.wait_for_publish(60)
        wait_rows(dsn, n, time.monotonic())
    finally:
        client.disconnect()
        client.loop_stop()
        stop_workers(workers)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # the first second warms up (connections, the month's partitions); the rest is the steady state
        p50, p99, worst = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP "
            "(ORDER BY ms), max(ms) FROM (SELECT extract(epoch FROM stored_at - captured_at) * 1000 AS ms "
            "FROM record_keys WHERE captured_at >= to_timestamp(%s)) x", (t_start + 1.0,)).fetchone()
    return (f"workers {n_workers}, latency  : {n} records offered at {args.rate:,.0f}/s (achieved {achieved:,.0f}/s) "
            f"-> broker-to-row p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms")


def one_record(i: int, ts: float) -> tuple[str, str, str]:
    device, key = f"lat-{i % 10:02d}", f"/data/clips/line.mp4#{i}"
    dets = [DetectionRecord(0, "person", 0.82, [560.46, 330.05, 631.29, 498.54],
                            [0.437859, 0.458403, 0.493195, 0.692417], i // 30 + 1),
            DetectionRecord(2, "car", 0.41, [10.0, 12.0, 50.0, 80.0], [0.007812, 0.016667, 0.039062, 0.111111])]
    rec = LabelRecord(id=record_id(device, "line", key), device_id=device, source="line", frame_index=i,
                      frame_key=key, captured_at=iso_utc(ts), captured_ts=ts, width=1280, height=720, model=MODEL,
                      inference_ms=14.8, detections=dets, media_time=i / 15)
    return f"edgelabel/{device}/line/labels", rec.id, rec.to_json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="label records per throughput run (default 20000)")
    ap.add_argument("--workers", default="1", help="ingest processes in the share group; a list runs each "
                    "(default 1; e.g. 1,2)")
    ap.add_argument("--mode", default="live", help="live, preloaded, latency or a comma list of them "
                    "(default live)")
    ap.add_argument("--rate", type=float, default=1000.0, help="offered records/s in latency mode (default 1000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the latency run (default 10 s)")
    ap.add_argument("--pg", default=os.environ.get("EDGELABEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
                    help="an admin connection (the bench creates and drops its own databases)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = psycopg.connect(args.pg, autocommit=True)
    time.sleep(0.3)
    try:
        for mode in args.mode.split(","):
            for n_workers in (int(w) for w in args.workers.split(",")):
                name = f"ingest_bench_{uuid.uuid4().hex[:10]}"
                admin.execute(f"CREATE DATABASE {name}")
                dsn = args.pg.rsplit("/", 1)[0] + "/" + name
                try:
                    if mode == "latency":
                        line = run_latency(args, n_workers, port, dsn, work)
                    else:
                        line = run_throughput(args, n_workers, mode, port, dsn, work)
                        size = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
                        empty = admin.execute("SELECT pg_database_size('template1')").fetchone()[0]
                        line += f"; {(size - empty) / args.n:,.0f} bytes/record in the database (all ids once)"
                    print(line, flush=True)
                finally:
                    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        return 0
    finally:
        admin.close()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

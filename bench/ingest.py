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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="label records (default 20000)")
    ap.add_argument("--workers", type=int, default=1, help="ingest processes in the share group (default 1)")
    ap.add_argument("--pg", default=os.environ.get("EDGELABEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
                    help="an admin connection (the bench creates and drops its own database)")
    args = ap.parse_args()

    msgs = records(args.n)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = psycopg.connect(args.pg, autocommit=True)
    name = f"ingest_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    dsn = args.pg.rsplit("/", 1)[0] + "/" + name
    workers: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        time.sleep(0.3)
        for w in range(args.workers):
            http = free_port()
            log = open(work / f"worker-{w}.log", "wb")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen([sys.executable, "-m", "edgelabel.edge.cli", "ingest", "--mqtt",
                                     f"mqtt://127.0.0.1:{port}", "--db", dsn, "--group", "bench", "--client-id",
                                     f"bench-{w}", "--http", f"127.0.0.1:{http}"], stdout=log, stderr=log, cwd=ROOT)
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

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(1000)
        client.connect("127.0.0.1", port)
        client.loop_start()
        t0 = time.monotonic()
        infos = [client.publish(topic, payload, qos=1) for topic, _, payload in msgs]
        for info in infos:
            info.wait_for_publish(60)
        published = time.monotonic() - t0
        with psycopg.connect(dsn, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM records").fetchone()[0] < args.n:
                if time.monotonic() - t0 > 600:
                    raise SystemExit("not every record was stored within 600 s")
                time.sleep(0.02)
            stored = time.monotonic() - t0
            ids = {str(r[0]) for r in conn.execute("SELECT id FROM records")}
        client.disconnect()
        client.loop_stop()
        assert ids == {i for _, i, _ in msgs}, "the stored ids differ from the published ones"
        batches = sum(metric(h, "edgelabel_ingest_batch_messages_count") for _, h in workers)
        in_batches = sum(metric(h, "edgelabel_ingest_batch_messages_sum") for _, h in workers)
        size = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
        print(f"workers {args.workers}: {args.n} records, published in {published:.1f} s, stored in {stored:.1f} s "
              f"-> {args.n / stored:,.0f} records/s; {batches:.0f} batches of {in_batches / max(batches, 1):.0f} "
              f"messages on average; {size / args.n:,.0f} bytes/record in the database (all ids once)")
        return 0
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait(30)
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

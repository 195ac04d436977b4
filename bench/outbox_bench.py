"""Throughput of the MQTT sink with its durable outbox, against a private Mosquitto.

Usage::

    python bench/outbox_bench.py                 # 20000 label records, QoS 1, live frames (batched commits)
    python bench/outbox_bench.py --sync          # storage frames: every record committed before write returns
    python bench/outbox_bench.py --backlog       # write everything while the broker is down, then time the replay
    python bench/outbox_bench.py -n 50000 --qos 2

It starts ``mosquitto`` on a free loopback port and a subscriber process
(``mosquitto_sub`` when installed, else a paho subscriber) that records every
payload, writes N realistic label records (~1 KB, two detections) through
:class:`edge.sinks.mqtt.MqttSink` with the outbox in a temporary state
directory, and reports:

* ``write``: how fast the pipeline's sink thread can hand records over;
* ``delivered``: first write to the last record received by the subscriber
  with the outbox empty (every record acknowledged and deleted);
* loss and duplicates, checked by record id (must be 0 / 0).

Why a separate subscriber process: on a 2-core box a subscriber in the same
interpreter would compete for the GIL and measure Python, not the outbox.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgelabel.edge.config import MqttConfig  # noqa: E402
from edgelabel.edge.frame import Frame  # noqa: E402
from edgelabel.edge.records import DetectionRecord, LabelRecord, ModelInfo, iso_utc, record_id  # noqa: E402
from edgelabel.edge.sinks.mqtt import MqttSink  # noqa: E402
from edgelabel.engines.base import Detection  # noqa: E402

log = logging.getLogger("outbox_bench")
DEVICE = "bench-01"
MODEL = ModelInfo("yolox_nano", "0" * 64, "yolox", "onnxruntime", "CPUExecutionProvider", "fp32", (416, 416))
IMAGE = np.zeros((8, 8, 3), np.uint8)

PY_SUBSCRIBER = r"""
import sys, paho.mqtt.client as mqtt
port, topic, n, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
fh = open(out, "wb"); count = 0
def on_message(c, u, m):
    global count
    fh.write(m.payload + b"\n"); count += 1
    if count >= n: fh.flush(); c.disconnect()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
c.on_subscribe = lambda *a: print("SUBSCRIBED", flush=True)
c.on_message = on_message
c.connect("127.0.0.1", port, 60); c.loop_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def start_subscriber(port: int, topic: str, n: int, out: Path) -> subprocess.Popen[bytes]:
    sub = shutil.which("mosquitto_sub")
    if sub:
        cmd = [sub, "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1", "-C", str(n), "-F", "%p", "-i", "bench-sub"]
        proc = subprocess.Popen(cmd, stdout=out.open("wb"), stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # mosquitto_sub has no "subscribed" signal; it connects in a few ms
        return proc
    proc = subprocess.Popen([sys.executable, "-c", PY_SUBSCRIBER, str(port), topic, str(n), str(out)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def make_record(i: int) -> LabelRecord:
    ts = 1_700_000_000.0 + i / 30
    key = f"rtsp://10.0.0.5/stream1@{int(ts * 1e9)}"
    dets = [Detection(0, "person", 0.87, (120.5, 80.25, 260.0, 410.75)), Detection(2, "car", 0.51, (700.0, 300.0, 1010.5, 520.0))]
    return LabelRecord(
        id=record_id(DEVICE, "cam1", key), device_id=DEVICE, source="cam1", frame_index=i, frame_key=key,
        captured_at=iso_utc(ts), captured_ts=ts, width=1280, height=720, model=MODEL, inference_ms=11.7,
        detections=[DetectionRecord.from_detection(d, 1280, 720, track_id=i % 7 + 1) for d in dets],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="records to publish (default 20000)")
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--sync", action="store_true", help="storage frames: commit every record before write returns")
    ap.add_argument("--backlog", action="store_true", help="store everything with the broker down, then time the replay")
    ap.add_argument("--max-inflight", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    n = args.n
    records = [make_record(i) for i in range(n)]
    frames = [Frame("cam1", r.frame_index, IMAGE, r.captured_ts, r.frame_key, live=not args.sync) for r in records]
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        broker = None if args.backlog else start_broker(work, port)
        received = work / "received.txt"
        sub = None if args.backlog else start_subscriber(port, "bench/+/+/labels", n, received)
        cfg = MqttConfig(host="127.0.0.1", port=port, prefix="bench", qos=args.qos, max_inflight=args.max_inflight)
        cfg.reconnect.initial, cfg.reconnect.max = 0.2, 0.5
        sink = MqttSink(cfg, DEVICE, state_dir=work / "state")
        sink.open()
        try:
            if broker is not None:
                deadline = time.time() + 10
                while not sink.status()["connected"] and time.time() < deadline:
                    time.sleep(0.01)
            t0 = time.perf_counter()
            for rec, frame in zip(records, frames, strict=True):
                sink.write(rec, frame)
            t_write = time.perf_counter() - t0
            if args.backlog:
                sink.flush()
                size = sum(p.stat().st_size for p in (work / "state").glob("outbox.sqlite*"))
                print(f"stored {n} records with the broker down in {t_write:.2f} s ({n / t_write:,.0f} msg/s); "
                      f"outbox {size / 1e6:.1f} MB")
                broker = start_broker(work, port)
                sub = start_subscriber(port, "bench/+/+/labels", n, received)
                t0 = time.perf_counter()
            assert sub is not None
            try:
                sub.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                sub.kill()
            deadline = time.time() + 10
            while sink.status()["pending"] and time.time() < deadline:
                time.sleep(0.005)
            t_all = time.perf_counter() - t0
            st = sink.status()
        finally:
            sink.close()
            if sub is not None and sub.poll() is None:
                sub.kill()
            if broker is not None:
                broker.terminate()
                broker.wait(5)
        ids = []
        for line in received.read_bytes().splitlines():
            if line.startswith(b"{"):
                doc = json.loads(line)
                if "frame_key" in doc:
                    ids.append(doc["id"])
        expected = {r.id for r in records}
        lost = len(expected - set(ids))
        dups = len(ids) - len(set(ids))
        in_order = ids == sorted(ids, key={r.id: r.frame_index for r in records}.__getitem__)
        mode = "backlog replay" if args.backlog else ("sync commits" if args.sync else "batched commits")
        if not args.backlog:
            print(f"write: {n} records in {t_write:.2f} s = {n / t_write:,.0f} msg/s ({mode})")
        print(f"delivered: {len(set(ids))}/{n} at QoS {args.qos} in {t_all:.2f} s = {len(set(ids)) / t_all:,.0f} msg/s "
              f"({mode}, max_inflight {args.max_inflight}); lost {lost}, duplicates {dups}, in order {in_order}, "
              f"outbox left {st['pending']}, dropped {st['dropped']}")
        return 0 if lost == 0 and st["pending"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""How a broker refusing one message affects delivery (RELIABILITY.md, "a message the broker refuses").

200 labels, record 100 with 200 detections, over Mosquitto's ``max_packet_size 6000``; MQTT 3.1.1 and 5,
3 runs each, default reconnect backoff.  Run from the repository root: ``python bench/mqtt_refused.py``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, ".")

from edgelabel.edge.sinks.mqtt import MqttSink  # noqa: E402
from tests.test_mqtt_faults import ConfBroker  # noqa: E402
from tests.test_mqtt_refused import big_record, labels  # noqa: E402
from tests.test_mqtt_sink import DEVICE, PREFIX, Subscriber, make_record, mqtt_cfg, storage_frame  # noqa: E402


def run(protocol: str, index: int) -> str:
    tmp = Path(tempfile.mkdtemp())
    broker = ConfBroker(tmp, "allow_anonymous true\npersistence false\nmax_packet_size 6000\n").start()
    sink = MqttSink(mqtt_cfg(broker.port, protocol=protocol), DEVICE, state_dir=tmp)
    sub = Subscriber(broker.port, f"{PREFIX}/{DEVICE}/+/labels")
    try:
        sink.open()
        time.sleep(0.3)
        t0 = time.monotonic()
        for i in range(200):
            rec = big_record(i) if i == 100 else make_record("cam1", i)
            sink.write(rec, storage_frame(rec))
        sub.wait_for(lambda ms: len(labels(sub)) >= 199, 60)
        took = time.monotonic() - t0
        dead = sink.status()["dead_letter"]
        connections = broker.log_text().count("New client connected") - 1  # the subscriber's left out
    finally:
        sink.close()
        sub.close()
        broker.stop()
    return (f"MQTT {protocol} run {index}: {len(labels(sub))}/199 delivered in {took:.2f} s, "
            f"dead_letter {dead}, connections {connections}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    for proto in ("3.1.1", "5"):
        for n in range(3):
            sys.stdout.write(run(proto, n) + "\n")

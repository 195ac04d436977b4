"""Fault: the MQTT broker is SIGKILLed and restarted 5 times while the daemon labels two videos.

Injected for real: Mosquitto (with persistence, autosaving every second, as a production broker
would run) gets SIGKILL -- no shutdown, no final save -- stays down 0.5 to 3 s, and is started again
on the same port.  The consumer is the shipped ``examples/consumer.py`` (persistent session, QoS 1,
manual acknowledgement, de-duplication by record id).

Must happen: the daemon keeps labeling through every outage (the outbox holds the records), every
label of every frame reaches the consumer exactly once after de-duplication, in frame order per
source, and the outbox is empty at the end.  Measured: outage lengths, the time from each restart
to the next label at the consumer, records kept in the outbox during outages, duplicates the
consumer skipped.

Why the test waits for the consumer to be back before the next kill: a message the broker has
acknowledged to the daemon but not yet handed to the consumer lives only in the broker's memory, so
a broker crash in that window loses it whatever the daemon does.  Between kills the consumer
catches up; the kills themselves land while records flow.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.test_faults_support import HAVE_MOSQUITTO, DaemonProc, measure, wait_until, write_config
from tests.test_mqtt_faults import ConfBroker, ConsumerProc, assert_every_frame_once_in_order, outbox_depth

pytestmark = [pytest.mark.faults, pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")]

DOWNTIMES = (1.0, 2.5, 0.5, 1.5, 3.0)  # seconds the broker stays dead, one per kill


def test_broker_sigkilled_5_times_every_label_delivered_once(tmp_path: Path, assets: Path) -> None:
    broker = ConfBroker(tmp_path, f"allow_anonymous true\npersistence true\npersistence_location {tmp_path}/\n"
                                  "autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n").start()
    consumer = ConsumerProc(tmp_path, broker.port, client_id="broker-kill-consumer")
    videos = assets / "videos"
    cfg = write_config(tmp_path, broker.port, {
        "cars": {"uri": str(videos / "cars.mp4"), "loop": True, "fps": 8},
        "bottles": {"uri": str(videos / "bottle-detection.mp4"), "loop": True, "fps": 8},
    })
    daemon = DaemonProc(cfg)
    state = tmp_path / "state"
    recovery: list[float] = []
    backlog: list[int] = []
    try:
        assert consumer.wait_labels(30, 90) >= 30, "no labels before the first kill\n" + daemon.log()[-3000:]
        for i, down in enumerate(DOWNTIMES, start=1):
            assert broker.proc is not None
            before = len(consumer.labels())
            broker.proc.kill()  # SIGKILL: no persistence save, sockets reset
            broker.proc.wait(10)
            broker.proc = None
            time.sleep(down)
            assert daemon.alive(), "the daemon died during a broker outage\n" + daemon.log()[-3000:]
            backlog.append(outbox_depth(state))
            broker.start()
            up = time.monotonic()
            assert wait_until(lambda n=before: len(consumer.labels()) > n, 30), f"no label after restart {i}"
            recovery.append(round(time.monotonic() - up, 2))
            # the consumer has its session back and has caught up with what the broker holds for it
            assert wait_until(lambda k=i: "".join(consumer.stderr).count("subscribed to") >= k + 1, 30)
            assert wait_until(lambda: outbox_depth(state) < 50, 30), "the outbox does not drain after a restart"
            time.sleep(1.2)  # at least one autosave of the broker with the consumer's session in it
        assert daemon.alive()
        code = daemon.stop(60)
        assert code == 0, daemon.log()[-4000:]
    finally:
        daemon.ensure_dead()
        consumer_log = consumer.stop()
        broker.stop()
    log = daemon.log()
    m = re.search(r"done: (\d+) frames", log)
    assert m, log[-3000:]
    frames = int(m.group(1))
    labels = consumer.labels()
    per_source = {s: 1 + max(r["frame_index"] for r in labels if r["source"] == s) for s in ("cars", "bottles")}
    # every frame the daemon labeled, once, in order: indices 0..n-1 of each looping video, no gap, no repeat
    assert_every_frame_once_in_order(labels, per_source)
    assert sum(per_source.values()) == len(labels) == frames, (per_source, len(labels), frames)
    assert outbox_depth(state) == 0
    dup = re.search(r"(\d+) duplicate\(s\) skipped", consumer_log)
    assert "Traceback" not in log and "Traceback" not in consumer_log
    assert log.count("unreachable") >= 1 and log.count("again after") >= 5
    measure("broker_sigkill_x5", kills=len(DOWNTIMES), downtime_s=list(DOWNTIMES), frames_labeled=frames,
            labels_delivered_unique=len(labels), lost=0, duplicates_skipped_by_consumer=int(dup.group(1)) if dup else None,
            outbox_depth_during_outage=backlog, first_label_after_restart_s=recovery, max_recovery_s=max(recovery))
    assert max(recovery) < 10

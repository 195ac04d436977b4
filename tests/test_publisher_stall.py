"""The MQTT publisher connected but making no progress: a broker that takes the connection and never acknowledges.

Injected for real: a tiny MQTT server on a loopback socket answers CONNECT with CONNACK and PINGREQ with
PINGRESP (so the client's keepalive is satisfied and the link looks healthy) but swallows every PUBLISH.
Before, the daemon showed ``connected: true`` and no alarm while labels piled up (``outbox_stuck`` only after
120 s of the head waiting, and it blames the broker being down).  Now ``publisher_stalled`` names the cause;
once the server acknowledges again (after a reconnect) it clears.  And a stop in that state ends within the
bounded drain (STOP_DRAIN_S), not after ACK_TIMEOUT per wait.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from edgelabel.edge.config import MqttConfig, ReconnectConfig
from edgelabel.edge.health import device_alarms
from edgelabel.edge.sinks.mqtt import STOP_DRAIN_S, MqttSink


def _read_packet(conn: socket.socket) -> tuple[int, bytes] | None:
    head = conn.recv(1)
    if not head:
        return None
    length, shift = 0, 0
    while True:
        b = conn.recv(1)
        if not b:
            return None
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return head[0], body


class SilentBroker:
    """MQTT 3.1.1 server that accepts, keeps the link alive, and acknowledges publishes only when ``acking``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.acking = False
        self.publishes = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while (pkt := _read_packet(conn)) is not None:
                kind, body = pkt[0] >> 4, pkt[1]
                if kind == 1:  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 3:  # PUBLISH
                    self.publishes += 1
                    qos = (pkt[0] >> 1) & 3
                    if qos and self.acking:
                        tlen = int.from_bytes(body[:2], "big")
                        conn.sendall(b"\x40\x02" + body[2 + tlen:4 + tlen])
                elif kind == 14:  # DISCONNECT
                    return
        except OSError:
            return

    def drop_connections(self) -> None:
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def close(self) -> None:
        self._stop = True
        self.drop_connections()
        self.sock.close()


def _wait(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _alarm_ids(sink: MqttSink) -> list[str]:
    return [a["id"] for a in device_alarms({"sinks": {"mqtt": sink.status()}})]


def test_a_broker_that_never_acknowledges_raises_publisher_stalled_and_it_clears(tmp_path: Path) -> None:
    server = SilentBroker()
    cfg = MqttConfig(host="127.0.0.1", port=server.port, prefix="t", qos=1, keepalive=5,
                     reconnect=ReconnectConfig(initial=0.2, max=0.5))
    sink = MqttSink(cfg, "dev", state_dir=tmp_path)
    sink.stall_after = 1.0
    sink.open()
    try:
        assert _wait(lambda: sink.status()["connected"], 10)
        sink.source_status("cam", "online")  # a QoS 1 message through the outbox
        assert _wait(lambda: server.publishes >= 1, 10)
        assert "publisher_stalled" not in _alarm_ids(sink)  # not at once: a broker needs a moment
        assert _wait(lambda: "publisher_stalled" in _alarm_ids(sink), 10), sink.status()["publisher"]
        [alarm] = [a for a in device_alarms({"sinks": {"mqtt": sink.status()}}) if a["id"] == "publisher_stalled"]
        assert "acknowledged" in alarm["message"] and "broker's log" in alarm["message"], alarm
        assert sink.status()["connected"] and sink.stuck() is None  # a restart of the daemon would not help
        server.acking = True
        server.drop_connections()  # the client reconnects and sends the message again; now it is acknowledged
        assert _wait(lambda: sink.status()["pending"] == 0, 15)
        assert "publisher_stalled" not in _alarm_ids(sink)
        # silent again, with a message waiting: a stop ends within the bounded drain, not ACK_TIMEOUT (5 s) per wait
        server.acking = False
        sink.source_status("cam", "offline")
        assert _wait(lambda: server.publishes >= 3, 10)
        t0 = time.monotonic()
        sink.interrupt()
        sink.flush()
        sink.close()
        took = time.monotonic() - t0
        assert took < STOP_DRAIN_S + 1.5, f"close took {took:.1f} s"
        assert sink.left_at_close >= 1
    finally:
        sink.close()
        server.close()


def test_a_publisher_hung_in_a_call_withholds_the_watchdog(tmp_path: Path) -> None:
    """The publisher's loop blocked for real: the test holds the outbox's lock, as a call that never returns would
    (an fsync on a dying disk).  ``stuck()`` says so (Pipeline.alive then stops feeding the watchdog), and the
    alarm names it; both go once the call returns."""
    server = SilentBroker()
    server.acking = True
    cfg = MqttConfig(host="127.0.0.1", port=server.port, prefix="t", qos=1, keepalive=5)
    sink = MqttSink(cfg, "dev", state_dir=tmp_path)
    sink.stall_after = 0.5
    sink.open()
    try:
        assert _wait(lambda: sink.status()["connected"], 10)
        assert sink.stuck() is None
        with sink._outbox._cond:  # the publisher's next outbox call waits here
            time.sleep(1.2)
            why = sink.stuck()
            assert why is not None and "stuck in one call" in why, why
            # status (what /healthz, /api/status and the stats topic read) still answers, from the last counters
            t0 = time.monotonic()
            hung = sink.status()
            assert time.monotonic() - t0 < 2.0
            assert hung["outbox"]["busy_s"] is not None and hung["pending"] >= 0
            [alarm] = [a for a in device_alarms({"sinks": {"mqtt": hung}}) if a["id"] == "publisher_stalled"]
            assert "hung in one call" in alarm["message"] and "watchdog" in alarm["message"]
            t0 = time.monotonic()
            sink.backlog()
            assert time.monotonic() - t0 < 2.0
        assert _wait(lambda: sink.stuck() is None, 5)
        assert sink.status()["outbox"]["busy_s"] is None
        # held long enough, the outbox itself is named (the disk under it)
        long_held = {**hung, "outbox": {**hung["outbox"], "busy_s": 12.0}}
        [busy] = [a for a in device_alarms({"sinks": {"mqtt": long_held}}) if a["id"] == "outbox_busy"]
        assert "check the disk" in busy["message"] and str(hung["outbox"]["path"]) in busy["message"]
    finally:
        sink.close()
        server.close()

"""edgelabel.edge.notify against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelabel.edge.notify import Notifier, ProgressWatchdog


class NotifySocket:
    """What systemd does: bind a SOCK_DGRAM socket and read ``KEY=VALUE`` datagrams."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.1)
        try:
            self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return True
        finally:
            self.sock.settimeout(2.0)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    s = NotifySocket(path, path)
    yield s
    s.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"edgelabel-test-{uuid.uuid4().hex[:12]}"
    s = NotifySocket(b"\0" + name.encode(), "@" + name)
    yield s
    s.close()


def test_ready_sends_ready_and_status(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    assert n.enabled
    assert n.ready("labeling 2 sources")
    assert notify_socket.receive() == {"READY": "1", "STATUS": "labeling 2 sources"}


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.stopping(), {"STOPPING": "1"}),
        (lambda n: n.watchdog(), {"WATCHDOG": "1"}),
        (lambda n: n.status("building TensorRT engine"), {"STATUS": "building TensorRT engine"}),
        (lambda n: n.extend_timeout(90), {"EXTEND_TIMEOUT_USEC": "90000000"}),
        (lambda n: n.extend_timeout(0.5), {"EXTEND_TIMEOUT_USEC": "500000"}),
    ],
)
def test_messages(notify_socket: NotifySocket, call, expected: dict[str, str]) -> None:
    n = Notifier(notify_socket.env())
    assert call(n)
    assert notify_socket.receive() == expected


def test_reloading_carries_monotonic_usec(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading config")
    msg = notify_socket.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    assert msg["STATUS"] == "reloading config"
    # then READY=1 ends the reload
    assert n.ready()
    assert notify_socket.receive() == {"READY": "1"}


def test_abstract_namespace_socket(abstract_socket: NotifySocket) -> None:
    n = Notifier(abstract_socket.env())
    assert n.ready()
    assert abstract_socket.receive() == {"READY": "1"}


def test_newlines_in_status_cannot_inject_assignments(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    assert n.status("bad\nWATCHDOG=trigger")
    assert notify_socket.receive() == {"STATUS": "bad WATCHDOG=trigger"}


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval is None
    for call in (n.ready, n.stopping, n.watchdog, n.reloading):
        assert call() is False
    assert n.extend_timeout(10) is False
    assert n.status("x") is False


def test_default_env_is_process_environment(monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    assert Notifier().ready()
    assert notify_socket.receive() == {"READY": "1"}


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


def test_socket_gone_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    try:
        n = Notifier({"NOTIFY_SOCKET": os.path.join(folder, "missing")})
        assert n.enabled
        assert n.ready() is False
        assert n.watchdog() is False
        assert caplog.text.count("sd_notify") == 1  # warned once, then quiet
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_reconnects_after_manager_restart() -> None:
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    try:
        first = NotifySocket(path, path)
        n = Notifier(first.env())
        assert n.watchdog()
        first.close()
        Path(path).unlink()
        assert n.watchdog() is False
        second = NotifySocket(path, path)
        assert n.watchdog()
        assert second.receive() == {"WATCHDOG": "1"}
        second.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_thread_safe_sends(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    got: list[dict[str, str]] = []
    reader = threading.Thread(target=lambda: got.extend(notify_socket.receive() for _ in range(100)))
    reader.start()  # the kernel queues only ~10 datagrams: read while the senders send
    senders = [threading.Thread(target=lambda: [n.watchdog() for _ in range(20)]) for _ in range(5)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    reader.join(10)
    assert len(got) == 100 and all(m == {"WATCHDOG": "1"} for m in got)


def test_full_manager_queue_times_out_instead_of_blocking(notify_socket: NotifySocket, monkeypatch) -> None:
    monkeypatch.setattr("edgelabel.edge.notify.SEND_TIMEOUT", 0.05)
    n = Notifier(notify_socket.env())
    started = time.monotonic()
    sent = 0
    while n.watchdog():  # nobody reads: the kernel queue fills up, then a send times out
        sent += 1
        assert sent < 10_000
    assert sent >= 1
    assert time.monotonic() - started < 2


# ----------------------------------------------------------------------------- watchdog interval


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval == expected


# ----------------------------------------------------------------------------- progress watchdog


def test_progress_watchdog_pings_only_while_progressing(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env(WATCHDOG_USEC="100000"))  # 0.1 s -> ping every 0.05 s
    progressing = {"value": True}
    wd = ProgressWatchdog(n, lambda: progressing["value"])
    assert wd.interval == pytest.approx(0.05)
    assert wd.start()
    try:
        assert notify_socket.receive() == {"WATCHDOG": "1"}
        progressing["value"] = False  # a stuck inference loop
        time.sleep(0.15)
        while not notify_socket.nothing_pending():  # drain pings sent before the switch
            pass
        time.sleep(0.2)
        assert notify_socket.nothing_pending(), "a stuck pipeline must not ping the watchdog"
        assert wd.skipped >= 2
        progressing["value"] = True
        assert notify_socket.receive() == {"WATCHDOG": "1"}
    finally:
        wd.stop()


def test_progress_watchdog_check_raising_counts_as_stuck(notify_socket: NotifySocket) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    wd = ProgressWatchdog(Notifier(notify_socket.env()), broken, interval=1.0)
    assert wd.check_once() is False
    assert notify_socket.nothing_pending()


def test_progress_watchdog_without_watchdog_is_inert(notify_socket: NotifySocket) -> None:
    wd = ProgressWatchdog(Notifier(notify_socket.env()), lambda: True)
    assert wd.interval is None
    assert wd.start() is False
    wd.stop()

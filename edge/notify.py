"""systemd's notify protocol (``sd_notify``) without libsystemd.

Why it exists: the unit is ``Type=notify`` so that ``systemctl start`` returns
only once the model is loaded and the sources are open, the start timeout can
be extended while a TensorRT engine is built (minutes on a Jetson), and the
watchdog restarts a daemon whose inference loop is stuck.  The protocol is a
few ``KEY=VALUE`` lines in one datagram sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` is Linux's abstract namespace); it is small
enough that depending on libsystemd (absent in slim images and on many dev
boxes) or on a third-party package is not worth it.

Everything here is a no-op when ``$NOTIFY_SOCKET`` is unset (a terminal, a
test, a container without systemd), and a failed send is logged, never
raised: the daemon must not stop labeling because systemd went away.

Typical use in the daemon::

    notifier = Notifier()
    notifier.extend_timeout(120)          # before a long model/engine load
    ...                                   # load model, open sources
    notifier.ready("labeling 3 sources")
    watchdog = ProgressWatchdog(notifier, pipeline_is_progressing)
    watchdog.start()                      # WATCHDOG=1 only while progressing
    ...
    notifier.stopping()

:class:`ProgressWatchdog` is the piece that makes the watchdog meaningful: a
plain timer thread would keep pinging while the inference loop is hung, so
it pings only when the caller's liveness check says the pipeline moved.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

_USEC = 1_000_000
#: seconds a notification may block when the manager's socket queue is full
SEND_TIMEOUT = 1.0


class Notifier:
    """Sends sd_notify messages to the service manager, or does nothing outside systemd.

    ``env`` defaults to ``os.environ`` (read once, at construction); tests pass
    their own mapping.  Thread-safe: any thread of the main process may notify
    (the unit uses ``NotifyAccess=main``, so child processes may not).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self._address = self._parse_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = self._parse_watchdog(environ)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False

    # ------------------------------------------------------------------ environment

    @staticmethod
    def _parse_address(value: str) -> str | bytes | None:
        """The socket address from ``$NOTIFY_SOCKET``: a path, or bytes for the abstract namespace."""
        if not value:
            return None
        if value.startswith("@"):
            return b"\0" + value[1:].encode()
        if value.startswith("/"):
            return value
        # systemd >= 254 can also hand out vsock: addresses (for VMs); not used on a Jetson
        log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path or @abstract name; systemd notifications disabled", value)
        return None

    @staticmethod
    def _parse_watchdog(environ: Mapping[str, str]) -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds, as ``sd_watchdog_enabled(3)`` recommends.

        ``$WATCHDOG_PID``, when set, names the process the watchdog is meant
        for; another process (a child that inherited the environment) must not
        ping on the main process's behalf.
        """
        usec = environ.get("WATCHDOG_USEC", "").strip()
        if not usec:
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", usec)
            return None
        if value <= 0:
            return None
        pid = environ.get("WATCHDOG_PID", "").strip()
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                log.warning("WATCHDOG_PID=%r is not a process id; watchdog disabled", pid)
                return None
        return value / _USEC / 2.0

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when no watchdog is armed."""
        return self._watchdog_interval

    # ------------------------------------------------------------------ sending

    def notify(self, *fields: str) -> bool:
        """Send one datagram made of ``KEY=VALUE`` fields; True when it was sent.

        Newlines inside a field would start a new assignment on the manager's
        side, so they are replaced by spaces.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # a manager that stops reading must not stall the daemon's threads
                    self._sock.settimeout(SEND_TIMEOUT)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                # systemd restarting or the socket gone: say so once, then only at debug level
                level = logging.DEBUG if self._failed_once else logging.WARNING
                log.log(level, "sd_notify %s failed: %s", fields[0].split("=", 1)[0], exc)
                self._failed_once = True
                self._close_socket()
                return False
        log.debug("sd_notify: %s", payload.decode("utf-8", "replace").replace("\n", " | "))
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: the model is loaded and the sources are open."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """A reload (SIGHUP) has begun; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd 253+)
        and ignored by older managers, so it is always included.
        """
        fields = ["RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.notify(*fields)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (frames in flight are finishing, sinks are flushing)."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Tell the watchdog the daemon is alive; call only when the pipeline really made progress."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop timeout fires.

        systemd counts the extension from the moment the message arrives, so a
        long operation (a TensorRT engine build) must repeat it before it runs out.
        """
        usec = max(1, int(seconds * _USEC))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (e.g. ``building TensorRT engine``)."""
        return self.notify(f"STATUS={text}")

    # ------------------------------------------------------------------ cleanup

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        """Release the socket (a later notification opens a new one)."""
        with self._lock:
            self._close_socket()


class ProgressWatchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds, but only while ``is_progressing()`` is true.

    ``is_progressing`` is the daemon's own liveness test, e.g. "the inference
    loop finished an iteration (a frame, or an idle wait) within the last N
    seconds".  When it returns false the ping is skipped; if that lasts past
    ``WatchdogSec=`` systemd kills and restarts the service, which is the
    point.  An exception from the check counts as "not progressing".

    Does nothing (no thread) when the notifier has no watchdog armed.
    """

    def __init__(
        self,
        notifier: Notifier,
        is_progressing: Callable[[], bool],
        interval: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.is_progressing = is_progressing
        self.interval = interval if interval is not None else notifier.watchdog_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    def start(self) -> bool:
        """Start the pinging thread; False when no watchdog is configured."""
        if not self.interval or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._loop, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def check_once(self) -> bool:
        """One round: ping when progressing; True when a ping was sent."""
        try:
            alive = bool(self.is_progressing())
        except Exception:
            log.exception("watchdog liveness check failed; not pinging")
            alive = False
        if not alive:
            self.skipped += 1
            if self.skipped == 1 or self.skipped % 10 == 0:
                log.warning("pipeline made no progress: withholding the systemd watchdog ping (%d in a row)", self.skipped)
            return False
        if self.skipped:
            log.info("pipeline progressing again after %d withheld watchdog ping(s)", self.skipped)
            self.skipped = 0
        sent = self.notifier.watchdog()
        if sent:
            self.pings += 1
        return sent

    def _loop(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            self.check_once()

    def stop(self) -> None:
        """Stop pinging (before STOPPING=1, so a slow shutdown is not mistaken for liveness)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.interval or 1.0))
            self._thread = None

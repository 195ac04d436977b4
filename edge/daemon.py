"""The long-running daemon around the pipeline: signals, systemd notify, watchdog, reload, web.

``run_daemon`` is the composition root used by ``edgelabel run``: it is the one
place that wires the pipeline, the optional web page (imported lazily, so
``edge`` never depends on ``web`` at import time) and systemd together.

* READY=1 is sent once the model is loaded, the sinks are open and every enabled
  source has reported its first state (opened, offline or finished).
* While the model loads (a TensorRT engine build can take minutes on a Jetson),
  EXTEND_TIMEOUT_USEC keeps systemd's start timeout from firing.
* WATCHDOG=1 is sent only while the pipeline's worker threads keep turning
  (``Pipeline.alive``), so a stuck inference call gets the service restarted.  A worker
  thread that dies (an exception no loop expected) ends the daemon with status 1 at once,
  after the alarm naming it is published: systemd restarts the service.
* SIGHUP re-reads the config; an invalid one is rejected with its errors and the
  running one continues.  SIGTERM/SIGINT finish the frame in flight and flush.
* When every finite source is done, the daemon keeps delivering what is left in
  the MQTT outbox (broker down or slow) for up to ``mqtt.drain_timeout`` seconds,
  saying what is left and since when the broker is unreachable; SIGTERM ends the
  wait.  Exiting with messages left returns EXIT_UNDELIVERED, which the systemd
  unit restarts (``RestartForceExitStatus``), so delivery goes on by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from edgelabel.edge.config import Config, ConfigError
from edgelabel.edge.notify import Notifier
from edgelabel.edge.pipeline import Pipeline
from edgelabel.edge.records import iso_utc
from edgelabel.engines.base import EngineError

log = logging.getLogger("edgelabel.daemon")

#: how long start-up may take per extension while the model loads
EXTEND_STEP_S = 60.0
#: longest wait for every source to report its first state before READY=1
SOURCES_READY_TIMEOUT_S = 30.0
#: exit status when the daemon ends with messages not yet delivered to the broker (EX_TEMPFAIL: try again
#: later); they stay in the durable outbox and go first on the next start
EXIT_UNDELIVERED = 75
#: seconds between progress lines while the daemon waits for the outbox to empty
DRAIN_LOG_INTERVAL_S = 10.0
#: how long start-up waits for a read-only, full or unmounted state_dir before exiting 1 (the unit restarts
#: it): long enough that restarts stay under the unit's StartLimitBurst=5 per 600 s
STATE_DIR_WAIT_S = 150.0


def state_dir_wait_s() -> float:
    """STATE_DIR_WAIT_S, or ``EDGELABEL_STATE_DIR_WAIT_S`` from the environment (seconds, 0: exit at once)."""
    raw = os.environ.get("EDGELABEL_STATE_DIR_WAIT_S")
    try:
        return max(float(raw), 0.0) if raw else STATE_DIR_WAIT_S
    except ValueError:
        log.warning("EDGELABEL_STATE_DIR_WAIT_S=%r is not a number of seconds; using %g", raw, STATE_DIR_WAIT_S)
        return STATE_DIR_WAIT_S


class _Extender:
    """Sends EXTEND_TIMEOUT_USEC (and WATCHDOG=1) every 20 s until stopped (model load, engine build).

    The watchdog ping matters during a reload: the main loop is busy loading the
    new model then, and an engine build must not look like a stuck pipeline.
    """

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extend-timeout", daemon=True)

    def __enter__(self) -> _Extender:
        self._notifier.extend_timeout(EXTEND_STEP_S)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(min(20.0, self._notifier.watchdog_interval or 20.0)):
            self._notifier.extend_timeout(EXTEND_STEP_S)
            self._notifier.watchdog()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(1.0)


def _wait_sources_reported(pipeline: Pipeline, timeout: float) -> None:
    """Until every source reported a first state; a stop request (SIGTERM while an open hangs) ends the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [n for n, s in pipeline.source_states().items() if s is None]
        if not pending or pipeline.stopped:
            return
        time.sleep(0.05)
    log.warning("sources still opening after %.0f s; reporting ready anyway", timeout)


def run_daemon(
    cfg: Config,
    *,
    fresh: bool = False,
    reload_config: Callable[[], Config] | None = None,
    notifier: Notifier | None = None,
    pipeline_factory: Callable[..., Pipeline] = Pipeline,
    install_signals: bool = True,
) -> tuple[int, Pipeline]:
    """Run until every finite source is done or a stop signal; returns (exit code, pipeline)."""
    notifier = notifier or Notifier()
    web_sink: Any = None
    early_logs: Any = None
    if cfg.web.enabled:
        from edgelabel.web.server import early_log_handler
        from edgelabel.web.sink import WebSink

        early_logs = early_log_handler()  # start-up errors reach the page's log panel too
        web_sink = WebSink(cfg)
    try:
        pipeline = pipeline_factory(cfg, fresh=fresh, extra_sinks=[web_sink] if web_sink is not None else None)
    except BaseException:
        if early_logs is not None:
            early_logs.uninstall()
        raise
    pipeline.state_wait_s = state_dir_wait_s()
    reload_requested = threading.Event()

    if install_signals:
        def on_stop(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            pipeline.stop()

        def on_hup(_signum: int, _frame: Any) -> None:
            reload_requested.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    web_server: Any = None
    try:
        notifier.status("loading the model")
        with _Extender(notifier):
            try:
                pipeline.start()
            except (EngineError, ConfigError):
                pipeline.shutdown()
                raise
            _wait_sources_reported(pipeline, SOURCES_READY_TIMEOUT_S)
        if web_sink is not None:
            from edgelabel.web.server import start_web

            web_server = start_web(pipeline, web_sink, cfg, log_handler=early_logs)
        notifier.ready()
        notifier.status("labeling")
        log.info("ready")

        interval = notifier.watchdog_interval
        next_ping = 0.0
        while not pipeline.wait(0.25):
            if pipeline.died:  # logged by the thread; shutdown publishes the alarm, exit_code() is 1
                break
            now = time.monotonic()
            if interval is not None and now >= next_ping:
                if pipeline.alive(max_age=interval * 2):
                    notifier.watchdog()
                    next_ping = now + interval
                else:
                    log.error("pipeline is stuck (no worker progress); withholding the watchdog ping")
                    next_ping = now + interval
            if reload_requested.is_set():
                reload_requested.clear()
                _reload(pipeline, reload_config, notifier)
        if not pipeline.stopped:
            _drain_outbox(pipeline, cfg.mqtt.drain_timeout, notifier)
    finally:
        notifier.stopping()
        if web_server is not None:
            web_server.stop()
        elif early_logs is not None:
            early_logs.uninstall()
        pipeline.shutdown()
    code = pipeline.exit_code()
    left = sum(int(getattr(sink, "left_at_close", 0) or 0) for sink in pipeline.sinks or [])
    if left and code == 0:
        log.warning("exit status %d: %d message(s) not delivered to the broker stay in the outbox; they are "
                    "sent first when edgelabel starts again", EXIT_UNDELIVERED, left)
        code = EXIT_UNDELIVERED
    return code, pipeline


def _drain_outbox(pipeline: Pipeline, timeout: float, notifier: Notifier) -> None:
    """Every source is done: keep delivering what the outbox holds, up to ``timeout`` s or a stop signal.

    Without this a finite job that ends during a broker outage would exit after the sinks' short flush,
    and the labels would wait in the outbox until someone happened to start the daemon again.
    """
    sinks = [s for s in pipeline.sinks or [] if callable(getattr(s, "backlog", None))]
    if not sinks or timeout <= 0:
        return
    start = time.monotonic()
    deadline = start + timeout
    next_log = start
    last_pending: int | None = None
    interval = notifier.watchdog_interval
    next_ping = start
    while True:
        backlogs = [s.backlog() for s in sinks]
        pending = sum(b.pending for b in backlogs)
        now = time.monotonic()
        if pending == 0:
            if last_pending is not None:
                log.info("outbox empty: every message delivered %.0f s after the sources finished", now - start)
            return
        if pipeline.stopped:
            log.warning("stop requested while %d message(s) wait for the broker; they stay in the outbox", pending)
            return
        if now >= deadline:
            log.warning("mqtt.drain_timeout (%g s) reached with %d message(s) undelivered; they stay in the outbox",
                        timeout, pending)
            return
        if now >= next_log:
            down = [b for b in backlogs if not b.connected]
            since = min((b.unreachable_since for b in down if b.unreachable_since is not None), default=None)
            progress = "" if last_pending is None else f", {max(last_pending - pending, 0)} delivered in the last " \
                f"{DRAIN_LOG_INTERVAL_S:.0f} s"
            if down:
                why = f"broker unreachable since {iso_utc(since) if since else 'start'}"
                reason = next((b.last_error for b in down if b.last_error), None)
                log.warning("sources done; %d message(s) left in the outbox, %s (%s)%s; waiting up to %.0f s more "
                            "(mqtt.drain_timeout)", pending, why, reason or "not connected", progress, deadline - now)
            else:
                why = "delivering"
                log.info("sources done; delivering %d message(s) left in the outbox%s", pending, progress)
            notifier.status(f"sources done; {pending} message(s) to deliver, {why}")
            last_pending = pending
            next_log = now + DRAIN_LOG_INTERVAL_S
        if interval is not None and now >= next_ping:
            notifier.watchdog()  # the workers are done on purpose: the wait itself is the progress
            next_ping = now + interval
        time.sleep(0.25)


def _reload(pipeline: Pipeline, reload_config: Callable[[], Config] | None, notifier: Notifier) -> None:
    if reload_config is None:
        log.warning("SIGHUP: no config file to re-read (started without -c); nothing reloaded")
        return
    notifier.reloading()
    notifier.status("reloading the config")
    try:
        new = reload_config()
        with _Extender(notifier):
            pipeline.reload(new)
    except ConfigError as exc:
        for line in exc.problems:
            log.error("reload rejected: %s", line)
        log.error("the running configuration continues unchanged")
    except EngineError as exc:
        log.error("reload rejected: %s; the running configuration continues unchanged", exc)
    finally:
        notifier.ready()
        notifier.status("labeling")

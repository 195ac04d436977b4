"""The long-running daemon around the pipeline: signals, systemd notify, watchdog, reload, web.

``run_daemon`` is the composition root used by ``edgelabel run``: it is the one
place that wires the pipeline, the optional web page (imported lazily, so
``edge`` never depends on ``web`` at import time) and systemd together.

* READY=1 is sent once the model is loaded, the sinks are open and every enabled
  source has reported its first state (opened, offline or finished).
* While the model loads (a TensorRT engine build can take minutes on a Jetson),
  EXTEND_TIMEOUT_USEC keeps systemd's start timeout from firing.
* WATCHDOG=1 is sent only while the pipeline's worker threads keep turning
  (``Pipeline.alive``), so a stuck inference call gets the service restarted.
* SIGHUP re-reads the config; an invalid one is rejected with its errors and the
  running one continues.  SIGTERM/SIGINT finish the frame in flight and flush.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from edge.config import Config, ConfigError
from edge.notify import Notifier
from edge.pipeline import Pipeline
from engines.base import EngineError

log = logging.getLogger("edgelabel.daemon")

#: how long start-up may take per extension while the model loads
EXTEND_STEP_S = 60.0
#: longest wait for every source to report its first state before READY=1
SOURCES_READY_TIMEOUT_S = 30.0


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
    if cfg.web.enabled:
        from web.sink import WebSink

        web_sink = WebSink(cfg)
    pipeline = pipeline_factory(cfg, fresh=fresh, extra_sinks=[web_sink] if web_sink is not None else None)
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
            from web.server import start_web

            web_server = start_web(pipeline, web_sink, cfg)
        notifier.ready()
        notifier.status("labeling")
        log.info("ready")

        interval = notifier.watchdog_interval
        next_ping = 0.0
        while not pipeline.wait(0.25):
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
    finally:
        notifier.stopping()
        if web_server is not None:
            web_server.stop()
        pipeline.shutdown()
    failed = [n for n, s in pipeline.source_states().items() if s == "offline"]
    code = 1 if failed and not pipeline.stopped else 0
    return code, pipeline


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

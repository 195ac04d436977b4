"""Serve the web app inside the daemon with waitress, on a background thread.

Two steps, because the web sink must be in the pipeline before it starts::

    web_sink = WebSink(cfg)
    pipeline = Pipeline(cfg, extra_sinks=[web_sink])
    pipeline.start()
    server = start_web(pipeline, web_sink, cfg)   # -> WebServer(.url, .stop())
    ...
    server.stop()

Why waitress (see the platform notes): pure Python, production grade, runs
from a thread so the daemon keeps its main loop, and closes a streaming
response when the viewer leaves.  Each open live view holds one of its
``web.threads`` worker threads; the app caps live views below that number so
that the API always has threads left.

``start_web`` also installs the log panel's ring buffer on the root logger;
``stop`` removes it, ends the live views and joins every thread it started.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from waitress.server import create_server

from edgelabel.edge.certs import certificate_info
from edgelabel.edge.config import Config
from edgelabel.web.app import MAX_BODY_BYTES, create_app
from edgelabel.web.context import PipelineLike, WebContext
from edgelabel.web.logbuffer import RingLogHandler
from edgelabel.web.sink import WebSink
from edgelabel.web.tls import hsts_seconds, serve_tls, server_context, tls_files

log = logging.getLogger("edgelabel.web")

#: seconds a waitress connection may stay idle (live views are not idle: they keep sending); a request left
#: half-sent holds a connection slot this long, so it is short
CHANNEL_TIMEOUT = 15
#: how often idle connections are looked for (waitress: 30 s, which doubled the effective timeout)
CLEANUP_INTERVAL = 5
#: open connections before new ones wait in the backlog: far above what operators and live views use, so a
#: few hundred half-finished requests from the LAN cannot make /healthz time out (waitress: 100)
CONNECTION_LIMIT = 1000
#: file descriptors kept for the daemon itself (model, SQLite files, inputs, MQTT, the dataset) whatever the LAN
#: opens: each connection is one descriptor, and systemd's default soft limit is 1024, so 1000 connections from
#: the LAN would have left the dataset sink unable to open a file (EMFILE)
FD_RESERVE = 256


def _connection_limit() -> int:
    """CONNECTION_LIMIT, with the soft descriptor limit raised (within the hard one) to hold it plus FD_RESERVE;
    lowered, with a warning, where the hard limit does not allow that."""
    import resource

    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CONNECTION_LIMIT + FD_RESERVE
    if soft != inf and soft < want:
        new = want if hard == inf else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.debug("web: cannot raise the open-file limit to %d: %s", new, exc)
    limit = CONNECTION_LIMIT if soft == inf else min(CONNECTION_LIMIT, soft - FD_RESERVE)
    if limit < CONNECTION_LIMIT:
        limit = max(limit, 32)
        log.warning("web: at most %d connections at once (the open-file limit is %d); raise it (LimitNOFILE= in "
                    "the service unit) to %d for the full %d", limit, soft, want, CONNECTION_LIMIT)
    return limit


def _url_host(host: str) -> str:
    """The host part of a URL for a bind address: 0.0.0.0 / :: are reached on loopback; IPv6 in brackets."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WebServer:
    """A running web server: ``url`` to reach it, ``stop()`` to end it."""

    url: str
    app: Flask
    _server: Any
    _thread: threading.Thread
    _log_handler: RingLogHandler
    _stopped: bool = field(default=False)

    def stop(self, timeout: float = 5.0) -> None:
        """End live views, close every connection, stop the threads and remove the log handler (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        ctx: WebContext = self.app.extensions["edgelabel"]
        ctx.closing.set()
        ctx.sink.wake_viewers()
        server = self._server

        def close_all() -> None:  # runs on the server's own loop thread, so no race with it
            from waitress import wasyncore

            wasyncore.close_all(server._map)

        try:
            server.trigger.pull_trigger(close_all)
        except OSError:
            log.debug("web: the server loop was already closed", exc_info=True)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("web: the server thread did not stop within %.0f s", timeout)
        server.task_dispatcher.shutdown(timeout=timeout)
        self._log_handler.uninstall()
        log.info("web page stopped")


def early_log_handler() -> RingLogHandler:
    """The log panel's handler, installed now: what goes wrong while the pipeline starts reaches the page.

    Pass it to ``start_web``; the web server removes it when it stops (the caller does, if it never starts).
    """
    handler = RingLogHandler()
    handler.install()
    return handler


def start_web(pipeline: PipelineLike, web_sink: WebSink, cfg: Config, *, host: str | None = None,
              port: int | None = None, log_handler: RingLogHandler | None = None) -> WebServer:
    """Serve the web page for ``pipeline`` on ``cfg.web.host:port`` (or the overrides; port 0 picks a free one).

    Raises OSError (with the address in the message) when the address cannot be bound; nothing is left running then.
    """
    bind_host = cfg.web.host if host is None else host
    bind_port = cfg.web.port if port is None else port
    files = tls_files(cfg)  # before anything listens: a bad certificate stops the start with its file name
    tls_context = server_context(*files) if files else None
    handler = log_handler or RingLogHandler()  # one given is already installed (early_log_handler)
    app = create_app(cfg, pipeline, web_sink, log_handler=handler)
    if log_handler is None:
        handler.install()
    try:
        server = create_server(
            app,
            host=bind_host,
            port=bind_port,
            threads=cfg.web.threads,
            ident="edgelabel",
            channel_timeout=CHANNEL_TIMEOUT,
            cleanup_interval=CLEANUP_INTERVAL,
            connection_limit=_connection_limit(),
            # a larger body is refused from its Content-Length (or as it arrives, chunked) before any of it is
            # kept; waitress's own default (1 GiB, spooled to /tmp) applied before Flask's limit could
            max_request_body_size=MAX_BODY_BYTES,
            inbuf_overflow=MAX_BODY_BYTES * 2,
            asyncore_use_poll=True,
            expose_tracebacks=False,
            clear_untrusted_proxy_headers=True,
            url_scheme="https" if tls_context else "http",
            # behind a reverse proxy: the client's own address (throttles, logs) and scheme (Secure cookies)
            **({"trusted_proxy": cfg.web.trusted_proxy, "trusted_proxy_count": 1,
                "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"}} if cfg.web.trusted_proxy else {}),
        )
    except OSError as exc:
        handler.uninstall()
        raise OSError(exc.errno, f"web page: cannot listen on {bind_host}:{bind_port}: {exc.strerror or exc}") from exc
    except Exception:
        handler.uninstall()
        raise
    if tls_context is not None:
        serve_tls(server, tls_context)
    thread = threading.Thread(target=server.run, name="web-server", daemon=True)
    thread.start()
    scheme = "https" if tls_context else "http"
    url = f"{scheme}://{_url_host(bind_host)}:{server.effective_port}"
    if files:
        cert = certificate_info(files[0])
        hsts = hsts_seconds(cfg)
        log.info("web: HTTPS with %s (SHA-256 fingerprint %s, valid until %s%s)", files[0], cert.fingerprint,
                 cert.not_after.strftime("%Y-%m-%d"), f"; HSTS max-age={hsts}" if hsts is not None else "")
    elif not _loopback(bind_host) and not cfg.web.trusted_proxy:
        log.warning("web: the page is served over plain HTTP on %s: the operator token and session cookie cross "
                    "the network readable; set web.tls: auto (or {cert, key}), or put an HTTPS proxy in front",
                    bind_host)
    auth_note = "read-only pages open" if cfg.web.public_read else "every page needs the operator token"
    token_note = "the token from web.token" if cfg.web.token else f"the operator token is in {cfg.state_path(cfg.web.token_file)}"
    log.info("web page on %s (%s; %s)", url, auth_note, token_note)
    return WebServer(url=url, app=app, _server=server, _thread=thread, _log_handler=handler)

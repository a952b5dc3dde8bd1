"""run(settings): the event loop, the listening sockets, TLS, worker processes and the
graceful drain, put together.

This package is the only one that touches process-wide things (signals, fork, the loop
policy). serve() wires the concrete broker into the hub and the hub into the Application.
What can keep the server from starting (the TLS files, the address) is tried before any
worker is forked (startup.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Mapping

import tornado.httpserver

from echoserver import __version__
from echoserver.brokers import create_broker
from echoserver.config import Settings
from echoserver.runtime.intake import FrontDoor
from echoserver.runtime.limits import GC_YOUNG_THRESHOLD, check_open_files
from echoserver.runtime.logs import configure_logging
from echoserver.runtime.startup import StartupError, listen, report
from echoserver.runtime.tls import reload_tls, ssl_context
from echoserver.runtime.workers import fork_workers
from echoserver.web.app import EchoServerApp, make_app

log = logging.getLogger("echoserver")


HTTP_MAX_BODY = 64 * 1024
HTTP_IDLE_TIMEOUT = 60.0  # seconds, for plain HTTP requests (not WebSocket connections)


def choose_loop(choice: str) -> str:
    """Install the event loop the settings ask for ("auto": uvloop if installed); its name.

    config refuses loop = "uvloop" when uvloop is not installed.
    """
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(settings: Settings, sources: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0; 2 if the server cannot start.

    ``sources`` (from config.resolve) says where each setting came from, for the error line.
    """
    configure_logging(settings)
    check_open_files(settings)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # Until serve() handles it, a SIGHUP (a certificate reload) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        context = ssl_context(settings, sources)
        sockets = listen(settings, sources)
    except StartupError as error:
        report(settings, error)
        return 2
    port = sockets[0].getsockname()[1]
    loop_name = choose_loop(settings.loop)
    if settings.processes != 1:
        # Each worker returns here; the parent supervises and exits inside fork_workers.
        fork_workers(settings.processes or os.cpu_count() or 1, settings.shutdown_timeout)
    asyncio.run(serve(settings, sockets, port, loop_name, context))
    return 0


async def serve(
    settings: Settings,
    sockets: list[socket.socket],
    port: int,
    loop_name: str,
    context: ssl.SSLContext | None,
) -> None:
    # Stop signals are handled from here on, so one sent as soon as the ready line below
    # appears still drains and exits 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if context is not None and settings.processes != 1:
        # A worker may start long after the supervisor loaded the files (a restart after a
        # crash): it loads them again, so it serves what a reload would, not the original.
        with contextlib.suppress(StartupError):
            context = ssl_context(settings)
    broker = create_broker(settings.broadcast.broker)
    app = make_app(settings, broker)
    await app.server.start()
    server = FrontDoor(
        app,
        occupancy=app.server.occupancy,
        metrics=app.server.metrics,
        request_timeout=settings.limits.request_timeout,
        ssl_options=context,
        xheaders=False,
        # Only the publish API takes a request body (it raises the cap for itself). A
        # whole request must arrive within limits.request_timeout (FrontDoor's deadline);
        # the idle timeout is Tornado's own bound on waiting for headers, kept above it.
        max_body_size=HTTP_MAX_BODY,
        idle_connection_timeout=HTTP_IDLE_TIMEOUT,
        # A keep-alive connection's publish requests after its first served by the lane
        # (plain HTTP only: FrontDoor makes none with ssl_options).
        publish_lane=True,
    )
    server.add_sockets(sockets)
    loop.add_signal_handler(signal.SIGHUP, reload_tls, server, settings)
    scheme = "https" if context else "http"
    # Where a local browser reaches it: a wildcard address means this machine.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    log.info(
        "echoserver %s (%s mode, %s) page %s://%s:%d/ websocket %s://%s:%d%s",
        __version__,
        settings.mode,
        loop_name,
        scheme,
        host,
        port,
        "wss" if context else "ws",
        host,
        port,
        settings.websocket.path,
    )
    await stop.wait()
    await drain(app, server, settings.shutdown_timeout)


async def drain(app: EchoServerApp, server: tornado.httpserver.HTTPServer, timeout: float) -> None:
    """Refuse new clients, close every client with 1001, wait for them up to `timeout` seconds.

    The port stays open while clients leave, so /healthz can answer 503 "draining" (and a
    new handshake 503) to load balancers; it closes when the wait is over.
    """
    await app.server.drain(timeout)
    server.stop()
    await server.close_all_connections()
    await app.server.close()
    log.info("stopped")

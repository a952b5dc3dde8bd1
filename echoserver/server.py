"""run(settings): logging, the event loop, sockets, TLS, worker processes, graceful drain.

This is the only module that touches process-wide things (signals, fork, the loop policy).
It wires the concrete broker into the hub and the hub into the Application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import ssl
import sys
import time

import tornado.httpserver
import tornado.netutil
import tornado.process

from echoserver import __version__
from echoserver.app import EchoServerApp, make_app
from echoserver.brokers import create_broker
from echoserver.config import Settings
from echoserver.handlers import CLOSE_GOING_AWAY

log = logging.getLogger("echoserver")


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())
    if not settings.log.access:
        logging.getLogger("tornado.access").setLevel(logging.WARNING)


def install_uvloop() -> str:
    """Use uvloop when it is installed; return the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls.certfile, settings.tls.keyfile)
    return context


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    configure_logging(settings)
    sockets = tornado.netutil.bind_sockets(settings.port, settings.host, family=socket.AF_INET)
    port = sockets[0].getsockname()[1]
    if settings.processes != 1:
        # Each child returns here with its own id; the parent never returns from fork_processes.
        tornado.process.fork_processes(settings.processes or None)
    loop_name = install_uvloop()
    asyncio.run(serve(settings, sockets, port, loop_name))


async def serve(
    settings: Settings, sockets: list[socket.socket], port: int, loop_name: str
) -> None:
    broker = create_broker(settings.broadcast.broker)
    app = make_app(settings, broker)
    await app.hub.start()
    context = ssl_context(settings)
    server = tornado.httpserver.HTTPServer(app, ssl_options=context, xheaders=False)
    server.add_sockets(sockets)
    scheme = "https" if context else "http"
    host = settings.host if settings.host not in ("0.0.0.0", "") else "127.0.0.1"
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await drain(app, server, settings.shutdown_timeout)


async def drain(app: EchoServerApp, server: tornado.httpserver.HTTPServer, timeout: float) -> None:
    """Stop accepting, close every client with 1001, wait for them up to `timeout` seconds."""
    log.info("draining %d connections (up to %.1fs)", len(app.connections), timeout)
    app.draining = True
    server.stop()
    for connection in list(app.connections):
        connection.close(CLOSE_GOING_AWAY, "server shutting down")
    deadline = time.monotonic() + timeout
    while app.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if app.connections:
        log.warning("%d connections did not close in time", len(app.connections))
    await server.close_all_connections()
    await app.hub.close()
    log.info("stopped")

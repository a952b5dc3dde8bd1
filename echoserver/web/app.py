"""make_app(settings) -> the tornado Application: routes, static files and server state.

The Application owns everything that lives as long as the server: the settings, the hub,
the metrics registry and the set of open connections. Handlers reach it as a
context.ServerContext; nothing is kept in module or class attributes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import tornado.httputil
import tornado.web

from echoserver import routes
from echoserver.brokers import Broker, MemoryBroker
from echoserver.config import Settings
from echoserver.endpoints.access import log_request
from echoserver.endpoints.base import HostRefused, NotFound
from echoserver.endpoints.mixed import MixedSocket
from echoserver.endpoints.occupancy import Occupancy
from echoserver.endpoints.sse import EventStream
from echoserver.endpoints.websocket import BaseSocket, BroadcastSocket, EchoSocket
from echoserver.fanout.hub import Hub
from echoserver.metrics import Metrics
from echoserver.transport.flusher import Flusher
from echoserver.transport.keepalive import Keepalive
from echoserver.web import handlers, redact
from echoserver.wire.handshake import normalise_origin
from echoserver.wire.hosts import HostPolicy, Throttle

# Seconds between two warnings about a refused Host; the ones between are counted in the
# next, and each is logged at debug.
HOST_WARNING_INTERVAL = 60.0


# The WebSocket endpoint for each mode.
SOCKETS: dict[str, type[BaseSocket]] = {
    "echo": EchoSocket,
    "broadcast": BroadcastSocket,
    "mixed": MixedSocket,
}


def static_dir(settings: Settings) -> Path:
    """The page's directory: the configured one, else the one shipped with the package."""
    if settings.static_dir:
        return Path(settings.static_dir)
    package = Path(__file__).parent.parent
    installed = package / "static"  # a wheel install puts the page here
    if installed.is_dir():
        return installed
    return package.parent / "static"  # a source checkout or editable install


class EchoServerApp(tornado.web.Application):
    def __init__(self, config: Settings, hub: Hub) -> None:
        self.config = config
        self.hub = hub
        self.connections: set[BaseSocket | EventStream] = set()
        self.metrics = Metrics(self._open_connections, lambda: hub.stats)
        self.flusher = Flusher()
        ws = config.websocket
        self.keepalive = Keepalive(ws.ping_interval, ws.ping_timeout)
        self.allowed_origins = frozenset(
            normalise_origin(origin) for origin in config.websocket.allowed_origins
        )
        redact.install(ws.auth_token, config.api.key)  # Tornado's lines, embedded too
        self.hosts = HostPolicy.build(config.host, ws.allowed_hosts)
        self.refused_hosts = Throttle(HOST_WARNING_INTERVAL)
        self.draining = False
        self.handshakes = 0  # WebSocket handshakes under way, not yet open
        self.occupancy = Occupancy(ws.max_connections, ws.max_connections_per_ip)
        self.metrics.held_connections = lambda: self.occupancy.total
        self.started = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        page = static_dir(config)
        ws_path = config.websocket.path
        socket = SOCKETS[config.mode]
        page_files = {"path": str(page), "default_filename": "index.html"}
        # The WebSocket routes first: a reconnect storm is thousands of handshakes a second,
        # and each rule before them is one more regex tried per handshake. The order
        # changes no match (config refuses a WebSocket path that overlaps another route).
        rules: list[Any] = [(routes.exact(ws_path), socket)]
        if config.mode != "echo":
            rules.append((routes.with_channel(ws_path), socket))
        rules += [
            # An empty file path: the handler serves default_filename.
            (rf"{routes.exact(routes.PAGE)}()", handlers.PageHandler, page_files),
            (routes.exact(routes.HEALTH), handlers.HealthHandler),
            (routes.exact(routes.METRICS), handlers.MetricsHandler),
            (routes.exact(routes.PROTOCOL), handlers.ProtocolHandler),
            (routes.with_channel(routes.CHANNELS), handlers.ChannelHandler),
            (routes.channel_messages(), handlers.PublishHandler),
        ]
        if config.mode != "echo":
            # A channel as Server-Sent Events: /sse is channel "default".
            rules.append((routes.exact(routes.SSE), EventStream))
            rules.append((routes.with_channel(routes.SSE), EventStream))
        super().__init__(
            rules,
            # Tornado adds STATIC/(.*) and STATIC_FILES for static_path.
            static_path=str(page),
            static_url_prefix=routes.STATIC + "/",
            static_handler_class=handlers.PageHandler,
            log_function=log_request,
            default_handler_class=NotFound,
            access_log=config.log.access,
        )

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        # Before any route: a rebound page reads the page, /healthz and the APIs as well as
        # the WebSocket. A request without Host (HTTP/1.0) is not a browser's (hosts.py).
        if not self.hosts.allows(request.headers.get("Host")):
            return self.get_handler_delegate(request, HostRefused)
        return super().find_handler(request, **kwargs)

    def _open_connections(self) -> Counter[tuple[str, str]]:
        return Counter((self.config.mode, c.channel) for c in self.connections)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def make_app(settings: Settings, broker: Broker | None = None) -> EchoServerApp:
    """The Application for these settings; the memory broker unless one is given."""
    hub = Hub(
        broker or MemoryBroker(),
        include_sender=settings.broadcast.include_sender,
        history=settings.broadcast.history,
        history_ttl=settings.broadcast.history_ttl,
        history_bytes=settings.broadcast.history_bytes,
        history_total_bytes=settings.broadcast.history_total_bytes,
        publish_timeout=settings.broadcast.publish_timeout,
        max_queue_bytes=settings.broadcast.max_queue_bytes,
        slow_client=settings.broadcast.slow_client,
    )
    return EchoServerApp(settings, hub)

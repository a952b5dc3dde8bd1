"""make_app(settings) -> the tornado Application: routes, static files and server state.

ServerState owns everything that lives as long as the server: the settings, the hub, the
metrics registry, the set of open connections, and the one route table (routes()), whose
every rule hands the state to its handler (context.ServerContext); nothing is kept in
module or class attributes. EchoServerApp is the server's own Application: those routes at
the root, plus the page and its assets. echoserver.embed mounts the same routes, under a
prefix, in a user's Application.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web

from echoserver import routes
from echoserver.auth.authority import Authority
from echoserver.brokers import Broker, MemoryBroker
from echoserver.brokers.lifecycle_holds import holds_for
from echoserver.config import Settings
from echoserver.endpoints.access import log_request
from echoserver.endpoints.base import HostRefused, NotFound
from echoserver.endpoints.mixed import MixedSocket
from echoserver.endpoints.occupancy import Occupancy
from echoserver.endpoints.sse import EventStream
from echoserver.endpoints.websocket import BaseSocket, BroadcastSocket, EchoSocket
from echoserver.fanout.hub import Hub
from echoserver.fanout.lifecycle import Lifecycle, TrackedPresence
from echoserver.fanout.presence import Roster
from echoserver.metrics import Metrics
from echoserver.transport.flusher import Flusher
from echoserver.transport.keepalive import Keepalive
from echoserver.transport.publish_lane import Lanes
from echoserver.web import batch_api, handlers, presence_api, redact, snapshots, users
from echoserver.web.publish_delegate import PublishRoute
from echoserver.webhooks import build as build_webhooks
from echoserver.wire.handshake import normalise_origin
from echoserver.wire.hosts import HostPolicy, Throttle

# Seconds between two warnings about a refused Host; the ones between are counted in the
# next, and each is logged at debug.
HOST_WARNING_INTERVAL = 60.0

log = logging.getLogger("echoserver")


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


class RefusedHost(tornado.routing.Matcher):
    """Matches a request under `prefix` whose Host the policy refuses: the mounted routes'
    own Host check (EchoServerApp checks every request before routing instead)."""

    def __init__(self, prefix: str, hosts: HostPolicy) -> None:
        self.under = re.compile(rf"{re.escape(prefix)}(?:/|$)")
        self.hosts = hosts

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if request.path is None or not self.under.match(request.path):
            return None
        if self.hosts.allows(request.headers.get("Host")):
            return None
        return {}


class ServerState:
    """The server-wide state every handler reaches (it satisfies context.ServerContext),
    and the route table that hands it to them."""

    def __init__(self, config: Settings, hub: Hub, prefix: str = "") -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"a route prefix starts with / and does not end with one: {prefix!r}")
        self.config = config
        self.prefix = prefix
        self.hub = hub
        self.connections: set[BaseSocket | EventStream] = set()
        self.metrics = Metrics(self._open_connections, lambda: hub.stats)
        self.flusher = Flusher()
        ws = config.websocket
        self.keepalive = Keepalive(ws.ping_interval, ws.ping_timeout)
        self.allowed_origins = frozenset(
            normalise_origin(origin) for origin in config.websocket.allowed_origins
        )
        self.authority = Authority(config)
        if config.namespaces:
            hub.keep_history(self.authority.rights.retention)
        # Tornado's lines, embedded too
        redact.install(ws.auth_token, config.api.key, *self.authority.verifier.secrets())
        self.hosts = HostPolicy.build(config.host, ws.allowed_hosts)
        self.refused_hosts = Throttle(HOST_WARNING_INTERVAL)
        self.draining = False
        self.lanes: Lanes | None = None  # set by the server's own FrontDoor when plain
        self.handshakes = 0  # WebSocket handshakes under way, not yet open
        self.occupancy = Occupancy(ws.max_connections, ws.max_connections_per_ip)
        self.metrics.held_connections = lambda: self.occupancy.total
        self.started = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Lifecycle webhooks (a no-op without webhooks.url), decided by the lifecycle holds
        # (fanout/lifecycle.py): user_online/offline, channel_occupied/vacated and
        # user_joined/left, each in one atomic write with the ledger; they also sweep a
        # crashed process's users (their leaves). The Roster decides join/leave signals.
        grace = config.broadcast.presence_grace
        self.webhooks = build_webhooks(config.webhooks, hub.broker, self.metrics.webhooks)
        tracked = self._tracks_lifecycle()
        self.roster = Roster(
            hub, grace=grace, announces=self._announces_join_leave, lists_users=tracked
        )
        self.lifecycle: Lifecycle | None = None
        if tracked:
            holds = holds_for(hub.broker, self.webhooks.ledger)
            self.lifecycle = Lifecycle(hub, holds, self.webhooks, self.roster, grace=grace)
            hub.presence = TrackedPresence(hub.presence, self.lifecycle)
            self.authority.on_user = self.lifecycle.user_count

    def _tracks_lifecycle(self) -> bool:
        """Whether anything reads the lifecycle holds or the users on a channel: the
        webhooks, the snapshots and the presence API (the API key), or join_leave
        namespaces (joins, leaves, and a crashed process's users' leaves)."""
        return (
            self.webhooks.enabled
            or bool(self.config.api.key)
            or any(ns.join_leave for ns in self.config.namespaces)
        )

    def routes(
        self, *, check_host: bool = False, direct: bool = False
    ) -> list[tornado.routing.Rule]:
        """The WebSocket endpoint, /healthz, /metrics, the channel and publish APIs and (but
        in echo mode) the event streams, each under the prefix. `check_host`: a first rule
        answering a refused Host under the prefix with 403 (for an Application that does
        not check Host itself, as EchoServerApp does). `direct`: the publish API's two
        POST routes served by message delegates (publish_delegate.py) rather than request
        handlers; for the server's own Application, whose settings they take as known
        (an embedding application's transforms and log_function apply to handlers only)."""
        config = self.config
        prefix = self.prefix
        state = {"server": self}
        socket = SOCKETS[config.mode]
        ws_path = prefix + config.websocket.path
        rules: list[tornado.routing.Rule] = []
        if check_host:
            rules.append(tornado.routing.Rule(RefusedHost(prefix, self.hosts), HostRefused, state))
        # The WebSocket routes first: a reconnect storm is thousands of handshakes a second,
        # and each rule before them is one more regex tried per handshake. The order
        # changes no match (config refuses a WebSocket path that overlaps another route).
        paths: list[tuple[str, Any]] = [(routes.exact(ws_path), socket)]
        publish: Any = handlers.PublishHandler
        batch: Any = batch_api.BatchPublishHandler
        if direct:
            publish = PublishRoute(self, batch=False)
            batch = PublishRoute(self, batch=True)
        if config.mode != "echo":
            paths.append((routes.with_channel(ws_path), socket))
        paths += [
            (routes.exact(prefix + routes.HEALTH), handlers.HealthHandler),
            (routes.exact(prefix + routes.METRICS), handlers.MetricsHandler),
            (routes.exact(prefix + routes.PROTOCOL), handlers.ProtocolHandler),
            (routes.with_channel(prefix + routes.CHANNELS), handlers.ChannelHandler),
            (routes.channel_messages(prefix), publish),
            (routes.exact(prefix + routes.PUBLISH), batch),
            (routes.channel_presence(prefix), presence_api.PresenceHandler),
            (routes.user_messages(prefix), users.UserMessagesHandler),
            (routes.user_connections(prefix), users.UserConnectionsHandler),
            (routes.exact(prefix + routes.CHANNELS), snapshots.ChannelsSnapshot),
            (routes.user(prefix), snapshots.UserSnapshot),
        ]
        if config.mode != "echo":
            # A channel as Server-Sent Events: /sse is channel "default".
            paths.append((routes.exact(prefix + routes.SSE), EventStream))
            paths.append((routes.with_channel(prefix + routes.SSE), EventStream))
        rules += [
            tornado.routing.Rule(tornado.routing.PathMatches(pattern), handler, state)
            for pattern, handler in paths
        ]
        return rules

    async def start(self) -> None:
        """Connect the broker, fetch a remote JWKS, and listen for the user API's control
        messages from every process."""
        await self.hub.start()
        self.webhooks.start()
        if self.lifecycle is not None:
            self.lifecycle.start()
        if self.authority.uses_tokens:
            await self.authority.start()
            await self.hub.listen(self.authority.on_control)

    def _announces_join_leave(self, channel: str) -> bool:
        """Whether the channel's namespace has join_leave = true."""
        namespace = self.authority.rights.namespace_of(channel)
        return namespace is not None and namespace.settings.join_leave

    def _open_connections(self) -> Counter[tuple[str, str]]:
        return Counter((self.config.mode, c.channel) for c in self.connections)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Refuse new clients, close every client with 1001, wait for them up to `timeout`
        seconds."""
        log.info("draining %d connections (up to %.1fs)", len(self.connections), timeout)
        self.draining = True
        for connection in list(self.connections):
            connection.going_away()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("%d connections did not close in time", len(self.connections))

    async def close(self) -> None:
        """Stop the background work: the keepalive, the expiry clock and the hub (its broker
        included)."""
        self.keepalive.close()
        self.authority.close()
        self.roster.close()
        # Before the broker closes: the lifecycle's last writes still need it.
        if self.lifecycle is not None:
            await self.lifecycle.close()
        await self.webhooks.close(self.config.webhooks.timeout)
        await self.hub.close()


class EchoServerApp(tornado.web.Application):
    """The server's own Application: ServerState's routes at the root, and the page."""

    def __init__(self, config: Settings, hub: Hub) -> None:
        self.server = state = ServerState(config, hub)
        page = static_dir(config)
        page_files = {"server": state, "path": str(page), "default_filename": "index.html"}
        rules: list[Any] = state.routes(direct=True)
        # An empty file path: the handler serves default_filename.
        rules.append((rf"{routes.exact(routes.PAGE)}()", handlers.PageHandler, page_files))
        super().__init__(
            rules,
            # Tornado adds STATIC/(.*) and STATIC_FILES for static_path.
            static_path=str(page),
            static_url_prefix=routes.STATIC + "/",
            static_handler_class=handlers.PageHandler,
            static_handler_args={"server": state},
            log_function=log_request,
            default_handler_class=NotFound,
            default_handler_args={"server": state},
            access_log=config.log.access,
        )

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        # Before any route: a rebound page reads the page, /healthz and the APIs as well as
        # the WebSocket. A request without Host (HTTP/1.0) is not a browser's (hosts.py).
        if not self.server.hosts.allows(request.headers.get("Host")):
            return self.get_handler_delegate(request, HostRefused, {"server": self.server})
        return super().find_handler(request, **kwargs)


def new_hub(settings: Settings, broker: Broker | None = None) -> Hub:
    """The hub for these settings, on `broker` (the memory broker unless one is given)."""
    broadcast = settings.broadcast
    return Hub(
        broker or MemoryBroker(),
        include_sender=broadcast.include_sender,
        history=broadcast.history,
        history_ttl=broadcast.history_ttl,
        history_bytes=broadcast.history_bytes,
        history_total_bytes=broadcast.history_total_bytes,
        publish_timeout=broadcast.publish_timeout,
        max_queue_bytes=broadcast.max_queue_bytes,
        slow_client=broadcast.slow_client,
    )


def make_app(settings: Settings, broker: Broker | None = None) -> EchoServerApp:
    """The Application for these settings; the memory broker unless one is given."""
    return EchoServerApp(settings, new_hub(settings, broker))

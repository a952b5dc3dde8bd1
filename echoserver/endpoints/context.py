"""What request handlers may use of the server, as a protocol web.app.ServerState satisfies.

Handlers reach the server-wide state (settings, hub, metrics, open connections, the drain
flag) through ServerContext instead of importing web/app.py, so imports flow one way:
web.app -> web.handlers and the endpoints -> context. Each route passes it in its init
kwargs ({"server": state}), not through the Application, so the handlers also work mounted
in someone else's tornado.web.Application (echoserver.embed).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from echoserver.auth.authority import Authority
from echoserver.config import Settings
from echoserver.endpoints.occupancy import Occupancy
from echoserver.fanout.hub import Hub
from echoserver.fanout.lifecycle import Lifecycle
from echoserver.fanout.presence import Roster
from echoserver.metrics import Metrics
from echoserver.transport.flusher import Flusher
from echoserver.transport.keepalive import Keepalive
from echoserver.transport.publish_lane import Lanes
from echoserver.webhooks import Webhooks
from echoserver.wire.hosts import HostPolicy, Throttle


class ServerContext(Protocol):
    config: Settings
    prefix: str  # the path the routes are mounted under ("" when the server runs itself)
    hub: Hub
    metrics: Metrics
    connections: set[Any]  # the open WebSocket endpoints and event streams (going_away())
    draining: bool  # SIGTERM received: refuse new clients, close the rest with 1001
    handshakes: int  # WebSocket handshakes under way, counted against max_connections
    # Every accepted connection's slot (when served by intake.FrontDoor; an embedding
    # app's own HTTPServer fills none, and len(connections) + handshakes counts instead).
    occupancy: Occupancy
    flusher: Flusher
    keepalive: Keepalive
    allowed_origins: frozenset[str]  # normalised websocket.allowed_origins
    started: float  # time.monotonic() at start
    refused_hosts: Throttle  # the warning about a refused Host (base.HostRefused)
    hosts: HostPolicy  # the Host values served (a rebound page's are refused)
    # The publish lane (transport/publish_lane.py) of the server's own plain HTTPServer;
    # None over TLS and in an embedding application.
    lanes: Lanes | None
    authority: Authority  # tokens, rights, expiry, users (the auth package)
    roster: Roster  # users per channel, their joins and leaves (fanout/presence.py)
    webhooks: Webhooks  # lifecycle events, delivered by the lifecycle holds (fanout/lifecycle.py)
    # Users online and channels occupied across processes (fanout/lifecycle.py); None when
    # nothing reads them (no webhooks, no API key, no join_leave namespace).
    lifecycle: Lifecycle | None

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""

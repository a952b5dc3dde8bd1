"""The plain HTTP routes: the page and its assets, /healthz, /metrics, the channel API.

The WebSocket endpoints are in sockets.py. Handlers reach the server-wide state through
context.ServerContext, which the Application satisfies.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import tornado.web

from echoserver import __version__, routes
from echoserver.context import ServerContext
from echoserver.framing import CloseCode
from echoserver.metrics import CONTENT_TYPE_LATEST


class JSONHandler(tornado.web.RequestHandler):
    @property
    def server(self) -> ServerContext:
        return cast(ServerContext, self.application)

    def write_json(self, body: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


class HealthHandler(JSONHandler):
    quiet_when_ok = True  # probes come every few seconds

    def get(self) -> None:
        server = self.server
        hub = server.hub
        if server.draining:
            status, reason = "draining", "server is shutting down"
        elif not hub.healthy:
            status, reason = "degraded", hub.health_reason or "broker unavailable"
        else:
            status, reason = "ok", ""
        config = server.config
        body = {
            "status": status,
            "mode": config.mode,
            "version": __version__,
            "connections": len(server.connections),
            "uptime": round(time.monotonic() - server.started, 3),
            "path": config.websocket.path,  # where the page connects
            "auth": bool(config.websocket.auth_token),  # whether it needs a token
        }
        if reason:
            body["reason"] = reason
        self.write_json(body, 200 if status == "ok" else 503)


class ProtocolHandler(JSONHandler):
    """What a client needs to know of the protocol, from its one source: channel names and
    close codes (the page reads it instead of repeating them)."""

    def get(self) -> None:
        codes = {str(int(code)): code.label for code in CloseCode}
        self.write_json({"channel_pattern": routes.CHANNEL_PATTERN, "close_codes": codes})


class ChannelHandler(JSONHandler):
    async def get(self, channel: str) -> None:
        members = await self.server.hub.members(channel)
        self.write_json({"channel": channel, "members": members})


class MetricsHandler(tornado.web.RequestHandler):
    quiet_when_ok = True  # scrapes come every few seconds

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(cast(ServerContext, self.application).metrics.render())


class PageHandler(tornado.web.StaticFileHandler):
    """The page and its assets: revalidated by ETag on every load (a 304 when unchanged),
    so an upgraded server never leaves a browser on a stale page; a ?v= URL is cached for
    good (Tornado's versioned static URLs)."""

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")

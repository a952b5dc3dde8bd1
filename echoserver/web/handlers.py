"""The plain HTTP routes: the page and its assets, /healthz, /metrics, the channel API and
the publish API (POST /api/channels/<channel>/messages).

The WebSocket endpoints are in endpoints/websocket.py and endpoints/mixed.py. Handlers
reach the server-wide state through endpoints.context.ServerContext, given in each route's
init kwargs (web/app.py builds them).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import tornado.web

from echoserver import __version__, routes
from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.base import BaseHandler
from echoserver.endpoints.context import ServerContext
from echoserver.metrics import CONTENT_TYPE_LATEST
from echoserver.wire.envelopes import Refused, body_message
from echoserver.wire.framing import CloseCode
from echoserver.wire.handshake import bearer_token, token_matches


class JSONHandler(BaseHandler):
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
            "path": server.prefix + config.websocket.path,  # where the page connects
            # the token it wants: "none", "token" (the shared auth_token) or "jwt"
            "auth": server.authority.kind,
            # with "jwt": whether a client without a token is let in as a guest
            "anonymous": server.authority.anonymous,
            # whether /metrics and /api/channels/... need the API key (the page then
            # shows no member count)
            "protect_reads": config.api.protect_reads,
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


class ProtectedRead(BaseHandler):
    """A read that api.protect_reads puts behind `Authorization: Bearer <api.key>` (401
    otherwise): who is on which channel, and the counters, are the operator's to see."""

    def prepare(self) -> None:
        api = self.server.config.api
        if not api.protect_reads:
            return
        given = bearer_token(self.request.headers.get("Authorization"))
        if given is not None and token_matches(given, api.key):
            return
        self.set_status(401)
        self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"error": "missing or wrong API key (api.protect_reads)"}))


class ChannelHandler(ProtectedRead, JSONHandler):
    async def get(self, channel: str) -> None:
        members = await self.server.hub.members(channel)
        self.write_json({"channel": channel, "members": members})


def api_key_refusal(key: str, authorization: str | None) -> Refused | None:
    """404 when the API is off (no api.key), 401 without the right key, else None."""
    if not key:
        return Refused(404, "the publish API is off (no api.key)")
    given = bearer_token(authorization)
    if given is None or not token_matches(given, key):
        return Refused(401, "missing or wrong API key")
    return None


CHUNK_SLACK = 64 * 1024  # bytes a chunked publish body may run past the limit before 413


@tornado.web.stream_request_body
class PublishHandler(JSONHandler):
    """POST /api/channels/<channel>/messages: a backend publishes the body to the channel.

    It only maps outcomes to statuses: the body's rules are in wire/envelopes.py, publishing is
    the hub's. The body is streamed in, so a request refused by its headers (no API key,
    wrong key, too big) is answered before its body is read, and the server's small body
    cap for other routes is raised to websocket.max_message_size here only.
    """

    _body: list[bytes]
    _size = 0
    _refused = False

    def prepare(self) -> None:
        self._body = []
        refused = self._check_headers()
        if refused is not None:
            self._refuse(refused)
            return
        set_max_body_size = getattr(self.request.connection, "set_max_body_size", None)
        if set_max_body_size is not None:
            # A chunked body is counted in data_received, which answers 413; the slack lets
            # the chunk that crosses the limit arrive (past it Tornado closes with 400).
            set_max_body_size(self.body_limit() + CHUNK_SLACK)

    def _check_headers(self) -> Refused | None:
        config = self.server.config
        if config.mode == "echo":
            return Refused(404, "no channels in echo mode")
        refused = api_key_refusal(config.api.key, self.request.headers.get("Authorization"))
        if refused is not None:
            return refused
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.body_limit():
            return self._too_big()
        return None

    def body_limit(self) -> int:
        """The largest body taken, in bytes."""
        return self.server.config.websocket.max_message_size

    def _too_big(self) -> Refused:
        limit = self.server.config.websocket.max_message_size
        return Refused(413, f"the message is over websocket.max_message_size ({limit} bytes)")

    def data_received(self, chunk: bytes) -> None:
        if self._refused:
            return
        self._size += len(chunk)
        if self._size > self.body_limit():
            self._refuse(self._too_big())  # a chunked body, without Content-Length
            return
        self._body.append(chunk)

    async def post(self, channel: str) -> None:
        if not self._refused:
            await self.publish_body(channel)

    async def publish_body(self, channel: str) -> None:
        """Publish the request's body to the channel and answer its offset."""
        mixed = self.server.config.mode == "mixed"
        content_type = self.request.headers.get("Content-Type")
        try:
            data, binary = body_message(b"".join(self._body), content_type, mixed)
            posted = await self.server.hub.post(channel, data, binary)
        except Refused as refused:
            self._refuse(refused)
            return
        except BrokerUnavailable as exc:
            self._refuse(Refused(503, f"not published: {exc}"))
            return
        body = {
            "channel": channel,
            "offset": posted.offset,
            "epoch": posted.epoch,
            "local_receivers": posted.local_receivers,
            "receivers": posted.receivers,
        }
        self.write_json(body)

    def _refuse(self, refused: Refused) -> None:
        self._refused = True
        if refused.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
        self.write_json({"error": refused.message}, refused.status)

    def on_finish(self) -> None:
        self.server.metrics.api_requests[self.get_status()] += 1


class MetricsHandler(ProtectedRead):
    quiet_when_ok = True  # scrapes come every few seconds

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.server.metrics.render())


# A Host safe to repeat in the page's CSP (Tornado admits more characters, ";" among them).
CSP_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def page_policy(host: str) -> str:
    """The page's Content-Security-Policy: its own origin only, and its WebSocket URL."""
    connect = "'self'"
    if CSP_HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        f"default-src 'self'; connect-src {connect}; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


class PageHandler(BaseHandler, tornado.web.StaticFileHandler):
    """The page and its assets: revalidated by ETag on every load (a 304 when unchanged),
    so an upgraded server never leaves a browser on a stale page; a ?v= URL is cached for
    good (Tornado's versioned static URLs). Every response, errors included, carries the
    page's security headers: no framing, no referrer, nothing from another origin."""

    def initialize(  # type: ignore[override]
        self, server: ServerContext, path: str, default_filename: str | None = None
    ) -> None:
        BaseHandler.initialize(self, server)
        tornado.web.StaticFileHandler.initialize(self, path, default_filename)

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Security-Policy", page_policy(self.request.host))
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")

    def parse_url_path(self, url_path: str) -> str:
        if "\x00" in url_path:  # no file has it, and os calls raise on it (a 500)
            raise tornado.web.HTTPError(400)
        return super().parse_url_path(url_path)

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")

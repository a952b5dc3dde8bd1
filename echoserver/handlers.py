"""Request handlers: the WebSocket endpoints (echo, broadcast, mixed) and the small JSON routes.

Handlers are thin: they check the handshake, turn frames into hub calls and hub deliveries
into frames. Channel membership and fan-out live in hub.py; the server-wide state (settings,
hub, metrics, open connections) is owned by the Application (see app.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket

from echoserver import __version__
from echoserver.brokers.base import BrokerUnavailable, Envelope
from echoserver.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from echoserver.app import EchoServerApp

log = logging.getLogger("echoserver.ws")

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class BaseSocket(tornado.websocket.WebSocketHandler):
    """What every WebSocket endpoint shares: handshake checks and connection bookkeeping."""

    application: EchoServerApp
    channel = "default"

    def prepare(self) -> None:
        app = self.application
        ws = app.config.websocket
        if app.draining:
            self._refuse(503, "draining", "server is shutting down")
        elif ws.auth_token and not self._token_ok(ws.auth_token):
            self._refuse(401, "auth", "missing or wrong token")
        elif ws.max_connections and len(app.connections) >= ws.max_connections:
            self._refuse(503, "full", "server is full")

    def _token_ok(self, expected: str) -> bool:
        header = self.request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        given = given or self.get_query_argument("token", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.application.metrics.handshakes_refused.labels(reason).inc()
        log.info("refused %s from %s: %s", self.request.path, self.request.remote_ip, message)
        self.set_status(status)
        self.finish(message)

    def check_origin(self, origin: str) -> bool:
        allowed = self.application.allowed_origins
        if "*" in allowed:
            ok = True
        elif allowed:
            ok = origin.rstrip("/").lower() in allowed
        else:
            ok = urlsplit(origin).netloc.lower() == self.request.host.lower()
        if not ok:
            self.application.metrics.handshakes_refused.labels("origin").inc()
            log.info(
                "refused %s from %s: origin %r", self.request.path, self.request.remote_ip, origin
            )
        return ok

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.application.config.websocket.compression else None

    def open(self, *args: str, **kwargs: str) -> None:
        app = self.application
        app.connections.add(self)
        app.metrics.connections.labels(app.config.mode, self.channel).inc()

    def on_close(self) -> None:
        app = self.application
        if self in app.connections:
            app.connections.discard(self)
            app.metrics.connections.labels(app.config.mode, self.channel).dec()
        app.metrics.closes.labels(str(self.close_code or 1006)).inc()

    def send(self, data: bytes | str, binary: bool) -> None:
        """Queue one message to this client; a closed connection just drops it."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        self.application.metrics.messages_out.inc()
        self.application.metrics.bytes_out.inc(len(data))
        self.write_message(data, binary=binary)

    def count_in(self, message: str | bytes) -> None:
        self.application.metrics.messages_in.inc()
        self.application.metrics.bytes_in.inc(len(message))


class EchoSocket(BaseSocket):
    """Each message goes back to its sender, same bytes, same type."""

    def on_message(self, message: str | bytes) -> None:
        self.count_in(message)
        self.send(message, isinstance(message, bytes))


class ChannelSocket(BaseSocket):
    """A member of one channel: what the hub delivers goes to this client."""

    sub_id = ""

    async def open(self, channel: str | None = None) -> None:  # type: ignore[override]
        self.channel = channel or "default"
        super().open()
        hub = self.application.hub
        self.sub_id = hub.new_subscriber_id()
        await hub.join(self.channel, self)

    def on_close(self) -> None:
        super().on_close()
        if self.sub_id:
            self.application.spawn(self.application.hub.leave(self.channel, self))

    def deliver(self, envelope: Envelope) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        app = self.application
        stream = self.ws_connection.stream  # type: ignore[attr-defined]
        unsent = stream._total_write_index - stream._total_write_done_index
        if unsent + len(envelope.data) > app.config.broadcast.max_queue_bytes:
            self._fall_behind()
            return
        app.metrics.deliveries.labels(self.channel).inc()
        self.send(envelope.data, envelope.binary)

    def _fall_behind(self) -> None:
        app = self.application
        if app.config.broadcast.slow_client == "disconnect":
            app.metrics.slow_disconnects.labels(self.channel).inc()
            log.warning("closing slow client %s on %s (1013)", self.request.remote_ip, self.channel)
            self.close(CLOSE_TRY_AGAIN, "receiving too slowly")
        else:
            app.metrics.drops.labels(self.channel).inc()

    async def publish(self, data: bytes, binary: bool) -> bool:
        """Publish to this channel; tell the sender (and return False) if the broker is down."""
        try:
            await self.application.hub.publish(self.channel, data, binary, self.sub_id)
        except BrokerUnavailable as exc:
            self.send(json.dumps({"type": "error", "error": f"not delivered: {exc}"}), False)
            return False
        return True


class BroadcastSocket(ChannelSocket):
    """Each message goes to every member of the channel."""

    async def on_message(self, message: str | bytes) -> None:
        self.count_in(message)
        if isinstance(message, str):
            await self.publish(message.encode(), False)
        else:
            await self.publish(message, True)


class MixedSocket(ChannelSocket):
    """The websocket-shootout protocol: a JSON envelope chooses echo or broadcast."""

    async def on_message(self, message: str | bytes) -> None:
        self.count_in(message)
        try:
            request = json.loads(message)
            kind = request["type"] if isinstance(request, dict) else None
        except (ValueError, KeyError):
            self._error("expected a JSON object with a type")
            return
        if kind == "echo":
            self.send(message, False)  # the reply is the request, byte for byte
        elif kind == "broadcast":
            text = message if isinstance(message, str) else message.decode()
            if await self.publish(text.encode(), False):
                listeners = await self.application.hub.members(self.channel)
                result = {
                    "type": "broadcastResult",
                    "payload": request.get("payload"),
                    "listenCount": listeners,
                }
                self.send(json.dumps(result), False)
        else:
            self._error(f"unknown type {kind!r}; expected 'echo' or 'broadcast'")

    def _error(self, text: str) -> None:
        self.send(json.dumps({"type": "error", "error": text}), False)


class JSONHandler(tornado.web.RequestHandler):
    application: EchoServerApp

    def write_json(self, body: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


class HealthHandler(JSONHandler):
    def get(self) -> None:
        app = self.application
        broker = app.hub.broker
        if app.draining:
            status, reason = "draining", "server is shutting down"
        elif not broker.healthy:
            status, reason = "degraded", broker.health_reason or "broker unavailable"
        else:
            status, reason = "ok", ""
        body = {
            "status": status,
            "mode": app.config.mode,
            "version": __version__,
            "connections": len(app.connections),
            "uptime": round(time.monotonic() - app.started, 3),
        }
        if reason:
            body["reason"] = reason
        self.write_json(body, 200 if status == "ok" else 503)


class ChannelHandler(JSONHandler):
    async def get(self, channel: str) -> None:
        members = await self.application.hub.members(channel)
        self.write_json({"channel": channel, "members": members})


class MetricsHandler(tornado.web.RequestHandler):
    application: EchoServerApp

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.application.metrics.render())


class PageHandler(tornado.web.StaticFileHandler):
    """Static files: the page revalidates every time, assets are cached for an hour."""

    def set_extra_headers(self, path: str) -> None:
        if path.endswith(".html"):
            self.set_header("Cache-Control", "no-cache")
        elif "v" not in self.request.arguments:
            self.set_header("Cache-Control", "public, max-age=3600")

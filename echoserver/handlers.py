"""Request handlers: the WebSocket endpoints (echo, broadcast, mixed) and the small JSON routes.

Handlers are thin: they check the handshake, turn frames into hub calls and hub deliveries
into frames. Channel membership and fan-out live in hub.py; the server-wide state (settings,
hub, metrics, open connections) is owned by the Application (see app.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tornado.httputil
import tornado.web
import tornado.websocket
from tornado.log import app_log
from tornado.websocket import _WebSocketParams

from echoserver import __version__
from echoserver.connection import WebSocketConnection
from echoserver.hub import HubUnavailable
from echoserver.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from echoserver.app import EchoServerApp

log = logging.getLogger("echoserver.ws")
access_log = logging.getLogger("echoserver.access")

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN = 1013
# A sender's broadcasts that a remote broker may hold unanswered before we stop reading it.
MAX_PUBLISHES_IN_FLIGHT = 64


class RateLimit:
    """A token bucket: `rate` messages a second, bursts of up to one second's worth."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._tokens = self.burst
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The Application's access log: one line per request; a WebSocket's when it ends."""
    if not handler.application.config.log.access:  # type: ignore[attr-defined]
        return
    status = handler.get_status()
    if isinstance(handler, BaseSocket) and status == 101:
        return  # logged by on_close, with its close code
    # Probes and scrapes come every few seconds: only worth a line when they fail.
    quiet = isinstance(handler, (HealthHandler, MetricsHandler)) and status < 500
    write_access_line(handler.request, status, level=logging.DEBUG if quiet else None)


def write_access_line(
    request: tornado.httputil.HTTPServerRequest,
    status: int,
    close: int | None = None,
    level: int | None = None,
) -> None:
    """One access line; the JSON formatter keeps its fields apart (extra["access"]).

    request.path has no query string, so a ?token= never reaches the log.
    """
    fields: dict[str, Any] = {
        "peer": request.remote_ip,
        "method": request.method,
        "path": request.path,
        "origin": request.headers.get("Origin"),
        "status": status,
        "duration": round(request.request_time(), 6),
    }
    text = (
        "%(peer)s %(method)s %(path)s status=%(status)d origin=%(origin)s duration=%(duration).3fs"
    )
    if close is not None:
        fields["close"] = close
        text += " close=%(close)d"
    if level is None:
        level = logging.INFO if status < 500 else logging.WARNING
    access_log.log(
        level, text, {**fields, "origin": fields["origin"] or "-"}, extra={"access": fields}
    )


class BaseSocket(tornado.websocket.WebSocketHandler):
    """What every WebSocket endpoint shares: handshake checks and connection bookkeeping."""

    application: EchoServerApp
    ws_connection: WebSocketConnection | None
    channel = "default"

    _reserved = False  # holds one of app.handshakes from prepare() until open()

    def prepare(self) -> None:
        app = self.application
        ws = app.config.websocket
        if app.draining:
            self._refuse(503, "draining", "server is shutting down")
        elif ws.auth_token and not self._token_ok(ws.auth_token):
            self._refuse(401, "auth", "missing or wrong token")
        elif ws.max_connections and len(app.connections) + app.handshakes >= ws.max_connections:
            self._refuse(503, "full", "server is full")
        else:
            # Handshakes in flight count against max_connections, so a burst cannot overshoot.
            app.handshakes += 1
            self._reserved = True

    def _release(self) -> None:
        if self._reserved:
            self._reserved = False
            self.application.handshakes -= 1

    def on_finish(self) -> None:
        status = self.get_status()
        if status != 101:
            self._release()  # refused after prepare (origin, bad headers, version)
        if status in (400, 426):  # refused by Tornado: bad upgrade headers, or the version
            reason = "bad_request" if status == 400 else "version"
            self.application.metrics.handshakes_refused[reason] += 1

    def _token_ok(self, expected: str) -> bool:
        header = self.request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not given:
            try:
                given = self.get_query_argument("token", "")
            except tornado.web.HTTPError:  # not UTF-8: a wrong token, and not for the log
                return False
        return hmac.compare_digest(given.encode(), expected.encode())

    def _request_summary(self) -> str:
        # Tornado's summary (in its error and warning lines) has the query, so ?token=.
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)
        else:  # Tornado's own also logs repr(request), whose uri has the query
            summary = self._request_summary()
            app_log.error("Uncaught exception %s", summary, exc_info=(typ, value, tb))

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.application.metrics.handshakes_refused[reason] += 1
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
            try:
                ok = urlsplit(origin).netloc.lower() == self.request.host.lower()
            except ValueError:  # e.g. "http://[": not an origin at all
                ok = False
        if not ok:
            self.application.metrics.handshakes_refused["origin"] += 1
            log.info(
                "refused %s from %s: origin %r", self.request.path, self.request.remote_ip, origin
            )
        return ok

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.application.config.websocket.compression else None

    def get_websocket_protocol(self) -> WebSocketConnection | None:
        if self.request.headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            return None
        params = _WebSocketParams(
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_message_size=self.max_message_size,
            compression_options=self.get_compression_options(),
        )
        rate = self.application.config.websocket.rate_limit
        limit = RateLimit(rate) if rate > 0 else None
        app = self.application
        return WebSocketConnection(self, params, app.flusher, app.keepalive, limit)

    async def before_upgrade(self) -> None:
        """Runs before the 101 is sent: what a client may count on once it has its 101."""

    def open(self, *args: str, **kwargs: str) -> None:
        self._release()
        self.application.connections.add(self)
        connection = self.ws_connection
        if self.application.draining and connection is not None:  # handshake began before
            connection.close(CLOSE_GOING_AWAY, "server shutting down")

    def on_close(self) -> None:
        app = self.application
        self._release()
        app.connections.discard(self)
        code = self.close_code or 1006
        app.metrics.closes[code] += 1
        if app.config.log.access:
            write_access_line(self.request, 101, close=code)

    def send(self, data: bytes, binary: bool) -> None:
        """Queue one message to this client (text as UTF-8); a closed connection drops it."""
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        metrics = self.application.metrics
        metrics.messages_out += 1
        metrics.bytes_out += len(data)
        connection.send(data, binary)

    def count_in(self, data: bytes) -> None:
        metrics = self.application.metrics
        metrics.messages_in += 1
        metrics.bytes_in += len(data)


class EchoSocket(BaseSocket):
    """Each message goes back to its sender, same bytes, same type."""

    def on_raw_message(self, payload: bytes, binary: bool) -> None:
        self.count_in(payload)
        self.send(payload, binary)


class ChannelSocket(BaseSocket):
    """A member of one channel: its connection is the hub's subscriber."""

    shares_frames = True  # broadcasts are deflated once for all (see connection.py)

    member: WebSocketConnection | None = None
    _in_flight = 0  # publishes handed to the broker and not yet answered
    _drained: asyncio.Future[None] | None = None

    async def before_upgrade(self) -> None:
        """Join the channel before the 101: a client that has its 101 is a member, and with
        a remote broker its subscription is active, so it cannot miss the next broadcast."""
        self.channel = self.open_args[0] if self.open_args else "default"
        hub = self.application.hub
        member = self.ws_connection
        assert member is not None
        member.sub_id = hub.new_subscriber_id()
        self.member = member
        await hub.join(self.channel, member, self.before_replay)

    def before_replay(self, count: int) -> None:
        """Kept history is about to be replayed to this member (count messages)."""

    def on_close(self) -> None:
        super().on_close()
        if self.member is not None:
            self.application.spawn(self.application.hub.leave(self.channel, self.member))

    def publish(self, data: bytes, binary: bool) -> Awaitable[None] | None:
        """Publish to this channel without waiting for the broker.

        The memory broker delivers synchronously. A remote broker gets up to
        MAX_PUBLISHES_IN_FLIGHT of this sender's messages at once (in order); past that the
        returned future makes the connection stop reading until half have been answered.
        A message the broker could not take is reported to the sender, never silently lost.
        """
        sender = self.member.sub_id if self.member is not None else None
        try:
            outcome = self.application.hub.publish(self.channel, data, binary, sender)
        except HubUnavailable as exc:
            self.not_delivered(exc)
            return None
        if isinstance(outcome, int):
            return None
        self._in_flight += 1
        outcome.add_done_callback(self._published)
        if self._in_flight < MAX_PUBLISHES_IN_FLIGHT:
            return None
        self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def _published(self, outcome: asyncio.Future[int]) -> None:
        self._in_flight -= 1
        error = None if outcome.cancelled() else outcome.exception()
        if error is not None:
            if not isinstance(error, HubUnavailable):
                log.error("publishing on %s failed: %r", self.channel, error)
            self.not_delivered(error)
        drained = self._drained
        if drained is not None and self._in_flight <= MAX_PUBLISHES_IN_FLIGHT // 2:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    def not_delivered(self, error: BaseException) -> None:
        """Tell the sender; mixed mode's JSON notices cannot be forged by peers, whose
        messages reach others only inside broadcast envelopes."""
        message = {"type": "error", "error": f"not delivered: {error}"}
        self.send(json.dumps(message).encode(), False)


class BroadcastSocket(ChannelSocket):
    """Each message goes to every member of the channel."""

    def not_delivered(self, error: BaseException) -> None:
        """In a raw relay any peer can send any text, so a notice in a frame could be
        forged: a sender whose message was lost is closed with 1013 (try again later),
        which no peer can fake. Receivers stay connected."""
        connection = self.ws_connection
        if connection is not None and not connection.is_closing():
            log.info("closing %s: not delivered: %s", self._request_summary(), error)
            connection.close(CLOSE_TRY_AGAIN, f"not delivered: {error}")

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        self.count_in(payload)
        return self.publish(payload, binary)


class MixedSocket(ChannelSocket):
    """The websocket-shootout protocol: a JSON envelope chooses echo or broadcast."""

    def before_replay(self, count: int) -> None:
        self.send(json.dumps({"type": "history", "count": count}).encode(), False)

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        self.count_in(payload)
        if binary:
            self._error("binary messages are not supported in mixed mode; send JSON text")
            return None
        try:
            request = json.loads(payload)
            kind = request["type"] if isinstance(request, dict) else None
        except (ValueError, KeyError):
            self._error("expected a JSON object with a type")
            return None
        if kind == "echo":
            self.send(payload, False)  # the reply is the request, byte for byte
            return None
        if kind == "broadcast":
            return self._broadcast(payload, request.get("payload"))
        self._error(f"unknown type {kind!r}; expected 'echo' or 'broadcast'")
        return None

    async def _broadcast(self, payload: bytes, inner: Any) -> None:
        hub = self.application.hub
        sender = self.member.sub_id if self.member is not None else None
        try:
            outcome = hub.publish(self.channel, payload, False, sender)
            if not isinstance(outcome, int):
                await outcome
        except HubUnavailable as exc:
            self.not_delivered(exc)
            return
        listeners = await hub.members(self.channel)
        result = {"type": "broadcastResult", "payload": inner, "listenCount": listeners}
        self.send(json.dumps(result).encode(), False)

    def _error(self, text: str) -> None:
        self.send(json.dumps({"type": "error", "error": text}).encode(), False)


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
            "path": app.config.websocket.path,  # where the page connects
            "auth": bool(app.config.websocket.auth_token),  # whether it needs a token
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
    """The page and its assets: revalidated by ETag on every load (a 304 when unchanged),
    so an upgraded server never leaves a browser on a stale page; a ?v= URL is cached for
    good (Tornado's versioned static URLs)."""

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")

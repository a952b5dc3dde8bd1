"""The publish API's two POST routes served without a RequestHandler: each request is one
Tornado HTTPMessageDelegate.

POST /api/channels/<channel>/messages and POST /api/publish are what a backend calls
thousands of times a second. Through tornado.web.RequestHandler each request paid for what
these routes never use: a handler object with its own header table, UI-module namespace and
output transforms, a task for its _execute, futures for prepare() and for the body. Here a
rule's target is a PublishRoute (a tornado.routing.Router), whose find_handler() gives one
Exchange per request: it checks the headers as they arrive (refusing before the body is
read), takes the streamed body, publishes through the hub and writes the answer, headers
and body, with one write_headers() and finish().

Everything a client or an operator sees is what web.handlers.PublishHandler and
web.batch_api.BatchPublishHandler give (they stay the routes of an embedding application,
whose own transforms and log_function apply there): the statuses, JSON bodies and headers,
the 405 page for other methods, the body limits, the api_requests counter and the access
line. The Host check, limits.request_timeout and keep-alive are the connection's and the
router's, as for every route.

Behind the server's own FrontDoor (plain HTTP), once an Exchange has answered on an
HTTP/1.1 keep-alive connection, the connection moves to the publish lane
(transport/publish_lane.py): its next publish requests are parsed there and served by these
same Exchanges through LaneRoutes, the lane standing in for Tornado's HTTPConnection, so
every check, limit, answer, counter and access line is this module's in both places.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Coroutine, Generator
from email.utils import formatdate
from typing import Any

import tornado.httputil
import tornado.iostream
import tornado.routing
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine, ResponseStartLine
from tornado.log import app_log

from echoserver import routes
from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.access import RequestRecord, write_access_line
from echoserver.endpoints.base import SERVER
from echoserver.endpoints.context import ServerContext
from echoserver.transport.publish_lane import PublishLane
from echoserver.transport.tornado_seam import unsent_bytes
from echoserver.web.batch_api import BODY_FACTOR, MIN_BODY
from echoserver.web.handlers import CHUNK_SLACK, api_key_refusal
from echoserver.wire.batch import BatchRefused, read_batch
from echoserver.wire.envelopes import Refused, body_message
from echoserver.wire.http_requests import Head

# RequestHandler.SUPPORTED_METHODS: any other method is 405 before anything else; these
# go through the header checks and the body first (what tornado.web does for a handler
# that only has post()).
SUPPORTED_METHODS = frozenset(("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS"))
JSON = "application/json"
HTML = "text/html; charset=UTF-8"
AUTHENTICATE = 'Bearer realm="echoserver"'


def error_page(status: int) -> bytes:
    """tornado.web's default error body (RequestHandler.write_error)."""
    reason = tornado.httputil.responses.get(status, "Unknown")
    return f"<html><title>{status}: {reason}</title><body>{status}: {reason}</body></html>".encode()


class _Clock:
    """The Date header's value, formatted once a second (as RequestHandler.clear() sends it).

    One per process (CLOCK): a cache of a formatted time, the same for every request."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def date(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.value = formatdate(now, usegmt=True)
            self.second = second
        return self.value


CLOCK = _Clock()


def run_eagerly(coroutine: Coroutine[Any, Any, None], server: ServerContext) -> None:
    """Run `coroutine` now, up to its first wait, as Python 3.12's eager tasks do; only if it
    has to wait does the rest go on in a task. With the memory broker a publish never
    waits: the answer is written before Tornado's connection checks for it, which then
    goes on to the next request on the connection without another pass of the loop."""
    try:
        waiting = coroutine.send(None)
    except StopIteration:
        return
    server.spawn(_carry_on(coroutine, waiting))


async def _carry_on(coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Resumed(coroutine, waiting)


class _Resumed:
    """Awaits what a started coroutine waits for, then drives it to its end: a `yield from`
    picked up after its first step (the task running it sees the same futures)."""

    __slots__ = ("coroutine", "waiting")

    def __init__(self, coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coroutine = coroutine
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, waiting = self.coroutine, self.waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as error:  # a cancellation: into the coroutine, as await does
                try:
                    waiting = coroutine.throw(error)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coroutine.send(sent)
                except StopIteration:
                    return


class PublishRoute(tornado.routing.Router):
    """A rule's target: one Exchange per request (the batch API's with `batch`)."""

    def __init__(self, server: ServerContext, *, batch: bool) -> None:
        self.server = server
        self.batch = batch

    def find_handler(
        self, request: HTTPServerRequest, **kwargs: Any
    ) -> tornado.httputil.HTTPMessageDelegate:
        if self.batch:
            return BatchExchange(self.server, request)
        # The channel pattern admits only unreserved ASCII: the group is already decoded.
        channel = kwargs["path_args"][0]
        return ChannelExchange(self.server, request, channel.decode())


class Exchange(tornado.httputil.HTTPMessageDelegate):
    """One request to the publish API, from its headers to its answer."""

    __slots__ = ("_body", "_done", "_size", "request", "server")

    def __init__(self, server: ServerContext, request: HTTPServerRequest) -> None:
        self.server = server
        self.request = request
        self._body: list[bytes] = []
        self._size = 0
        self._done = False  # answered (or the connection is gone): the rest is ignored

    # --- the limits --------------------------------------------------------------------------

    def body_limit(self) -> int:
        """The largest body taken, in bytes."""
        return self.server.config.websocket.max_message_size

    def too_big(self) -> Refused:
        limit = self.server.config.websocket.max_message_size
        return Refused(413, f"the message is over websocket.max_message_size ({limit} bytes)")

    def _check_headers(self, headers: HTTPHeaders) -> Refused | None:
        config = self.server.config
        if config.mode == "echo":
            return Refused(404, "no channels in echo mode")
        refused = api_key_refusal(config.api.key, headers.get("Authorization"))
        if refused is not None:
            return refused
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.body_limit():
            return self.too_big()
        return None

    # --- HTTPMessageDelegate -----------------------------------------------------------------

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: HTTPHeaders,
    ) -> None:
        if self.request.method not in SUPPORTED_METHODS:
            self._error(405)
            return
        refused = self._check_headers(headers)
        if refused is not None:
            self.refuse(refused)
            return
        set_max_body_size = getattr(self.request.connection, "set_max_body_size", None)
        if set_max_body_size is not None:
            # A chunked body is counted in data_received, which answers 413; the slack lets
            # the chunk that crosses the limit arrive (past it Tornado closes with 400).
            set_max_body_size(self.body_limit() + CHUNK_SLACK)

    def data_received(self, chunk: bytes) -> None:
        if self._done:
            return
        self._size += len(chunk)
        if self._size > self.body_limit():
            self.refuse(self.too_big())  # a chunked body, without Content-Length
            return
        self._body.append(chunk)

    def finish(self) -> None:
        if self._done:
            return
        if self.request.method != "POST":
            self._error(405)  # after the body, as tornado.web's handler without get() etc.
            return
        body = b"".join(self._body)
        self._body = []
        run_eagerly(self._complete(body), self.server)

    def on_connection_close(self) -> None:
        # Closed before the request was whole (Tornado tells the delegate only then): as a
        # handler's post() would never run, there is no answer, no count, no access line.
        self._done = True
        self._body = []

    # --- publishing --------------------------------------------------------------------------

    async def publish(self, body: bytes) -> None:
        """Publish the body and answer (refusals included)."""
        raise NotImplementedError

    async def _complete(self, body: bytes) -> None:
        try:
            await self.publish(body)
        except BrokerUnavailable as exc:
            self.refuse(Refused(503, f"not published: {exc}"))
        except Exception as error:  # answered 500 and logged, as tornado.web does
            self._failed(error)

    # --- answering ---------------------------------------------------------------------------

    def refuse(self, refused: Refused) -> None:
        self.answer_json(refused.status, json.dumps({"error": refused.message}).encode())

    def answer_json(self, status: int, body: bytes) -> None:
        headers = HTTPHeaders()
        headers["Server"] = SERVER
        headers["Content-Type"] = JSON
        headers["Date"] = CLOCK.date()
        headers["X-Content-Type-Options"] = "nosniff"
        if status == 401:
            headers["WWW-Authenticate"] = AUTHENTICATE
        headers["Cache-Control"] = "no-store"
        self._answer(status, headers, body)

    def _error(self, status: int) -> None:
        headers = HTTPHeaders()
        headers["Server"] = SERVER
        headers["Content-Type"] = HTML
        headers["Date"] = CLOCK.date()
        headers["X-Content-Type-Options"] = "nosniff"
        self._answer(status, headers, error_page(status))

    def _failed(self, error: Exception) -> None:
        request = self.request
        summary = f"{request.method} {request.path} ({request.remote_ip})"
        app_log.error("Uncaught exception %s", summary, exc_info=error)
        if not self._done:
            self._error(500)

    def _answer(self, status: int, headers: HTTPHeaders, body: bytes) -> None:
        if self._done:
            return
        self._done = True
        self._body = []
        request = self.request
        connection = request.connection
        assert connection is not None
        headers["Content-Length"] = str(len(body))
        if request.method == "HEAD":
            body = b""
        reason = tornado.httputil.responses.get(status, "Unknown")
        connection.write_headers(ResponseStartLine("", status, reason), headers, body or None)
        connection.finish()
        server = self.server
        server.metrics.api_requests[status] += 1
        if server.config.log.access:
            write_access_line(RequestRecord(request), status)
        if server.lanes is not None and type(connection) is HTTP1Connection:
            self._offer_lane(connection)

    def _offer_lane(self, connection: HTTP1Connection) -> None:
        """Move a plain HTTP/1.1 keep-alive connection whose answer has left, and whose
        request was read whole, to the publish lane (transport/publish_lane.py)."""
        server = self.server
        stream = connection.stream
        if (
            stream is None
            or stream.closed()  # Tornado closes it after the answer: not kept alive
            or type(stream) is not tornado.iostream.IOStream  # TLS stays with Tornado
            or self.request.version != "HTTP/1.1"
            or server.draining
            or unsent_bytes(stream)
            or not server.occupancy.holds(stream)  # not the server's own HTTPServer
        ):
            return
        lanes = server.lanes
        assert lanes is not None
        connection.detach()
        lanes.take_over(stream, connection.context)  # type: ignore[arg-type]


class ChannelExchange(Exchange):
    """POST /api/channels/<channel>/messages: the body is one message to the channel
    (web.handlers.PublishHandler's rules)."""

    __slots__ = ("channel",)

    def __init__(self, server: ServerContext, request: HTTPServerRequest, channel: str) -> None:
        super().__init__(server, request)
        self.channel = channel

    async def publish(self, body: bytes) -> None:
        mixed = self.server.config.mode == "mixed"
        channel = self.channel
        try:
            data, binary = body_message(body, self.request.headers.get("Content-Type"), mixed)
            posted = await self.server.hub.post(channel, data, binary)
        except Refused as refused:
            self.refuse(refused)
            return
        answer = {
            "channel": channel,
            "offset": posted.offset,
            "epoch": posted.epoch,
            "local_receivers": posted.local_receivers,
            "receivers": posted.receivers,
        }
        self.answer_json(200, json.dumps(answer).encode())


class BatchExchange(Exchange):
    """POST /api/publish: many messages for many channels (web.batch_api's rules); the body
    may be up to BODY_FACTOR x websocket.max_message_size bytes or MIN_BODY."""

    __slots__ = ()

    def body_limit(self) -> int:
        return max(BODY_FACTOR * self.server.config.websocket.max_message_size, MIN_BODY)

    def too_big(self) -> Refused:
        limit = self.body_limit()
        return Refused(
            413,
            f"the body is over {limit} bytes ({BODY_FACTOR} x websocket.max_message_size, "
            f"at least {MIN_BODY})",
        )

    async def publish(self, body: bytes) -> None:
        config = self.server.config
        try:
            messages = read_batch(
                body,
                mixed=config.mode == "mixed",
                max_items=config.api.max_batch,
                max_size=config.websocket.max_message_size,
            )
        except BatchRefused as refused:
            answer = {"error": refused.message, "index": refused.index}
            self.answer_json(refused.status, json.dumps(answer).encode())
            return
        published = await self.server.hub.post_many(messages)
        results = [
            {"channel": channel, "offset": offset, "epoch": epoch, "local_receivers": local}
            for (channel, _, _), (offset, epoch, local) in zip(messages, published, strict=True)
        ]
        self.answer_json(200, json.dumps({"results": results}, separators=(",", ":")).encode())


class LaneRequest:
    """What an Exchange reads of a request served in the publish lane (as of Tornado's
    HTTPServerRequest): method, path, version, headers, peer, connection, start."""

    __slots__ = ("_start_time", "connection", "headers", "path", "remote_ip")

    method = "POST"
    version = "HTTP/1.1"

    def __init__(self, path: str, headers: dict[str, str], lane: PublishLane) -> None:
        self.path = path
        self.headers = headers
        self.connection = lane
        self.remote_ip = lane.remote_ip
        self._start_time = time.time()

    def request_time(self) -> float:
        return time.time() - self._start_time


class LaneRoutes:
    """The publish lane's requests served by the same Exchanges as the Tornado routes
    (Lanes.start): a request for another route, or with a refused Host, is handed back."""

    def __init__(self, server: ServerContext) -> None:
        self.server = server
        # As tornado.routing.PathMatches matches them (anchored at both ends).
        self.channel = re.compile(routes.channel_messages(server.prefix) + "$")
        self.batch = routes.exact(server.prefix + routes.PUBLISH) + "$"
        self.batch_path = server.prefix + routes.PUBLISH

    def start(self, lane: PublishLane, head: Head) -> tornado.httputil.HTTPMessageDelegate | None:
        server = self.server
        headers = head.headers
        if not server.hosts.allows(headers.get("Host")):
            return None  # answered 403 by the Application
        path = head.path
        request: Any = LaneRequest(path, headers, lane)
        exchange: Exchange
        if path == self.batch_path:
            exchange = BatchExchange(server, request)
        else:
            match = self.channel.match(path)
            if match is None:
                return None
            exchange = ChannelExchange(server, request, match.group(1))
        exchange.headers_received(RequestStartLine("POST", path, "HTTP/1.1"), request.headers)
        return exchange

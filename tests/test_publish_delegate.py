"""The publish API's routes as message delegates (web/publish_delegate.py) answer exactly as
the request handlers they stand in for (web/handlers.PublishHandler, web/batch_api), which
still serve an embedding application.

Each case is sent as raw bytes to two in-process servers on the test's loop: the server's
own Application (delegates) and an Application with the same routes as handlers (what
echoserver.embed mounts). Every answer must match byte for byte but for the Date header and
the channel epochs (each server has its own hub): status line, headers in their order,
body, whether the connection stayed open. So must the api_requests counters and the access
lines. A few behaviours only the server's own Application has (the Host check, keep-alive
over many requests, a rebound Host) are checked on it alone.

The server's own Application runs behind FrontDoor with the publish lane
(transport/publish_lane.py), as `echoserver` serves it: every case is also sent as the third
request on a keep-alive connection, after two publishes (the first moves the connection to
the lane, the second is served there), and must again match the handlers' answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import tornado.httpserver
import tornado.web

from echoserver.brokers import BrokerUnavailable, Envelope, MemoryBroker
from echoserver.config import Settings
from echoserver.endpoints.access import log_request
from echoserver.endpoints.base import NotFound
from echoserver.runtime.intake import FrontDoor
from echoserver.web.app import ServerState, make_app, new_hub
from tests.conftest import make_settings, run

KEY = "delegate-key-42"
HTTP_MAX_BODY = 64 * 1024  # runtime.serve's cap for routes that do not raise it
TIMEOUT = 5.0


class Server:
    """One in-process server on a free port, and the access lines it wrote."""

    def __init__(
        self, application: tornado.web.Application, state: Any, *, door: bool = False
    ) -> None:
        self.state = state
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.http: tornado.httpserver.HTTPServer
        if door:  # as runtime/serve.py runs the server's own Application
            self.http = FrontDoor(
                application,
                occupancy=state.occupancy,
                metrics=state.metrics,
                request_timeout=20.0,
                publish_lane=True,
                max_body_size=HTTP_MAX_BODY,
                idle_connection_timeout=60,
            )
        else:
            self.http = tornado.httpserver.HTTPServer(
                application, max_body_size=HTTP_MAX_BODY, idle_connection_timeout=60
            )
        self.http.add_sockets([sock])

    async def close(self) -> None:
        self.http.stop()
        await self.http.close_all_connections()
        await self.state.close()


class AccessLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[Any, ...]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "access", None)
        if fields is not None:
            line = (record.levelno, fields["method"], fields["path"], fields["status"])
            self.lines.append(line)


@asynccontextmanager
async def both(
    settings: Settings, broker: type[MemoryBroker] = MemoryBroker
) -> AsyncIterator[tuple[Server, Server]]:
    """(delegates, handlers): the server's own Application and the same routes as handlers."""
    own = make_app(settings, broker())
    state = ServerState(settings, new_hub(settings, broker()))
    handlers = tornado.web.Application(
        state.routes(),
        log_function=log_request,
        access_log=settings.log.access,
        default_handler_class=NotFound,
        default_handler_args={"server": state},
    )
    servers = (Server(own, own.server, door=True), Server(handlers, state))
    try:
        yield servers
    finally:
        for server in servers:
            await server.close()


async def read_response(
    reader: asyncio.StreamReader, head_request: bool
) -> tuple[bytes, list[tuple[str, str]], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status, *lines = head[:-4].decode("latin1").split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    length = int(dict(headers).get("Content-Length", "0"))
    body = b"" if head_request else await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return status.encode(), headers, body


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the connection serves another request (a /healthz) after the answer."""
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        status, _, _ = await read_response(reader, head_request=False)
    except (ConnectionError, asyncio.IncompleteReadError):
        return False
    return status.startswith(b"HTTP/1.1 ")


# Each server's hub has its own epochs (8 characters): the rest of a body is compared as is.
EPOCH = re.compile(rb'("epoch": ?)"[A-Za-z0-9_-]{8}"')


def normalised(headers: list[tuple[str, str]], body: bytes) -> tuple[Any, bytes]:
    kept = [(name, value) for name, value in headers if name != "Date"]
    return kept, EPOCH.sub(rb'\1"E"', body)


async def exchange(port: int, request: bytes, *, warm: int = 0) -> tuple[Any, ...]:
    """`request`'s answer, normalised, and whether the connection stayed open; sent after
    `warm` publishes on the same keep-alive connection (two put it in the publish lane)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(warm):
            writer.write(WARM)
            await writer.drain()
            await read_response(reader, head_request=False)  # 503 or 500 for a broken broker
        writer.write(request)
        await writer.drain()
        status, headers, body = await read_response(reader, request.startswith(b"HEAD "))
        assert any(name == "Date" for name, _ in headers)
        kept, shown = normalised(headers, body)
        return status, kept, shown, await still_open(reader, writer)
    finally:
        writer.close()


def post(
    path: str, body: bytes, *, key: str | None = KEY, method: str = "POST", **more: str
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in more.items()]
    if "Transfer_Encoding" not in more:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


ONE = "/api/channels/news/messages"
BATCH = "/api/publish"
TEXT = {"Content_Type": "text/plain"}
JSON_TYPE = {"Content_Type": "application/json"}
WARM = post(ONE, b"warm", **TEXT)
ITEMS = json.dumps([{"channel": "a", "data": "x"}, {"channel": "b", "data": {"k": 1}}]).encode()

CASES: list[bytes] = [
    post(ONE, b"hello", **TEXT),
    post(ONE, "héllo".encode(), Content_Type="text/plain; charset=utf-8"),
    post(ONE, b"\x00\xff", Content_Type="application/octet-stream"),
    post(ONE, b"\x01"),  # no Content-Type: binary
    post(ONE, b'{"a": 1}', **JSON_TYPE),
    post(ONE, b"x" * 64, **TEXT),
    post(ONE, b"hello", key=None, **TEXT),
    post(ONE, b"hello", key="wrong", **TEXT),
    post(ONE, b"hello", key=None, Authorization=KEY, **TEXT),  # not a Bearer token
    post(ONE, b"x" * 65, **TEXT),  # 413 by its Content-Length, before the body
    post(ONE, b"\xff\xfe", **TEXT),  # 415
    post(ONE, b"caf\xe9", Content_Type="text/plain; charset=iso-8859-1"),
    post(ONE, chunked(b"x" * 32, b"y" * 32), Transfer_Encoding="chunked", **TEXT),
    post(ONE, chunked(b"x" * 40, b"y" * 40), Transfer_Encoding="chunked", **TEXT),  # 413
    post("/api/channels/bad%20name/messages", b"x", **TEXT),  # 404, no route
    post(ONE, b"", method="GET"),  # 405 after the body
    post(ONE, b"x", method="GET", key=None),  # the key first: 401
    post(ONE, b"", method="HEAD"),
    post(ONE, b"", method="HEAD", key=None),
    post(ONE, b"", method="DELETE"),
    post(ONE, b"", method="OPTIONS"),
    post(ONE, b"x", method="FOO"),  # not a method tornado.web knows: 405 at once
    post(ONE, b"x", method="FOO", key=None),
    post(ONE, b"hello", Connection="close", **TEXT),
    post(ONE, b"hello", **TEXT).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    post(ONE, b"hello", Connection="keep-alive", **TEXT).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    post(BATCH, ITEMS, **JSON_TYPE),
    post(BATCH, json.dumps({"channels": ["a", "c"], "data": "all"}).encode(), **JSON_TYPE),
    post(BATCH, ITEMS, key="wrong", **JSON_TYPE),
    post(BATCH, b"[{", **JSON_TYPE),
    post(BATCH, json.dumps([{"channel": "a", "data": "y" * 300}]).encode(), **JSON_TYPE),
    post(BATCH, json.dumps([{"channel": "bad name", "data": "x"}]).encode(), **JSON_TYPE),
    post(BATCH, json.dumps([{"channel": "a", "data": "x"}] * 6).encode(), **JSON_TYPE),
    post(BATCH, b"[]", method="PUT", **JSON_TYPE),
    post(BATCH, b"[]", method="GET", key=None),
    post(BATCH, chunked(ITEMS[:10], ITEMS[10:]), Transfer_Encoding="chunked", **JSON_TYPE),
    # 413 by Content-Length (1 MiB is the floor), answered before the body, which never comes
    post(BATCH, b"", **JSON_TYPE).replace(b"Content-Length: 0", b"Content-Length: 1048577"),
]


def settings_for(mode: str = "broadcast", **changes: Any) -> Settings:
    return make_settings(
        mode=mode,
        **{
            "api.key": KEY,
            "websocket.max_message_size": 64,
            "api.max_batch": 5,
            "broadcast.history": 10,
            "log.access": True,
            **changes,
        },
    )


async def compare(
    settings: Settings, cases: list[bytes], broker: type[MemoryBroker] = MemoryBroker
) -> None:
    access = AccessLines()
    logger = logging.getLogger("echoserver.access")
    logger.addHandler(access)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with both(settings, broker) as (own, handlers):
            for request in cases:
                start = len(access.lines)
                mine = await exchange(own.port, request)
                middle = len(access.lines)
                theirs = await exchange(handlers.port, request)
                assert mine == theirs, request
                assert access.lines[start:middle] == access.lines[middle:], request
            lanes = own.state.lanes
            assert lanes is not None
            if settings.mode != "echo" and settings.api.key:
                taken = lanes.taken
                for request in cases:
                    start = len(access.lines)
                    mine = await exchange(own.port, request, warm=2)
                    middle = len(access.lines)
                    theirs = await exchange(handlers.port, request, warm=2)
                    assert mine == theirs, request
                    assert access.lines[start:middle] == access.lines[middle:], request
                assert lanes.taken >= taken + len(cases)  # each connection went to the lane
            assert own.state.metrics.api_requests == handlers.state.metrics.api_requests
    finally:
        logger.removeHandler(access)
        logger.setLevel(old_level)


@pytest.mark.parametrize("mode", ["broadcast", "mixed", "echo"])
def test_every_answer_is_the_handlers(mode: str) -> None:
    run(compare(settings_for(mode), CASES))


def test_the_api_off_is_the_handlers() -> None:
    run(compare(settings_for(**{"api.key": ""}), CASES[:8] + CASES[-12:]))


def test_no_access_line_when_the_access_log_is_off() -> None:
    run(compare(settings_for(**{"log.access": False}), CASES[:3] + CASES[6:8]))


class DownBroker(MemoryBroker):
    def publish(self, envelope: Envelope) -> int:
        raise BrokerUnavailable("redis 127.0.0.1:1/0 unreachable")

    def publish_many(self, envelopes: list[Envelope]) -> list[Any]:
        raise BrokerUnavailable("redis 127.0.0.1:1/0 unreachable")


class BrokenBroker(MemoryBroker):
    def publish(self, envelope: Envelope) -> int:
        raise RuntimeError("a bug")

    def publish_many(self, envelopes: list[Envelope]) -> list[Any]:
        raise RuntimeError("a bug")


class SlowBroker(MemoryBroker):
    """Each publish completes a little later, as through Redis: the delegate's publish waits
    (its task carries on), the handler's awaits."""

    def publish(self, envelope: Envelope) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.005, lambda: done.set_result(MemoryBroker.publish(self, envelope)))
        return done


def test_a_publish_that_waits_is_answered_as_the_handlers() -> None:
    cases = [post(ONE, b"hello", **TEXT), post(BATCH, ITEMS, **JSON_TYPE)] * 3
    run(compare(settings_for(), cases + CASES[:8], SlowBroker))


def test_a_broker_down_is_503_as_the_handlers() -> None:
    cases = [post(ONE, b"hello", **TEXT), post(BATCH, ITEMS, **JSON_TYPE)]
    run(compare(settings_for(), cases, DownBroker))


def test_an_unexpected_error_is_500_as_the_handlers(caplog: pytest.LogCaptureFixture) -> None:
    cases = [post(ONE, b"hello", **TEXT), post(BATCH, ITEMS, **JSON_TYPE)]
    with caplog.at_level(logging.ERROR, "tornado.application"):
        run(compare(settings_for(), cases, BrokenBroker))
    errors = [r for r in caplog.records if r.getMessage().startswith("Uncaught exception")]
    assert [r.getMessage() for r in errors[:4]] == [
        "Uncaught exception POST /api/channels/news/messages (127.0.0.1)",
        "Uncaught exception POST /api/channels/news/messages (127.0.0.1)",
        "Uncaught exception POST /api/publish (127.0.0.1)",
        "Uncaught exception POST /api/publish (127.0.0.1)",
    ]
    # Then through the lane: each case after two publishes to the channel, on both servers.
    assert Counter(r.getMessage() for r in errors[4:]) == {
        "Uncaught exception POST /api/channels/news/messages (127.0.0.1)": 10,
        "Uncaught exception POST /api/publish (127.0.0.1)": 2,
    }
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_many_requests_on_one_connection_and_a_rebound_host() -> None:
    async def scenario() -> None:
        settings = settings_for(host="127.0.0.1")
        async with both(settings) as (own, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", own.port)
            # Pipelined: ten requests in one write, ten answers in their order.
            writer.write(b"".join(post(ONE, b"m%d" % n, **TEXT) for n in range(10)))
            await writer.drain()
            offsets = []
            for _ in range(10):
                status, _, body = await read_response(reader, head_request=False)
                assert status == b"HTTP/1.1 200 OK"
                offsets.append(json.loads(body)["offset"])
            assert offsets == list(range(1, 11))
            assert await still_open(reader, writer)
            writer.close()
            rebound = post(BATCH, ITEMS, **JSON_TYPE).replace(
                b"Host: 127.0.0.1", b"Host: rebind.example"
            )
            status, _, body, _ = await exchange(own.port, rebound)
            assert (status, body) == (b"HTTP/1.1 403 Forbidden", b"host not allowed\n")
            assert own.state.metrics.api_requests == Counter({200: 10})

    run(scenario())


@pytest.mark.parametrize(
    ("request_timeout", "idle_timeout", "header_timeout"),
    [(20.0, 60.0, None), (58.5, 60.0, None), (59.0, 60.0, 60.0), (120.0, 60.0, 60.0)],
)
def test_tornados_header_timer_goes_only_where_the_deadline_comes_first(
    request_timeout: float, idle_timeout: float, header_timeout: float | None
) -> None:
    """FrontDoor's request deadline (met within min(1 s, a quarter of it)) closes a client
    that keeps its headers back; Tornado's own header timeout is dropped only when it
    could never fire first, so no configuration changes which one closes the client."""
    app = make_app(settings_for())
    door = FrontDoor(
        app,
        occupancy=app.server.occupancy,
        metrics=app.server.metrics,
        request_timeout=request_timeout,
        idle_connection_timeout=idle_timeout,
    )
    assert door.conn_params.header_timeout == header_timeout

"""The publish lane (transport/publish_lane.py, wire/http_requests.py): a keep-alive
connection's publish requests after its first, served outside Tornado's HTTP1Connection.

In-process servers on the test's loop, behind FrontDoor as `echoserver` runs them
(test_publish_delegate.py checks every answer against the request handlers byte for byte,
through the lane too); here what a connection in the lane does besides: pipelining, a
session that mixes routes (handed back to Tornado and taken again), the request deadline,
the limits, the slot, the drain, and the strict parser on its own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import tornado.iostream

from echoserver.brokers import MemoryBroker
from echoserver.transport.tornado_seam import stream_with_bytes
from echoserver.web.app import make_app
from echoserver.wire.http_requests import HAND_BACK, HEAD_LIMIT, Head, parse_head
from tests.conftest import run
from tests.servers import ServerProcess
from tests.test_publish_delegate import (
    BATCH,
    ITEMS,
    JSON_TYPE,
    KEY,
    ONE,
    TEXT,
    TIMEOUT,
    WARM,
    Server,
    SlowBroker,
    normalised,
    post,
    read_response,
    settings_for,
)


@asynccontextmanager
async def lane_server(broker: MemoryBroker | None = None, **changes: Any) -> AsyncIterator[Server]:
    settings = settings_for(**changes)
    app = make_app(settings, broker)
    server = Server(app, app.server, door=True)
    try:
        yield server
    finally:
        await server.close()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, Any]:
    writer.write(request)
    await writer.drain()
    status, _, body = await read_response(reader, head_request=False)
    return status, body


async def into_lane(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose first publish was Tornado's: the next ones are the lane's."""
    reader, writer = await connect(server.port)
    status, _ = await ask(reader, writer, WARM)
    assert status == b"HTTP/1.1 200 OK"
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails if it did not close in time."""
    return await asyncio.wait_for(reader.read(), seconds)


def get(path: str, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def test_pipelined_requests_are_answered_in_order_in_the_lane() -> None:
    async def scenario() -> None:
        async with lane_server() as server:
            reader, writer = await into_lane(server)
            requests = [post(ONE, b"m%d" % n, **TEXT) for n in range(12)]
            requests[5] = post(BATCH, ITEMS, **JSON_TYPE)
            blob = b"".join(requests)
            # In pieces that cut requests anywhere: the parser waits for the rest.
            for start in range(0, len(blob), 97):
                writer.write(blob[start : start + 97])
                await writer.drain()
            offsets = []
            for n in range(12):
                status, _, body = await read_response(reader, head_request=False)
                assert status == b"HTTP/1.1 200 OK"
                if n != 5:
                    offsets.append(json.loads(body)["offset"])
            assert offsets == list(range(2, 13))
            lanes = server.state.lanes
            assert (lanes.taken, lanes.given_back) == (1, 0)
            assert server.state.occupancy.total == 1
            # Its slot is held under the lane: still a plain HTTP connection in the counts.
            assert server.state.occupancy.holds(next(iter(lanes.open)))
            writer.close()
            assert await asyncio.wait_for(_until(lambda: not server.state.occupancy.total), 5)

    run(scenario())


def test_pipelined_requests_wait_for_a_publish_that_waits() -> None:
    """A broker whose publish completes later (as Redis does): the lane stops reading until
    the answer is out, then serves the next request; the answers keep their order."""

    async def scenario() -> None:
        async with lane_server(SlowBroker()) as server:
            reader, writer = await into_lane(server)
            writer.write(b"".join(post(ONE, b"m%d" % n, **TEXT) for n in range(6)))
            writer.write(get("/healthz") + post(ONE, b"last", **TEXT))
            await writer.drain()
            offsets = []
            for n in range(8):
                status, _, body = await read_response(reader, head_request=False)
                assert status == b"HTTP/1.1 200 OK"
                if n != 6:
                    offsets.append(json.loads(body)["offset"])
            assert offsets == list(range(2, 9))
            writer.close()

    run(scenario())


async def _until(check: Any) -> bool:
    for _ in range(200):
        if check():
            return True
        await asyncio.sleep(0.02)
    return False


def test_a_session_mixing_routes_is_answered_in_order() -> None:
    """publish, GET /healthz, publish, GET presence, publish, one at a time and then
    pipelined: the lane hands the GETs back to Tornado, which hands the connection back."""

    async def scenario() -> None:
        async with lane_server() as server:
            reader, writer = await into_lane(server)
            session = [
                post(ONE, b"a", **TEXT),
                get("/healthz"),
                post(ONE, b"b", **TEXT),
                get("/api/channels/news/presence", KEY),
                post(ONE, b"c", **TEXT),
            ]

            def check(answers: list[tuple[bytes, Any]], first_offset: int) -> None:
                assert [status for status, _ in answers] == [b"HTTP/1.1 200 OK"] * 5
                assert json.loads(answers[1][1])["status"] == "ok"
                assert isinstance(json.loads(answers[3][1]), dict)  # the presence document
                offsets = [json.loads(answers[n][1])["offset"] for n in (0, 2, 4)]
                assert offsets == [first_offset, first_offset + 1, first_offset + 2]

            answers = [await ask(reader, writer, request) for request in session]
            check(answers, 2)
            writer.write(b"".join(session))
            await writer.drain()
            answers = []
            for _ in session:
                status, _, body = await read_response(reader, head_request=False)
                answers.append((status, body))
            check(answers, 5)
            lanes = server.state.lanes
            assert lanes.given_back >= 2 and lanes.taken >= 3
            assert server.state.occupancy.total == 1  # one connection, counted once
            writer.close()

    run(scenario())


def test_an_idle_or_partial_request_in_the_lane_meets_the_request_deadline() -> None:
    """limits.request_timeout runs from the end of the previous answer, as on Tornado's
    connections: no headers in time is 408 and a close; headers without their body, a close."""

    async def scenario() -> None:
        async with lane_server() as server:
            server.http.request_timeout = 1.0  # type: ignore[attr-defined]
            server.state.lanes.request_timeout = 1.0
            cases = [
                b"",  # idle after the answer
                b"POST /api/channels/news/messages HTTP/1.1\r\nHost: 127",  # half a header
                post(ONE, b"hello", **TEXT)[:-2],  # the body short of 2 bytes
            ]
            answers = []
            for partial in cases:
                reader, writer = await into_lane(server)
                started = time.monotonic()
                writer.write(partial)
                await writer.drain()
                answers.append(await closed_within(reader, 5.0))
                assert 0.9 < time.monotonic() - started < 3.0
                writer.close()
            timeout_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
            assert answers[0].startswith(timeout_408)
            assert answers[1].startswith(timeout_408)
            assert answers[2] == b""
            assert server.state.metrics.request_timeouts == 3
            assert server.state.occupancy.total == 0

    run(scenario(), timeout=30)


async def answer_or_close(port: int, requests: list[bytes]) -> tuple[Any, ...]:
    """Each request's answer (status, headers but Date, body) or what came before a close."""
    reader, writer = await connect(port)
    got: list[Any] = []
    try:
        for request in requests:
            writer.write(request)
            try:
                await writer.drain()
                status, headers, body = await read_response(reader, head_request=False)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                got.append(type(error).__name__)
                return tuple(got)
            kept, shown = normalised(headers, body)
            got.append((status, kept, shown))
        return tuple(got)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        post(ONE, b"hello", **TEXT, X_Pad="p" * (HEAD_LIMIT + 100)),  # past the lane's limit
        post(ONE, b"hello", **TEXT, X_Pad="p" * 70_000),  # past Tornado's too
        post(ONE, b"x" * 65, **TEXT),  # 413, then closed
        post(BATCH, b"[]", **JSON_TYPE).replace(b"Content-Length: 2", b"Content-Length: 1048577"),
        post(ONE, b"hello", **TEXT).replace(b"Content-Length: 5", b"Content-Length: 5, 5"),
        post(ONE, b"hello", **TEXT).replace(
            b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\n X: y\r\n"
        ),
        post(ONE, b"hello", **TEXT).replace(b"\r\n", b"\n"),
        post(ONE + "?x=1", b"hello", **TEXT),
    ],
    ids=[
        "long-header",
        "huge-header",
        "body",
        "batch-body",
        "length-list",
        "folded",
        "lf",
        "query",
    ],
)
def test_limits_and_odd_requests_are_answered_as_tornado_answers_them(
    request_bytes: bytes,
) -> None:
    """The same request as a connection's first (Tornado's) and after a publish (the
    lane's): the same answer, and the connection closed or kept alike."""

    async def scenario() -> None:
        async with lane_server() as server:
            fresh = await answer_or_close(server.port, [request_bytes, get("/healthz")])
            lane = await answer_or_close(server.port, [WARM, request_bytes, get("/healthz")])
            assert lane[0][0] == b"HTTP/1.1 200 OK"
            assert _no_offsets(lane[1:]) == _no_offsets(fresh)

    run(scenario())


def _no_offsets(answers: tuple[Any, ...]) -> tuple[Any, ...]:
    out = []
    for answer in answers:
        if isinstance(answer, tuple):
            status, headers, body = answer
            if body.startswith(b"{"):
                document = json.loads(body)
                if isinstance(document, dict):
                    for name in ("offset", "uptime", "epoch"):
                        document.pop(name, None)
                body = json.dumps(document).encode()
            headers = [(n, v) for n, v in headers if n not in ("Content-Length", "Etag")]
            answer = (status, headers, body)
        out.append(answer)
    return tuple(out)


def test_the_lane_keeps_a_pooled_http_client_working() -> None:
    """http.client on one connection, as a backend's pool uses it, against `echoserver`
    itself: publishes, other routes and methods, a refused request, in any order."""
    server = ServerProcess(["--mode", "broadcast", "--api-key", KEY]).wait_ready()
    try:
        client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
        offsets = []
        for n in range(4):
            client.request("POST", "/api/channels/pool/messages", body=b"m%d" % n, headers=auth)
            response = client.getresponse()
            assert response.status == 200
            offsets.append(json.loads(response.read())["offset"])
            client.request("GET", "/healthz")
            response = client.getresponse()
            assert response.status == 200
            response.read()
            client.request("POST", "/api/channels/pool/messages", body=b"x", headers={})
            response = client.getresponse()
            assert response.status == 401  # refused on its headers: closed, as by Tornado
            response.read()
            client.close()
        assert offsets == [1, 2, 3, 4]
    finally:
        assert server.stop() == 0


def test_a_lane_connection_is_closed_by_the_drain() -> None:
    """SIGTERM: connections in the lane are closed as Tornado's keep-alive ones are."""
    server = ServerProcess(["--mode", "broadcast", "--api-key", KEY]).wait_ready()
    try:
        lane = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        tornados = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        for _ in range(2):
            lane.sendall(WARM)
            assert _read_answer(lane).startswith(b"HTTP/1.1 200 OK")
        tornados.sendall(get("/healthz"))
        assert _read_answer(tornados).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for sock in (lane, tornados):
            assert sock.recv(65536) == b""  # closed, nothing more sent
        assert time.monotonic() - started < 5.0
        assert server.proc.wait(10) == 0
        lane.close()
        tornados.close()
    finally:
        server.stop()


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


# --- the parser on its own ---------------------------------------------------------------


def head_of(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1") + body


GOOD = ["POST /api/publish HTTP/1.1", "Host: h", "Content-Length: 2"]


def test_the_parser_reads_a_plain_request() -> None:
    data = head_of(*GOOD, "content-type:  text/plain \t", body=b"[]")
    head = parse_head(data)
    assert isinstance(head, Head)
    assert (head.path, head.length, data[head.size :]) == ("/api/publish", 2, b"[]")
    assert head.headers == {"Host": "h", "Content-Length": "2", "Content-Type": "text/plain"}
    assert parse_head(data[:20]) is None
    assert parse_head(head_of(*GOOD, "Connection: Keep-Alive")) is not HAND_BACK


@pytest.mark.parametrize(
    "lines",
    [
        ["GET /api/publish HTTP/1.1", "Host: h", "Content-Length: 2"],
        ["POST /api/publish HTTP/1.0", "Host: h", "Content-Length: 2"],
        ["POST  /api/publish HTTP/1.1", "Host: h", "Content-Length: 2"],
        ["POST /api/publish?a=1 HTTP/1.1", "Host: h", "Content-Length: 2"],
        ["POST api/publish HTTP/1.1", "Host: h", "Content-Length: 2"],
        [*GOOD[:2]],  # no Content-Length
        [*GOOD, "Content-Length: 2"],  # twice
        [*GOOD[:2], "Content-Length: +2"],
        [*GOOD[:2], "Content-Length: 2, 2"],
        [*GOOD, "Transfer-Encoding: chunked"],
        [*GOOD, "Expect: 100-continue"],
        [*GOOD, "Upgrade: h2c"],
        [*GOOD, "Connection: close"],
        [*GOOD, "Connection: keep-alive, Upgrade"],
        [*GOOD, " folded"],
        [*GOOD, "Bad Name: x"],
        [*GOOD, "X: a\x01b"],
        [*GOOD, "X: caf\xe9"],
        [*GOOD, "no colon"],
    ],
)
def test_the_parser_hands_back_anything_else(lines: list[str]) -> None:
    assert parse_head(head_of(*lines)) is HAND_BACK


def test_the_parser_hands_back_other_line_ends_and_long_heads() -> None:
    assert parse_head(b"POST /api/publish HTTP/1.1\nHost: h\n\n") is HAND_BACK
    assert parse_head(b"POST /api/publish HTTP/1.1\r\nHost: h\r\n\n") is HAND_BACK
    assert parse_head(b"POST /api/publish HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT) is HAND_BACK
    assert parse_head(b"POST /api/publish HTTP/1.1\r\nX: " + b"a" * 100) is None


def test_a_stream_made_with_bytes_reads_them_first() -> None:
    """tornado_seam.stream_with_bytes: what a hand-back gives Tornado."""

    async def scenario() -> None:
        left, right = socket.socketpair()
        try:
            stream = stream_with_bytes(left, b"GET / HTTP/1.1\r\n")
            right.sendall(b"Host: h\r\n\r\nrest")
            head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), TIMEOUT)
            assert head == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            assert await stream.read_bytes(4) == b"rest"
            assert isinstance(stream, tornado.iostream.IOStream)
            stream.close()
        finally:
            right.close()

    run(scenario())

"""The user API end to end: POST /api/users/<sub>/messages reaches the user's personal
channel and DELETE /api/users/<sub>/connections closes the user's connections on every
process, through the hub's control channel.

The servers are real `python -m echoserver` processes, two of them sharing a real
redis-server (or one on the memory broker); the clients are Tornado WebSocket clients and a
streaming HTTP client for the event streams, all over loopback. The refusals (401, 404) are
asked of an in-process app.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.config import Settings
from echoserver.config.settings import NamespaceSettings
from echoserver.fanout.hub import CONTROL_CHANNEL
from echoserver.wire.framing import CloseCode
from tests.conftest import equals, eventually, fetch_json, kept, make_settings, run
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess

__all__ = ["redis_server"]  # the fixture

KEY = "user-api-key"
SECRET = "a-connection-token-secret-of-40-bytes...."
PERSONAL = [{"pattern": "user.{sub}", "subscribe": "user", "publish": "api"}]
DISCONNECTED = "disconnected by the server"
C = TypeVar("C", WebSocketClientConnection, "EventStream")


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def start(*args: str, namespaces: list[dict[str, Any]] | None = None) -> ServerProcess:
    env = {"ECHOSERVER_NAMESPACES": json.dumps(PERSONAL if namespaces is None else namespaces)}
    base = ["--api-key", KEY, "--auth-jwt-secret", SECRET]
    return ServerProcess([*base, *args], env).wait_healthy()


async def members(server: ServerProcess, channel: str) -> int:
    _, body = await asyncio.to_thread(fetch_json, f"{server.url}/api/channels/{channel}")
    return int(body["members"])


async def connect(
    server: ServerProcess, sub: str, bearer: bool = False
) -> WebSocketClientConnection:
    """`sub` on their personal channel, the token in the query or (bearer) the header."""
    url = f"{server.ws_url}/ws/user.{sub}"
    if bearer:
        request = HTTPRequest(url, headers={"Authorization": f"Bearer {token(sub)}"})
        return await websocket_connect(request)
    return await websocket_connect(f"{url}?token={token(sub)}")


async def read(client: WebSocketClientConnection, timeout: float = 10.0) -> str | bytes:
    message = await asyncio.wait_for(client.read_message(), timeout)
    assert message is not None, f"connection closed ({client.close_code} {client.close_reason})"
    return message


async def closed(client: WebSocketClientConnection, timeout: float = 10.0) -> tuple[Any, Any]:
    """Read until the server closes: (close code, reason); messages before it are ignored."""

    async def until_none() -> None:
        for _ in range(100):
            if await client.read_message() is None:
                return
        raise AssertionError("still open after 100 messages")

    await asyncio.wait_for(until_none(), timeout)
    return client.close_code, client.close_reason


def payload(mode: str, message: str | bytes) -> Any:
    """The JSON body the API published, as a member of the channel sees it in this mode:
    the body itself (broadcast) or in a broadcast envelope (mixed)."""
    if mode == "mixed":
        envelope = json.loads(message)
        assert envelope["type"] == "broadcast", envelope
        return envelope["payload"]
    return json.loads(message)


async def api(
    server: ServerProcess, method: str, path: str, body: str | None = None, key: str | None = KEY
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    response: HTTPResponse = await AsyncHTTPClient().fetch(
        f"{server.url}{path}",
        method=method,
        body=body,
        headers=headers,
        raise_error=False,
        request_timeout=10,
    )
    return response.code, json.loads(response.body) if response.body else {}


class EventStream:
    """An event stream of `sub`'s personal channel over a plain socket: HTTP/1.0, so the
    server ends the stream by closing the connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: ServerProcess, sub: str, timeout: float = 10.0) -> EventStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        stream = cls(reader, writer)
        path = f"/sse/user.{sub}?token={token(sub)}"
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            assert head.startswith(b"HTTP/1.1 200 "), head
            first = await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout)
            assert first.startswith(b"retry:"), first
        except BaseException:
            stream.close()
            raise
        return stream

    async def ended(self, timeout: float = 10.0) -> bytes:
        """What it got from here until the server ended it (closed the connection)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


class Clients:
    """What a scenario opens, closed when it ends however it ends."""

    def __init__(self) -> None:
        self.opened: list[WebSocketClientConnection | EventStream] = []

    def __call__(self, client: C) -> C:
        self.opened.append(client)
        return client

    def close(self) -> None:
        for client in self.opened:
            client.close()


def scenario_with_clients(
    scenario: Callable[[Clients], Coroutine[Any, Any, None]], timeout: float = 40.0
) -> None:
    """run() the scenario; the clients it opened are closed before its loop ends."""

    async def closing() -> None:
        opened = Clients()
        try:
            await scenario(opened)
        finally:
            opened.close()

    run(closing(), timeout)


async def both_got(mode: str, clients: list[WebSocketClientConnection], expected: Any) -> None:
    for client in clients:
        assert payload(mode, await read(client)) == expected


# --- two processes sharing one Redis --------------------------------------------------------


@pytest.fixture(params=["broadcast", "mixed"])
def two_hosts(request: pytest.FixtureRequest, redis_server: RedisServer) -> Any:
    mode = request.param
    hosts = [start("--mode", mode, "--broker", redis_server.url) for _ in range(2)]
    yield mode, hosts
    for host in hosts:
        host.stop()


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_message_to_a_user_reaches_her_on_every_process_and_nobody_else(two_hosts) -> None:
    mode, (a, b) = two_hosts

    async def scenario(opened: Clients) -> None:
        alice = [opened(await connect(a, "alice")), opened(await connect(b, "alice", bearer=True))]
        bob = opened(await connect(a, "bob"))
        assert await eventually(lambda: equals(members(b, "user.alice"), 2), 10)
        assert await eventually(lambda: equals(members(b, "user.bob"), 1), 10)

        status, answer = await api(b, "POST", "/api/users/alice/messages", '"hi alice"')
        assert status == 200, answer
        assert answer["channel"] == "user.alice"
        assert answer["offset"] == 1
        assert answer["receivers"] == 2
        await both_got(mode, alice, "hi alice")

        # Bob's first message is his own: alice's never reached him.
        status, answer = await api(a, "POST", "/api/users/bob/messages", '"hi bob"')
        assert (status, answer["channel"], answer["offset"]) == (200, "user.bob", 1)
        assert payload(mode, await read(bob)) == "hi bob"
        status, answer = await api(a, "POST", "/api/users/alice/messages", '"again"')
        assert (status, answer["offset"]) == (200, 2)
        await both_got(mode, alice, "again")

    scenario_with_clients(scenario)


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_disconnecting_a_user_closes_her_connections_on_every_process(two_hosts) -> None:
    mode, (a, b) = two_hosts

    async def scenario(opened: Clients) -> None:
        alice = [opened(await connect(a, "alice")), opened(await connect(b, "alice", bearer=True))]
        stream = opened(await EventStream.open(b, "alice"))
        bob = [opened(await connect(a, "bob")), opened(await connect(b, "bob"))]
        assert await eventually(lambda: equals(members(a, "user.alice"), 3), 10)
        assert await eventually(lambda: equals(members(a, "user.bob"), 2), 10)

        status, answer = await api(a, "DELETE", "/api/users/alice/connections")
        assert (status, answer) == (202, {"user": "alice", "disconnecting": True})
        for client in alice:
            assert await closed(client) == (CloseCode.DISCONNECTED_BY_THE_SERVER, DISCONNECTED)
        assert (await stream.ended()).split(b"\n\n")[-2:] == [b"event: disconnected\ndata: {}", b""]
        assert await eventually(lambda: equals(members(a, "user.alice"), 0), 10)

        # Bob was left alone: still connected, still served, on both processes.
        status, answer = await api(b, "POST", "/api/users/bob/messages", '"still here"')
        assert (status, answer["receivers"]) == (200, 2)
        await both_got(mode, bob, "still here")
        assert all(client.close_code is None for client in bob)
        # A disconnect is not a ban: alice may connect again.
        again = opened(await connect(b, "alice"))
        assert (await api(a, "POST", "/api/users/alice/messages", '"back"'))[0] == 200
        assert payload(mode, await read(again)) == "back"

    scenario_with_clients(scenario)
    assert "disconnected 1 connections of user 'alice'" in a.log()
    assert "disconnected 2 connections of user 'alice'" in b.log()  # a WebSocket and a stream


# --- one process, the memory broker ----------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", ["broadcast", "mixed"])
def test_disconnecting_works_on_one_process_with_the_memory_broker(mode: str) -> None:
    server = start("--mode", mode)

    async def scenario(opened: Clients) -> None:
        alice = [opened(await connect(server, "alice")), opened(await connect(server, "alice"))]
        stream = opened(await EventStream.open(server, "alice"))
        bob = opened(await connect(server, "bob"))
        assert await eventually(lambda: equals(members(server, "user.alice"), 3), 10)
        status, _ = await api(server, "DELETE", "/api/users/alice/connections")
        assert status == 202
        for client in alice:
            assert await closed(client) == (CloseCode.DISCONNECTED_BY_THE_SERVER, DISCONNECTED)
        assert (await stream.ended()).split(b"\n\n")[-2:] == [b"event: disconnected\ndata: {}", b""]
        status, answer = await api(server, "POST", "/api/users/bob/messages", '"hi"')
        assert (status, answer["offset"]) == (200, 1)
        assert payload(mode, await read(bob)) == "hi"

    try:
        scenario_with_clients(scenario, timeout=30)
        assert "disconnected 3 connections of user 'alice'" in server.log()
    finally:
        server.stop()


# --- refusals, in-process ----------------------------------------------------------------------


def user_settings(jwt_keys: bool = True, personal: bool = True) -> Settings:
    changes: dict[str, Any] = {"mode": "broadcast", "api.key": KEY}
    if jwt_keys:
        changes["auth.jwt_secret"] = (SECRET,)
    pattern = "user.{sub}" if personal else "room.*"
    changes["namespaces"] = (NamespaceSettings(pattern=pattern, subscribe="user", publish="api"),)
    if not jwt_keys:
        changes["namespaces"] = ()
    return make_settings(**changes)


class Local:
    """The in-process app's port, as the helpers above want a server."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"


class TestRefusals:
    @pytest.fixture
    def settings(self) -> Settings:
        return user_settings()

    @pytest.mark.gen_test(timeout=10)
    async def test_401_without_the_api_key(self, app, http_server, http_port) -> None:
        await app.server.start()
        server: Any = Local(http_port)
        for key in (None, "wrong"):
            status, body = await api(server, "POST", "/api/users/alice/messages", "1", key)
            assert status == 401, body
            status, body = await api(server, "DELETE", "/api/users/alice/connections", key=key)
            assert status == 401, body
        assert (await api(server, "POST", "/api/users/alice/messages", "1"))[0] == 200
        assert (await api(server, "DELETE", "/api/users/alice/connections"))[0] == 202


class TestNoPersonalNamespace:
    @pytest.fixture
    def settings(self) -> Settings:
        return user_settings(personal=False)

    @pytest.mark.gen_test(timeout=10)
    async def test_post_is_404(self, app, http_server, http_port) -> None:
        await app.server.start()
        server: Any = Local(http_port)
        status, body = await api(server, "POST", "/api/users/alice/messages", "1")
        assert status == 404, body
        assert "{sub}" in body["error"]
        # Disconnecting needs no personal channel, only users.
        assert (await api(server, "DELETE", "/api/users/alice/connections"))[0] == 202


class TestNoNamespaces:
    """JWT keys and no [[namespaces]]: the user API's control messages are still not kept,
    however much history the channels keep."""

    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(
            mode="broadcast",
            **{"api.key": KEY, "auth.jwt_secret": (SECRET,), "broadcast.history": 10},
        )

    @pytest.mark.gen_test(timeout=10)
    async def test_control_messages_keep_no_history(self, app, http_server, http_port) -> None:
        await app.server.start()
        server: Any = Local(http_port)
        for sub in ("alice", "bob"):
            assert (await api(server, "DELETE", f"/api/users/{sub}/connections"))[0] == 202
        broker = app.server.hub.broker
        assert broker.kept_for(CONTROL_CHANNEL)[0] == 0
        assert await kept(broker, CONTROL_CHANNEL, 10) == []
        assert broker.kept_for("news") == (10, 0.0)  # the channels keep theirs


class TestNoJwtKeys:
    @pytest.fixture
    def settings(self) -> Settings:
        return user_settings(jwt_keys=False)

    @pytest.mark.gen_test(timeout=10)
    async def test_delete_is_404(self, app, http_server, http_port) -> None:
        await app.server.start()
        server: Any = Local(http_port)
        status, body = await api(server, "DELETE", "/api/users/alice/connections")
        assert status == 404, body
        assert "JWT" in body["error"]
        assert (await api(server, "DELETE", "/api/users/alice/connections", key=None))[0] == 401

"""Presence with identities end to end: GET /api/channels/<ch>/presence and the join and
leave events of join_leave namespaces, in mixed mode and on Server-Sent Events.

The servers are real `python -m echoserver` processes, two of them sharing a real
redis-server (or one on the memory broker); the clients are Tornado WebSocket clients and
a raw HTTP/1.0 event-stream reader over loopback. "No event" is checked by publishing a
marker after the actions: presence events travel the channel's own path (through Redis,
in one order per channel), so the next thing a member gets is the marker.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import fetch, run
from tests.redis_cluster import clean_redis_cluster, redis_cluster
from tests.redis_server import redis_server
from tests.servers import ServerProcess

__all__ = ["clean_redis_cluster", "redis_cluster", "redis_server"]  # fixtures

KEY = "presence-api-key"
SECRET = "a-connection-token-secret-of-40-bytes...."
ROOMS = [{"pattern": "room.*", "join_leave": True}]
GRACE = 0.6


def token(sub: str) -> str:
    claims = {"sub": sub, "info": {"name": sub.title()}, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def start(*args: str) -> ServerProcess:
    env = {"ECHOSERVER_NAMESPACES": json.dumps(ROOMS)}
    base = ["--api-key", KEY, "--auth-jwt-secret", SECRET, "--auth-anonymous"]
    return ServerProcess([*base, "--presence-grace", str(GRACE), *args], env).wait_healthy()


def presence(server: ServerProcess, channel: str, key: str | None = KEY) -> tuple[int, Any]:
    import urllib.request

    request = urllib.request.Request(f"{server.url}/api/channels/{channel}/presence")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def api(server: ServerProcess, channel: str) -> Any:
    status, body = await asyncio.to_thread(presence, server, channel)
    assert status == 200, body
    return body


async def connect(server: ServerProcess, channel: str, sub: str | None) -> Client:
    query = "" if sub is None else f"?token={token(sub)}"
    return Client(await websocket_connect(f"{server.ws_url}/ws/{channel}{query}"))


class Client:
    """A mixed-mode client that sets aside the replies to its own publishes."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next join, leave or broadcast this member receives."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            message = await asyncio.wait_for(self.ws.read_message(), max(left, 0.01))
            assert message is not None, "closed"
            body = json.loads(message)
            if body["type"] in ("join", "leave", "broadcast"):
                return dict(body)

    async def marker(self, text: str) -> None:
        self.ws.write_message(json.dumps({"type": "broadcast", "payload": text}))

    def close(self) -> None:
        self.ws.close()


def join(user: str, channel: str = "room.x") -> dict[str, Any]:
    return {"type": "join", "channel": channel, "user": user, "info": {"name": user.title()}}


def leave(user: str, channel: str = "room.x") -> dict[str, Any]:
    return {"type": "leave", "channel": channel, "user": user, "info": {"name": user.title()}}


def marker(text: str, channel: str = "room.x") -> dict[str, Any]:
    return {"type": "broadcast", "channel": channel, "payload": text}


async def expect(client: Client, *wanted: dict[str, Any]) -> None:
    for want in wanted:
        got = await client.next()
        got.pop("offset", None)
        got.pop("epoch", None)
        assert got == want


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def two(request: pytest.FixtureRequest) -> Any:
    """Two processes sharing a real Redis, or a real Redis Cluster."""
    fixture = "clean_redis_cluster" if request.param == "cluster" else "redis_server"
    url = request.getfixturevalue(fixture).url
    hosts = [start("--mode", "mixed", "--broker", url) for _ in range(2)]
    yield hosts
    for host in hosts:
        host.stop()


def test_joins_and_leaves_across_two_processes(two: list[ServerProcess]) -> None:
    a, b = two

    async def scenario() -> None:
        ann = await connect(a, "room.x", "ann")
        await expect(ann, join("ann"))  # members get their own join too
        bob = await connect(b, "room.x", "bob")
        await expect(ann, join("bob"))
        await expect(bob, join("bob"))
        guest = await connect(a, "room.x", None)
        body = await api(b, "room.x")
        assert body == {
            "channel": "room.x",
            "users": [
                {"user": "ann", "info": {"name": "Ann"}, "connections": 1},
                {"user": "bob", "info": {"name": "Bob"}, "connections": 1},
            ],
            "connections": 3,
            "users_count": 2,
            "guests": 1,
        }
        # A second tab on the other process, then closed: neither a join nor a leave.
        ann2 = await connect(b, "room.x", "ann")
        assert (await api(a, "room.x"))["users"][0]["connections"] == 2
        ann2.close()
        # A quick reconnect on the other process: the first connection goes, a new one
        # comes within the grace.
        ann.close()
        await asyncio.sleep(GRACE / 4)
        ann = await connect(b, "room.x", "ann")
        await asyncio.sleep(GRACE * 1.5)  # past the grace the first process began
        await bob.marker("after the reconnect")
        await expect(bob, marker("after the reconnect"))
        await expect(ann, marker("after the reconnect"))
        # Bob leaves: announced once the grace is over, to the remaining members.
        bob.close()
        await expect(ann, leave("bob"))
        body = await api(a, "room.x")
        assert [u["user"] for u in body["users"]] == ["ann"]
        assert (body["connections"], body["users_count"], body["guests"]) == (2, 1, 1)
        ann.close()
        guest.close()

    run(scenario())


def test_a_killed_workers_users_expire(two: list[ServerProcess]) -> None:
    a, b = two

    async def scenario() -> float:
        carol = await connect(b, "room.k", "carol")
        dave = await connect(a, "room.k", "dave")
        users = [u["user"] for u in (await api(a, "room.k"))["users"]]
        assert users == ["carol", "dave"]
        b.kill()  # SIGKILL: no clean-up
        killed = time.monotonic()
        deadline = killed + 16  # the brokers' presence TTL (10 s) and a heartbeat
        while time.monotonic() < deadline:
            body = await api(a, "room.k")
            if [u["user"] for u in body["users"]] == ["dave"]:
                assert (body["connections"], body["guests"]) == (1, 0)
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError(f"carol still there: {body}")
        carol.close()
        dave.close()
        return time.monotonic() - killed

    assert run(scenario()) < 16


def test_presence_api_needs_the_key() -> None:
    server = ServerProcess(["--mode", "mixed", "--api-key", KEY]).wait_healthy()
    try:
        assert presence(server, "room.x", key=None)[0] == 401
        assert presence(server, "room.x", key="wrong")[0] == 401
        status, body = presence(server, "room.x")
        assert status == 200
        assert body == {
            "channel": "room.x",
            "users": [],
            "connections": 0,
            "users_count": 0,
            "guests": 0,
        }
    finally:
        server.stop()
    server = ServerProcess(["--mode", "mixed"]).wait_healthy()
    try:
        assert fetch(f"{server.url}/api/channels/room.x/presence")[0] == 404
    finally:
        server.stop()


class EventStream:
    """An event stream over a plain HTTP/1.0 socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: ServerProcess, path: str) -> EventStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        return cls(reader, writer)

    async def event(self, timeout: float = 10.0) -> tuple[str, str]:
        """The next event's (name, data), keepalives and retry skipped."""
        while True:
            chunk = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), timeout)
            lines = chunk.decode().strip("\n").split("\n")
            fields = dict(line.split(": ", 1) for line in lines if not line.startswith(":"))
            if "data" in fields:
                return fields.get("event", "message"), fields["data"]

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize("mode", ["mixed", "broadcast"])
def test_event_stream_gets_join_and_leave(mode: str) -> None:
    server = start("--mode", mode)

    async def scenario() -> list[tuple[str, str]]:
        stream = await EventStream.open(server, "/sse/room.s")
        got = []
        ann = await websocket_connect(f"{server.ws_url}/ws/room.s?token={token('ann')}")
        got.append(await stream.event())
        # A quick reconnect: nothing; then gone for good: a leave after the grace.
        ann.close()
        await asyncio.sleep(GRACE / 4)
        ann = await websocket_connect(f"{server.ws_url}/ws/room.s?token={token('ann')}")
        await asyncio.sleep(GRACE * 1.5)
        ann.close()
        got.append(await stream.event())
        stream.close()
        return got

    try:
        got = run(scenario())
    finally:
        server.stop()
    assert [name for name, _ in got] == ["join", "leave"]
    assert [json.loads(data) for _, data in got] == [
        join("ann", "room.s"),
        leave("ann", "room.s"),
    ]


def test_broadcast_mode_members_get_no_presence_events() -> None:
    server = start("--mode", "broadcast")

    async def scenario() -> str | bytes | None:
        watcher = await websocket_connect(f"{server.ws_url}/ws/room.b")
        ann = await websocket_connect(f"{server.ws_url}/ws/room.b?token={token('ann')}")
        ann.close()
        await asyncio.sleep(GRACE * 1.5)
        other = await websocket_connect(f"{server.ws_url}/ws/room.b")
        other.write_message("marker")
        message = await asyncio.wait_for(watcher.read_message(), 10)
        watcher.close()
        other.close()
        return message

    try:
        assert run(scenario()) == "marker"
    finally:
        server.stop()


def test_channels_without_join_leave_get_no_events_but_list_users() -> None:
    server = start("--mode", "mixed")

    async def scenario() -> tuple[dict[str, Any], Any]:
        ann = await connect(server, "quiet", "ann")
        bob = await connect(server, "quiet", "bob")
        body = await api(server, "quiet")
        await bob.marker("m")
        got = await ann.next()
        ann.close()
        bob.close()
        return got, body

    try:
        got, body = run(scenario())
    finally:
        server.stop()
    assert got["type"] == "broadcast" and got["payload"] == "m"
    assert body["users_count"] == 2

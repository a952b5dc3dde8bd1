"""The reconciliation snapshots across two real server processes on one real redis-server:
GET /api/channels lists every channel with members anywhere (member and user counts),
GET /api/users/<sub> a user's connections per process and channels anywhere, each with
the asking process's own detail (its members, its connections)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
from tornado.websocket import websocket_connect

from tests.conftest import eventually, run
from tests.redis_server import redis_server
from tests.servers import ServerProcess

__all__ = ["redis_server"]

pytestmark = pytest.mark.redis

KEY = "snapshot-api-key"
SECRET = "a-connection-token-secret-of-40-bytes...."


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def get(server: ServerProcess, path: str) -> Any:
    request = urllib.request.Request(server.url + path)
    request.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def sse(server: ServerProcess, path: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return writer


def test_snapshots_see_every_process(redis_server: Any) -> None:
    args = [
        "--mode", "mixed", "--broker", redis_server.url, "--api-key", KEY,
        "--auth-jwt-secret", SECRET, "--auth-anonymous", "--presence-grace", "0.3",
    ]  # fmt: skip
    a, b = ServerProcess(args), ServerProcess(args)

    async def scenario() -> None:
        await asyncio.gather(asyncio.to_thread(a.wait_healthy), asyncio.to_thread(b.wait_healthy))
        alice = f"?token={token('alice')}"
        conns = [
            await websocket_connect(f"{a.ws_url}/ws/room{alice}"),
            await websocket_connect(f"{a.ws_url}/ws/news{alice}"),
            await websocket_connect(f"{b.ws_url}/ws/lobby"),  # a guest
        ]
        stream = await sse(b, f"/sse/room{alice}")
        try:
            want_channels = [
                {"channel": "lobby", "members": 1, "users": 0},
                {"channel": "news", "members": 1, "users": 1},
                {"channel": "room", "members": 2, "users": 1},
            ]

            async def channels(server: ServerProcess) -> list[dict[str, Any]]:
                return list((await asyncio.to_thread(get, server, "/api/channels"))["channels"])

            def without_local(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [{k: v for k, v in c.items() if k != "local"} for c in found]

            async def seen_by_both() -> bool:
                views = [without_local(await channels(s)) for s in (a, b)]
                return views == [want_channels, want_channels]

            assert await eventually(seen_by_both, timeout=10), await channels(a)
            assert [c["local"] for c in await channels(a)] == [0, 1, 1]
            assert [c["local"] for c in await channels(b)] == [1, 0, 1]

            body = await asyncio.to_thread(get, b, "/api/users/alice")
            assert (body["user"], body["online"], body["connections"]) == ("alice", True, 3)
            assert body["channels"] == ["news", "room"]
            processes = sorted(body["processes"], key=lambda p: p["here"])
            assert [(p["here"], p["connections"], p["channels"]) for p in processes] == [
                (False, 2, ["news", "room"]),
                (True, 1, ["room"]),
            ]
            assert body["local"] == [{"kind": "sse", "channel": "room"}]
            nobody = await asyncio.to_thread(get, a, "/api/users/bob")
            assert nobody == {
                "user": "bob", "online": False, "connections": 0, "processes": [],
                "channels": [], "local": [],
            }  # fmt: skip
            # Everyone leaves: past the grace, nothing listed anywhere.
            for conn in conns:
                conn.close()
            stream.close()

            async def empty() -> bool:
                user = await asyncio.to_thread(get, a, "/api/users/alice")
                return await channels(a) == [] and not user["online"]

            assert await eventually(empty, timeout=10), await channels(a)
        finally:
            a.stop()
            b.stop()

    run(scenario(), timeout=30)


def test_a_restarted_redis_gets_every_process_entries_back(redis_server: Any) -> None:
    args = [
        "--mode", "mixed", "--broker", redis_server.url, "--api-key", KEY,
        "--auth-jwt-secret", SECRET, "--auth-anonymous", "--presence-grace", "0.3",
    ]  # fmt: skip
    a, b = ServerProcess(args), ServerProcess(args)

    async def scenario() -> None:
        await asyncio.gather(asyncio.to_thread(a.wait_healthy), asyncio.to_thread(b.wait_healthy))
        conn = await websocket_connect(f"{a.ws_url}/ws/room?token={token('alice')}")
        try:

            async def seen() -> bool:
                try:
                    user = await asyncio.to_thread(get, b, "/api/users/alice")
                except urllib.error.HTTPError as error:
                    assert error.code == 503  # while Redis is down
                    return False
                channels = (await asyncio.to_thread(get, b, "/api/channels"))["channels"]
                return bool(
                    user["connections"] == 1 and [c["channel"] for c in channels] == ["room"]
                )

            assert await eventually(seen, timeout=10)
            await asyncio.to_thread(redis_server.stop)
            await asyncio.to_thread(redis_server.start)  # empty: no persistence
            # Each process re-writes its entries once it is back (its next beat).
            assert await eventually(seen, timeout=15)
        finally:
            conn.close()
            a.stop()
            b.stop()

    run(scenario(), timeout=40)

"""The snapshots a webhook backend reconciles with: GET /api/channels and GET
/api/users/<sub>, behind the API key, beside the user API's own routes."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import jwt
import tornado.websocket

from tests.conftest import run
from tests.servers import ServerProcess

API_KEY = "k3y-for-snapshots"
JWT_SECRET = "a-secret-of-more-than-thirty-two-bytes-for-hs256"


def get(url: str, key: str | None = API_KEY) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_snapshots_list_channels_and_a_users_connections() -> None:
    server = ServerProcess(
        ["--mode", "broadcast", "--port", "0", "--api-key", API_KEY,
         "--auth-jwt-secret", JWT_SECRET, "--auth-anonymous"]
    )  # fmt: skip

    async def scenario() -> None:
        await asyncio.to_thread(server.wait_healthy)
        token = jwt.encode({"sub": "alice"}, JWT_SECRET, "HS256")
        conns = [
            await tornado.websocket.websocket_connect(f"{server.ws_url}/ws/{ch}?token={token}")
            for ch in ("room", "news", "room")
        ]
        conns.append(await tornado.websocket.websocket_connect(f"{server.ws_url}/ws/lobby"))
        try:
            status, body = await asyncio.to_thread(get, server.url + "/api/channels")
            assert status == 200, body
            assert body == {
                "channels": [
                    {"channel": "lobby", "local": 1, "members": 1, "users": 0},
                    {"channel": "news", "local": 1, "members": 1, "users": 1},
                    {"channel": "room", "local": 2, "members": 2, "users": 1},
                ]
            }
            status, body = await asyncio.to_thread(get, server.url + "/api/users/alice")
            assert status == 200, body
            assert body["user"] == "alice"
            assert body["channels"] == ["news", "room"]
            assert sorted(c["channel"] for c in body["local"]) == ["news", "room", "room"]
            assert {c["kind"] for c in body["local"]} == {"websocket"}
            status, body = await asyncio.to_thread(get, server.url + "/api/users/bob")
            assert (status, body["local"], body["channels"]) == (200, [], [])
            # Behind the key, like the publish API.
            for path in ("/api/channels", "/api/users/alice"):
                assert (await asyncio.to_thread(get, server.url + path, None))[0] == 401
                assert (await asyncio.to_thread(get, server.url + path, "wrong"))[0] == 401
        finally:
            for conn in conns:
                conn.close()
            await asyncio.to_thread(server.stop)

    run(scenario(), timeout=30)


def test_snapshots_are_off_without_an_api_key() -> None:
    server = ServerProcess(["--mode", "broadcast", "--port", "0"]).wait_healthy()
    try:
        assert get(server.url + "/api/channels", None)[0] == 404
        assert get(server.url + "/api/users/alice", None)[0] == 404
    finally:
        server.stop()

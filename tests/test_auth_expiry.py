"""A connection whose token runs out: 4001 on a WebSocket in every mode, `event: expired` on
an event stream, and in mixed mode a refresh in time that keeps it (or a refused one that
does not). The servers are real processes; the expiry clock is also tested on its own."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.auth.expiry import ExpiryClock
from tests.authkeys import SECRET, mint
from tests.servers import ServerProcess


@pytest.fixture(scope="module")
def servers() -> Any:
    started = {
        mode: ServerProcess(["--mode", mode, "--auth-jwt-secret", SECRET]).wait_ready()
        for mode in ("echo", "broadcast", "mixed")
    }
    yield started
    for server in started.values():
        server.stop()


async def connect(server: ServerProcess, token: str) -> WebSocketClientConnection:
    return await websocket_connect(
        HTTPRequest(f"{server.ws_url}/ws?token={token}", request_timeout=5)
    )


async def closed_after(client: WebSocketClientConnection, limit: float) -> float:
    """Seconds until the server closed the connection (reading whatever comes first)."""
    started = time.monotonic()
    while await asyncio.wait_for(client.read_message(), limit) is not None:
        pass
    return time.monotonic() - started


async def ask(client: WebSocketClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    client.write_message(json.dumps(message))
    answer = await asyncio.wait_for(client.read_message(), 5)
    assert isinstance(answer, str), answer
    return json.loads(answer)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["echo", "broadcast", "mixed"])
@pytest.mark.gen_test(timeout=20)
async def test_a_connection_is_closed_with_4001_when_its_token_expires(
    servers: dict[str, ServerProcess], mode: str
) -> None:
    exp = int(time.time()) + 2
    client = await connect(servers[mode], mint(ttl=exp - time.time()))
    await closed_after(client, 10)
    assert time.time() >= exp - 0.05  # not before its exp
    assert (client.close_code, client.close_reason) == (4001, "token expired")
    forever = await connect(servers[mode], mint(ttl=None))  # no exp: never expires
    forever.write_message(json.dumps({"type": "echo", "payload": 1}))
    assert await forever.read_message() is not None
    forever.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_refresh_in_time_keeps_the_connection(servers: dict[str, ServerProcess]):
    client = await connect(servers["mixed"], mint(ttl=2))
    new_exp = int(time.time()) + 5
    answer = await ask(client, {"type": "refresh", "token": mint(ttl=new_exp - time.time())})
    assert answer == {"type": "refreshed", "exp": new_exp}
    await asyncio.sleep(2.5)  # past the first token's exp
    assert (await ask(client, {"type": "echo", "payload": "alive"}))["payload"] == "alive"
    await closed_after(client, 10)
    assert time.time() >= new_exp - 0.05
    assert client.close_code == 4001


@pytest.mark.gen_test(timeout=20)
async def test_a_refused_refresh_keeps_the_old_expiry(servers: dict[str, ServerProcess]):
    exp = int(time.time()) + 2
    client = await connect(servers["mixed"], mint(ttl=exp - time.time()))
    for token, error in (
        (
            mint(sub="mallory", ttl=60),
            "the new token is for another user; reconnect with it",
        ),
        (mint(key="k" * 40, ttl=60), "token refused"),
        (mint(ttl=-10), "token refused"),
        ("", "refresh needs a token"),
    ):
        assert await ask(client, {"type": "refresh", "token": token}) == {
            "type": "error",
            "error": error,
        }
    await closed_after(client, 10)
    assert client.close_code == 4001 and time.time() < exp + 1.5


@pytest.mark.gen_test(timeout=20)
async def test_an_event_stream_says_expired_and_ends(servers: dict[str, ServerProcess]):
    url = f"{servers['broadcast'].url}/sse/news?token={mint(ttl=2)}"
    response = await AsyncHTTPClient().fetch(url, request_timeout=10)
    assert response.code == 200
    assert response.body.endswith(b"event: expired\ndata: {}\n\n")


# --- the clock on its own ---------------------------------------------------------------


class Conn:
    def __init__(self) -> None:
        self.expired_at: list[float] = []  # when the clock told it, by the wall clock

    @property
    def expired(self) -> int:
        return len(self.expired_at)

    def token_expired(self) -> None:
        self.expired_at.append(time.time())


@pytest.mark.gen_test(timeout=10)
async def test_the_clock_fires_once_at_the_deadline_plus_leeway_and_moves_on_refresh():
    # Checked by when each connection was told, not by sleeping into a window, so a busy
    # machine's late wake-ups cannot make it fail.
    clock = ExpiryClock(leeway=0.2)
    early, moved, forgotten = Conn(), Conn(), Conn()
    now = time.time()
    clock.watch(early, now + 0.1)
    clock.watch(moved, now + 0.1)
    clock.watch(forgotten, now + 0.1)
    clock.watch(moved, now + 0.6)  # a refresh
    clock.forget(forgotten)  # closed
    for _ in range(100):  # bounded: 5 s
        if moved.expired:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # nothing more comes
    assert (early.expired, moved.expired, forgotten.expired) == (1, 1, 0)
    assert early.expired_at[0] >= now + 0.1 + 0.2 - 0.01  # the leeway (timers may run 1 tick early)
    assert moved.expired_at[0] >= now + 0.6 + 0.2 - 0.01  # the refreshed deadline
    assert len(clock) == 0
    clock.close()


@pytest.mark.gen_test(timeout=10)
async def test_churn_does_not_grow_the_clock():
    clock = ExpiryClock()
    far = time.time() + 3600
    for _ in range(10_000):  # connections that come and go, each with a long token
        conn = Conn()
        clock.watch(conn, far)
        clock.forget(conn)
    assert len(clock) == 0 and len(clock._heap) <= 64 + 2
    clock.close()

"""Offsets and recovery end to end: ?since=N on real servers, one process and two sharing
a real Redis.

A client that was away asks for what it missed; it must get every message exactly once,
in order, and be told whether the replay reached back far enough (mixed mode: a
"recovery" message; broadcast mode: headers on the 101).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any
from unittest.mock import ANY  # a wildcard for an epoch

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import run
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess

__all__ = ["redis_server"]  # the fixture

KEY = "recovery-key"


def publish(server: ServerProcess, payload: Any, channel: str = "feed") -> int:
    """Publish through the API, as a backend does; the message's offset."""
    request = urllib.request.Request(
        f"{server.url}/api/channels/{channel}/messages",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["offset"])


async def connect(
    server: ServerProcess, channel: str = "feed", since: int | None = None
) -> WebSocketClientConnection:
    query = "" if since is None else f"?since={since}"
    return await websocket_connect(f"{server.ws_url}/ws/{channel}{query}")


async def read_json(client: WebSocketClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    message = await asyncio.wait_for(client.read_message(), timeout)
    assert message is not None, f"closed ({client.close_code})"
    return json.loads(message)


async def broadcasts(client: WebSocketClientConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` broadcast envelopes (other notices skipped), bounded in time."""
    got: list[dict[str, Any]] = []
    for _ in range(count * 3):
        if len(got) == count:
            break
        message = await read_json(client)
        if message["type"] == "broadcast":
            got.append(message)
    return got


def mixed(run_server: Any, *extra: str) -> ServerProcess:
    return run_server("--mode", "mixed", "--api-key", KEY, *extra)


def test_since_replays_what_was_missed_then_live(run_server: Any) -> None:
    server = mixed(run_server, "--history", "50")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        client = await connect(server)
        for n in range(3):
            await asyncio.to_thread(publish, server, n)
        seen = await broadcasts(client, 3)
        client.close()
        for n in range(3, 6):
            await asyncio.to_thread(publish, server, n)
        back = await connect(server, since=seen[-1]["offset"])
        recovery = await read_json(back)
        await asyncio.to_thread(publish, server, 6)
        rest = await broadcasts(back, 4)
        back.close()
        return recovery, seen + rest

    recovery, got = run(scenario())
    assert recovery == {
        "type": "recovery",
        "channel": "feed",
        "recovered": True,
        "since": 3,
        "first": 4,
        "epoch": ANY,
    }
    assert [m["offset"] for m in got] == list(range(1, 8))
    assert [m["payload"] for m in got] == list(range(7))


def test_since_older_than_the_history_replays_what_is_kept_marked_not_recovered(
    run_server: Any,
) -> None:
    server = mixed(run_server, "--history", "3")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        for n in range(10):
            await asyncio.to_thread(publish, server, n)
        back = await connect(server, since=2)
        recovery = await read_json(back)
        replayed = await broadcasts(back, 3)
        back.close()
        return recovery, replayed

    recovery, replayed = run(scenario())
    assert recovery == {
        "type": "recovery",
        "channel": "feed",
        "recovered": False,
        "since": 2,
        "first": 8,
        "epoch": ANY,
    }
    assert [m["offset"] for m in replayed] == [8, 9, 10]


def test_since_with_nothing_new_is_recovered_and_plain_joins_are_unchanged(
    run_server: Any,
) -> None:
    server = mixed(run_server, "--history", "5")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        for n in range(2):
            await asyncio.to_thread(publish, server, n)
        current = await connect(server, since=2)
        recovery = await read_json(current)
        plain = await connect(server)
        history = await read_json(plain)
        replayed = await broadcasts(plain, 2)
        current.close()
        plain.close()
        return recovery, history, replayed

    recovery, history, replayed = run(scenario())
    assert recovery == {
        "type": "recovery",
        "channel": "feed",
        "recovered": True,
        "since": 2,
        "first": None,
        "epoch": ANY,
    }
    assert history == {"type": "history", "channel": "feed", "count": 2}
    assert [m["offset"] for m in replayed] == [1, 2]


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "", "1%200", "1&since=2", "9" * 19])
def test_a_since_that_is_not_an_offset_is_refused_at_the_handshake(
    run_server: Any, since: str
) -> None:
    server = mixed(run_server)

    async def scenario() -> int:
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(f"{server.ws_url}/ws/feed?since={since}")
        return refused.value.code

    assert run(scenario()) == 400


def test_broadcast_mode_says_it_in_the_101s_headers(run_server: Any) -> None:
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--history", "3")

    async def scenario() -> list[tuple[dict[str, str], list[str | bytes | None]]]:
        for n in range(5):
            await asyncio.to_thread(publish, server, n)
        seen = []
        for since in (None, 3, 1, 5):
            client = await connect(server, since=since)
            headers = {k: v for k, v in client.headers.get_all() if k.startswith("Echoserver-")}
            await asyncio.to_thread(publish, server, "live")
            # What the headers announce, then the live message.
            frames = [
                await asyncio.wait_for(client.read_message(), 10)
                for _ in range(int(headers["Echoserver-Replayed"]) + 1)
            ]
            client.close()
            seen.append((headers, frames))
        return seen

    plain, recovered, lost, current = run(scenario())
    assert plain == (
        {
            "Echoserver-Last-Offset": "5",
            "Echoserver-Replayed": "3",
            "Echoserver-Epoch": ANY,
            "Echoserver-First-Offset": "3",
        },
        ["2", "3", "4", '"live"'],
    )
    assert recovered[0] == {
        "Echoserver-Last-Offset": "6",
        "Echoserver-Replayed": "3",
        "Echoserver-Epoch": plain[0]["Echoserver-Epoch"],
        "Echoserver-First-Offset": "4",
        "Echoserver-Recovered": "true",
    }
    assert recovered[1] == ["3", "4", '"live"', '"live"']
    assert lost[0]["Echoserver-Recovered"] == "false"
    assert lost[0]["Echoserver-First-Offset"] == "5"
    assert current == (
        {
            "Echoserver-Last-Offset": "8",
            "Echoserver-Replayed": "3",
            "Echoserver-Epoch": plain[0]["Echoserver-Epoch"],
            "Echoserver-First-Offset": "6",
            "Echoserver-Recovered": "true",
        },
        ['"live"', '"live"', '"live"', '"live"'],
    )


def test_history_ttl_limits_what_can_be_recovered(run_server: Any) -> None:
    server = mixed(run_server, "--history", "100", "--history-ttl", "0.5")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        await asyncio.to_thread(publish, server, "old")
        fresh = await connect(server, since=0)
        in_time = await read_json(fresh)
        fresh.close()
        await asyncio.sleep(1.0)
        late = await connect(server, since=0)
        too_late = await read_json(late)
        late.close()
        return in_time, too_late

    in_time, too_late = run(scenario())
    assert in_time == {
        "type": "recovery",
        "channel": "feed",
        "recovered": True,
        "since": 0,
        "first": 1,
        "epoch": ANY,
    }
    assert too_late == {
        "type": "recovery",
        "channel": "feed",
        "recovered": False,
        "since": 0,
        "first": None,
        "epoch": ANY,
    }


# --- two processes sharing a real Redis --------------------------------------------------------


@pytest.mark.redis
def test_a_client_away_during_1000_messages_gets_each_once_in_order(
    run_server: Any, redis_server: RedisServer
) -> None:
    """Published by a member on one server and by the API on both, while the reader
    disconnects from the first server and comes back to the second with since."""
    a, b = (mixed(run_server, "--broker", redis_server.url, "--history", "2000") for _ in "ab")
    total = 1000

    async def publish_all(publisher: WebSocketClientConnection) -> None:
        for n in range(total // 2):
            await publisher.write_message(json.dumps({"type": "broadcast", "payload": f"m{n}"}))
            await asyncio.to_thread(publish, a if n % 2 else b, f"api{n}")

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        reader = await connect(a)
        publisher = await connect(b)
        publishing = asyncio.ensure_future(publish_all(publisher))
        first = await broadcasts(reader, 200)
        reader.close()
        await asyncio.sleep(0.3)  # away while messages go on
        back = await connect(b, since=first[-1]["offset"])
        recovery = await read_json(back)
        rest = await broadcasts(back, total - len(first))
        await asyncio.wait_for(publishing, 60)
        back.close()
        publisher.close()
        return first + rest, recovery

    got, recovery = run(scenario(), timeout=120)
    assert recovery["recovered"] is True and recovery["first"] == 201
    assert [m["offset"] for m in got] == list(range(1, total + 1))
    payloads = [m["payload"] for m in got]
    assert sorted(payloads) == sorted(
        [f"m{n}" for n in range(total // 2)] + [f"api{n}" for n in range(total // 2)]
    )
    member_order = [p for p in payloads if p.startswith("m")]
    assert member_order == [f"m{n}" for n in range(total // 2)]  # a sender's order is kept


@pytest.mark.redis
def test_an_offset_from_before_redis_lost_its_data_is_not_recovered(
    run_server: Any, redis_server: RedisServer
) -> None:
    server = mixed(run_server, "--broker", redis_server.url, "--history", "10")

    def publish_when_up(payload: Any) -> int:
        for _ in range(100):
            try:
                return publish(server, payload)
            except urllib.error.HTTPError as error:
                assert error.code == 503
                time.sleep(0.1)
        raise AssertionError("the broker did not come back")

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        for n in range(5):
            await asyncio.to_thread(publish, server, n)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)  # same port, empty
        await asyncio.to_thread(publish_when_up, "new")
        back = await connect(server, since=5)
        recovery = await read_json(back)
        replayed = await broadcasts(back, 1)
        back.close()
        return recovery, replayed

    recovery, replayed = run(scenario())
    assert recovery == {
        "type": "recovery",
        "channel": "feed",
        "recovered": False,
        "since": 5,
        "first": 1,
        "epoch": ANY,
    }
    assert replayed == [
        {"type": "broadcast", "channel": "feed", "payload": "new", "offset": 1, "epoch": ANY}
    ]

"""Epochs end to end: an offset from a numbering the broker lost is never answered with a
replay that claims to continue it.

A Redis flushed (FLUSHALL) and then published past the client's offset again, and a
restarted memory-broker server, must answer `since` with the old epoch `recovered:false`
and the current epoch, on a WebSocket (mixed mode's recovery notice, the 101's headers) and
on an event stream (Last-Event-ID ``<epoch>:<offset>``). The same epoch resumes as before.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest
import redis
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.wire.positions import valid_epoch
from tests.conftest import run
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess
from tests.test_sse import Reader

__all__ = ["redis_server"]  # the fixture

KEY = "epochs-key"


def post(server: ServerProcess, payload: Any, channel: str = "feed") -> dict[str, Any]:
    """Publish through the API; its answer (offset, epoch, ...)."""
    request = urllib.request.Request(
        f"{server.url}/api/channels/{channel}/messages",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


async def connect(server: ServerProcess, query: str = "") -> WebSocketClientConnection:
    return await websocket_connect(f"{server.ws_url}/ws/feed{query}")


async def read_json(client: WebSocketClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(client.read_message(), 10)
    assert message is not None, f"closed ({client.close_code})"
    result: dict[str, Any] = json.loads(message)
    return result


def mixed(run_server: Any, *extra: str) -> ServerProcess:
    return run_server("--mode", "mixed", "--api-key", KEY, "--history", "20", *extra)


def flushall(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.mark.redis
def test_a_flushed_redis_published_past_the_offset_is_not_recovered(
    run_server: Any, redis_server: RedisServer
) -> None:
    """The bug epochs fix: after FLUSHALL and 7 new messages, since=5 of the old numbering
    used to get offsets 6 and 7 of the new one, claimed recovered."""
    server = mixed(run_server, "--broker", redis_server.url)

    async def scenario() -> dict[str, Any]:
        old = [await asyncio.to_thread(post, server, f"old{n}") for n in range(5)]
        await asyncio.to_thread(flushall, redis_server)
        new = [await asyncio.to_thread(post, server, f"new{n}") for n in range(7)]
        back = await connect(server, f"?since=5&epoch={old[-1]['epoch']}")
        header = back.headers.get("Echoserver-Epoch")
        recovery = await read_json(back)
        replayed = [await read_json(back) for _ in range(7)]
        back.close()
        same = await connect(server, f"?since=5&epoch={new[-1]['epoch']}")
        same_recovery = await read_json(same)
        same_replayed = [await read_json(same) for _ in range(2)]
        same.close()
        return {
            "old": old,
            "new": new,
            "header": header,
            "recovery": recovery,
            "replayed": replayed,
            "same": (same_recovery, same_replayed),
        }

    got = run(scenario())
    old_epoch, new_epoch = got["old"][0]["epoch"], got["new"][0]["epoch"]
    assert valid_epoch(old_epoch) and valid_epoch(new_epoch) and old_epoch != new_epoch
    assert {answer["epoch"] for answer in got["old"]} == {old_epoch}
    assert [answer["offset"] for answer in got["new"]] == list(range(1, 8))
    assert got["header"] == new_epoch
    assert got["recovery"] == {
        "type": "recovery",
        "channel": "feed",
        "recovered": False,
        "since": 5,
        "first": 1,
        "epoch": new_epoch,
    }
    assert got["replayed"] == [
        {
            "type": "broadcast",
            "channel": "feed",
            "payload": f"new{n}",
            "offset": n + 1,
            "epoch": new_epoch,
        }
        for n in range(7)
    ]
    # The current epoch resumes exactly, as before epochs.
    recovery, replayed = got["same"]
    assert (recovery["recovered"], recovery["first"], recovery["epoch"]) == (True, 6, new_epoch)
    assert [m["offset"] for m in replayed] == [6, 7]


@pytest.mark.redis
def test_an_event_stream_from_a_flushed_redis_is_not_recovered(
    run_server: Any, redis_server: RedisServer
) -> None:
    server = run_server(
        "--mode", "broadcast", "--api-key", KEY, "--history", "20", "--broker", redis_server.url
    )
    first = Reader(server.port, "/sse/feed")
    old = [post(server, f"old{n}") for n in range(5)]
    events = first.events(5)
    first.close()
    last_id = events[-1]["id"]
    assert last_id == f"{old[-1]['epoch']}:5"
    flushall(redis_server)
    new = [post(server, f"new{n}") for n in range(7)]
    epoch = new[0]["epoch"]
    back = Reader(server.port, "/sse/feed", {"Last-Event-ID": last_id})
    resumed = back.events(8)
    back.close()
    assert resumed[0]["event"] == "recovery"
    assert json.loads(resumed[0]["data"]) == {
        "recovered": False,
        "since": 5,
        "first": 1,
        "epoch": epoch,
    }
    assert [(e["id"], e["data"]) for e in resumed[1:]] == [
        (f"{epoch}:{n + 1}", f'"new{n}"') for n in range(7)
    ]
    # The id of the new epoch resumes exactly.
    again = Reader(server.port, "/sse/feed", {"Last-Event-ID": f"{epoch}:6"})
    tail = again.events(2)
    again.close()
    assert json.loads(tail[0]["data"])["recovered"] is True
    assert tail[1]["id"] == f"{epoch}:7"


def test_a_restarted_memory_broker_numbers_under_a_new_epoch(run_server: Any) -> None:
    """A client of a server that restarted (its memory broker lost every channel) comes
    back with its offset: not recovered, the new epoch, the new numbering's messages."""
    before = mixed(run_server)
    old = [post(before, n) for n in range(5)]
    before.stop()
    after = mixed(run_server)
    new = [post(after, n) for n in range(3)]
    assert old[0]["epoch"] != new[0]["epoch"]

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        back = await connect(after, f"?since=2&epoch={old[-1]['epoch']}")
        recovery = await read_json(back)
        replayed = [await read_json(back) for _ in range(3)]
        back.close()
        return recovery, replayed

    recovery, replayed = run(scenario())
    assert (recovery["recovered"], recovery["first"]) == (False, 1)
    assert recovery["epoch"] == new[0]["epoch"]
    assert [m["offset"] for m in replayed] == [1, 2, 3]


def test_a_mixed_sender_is_told_the_epoch_of_its_offset(run_server: Any) -> None:
    server = mixed(run_server)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        client = await connect(server)
        await client.write_message(json.dumps({"type": "broadcast", "payload": "hi"}))
        first = await read_json(client)
        second = await read_json(client)
        client.close()
        return first, second

    a, b = run(scenario())
    result, envelope = (a, b) if a["type"] == "broadcastResult" else (b, a)
    assert envelope == {
        "type": "broadcast",
        "channel": "feed",
        "payload": "hi",
        "offset": 1,
        "epoch": result["epoch"],
    }
    assert result["offset"] == 1 and valid_epoch(result["epoch"])


@pytest.mark.parametrize("epoch", ["a%20b", "x" * 33, "a:b", "%C3%A9"])
def test_an_epoch_that_cannot_be_one_is_refused_at_the_handshake(
    run_server: Any, epoch: str
) -> None:
    server = mixed(run_server)

    async def scenario() -> int:
        try:
            await connect(server, f"?since=1&epoch={epoch}")
        except HTTPClientError as error:
            return error.code
        return 101

    assert run(scenario()) == 400


@pytest.mark.parametrize("last_id", ["abc", "a b:3", ":3x", "é:3", "3:"])
def test_an_event_id_that_is_not_one_is_refused(run_server: Any, last_id: str) -> None:
    server = run_server("--mode", "broadcast")
    reader = Reader(server.port, "/sse/feed", {"Last-Event-ID": last_id})
    status = reader.status
    reader.close()
    assert status == 400


def test_a_bare_offset_is_taken_as_the_current_epochs(run_server: Any) -> None:
    """Clients from before epochs (?since=N alone, a bare Last-Event-ID) resume as before
    and learn the epoch from the answer."""
    server = mixed(run_server)
    answers = [post(server, n) for n in range(4)]
    epoch = answers[0]["epoch"]
    reader = Reader(server.port, "/sse/feed", {"Last-Event-ID": "2"})
    events = reader.events(3)
    reader.close()
    assert json.loads(events[0]["data"]) == {
        "recovered": True,
        "since": 2,
        "first": 3,
        "epoch": epoch,
    }
    assert [e["id"] for e in events[1:]] == [f"{epoch}:3", f"{epoch}:4"]

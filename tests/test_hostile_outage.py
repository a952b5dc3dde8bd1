"""A short broker outage closes nobody and loses nothing (issue 18, item 9).

Real servers on a real redis-server (tests/redis_server.py) or Redis Cluster
(tests/redis_cluster.py): a sender publishing every 100 ms through a 2-second Redis
restart, or a cluster primary's failover, keeps its connection and every receiver gets
every message once, in order; past `publish_timeout` (or the bytes a connection may have
waiting) the sender is told as before: 1013 in broadcast mode, an error envelope in mixed
mode, 503 from the publish API.

After a restart, an empty redis-server numbers each channel from 1 again: the messages
that waited get the new offsets (1, 2, ...), which is the next issue's epoch work.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from tornado.websocket import WebSocketClientConnection

from echoserver.brokers.base import BrokerUnavailable, Envelope
from echoserver.brokers.redis import RedisBroker
from echoserver.brokers.redis_base import RedisOptions
from echoserver.brokers.redis_wire import KeyNames
from tests.conftest import equals, eventually, run
from tests.redis_cluster import LocalCluster, own_redis_cluster
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess
from tests.test_cluster import connect, members, read

__all__ = ["own_redis_cluster", "redis_server"]  # fixtures

pytestmark = pytest.mark.redis

KEY = "outage-key"
COUNT = 60  # messages, one every 100 ms: the outage starts 1 s in


def status(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def post(server: ServerProcess, payload: str, timeout: float = 20) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.url}/api/channels/room/messages",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Outage(threading.Thread):
    """Runs `cut` one second in, noting whether /healthz said 503 meanwhile."""

    def __init__(self, server: ServerProcess, cut: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.server, self.cut = server, cut
        self.saw_503 = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(1.0)
            watcher = threading.Thread(target=self._watch, daemon=True)
            watcher.start()
            self.cut()
            watcher.join(20)
        except BaseException as error:  # reported by the test
            self.error = error

    def _watch(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.saw_503:
            self.saw_503 = status(self.server) == 503
            time.sleep(0.05)


def payloads(mode: str, message: str | bytes) -> tuple[str, str | None]:
    """(kind, payload) of what a client got: a relayed message, or a mixed envelope."""
    if mode == "broadcast":
        return "broadcast", str(message)
    envelope = json.loads(message)
    return envelope["type"], envelope.get("payload") or envelope.get("error")


def through(server: ServerProcess, mode: str, cut: Callable[[], None]) -> None:
    """A sender and two receivers on one channel, the sender publishing every 100 ms
    while `cut` breaks and mends the broker: each gets all COUNT messages once, in order,
    the sender keeps its connection and is never told of an error."""

    async def send(client: WebSocketClientConnection, n: int) -> None:
        text = f"m{n}"
        if mode == "mixed":
            text = json.dumps({"type": "broadcast", "payload": text})
        await client.write_message(text)

    async def collect(client: WebSocketClientConnection, want: int) -> list[tuple[str, Any]]:
        got: list[tuple[str, Any]] = []
        deadline = time.monotonic() + 40
        while sum(kind == "broadcast" for kind, _ in got) < want:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {got[-3:]} after 40 s"
            got.append(payloads(mode, await read(client, remaining)))
        return got

    async def scenario() -> tuple[list[list[tuple[str, Any]]], bool]:
        sender, *receivers = [await connect(server) for _ in range(3)]
        assert await eventually(lambda: equals(members(server), 3), 15)
        outage = Outage(server, cut)

        async def paced() -> None:
            outage.start()
            for n in range(COUNT):
                await send(sender, n)
                await asyncio.sleep(0.1)

        results = await asyncio.gather(
            paced(), *(collect(client, COUNT) for client in [sender, *receivers])
        )
        await asyncio.to_thread(outage.join, 30)
        assert outage.error is None, outage.error
        # Still connected: one more goes through.
        await send(sender, COUNT)
        last = await collect(receivers[0], 1)
        assert last[-1] == ("broadcast", f"m{COUNT}")
        for client in [sender, *receivers]:
            client.close()
        return list(results[1:]), outage.saw_503

    got, saw_503 = run(scenario(), timeout=90)
    expected = [f"m{n}" for n in range(COUNT)]
    for seen in got:
        assert [p for kind, p in seen if kind == "broadcast"] == expected
        assert not [p for kind, p in seen if kind == "error"]
    if mode == "mixed":  # the sender was answered for each one, none with an error
        results = [p for kind, p in got[0] if kind == "broadcastResult"]
        assert results == expected[: len(results)] and len(results) >= COUNT - 1
    assert saw_503, "/healthz did not report the outage"
    assert server.proc.poll() is None
    assert "connected again" in server.log()


def restart(redis: RedisServer) -> Callable[[], None]:
    def cut() -> None:
        redis.stop()
        time.sleep(2.0)
        redis.start()

    return cut


@pytest.mark.parametrize("mode", ["broadcast", "mixed"])
def test_a_sender_keeps_its_connection_and_every_message_through_a_redis_restart(
    run_server: Any, redis_server: RedisServer, mode: str
) -> None:
    server = run_server("--mode", mode, "--broker", redis_server.url)
    through(server, mode, restart(redis_server))


def test_a_sender_keeps_its_connection_and_every_message_through_a_failover(
    run_server: Any, own_redis_cluster: LocalCluster
) -> None:
    cluster = own_redis_cluster
    victim = cluster.primary_of(KeyNames("echoserver", 0).pubsub("room"))
    server = run_server("--mode", "mixed", "--broker", cluster.url)
    started = time.monotonic()
    through(server, "mixed", lambda: cluster.kill(victim))
    assert cluster.primary_of(KeyNames("echoserver", 0).pubsub("room")) != victim
    assert time.monotonic() - started < 60


def test_past_publish_timeout_the_sender_is_told_as_before(
    run_server: Any, redis_server: RedisServer
) -> None:
    """Redis down for 3 s with --publish-timeout 1: a broadcast-mode sender is closed with
    1013, a mixed-mode one gets an error envelope and stays, the publish API answers 503."""
    common = ("--broker", redis_server.url, "--publish-timeout", "1", "--api-key", KEY)
    relay = run_server("--mode", "broadcast", *common)
    mixed = run_server("--mode", "mixed", *common)

    async def scenario() -> dict[str, Any]:
        on_relay, on_mixed = await connect(relay), await connect(mixed)
        await asyncio.to_thread(redis_server.stop)
        assert await eventually(lambda: _down(relay, mixed), 15)
        started = time.monotonic()
        await on_relay.write_message("lost")
        await on_mixed.write_message(json.dumps({"type": "broadcast", "payload": "lost"}))
        api = asyncio.ensure_future(asyncio.to_thread(post, mixed, "lost"))
        assert await asyncio.wait_for(on_relay.read_message(), 10) is None
        relay_closed = time.monotonic() - started
        error = json.loads(await read(on_mixed))
        api_status, api_body = await api
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - started)))
        await asyncio.to_thread(redis_server.start)
        assert await eventually(lambda: _up(relay, mixed), 20)
        await on_mixed.write_message(json.dumps({"type": "broadcast", "payload": "after"}))
        after = [json.loads(await read(on_mixed)) for _ in range(2)]
        on_mixed.close()
        return {
            "relay": (on_relay.close_code, on_relay.close_reason, relay_closed),
            "error": error,
            "api": (api_status, api_body),
            "after": after,
        }

    result = run(scenario(), timeout=60)
    code, reason, after_s = result["relay"]
    assert code == 1013 and reason.startswith("not delivered: redis")
    assert 0.8 <= after_s <= 3.0  # it waited publish_timeout, no less
    assert result["error"]["type"] == "error"
    assert result["error"]["error"].startswith("not delivered: redis")
    assert result["api"][0] == 503 and "not published" in result["api"][1]["error"]
    after = {message["type"]: message for message in result["after"]}
    assert after["broadcast"]["payload"] == "after" and after["broadcast"]["offset"] == 1
    assert after["broadcastResult"]["payload"] == "after"


async def _down(*servers: ServerProcess) -> bool:
    return all([await asyncio.to_thread(status, s) == 503 for s in servers])


async def _up(*servers: ServerProcess) -> bool:
    return all([await asyncio.to_thread(status, s) == 200 for s in servers])


def test_the_publish_api_waits_for_redis_to_come_back(
    run_server: Any, redis_server: RedisServer
) -> None:
    server = run_server("--mode", "mixed", "--broker", redis_server.url, "--api-key", KEY)

    async def scenario() -> tuple[int, dict[str, Any], float]:
        await asyncio.to_thread(redis_server.stop)
        assert await eventually(lambda: _down(server), 15)
        started = time.monotonic()
        api = asyncio.ensure_future(asyncio.to_thread(post, server, "waited"))
        await asyncio.sleep(1.0)
        assert not api.done()
        await asyncio.to_thread(redis_server.start)
        code, body = await api
        return code, body, time.monotonic() - started

    code, body, took = run(scenario(), timeout=60)
    assert (code, body["offset"]) == (200, 1)
    assert 1.0 <= took < 5.0


def test_a_connection_may_not_have_more_than_max_queue_bytes_waiting(
    run_server: Any, redis_server: RedisServer
) -> None:
    """While Redis is down a broadcast-mode sender's waiting messages are capped by
    max_queue_bytes: past it the sender is closed at once, not after publish_timeout."""
    server = run_server(
        "--mode",
        "broadcast",
        "--broker",
        redis_server.url,
        "--max-queue-bytes",
        "1024",
        "--publish-timeout",
        "30",
    )

    async def scenario() -> tuple[int | None, str | None, float]:
        sender = await connect(server)
        await asyncio.to_thread(redis_server.stop)
        assert await eventually(lambda: _down(server), 15)
        started = time.monotonic()
        await sender.write_message("a" * 600)  # waits
        await sender.write_message("b" * 600)  # would make 1200 bytes waiting
        assert await asyncio.wait_for(sender.read_message(), 10) is None
        took = time.monotonic() - started
        await asyncio.to_thread(redis_server.start)
        return sender.close_code, sender.close_reason, took

    code, reason, took = run(scenario(), timeout=60)
    assert code == 1013 and reason is not None and "1024 bytes" in reason
    assert took < 5.0


def test_the_process_may_not_have_more_than_max_waiting_bytes_waiting(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All senders of a process together: past MAX_WAITING_BYTES a publish is refused at
    once; one that waits still lands once Redis is back."""
    monkeypatch.setattr("echoserver.brokers.redis_base.MAX_WAITING_BYTES", 1000)

    async def scenario() -> int:
        broker = RedisBroker(redis_server.url, RedisOptions(backoff_cap=0.5, op_timeout=1.0))
        broker.publish_timeout = 30
        await broker.start(lambda envelope: None)
        await asyncio.to_thread(redis_server.stop)
        assert await eventually(lambda: not broker.healthy, 15)
        waiting = broker.publish(Envelope("room", b"a" * 600, False, "one"))
        with pytest.raises(BrokerUnavailable, match="1000 bytes wait already"):
            broker.publish(Envelope("room", b"b" * 600, False, "two"))
        await asyncio.to_thread(redis_server.start)
        offset = await asyncio.wait_for(waiting, 20)
        await broker.close()
        return offset

    assert run(scenario(), timeout=60) == 1

"""End to end, scaled out: real `python -m echoserver` processes sharing a real redis-server.

Two servers on different ports stand for two hosts; `--processes 2` is two workers on one
port. Clients are Tornado WebSocket clients over loopback. Redis is stopped and started
again mid-run to show that servers and clients live through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import equals, eventually, fetch_json, run, wait_until
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess, run_once

__all__ = ["redis_server"]  # the fixture


async def members(server: ServerProcess, channel: str = "room") -> int:
    _, body = await asyncio.to_thread(fetch_json, f"{server.url}/api/channels/{channel}")
    return int(body["members"])


async def connect(server: ServerProcess, channel: str = "room") -> WebSocketClientConnection:
    return await websocket_connect(f"{server.ws_url}/ws/{channel}")


async def read(client: WebSocketClientConnection, timeout: float = 10.0) -> str | bytes:
    message = await asyncio.wait_for(client.read_message(), timeout)
    assert message is not None, f"connection closed ({client.close_code})"
    return message


def redis_args(redis: RedisServer, *extra: str, mode: str = "broadcast") -> list[str]:
    return ["--mode", mode, "--broker", redis.url, *extra]


@pytest.mark.redis
def test_two_hosts_deliver_every_message_to_all_six_in_one_order(
    run_server: Any, redis_server: RedisServer
) -> None:
    hosts = [run_server(*redis_args(redis_server)) for _ in range(2)]
    each = 10

    async def scenario() -> list[list[str | bytes]]:
        clients = [await connect(host) for host in hosts for _ in range(3)]
        assert await eventually(lambda: equals(members(hosts[0]), 6), 15)

        async def send(index: int, client: WebSocketClientConnection) -> None:
            for n in range(each):
                await client.write_message(f"{index}:{n}")

        await asyncio.gather(*(send(i, c) for i, c in enumerate(clients)))
        seen = [[await read(c) for _ in range(len(clients) * each)] for c in clients]
        for client in clients:
            client.close()
        return seen

    seen = run(scenario(), timeout=60)
    assert all(s == seen[0] for s in seen), "receivers saw different orders"
    assert sorted(seen[0]) == sorted(f"{i}:{n}" for i in range(6) for n in range(each))
    for i in range(6):
        assert [m for m in seen[0] if str(m).startswith(f"{i}:")] == [
            f"{i}:{n}" for n in range(each)
        ]


@pytest.mark.redis
def test_listen_count_and_history_span_hosts(run_server: Any, redis_server: RedisServer) -> None:
    a, b = (run_server(*redis_args(redis_server, "--history", "3", mode="mixed")) for _ in "ab")

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        on_a = [await connect(a) for _ in range(2)]
        on_b = await connect(b)
        assert await eventually(lambda: equals(members(b), 3), 15)
        for n in range(5):
            await on_a[0].write_message(json.dumps({"type": "broadcast", "payload": n}))
        replies = [json.loads(await read(on_a[0])) for _ in range(10)]
        received_on_b = [json.loads(await read(on_b)) for _ in range(5)]
        joiner = await connect(b)  # a later joiner on the other host gets the last 3
        history = [json.loads(await read(joiner)) for _ in range(4)]
        for client in [*on_a, on_b, joiner]:
            client.close()
        return replies, received_on_b, history

    replies, received_on_b, history = run(scenario(), timeout=60)
    results = [r for r in replies if r["type"] == "broadcastResult"]
    assert [r["listenCount"] for r in results] == [3] * 5
    assert [r["payload"] for r in results] == list(range(5))
    assert [r["offset"] for r in results] == [1, 2, 3, 4, 5]
    epoch = results[0]["epoch"]
    sent = [
        {"type": "broadcast", "channel": "room", "payload": n, "offset": n + 1, "epoch": epoch}
        for n in range(5)
    ]
    assert received_on_b == sent
    assert history[0] == {"type": "history", "channel": "room", "count": 3}  # then the replay
    assert history[1:] == sent[2:]


def _workers(parent: int) -> list[int]:
    """The pids whose parent is `parent` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _connections_per_worker(workers: list[int], port: int) -> dict[int, int]:
    """Established TCP connections on `port` held by each worker (Linux /proc)."""
    inodes: dict[str, int] = {}
    for worker in workers:
        for fd in Path(f"/proc/{worker}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = worker
    counts = dict.fromkeys(workers, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            counts[inodes[fields[9]]] += 1
    return counts


@pytest.mark.redis
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_processes_on_one_port_reach_every_client(
    run_server: Any, redis_server: RedisServer
) -> None:
    server = run_server(*redis_args(redis_server, "--processes", "2"))
    assert wait_until(lambda: server.log().count(f"websocket {server.ws_url}") == 2, 15)
    workers = _workers(server.proc.pid)
    assert len(workers) == 2

    async def scenario() -> tuple[list[list[str | bytes]], dict[int, int], list[int | None]]:
        clients = [await connect(server) for _ in range(8)]
        # The kernel picks the worker for each connection; add clients until both have some.
        for _ in range(40):
            spread = _connections_per_worker(workers, server.port)
            if all(spread.values()):
                break
            clients.append(await connect(server))
        assert await eventually(lambda: equals(members(server), len(clients)), 15)
        for n in range(10):
            await clients[n % 2].write_message(f"m{n}")
        seen = [[await read(c) for _ in range(10)] for c in clients]
        code = await asyncio.to_thread(server.stop)
        assert code == 0, server.log()
        closes = []
        for client in clients:
            while await asyncio.wait_for(client.read_message(), 15) is not None:
                pass
            closes.append(client.close_code)
        return seen, spread, closes

    seen, spread, closes = run(scenario(), timeout=60)
    assert all(count > 0 for count in spread.values()), spread
    assert all(s == seen[0] for s in seen), "receivers saw different orders"
    assert sorted(seen[0]) == sorted(f"m{n}" for n in range(10))
    for sender in (0, 1):  # each sender's own messages in the order sent
        mine = [f"m{n}" for n in range(sender, 10, 2)]
        assert [m for m in seen[0] if m in mine] == mine
    assert closes == [1001] * len(closes)  # each worker drained its own clients
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
    assert "all workers stopped" in server.log()


@pytest.mark.redis
def test_redis_outage_keeps_servers_and_clients_alive(
    run_server: Any, redis_server: RedisServer
) -> None:
    # A message waits publish_timeout (1 s here) for Redis before its sender is told.
    a, b = (run_server(*redis_args(redis_server, "--publish-timeout", "1")) for _ in "ab")

    async def scenario() -> dict[str, Any]:
        clients = [await connect(a), await connect(a), await connect(b)]
        assert await eventually(lambda: equals(members(a), 3), 15)
        await clients[0].write_message("before")
        assert [await read(c) for c in clients] == ["before"] * 3

        await asyncio.to_thread(redis_server.stop)
        assert await eventually(lambda: _all(_status(a, 503), _status(b, 503)), 15)
        status, health = await asyncio.to_thread(fetch_json, a.url + "/healthz")
        await clients[2].write_message("while down")
        # A raw relay cannot carry a notice a peer could not forge: the sender whose
        # message was lost is closed with 1013 (try again later); the others stay.
        assert await asyncio.wait_for(clients[2].read_message(), 10) is None
        error = {"code": clients[2].close_code, "reason": clients[2].close_reason}
        clients[2] = await connect(b)  # reconnecting while Redis is down works
        late = await connect(b)  # and so does joining

        await asyncio.to_thread(redis_server.start)  # same port, empty
        assert await eventually(lambda: _all(_status(a, 200), _status(b, 200)), 20)
        assert await eventually(lambda: equals(members(a), 4), 15)
        await clients[2].write_message("after")
        after = [await read(c) for c in [*clients, late]]
        for client in [*clients, late]:
            client.close()
        return {"status": status, "health": health, "error": error, "after": after}

    result = run(scenario(), timeout=90)
    assert result["status"] == 503
    assert result["health"]["status"] == "degraded"
    assert "redis" in result["health"]["reason"] and "unreachable" in result["health"]["reason"]
    assert result["error"]["code"] == 1013
    assert result["error"]["reason"].startswith("not delivered: redis")
    assert result["after"] == ["after"] * 4
    assert a.proc.poll() is None and b.proc.poll() is None
    assert "connected again" in a.log() and "connected again" in b.log()


def test_memory_broker_refuses_more_than_one_process() -> None:
    result = run_once("--mode", "broadcast", "--processes", "2")
    assert result.returncode == 2
    assert "Redis broker" in result.stderr and "processes" in result.stderr


async def _status(server: ServerProcess, expected: int) -> bool:
    status, _ = await asyncio.to_thread(fetch_json, server.url + "/healthz")
    return status == expected


async def _all(*checks: Coroutine[Any, Any, bool]) -> bool:
    return all([await check for check in checks])

"""Lifecycle webhooks across processes: two real `python -m echoserver` processes sharing a
real redis-server (and a real Redis Cluster for the crash), one test receiver checking
every request with the stock Standard Webhooks library.

Every event comes from the lifecycle holds (fanout/lifecycle.py): each is sent once by
whichever process's write made the change, numbered per scope (a channel, a user). A SIGKILLed
worker's users and channels are swept by a survivor once its presence TTL (10 s) passed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from typing import Any

import jwt
import pytest
import redis
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import eventually, run
from tests.redis_cluster import clean_redis_cluster, redis_cluster
from tests.redis_server import redis_server
from tests.servers import ServerProcess
from tests.webhook_receiver import Receiver, new_secret

__all__ = ["clean_redis_cluster", "redis_cluster", "redis_server"]  # fixtures

SECRET = "a-connection-token-secret-of-40-bytes...."
ROOMS = [{"pattern": "room.*", "join_leave": True}]
ALL = "channel_occupied,channel_vacated,user_online,user_offline,user_joined,user_left"


def token(sub: str) -> str:
    claims = {"sub": sub, "info": {"name": sub.title()}, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def start(receiver: Receiver, broker: str, grace: float) -> ServerProcess:
    env = {"ECHOSERVER_NAMESPACES": json.dumps(ROOMS)}
    args = [
        "--mode", "mixed", "--broker", broker, "--auth-jwt-secret", SECRET,
        "--auth-anonymous", "--presence-grace", str(grace),
        "--webhooks-url", receiver.url, "--webhooks-secret", receiver.secret,
        "--webhooks-events", ALL, "--webhooks-timeout", "1",
        "--webhooks-retry-initial", "0.05", "--webhooks-retry-max", "0.2",
    ]  # fmt: skip
    return ServerProcess(args, env)


async def started(receiver: Receiver, broker: str, grace: float) -> list[ServerProcess]:
    servers = [start(receiver, broker, grace) for _ in range(2)]
    await asyncio.gather(*(asyncio.to_thread(s.wait_healthy) for s in servers))
    return servers


async def connect(
    server: ServerProcess, channel: str, sub: str | None
) -> WebSocketClientConnection:
    query = "" if sub is None else f"?token={token(sub)}"
    return await websocket_connect(f"{server.ws_url}/ws/{channel}{query}")


def scope(event: dict[str, Any]) -> str:
    if event["type"] in ("user_online", "user_offline"):
        return "u:" + event["user"]
    return "c:" + event["channel"]


def by_scope(receiver: Receiver) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in receiver.events:
        found[scope(event)].append(event)
    for events in found.values():
        events.sort(key=lambda e: e["seq"])
    return found


def kinds(receiver: Receiver, key: str) -> list[tuple[str, str | None]]:
    """(type, user) of a scope's events, in seq order; seqs checked to be 1, 2, 3..."""
    events = by_scope(receiver).get(key, [])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    return [(e["type"], e.get("user") if key.startswith("c:") else None) for e in events]


@pytest.mark.redis
def test_every_event_once_and_in_sequence_a_second_tab_and_a_reconnect_none(
    redis_server: Any,
) -> None:
    receiver = Receiver(new_secret(), plan=("500", "500", "500"))
    grace = 1.0

    async def scenario() -> None:
        receiver.start()
        a, b = await started(receiver, redis_server.url, grace)
        try:
            first = await connect(a, "room.x", "ann")
            want_up = {
                "u:ann": [("user_online", None)],
                "c:room.x": [("channel_occupied", None), ("user_joined", "ann")],
            }
            assert await eventually(lambda: len(receiver.events) == 3, timeout=10)
            tab = await connect(b, "room.x", "ann")  # a second tab, on the other process
            first.close()
            tab.close()
            await asyncio.sleep(0.2)
            again = await connect(b, "room.x", "ann")  # back within the grace, elsewhere
            await asyncio.sleep(grace * 2)
            assert {key: kinds(receiver, key) for key in want_up} == want_up
            again.close()
            assert await eventually(lambda: len(receiver.events) == 6, timeout=10)
            await asyncio.sleep(grace)  # nothing more comes
            assert kinds(receiver, "u:ann") == [("user_online", None), ("user_offline", None)]
            assert kinds(receiver, "c:room.x") == [
                ("channel_occupied", None),
                ("user_joined", "ann"),
                ("user_left", "ann"),
                ("channel_vacated", None),
            ]
            assert len(receiver.events) == 6
            assert receiver.duplicates == 0
            assert receiver.attempts[:3] == [receiver.attempts[0]] * 3  # retried, same id
            online = by_scope(receiver)["u:ann"][0]
            assert online["info"] == {"name": "Ann"}
        finally:
            a.stop()
            b.stop()
            receiver.stop()

    run(scenario(), timeout=40)


def hash_reader(request: pytest.FixtureRequest, where: str) -> tuple[str, Any]:
    """(broker URL, HGETALL of a key) on a real Redis or a real Redis Cluster."""
    if where == "cluster":
        cluster = request.getfixturevalue("clean_redis_cluster")

        def read_cluster(key: str) -> Any:
            with cluster.client(cluster.primary_of(key)) as client:
                return client.hgetall(key)

        return cluster.url, read_cluster
    server = request.getfixturevalue("redis_server")

    def read(key: str) -> Any:
        with redis.Redis.from_url(server.url) as client:
            return client.hgetall(key)

    return server.url, read


@pytest.mark.redis
@pytest.mark.parametrize(("where", "grace"), [("redis", 0.0), ("redis", 0.2), ("cluster", 0.0)])
def test_two_processes_racing_end_with_the_ledger_matching_reality(
    request: pytest.FixtureRequest, where: str, grace: float
) -> None:
    receiver = Receiver(new_secret())
    rounds, workers = 20, 6
    url, hgetall = hash_reader(request, where)

    async def scenario() -> None:
        receiver.start()
        servers = await started(receiver, url, grace)
        rng = random.Random(21)
        try:

            async def worker(n: int) -> None:
                for i in range(rounds):
                    server = servers[(n + i) % 2]
                    sub = None if n % 2 else "rita"
                    ws = await connect(server, "race", sub)
                    await asyncio.sleep(rng.random() * 0.03)
                    ws.close()
                    await asyncio.sleep(rng.random() * 0.03)

            await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(workers))), 30)

            def flags(key: str, *names: str) -> list[str]:
                """One flag's events of a scope in seq order (channel_* and user_joined/
                user_left share the channel's numbers)."""
                events = by_scope(receiver).get(key, [])
                return [e["type"] for e in events if e["type"] in names]

            pairs = [
                ("c:race", "channel_occupied", "channel_vacated"),
                ("c:race", "user_joined", "user_left"),
                ("u:rita", "user_online", "user_offline"),
            ]

            def settled() -> bool:
                return all(flags(key, on, off)[-1:] == [off] for key, on, off in pairs)

            assert await eventually(settled, timeout=10), by_scope(receiver)
            await asyncio.sleep(max(grace, 0.3) * 2)
            for key, on, off in pairs:
                kinds(receiver, key)  # seq 1, 2, 3... without gap nor repeat
                found = flags(key, on, off)
                assert len(found) >= 2 and found == [on, off] * (len(found) // 2), found
            assert receiver.duplicates == 0
            for key in ("c:race", "u:rita"):  # the ledger: nothing active, nothing held
                assert hgetall(f"echoserver:lifecycle:{{{key}}}:state") == {}
                assert hgetall(f"echoserver:lifecycle:{{{key}}}:live") == {}
            assert hgetall("echoserver:lifecycle:{c:race}:live:u:rita") == {}
        finally:
            for server in servers:
                server.stop()
            receiver.stop()

    run(scenario(), timeout=60)


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def broker_url(request: pytest.FixtureRequest) -> str:
    fixture = "clean_redis_cluster" if request.param == "cluster" else "redis_server"
    return str(request.getfixturevalue(fixture).url)


def test_a_killed_workers_users_and_channels_are_swept_once(broker_url: str) -> None:
    receiver = Receiver(new_secret())

    async def scenario() -> float:
        receiver.start()
        a, b = await started(receiver, broker_url, 0.3)
        try:
            dave = await connect(a, "room.k", "dave")
            ann = await connect(b, "room.k", "ann")
            solo = await connect(b, "room.solo", None)  # a guest: the channel's only member
            assert await eventually(lambda: len(receiver.events) == 6, timeout=10)
            b.kill()  # SIGKILL: no clean-up
            killed = time.monotonic()
            leaves = []
            while time.monotonic() < killed + 16:
                try:
                    message = await asyncio.wait_for(dave.read_message(), 0.5)
                except asyncio.TimeoutError:
                    message = None
                if message is not None and json.loads(message)["type"] == "leave":
                    leaves.append(json.loads(message))
                if leaves and len(receiver.events) >= 9:
                    break
            took = time.monotonic() - killed
            await asyncio.sleep(1.0)  # nothing more comes
            assert leaves == [
                {"type": "leave", "channel": "room.k", "user": "ann", "info": {"name": "Ann"}}
            ]
            assert kinds(receiver, "u:ann") == [("user_online", None), ("user_offline", None)]
            assert kinds(receiver, "c:room.k") == [
                ("channel_occupied", None),
                ("user_joined", "dave"),
                ("user_joined", "ann"),
                ("user_left", "ann"),
            ] or kinds(receiver, "c:room.k") == [
                ("channel_occupied", None),
                ("user_joined", "ann"),
                ("user_joined", "dave"),
                ("user_left", "ann"),
            ]
            assert kinds(receiver, "c:room.solo") == [
                ("channel_occupied", None),
                ("channel_vacated", None),
            ]
            assert kinds(receiver, "u:dave") == [("user_online", None)]
            assert len(receiver.events) == 9 and receiver.duplicates == 0
            dave.close()
            ann.close()
            solo.close()
            return took
        finally:
            a.stop()
            b.stop()
            receiver.stop()

    assert run(scenario(), timeout=40) < 16


def test_one_process_on_the_memory_broker_counts_websockets_and_event_streams() -> None:
    receiver = Receiver(new_secret())
    grace = 0.5

    async def scenario() -> None:
        receiver.start()
        server = start(receiver, "memory", grace)
        try:
            await asyncio.to_thread(server.wait_healthy)
            ws = await connect(server, "news", "ann")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                f"GET /sse/room.y?token={token('ann')} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert await eventually(lambda: len(receiver.events) == 5, timeout=10)
            ws.close()
            await asyncio.sleep(0.1)
            ws = await connect(server, "news", "ann")  # back within the grace
            await asyncio.sleep(grace * 2)
            assert kinds(receiver, "u:ann") == [("user_online", None)]
            ws.close()
            writer.close()
            assert await eventually(lambda: len(receiver.events) == 10, timeout=10)
            await asyncio.sleep(grace)
            assert kinds(receiver, "u:ann") == [("user_online", None), ("user_offline", None)]
            for channel in ("news", "room.y"):
                assert kinds(receiver, f"c:{channel}") == [
                    ("channel_occupied", None),
                    ("user_joined", "ann"),
                    ("user_left", "ann"),
                    ("channel_vacated", None),
                ]
            assert len(receiver.events) == 10 and receiver.duplicates == 0
        finally:
            server.stop()
            receiver.stop()

    run(scenario(), timeout=30)

"""The lifecycle ledger's contract, on the memory broker, a real Redis and a real Redis
Cluster: a transition is owned by exactly one caller however many report it, and numbered
per scope without gap."""

from __future__ import annotations

import asyncio

import pytest

from echoserver.brokers.base import Broker, BrokerUnavailable
from echoserver.brokers.lifecycle import Ledger, ledger_for
from echoserver.brokers.memory import MemoryBroker
from echoserver.brokers.redis import RedisBroker
from echoserver.brokers.redis_base import RedisOptions
from echoserver.brokers.redis_cluster import RedisClusterBroker
from tests.conftest import run
from tests.redis_cluster import LocalCluster, clean_redis_cluster, redis_cluster
from tests.redis_server import RedisServer, redis_server

__all__ = ["clean_redis_cluster", "redis_cluster", "redis_server"]


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_broker(kind: str, request: pytest.FixtureRequest) -> Broker:
    options = RedisOptions(backoff_cap=0.5, op_timeout=2.0)
    if kind == "memory":
        return MemoryBroker()
    if kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("clean_redis_cluster")
        return RedisClusterBroker(cluster.url, options)
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisBroker(server.url, options)


async def started(broker: Broker) -> Ledger:
    await broker.start(lambda envelope: None)
    return ledger_for(broker)


def test_a_transition_is_numbered_once_and_a_repeat_is_not(
    kind: str, request: pytest.FixtureRequest
) -> None:
    broker = new_broker(kind, request)

    async def scenario() -> None:
        ledger = await started(broker)
        try:
            assert await ledger.transition("c:room", "#occupied", True) == 1
            assert await ledger.transition("c:room", "#occupied", True) == 0
            assert await ledger.transition("c:room", "u:alice", True) == 2
            assert await ledger.transition("c:room", "u:alice", False) == 3
            assert await ledger.transition("c:room", "u:alice", False) == 0
            assert await ledger.transition("c:room", "#occupied", False) == 4
            # Another scope numbers on its own; a flag at rest was never set.
            assert await ledger.transition("u:alice", "#online", False) == 0
            assert await ledger.transition("u:alice", "#online", True) == 1
            assert await ledger.transition("c:other", "#occupied", True) == 1
        finally:
            await broker.close()

    run(scenario())


def test_concurrent_reports_of_one_transition_have_one_owner(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Several brokers stand for several processes (one on the memory broker, by design).
    brokers = [new_broker(kind, request) for _ in range(1 if kind == "memory" else 4)]

    async def scenario() -> None:
        ledgers = [await started(broker) for broker in brokers]
        try:
            for round_ in range(20):
                active = round_ % 2 == 0
                owners = await asyncio.gather(
                    *(
                        ledger.transition("c:room", "#occupied", active)
                        for ledger in ledgers
                        for _ in range(3)
                    )
                )
                assert sorted(owners)[:-1] == [0] * (len(owners) - 1), owners
                assert max(owners) == round_ + 1
        finally:
            for broker in brokers:
                await broker.close()

    run(scenario())


@pytest.mark.redis
def test_the_state_outlives_no_one_and_redis_down_is_said(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, RedisOptions(backoff_cap=0.5, op_timeout=1.0))

    async def scenario() -> None:
        ledger = await started(broker)
        try:
            from redis.asyncio import Redis

            admin = Redis.from_url(redis_server.url)
            await ledger.transition("c:room", "#occupied", True)
            await ledger.transition("c:room", "#occupied", False)
            # A flag at rest is no key at all; only the counter stays, with a TTL.
            keys = sorted(k.decode() for k in await admin.keys("*lifecycle*"))
            assert keys == ["echoserver:lifecycle:{c:room}:seq"]
            assert await admin.ttl(keys[0]) > 0
            await admin.aclose()
            redis_server.stop()
            with pytest.raises(BrokerUnavailable):
                for _ in range(100):  # until the broker has noticed
                    await ledger.transition("c:room", "#occupied", True)
                    await asyncio.sleep(0.05)
        finally:
            await broker.close()

    run(scenario())

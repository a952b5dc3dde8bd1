"""The lifecycle ledger's contract, through the lifecycle holds' hold() (the one writer of
the ledger), on the memory broker, a real Redis and a real Redis Cluster: a flag is moved
by exactly one write however many race, and each move is numbered per scope without gap."""

from __future__ import annotations

import asyncio

import pytest

from echoserver.brokers.base import Broker, BrokerUnavailable
from echoserver.brokers.lifecycle_holds import Holds, Moved, holds_for
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


async def started(broker: Broker) -> Holds:
    await broker.start(lambda envelope: None)
    return holds_for(broker, None)


def test_a_move_is_numbered_once_and_a_write_that_moves_nothing_is_not(
    kind: str, request: pytest.FixtureRequest
) -> None:
    broker = new_broker(kind, request)

    async def scenario() -> None:
        holds = await started(broker)
        try:
            # (scope, flag, count, present, owner) -> Moved(before, after, seq)
            steps = [
                (("c:room", "#occupied", 1, True, None), Moved(0, 1, 1)),
                (("c:room", "#occupied", 2, True, None), Moved(1, 1, 0)),  # a new count
                (("c:room", "#occupied", 1, True, "other"), Moved(1, 2, 0)),  # a 2nd process
                (("c:room", "u:alice", 1, True, None), Moved(0, 1, 2)),  # the scope's numbers
                (("c:room", "#occupied", 0, False, None), Moved(2, 1, 0)),  # "other" holds it
                (("c:room", "u:alice", 0, False, None), Moved(1, 0, 3)),
                (("c:room", "u:alice", 0, False, None), Moved(0, 0, 0)),  # nothing to remove
                (("c:room", "#occupied", 0, False, "other"), Moved(1, 0, 4)),
                # Another scope numbers on its own; a flag at rest was never set.
                (("u:alice", "#online", 0, False, None), Moved(0, 0, 0)),
                (("u:alice", "#online", 3, True, None), Moved(0, 1, 1)),
                (("c:other", "#occupied", 1, True, None), Moved(0, 1, 1)),
            ]
            for (scope, flag, count, present, owner), expected in steps:
                moved = await holds.hold(scope, flag, count, present, owner=owner)
                assert moved == expected, (scope, flag, count, present, owner)
        finally:
            await broker.close()

    run(scenario())


def test_concurrent_writers_of_one_flag_move_it_once_per_crossing(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Several brokers stand for several processes (one on the memory broker, by design),
    # each writing three entries at once.
    brokers = [new_broker(kind, request) for _ in range(1 if kind == "memory" else 4)]

    async def scenario() -> None:
        all_holds = [await started(broker) for broker in brokers]
        owners = [(holds, f"{holds.process_id}/{n}") for holds in all_holds for n in range(3)]
        try:
            for round_ in range(20):
                for present, seq in ((True, 2 * round_ + 1), (False, 2 * round_ + 2)):
                    moves = await asyncio.gather(
                        *(
                            holds.hold("c:room", "#occupied", 1, present, owner=owner)
                            for holds, owner in owners
                        )
                    )
                    seqs = sorted(moved.seq for moved in moves)
                    assert seqs == [0] * (len(moves) - 1) + [seq], (present, moves)
                    # The one write that moved it is the one that crossed 0.
                    (mover,) = (moved for moved in moves if moved.seq)
                    assert (mover.before == 0) if present else (mover.after == 0), moves
                    assert sorted(m.after if present else m.before for m in moves) == list(
                        range(1, len(moves) + 1)
                    ), moves
        finally:
            for broker in brokers:
                await broker.close()

    run(scenario())


@pytest.mark.redis
def test_the_state_outlives_no_one_and_redis_down_is_said(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, RedisOptions(backoff_cap=0.5, op_timeout=1.0))

    async def scenario() -> None:
        holds = await started(broker)
        try:
            from redis.asyncio import Redis

            admin = Redis.from_url(redis_server.url)
            await holds.hold("c:room", "#occupied", 1, True)
            await holds.hold("c:room", "#occupied", 0, False)
            # A flag at rest and an empty scope are no keys at all; only the counter
            # stays, with a TTL.
            keys = sorted(k.decode() for k in await admin.keys("*lifecycle*"))
            assert keys == ["echoserver:lifecycle:{c:room}:seq"]
            assert await admin.ttl(keys[0]) > 0
            await admin.aclose()
            redis_server.stop()
            with pytest.raises(BrokerUnavailable):
                for _ in range(100):  # until the broker has noticed
                    await holds.hold("c:room", "#occupied", 1, True)
                    await asyncio.sleep(0.05)
        finally:
            await broker.close()

    run(scenario())

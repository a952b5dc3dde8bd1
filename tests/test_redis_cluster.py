"""The Redis Cluster broker on a real six-node cluster: what the contract suite cannot show.

Channels spread over the primaries with each channel's keys and shard channel on one slot,
one seed node is enough, presence adds up across instances and shards, a primary killed
mid-run fails over to its replica while brokers and servers live through it, and two real
`python -m echoserver` processes deliver each other's broadcasts through the cluster.
The contract suite (test_broker_contract.py) runs against the cluster broker as well.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from echoserver.brokers.base import Envelope
from echoserver.brokers.redis_base import RedisOptions
from echoserver.brokers.redis_cluster import RedisClusterBroker
from echoserver.brokers.redis_wire import KeyNames
from tests.conftest import equals, eventually, fetch_json, kept, run
from tests.redis_cluster import (
    LocalCluster,
    clean_redis_cluster,
    own_redis_cluster,
    redis_cluster,
    tls_redis_cluster,
)
from tests.test_broker_contract import Recorder, offset, publish
from tests.test_cluster import _all, _status, connect, members, read

__all__ = ["clean_redis_cluster", "own_redis_cluster", "redis_cluster", "tls_redis_cluster"]

pytestmark = pytest.mark.redis

NAMES = KeyNames("echoserver", 0)


async def started(url: str, **options: Any) -> tuple[RedisClusterBroker, Recorder]:
    options.setdefault("backoff_cap", 0.5)
    options.setdefault("op_timeout", 2.0)
    broker = RedisClusterBroker(url, RedisOptions(**options))
    recorder = Recorder()
    await broker.start(recorder)
    assert broker.healthy, broker.health_reason
    return broker, recorder


def test_channels_spread_over_the_primaries_each_on_one_slot(
    clean_redis_cluster: LocalCluster,
) -> None:
    cluster = clean_redis_cluster
    spread = cluster.spread(NAMES.pubsub)
    channels = list(spread.values())
    replica = next(node for node in cluster.running() if node not in cluster.primaries())
    each = 20

    def subscribers(channel: str) -> Any:
        """The channel's subscriber count as its primary tells (another node says 0)."""
        port = next(port for port, mine in spread.items() if mine == channel)
        node = next(node for node in cluster.nodes if node.port == port)
        with cluster.client(node) as client:
            return client.execute_command("PUBSUB", "SHARDNUMSUB", NAMES.pubsub(channel))[1]

    async def scenario() -> tuple[list[list[Any]], dict[bytes, int], list[int]]:
        a, got_a = await started(cluster.url, history=5)
        # Any one node is enough to find the rest, a replica too.
        b, got_b = await started(f"redis-cluster://{replica.address}", history=5)
        for channel in channels:
            await a.subscribe(channel)
            await b.subscribe(channel)
        # Both publish to every channel, many in flight at once.
        in_flight = {
            (channel, n): (a if n % 2 else b).publish(Envelope(channel, b"%d" % n, False))
            for n in range(each)
            for channel in channels
        }
        offsets = {key: await offset(published) for key, published in in_flight.items()}
        seen = [
            [[(e.data, e.seq) for e in await got.wait(channel, each)] for channel in channels]
            for got in (got_a, got_b)
        ]
        numsub = [await asyncio.to_thread(subscribers, channel) for channel in channels]
        await a.close()
        await b.close()
        return seen, {b"%s:%d" % (c.encode(), n): o for (c, n), o in offsets.items()}, numsub

    seen, offsets, numsub = run(scenario())
    assert numsub == [2, 2, 2]  # both brokers, on each channel's own primary
    assert len(spread) == 3  # one channel on each primary
    assert seen[0] == seen[1]  # every subscriber, one order per channel
    for channel, per_channel in zip(channels, seen[0], strict=True):
        assert [seq for _, seq in per_channel] == list(range(1, each + 1))
        for parity in (0, 1):  # each publisher's messages in the order it sent them
            mine = [int(data) for data, _ in per_channel if int(data) % 2 == parity]
            assert mine == list(range(parity, each, 2))
        for data, seq in per_channel:  # and each publish was told its offset
            assert offsets[b"%s:%s" % (channel.encode(), data)] == seq
    for port, channel in spread.items():
        name, *keys = NAMES(channel)
        node = next(node for node in cluster.nodes if node.port == port)
        with cluster.client(node) as client:
            # Every key is on the channel's primary (another node would answer MOVED).
            assert client.exists(*keys) == len(keys)
            slots = {client.cluster("KEYSLOT", key) for key in (name, *keys)}
            assert len(slots) == 1


def test_rediss_cluster_speaks_tls_to_every_node(tls_redis_cluster: LocalCluster) -> None:
    cluster = tls_redis_cluster
    channels = list(cluster.spread(NAMES.pubsub).values())
    assert cluster.url.startswith("rediss-cluster://")

    async def scenario() -> tuple[list[list[bytes]], int]:
        (a, _), (b, got_b) = await started(cluster.url), await started(cluster.url)
        for channel in channels:
            await b.subscribe(channel)
            await publish(a, Envelope(channel, channel.encode(), False))
        await a.presence.set_local(channels[0], 2)
        seen = [[e.data for e in await got_b.wait(channel, 1)] for channel in channels]
        count = await b.presence.count(channels[0])
        await a.close()
        await b.close()
        return seen, count

    seen, count = run(scenario())
    assert seen == [[channel.encode()] for channel in channels]
    assert count == 2


def test_presence_adds_up_across_instances_and_shards(clean_redis_cluster: LocalCluster) -> None:
    cluster = clean_redis_cluster
    one, two, three = cluster.spread(NAMES.pubsub).values()

    async def scenario() -> list[tuple[int, ...]]:
        (a, _), (b, _) = await started(cluster.url), await started(cluster.url)
        await a.presence.set_local(one, 2)
        await a.presence.set_local(two, 1)
        await b.presence.set_local(one, 3)
        await b.presence.set_local(three, 4)
        counts = []
        for broker in (a, b):
            counts.append(tuple([await broker.presence.count(c) for c in (one, two, three)]))
        await b.close()  # a clean exit takes its members with it at once
        counts.append(tuple([await a.presence.count(c) for c in (one, two, three)]))
        await a.close()
        return counts

    assert run(scenario()) == [(5, 1, 4), (5, 1, 4), (2, 1, 0)]


def test_a_killed_primary_fails_over_and_delivery_resumes(
    own_redis_cluster: LocalCluster,
) -> None:
    """SIGKILL a primary mid-run: the brokers report the outage, hold publishes until the
    replica is promoted, then deliver again by themselves, with offsets, history and
    presence carried on."""
    cluster = own_redis_cluster
    spread = cluster.spread(NAMES.pubsub)
    victim_port, doomed = next(iter(spread.items()))
    victim = next(node for node in cluster.nodes if node.port == victim_port)
    survivor = next(channel for channel in spread.values() if channel != doomed)

    async def scenario() -> dict[str, Any]:
        a, got_a = await started(cluster.url, history=10)
        b, got_b = await started(cluster.url, history=10)
        a.publish_timeout = 30  # whatever the failover takes on a busy machine
        for channel in spread.values():
            await a.subscribe(channel)
            await b.subscribe(channel)
        await a.presence.set_local(doomed, 2)
        for n in range(3):
            for channel in spread.values():
                await publish(a, Envelope(channel, b"before%d" % n, False))
        for channel in spread.values():
            await got_b.wait(channel, 3)
        with cluster.client(victim) as client:  # the replica has all of it
            assert client.execute_command("WAIT", 1, 5000) == 1

        # Publishes in flight on a surviving shard when the primary dies.
        in_flight = [a.publish(Envelope(survivor, b"%d" % n, False)) for n in range(100)]
        await asyncio.to_thread(cluster.kill, victim)
        assert await eventually(lambda: not a.healthy and not b.healthy, 10)
        reason = a.health_reason
        waited = a.publish(Envelope(doomed, b"waited", False))  # waits for the failover
        own_count = await a.presence.count(doomed)  # its own members, while it cannot ask

        assert await eventually(lambda: a.healthy and b.healthy, 30)
        outcomes = await asyncio.gather(*(offset(p) for p in in_flight), return_exceptions=True)
        waited_offset = await offset(waited)
        after = await publish(b, Envelope(doomed, b"after", False))
        await publish(a, Envelope(survivor, b"after", False))
        await got_a.wait(doomed, 5)
        await got_b.wait(doomed, 4)
        await got_a.wait(survivor, 4)
        received = {
            name: [e.data for e in got.on(doomed)] for name, got in (("a", got_a), ("b", got_b))
        }
        result = {
            "outcomes": outcomes,
            "waited": waited_offset,
            "reason": reason,
            "own_count": own_count,
            "after": after,
            "received": received,
            "survivor_last": [e.data for e in got_a.on(survivor)][-1],
            "history": [e.seq for e in await kept(b, doomed, 10)],
            "count": await b.presence.count(doomed),
            "new_primary": cluster.primary_of(NAMES.pubsub(doomed)).port,
        }
        await a.close()
        await b.close()
        return result

    result = run(scenario(), timeout=90)
    assert "unreachable" in result["reason"] and cluster.address in result["reason"]
    # Every publish in flight landed (none failed), in order, none reported twice.
    assert result["outcomes"] == list(range(4, 104))
    assert result["own_count"] == 2
    assert result["new_primary"] != victim_port  # the replica took over
    assert (result["waited"], result["after"]) == (4, 5)  # the counter went on: no reset
    before = [b"before0", b"before1", b"before2"]
    assert result["received"]["a"] == [*before, b"waited", b"after"]
    # b gets what waited only if it re-subscribed before a came back (pub/sub delivers
    # at most once); a client there recovers it from history.
    assert result["received"]["b"] in ([*before, b"waited", b"after"], [*before, b"after"])
    assert result["survivor_last"] == b"after"
    assert result["history"] == [1, 2, 3, 4, 5]
    assert result["count"] == 2  # a re-wrote its members on the new primary


def test_two_servers_share_broadcasts_through_the_cluster_and_outlive_a_failover(
    run_server: Any, own_redis_cluster: LocalCluster
) -> None:
    cluster = own_redis_cluster
    args = ["--mode", "mixed", "--broker", cluster.url, "--history", "5"]
    a, b = run_server(*args), run_server(*args)
    victim = cluster.primary_of(NAMES.pubsub("room"))

    async def broadcast(client: Any, payload: str) -> None:
        await client.write_message(json.dumps({"type": "broadcast", "payload": payload}))

    async def scenario() -> dict[str, Any]:
        on_a, on_b = await connect(a), await connect(b)
        assert await eventually(lambda: equals(members(a), 2), 15)
        await broadcast(on_a, "from a")
        await broadcast(on_b, "from b")
        # Each sees both (its own message, then its broadcastResult, and the other's).
        got_a = [json.loads(await read(on_a)) for _ in range(3)]
        got_b = [json.loads(await read(on_b)) for _ in range(3)]

        await asyncio.to_thread(cluster.kill, victim)
        assert await eventually(lambda: _all(_status(a, 503), _status(b, 503)), 15)
        status, health = await asyncio.to_thread(fetch_json, a.url + "/healthz")
        assert await eventually(lambda: _all(_status(a, 200), _status(b, 200)), 30)
        # The clients stayed connected through it; delivery resumed by itself.
        await broadcast(on_b, "after")
        after_a = json.loads(await read(on_a))
        after_b = [json.loads(await read(on_b)) for _ in range(2)]
        on_a.close()
        on_b.close()
        return {
            "a": got_a,
            "b": got_b,
            "status": status,
            "health": health,
            "after_a": after_a,
            "after_b": after_b,
        }

    result = run(scenario(), timeout=120)
    for seen in (result["a"], result["b"]):
        broadcasts = [m["payload"] for m in seen if m["type"] == "broadcast"]
        assert sorted(broadcasts) == ["from a", "from b"]
    assert result["status"] == 503 and result["health"]["status"] == "degraded"
    assert "unreachable" in result["health"]["reason"]
    assert result["after_a"]["payload"] == "after" and result["after_a"]["offset"] == 3
    assert {m["type"] for m in result["after_b"]} == {"broadcast", "broadcastResult"}
    assert a.proc.poll() is None and b.proc.poll() is None
    assert "connected again" in a.log() and "connected again" in b.log()

"""The broker contract: one suite, run against the memory, Redis and Redis Cluster brokers.

Each test gets a `kit` that builds brokers of one kind. Tests about several processes
sharing a broker (two instances, crash expiry, Redis outages) need a shared broker and
skip for the memory broker, which serves one process by design. The Redis runs use a
real redis-server of their own (tests/redis_server.py); the cluster runs share one real
six-node Redis Cluster, emptied before each test (tests/redis_cluster.py). Stopping
"Redis" there stops every node of the cluster.

Publishing goes the way the hub does it: publish() starts at once and gives the offset, or
a future of it; several may be in flight. The hub tests at the end drive Hub.publish, the
entry point the handlers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import pytest

from echoserver.brokers import create_broker
from echoserver.brokers.base import Backlog, Broker, BrokerUnavailable, Envelope, Published
from echoserver.brokers.memory import MemoryBroker
from echoserver.brokers.redis import RedisBroker
from echoserver.brokers.redis_base import RedisOptions
from echoserver.brokers.redis_cluster import RedisClusterBroker
from echoserver.brokers.redis_wire import decode, encode
from echoserver.fanout.delivery import Delivery
from echoserver.fanout.hub import Hub
from echoserver.wire.positions import valid_epoch
from tests.conftest import equals, eventually, kept, run
from tests.redis_cluster import LocalCluster, clean_redis_cluster, redis_cluster
from tests.redis_server import RedisServer, free_port, redis_server, require_redis_server
from tests.servers import ROOT

__all__ = ["clean_redis_cluster", "redis_cluster", "redis_server"]  # fixtures, used by `kit`


async def offset(published: Published) -> int:
    """The offset publish() gave: at once (memory) or once the broker answered (Redis)."""
    return published if isinstance(published, int) else await published


async def publish(broker: Broker, envelope: Envelope) -> int:
    """Publish one message and wait for its offset."""
    return await offset(broker.publish(envelope))


@dataclass
class Kit:
    """Builds brokers of one kind; `shared` ones see each other across instances."""

    kind: str
    shared: bool
    redis: RedisServer | LocalCluster | None = None

    def new(self, **options: Any) -> Broker:
        if self.redis is None:
            return MemoryBroker(
                history=options.get("history", 0),
                history_ttl=options.get("history_ttl", 0.0),
                history_bytes=options.get("history_bytes", 1 << 20),
            )
        options.setdefault("backoff_cap", 0.5)
        options.setdefault("op_timeout", 2.0)
        if isinstance(self.redis, LocalCluster):
            return RedisClusterBroker(self.redis.url, RedisOptions(**options))
        return RedisBroker(self.redis.url, RedisOptions(**options))

    def admin(self) -> list[Any]:
        """An asyncio client per running Redis node, for tests that configure Redis."""
        from redis.asyncio import Redis

        if isinstance(self.redis, LocalCluster):
            return [Redis(host="127.0.0.1", port=node.port) for node in self.redis.running()]
        assert self.redis is not None
        return [Redis.from_url(self.redis.url)]

    def need_shared(self) -> None:
        if not self.shared:
            pytest.skip(f"the {self.kind} broker serves one process by design")


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def kit(request: pytest.FixtureRequest) -> Kit:
    if request.param == "memory":
        return Kit("memory", shared=False)
    if request.param == "cluster":
        return Kit("cluster", shared=True, redis=request.getfixturevalue("clean_redis_cluster"))
    return Kit("redis", shared=True, redis=request.getfixturevalue("redis_server"))


class Recorder:
    """An on_envelope callback that keeps what it got."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def __call__(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def on(self, channel: str) -> list[Envelope]:
        return [e for e in self.envelopes if e.channel == channel]

    async def wait(self, channel: str, count: int, timeout: float = 10.0) -> list[Envelope]:
        deadline = time.monotonic() + timeout
        while len(self.on(channel)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        got = self.on(channel)
        assert len(got) >= count, f"{len(got)} of {count} messages arrived on {channel}"
        return got


async def started(kit: Kit, **options: Any) -> tuple[Broker, Recorder]:
    broker = kit.new(**options)
    recorder = Recorder()
    await broker.start(recorder)
    assert broker.healthy, broker.health_reason
    return broker, recorder


async def settle(broker: Broker, recorder: Recorder) -> None:
    """Wait until everything published so far through `broker` has been delivered.

    A marker published after the rest arrives after them (one order per publisher), so
    once it is here, anything else that was going to arrive has arrived.
    """
    await broker.subscribe("_settle")
    before = len(recorder.on("_settle"))
    await publish(broker, Envelope("_settle", b"", False))
    await recorder.wait("_settle", before + 1)


def test_create_broker_by_url() -> None:
    assert isinstance(create_broker("memory"), MemoryBroker)
    broker = create_broker("redis://:secret@127.0.0.1:1/3")
    assert isinstance(broker, RedisBroker)
    assert "secret" not in broker.where and broker.where == "127.0.0.1:1/3"
    cluster = create_broker("rediss-cluster://u:secret@10.0.0.1:7000,[::1]:7001?ssl_cert_reqs=none")
    assert isinstance(cluster, RedisClusterBroker)
    assert "secret" not in cluster.where and cluster.where == "cluster 10.0.0.1:7000,::1:7001"


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope("c", b"hello", False, "a1b2:7"),
        Envelope("c", bytes(range(256)), True, None),
        Envelope("c", b"", False, "\u00fc:\u00e9"),
        Envelope("c", b"12:t3:abc", True, "x"),
    ],
)
def test_redis_wire_format_round_trips(envelope: Envelope) -> None:
    header, data = encode(envelope)
    decoded = decode("c", b"42:" + header + data)
    assert decoded == Envelope("c", envelope.data, envelope.binary, envelope.sender, 42)


def test_delivers_every_field_to_subscribers(kit: Kit) -> None:
    sent = [
        Envelope("a", b"text", False, "n1:1"),
        Envelope("a", bytes(range(256)), True, None),
        Envelope("a", b"", False, "\u00fc:2"),
        Envelope("a", "\u00e9t\u00e9".encode(), False, "n1:1"),
    ]

    async def scenario() -> list[Envelope]:
        broker, recorder = await started(kit)
        await broker.subscribe("a")
        for envelope in sent:
            await publish(
                broker, Envelope(envelope.channel, envelope.data, envelope.binary, envelope.sender)
            )
        got = await recorder.wait("a", len(sent))
        await broker.close()
        return got

    got = run(scenario())
    assert [(e.channel, e.data, e.binary, e.sender) for e in got] == [
        (e.channel, e.data, e.binary, e.sender) for e in sent
    ]
    assert all(e.seq > 0 for e in got)


def test_only_subscribed_channels_are_delivered(kit: Kit) -> None:
    async def scenario() -> list[str]:
        broker, recorder = await started(kit)
        await broker.subscribe("mine")
        await publish(broker, Envelope("other", b"not for me", False))
        await publish(broker, Envelope("mine", b"for me", False))
        await settle(broker, recorder)
        await broker.close()
        return [e.channel for e in recorder.envelopes if e.channel != "_settle"]

    assert run(scenario()) == ["mine"]


def test_unsubscribe_stops_delivery(kit: Kit) -> None:
    async def scenario() -> list[bytes]:
        broker, recorder = await started(kit)
        await broker.subscribe("a")
        await publish(broker, Envelope("a", b"before", False))
        await recorder.wait("a", 1)
        await broker.unsubscribe("a")
        await publish(broker, Envelope("a", b"after", False))
        await settle(broker, recorder)
        await broker.subscribe("a")  # subscribing again delivers again
        await publish(broker, Envelope("a", b"again", False))
        await recorder.wait("a", 2)
        await broker.close()
        return [e.data for e in recorder.on("a")]

    assert run(scenario()) == [b"before", b"again"]


def test_seq_counts_up_per_channel_and_publish_returns_it(kit: Kit) -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        broker, recorder = await started(kit)
        await broker.subscribe("a")
        await broker.subscribe("b")
        offsets = []
        for n in range(30):
            offsets.append(await publish(broker, Envelope("a" if n % 3 else "b", b"%d" % n, False)))
        a = await recorder.wait("a", 20)
        b = await recorder.wait("b", 10)
        await broker.close()
        return [e.seq for e in a], [e.seq for e in b], offsets

    seq_a, seq_b, offsets = run(scenario())
    assert seq_a == list(range(1, 21))
    assert seq_b == list(range(1, 11))
    assert [o for n, o in enumerate(offsets) if n % 3] == seq_a
    assert [o for n, o in enumerate(offsets) if not n % 3] == seq_b


def test_publish_is_done_at_once_or_answers_later(kit: Kit) -> None:
    """The memory broker delivers inside publish() and returns the offset; a remote one
    returns a future at once and delivers once Redis has it."""

    async def scenario() -> tuple[Published, int, list[Envelope]]:
        broker, recorder = await started(kit)
        await broker.subscribe("now")
        published = broker.publish(Envelope("now", b"x", False))
        delivered_at_once = list(recorder.on("now"))
        got = await offset(published)
        await recorder.wait("now", 1)
        await broker.close()
        return published, got, delivered_at_once

    published, got, delivered_at_once = run(scenario())
    assert got == 1
    if kit.shared:
        assert isinstance(published, asyncio.Future) and delivered_at_once == []
    else:
        assert published == 1 and [e.data for e in delivered_at_once] == [b"x"]


def test_concurrent_publishers_give_every_subscriber_one_order(kit: Kit) -> None:
    publishers, each = 8, 25
    total = publishers * each

    async def scenario() -> tuple[list[list[Envelope]], list[list[int]]]:
        brokers = [await started(kit) for _ in range(2 if kit.shared else 1)]
        for broker, _ in brokers:
            await broker.subscribe("room")

        async def publisher(p: int) -> list[int]:
            """Like a sender's handler: several publishes in flight, none awaited at once."""
            broker = brokers[p % len(brokers)][0]
            in_flight = []
            for n in range(each):
                in_flight.append(
                    broker.publish(Envelope("room", f"{p}:{n}".encode(), False, f"p{p}"))
                )
                if n % 5 == 0:
                    await asyncio.sleep(0)
            return [await offset(published) for published in in_flight]

        offsets = await asyncio.gather(*(publisher(p) for p in range(publishers)))
        seen = [await recorder.wait("room", total) for _, recorder in brokers]
        for broker, _ in brokers:
            await broker.close()
        return seen, offsets

    seen, offsets = run(scenario())
    first = seen[0]
    assert len(first) == total
    for other in seen[1:]:
        assert [e.data for e in other] == [e.data for e in first]
    assert [e.seq for e in first] == list(range(1, total + 1))
    for p in range(publishers):
        mine = [e for e in first if e.sender == f"p{p}"]
        assert [e.data for e in mine] == [f"{p}:{n}".encode() for n in range(each)]
        assert [e.seq for e in mine] == offsets[p]  # each publish told its own offset


def test_history_is_capped_and_oldest_first(kit: Kit) -> None:
    async def scenario() -> dict[str, Any]:
        broker, recorder = await started(kit, history=4)
        await broker.subscribe("h")
        for n in range(10):
            await publish(broker, Envelope("h", b"m%d" % n, bool(n % 2), "s"))
        unkept, _ = await started(kit)
        await publish(unkept, Envelope("none", b"not kept", False))
        await unkept.close()
        live = await recorder.wait("h", 10)
        result = {
            "last4": await kept(broker, "h", 4),
            "last2": await kept(broker, "h", 2),
            "more": await kept(broker, "h", 100),
            "zero": await kept(broker, "h", 0),
            "unknown": await kept(broker, "never-used", 5),
            "none": await kept(broker, "none", 5),
            "live": live,
        }
        await broker.close()
        return result

    result = run(scenario())
    assert [e.data for e in result["last4"]] == [b"m6", b"m7", b"m8", b"m9"]
    assert [e.seq for e in result["last4"]] == [e.seq for e in result["live"][-4:]]
    assert [(e.binary, e.sender) for e in result["last4"]] == [
        (False, "s"),
        (True, "s"),
        (False, "s"),
        (True, "s"),
    ]
    assert [e.data for e in result["last2"]] == [b"m8", b"m9"]
    assert [e.data for e in result["more"]] == [b"m6", b"m7", b"m8", b"m9"]
    assert result["zero"] == result["unknown"] == result["none"] == []


def test_backlog_is_what_is_kept_after_an_offset_and_the_last_offset(kit: Kit) -> None:
    async def scenario() -> dict[str, Backlog]:
        broker, _ = await started(kit, history=5)
        for n in range(8):
            await publish(broker, Envelope("b", b"m%d" % n, False))
        unkept, _ = await started(kit)
        for _ in range(3):
            await publish(unkept, Envelope("u", b"not kept", False))
        result = {
            "all": await broker.backlog("b", 0, 5),
            "after6": await broker.backlog("b", 6, 5),
            "after8": await broker.backlog("b", 8, 5),
            "limit": await broker.backlog("b", 1, 2),
            "none": await broker.backlog("b", 2, 0),
            "unknown": await broker.backlog("never-used", 0, 5),
            "unkept": await unkept.backlog("u", 0, 5),
        }
        await broker.close()
        await unkept.close()
        return result

    got = run(scenario())
    offsets = {name: [e.seq for e in backlog.envelopes] for name, backlog in got.items()}
    assert offsets == {
        "all": [4, 5, 6, 7, 8],
        "after6": [7, 8],
        "after8": [],
        "limit": [7, 8],
        "none": [],
        "unknown": [],
        "unkept": [],
    }
    assert [e.data for e in got["after6"].envelopes] == [b"m6", b"m7"]
    assert {name: backlog.last for name, backlog in got.items()} == {
        "all": 8,
        "after6": 8,
        "after8": 8,
        "limit": 8,
        "none": 8,
        "unknown": 0,
        "unkept": 3,
    }


def test_history_ttl_forgets_old_messages_but_not_the_offset(kit: Kit) -> None:
    async def scenario() -> tuple[Backlog, Backlog, Backlog]:
        broker, _ = await started(kit, history=10, history_ttl=0.4)
        for n in range(3):
            await publish(broker, Envelope("t", b"old%d" % n, False))
        await asyncio.sleep(0.6)
        for n in range(2):
            await publish(broker, Envelope("t", b"new%d" % n, False))
        newer = await broker.backlog("t", 0, 10)
        since_old = await broker.backlog("t", 1, 10)
        await asyncio.sleep(0.6)
        expired = await broker.backlog("t", 0, 10)
        await broker.close()
        return newer, since_old, expired

    newer, since_old, expired = run(scenario())
    assert [e.data for e in newer.envelopes] == [b"new0", b"new1"]
    assert [e.seq for e in since_old.envelopes] == [4, 5]  # 2 and 3 are gone: a gap
    assert (expired.envelopes, expired.last) == ([], 5)


def test_retention_sets_each_channels_own_history(kit: Kit) -> None:
    """A namespace's history: `retention` decides per channel (messages, seconds), over
    history_size and history_ttl."""

    async def scenario() -> tuple[Backlog, Backlog, Backlog, Backlog]:
        broker, _ = await started(kit, history=10)
        rules = {"room": (3, 0.0), "quiet": (0, 0.0), "brief": (10, 0.3)}
        broker.retention = lambda channel: rules.get(channel, (10, 0.0))
        for channel in ("room", "quiet", "brief", "other"):
            for n in range(5):
                await publish(broker, Envelope(channel, b"m%d" % n, False))
        await asyncio.sleep(0.5)  # past brief's 0.3 s
        backlogs = [await broker.backlog(c, 0, 100) for c in ("room", "quiet", "brief", "other")]
        await broker.close()
        return backlogs[0], backlogs[1], backlogs[2], backlogs[3]

    room, quiet, brief, other = run(scenario())
    assert [e.data for e in room.envelopes] == [b"m2", b"m3", b"m4"]
    assert (quiet.envelopes, quiet.last) == ([], 5)
    assert (brief.envelopes, brief.last) == ([], 5)
    assert len(other.envelopes) == 5


def test_history_is_bounded_in_bytes_oldest_first(kit: Kit) -> None:
    """history_bytes caps a channel's kept payload bytes whatever `history` allows; a
    message over it is not kept and ends what was; a `since` past what the bytes kept is
    not recovered."""

    async def scenario() -> dict[str, Any]:
        hub = Hub(kit.new(history=100, history_bytes=1024))
        await hub.start()
        for n in range(10):
            await offset(hub.publish("hb", b"%d" % n * 300, bool(n % 2), "s" if n % 3 else None))
        result: dict[str, Any] = {"bounded": await hub.broker.backlog("hb", 0, 100)}
        for since in (6, 7, 10):
            member = Member(f"m{since}")
            result[f"since{since}"] = await hub.join("hb", member, since=since)
            await hub.leave("hb", member)
        await offset(hub.publish("hb", b"x" * 1025, False, None))  # over the bound alone
        result["big"] = await hub.broker.backlog("hb", 0, 100)
        await offset(hub.publish("hb", b"tiny", False, None))
        result["after"] = await hub.broker.backlog("hb", 0, 100)
        await hub.close()
        return result

    got = run(scenario())
    bounded = got["bounded"]
    assert ([e.seq for e in bounded.envelopes], bounded.last) == ([8, 9, 10], 10)
    assert [e.data for e in bounded.envelopes] == [b"7" * 300, b"8" * 300, b"9" * 300]
    assert [(e.binary, e.sender) for e in bounded.envelopes] == [
        (True, "s"),
        (False, "s"),
        (True, None),
    ]
    assert (got["since6"].recovered, got["since6"].first) == (False, 8)  # 7 went for bytes
    assert (got["since7"].recovered, got["since7"].count) == (True, 3)
    assert (got["since10"].recovered, got["since10"].count) == (True, 0)
    assert (got["big"].envelopes, got["big"].last) == ([], 11)
    assert [(e.seq, e.data) for e in got["after"].envelopes] == [(12, b"tiny")]


def test_a_channels_keys_share_one_cluster_slot(kit: Kit) -> None:
    """Counter, epoch, history and pub/sub name carry {channel} as a hash tag (Redis
    Cluster)."""
    kit.need_shared()
    if not isinstance(kit.redis, RedisServer):
        pytest.skip("on a cluster: tests/test_redis_cluster.py checks the slots themselves")

    async def scenario() -> tuple[list[bytes], int]:
        import redis.asyncio

        broker, _ = await started(kit, history=3, history_ttl=0.5)
        await broker.subscribe("news")
        await publish(broker, Envelope("news", b"x", False))
        client = redis.asyncio.from_url(kit.redis.url)
        keys = sorted(await client.keys("echoserver:*news*"))
        channels = await client.pubsub_channels("*news*")
        await asyncio.sleep(0.8)
        after_ttl = await client.exists(
            "echoserver:{news}:history", "echoserver:{news}:history:bytes"
        )
        await client.aclose()
        await broker.close()
        return [*keys, *channels], after_ttl

    names, after_ttl = run(scenario())
    assert names == [
        b"echoserver:{news}:epoch",
        b"echoserver:{news}:history",
        b"echoserver:{news}:history:bytes",
        b"echoserver:{news}:seq",
        b"echoserver:0:ch:{news}",
    ]
    assert after_ttl == 0  # the history list expires with its newest message


def test_history_is_the_same_from_every_process(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> tuple[list[Envelope], list[Envelope]]:
        (a, _), (b, _) = await started(kit, history=5), await started(kit, history=5)
        for n in range(6):
            await publish(a if n % 2 else b, Envelope("h", b"%d" % n, False))
        seen = await kept(a, "h", 5), await kept(b, "h", 5)
        await a.close()
        await b.close()
        return seen

    from_a, from_b = run(scenario())
    assert from_a == from_b
    assert [e.data for e in from_a] == [b"1", b"2", b"3", b"4", b"5"]


# -- epochs: an offset means something only with its channel's epoch --------------------


def test_an_epoch_comes_with_every_offset(kit: Kit) -> None:
    async def scenario() -> dict[str, Any]:
        broker, recorder = await started(kit, history=10)
        await broker.subscribe("e")
        before = await broker.backlog("e", 0, 10)
        sent = [Envelope("e", b"%d" % n, False) for n in range(3)]
        offsets = [await publish(broker, envelope) for envelope in sent]
        other = Envelope("f", b"x", False)
        await publish(broker, other)
        delivered = await recorder.wait("e", 3)
        after = await broker.backlog("e", 0, 10)
        await broker.close()
        return locals()

    got = run(scenario())
    epoch = got["sent"][0].epoch
    assert valid_epoch(epoch)
    assert (got["before"].envelopes, got["before"].last, got["before"].epoch) == ([], 0, "")
    assert got["offsets"] == [1, 2, 3]
    assert [e.epoch for e in got["sent"]] == [epoch] * 3  # set by publish
    assert [e.epoch for e in got["delivered"]] == [epoch] * 3
    assert (got["after"].last, got["after"].epoch) == (3, epoch)
    assert [(e.seq, e.epoch) for e in got["after"].envelopes] == [(n, epoch) for n in (1, 2, 3)]
    assert valid_epoch(got["other"].epoch)  # each channel has its own


def test_the_epoch_is_the_same_from_every_process(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> tuple[str, list[str], str]:
        (a, _), (b, recorder) = await started(kit, history=5), await started(kit, history=5)
        await b.subscribe("e")
        envelope = Envelope("e", b"x", False)
        await publish(a, envelope)
        delivered = await recorder.wait("e", 1)
        backlog = await b.backlog("e", 0, 5)
        await a.close()
        await b.close()
        return envelope.epoch, [e.epoch for e in delivered], backlog.epoch

    epoch, delivered, kept_epoch = run(scenario())
    assert delivered == [epoch] and kept_epoch == epoch


async def lose_everything(kit: Kit, broker: Broker) -> Broker:
    """What a broker that lost its state looks like: a new memory broker (a restarted
    process), or the same Redis broker after FLUSHALL on every primary."""
    if kit.redis is None:
        await broker.close()
        fresh, _ = await started(kit, history=10)
        return fresh
    from redis.exceptions import ResponseError

    for client in kit.admin():
        # A cluster's replica refuses: its primary's flush reaches it.
        with contextlib.suppress(ResponseError):
            await client.flushall()
        await client.aclose()
    return broker


def test_a_broker_that_lost_a_channel_numbers_it_under_a_new_epoch(kit: Kit) -> None:
    async def scenario() -> tuple[list[Envelope], list[Envelope], Backlog]:
        broker, _ = await started(kit, history=10)
        old = [Envelope("e", b"old%d" % n, False) for n in range(5)]
        for envelope in old:
            await publish(broker, envelope)
        broker = await lose_everything(kit, broker)
        new = [Envelope("e", b"new%d" % n, False) for n in range(7)]
        for envelope in new:
            await publish(broker, envelope)
        backlog = await broker.backlog("e", 0, 20)
        await broker.close()
        return old, new, backlog

    old, new, backlog = run(scenario(), timeout=30)
    assert [e.seq for e in new] == list(range(1, 8))  # numbered again, past the old 5
    assert old[0].epoch != new[0].epoch and valid_epoch(new[0].epoch)
    assert backlog.epoch == new[0].epoch
    assert [e.data for e in backlog.envelopes] == [b"new%d" % n for n in range(7)]


def test_renew_epoch_replaces_only_the_epoch_it_is_given(kit: Kit) -> None:
    """What a hub asks for when it sees offsets reissued under one epoch (fanout/hub.py)."""

    async def scenario() -> dict[str, Any]:
        broker, _ = await started(kit, history=10)
        first = Envelope("e", b"1", False)
        await publish(broker, first)
        await publish(broker, Envelope("e", b"2", False))
        renewed = await broker.renew_epoch("e", first.epoch)
        stale = await broker.renew_epoch("e", first.epoch)  # another process, too late
        kept_after = await broker.backlog("e", 0, 10)
        third = Envelope("e", b"3", False)
        await publish(broker, third)
        unknown = await broker.renew_epoch("never", "abc")
        await broker.close()
        return locals()

    got = run(scenario())
    renewed = got["renewed"]
    assert valid_epoch(renewed) and renewed != got["first"].epoch
    assert got["stale"] == renewed
    assert (got["kept_after"].envelopes, got["kept_after"].last) == ([], 2)
    assert (got["third"].seq, got["third"].epoch) == (3, renewed)  # offsets go on
    assert got["unknown"] == ""


def test_a_forgotten_memory_channel_comes_back_under_a_new_epoch(monkeypatch: Any) -> None:
    import echoserver.brokers.memory as memory

    monkeypatch.setattr(memory, "MAX_CHANNELS", 2)
    broker = MemoryBroker(history=5)
    first = Envelope("a", b"1", False)
    broker.publish(first)
    broker.publish(Envelope("b", b"1", False))
    broker.publish(Envelope("c", b"1", False))  # "a", least recently used, is forgotten
    again = Envelope("a", b"2", False)
    assert broker.publish(again) == 1
    assert again.epoch != first.epoch


def test_a_counter_from_before_epochs_keeps_its_numbering_and_history(kit: Kit) -> None:
    """A Redis written by a version without epochs: the counter goes on under a new epoch,
    and the history kept in the old format is part of it."""
    if not isinstance(kit.redis, RedisServer):
        pytest.skip("a Redis from before epochs: one server is enough to show it")

    async def scenario() -> tuple[Backlog, int, Backlog]:
        (admin,) = kit.admin()
        now = int(time.time() * 1000)
        await admin.set("echoserver:{old}:seq", 5)
        for n, word in ((4, b"four"), (5, b"five")):
            await admin.lpush("echoserver:{old}:history", b"%d %d:t0:%s" % (now, n, word))
        await admin.aclose()
        broker, _ = await started(kit, history=10)
        before = await broker.backlog("old", 3, 10)
        sixth = await publish(broker, Envelope("old", b"six", False))
        after = await broker.backlog("old", 3, 10)
        await broker.close()
        return before, sixth, after

    before, sixth, after = run(scenario())
    assert ([e.seq for e in before.envelopes], before.last, before.epoch) == ([4, 5], 5, "")
    assert sixth == 6 and valid_epoch(after.epoch)
    assert [(e.seq, e.data, e.epoch) for e in after.envelopes] == [
        (4, b"four", after.epoch),
        (5, b"five", after.epoch),
        (6, b"six", after.epoch),
    ]


def test_presence_counts_this_process(kit: Kit) -> None:
    async def scenario() -> list[int]:
        broker, _ = await started(kit)
        counts = [await broker.presence.count("p")]
        for members in (3, 1, 0):
            await broker.presence.set_local("p", members)
            counts.append(await broker.presence.count("p"))
        await broker.close()
        return counts

    assert run(scenario()) == [0, 3, 1, 0]


def test_presence_adds_up_across_processes(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> list[tuple[int, int]]:
        (a, _), (b, _) = await started(kit), await started(kit)
        await a.presence.set_local("p", 3)
        await b.presence.set_local("p", 2)
        counts = [(await a.presence.count("p"), await b.presence.count("p"))]
        await a.presence.set_local("p", 0)
        counts.append((await a.presence.count("p"), await b.presence.count("p")))
        await a.presence.set_local("p", 4)
        await b.close()  # a clean exit takes its members with it at once
        counts.append((await a.presence.count("p"), await a.presence.count("q")))
        await a.close()
        return counts

    assert run(scenario()) == [(5, 5), (2, 2), (4, 0)]


def test_presence_of_a_crashed_process_expires(kit: Kit) -> None:
    kit.need_shared()
    assert kit.redis is not None
    ttl = 1.0
    child = textwrap.dedent(
        f"""
        import asyncio
        from echoserver.brokers.redis import RedisBroker
        from echoserver.brokers.redis_cluster import RedisClusterBroker
        from echoserver.brokers.redis_base import RedisOptions

        async def main():
            kind = RedisClusterBroker if {kit.kind == "cluster"} else RedisBroker
            broker = kind({kit.redis.url!r}, RedisOptions(presence_ttl={ttl}))
            await broker.start(lambda envelope: None)
            await broker.presence.set_local("p", 4)
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"

        async def scenario() -> tuple[int, float]:
            broker, _ = await started(kit)
            await broker.presence.set_local("p", 1)
            before = await broker.presence.count("p")
            worker.kill()  # no clean-up: like a crash or a power cut
            killed = time.monotonic()
            assert await eventually(lambda: equals(broker.presence.count("p"), 1), 3 * ttl + 2)
            elapsed = time.monotonic() - killed
            await broker.close()
            return before, elapsed

        before, elapsed = run(scenario())
        assert before == 5
        assert elapsed <= 3 * ttl + 2
    finally:
        worker.kill()
        worker.wait()


def test_health_follows_the_connection(kit: Kit) -> None:
    async def memory() -> None:
        broker, _ = await started(kit)
        assert broker.healthy and broker.health_reason == ""
        await broker.close()

    if kit.redis is None:
        run(memory())
        return
    redis = kit.redis

    async def scenario() -> None:
        (a, got_a), (b, got_b) = await started(kit), await started(kit)
        await a.subscribe("r")
        await b.subscribe("r")
        await a.presence.set_local("r", 2)
        await publish(a, Envelope("r", b"before", False))
        await got_b.wait("r", 1)

        await asyncio.to_thread(redis.stop)
        assert await eventually(lambda: not a.healthy and not b.healthy)
        assert "unreachable" in a.health_reason and redis.address in a.health_reason
        waited = a.publish(Envelope("r", b"waited", False))  # waits for Redis to come back
        assert isinstance(waited, asyncio.Future) and not waited.done()
        assert await kept(a, "r", 5) == []
        assert await a.presence.count("r") == 2  # its own members, while it cannot ask
        await b.subscribe("joined-while-down")

        await asyncio.to_thread(redis.start)  # the same port, empty: a restarted Redis
        assert await eventually(lambda: a.healthy and b.healthy)
        assert a.health_reason == ""
        assert await offset(waited) == 1  # a restarted Redis numbers from 1 again
        await publish(b, Envelope("r", b"after", False))
        await publish(a, Envelope("joined-while-down", b"hello", False))
        expected = [b"before", b"waited", b"after"]
        assert [e.data for e in await got_a.wait("r", 3)] == expected
        # Another process gets what waited only if it re-subscribed before the publisher
        # came back (Redis pub/sub delivers at most once): a client there recovers it.
        assert await eventually(lambda: b"after" in [e.data for e in got_b.on("r")])
        assert [e.data for e in got_b.on("r")] in (expected, expected[::2])
        assert [e.data for e in await got_b.wait("joined-while-down", 1)] == [b"hello"]
        assert await b.presence.count("r") == 2  # a wrote its members into the new Redis
        await a.close()
        await b.close()

    run(scenario(), timeout=60)


@pytest.mark.redis
def test_redis_broker_starts_degraded_and_connects_when_redis_appears(tmp_path: Any) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path, free_port())

    async def scenario() -> None:
        broker = RedisBroker(redis.url, RedisOptions(backoff_cap=0.5, op_timeout=1.0))
        got = Recorder()
        started_at = time.monotonic()
        await broker.start(got)
        assert time.monotonic() - started_at < 4
        assert not broker.healthy and "unreachable" in broker.health_reason
        await broker.subscribe("late")
        await asyncio.to_thread(redis.start)
        assert await eventually(lambda: broker.healthy)
        await publish(broker, Envelope("late", b"hi", False))
        assert [e.data for e in await got.wait("late", 1)] == [b"hi"]
        await broker.close()
        await broker.close()  # idempotent

    try:
        run(scenario())
    finally:
        redis.stop()


class Member:
    """A hub Subscriber that only records the offsets it gets."""

    def __init__(self, sub_id: str) -> None:
        self.sub_id = self.peer = sub_id
        self.seqs: list[int] = []

    def deliver(self, delivery: Delivery) -> None:
        self.seqs.append(delivery.seq)

    def queued_bytes(self) -> int:
        return 0

    def close_slow(self) -> None:
        raise AssertionError("never slow")


def test_hub_join_splices_history_and_live_without_gap_or_repeat(kit: Kit) -> None:
    """A joiner that arrives mid-stream gets history then live, each message once."""
    total = 300

    async def scenario() -> tuple[list[int], list[int], int]:
        publisher_hub = Hub(kit.new(history=50))
        joiner_hub = Hub(kit.new(history=50)) if kit.shared else publisher_hub
        first, late = Member("first"), Member("late")
        await joiner_hub.start()  # as a server does before it serves: joining is the test
        await publisher_hub.join("s", first)

        async def send() -> None:
            """As a sender's handler does: Hub.publish, several in flight, none awaited."""
            in_flight: list[int | asyncio.Future[int]] = []
            for n in range(total):
                in_flight.append(publisher_hub.publish("s", b"%d" % n, False, "first"))
                if n % 10 == 0:
                    await asyncio.sleep(0.002)  # a paced stream, so the join lands mid-way
            assert [await offset(published) for published in in_flight] == list(range(1, total + 1))

        publishing = asyncio.ensure_future(send())
        while len(first.seqs) < total // 3:
            await asyncio.sleep(0.001)
        at_join = len(first.seqs)
        await joiner_hub.join("s", late)
        await publishing
        deadline = time.monotonic() + 10
        while len(first.seqs) < total or late.seqs[-1:] != [total]:
            assert time.monotonic() < deadline, "messages did not arrive"
            await asyncio.sleep(0.01)
        await publisher_hub.close()
        if joiner_hub is not publisher_hub:
            await joiner_hub.close()
        return first.seqs, late.seqs, at_join

    first, late, at_join = run(scenario())
    assert first == list(range(1, total + 1))
    assert late == list(range(late[0], total + 1))
    assert late[0] <= at_join < total  # some from history, the rest live


def test_a_refusing_redis_is_reported_to_the_publisher(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> None:
        broker, got = await started(kit)
        await broker.subscribe("full")
        admins = kit.admin()
        for admin in admins:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)  # every write is now refused with OOM
        try:
            with pytest.raises(BrokerUnavailable, match="maxmemory"):
                await publish(broker, Envelope("full", b"refused", False))
        finally:
            for admin in admins:
                await admin.config_set("maxmemory", 0)
                await admin.aclose()
        assert broker.healthy  # reachable: only that message failed
        await publish(broker, Envelope("full", b"accepted", False))
        assert [e.data for e in await got.wait("full", 1)] == [b"accepted"]
        await broker.close()

    run(scenario())


def test_a_flushed_script_cache_is_reloaded(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> tuple[list[bytes], int]:
        broker, got = await started(kit)
        await broker.subscribe("s")
        await broker.presence.set_local("s", 2)
        for admin in kit.admin():
            await admin.script_flush()
            await admin.aclose()
        # Several in one batch, with other commands between: each gets its own reply.
        results = await asyncio.gather(
            *(publish(broker, Envelope("s", b"%d" % n, False)) for n in range(5)),
            broker.presence.count("s"),
            kept(broker, "s", 3),
        )
        data = [e.data for e in await got.wait("s", 5)]
        assert broker.healthy
        await broker.close()
        return data, results[5]

    data, members = run(scenario())
    assert data == [b"0", b"1", b"2", b"3", b"4"]
    assert members == 2


def test_hub_publishes_wait_for_redis_in_order_through_a_restart(kit: Kit) -> None:
    """What a handler sees: publishes in flight when Redis goes, and new ones while it is
    down, wait and land once it is back, in call order, none lost, none failed."""
    kit.need_shared()
    redis = kit.redis
    assert redis is not None

    async def scenario() -> tuple[list[int], list[bytes]]:
        hub = Hub(kit.new(), publish_timeout=30)
        got: list[bytes] = []
        member = Member("m")
        member.deliver = lambda delivery: got.append(delivery.data)  # type: ignore[method-assign]
        await hub.join("r", member)
        assert await offset(hub.publish("r", b"before", False, None)) == 1
        published = [hub.publish("r", b"%d" % n, False, None) for n in range(200)]
        await asyncio.to_thread(redis.stop)
        assert await eventually(lambda: not hub.broker.healthy)
        published += [hub.publish("r", b"%d" % n, False, None) for n in range(200, 300)]
        await asyncio.to_thread(redis.start)
        offsets = [await offset(p) for p in published]
        assert hub.broker.healthy
        deadline = time.monotonic() + 10
        while got[-1:] != [b"299"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await hub.close()
        return offsets, got

    offsets, got = run(scenario(), timeout=60)
    # Every message once and in order (the restarted Redis numbers from 1 again, so the
    # ones that landed before it stopped keep their old offsets).
    assert got[got.index(b"0") :] == [b"%d" % n for n in range(300)]
    restart = next(i for i, o in enumerate(offsets) if i and o <= offsets[i - 1])
    assert offsets[:restart] == list(range(2, 2 + restart))
    assert offsets[restart:] == list(range(1, 1 + 300 - restart))


def test_a_publish_waits_publish_timeout_then_fails_oldest_first(kit: Kit) -> None:
    """Past publish_timeout a waiting publish fails with the hub's error, the oldest
    first; the broker still sends what came later once Redis is back."""
    kit.need_shared()
    redis = kit.redis
    assert redis is not None

    async def scenario() -> None:
        hub = Hub(kit.new(), publish_timeout=0.5)
        member = Member("m")
        await hub.join("r", member)
        await asyncio.to_thread(redis.stop)
        assert await eventually(lambda: not hub.broker.healthy)
        first = hub.publish("r", b"first", False, None)
        await asyncio.sleep(0.3)
        second = hub.publish("r", b"second", False, None)
        assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="unreachable"):
            await first
        assert not second.done()  # it has waited 0.3 s less
        with pytest.raises(BrokerUnavailable, match="unreachable"):
            await second
        assert 0.15 <= time.monotonic() - started <= 1.5
        await asyncio.to_thread(redis.start)
        assert await eventually(lambda: hub.broker.healthy)
        assert await offset(hub.publish("r", b"after", False, None)) == 1
        await hub.close()

    run(scenario(), timeout=60)


def test_a_closing_broker_fails_what_waits(kit: Kit) -> None:
    kit.need_shared()
    redis = kit.redis
    assert redis is not None

    async def scenario() -> None:
        broker, _ = await started(kit)
        broker.publish_timeout = 30
        await asyncio.to_thread(redis.stop)
        assert await eventually(lambda: not broker.healthy)
        waiting = broker.publish(Envelope("r", b"x", False))
        await broker.close()
        with pytest.raises(BrokerUnavailable, match="closed"):
            await offset(waiting)
        with pytest.raises(BrokerUnavailable):
            broker.publish(Envelope("r", b"y", False))
        await asyncio.to_thread(redis.start)

    run(scenario(), timeout=60)


# --- i22: publish_many, a batch (the batch publish API) ---------------------------------------


def test_publish_many_keeps_each_channels_order_and_numbers_every_message(kit: Kit) -> None:
    channels = ["m1", "m2", "m3"]
    batch = [Envelope(c, f"{c}-{n}".encode(), False, None) for n in range(30) for c in channels]

    async def scenario() -> tuple[list[int], dict[str, list[bytes]]]:
        broker, recorder = await started(kit, history=100)
        for channel in channels:
            await broker.subscribe(channel)
        offsets = [await offset(published) for published in broker.publish_many(batch)]
        delivered = {c: [e.data for e in await recorder.wait(c, 30)] for c in channels}
        kept = (await broker.backlog("m2", 0, 100)).envelopes
        assert [e.data for e in kept] == [f"m2-{n}".encode() for n in range(30)]
        await broker.close()
        return offsets, delivered

    offsets, delivered = run(scenario())
    assert offsets == [n + 1 for n in range(30) for _ in channels]
    assert [e.seq for e in batch] == offsets and all(e.epoch for e in batch)
    for channel in channels:
        assert delivered[channel] == [f"{channel}-{n}".encode() for n in range(30)]

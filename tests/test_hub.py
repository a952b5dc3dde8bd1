"""Hub unit tests: membership, fan-out and history, with no socket in sight.

Messages go in through Hub.publish, the one entry point the handlers use, on the memory
broker (done at once) and on a broker that answers later, as Redis does.
"""

from __future__ import annotations

import asyncio
import json
from unittest.mock import ANY  # a wildcard for a Replay's epoch (random per channel)

import pytest

from echoserver.brokers import Backlog, BrokerUnavailable, Envelope, MemoryBroker
from echoserver.fanout.delivery import Delivery, Replay
from echoserver.fanout.hub import Hub
from tests.conftest import kept, run


class Recorder:
    """A subscriber that keeps what it gets; `reads=False` never takes anything off its queue."""

    def __init__(self, hub: Hub, reads: bool = True) -> None:
        self.sub_id = hub.new_subscriber_id()
        self.peer = f"recorder {self.sub_id}"
        self.reads = reads
        self.queued = 0
        self.closed = False
        self.got: list[bytes] = []

    def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery.data)
        if not self.reads:
            self.queued += len(delivery.data)

    def queued_bytes(self) -> int:
        return self.queued

    def close_slow(self) -> None:
        self.closed = True


def test_fan_out_reaches_every_member_of_the_channel_only():
    async def scenario():
        hub = Hub(MemoryBroker())
        a, b, other = Recorder(hub), Recorder(hub), Recorder(hub)
        await hub.join("room", a)
        await hub.join("room", b)
        await hub.join("elsewhere", other)
        hub.publish("room", b"hi", False, a.sub_id)
        return a, b, other

    a, b, other = run(scenario())
    assert a.got == [b"hi"]
    assert b.got == [b"hi"]
    assert other.got == []


def test_exclude_sender():
    async def scenario():
        hub = Hub(MemoryBroker(), include_sender=False)
        a, b = Recorder(hub), Recorder(hub)
        await hub.join("room", a)
        await hub.join("room", b)
        hub.publish("room", b"from a", False, a.sub_id)
        return a, b

    a, b = run(scenario())
    assert a.got == []
    assert b.got == [b"from a"]


def test_every_receiver_sees_one_order():
    async def scenario():
        hub = Hub(MemoryBroker())
        members = [Recorder(hub) for _ in range(5)]
        for member in members:
            await hub.join("room", member)
        for n in range(50):
            for i in range(5):
                hub.publish("room", f"{i}:{n}".encode(), False, members[i].sub_id)
        return members

    members = run(scenario())
    assert len(members[0].got) == 250
    for member in members[1:]:
        assert member.got == members[0].got


def test_leave_stops_delivery_and_updates_presence():
    async def scenario():
        hub = Hub(MemoryBroker())
        a, b = Recorder(hub), Recorder(hub)
        await hub.join("room", a)
        await hub.join("room", b)
        assert await hub.members("room") == 2
        await hub.leave("room", a)
        hub.publish("room", b"after", False, b.sub_id)
        return hub, a, b

    hub, a, b = run(scenario())
    assert a.got == []
    assert b.got == [b"after"]
    assert run(hub.members("room")) == 1


@pytest.mark.parametrize("history", [1, 3, 10])
def test_history_then_live_without_gap_or_repeat(history):
    async def scenario():
        hub = Hub(MemoryBroker(history=history))
        sender = Recorder(hub)
        await hub.join("room", sender)
        for n in range(5):
            hub.publish("room", str(n).encode(), False, sender.sub_id)
        joiner = Recorder(hub)
        await hub.join("room", joiner)
        hub.publish("room", b"live", False, sender.sub_id)
        return joiner

    joiner = run(scenario())
    expected_past = [str(n).encode() for n in range(5)][-history:]
    assert joiner.got == [*expected_past, b"live"]


def test_history_is_per_channel():
    async def scenario():
        hub = Hub(MemoryBroker(history=5))
        sender = Recorder(hub)
        await hub.join("a", sender)
        hub.publish("a", b"for a", False, sender.sub_id)
        joiner = Recorder(hub)
        await hub.join("b", joiner)
        return joiner

    assert run(scenario()).got == []


class SlowHistoryBroker(MemoryBroker):
    """History that takes a loop pass, so live messages can arrive meanwhile (as with Redis)."""

    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        past = await super().backlog(channel, after, limit)
        await asyncio.sleep(0.01)
        return past


def test_messages_published_while_history_is_fetched_are_neither_lost_nor_repeated():
    async def scenario():
        hub = Hub(SlowHistoryBroker(history=10))
        sender = Recorder(hub)
        await hub.join("room", sender)
        hub.publish("room", b"old", False, sender.sub_id)
        joiner = Recorder(hub)
        joining = asyncio.ensure_future(hub.join("room", joiner))
        await asyncio.sleep(0)
        hub.publish("room", b"during", False, sender.sub_id)
        await joining
        hub.publish("room", b"after", False, sender.sub_id)
        return joiner

    assert run(scenario()).got == [b"old", b"during", b"after"]


def test_a_subscriber_that_leaves_while_joining_gets_nothing():
    async def scenario():
        hub = Hub(SlowHistoryBroker(history=10))
        joiner = Recorder(hub)
        joining = asyncio.ensure_future(hub.join("room", joiner))
        await asyncio.sleep(0)
        await hub.leave("room", joiner)
        await joining
        return hub, joiner

    hub, joiner = run(scenario())
    assert joiner.got == []
    assert run(hub.members("room")) == 0


def test_a_receiver_over_its_cap_misses_messages_and_the_others_do_not():
    async def scenario():
        hub = Hub(MemoryBroker(), max_queue_bytes=1000)
        fast, slow = Recorder(hub), Recorder(hub, reads=False)
        await hub.join("room", fast)
        await hub.join("room", slow)
        for n in range(30):
            hub.publish("room", b"%099d" % n, False, None)  # 100 bytes each
        return hub, fast, slow

    hub, fast, slow = run(scenario())
    assert len(fast.got) == 30
    assert slow.got == [b"%099d" % n for n in range(10)]  # exactly the cap's worth
    assert slow.queued <= 1000
    assert not slow.closed
    assert hub.stats["room"].drops == 20
    assert hub.stats["room"].deliveries == 40


def test_a_receiver_that_catches_up_gets_messages_again():
    async def scenario():
        hub = Hub(MemoryBroker(), max_queue_bytes=200)
        slow = Recorder(hub, reads=False)
        await hub.join("room", slow)
        for n in range(4):
            hub.publish("room", b"%099d" % n, False, None)
        slow.queued = 0  # it read everything
        hub.publish("room", b"after", False, None)
        return slow

    slow = run(scenario())
    assert slow.got == [b"%099d" % 0, b"%099d" % 1, b"after"]


def test_disconnect_policy_closes_the_slow_receiver_once():
    async def scenario():
        hub = Hub(MemoryBroker(), max_queue_bytes=250, slow_client="disconnect")
        fast, slow = Recorder(hub), Recorder(hub, reads=False)
        await hub.join("room", fast)
        await hub.join("room", slow)
        for n in range(10):
            hub.publish("room", b"%099d" % n, False, None)
        return hub, fast, slow

    hub, fast, slow = run(scenario())
    assert slow.closed
    assert len(slow.got) == 2
    assert len(fast.got) == 10
    assert hub.stats["room"].slow_disconnects == 1
    assert hub.stats["room"].drops == 0


def test_history_replay_respects_the_cap():
    async def scenario():
        hub = Hub(MemoryBroker(history=10), max_queue_bytes=300)
        sender = Recorder(hub)
        await hub.join("room", sender)
        for n in range(10):
            hub.publish("room", b"%099d" % n, False, None)
        joiner = Recorder(hub, reads=False)
        await hub.join("room", joiner)
        return joiner

    joiner = run(scenario())
    # The newest that fit (100 bytes each, counted with REPLAY_OVERHEAD): nothing dropped
    # on the way, so a replay is always the latest messages without a hole.
    assert joiner.got == [b"%099d" % 9]


def test_a_since_replay_over_the_cap_is_trimmed_to_the_newest_and_not_recovered():
    async def scenario() -> tuple[Replay, Offsets]:
        hub = Hub(MemoryBroker(history=10), max_queue_bytes=700)
        for n in range(10):
            hub.publish("room", b"%099d" % n, False, None)
        joiner = Offsets(hub)
        joiner.reads = False
        return await hub.join("room", joiner, since=2), joiner

    replay, joiner = run(scenario())
    assert replay == Replay(since=2, count=3, first=8, last=10, recovered=False, epoch=ANY)
    assert joiner.offsets == [8, 9, 10]


def test_one_delivery_object_per_fan_out_reaches_every_receiver():
    """Frame once, write many: the receivers of one fan-out share one Delivery (and so its
    cached frames); it is the hub's own object, so no receiver writes into the broker's
    message, and the next fan-out starts with an empty cache."""
    seen: list[Delivery] = []

    class Keeper(Recorder):
        def deliver(self, delivery: Delivery) -> None:
            if "frame" not in delivery.encoded:  # the first receiver encodes
                delivery.encoded["frame"] = b"encoded " + delivery.data
            seen.append(delivery)

    async def scenario():
        broker = MemoryBroker(history=5)
        hub = Hub(broker)
        for _ in range(5):
            await hub.join("room", Keeper(hub))
        hub.publish("room", b"shared", False, None)
        hub.publish("room", b"next", False, None)
        return await kept(broker, "room", 5)

    history = run(scenario())
    first, second = seen[:5], seen[5:]
    assert all(delivery is first[0] for delivery in first)
    assert all(delivery is second[0] for delivery in second) and second[0] is not first[0]
    assert [d.encoded for d in (first[0], second[0])] == [
        {"frame": b"encoded shared"},
        {"frame": b"encoded next"},
    ]
    assert [(d.data, d.binary, d.seq) for d in (first[0], second[0])] == [
        (b"shared", False, 1),
        (b"next", False, 2),
    ]
    assert [e.data for e in history] == [b"shared", b"next"]
    assert not any(isinstance(d, Envelope) for d in seen)


def test_counters_of_channels_past_the_bound_are_shared(monkeypatch):
    monkeypatch.setattr("echoserver.fanout.hub.MAX_TRACKED_CHANNELS", 3)

    async def scenario():
        hub = Hub(MemoryBroker())
        for n in range(6):
            member = Recorder(hub)
            await hub.join(f"c{n}", member)
            hub.publish(f"c{n}", b"x", False, None)
        return hub

    hub = run(scenario())
    assert set(hub.stats) == {"c0", "c1", "c2", "(other)"}
    assert hub.stats["(other)"].deliveries == 3


def test_channels_nobody_is_on_keep_their_offsets_and_history_up_to_a_bound(monkeypatch):
    monkeypatch.setattr("echoserver.brokers.memory.MAX_CHANNELS", 2)

    async def scenario():
        broker = MemoryBroker(history=5)
        hub = Hub(broker)
        for n in range(4):
            member = Recorder(hub)
            await hub.join(f"c{n}", member)
            hub.publish(f"c{n}", b"x", False, None)
            await hub.leave(f"c{n}", member)
        plain = Hub(MemoryBroker())
        member = Recorder(plain)
        await plain.join("gone", member)
        plain.publish("gone", b"x", False, None)
        await plain.leave("gone", member)
        return broker, plain.broker

    with_history, without = run(scenario())
    assert list(with_history._channels) == ["c2", "c3"]
    assert [len(c.kept) for c in with_history._channels.values()] == [1, 1]
    # Without history a channel keeps only its last offset, so a client can resume.
    assert [(c.last, c.kept) for c in without._channels.values()] == [(1, None)]


def test_publish_returns_each_message_offset_per_channel():
    async def scenario():
        hub = Hub(MemoryBroker(history=5))
        member = Recorder(hub)
        await hub.join("a", member)
        offsets = [hub.publish(channel, b"x", False, None) for channel in "aabab"]
        seen: list[int] = []

        class Offsets(Recorder):
            def deliver(self, delivery: Delivery) -> None:
                seen.append(delivery.seq)

        await hub.join("a", Offsets(hub))  # the replay carries the offsets too
        hub.publish("a", b"live", False, None)
        return offsets, seen

    offsets, seen = run(scenario())
    assert offsets == [1, 2, 1, 3, 2]
    assert seen == [1, 2, 3, 4]


class LaterBroker(MemoryBroker):
    """Answers publishes later, in order, as a remote broker does: release() hands over
    what was started; fail() makes them fail; `down` refuses at once."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.pending: list[tuple[Envelope, asyncio.Future[int]]] = []

    def publish(self, envelope: Envelope) -> asyncio.Future[int]:  # type: ignore[override]
        if self.down:
            raise BrokerUnavailable("broker down for the test")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending.append((envelope, future))
        return future

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for envelope, future in pending:
            future.set_result(super().publish(envelope))

    def fail(self, error: BaseException) -> None:
        pending, self.pending = self.pending, []
        for _, future in pending:
            future.set_exception(error)


def test_publishes_in_flight_keep_their_order_and_report_their_offsets():
    async def scenario():
        broker = LaterBroker()
        hub = Hub(broker)
        member = Recorder(hub)
        await hub.join("room", member)
        outcomes = [hub.publish("room", b"%d" % n, False, None) for n in range(20)]
        assert member.got == []  # started, not delivered yet
        broker.release()
        return member, await asyncio.gather(*outcomes)

    member, offsets = run(scenario())
    assert member.got == [b"%d" % n for n in range(20)]
    assert offsets == list(range(1, 21))


def test_publish_failures_are_the_hubs_own_error():
    async def scenario():
        broker = LaterBroker()
        hub = Hub(broker)
        await hub.join("room", Recorder(hub))
        lost = hub.publish("room", b"lost", False, None)
        broker.fail(BrokerUnavailable("redis here: unreachable"))
        with pytest.raises(BrokerUnavailable, match=r"^redis here: unreachable$"):
            await lost
        broken = hub.publish("room", b"bug", False, None)
        broker.fail(ValueError("a bug, not an outage"))
        with pytest.raises(ValueError):
            await broken
        broker.down = True
        with pytest.raises(BrokerUnavailable, match="broker down"):
            hub.publish("room", b"refused", False, None)

    run(scenario())


def test_history_given_to_the_hub_configures_its_broker():
    broker = MemoryBroker()
    Hub(broker, history=7)
    assert broker.history_size == 7
    Hub(broker)
    assert broker.history_size == 7


# --- offsets and recovery (since) -----------------------------------------------------------


class Offsets(Recorder):
    """A subscriber that keeps the offsets it gets."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.offsets: list[int] = []

    def deliver(self, delivery: Delivery) -> None:
        super().deliver(delivery)
        self.offsets.append(delivery.seq)


async def published(hub: Hub, channel: str, count: int) -> None:
    for n in range(count):
        hub.publish(channel, f"m{n}".encode(), False, None)


def replays(history: int, since: int, count: int = 10) -> tuple[Replay, list[int]]:
    """Publish `count` messages, join with `since`, publish one more: (replay, offsets got)."""

    async def scenario() -> tuple[Replay, list[int]]:
        hub = Hub(MemoryBroker(history=history))
        await published(hub, "room", count)
        joiner = Offsets(hub)
        replay = await hub.join("room", joiner, since=since)
        hub.publish("room", b"live", False, None)
        return replay, joiner.offsets

    return run(scenario())


def test_since_replays_every_kept_message_after_it_then_live():
    replay, offsets = replays(history=10, since=4)
    assert replay == Replay(since=4, count=6, first=5, last=10, recovered=True, epoch=ANY)
    assert offsets == list(range(5, 12))


def test_since_older_than_the_history_is_not_recovered():
    replay, offsets = replays(history=3, since=4)
    assert replay == Replay(since=4, count=3, first=8, last=10, recovered=False, epoch=ANY)
    assert offsets == [8, 9, 10, 11]


def test_since_at_the_last_offset_is_recovered_with_nothing_to_replay():
    for history in (0, 5):
        replay, offsets = replays(history=history, since=10)
        assert replay == Replay(since=10, count=0, first=None, last=10, recovered=True, epoch=ANY)
        assert offsets == [11]


def test_without_history_since_is_recovered_only_when_nothing_was_missed():
    replay, offsets = replays(history=0, since=9)
    assert replay == Replay(since=9, count=0, first=None, last=10, recovered=False, epoch=ANY)
    assert offsets == [11]


def test_since_on_a_channel_never_published_to():
    replay, offsets = replays(history=5, since=0, count=0)
    assert replay == Replay(since=0, count=0, first=None, last=0, recovered=True, epoch=ANY)
    assert offsets == [1]


def test_since_ahead_of_the_channel_means_it_was_numbered_again():
    """A restarted server numbers from 1 again: the client's offset is from before."""
    replay, offsets = replays(history=5, since=50, count=3)
    assert replay == Replay(since=50, count=3, first=1, last=3, recovered=False, epoch=ANY)
    assert offsets == [1, 2, 3, 4]


def test_without_since_the_last_history_messages_are_replayed():
    async def scenario() -> tuple[Replay, list[int]]:
        hub = Hub(MemoryBroker(history=3))
        await published(hub, "room", 5)
        joiner = Offsets(hub)
        return await hub.join("room", joiner), joiner.offsets

    replay, offsets = run(scenario())
    assert replay == Replay(since=None, count=3, first=3, last=5, recovered=None, epoch=ANY)
    assert offsets == [3, 4, 5]


def test_before_replay_is_told_once_before_the_replayed_messages():
    calls: list[tuple[Replay, int]] = []

    async def scenario() -> None:
        hub = Hub(MemoryBroker(history=5))
        await published(hub, "room", 4)
        joiner = Offsets(hub)
        await hub.join("room", joiner, lambda r: calls.append((r, len(joiner.offsets))), 2)
        plain = Offsets(Hub(MemoryBroker()))
        await Hub(MemoryBroker()).join("room", plain, lambda r: calls.append((r, 0)))

    run(scenario())
    assert calls == [
        (Replay(since=2, count=2, first=3, last=4, recovered=True, epoch=ANY), 0),
        (Replay(since=None, count=0, first=None, last=None, recovered=None), 0),
    ]


def test_since_while_the_history_is_fetched_loses_and_repeats_nothing():
    async def scenario() -> Offsets:
        hub = Hub(SlowHistoryBroker(history=100))
        await published(hub, "room", 10)
        joiner = Offsets(hub)
        joining = asyncio.ensure_future(hub.join("room", joiner, since=3))
        for _ in range(5):
            await asyncio.sleep(0)
            hub.publish("room", b"during", False, None)
        replay = await joining
        assert replay.recovered and replay.first == 4
        hub.publish("room", b"after", False, None)
        return joiner

    assert run(scenario()).offsets == list(range(4, 17))


def test_a_broker_that_cannot_tell_gives_recovered_false():
    class Unreachable(MemoryBroker):
        async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
            raise BrokerUnavailable("redis down")

    async def scenario() -> tuple[Replay, Offsets]:
        hub = Hub(Unreachable(history=5))
        joiner = Offsets(hub)
        replay = await hub.join("room", joiner, since=3)
        hub.publish("room", b"live", False, None)
        return replay, joiner

    replay, joiner = run(scenario())
    assert replay == Replay(since=3, count=0, first=None, last=None, recovered=False)
    assert joiner.offsets == [1]


def test_post_publishes_and_counts_receivers():
    async def scenario():
        hub = Hub(MemoryBroker(history=5))
        members = [Recorder(hub) for _ in range(3)]
        for member in members:
            await hub.join("room", member)
        first = await hub.post("room", b"one", False)
        second = await hub.post("empty", b"two", True)
        return first, second, members

    first, second, members = run(scenario())
    assert (first.offset, first.local_receivers, first.receivers) == (1, 3, 3)
    assert (second.offset, second.local_receivers, second.receivers) == (1, 0, 0)
    assert all(member.got == [b"one"] for member in members)


def test_the_mixed_envelope_is_built_once_per_fan_out():
    """Every receiver of one fan-out gets the same envelope bytes, with the offset."""
    from echoserver.wire.envelopes import mixed_broadcast, mixed_payload

    seen: list[bytes | None] = []

    class Mixed(Recorder):
        def deliver(self, delivery: Delivery) -> None:
            seen.append(mixed_broadcast(delivery))

    async def scenario() -> None:
        hub = Hub(MemoryBroker())
        for _ in range(3):
            await hub.join("room", Mixed(hub))
        hub.publish("room", mixed_payload({"n": "é"}), False, None)
        hub.publish("room", b"\x00", True, None)  # binary: not carried in mixed mode

    run(scenario())
    assert seen[0] is not None
    envelope = json.loads(seen[0])
    assert envelope == {
        "type": "broadcast",
        "channel": "room",
        "payload": {"n": "é"},
        "offset": 1,
        "epoch": ANY,
    }
    compact = '{"type":"broadcast","channel":"room","payload":{"n":"é"},"offset":1,"epoch":"'
    assert seen[0] == (compact + envelope["epoch"] + '"}').encode()
    assert seen[1] is seen[0] and seen[2] is seen[0]
    assert seen[3:] == [None, None, None]

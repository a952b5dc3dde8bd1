"""Hub unit tests: membership, fan-out and history, with no socket in sight."""

from __future__ import annotations

import asyncio

import pytest

from echoserver.brokers import Envelope, MemoryBroker
from echoserver.hub import Hub


class Recorder:
    """A subscriber that keeps what it gets; `reads=False` never takes anything off its queue."""

    def __init__(self, hub: Hub, reads: bool = True) -> None:
        self.sub_id = hub.new_subscriber_id()
        self.peer = f"recorder {self.sub_id}"
        self.reads = reads
        self.queued = 0
        self.closed = False
        self.got: list[bytes] = []

    def deliver(self, envelope: Envelope) -> None:
        self.got.append(envelope.data)
        if not self.reads:
            self.queued += len(envelope.data)

    def queued_bytes(self) -> int:
        return self.queued

    def close_slow(self) -> None:
        self.closed = True


def run(coroutine):
    return asyncio.run(coroutine)


def test_fan_out_reaches_every_member_of_the_channel_only():
    async def scenario():
        hub = Hub(MemoryBroker())
        a, b, other = Recorder(hub), Recorder(hub), Recorder(hub)
        await hub.join("room", a)
        await hub.join("room", b)
        await hub.join("elsewhere", other)
        await hub.publish("room", b"hi", False, a.sub_id)
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
        await hub.publish("room", b"from a", False, a.sub_id)
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
        senders = [
            hub.publish("room", f"{i}:{n}".encode(), False, members[i].sub_id)
            for n in range(50)
            for i in range(5)
        ]
        await asyncio.gather(*senders)
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
        await hub.publish("room", b"after", False, b.sub_id)
        return hub, a, b

    hub, a, b = run(scenario())
    assert a.got == []
    assert b.got == [b"after"]
    assert hub.local_members("room") == 1
    assert run(hub.members("room")) == 1


@pytest.mark.parametrize("history", [1, 3, 10])
def test_history_then_live_without_gap_or_repeat(history):
    async def scenario():
        hub = Hub(MemoryBroker(), history=history)
        sender = Recorder(hub)
        await hub.join("room", sender)
        for n in range(5):
            await hub.publish("room", str(n).encode(), False, sender.sub_id)
        joiner = Recorder(hub)
        await hub.join("room", joiner)
        await hub.publish("room", b"live", False, sender.sub_id)
        return joiner

    joiner = run(scenario())
    expected_past = [str(n).encode() for n in range(5)][-history:]
    assert joiner.got == [*expected_past, b"live"]


def test_history_is_per_channel():
    async def scenario():
        hub = Hub(MemoryBroker(), history=5)
        sender = Recorder(hub)
        await hub.join("a", sender)
        await hub.publish("a", b"for a", False, sender.sub_id)
        joiner = Recorder(hub)
        await hub.join("b", joiner)
        return joiner

    assert run(scenario()).got == []


class SlowHistoryBroker(MemoryBroker):
    """History that takes a loop pass, so live messages can arrive meanwhile (as with Redis)."""

    async def history(self, channel: str, limit: int) -> list[Envelope]:
        past = self.history_now(channel, limit)
        await asyncio.sleep(0.01)
        return past


def test_messages_published_while_history_is_fetched_are_neither_lost_nor_repeated():
    async def scenario():
        hub = Hub(SlowHistoryBroker(), history=10)
        sender = Recorder(hub)
        await hub.join("room", sender)
        await hub.publish("room", b"old", False, sender.sub_id)
        joiner = Recorder(hub)
        joining = asyncio.ensure_future(hub.join("room", joiner))
        await asyncio.sleep(0)
        await hub.publish("room", b"during", False, sender.sub_id)
        await joining
        await hub.publish("room", b"after", False, sender.sub_id)
        return joiner

    assert run(scenario()).got == [b"old", b"during", b"after"]


def test_a_subscriber_that_leaves_while_joining_gets_nothing():
    async def scenario():
        hub = Hub(SlowHistoryBroker(), history=10)
        joiner = Recorder(hub)
        joining = asyncio.ensure_future(hub.join("room", joiner))
        await asyncio.sleep(0)
        await hub.leave("room", joiner)
        await joining
        return hub, joiner

    hub, joiner = run(scenario())
    assert joiner.got == []
    assert hub.local_members("room") == 0


def test_a_receiver_over_its_cap_misses_messages_and_the_others_do_not():
    async def scenario():
        hub = Hub(MemoryBroker(), max_queue_bytes=1000)
        fast, slow = Recorder(hub), Recorder(hub, reads=False)
        await hub.join("room", fast)
        await hub.join("room", slow)
        for n in range(30):
            await hub.publish("room", b"%099d" % n, False, None)  # 100 bytes each
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
            await hub.publish("room", b"%099d" % n, False, None)
        slow.queued = 0  # it read everything
        await hub.publish("room", b"after", False, None)
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
            await hub.publish("room", b"%099d" % n, False, None)
        return hub, fast, slow

    hub, fast, slow = run(scenario())
    assert slow.closed
    assert len(slow.got) == 2
    assert len(fast.got) == 10
    assert hub.stats["room"].slow_disconnects == 1
    assert hub.stats["room"].drops == 0


def test_history_replay_respects_the_cap():
    async def scenario():
        hub = Hub(MemoryBroker(), history=10, max_queue_bytes=300)
        sender = Recorder(hub)
        await hub.join("room", sender)
        for n in range(10):
            await hub.publish("room", b"%099d" % n, False, None)
        joiner = Recorder(hub, reads=False)
        await hub.join("room", joiner)
        return joiner

    joiner = run(scenario())
    assert joiner.got == [b"%099d" % n for n in range(3)]


def test_one_envelope_object_reaches_every_receiver():
    """Frame once, write many: receivers share the envelope (and so its cached frame)."""
    seen: list[Envelope] = []

    class Keeper(Recorder):
        def deliver(self, envelope: Envelope) -> None:
            seen.append(envelope)

    async def scenario():
        hub = Hub(MemoryBroker())
        for _ in range(5):
            await hub.join("room", Keeper(hub))
        await hub.publish("room", b"shared", False, None)

    run(scenario())
    assert len(seen) == 5
    assert all(envelope is seen[0] for envelope in seen)


def test_counters_of_channels_past_the_bound_are_shared(monkeypatch):
    monkeypatch.setattr("echoserver.hub.MAX_TRACKED_CHANNELS", 3)

    async def scenario():
        hub = Hub(MemoryBroker())
        for n in range(6):
            member = Recorder(hub)
            await hub.join(f"c{n}", member)
            await hub.publish(f"c{n}", b"x", False, None)
        return hub

    hub = run(scenario())
    assert set(hub.stats) == {"c0", "c1", "c2", "(other)"}
    assert hub.stats["(other)"].deliveries == 3


def test_a_channel_nobody_is_on_keeps_nothing_but_its_history(monkeypatch):
    monkeypatch.setattr("echoserver.brokers.memory.MAX_HISTORY_CHANNELS", 2)

    async def scenario():
        broker = MemoryBroker()
        hub = Hub(broker, history=5)
        for n in range(4):
            member = Recorder(hub)
            await hub.join(f"c{n}", member)
            await hub.publish(f"c{n}", b"x", False, None)
            await hub.leave(f"c{n}", member)
        plain = Hub(MemoryBroker())
        member = Recorder(plain)
        await plain.join("gone", member)
        await plain.publish("gone", b"x", False, None)
        await plain.leave("gone", member)
        return broker, plain.broker

    with_history, without = run(scenario())
    assert list(with_history._history) == ["c2", "c3"]
    assert set(with_history._last_seq) == {"c2", "c3"}
    assert without._last_seq == {}

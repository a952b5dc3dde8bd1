"""Hub unit tests: membership, fan-out and history, with no socket in sight."""

from __future__ import annotations

import asyncio

import pytest

from echoserver.brokers import Envelope, MemoryBroker
from echoserver.hub import Hub


class Recorder:
    def __init__(self, hub: Hub) -> None:
        self.sub_id = hub.new_subscriber_id()
        self.got: list[bytes] = []

    def deliver(self, envelope: Envelope) -> None:
        self.got.append(envelope.data)


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

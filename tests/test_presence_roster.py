"""The Roster (fanout/presence.py) in one process on the memory broker: which arrivals
and departures are joins and leaves, the grace, and a return just as the grace ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from echoserver.brokers.memory import MemoryBroker
from echoserver.fanout.delivery import Delivery
from echoserver.fanout.hub import Hub
from echoserver.fanout.presence import Roster
from tests.conftest import run


class Member:
    """A hub subscriber that keeps the presence events it gets."""

    sub_id = "watcher"
    peer = "watcher"

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def deliver(self, delivery: Delivery) -> None:
        if delivery.seq < 0:
            body = json.loads(delivery.data)
            self.events.append((body["type"], body["user"]))

    def queued_bytes(self) -> int:
        return 0

    def close_slow(self) -> None:
        pass


async def setup(grace: float, announces: bool = True) -> tuple[Hub, Roster, Member]:
    hub = Hub(MemoryBroker())
    roster = Roster(hub, grace=grace, announces=lambda channel: announces)
    member = Member()
    await hub.join("c", member)
    return hub, roster, member


def test_second_tab_and_grace() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        hub, roster, member = await setup(grace=0.2)
        await roster.arrive("c", "ann", {"n": 1})
        await roster.arrive("c", "ann", {"n": 1})  # a second tab
        await roster.arrive("c", None, None)  # a guest: not tracked
        await roster.depart("c", "ann")
        await roster.depart("c", "ann")  # the last one: the grace begins
        await roster.arrive("c", "ann", {"n": 1})  # back within it
        await roster.depart("c", "ann")
        during = list(member.events)
        await asyncio.sleep(0.35)
        roll = await hub.presence.roll("c")
        assert roll.users == []
        roster.close()
        await hub.close()
        return during, member.events

    during, after = run(scenario())
    assert during == [("join", "ann")]
    assert after == [("join", "ann"), ("leave", "ann")]


def test_no_grace_and_no_announcement() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        hub, roster, member = await setup(grace=0)
        await roster.arrive("c", "ann", None)
        await roster.depart("c", "ann")
        quiet_hub, quiet, quiet_member = await setup(grace=0, announces=False)
        await quiet.arrive("c", "ann", None)
        listed = [u.user for u in (await quiet_hub.presence.roll("c")).users]
        await quiet.depart("c", "ann")
        for h in (hub, quiet_hub):
            await h.close()
        return member.events, quiet_member.events + listed

    events, quiet = run(scenario())
    assert events == [("join", "ann"), ("leave", "ann")]
    assert quiet == ["ann"]  # listed, never announced


def test_a_return_as_the_grace_ends_keeps_the_user() -> None:
    async def scenario() -> tuple[list[Any], list[str]]:
        hub, roster, member = await setup(grace=0.05)
        await roster.arrive("c", "ann", None)
        await roster.depart("c", "ann")
        await asyncio.sleep(0.04)
        # Spin until the timer has fired but its removal has not run yet, then return.
        loop = asyncio.get_running_loop()
        for _ in range(200):
            if not roster._here:  # the timer dropped the entry; its task is queued
                break
            await asyncio.sleep(0.001)
        await roster.arrive("c", "ann", None)
        for _ in range(5):
            await asyncio.sleep(0)
        listed = [u.user for u in (await hub.presence.roll("c")).users]
        assert loop.is_running()
        roster.close()
        await hub.close()
        return member.events, listed

    events, listed = run(scenario())
    assert listed == ["ann"]  # never removed while connected
    # Either she returned within the grace (one join), or just after (join, leave, join).
    assert events in ([("join", "ann")], [("join", "ann"), ("leave", "ann"), ("join", "ann")])

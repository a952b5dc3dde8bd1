"""Offsets reissued under one epoch: what a Redis replica promoted before it had the last
publishes does (its counter is behind, its epoch key the same). A hub that delivered
offset N under epoch E and then gets an offset <= N under E asks the broker for a new
epoch, so later messages and every `since` of the old numbering are told apart.

Real redis-server; the lagging replica is simulated by setting the channel's counter back
(the one thing a promoted replica differs in), which is what Redis would then hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

from echoserver.brokers.redis import RedisBroker
from echoserver.brokers.redis_base import RedisOptions
from echoserver.fanout.delivery import Delivery, Replay
from echoserver.fanout.hub import Hub
from tests.conftest import eventually, run
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture


class Member:
    """A subscriber that keeps the (offset, epoch, data) of what it gets."""

    def __init__(self, hub: Hub) -> None:
        self.sub_id = hub.new_subscriber_id()
        self.peer = f"member {self.sub_id}"
        self.got: list[tuple[int, str, bytes]] = []

    def deliver(self, delivery: Delivery) -> None:
        self.got.append((delivery.seq, delivery.epoch, delivery.data))

    def queued_bytes(self) -> int:
        return 0

    def close_slow(self) -> None:
        pass


@pytest.mark.redis
def test_offsets_going_back_under_one_epoch_get_a_new_epoch(redis_server: RedisServer) -> None:
    async def scenario() -> dict[str, Any]:
        hub = Hub(RedisBroker(redis_server.url, RedisOptions(history=10)))
        member = Member(hub)
        await hub.join("feed", member)
        for n in range(5):
            await hub.published("feed", b"m%d" % n, False, None)
        assert await eventually(lambda: len(member.got) == 5)
        admin = redis.asyncio.from_url(redis_server.url)
        await admin.set("echoserver:{feed}:seq", 2)  # a replica that had 2 of the 5
        reissued = await hub.published("feed", b"again", False, None)
        old_epoch = member.got[0][1]
        changed = False
        for _ in range(100):  # bounded: 5 s
            if (await admin.get("echoserver:{feed}:epoch")).decode() != old_epoch:
                changed = True
                break
            await asyncio.sleep(0.05)
        after = await hub.published("feed", b"after", False, None)
        assert await eventually(lambda: len(member.got) == 7)
        late = Member(hub)
        replay: Replay = await hub.join("feed", late, since=3, epoch=old_epoch)
        await admin.aclose()
        await hub.close()
        return locals()

    got = run(scenario(), timeout=30)
    old_epoch = got["old_epoch"]
    assert got["reissued"] == (3, old_epoch)  # what the lagging replica did
    assert got["changed"]
    offset, new_epoch = got["after"]
    assert offset == 4 and new_epoch != old_epoch
    assert got["member"].got[-1] == (4, new_epoch, b"after")
    replay = got["replay"]
    assert (replay.recovered, replay.epoch) == (False, new_epoch)
    # What was kept under the old epoch is gone: only the new epoch's message is replayed.
    assert got["late"].got == [(4, new_epoch, b"after")]

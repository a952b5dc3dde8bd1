"""The users side of the presence contract, on the memory, Redis and Redis Cluster brokers:
set_user's atomic (before, after) answer that decides joins and leaves, roll() across
processes, a SIGKILLed process's users expiring, and signal(): a presence event delivered
to a channel's subscribers without an offset or a place in history.

The `kit` fixture (and the Redis ones behind it) are the broker contract suite's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from echoserver.brokers.base import SIGNAL, Envelope, PresentUser
from tests.conftest import eventually, run
from tests.redis_cluster import clean_redis_cluster, redis_cluster
from tests.redis_server import redis_server
from tests.servers import ROOT
from tests.test_broker_contract import Kit, kit, publish, started

__all__ = ["clean_redis_cluster", "kit", "redis_cluster", "redis_server"]


def users(found: list[PresentUser]) -> list[tuple[str, int, object]]:
    return sorted((u.user, u.connections, u.info) for u in found)


def test_set_user_tells_arrival_and_departure(kit: Kit) -> None:
    async def scenario() -> list[tuple[int, int]]:
        broker, _ = await started(kit)
        p = broker.presence
        answers = [
            await p.set_user("c", "ann", 1, {"name": "Ann"}),  # arrives
            await p.set_user("c", "ann", 2, {"name": "Ann"}),  # a second tab
            await p.set_user("c", "ann", 0, {"name": "Ann"}),  # held (grace)
            await p.set_user("c", "ann", 0, None, present=False),  # gone
            await p.set_user("c", "ann", 0, None, present=False),  # gone already
        ]
        await broker.close()
        return answers

    assert run(scenario()) == [(0, 1), (1, 1), (1, 1), (1, 0), (0, 0)]


def test_roll_lists_users_and_members(kit: Kit) -> None:
    async def scenario() -> tuple[list[tuple[str, int, object]], int, list[PresentUser]]:
        broker, _ = await started(kit)
        p = broker.presence
        await p.set_local("c", 4)
        await p.set_user("c", "ann", 2, {"name": "Ann"})
        await p.set_user("c", "bob", 1, None)
        await p.set_user("d", "cid", 1, None)
        roll = await p.roll("c")
        await p.set_user("c", "bob", 0, None, present=False)
        await p.set_local("c", 0)
        await p.set_user("c", "ann", 0, None, present=False)
        empty = (await p.roll("c")).users
        await broker.close()
        return users(roll.users), roll.connections, empty

    found, connections, empty = run(scenario())
    assert found == [("ann", 2, {"name": "Ann"}), ("bob", 1, None)]
    assert connections == 4
    assert empty == []


def test_users_add_up_across_processes(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> list[object]:
        (a, _), (b, _) = await started(kit), await started(kit)
        seen: list[object] = [
            await a.presence.set_user("c", "ann", 1, {"n": 1}),
            await b.presence.set_user("c", "ann", 2, {"n": 1}),  # not an arrival
        ]
        await a.presence.set_local("c", 1)
        await b.presence.set_local("c", 3)
        roll = await b.presence.roll("c")
        seen.append((users(roll.users), roll.connections))
        seen.append(await a.presence.set_user("c", "ann", 0, None, present=False))
        seen.append(await b.presence.set_user("c", "ann", 0, None, present=False))  # departs
        await b.presence.set_user("c", "bob", 1, None)
        await b.close()  # a clean exit takes its users with it
        seen.append(users((await a.presence.roll("c")).users))
        await a.close()
        return seen

    assert run(scenario()) == [
        (0, 1),
        (1, 2),
        ([("ann", 3, {"n": 1})], 4),
        (2, 1),
        (1, 0),
        [],
    ]


def test_users_of_a_crashed_process_expire(kit: Kit) -> None:
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
            await broker.presence.set_user("c", "ann", 1, {{"from": "worker"}})
            await broker.presence.set_user("c", "bob", 1, None)
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

        async def scenario() -> tuple[list[object], list[object], tuple[int, int], float]:
            broker, _ = await started(kit)
            await broker.presence.set_user("c", "ann", 1, {"from": "here"})
            before = users((await broker.presence.roll("c")).users)
            worker.kill()  # no clean-up: like a crash
            killed = time.monotonic()

            async def only_ann_here() -> bool:
                return users((await broker.presence.roll("c")).users) == [
                    ("ann", 1, {"from": "here"})
                ]

            assert await eventually(only_ann_here, 3 * ttl + 2)
            elapsed = time.monotonic() - killed
            after = users((await broker.presence.roll("c")).users)
            # The worker's entry is gone: this process's leaving is the user's departure.
            gone = await broker.presence.set_user("c", "ann", 0, None, present=False)
            await broker.close()
            return before, after, gone, elapsed

        before, after, gone, elapsed = run(scenario())
        assert ("bob", 1, None) in before and len(before) == 2
        assert before[0][1] == 2  # ann: one connection on each process
        assert after == [("ann", 1, {"from": "here"})]
        assert gone == (1, 0)
        assert elapsed <= 3 * ttl + 2
    finally:
        worker.kill()
        worker.wait()


def test_signal_reaches_subscribers_without_an_offset(kit: Kit) -> None:
    async def scenario() -> tuple[list[tuple[bytes, int, str | None]], list[int]]:
        broker, recorder = await started(kit, history=10)
        await broker.subscribe("c")
        await publish(broker, Envelope("c", b"one", False))
        broker.signal(Envelope("c", b'{"type":"join"}', False, "#presence"))
        await publish(broker, Envelope("c", b"two", False))
        got = await recorder.wait("c", 3)
        kept = await broker.backlog("c", 0, 10)
        await broker.close()
        return [(e.data, e.seq, e.sender) for e in got], [e.seq for e in kept.envelopes]

    got, kept = run(scenario())
    assert got == [(b"one", 1, None), (b'{"type":"join"}', SIGNAL, "#presence"), (b"two", 2, None)]
    assert kept == [1, 2]


def test_signal_reaches_other_processes(kit: Kit) -> None:
    kit.need_shared()

    async def scenario() -> list[tuple[bytes, int]]:
        (a, _), (b, recorder) = await started(kit), await started(kit)
        await b.subscribe("c")
        a.signal(Envelope("c", b"left", False, "#presence"))
        got = await recorder.wait("c", 1)
        await a.close()
        await b.close()
        return [(e.data, e.seq) for e in got]

    assert run(scenario()) == [(b"left", SIGNAL)]

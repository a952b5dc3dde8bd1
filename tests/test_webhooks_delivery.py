"""Lifecycle webhooks end to end: a real server process POSTs to a receiver in the test (a
Tornado app on the test's loop, checking each request with the stock Standard Webhooks
library), through failures, a dead backend, and in process through the lifecycle holds."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import tornado.websocket

from echoserver.brokers import MemoryBroker
from echoserver.brokers.lifecycle import MemoryLedger
from echoserver.brokers.lifecycle_holds import MemoryHolds
from echoserver.config.webhooks import secret_bytes
from echoserver.fanout.hub import Hub
from echoserver.fanout.lifecycle import Lifecycle, TrackedPresence
from echoserver.fanout.presence import Roster
from echoserver.metrics import WebhookCounts
from echoserver.webhooks.events import Webhooks
from echoserver.webhooks.http import tornado_post
from echoserver.webhooks.sender import Bounds, Sender
from tests.conftest import eventually, metric, run
from tests.servers import ServerProcess
from tests.test_hub import Recorder
from tests.webhook_receiver import Receiver, new_secret


def hook_server(receiver: Receiver, *extra: str) -> ServerProcess:
    args = [
        "--mode", "broadcast", "--port", "0",
        "--webhooks-url", receiver.url, "--webhooks-secret", receiver.secret,
        "--webhooks-timeout", "0.5", "--webhooks-retry-initial", "0.05",
        "--webhooks-retry-max", "0.2",
        # channel_vacated waits presence_grace: none here, each visit is a pair of events
        "--presence-grace", "0", *extra,
    ]  # fmt: skip
    return ServerProcess(args)


async def started(server: ServerProcess) -> ServerProcess:
    return await asyncio.to_thread(server.wait_healthy)


async def visit(server: ServerProcess, channel: str) -> None:
    """One client joins the channel and leaves: occupied, then vacated."""
    conn = await tornado.websocket.websocket_connect(f"{server.ws_url}/ws/{channel}")
    conn.close()
    await asyncio.sleep(0.05)


def test_a_failing_receiver_still_gets_every_event_once_in_sequence() -> None:
    # The first request fails with 500, the second is processed but answered too late
    # (the sender times out and sends it again): every event arrives once all the same.
    receiver = Receiver(new_secret(), plan=("500", "slow"))

    async def scenario() -> None:
        receiver.start()
        server = await started(hook_server(receiver))
        try:
            for _ in range(2):
                for channel in ("a", "b", "c"):
                    await visit(server, channel)
            expected = [
                ("channel_occupied", 1),
                ("channel_vacated", 2),
                ("channel_occupied", 3),
                ("channel_vacated", 4),
            ]
            assert await eventually(
                lambda: all(receiver.of(ch) == expected for ch in "abc"), timeout=15
            ), (receiver.events, server.log())
            ids = [event["id"] for event in receiver.events]
            assert len(ids) == len(set(ids)) == 12
            # The same request came again after each failure, with the same webhook-id.
            assert receiver.attempts[0] == receiver.attempts[1] == receiver.attempts[2]
            assert receiver.duplicates >= 1
            event = receiver.events[0]
            assert set(event) == {"id", "type", "channel", "seq", "at"}
            assert abs(event["at"] - time.time()) < 30
            assert (
                await asyncio.to_thread(
                    metric, server, "echoserver_webhook_requests_total", outcome="500"
                )
                == 1
            )
            assert (
                await asyncio.to_thread(
                    metric, server, "echoserver_webhook_requests_total", outcome="timeout"
                )
                >= 1
            )
            assert await asyncio.to_thread(metric, server, "echoserver_webhook_events_sent_total")
        finally:
            await asyncio.to_thread(server.stop)
            receiver.stop()

    run(scenario(), timeout=40)


def test_events_within_the_window_share_a_request() -> None:
    receiver = Receiver(new_secret())

    async def scenario() -> None:
        receiver.start()
        server = await started(hook_server(receiver, "--webhooks-batch-window", "0.3"))
        try:
            conns = await asyncio.gather(
                *(
                    tornado.websocket.websocket_connect(f"{server.ws_url}/ws/room{i}")
                    for i in range(5)
                )
            )
            assert await eventually(lambda: len(receiver.events) == 5), receiver.events
            assert len(receiver.batches) == 1, receiver.batches
            for conn in conns:
                conn.close()
            assert await eventually(lambda: len(receiver.events) == 10)
        finally:
            await asyncio.to_thread(server.stop)
            receiver.stop()

    run(scenario(), timeout=30)


def test_a_dead_backend_costs_bounded_memory_and_counts_drops() -> None:
    # A receiver that always fails: the queue stays at its bound, the rest is counted.
    receiver = Receiver(new_secret(), plan=("500",) * 10000)

    async def scenario() -> None:
        receiver.start()
        server = await started(
            hook_server(
                receiver,
                "--webhooks-queue-size", "5", "--webhooks-max-batch", "2",
                "--webhooks-max-attempts", "1000", "--webhooks-batch-window", "0",
            )
        )  # fmt: skip
        try:
            for i in range(20):
                await visit(server, f"ch{i}")

            async def dropped() -> float:
                return await asyncio.to_thread(
                    metric, server, "echoserver_webhook_events_dropped_total", reason="queue_full"
                )

            # 40 events: at most 5 queued and 2 in flight, the rest dropped (the oldest).
            assert await eventually(lambda: _at_least(dropped(), 33)), server.log()
            queued = await asyncio.to_thread(metric, server, "echoserver_webhook_events_queued")
            assert queued <= 5
            assert receiver.events == []
            assert re.search(r"webhook events dropped: \d+ queue_full", server.log())
            # One warning per interval, however many were dropped.
            assert server.log().count("webhook events dropped") <= 2
        finally:
            await asyncio.to_thread(server.stop)
            receiver.stop()

    run(scenario(), timeout=40)


async def _at_least(value: Any, floor: float) -> bool:
    return (await value) >= floor


def test_user_events_are_sent_once_with_their_fields_and_unasked_kinds_leave_a_gap() -> None:
    # The lifecycle in process, on the memory holds, over a real HTTP request.
    receiver = Receiver(new_secret())

    async def scenario() -> None:
        receiver.start()
        counts = WebhookCounts()
        sender = Sender(
            receiver.url,
            secret_bytes(receiver.secret),
            tornado_post(),
            Bounds(batch_window=0.02, timeout=2),
            counts,
        )
        ledger = MemoryLedger()
        hooks = Webhooks(sender, ledger, ("user_online", "user_offline", "user_joined"))
        hooks.start()
        hub = Hub(MemoryBroker())
        watched = Lifecycle(hub, MemoryHolds(ledger), hooks, Roster(hub), grace=0)
        alice = {"name": "Alice"}
        try:
            began = time.time()
            watched.user_count("alice", alice, 1)
            watched.user_count("alice", alice, 2)  # a second tab: no event
            watched.roster_entry("room", "alice", alice, 1, True)
            watched.roster_entry("room", "alice", alice, 0, False)  # not asked for: a gap
            watched.roster_entry("room", "alice", None, 1, True)
            watched.user_count("alice", None, 0)
            watched.channel_count("room", 1)  # not asked for, nor its pair
            assert await eventually(lambda: len(receiver.events) == 4), receiver.events
            await asyncio.sleep(0.1)
            ended = time.time()
            shapes = [
                {k: v for k, v in e.items() if k not in ("id", "at")} for e in receiver.events
            ]
            assert shapes == [
                {"type": "user_online", "user": "alice", "seq": 1, "info": alice},
                {"type": "user_joined", "channel": "room", "user": "alice", "seq": 1,
                 "info": alice},
                {"type": "user_joined", "channel": "room", "user": "alice", "seq": 3},
                {"type": "user_offline", "user": "alice", "seq": 2, "info": alice},
            ]  # fmt: skip
            assert all(began - 0.001 <= e["at"] <= ended for e in receiver.events)
            assert len({e["id"] for e in receiver.events}) == 4
            assert counts.sent == 4 and counts.reports["owned"] == 5
        finally:
            await watched.close()
            await hooks.close(2.0)
            await hub.close()
            receiver.stop()

    run(scenario(), timeout=20)


def test_a_return_within_the_grace_is_no_event_and_a_leave_past_it_is_one() -> None:
    # The lifecycle on a real hub: occupied at once, vacated only after the grace.
    receiver = Receiver(new_secret())

    async def scenario() -> None:
        receiver.start()
        sender = Sender(
            receiver.url,
            secret_bytes(receiver.secret),
            tornado_post(),
            Bounds(batch_window=0.01, timeout=2),
            WebhookCounts(),
        )
        ledger = MemoryLedger()
        hooks = Webhooks(sender, ledger, ("channel_occupied", "channel_vacated"))
        hooks.start()
        hub = Hub(MemoryBroker())
        watched = Lifecycle(hub, MemoryHolds(ledger), hooks, Roster(hub), grace=0.3)
        hub.presence = TrackedPresence(hub.presence, watched)
        try:
            first, second = Recorder(hub), Recorder(hub)
            await hub.join("room", first)
            await hub.leave("room", first)
            await asyncio.sleep(0.1)
            await hub.join("room", second)  # back within the grace: no vacated
            await asyncio.sleep(0.5)
            assert receiver.of("room") == [("channel_occupied", 1)]
            left = time.time()
            await hub.leave("room", second)
            assert await eventually(lambda: len(receiver.events) == 2)
            assert receiver.of("room") == [("channel_occupied", 1), ("channel_vacated", 2)]
            # `at` is when the last member left, not when the grace ran out.
            assert abs(receiver.events[1]["at"] - left) < 0.1
        finally:
            await watched.close()
            await hooks.close(2.0)
            await hub.close()
            receiver.stop()

    run(scenario(), timeout=20)

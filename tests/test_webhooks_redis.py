"""Two server processes on one real Redis, both seeing the same channels fill and empty:
each lifecycle event reaches the backend once, not once per process."""

from __future__ import annotations

import asyncio

import pytest
import tornado.websocket

from tests.conftest import eventually, metric, run
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess
from tests.webhook_receiver import Receiver, new_secret

__all__ = ["redis_server"]

pytestmark = pytest.mark.redis

CHANNELS = [f"room{i}" for i in range(8)]


def test_two_processes_send_each_transition_once(redis_server: RedisServer) -> None:
    receiver = Receiver(new_secret())

    async def scenario() -> None:
        receiver.start()
        args = [
            "--mode", "broadcast", "--port", "0", "--broker", redis_server.url,
            "--webhooks-url", receiver.url, "--webhooks-secret", receiver.secret,
        ]  # fmt: skip
        servers = [ServerProcess(args), ServerProcess(args)]
        try:
            for server in servers:
                await asyncio.to_thread(server.wait_healthy)
            # A member of every channel on each process: both processes report every
            # channel occupied (the second joiner's process sees a count above 0 too).
            conns = [
                await tornado.websocket.websocket_connect(f"{server.ws_url}/ws/{channel}")
                for channel in CHANNELS
                for server in servers
            ]
            assert await eventually(lambda: len(receiver.events) == len(CHANNELS), timeout=10)
            # Everyone leaves at once: both processes may see a channel reach 0.
            for conn in conns:
                conn.close()
            assert await eventually(lambda: len(receiver.events) >= 2 * len(CHANNELS), timeout=10)
            await asyncio.sleep(0.5)  # a duplicate would arrive by now
            for channel in CHANNELS:
                assert receiver.of(channel) == [
                    ("channel_occupied", 1),
                    ("channel_vacated", 2),
                ], (channel, receiver.events)
            assert receiver.duplicates == 0
            sent = [
                await asyncio.to_thread(metric, s, "echoserver_webhook_events_sent_total")
                for s in servers
            ]
            assert sum(sent) == 2 * len(CHANNELS), sent
            # Both processes wrote their entries; the write that moved the ledger owns each.
            for outcome, low in (("owned", 2 * len(CHANNELS)), ("unchanged", len(CHANNELS))):
                counts = [
                    await asyncio.to_thread(
                        metric, s, "echoserver_webhook_reports_total", outcome=outcome
                    )
                    for s in servers
                ]
                assert sum(counts) >= low, (outcome, counts)
            owned = [
                await asyncio.to_thread(
                    metric, s, "echoserver_webhook_reports_total", outcome="owned"
                )
                for s in servers
            ]
            assert sum(owned) == 2 * len(CHANNELS), owned
        finally:
            for server in servers:
                await asyncio.to_thread(server.stop)
            receiver.stop()

    run(scenario(), timeout=40)

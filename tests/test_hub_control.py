"""The hub's control channel (what carries the user API's disconnect between processes):
delivered to every listener, kept in no history, never a client's channel."""

from __future__ import annotations

import re

from echoserver import routes
from echoserver.brokers import MemoryBroker
from echoserver.fanout.hub import CONTROL_CHANNEL, Hub
from tests.conftest import run


def test_control_messages_reach_the_listener_and_are_not_kept() -> None:
    async def scenario() -> tuple[list[bytes], int]:
        hub = Hub(MemoryBroker(), history=10)
        hub.keep_history(lambda channel, default: default)
        got: list[bytes] = []
        await hub.listen(got.append)
        hub.control(b'{"disconnect": "alice"}')
        hub.control(b'{"disconnect": "bob"}')
        backlog = await hub.broker.backlog(CONTROL_CHANNEL, 0, 10)
        await hub.close()
        return got, len(backlog.envelopes)

    got, kept = run(scenario())
    assert got == [b'{"disconnect": "alice"}', b'{"disconnect": "bob"}']
    assert kept == 0


def test_no_client_can_name_the_control_channel() -> None:
    assert not re.fullmatch(routes.CHANNEL_PATTERN, CONTROL_CHANNEL)

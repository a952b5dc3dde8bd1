"""Presence in the channels a connection follows beyond its URL's: a mixed-mode subscribe
arrives in the channel's presence (its join_leave members hear the join, with its channel),
an unsubscribe or a close departs, and a multi-channel event stream gets the joins and
leaves of each of its channels as `event: join`/`leave` with no id, between numbered events
whose cursor they leave alone.

Real `python -m echoserver` processes on the memory broker; Tornado WebSocket clients and
a raw HTTP/1.0 event-stream reader over loopback.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.websocket import websocket_connect

from tests.conftest import run
from tests.test_presence_join_leave import (
    GRACE,
    Client,
    EventStream,
    api,
    connect,
    expect,
    join,
    leave,
    marker,
    start,
    token,
)


async def ask(client: Client, **request: Any) -> dict[str, Any]:
    """Send a request and return the next notice that is not a join, leave or broadcast."""
    await client.ws.write_message(json.dumps(request))
    while True:
        message = await asyncio.wait_for(client.ws.read_message(), 10)
        assert message is not None, "closed"
        body = json.loads(message)
        if body["type"] not in ("join", "leave", "broadcast", "broadcastResult"):
            return dict(body)


def test_a_subscribe_joins_and_an_unsubscribe_or_close_leaves() -> None:
    server = start("--mode", "mixed")

    async def scenario() -> None:
        bob = await connect(server, "room.a", "bob")
        await expect(bob, join("bob", "room.a"))
        ann = await connect(server, "lobby", "ann")  # lobby announces nothing
        assert (await ask(ann, type="subscribe", channel="room.a"))["type"] == "subscribed"
        await expect(ann, join("ann", "room.a"))
        await expect(bob, join("ann", "room.a"))
        users = [u["user"] for u in (await api(server, "room.a"))["users"]]
        assert users == ["ann", "bob"]
        # A second subscription of ann's, on another connection: not a second join.
        tab = await connect(server, "lobby", "ann")
        assert (await ask(tab, type="subscribe", channel="room.a"))["type"] == "subscribed"
        assert (await ask(tab, type="unsubscribe", channel="room.a"))["type"] == "unsubscribed"
        assert (await ask(ann, type="unsubscribe", channel="room.a"))["type"] == "unsubscribed"
        await expect(bob, leave("ann", "room.a"))  # once the grace is over
        assert [u["user"] for u in (await api(server, "room.a"))["users"]] == ["bob"]
        # Subscribed, then the connection closes: a leave too, and only one.
        assert (await ask(ann, type="subscribe", channel="room.a"))["type"] == "subscribed"
        await expect(bob, join("ann", "room.a"))
        ann.close()
        tab.close()
        await expect(bob, leave("ann", "room.a"))
        await asyncio.sleep(GRACE * 1.5)
        await bob.marker("after")
        await expect(bob, marker("after", "room.a"))
        body = await api(server, "room.a")
        assert [u["user"] for u in body["users"]] == ["bob"] and body["connections"] == 1
        bob.close()

    try:
        run(scenario())
    finally:
        server.stop()


def test_a_multi_channel_stream_gets_each_channels_joins_without_an_id() -> None:
    server = start("--mode", "mixed")

    async def scenario() -> list[tuple[str, str, str | None]]:
        stream = await EventStream.open(server, "/sse?channel=room.a&channel=room.b")
        got: list[tuple[str, str, str | None]] = []

        async def next_event() -> None:
            while True:
                chunk = await asyncio.wait_for(stream.reader.readuntil(b"\n\n"), 10)
                lines = chunk.decode().strip("\n").split("\n")
                fields = dict(line.split(": ", 1) for line in lines if not line.startswith(":"))
                if "data" in fields:
                    got.append((fields.get("event", "message"), fields["data"], fields.get("id")))
                    return

        ann = await websocket_connect(f"{server.ws_url}/ws/room.b?token={token('ann')}")
        await next_event()
        ann.write_message(json.dumps({"type": "broadcast", "payload": 1}))
        await next_event()
        ann.close()
        await next_event()
        stream.close()
        return got

    try:
        got = run(scenario())
    finally:
        server.stop()
    assert [(name, event_id) for name, _, event_id in got[::2]] == [("join", None), ("leave", None)]
    assert [json.loads(data) for _, data, _ in got[::2]] == [
        join("ann", "room.b"),
        leave("ann", "room.b"),
    ]
    name, data, event_id = got[1]
    message = json.loads(data)
    assert name == "message" and message["channel"] == "room.b" and message["payload"] == 1
    assert event_id == f"room.b:{message['epoch']}:1"  # the joins left the cursor alone

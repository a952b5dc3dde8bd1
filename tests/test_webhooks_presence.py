"""Presence to webhooks end to end: a real server process whose Roster decides a user's
join and leave (a WebSocket URL, a mixed-mode subscribe) reports user_joined/user_left,
once per user however many tabs, the leave after presence_grace; channel_occupied/vacated
beside them, every event of the channel numbered in one sequence and signature-checked by
the test's receiver (the stock Standard Webhooks library)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import tornado.websocket

from tests.conftest import eventually, run
from tests.servers import ServerProcess
from tests.webhook_receiver import Receiver, new_secret

SECRET = "a-secret-of-more-than-thirty-two-bytes-for-hs256"
GRACE = 0.5


def token(sub: str) -> str:
    claims = {"sub": sub, "info": {"name": sub.title()}, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, "HS256")


def test_users_joining_and_leaving_are_reported_once_and_in_sequence() -> None:
    receiver = Receiver(new_secret())

    async def scenario() -> None:
        receiver.start()
        server = ServerProcess(
            ["--mode", "mixed", "--port", "0", "--auth-jwt-secret", SECRET, "--auth-anonymous",
             "--presence-grace", str(GRACE), "--webhooks-url", receiver.url,
             "--webhooks-secret", receiver.secret, "--webhooks-events",
             "channel_occupied,channel_vacated,user_joined,user_left"]
        )  # fmt: skip
        try:
            await asyncio.to_thread(server.wait_healthy)
            url = f"{server.ws_url}/ws/room?token={token('ann')}"
            ann = await tornado.websocket.websocket_connect(url)
            tab = await tornado.websocket.websocket_connect(url)  # a second tab: no event
            bob = await tornado.websocket.websocket_connect(
                f"{server.ws_url}/ws/lobby?token={token('bob')}"
            )
            bob.write_message(json.dumps({"type": "subscribe", "channel": "room"}))
            assert json.loads(await bob.read_message())["type"] == "subscribed"

            def of_room() -> list[tuple[str, str | None]]:
                return [
                    (e["type"], e.get("user")) for e in receiver.events if e["channel"] == "room"
                ]

            assert await eventually(lambda: len(of_room()) == 3, timeout=10), receiver.events
            ann.close()
            tab.close()
            bob.write_message(json.dumps({"type": "unsubscribe", "channel": "room"}))
            assert await eventually(lambda: len(of_room()) == 6, timeout=10), receiver.events
            await asyncio.sleep(GRACE * 2)  # nothing more comes
            events = [e for e in receiver.events if e["channel"] == "room"]
            assert [e["seq"] for e in events] == list(range(1, 7))
            assert of_room()[0] == ("channel_occupied", None)
            assert sorted(of_room()[1:3], key=str) == [
                ("user_joined", "ann"),
                ("user_joined", "bob"),
            ]
            assert sorted(of_room()[3:5], key=str) == [("user_left", "ann"), ("user_left", "bob")]
            assert of_room()[5] == ("channel_vacated", None)
            joined: dict[str, Any] = {e["user"]: e for e in events if e["type"] == "user_joined"}
            assert joined["ann"]["info"] == {"name": "Ann"}
            assert receiver.duplicates == 0
            bob.close()
        finally:
            server.stop()
            receiver.stop()

    run(scenario(), timeout=30)

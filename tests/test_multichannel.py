"""Many channels on one mixed-mode connection (issue 21, part 1): subscribe/unsubscribe,
the channel in every envelope, exact recovery of each channel after a reconnect,
websocket.max_subscriptions, the identity's rights per subscribe, and the hub with one
subscriber in several channels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.brokers.memory import MemoryBroker
from echoserver.config import Settings
from echoserver.config.settings import NamespaceSettings
from echoserver.fanout.hub import Hub
from tests.authkeys import SECRET, mint
from tests.conftest import make_settings, run
from tests.redis_server import RedisServer, redis_server
from tests.test_hub import Recorder

__all__ = ["redis_server"]  # the fixture

KEY = "multichannel-key"


async def connect(port: int, path: str = "/ws/a", token: str | None = None) -> Any:
    query = "" if token is None else ("&" if "?" in path else "?") + f"token={token}"
    return await websocket_connect(
        HTTPRequest(f"ws://127.0.0.1:{port}{path}{query}", request_timeout=5)
    )


async def read(client: WebSocketClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    message = await asyncio.wait_for(client.read_message(), timeout)
    assert message is not None, f"closed ({client.close_code})"
    return json.loads(message)


async def ask(client: WebSocketClientConnection, **request: Any) -> dict[str, Any]:
    await client.write_message(json.dumps(request))
    return await read(client)


async def nothing_more(client: WebSocketClientConnection) -> None:
    """Nothing is queued for the client: an echo comes back next."""
    assert await ask(client, type="echo", payload="mark") == {"type": "echo", "payload": "mark"}


async def members(port: int, channel: str) -> int:
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/channels/{channel}")
    return int(json.loads(response.body)["members"])


async def until(check: Any, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


class TestSubscribe:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(mode="mixed", **{"websocket.max_subscriptions": 3})

    @pytest.mark.gen_test(timeout=20)
    async def test_subscribe_broadcast_unsubscribe_each_envelope_says_its_channel(
        self, http_server: Any, http_port: int
    ) -> None:
        client = await connect(http_port, "/ws/a")
        other = await connect(http_port, "/ws/b")
        assert await ask(client, type="subscribe", channel="b") == {
            "type": "subscribed",
            "channel": "b",
            "recovered": None,
            "since": None,
            "first": None,
            "epoch": None,
            "count": 0,
            "last": None,
        }
        await client.write_message(json.dumps({"type": "broadcast", "channel": "b", "payload": 1}))
        envelope = await read(client)
        epoch_b = envelope["epoch"]
        assert envelope == {
            "type": "broadcast",
            "channel": "b",
            "payload": 1,
            "offset": 1,
            "epoch": epoch_b,
        }
        assert await read(other) == envelope
        assert await read(client) == {
            "type": "broadcastResult",
            "channel": "b",
            "payload": 1,
            "listenCount": 2,
            "offset": 1,
            "epoch": epoch_b,
        }
        # No "channel": the URL's, as the shootout protocol has it.
        await client.write_message(json.dumps({"type": "broadcast", "payload": 2}))
        on_a = await read(client)
        assert on_a == {
            "type": "broadcast",
            "channel": "a",
            "payload": 2,
            "offset": 1,
            "epoch": on_a["epoch"],
        }
        assert (await read(client))["channel"] == "a"
        # The other member's broadcast on b reaches it, with b's numbering.
        await other.write_message(json.dumps({"type": "broadcast", "payload": 3}))
        assert [(await read(other))["type"] for _ in range(2)] == ["broadcast", "broadcastResult"]
        assert await read(client) == {
            "type": "broadcast",
            "channel": "b",
            "payload": 3,
            "offset": 2,
            "epoch": epoch_b,
        }
        assert await ask(client, type="unsubscribe", channel="b") == {
            "type": "unsubscribed",
            "channel": "b",
        }
        await other.write_message(json.dumps({"type": "broadcast", "payload": 4}))
        assert (await read(other))["type"] == "broadcast"
        assert (await read(other))["listenCount"] == 1
        await nothing_more(client)
        client.close()
        other.close()

    @pytest.mark.gen_test(timeout=20)
    async def test_what_is_refused_gets_an_error_and_the_connection_stays(
        self, http_server: Any, http_port: int
    ) -> None:
        client = await connect(http_port, "/ws/a")
        answers = [
            await ask(client, type="subscribe", channel="a"),
            await ask(client, type="subscribe", channel="bad/name"),
            await ask(client, type="subscribe"),
            await ask(client, type="subscribe", channel="x", since=-1),
            await ask(client, type="subscribe", channel="x", since=True),
            await ask(client, type="unsubscribe", channel="y"),
            await ask(client, type="broadcast", channel="y", payload=1),
            await ask(client, type="broadcast", channel=7, payload=1),
        ]
        assert all(answer["type"] == "error" for answer in answers), answers
        assert answers[0] == {"type": "error", "error": "already subscribed to a", "channel": "a"}
        assert answers[5]["channel"] == "y" and "not subscribed" in answers[5]["error"]
        assert answers[6]["channel"] == "y" and "not subscribed" in answers[6]["error"]
        # At most max_subscriptions (3) channels, the URL's counted: two more, then no.
        assert (await ask(client, type="subscribe", channel="b"))["type"] == "subscribed"
        assert (await ask(client, type="subscribe", channel="c"))["type"] == "subscribed"
        assert await ask(client, type="subscribe", channel="d") == {
            "type": "error",
            "error": "at most 3 channels per connection",
            "channel": "d",
        }
        assert (await ask(client, type="unsubscribe", channel="a"))["type"] == "unsubscribed"
        assert (await ask(client, type="subscribe", channel="d"))["type"] == "subscribed"
        # Its URL channel left, a broadcast without "channel" is refused like any other.
        assert (await ask(client, type="broadcast", payload=1))["type"] == "error"
        await nothing_more(client)
        client.close()

    @pytest.mark.gen_test(timeout=20)
    async def test_a_closed_connection_leaves_every_channel(
        self, http_server: Any, http_port: int
    ) -> None:
        client = await connect(http_port, "/ws/a")
        for channel in ("b", "c"):
            assert (await ask(client, type="subscribe", channel=channel))["type"] == "subscribed"
        assert [await members(http_port, c) for c in "abc"] == [1, 1, 1]
        client.close()

        async def empty() -> bool:
            return [await members(http_port, c) for c in "abc"] == [0, 0, 0]

        assert await until(empty)


class TestRecovery:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(mode="mixed", **{"broadcast.history": 1000, "api.key": KEY})

    @pytest.mark.gen_test(timeout=30)
    async def test_three_channels_each_recovered_exactly_after_a_reconnect(
        self, http_server: Any, http_port: int
    ) -> None:
        channels = ("a", "b", "c")
        publisher = await connect(http_port, "/ws/a")
        for channel in channels[1:]:
            await ask(publisher, type="subscribe", channel=channel)

        async def publish(count: int, start: int) -> None:
            for n in range(start, start + count):
                channel = channels[n % 3]
                message = {"type": "broadcast", "channel": channel, "payload": n}
                await publisher.write_message(json.dumps(message))
            seen = 0
            while seen < count:  # the publisher's own copies and results
                if (await read(publisher))["type"] == "broadcastResult":
                    seen += 1

        client = await connect(http_port, "/ws/a")
        for channel in channels[1:]:
            await ask(client, type="subscribe", channel=channel)
        await publish(300, 0)
        got: dict[str, list[Any]] = {c: [] for c in channels}
        last: dict[str, int] = {}
        epochs: dict[str, str] = {}
        for _ in range(300):
            envelope = await read(client)
            assert envelope["type"] == "broadcast", envelope
            got[envelope["channel"]].append(envelope["payload"])
            last[envelope["channel"]] = envelope["offset"]
            epochs[envelope["channel"]] = envelope["epoch"]
        client.close()
        await publish(700, 300)  # 1000 messages in all, 700 of them while it is away

        back = await connect(http_port, f"/ws/a?since={last['a']}&epoch={epochs['a']}")
        recovery = await read(back)
        assert recovery == {
            "type": "recovery",
            "channel": "a",
            "recovered": True,
            "since": last["a"],
            "first": last["a"] + 1,
            "epoch": epochs["a"],
        }
        notices = [recovery]
        for channel in channels[1:]:
            since, epoch = last[channel], epochs[channel]
            subscribe = {"type": "subscribe", "channel": channel, "since": since, "epoch": epoch}
            await back.write_message(json.dumps(subscribe))
        while len(notices) < 3 or sum(len(v) for v in got.values()) < 1000:
            message = await read(back)
            if message["type"] == "broadcast":
                got[message["channel"]].append(message["payload"])
            else:
                notices.append(message)
        for channel, notice in zip(channels, notices, strict=True):
            assert notice["channel"] == channel and notice["recovered"] is True, notice
            assert notice["first"] == last[channel] + 1
            assert notice["epoch"] == epochs[channel]
        for index, channel in enumerate(channels):
            assert got[channel] == list(range(index, 1000, 3)), channel
        await nothing_more(back)
        back.close()
        publisher.close()

    @pytest.mark.gen_test(timeout=20)
    async def test_a_subscribe_since_from_another_epoch_is_not_recovered(
        self, http_server: Any, http_port: int
    ) -> None:
        publisher = await connect(http_port, "/ws/e")
        for n in range(3):
            await publisher.write_message(json.dumps({"type": "broadcast", "payload": n}))
        results = [await read(publisher) for _ in range(6)]
        epoch = next(r["epoch"] for r in results if r["type"] == "broadcastResult")
        client = await connect(http_port, "/ws/a")
        subscribed = await ask(client, type="subscribe", channel="e", since=2, epoch=epoch + "x")
        assert subscribed == {
            "type": "subscribed",
            "channel": "e",
            "recovered": False,
            "since": 2,
            "first": 1,
            "epoch": epoch,
            "count": 3,
            "last": 3,
        }
        assert [(await read(client))["payload"] for _ in range(3)] == [0, 1, 2]
        again = await ask(client, type="subscribe", channel="f", since=1, epoch="no:colon")
        assert again["type"] == "error" and again["channel"] == "f"
        await nothing_more(client)
        client.close()
        publisher.close()


NAMESPACES = (
    NamespaceSettings("user.{sub}", subscribe="user", publish="api"),
    NamespaceSettings("chat.*", subscribe="user"),
    NamespaceSettings("vip.*", subscribe="claim", publish="claim"),
    NamespaceSettings("dash.*", subscribe="anyone", publish="api"),
)
ALICE = {"sub": "alice", "channels": ["vip.gold"], "publish": ["vip.gold", "vip.news"]}


class TestRights:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(
            mode="mixed",
            namespaces=NAMESPACES,
            **{"auth.jwt_secret": (SECRET,), "auth.anonymous": True},
        )

    @pytest.mark.gen_test(timeout=20)
    async def test_each_subscribe_and_broadcast_is_checked_against_the_rights(
        self, http_server: Any, http_port: int
    ) -> None:
        guest = await connect(http_port, "/ws/free")
        alice = await connect(http_port, "/ws/free", token=mint(**ALICE))
        cases = [
            (guest, "chat.room", False),  # for users
            (guest, "dash.main", True),
            (alice, "chat.room", True),
            (alice, "vip.gold", True),  # her channels claim
            (alice, "vip.silver", False),
            (alice, "user.alice", True),  # her own
            (alice, "user.bob", False),
        ]
        for client, channel, allowed in cases:
            answer = await ask(client, type="subscribe", channel=channel)
            expected = "subscribed" if allowed else "error"
            assert answer["type"] == expected and answer["channel"] == channel, answer
            if not allowed:
                assert answer["error"] == f"not allowed to join {channel}"
        publishes = [
            (guest, "dash.main", False),  # publish = api: members may not
            (alice, "user.alice", False),  # publish = api
            (alice, "chat.room", True),  # a member
            (alice, "vip.news", True),  # not a member, but her publish claim has it
            (alice, "vip.silver", False),  # neither
            (guest, "chat.room", False),  # not a member
        ]
        for client, channel, allowed in publishes:
            answer = await ask(client, type="broadcast", channel=channel, payload="p")
            if allowed and answer["type"] == "broadcast":  # its own copy first
                answer = await read(client)
            expected = "broadcastResult" if allowed else "error"
            assert answer["type"] == expected and answer["channel"] == channel, (channel, answer)
        # A refresh whose token no longer opens a subscribed channel is refused.
        narrower = mint(sub="alice", channels=[], publish=[])
        answer = await ask(alice, type="refresh", token=narrower)
        assert answer == {"type": "error", "error": "the new token does not allow vip.gold"}
        await nothing_more(guest)
        await nothing_more(alice)
        guest.close()
        alice.close()


def test_one_subscriber_in_several_channels_gets_each_once_under_one_cap() -> None:
    async def scenario() -> tuple[Recorder, Recorder, Hub]:
        hub = Hub(MemoryBroker(), max_queue_bytes=250, slow_client="disconnect")
        many, slow = Recorder(hub), Recorder(hub, reads=False)
        for channel in ("a", "b", "c"):
            await hub.join(channel, many)
            await hub.join(channel, slow)
        for n in range(6):
            hub.publish("abc"[n % 3], b"%099d" % n, False, None)
        await hub.leave("a", slow)  # still in b and c: the same slow episode
        hub.publish("b", b"%099d" % 6, False, None)
        return many, slow, hub

    many, slow, hub = run(scenario())
    assert many.got == [b"%099d" % n for n in range(7)]
    assert slow.got == [b"%099d" % n for n in range(2)]  # the cap's worth, all channels
    assert slow.closed
    assert sum(stats.slow_disconnects for stats in hub.stats.values()) == 1


@pytest.mark.redis
def test_three_channels_recovered_across_two_processes_sharing_redis(
    run_server: Any, redis_server: RedisServer
) -> None:
    """Away from one server during 1000 messages on three channels, back on the other with a
    since per channel: each channel's messages once, in order, recovered."""
    servers = [
        run_server("--mode", "mixed", "--broker", redis_server.url, "--history", "2000")
        for _ in "12"
    ]
    channels = ("x", "y", "z")
    total = 1000

    async def follow(port: int, since: dict[str, int] | None = None) -> Any:
        query = "" if since is None else f"?since={since['x']}"
        client = await connect(port, f"/ws/x{query}")
        for channel in channels[1:]:
            request: dict[str, Any] = {"type": "subscribe", "channel": channel}
            if since is not None:
                request["since"] = since[channel]
            await client.write_message(json.dumps(request))
        return client

    async def publish_all(publisher: WebSocketClientConnection) -> None:
        for n in range(total):
            message = {"type": "broadcast", "channel": channels[n % 3], "payload": n}
            await publisher.write_message(json.dumps(message))
            while (await read(publisher, 10))["type"] != "broadcastResult":
                pass

    async def scenario() -> tuple[dict[str, list[Any]], list[dict[str, Any]], dict[str, int]]:
        reader = await follow(servers[0].port)
        publisher = await follow(servers[1].port)
        for client in (reader, publisher):  # their two subscribed notices first
            assert [(await read(client))["type"] for _ in range(2)] == ["subscribed"] * 2
        publishing = asyncio.ensure_future(publish_all(publisher))
        got: dict[str, list[Any]] = {c: [] for c in channels}
        offsets: dict[str, list[int]] = {c: [] for c in channels}
        for _ in range(300):
            message = await read(reader, 10)
            got[message["channel"]].append(message["payload"])
            offsets[message["channel"]].append(message["offset"])
        reader.close()
        await asyncio.sleep(0.3)  # away while messages go on
        last = {c: offsets[c][-1] if offsets[c] else 0 for c in channels}
        back = await follow(servers[1].port, last)
        notices = []
        for _ in range(total * 2):
            if sum(len(v) for v in got.values()) == total and len(notices) == 3:
                break
            message = await read(back, 10)
            if message["type"] == "broadcast":
                got[message["channel"]].append(message["payload"])
                offsets[message["channel"]].append(message["offset"])
            else:
                notices.append(message)
        await asyncio.wait_for(publishing, 60)
        back.close()
        publisher.close()
        for channel in channels:
            assert offsets[channel] == list(range(1, len(offsets[channel]) + 1)), channel
        return got, notices, last

    got, notices, last = run(scenario(), timeout=120)
    assert [(n["type"], n["channel"], n["recovered"]) for n in notices] == [
        ("recovery", "x", True),
        ("subscribed", "y", True),
        ("subscribed", "z", True),
    ]
    assert [n["since"] for n in notices] == [last[c] for c in channels]
    for index, channel in enumerate(channels):
        assert got[channel] == list(range(index, total, 3)), channel

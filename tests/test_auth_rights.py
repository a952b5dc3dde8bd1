"""Namespaces: who may join (anyone, user, claim, a personal channel) on WebSocket and SSE,
who may publish (members, claim, api) in broadcast and mixed mode, the per-namespace
history, and the user API's messages to a personal channel."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.config import Settings
from echoserver.config.settings import NamespaceSettings
from tests.authkeys import SECRET, mint
from tests.conftest import make_settings

KEY = "api-key"
NAMESPACES = (
    NamespaceSettings("user.{sub}", subscribe="user", publish="api"),
    NamespaceSettings("chat.*", subscribe="user"),
    NamespaceSettings("vip.*", subscribe="claim", publish="claim"),
    NamespaceSettings("dash.*", subscribe="anyone", publish="api"),
    NamespaceSettings("hist.*", history=3),
)
ALICE = {"sub": "alice", "channels": ["vip.gold"], "publish": ["vip.gold"]}
BOB = {"sub": "bob", "channels": ["vip.*"]}


def settings_for(mode: str) -> Settings:
    return make_settings(
        mode=mode,
        namespaces=NAMESPACES,
        **{"auth.jwt_secret": (SECRET,), "auth.anonymous": True, "api.key": KEY},
    )


def token_of(who: dict[str, Any] | None) -> str | None:
    return None if who is None else mint(**who)


async def join(port: int, channel: str, who: dict[str, Any] | None) -> WebSocketClientConnection:
    token = token_of(who)
    query = f"?token={token}" if token else ""
    return await websocket_connect(
        HTTPRequest(f"ws://127.0.0.1:{port}/ws/{channel}{query}", request_timeout=5)
    )


async def ws_status(port: int, channel: str, who: dict[str, Any] | None) -> int:
    try:
        client = await join(port, channel, who)
    except HTTPClientError as error:
        return error.code
    client.close()
    return 101


async def sse_status(port: int, channel: str, who: dict[str, Any] | None) -> int:
    """The stream's status; 200 when it opened (and stayed open until we let go)."""
    token = token_of(who)
    opened: list[bytes] = []
    request = HTTPRequest(
        f"http://127.0.0.1:{port}/sse/{channel}" + (f"?token={token}" if token else ""),
        streaming_callback=opened.append,
        request_timeout=0.3,
    )
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except HTTPClientError as timeout:  # a stream that stays open runs into the timeout
        assert timeout.code == 599 and opened
        return 200
    return response.code


async def post_user(port: int, sub: str, body: bytes) -> tuple[int, dict[str, Any]]:
    response = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/users/{sub}/messages",
        method="POST",
        body=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
        raise_error=False,
    )
    return response.code, json.loads(response.body)


async def post_channel(port: int, channel: str, body: bytes) -> int:
    response = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/channels/{channel}/messages",
        method="POST",
        body=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
        raise_error=False,
    )
    return response.code


JOINS = [
    # channel, who, allowed
    ("free", None, True),  # in no namespace: today's rules
    ("dash.main", None, True),  # anyone
    ("chat.room", None, False),  # user: a guest is not one
    ("chat.room", ALICE, True),
    ("vip.gold", ALICE, True),  # claim: her channels claim has it
    ("vip.silver", ALICE, False),
    ("vip.silver", BOB, True),
    ("vip.gold", None, False),
    ("user.alice", ALICE, True),  # her own
    ("user.bob", ALICE, False),  # another user's
    ("user.alice", None, False),
]


class TestJoins:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("broadcast")

    @pytest.mark.gen_test(timeout=30)
    async def test_each_subscribe_rule_on_websocket_and_sse(self, http_server: Any, http_port):
        for channel, who, allowed in JOINS:
            case = (channel, who and who["sub"])
            assert await ws_status(http_port, channel, who) == (101 if allowed else 403), case
            assert await sse_status(http_port, channel, who) == (200 if allowed else 403), case


class TestBroadcastPublishing:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("broadcast")

    @pytest.mark.gen_test(timeout=30)
    async def test_a_refused_publish_closes_the_sender_with_1008_and_nobody_else(
        self, http_server: Any, http_port: int
    ) -> None:
        reader = await join(http_port, "dash.main", None)
        writer = await join(http_port, "dash.main", ALICE)
        writer.write_message("from a member")
        assert await writer.read_message() is None
        assert (writer.close_code, writer.close_reason) == (1008, "not allowed to publish")
        # The channel is the API's: it publishes, and the reader hears only that.
        assert await post_channel(http_port, "dash.main", b"from the api") == 200
        assert await reader.read_message() == "from the api"
        reader.close()

    @pytest.mark.gen_test(timeout=30)
    async def test_the_publish_claim_opens_a_claim_channel(self, http_server: Any, http_port):
        alice = await join(http_port, "vip.gold", ALICE)  # her publish claim has vip.gold
        bob = await join(http_port, "vip.gold", BOB)  # his has nothing
        alice.write_message("hello")
        assert await alice.read_message() == "hello"
        assert await bob.read_message() == "hello"
        bob.write_message("me too")
        assert await bob.read_message() is None and bob.close_code == 1008
        alice.close()

    @pytest.mark.gen_test(timeout=30)
    async def test_members_publish_on_members_channels(self, http_server: Any, http_port: int):
        alice = await join(http_port, "chat.room", ALICE)
        other = await join(http_port, "chat.room", {"sub": "carol"})
        other.write_message("hi")
        assert await alice.read_message() == "hi"
        alice.close()
        other.close()


class TestMixedPublishing:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("mixed")

    @pytest.mark.gen_test(timeout=30)
    async def test_a_refused_publish_is_an_error_and_the_connection_stays(
        self, http_server: Any, http_port: int
    ) -> None:
        alice = await join(http_port, "dash.main", ALICE)
        alice.write_message(json.dumps({"type": "broadcast", "payload": "x"}))
        answer = json.loads(await alice.read_message())  # type: ignore[arg-type]
        assert answer == {
            "type": "error",
            "error": "not allowed to publish on dash.main",
            "channel": "dash.main",
        }
        alice.write_message(json.dumps({"type": "echo", "payload": "still here"}))
        assert json.loads(await alice.read_message())["payload"] == "still here"  # type: ignore[arg-type]
        alice.close()


class TestNamespaceHistory:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("broadcast")  # broadcast.history is 0: only hist.* keeps any

    @pytest.mark.gen_test(timeout=30)
    async def test_a_namespace_keeps_its_own_history(self, http_server: Any, http_port: int):
        for channel in ("hist.a", "free"):
            for n in range(5):
                assert await post_channel(http_port, channel, b"m%d" % n) == 200
        late = await join(http_port, "hist.a", None)
        assert [await late.read_message() for _ in range(3)] == ["m2", "m3", "m4"]
        free = await join(http_port, "free", None)
        assert await post_channel(http_port, "free", b"live") == 200
        assert await free.read_message() == "live"  # nothing replayed before it
        late.close()
        free.close()


class TestPersonalChannels:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("broadcast")

    @pytest.mark.gen_test(timeout=30)
    async def test_a_user_message_reaches_every_connection_of_that_user_only(
        self, http_server: Any, http_port: int
    ) -> None:
        tabs = [await join(http_port, "user.alice", ALICE) for _ in range(2)]
        bob = await join(http_port, "user.bob", BOB)
        status, body = await post_user(http_port, "alice", b"for alice")
        assert (status, body["channel"], body["offset"]) == (200, "user.alice", 1)
        assert body["local_receivers"] == 2
        assert [await tab.read_message() for tab in tabs] == ["for alice", "for alice"]
        assert (await post_user(http_port, "bob", b"for bob"))[0] == 200
        assert await bob.read_message() == "for bob"  # bob had nothing before it
        # A sub that cannot be part of a channel name has no personal channel.
        assert (await post_user(http_port, "a%20b", b"x"))[0] == 400
        for client in (*tabs, bob):
            client.close()

"""The publish API, POST /api/channels/<channel>/messages: every refusal has its status,
and what it publishes reaches members like a member's own broadcast.

Most tests drive an in-process app through pytest-tornado; the last ones run a real
`python -m echoserver` and speak to it with urllib, as a backend would.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any
from unittest.mock import ANY  # a wildcard for an epoch

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver import config
from echoserver.brokers import BrokerUnavailable, Envelope, MemoryBroker
from echoserver.config import Settings
from echoserver.web.app import make_app
from tests.conftest import make_settings, metric, wait_until
from tests.redis_server import redis_server
from tests.servers import run_once

__all__ = ["redis_server"]  # the fixture

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY = "s3cr3t-key"


def settings_for(mode: str = "broadcast", **changes: Any) -> Settings:
    return make_settings(
        mode=mode,
        **{"api.key": KEY, "websocket.max_message_size": 64, "broadcast.history": 10, **changes},
    )


async def post(
    port: int,
    body: bytes | None = b"hello",
    content_type: str | None = "text/plain",
    *,
    channel: str = "news",
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to the publish API: (status, JSON body). `chunks` sends a chunked body."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    producer = None
    if chunks is not None:
        body = None

        async def producer(write: Any) -> None:
            for chunk in chunks:
                await write(chunk)

    response: HTTPResponse = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/channels/{channel}/messages",
        method="POST",
        body=body,
        body_producer=producer,
        headers=sent,
        raise_error=False,
        request_timeout=10,
    )
    is_json = response.headers.get("Content-Type") == "application/json"
    return response.code, json.loads(response.body) if is_json else {}


async def member(port: int, channel: str = "news", query: str = "") -> WebSocketClientConnection:
    return await websocket_connect(f"ws://127.0.0.1:{port}/ws/{channel}{query}")


async def next_message(client: WebSocketClientConnection) -> str | bytes:
    message = await client.read_message()
    assert message is not None, f"closed ({client.close_code})"
    return message


# --- broadcast mode -------------------------------------------------------------------------


class TestBroadcastMode:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for()

    @pytest.mark.gen_test
    async def test_text_reaches_every_member_and_answers_the_offset(self, http_server, http_port):
        a, b = await member(http_port), await member(http_port)
        status, body = await post(http_port, "héllo".encode(), "text/plain; charset=utf-8")
        assert status == 200
        assert body == {
            "channel": "news",
            "offset": 1,
            "epoch": ANY,
            "local_receivers": 2,
            "receivers": 2,
        }
        assert await next_message(a) == await next_message(b) == "héllo"
        a.close()
        b.close()

    @pytest.mark.gen_test
    async def test_binary_and_json_bodies(self, http_server, http_port):
        a = await member(http_port)
        assert (await post(http_port, b"\x00\xff", "application/octet-stream"))[0] == 200
        assert (await post(http_port, b"\x01", None))[0] == 200  # no Content-Type: binary
        assert (await post(http_port, b'{"a": 1}', "application/json"))[0] == 200
        assert await next_message(a) == b"\x00\xff"
        assert await next_message(a) == b"\x01"
        assert await next_message(a) == '{"a": 1}'  # JSON is text
        a.close()

    @pytest.mark.gen_test
    async def test_a_channel_nobody_is_on_still_keeps_it(self, http_server, http_port):
        status, body = await post(http_port, b"first", channel="later")
        assert (status, body["receivers"], body["offset"]) == (200, 0, 1)
        joiner = await member(http_port, "later")
        assert await next_message(joiner) == "first"  # from history
        joiner.close()

    @pytest.mark.gen_test
    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ({"key": None}, 401),
            ({"key": "wrong"}, 401),
            ({"key": KEY + "x"}, 401),
            ({"key": "", "headers": {"Authorization": KEY}}, 401),  # not a Bearer token
            ({"body": b"x" * 65}, 413),
            ({"chunks": [b"x" * 40, b"y" * 40]}, 413),
            ({"body": b"\xff\xfe", "content_type": "text/plain"}, 415),
            ({"body": b"caf\xe9", "content_type": "text/plain; charset=iso-8859-1"}, 415),
            ({"channel": "bad%20name"}, 404),
        ],
    )
    async def test_refusals(self, http_server, http_port, case, expected):
        a = await member(http_port)
        case = dict(case)
        if case.get("key") == "":
            case["key"] = None
        status, body = await post(http_port, **case)
        assert status == expected
        if expected != 404:
            assert body["error"]
        # Nothing was published: the next message is the first.
        assert (await post(http_port, b"ok"))[1]["offset"] == 1
        assert await next_message(a) == "ok"
        a.close()

    @pytest.mark.gen_test
    async def test_the_size_limit_is_max_message_size(self, http_server, http_port):
        assert (await post(http_port, b"x" * 64))[0] == 200
        assert (await post(http_port, chunks=[b"x" * 32, b"y" * 32]))[0] == 200
        assert (await post(http_port, b"x" * 65))[0] == 413

    @pytest.mark.gen_test
    async def test_counted_in_metrics(self, http_server, http_port):
        await post(http_port, b"one")
        await post(http_port, b"two")
        await post(http_port, key="nope")
        response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{http_port}/metrics")
        text = response.body.decode()
        assert 'echoserver_api_publish_requests_total{status="200"} 2.0' in text
        assert 'echoserver_api_publish_requests_total{status="401"} 1.0' in text


class TestOff:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for(**{"api.key": ""})

    @pytest.mark.gen_test
    async def test_no_key_configured_is_404_whatever_is_sent(self, http_server, http_port):
        for key in (None, "", "anything"):
            status, body = await post(http_port, key=key)
            assert status == 404
            assert "off" in body["error"]


class TestEchoMode:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("echo")

    @pytest.mark.gen_test
    async def test_echo_mode_has_no_channels_to_publish_to(self, http_server, http_port):
        assert (await post(http_port))[0] == 404


class DownBroker(MemoryBroker):
    """A broker that is unreachable, as Redis can be."""

    def publish(self, envelope: Envelope) -> int:
        raise BrokerUnavailable("redis 127.0.0.1:1/0 unreachable")

    @property
    def healthy(self) -> bool:
        return False


class TestBrokerDown:
    @pytest.fixture
    def app(self) -> Any:
        return make_app(settings_for(), DownBroker())

    @pytest.mark.gen_test
    async def test_503_while_the_broker_is_unreachable(self, http_server, http_port):
        status, body = await post(http_port)
        assert status == 503
        assert "unreachable" in body["error"]


# --- mixed mode ------------------------------------------------------------------------------


class TestMixedMode:
    @pytest.fixture
    def settings(self) -> Settings:
        return settings_for("mixed", **{"websocket.max_message_size": 1000})

    @pytest.mark.gen_test
    async def test_members_get_broadcast_envelopes_with_the_offset(self, http_server, http_port):
        a = await member(http_port)
        await post(http_port, b'{"price": 1.5, "tags": ["a"]}', "application/json")
        await post(http_port, "plain é".encode(), "text/plain")
        await post(http_port, b'"a json string"', "application/vnd.api+json")
        got = [json.loads(await next_message(a)) for _ in range(3)]
        assert got == [
            {
                "type": "broadcast",
                "channel": "news",
                "payload": {"price": 1.5, "tags": ["a"]},
                "offset": 1,
                "epoch": ANY,
            },
            {
                "type": "broadcast",
                "channel": "news",
                "payload": "plain é",
                "offset": 2,
                "epoch": ANY,
            },
            {
                "type": "broadcast",
                "channel": "news",
                "payload": "a json string",
                "offset": 3,
                "epoch": ANY,
            },
        ]
        a.close()

    @pytest.mark.gen_test
    @pytest.mark.parametrize(
        ("body", "content_type", "expected"),
        [
            (b"\x00\x01", "application/octet-stream", 415),
            (b"x", None, 415),
            (b"{not json", "application/json", 400),
            (b"NaN", "application/json", 400),
            (b"", "application/json", 400),
            (b"\xff", "application/json", 415),
        ],
    )
    async def test_refusals(self, http_server, http_port, body, content_type, expected):
        status, answer = await post(http_port, body, content_type)
        assert status == expected, answer
        assert (await post(http_port, b"1", "application/json"))[1]["offset"] == 1

    @pytest.mark.gen_test
    async def test_api_and_member_broadcasts_share_one_numbering(self, http_server, http_port):
        a = await member(http_port)
        await a.write_message(json.dumps({"type": "broadcast", "payload": "from a"}))
        assert json.loads(await next_message(a))["offset"] == 1
        assert json.loads(await next_message(a))["type"] == "broadcastResult"
        assert (await post(http_port, b"2", "application/json"))[1]["offset"] == 2
        assert json.loads(await next_message(a)) == {
            "type": "broadcast",
            "channel": "news",
            "payload": 2,
            "offset": 2,
            "epoch": ANY,
        }
        a.close()


# --- a real server, as a backend sees it --------------------------------------------------


def http_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_a_backend_publishes_to_a_real_server_with_the_key_from_the_environment(run_server):
    server = run_server("--mode", "broadcast", env={"ECHOSERVER_API_KEY": KEY})
    url = f"{server.url}/api/channels/news/messages"
    # No Origin, no cookies: what a backend sends (and what curl sends).
    status, body = http_post(
        url, b"hello", {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
    )
    assert (status, body["offset"]) == (200, 1)
    assert http_post(url, b"hello", {"Content-Type": "text/plain"})[0] == 401
    assert metric(server, "echoserver_api_publish_requests_total", status="200") == 1
    assert metric(server, "echoserver_api_publish_requests_total", status="401") == 1
    assert KEY not in server.log()


def test_print_config_hides_the_api_key() -> None:
    proc = run_once(
        "--api-key", KEY, "--print-config", env={"PATH": "/usr/bin:/bin"}, inherit=False
    )
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stdout
    assert "# api.key is set but not printed" in proc.stdout
    assert tomllib.loads(proc.stdout)["api"]["key"] == config.HIDDEN


@pytest.mark.redis
def test_503_while_redis_is_down_then_published_again(run_server, redis_server) -> None:
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--broker", redis_server.url)
    url = f"{server.url}/api/channels/news/messages"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
    assert http_post(url, b"before", headers)[0] == 200
    redis_server.stop()
    assert wait_until(lambda: http_post(url, b"during", headers)[0] == 503, 10)
    status, body = http_post(url, b"during", headers)
    assert status == 503 and "not published" in body["error"]
    redis_server.start()  # same port, empty: offsets start again at 1
    assert wait_until(lambda: http_post(url, b"after", headers)[0] == 200, 15)
    assert metric(server, "echoserver_api_publish_requests_total", status="503") >= 1

"""Handlers over real sockets, through pytest-tornado's http_server and http_port fixtures."""

from __future__ import annotations

import json
from unittest.mock import ANY  # a wildcard for an epoch

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from tests.conftest import make_settings


def ws_url(port: int, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{port}{path}"


async def read_json(connection) -> dict:
    return json.loads(await connection.read_message())


# --- echo ---------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_echo_text_binary_empty_and_large(http_server, http_port):
    connection = await websocket_connect(ws_url(http_port))
    cases: list[tuple[str | bytes, bool]] = [
        ("hello", False),
        ("", False),
        ("unicode \u00e9\u4e2d\U0001f600", False),
        (b"\x00\x01\xff", True),
        (b"", True),
        (bytes(range(256)) * 800, True),  # 200 KB
        ("x" * 200_000, False),
    ]
    for message, binary in cases:
        await connection.write_message(message, binary=binary)
        reply = await connection.read_message()
        assert reply == message
        assert isinstance(reply, bytes) == binary
    connection.close()


@pytest.mark.gen_test
async def test_echo_goes_to_the_sender_only(http_server, http_port):
    a = await websocket_connect(ws_url(http_port))
    b = await websocket_connect(ws_url(http_port))
    await a.write_message("for a")
    assert await a.read_message() == "for a"
    await b.write_message("for b")
    assert await b.read_message() == "for b"
    a.close()
    b.close()


@pytest.mark.gen_test
async def test_echo_mode_has_no_channels(http_server, http_port):
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(ws_url(http_port, "/ws/room"))
    assert refused.value.code == 404


# --- broadcast ----------------------------------------------------------------------------


class TestBroadcast:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast")

    @pytest.mark.gen_test
    async def test_every_member_of_the_channel_gets_it_in_one_order(self, http_server, http_port):
        clients = [await websocket_connect(ws_url(http_port, "/ws/room")) for _ in range(3)]
        outsider = await websocket_connect(ws_url(http_port, "/ws/other"))
        for n in range(10):
            await clients[n % 3].write_message(f"m{n}")
        seen = [[await c.read_message() for _ in range(10)] for c in clients]
        assert seen[0] == seen[1] == seen[2]
        assert sorted(seen[0], key=lambda m: int(m[1:])) == [f"m{n}" for n in range(10)]
        # The outsider's channel got nothing: the next thing it reads is its own message.
        await outsider.write_message("mine")
        assert await outsider.read_message() == "mine"

    @pytest.mark.gen_test
    async def test_binary_stays_binary(self, http_server, http_port):
        a = await websocket_connect(ws_url(http_port))
        b = await websocket_connect(ws_url(http_port, "/ws/default"))
        await a.write_message(b"\x00\xff", binary=True)
        assert await a.read_message() == b"\x00\xff"
        assert await b.read_message() == b"\x00\xff"

    @pytest.mark.gen_test
    async def test_channel_member_count(self, http_server, http_port, http_client):
        clients = [await websocket_connect(ws_url(http_port, "/ws/counted")) for _ in range(2)]
        # A message round trip proves both joins finished.
        await clients[1].write_message("x")
        await clients[0].read_message()
        response = await http_client.fetch(f"http://127.0.0.1:{http_port}/api/channels/counted")
        assert json.loads(response.body) == {"channel": "counted", "members": 2}

    @pytest.mark.gen_test
    async def test_bad_channel_name_is_not_found(self, http_server, http_port):
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(ws_url(http_port, "/ws/" + "x" * 65))
        assert refused.value.code == 404


class TestBroadcastWithoutSender:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast", **{"broadcast.include_sender": False})

    @pytest.mark.gen_test
    async def test_sender_does_not_get_its_own_message(self, http_server, http_port):
        a = await websocket_connect(ws_url(http_port))
        b = await websocket_connect(ws_url(http_port))
        await a.write_message("from a")
        assert await b.read_message() == "from a"
        await b.write_message("from b")
        # a's first message is b's: its own never came back.
        assert await a.read_message() == "from b"


# --- mixed --------------------------------------------------------------------------------


class TestMixed:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="mixed")

    @pytest.mark.gen_test
    async def test_echo_broadcast_and_result(self, http_server, http_port):
        a = await websocket_connect(ws_url(http_port, "/ws/game"))
        b = await websocket_connect(ws_url(http_port, "/ws/game"))
        await a.write_message(json.dumps({"type": "echo", "payload": {"n": 1}}))
        assert await read_json(a) == {"type": "echo", "payload": {"n": 1}}
        await a.write_message(json.dumps({"type": "broadcast", "payload": [1, 2]}))
        envelope = {
            "type": "broadcast",
            "channel": "game",
            "payload": [1, 2],
            "offset": 1,
            "epoch": ANY,
        }
        assert await read_json(b) == envelope
        assert await read_json(a) == envelope
        assert await read_json(a) == {
            "type": "broadcastResult",
            "channel": "game",
            "payload": [1, 2],
            "listenCount": 2,
            "offset": 1,
            "epoch": ANY,
        }

    @pytest.mark.gen_test
    @pytest.mark.parametrize("bad", ["not json", "[1]", '{"payload": 1}', '{"type": "shout"}'])
    async def test_bad_requests_get_an_error_and_the_connection_stays(
        self, http_server, http_port, bad
    ):
        a = await websocket_connect(ws_url(http_port))
        await a.write_message(bad)
        reply = await read_json(a)
        assert reply["type"] == "error"
        assert reply["error"]
        await a.write_message(json.dumps({"type": "echo", "payload": "still here"}))
        assert await read_json(a) == {"type": "echo", "payload": "still here"}


# --- HTTP routes --------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_healthz(http_server, http_port, http_client):
    connection = await websocket_connect(ws_url(http_port))
    response = await http_client.fetch(f"http://127.0.0.1:{http_port}/healthz")
    body = json.loads(response.body)
    assert response.code == 200
    assert body["status"] == "ok"
    assert body["mode"] == "echo"
    assert body["connections"] == 1
    assert body["uptime"] >= 0
    assert body["path"] == "/ws"
    from echoserver import __version__

    assert body["version"] == __version__
    connection.close()


@pytest.mark.gen_test
async def test_page_and_assets_are_served(http_server, http_port, http_client):
    page = await http_client.fetch(f"http://127.0.0.1:{http_port}/")
    assert page.headers["Content-Type"].startswith("text/html")
    assert b"/static/app.js" in page.body
    for asset in ("app.js", "style.css"):
        url = f"http://127.0.0.1:{http_port}/static/{asset}"
        response = await http_client.fetch(url)
        assert response.code == 200
        assert response.headers["Cache-Control"] == "no-cache"
        again = await http_client.fetch(
            url, headers={"If-None-Match": response.headers["Etag"]}, raise_error=False
        )
        assert again.code == 304


@pytest.mark.gen_test
async def test_metrics_count_messages(http_server, http_port, http_client):
    connection = await websocket_connect(ws_url(http_port))
    await connection.write_message("abc")
    await connection.read_message()
    response = await http_client.fetch(f"http://127.0.0.1:{http_port}/metrics")
    text = response.body.decode()
    assert "echoserver_messages_received_total 1.0" in text
    assert "echoserver_received_bytes_total 3.0" in text
    assert 'echoserver_connections{channel="default",mode="echo"} 1.0' in text
    connection.close()


# --- one source for each fact ------------------------------------------------------------


@pytest.mark.gen_test
async def test_protocol_route_serves_the_channel_rule_and_close_codes(http_client, base_url):
    from echoserver.routes import CHANNEL_PATTERN
    from echoserver.wire.framing import CloseCode

    response = await http_client.fetch(base_url + "/api/protocol")
    body = json.loads(response.body)
    assert body["channel_pattern"] == CHANNEL_PATTERN
    assert body["close_codes"]["1009"] == "message too big"
    assert set(body["close_codes"]) == {str(int(code)) for code in CloseCode}


def test_the_page_repeats_neither_the_channel_rule_nor_the_close_codes():
    from tests.servers import ROOT

    script = (ROOT / "static" / "app.js").read_text()
    assert "A-Za-z0-9" not in script
    assert "message too big" not in script and "1009" not in script
    assert "/api/protocol" in script

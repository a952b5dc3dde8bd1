"""Safe to expose: origins, the auth token, connection/message/rate limits and pings.

Every test runs a real `python -m echoserver` subprocess and talks to it over loopback,
with Tornado's client for well-behaved peers and raw sockets (tests/wsraw.py) for
handshakes and peers that misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from typing import TypeVar
from urllib.parse import quote

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.conftest import fetch, make_settings, metric, run, wait_until
from tests.conftest import open_connections as connections
from tests.wspeer import Peer
from tests.wsraw import RawClient, build_frame, close_payload

TOKEN = "s3cr3t-T0ken_with.odd~chars!"
T = TypeVar("T")
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# --- helpers ------------------------------------------------------------------------------


class Handshake:
    """One raw HTTP upgrade request: its status, headers and body, and the open socket."""

    def __init__(
        self,
        port: int,
        path: str = "/ws",
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {
            "Host": f"127.0.0.1:{port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        request = f"GET {path} HTTP/1.1\r\n"
        request += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(request.encode("latin-1") + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed during the handshake: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        self.rest = rest
        if self.status != 101:
            length = int(self.headers.get("content-length", "0"))
            while len(self.rest) < length:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.rest += chunk

    def close(self) -> None:
        self.sock.close()


def status_of(port: int, path: str = "/ws", headers: dict[str, str] | None = None) -> int:
    handshake = Handshake(port, path, headers)
    handshake.close()
    return handshake.status


async def echo_ok(url: str, **headers: str) -> bool:
    """A fresh client connects, one message goes round, it closes."""
    client = await websocket_connect(HTTPRequest(url, headers=headers or None))
    await client.write_message("still serving")
    reply = await client.read_message()
    client.close()
    return reply == "still serving"


async def close_code(client: WebSocketClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; its close code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await asyncio.wait_for(client.read_message(), deadline - time.monotonic())
        if message is None:
            return client.close_code
    raise AssertionError("the server did not close the connection")


# --- origins ------------------------------------------------------------------------------


def test_default_origin_policy_is_same_host_or_no_origin(run_server):
    server = run_server()
    port = server.port
    assert status_of(port) == 101  # a non-browser client sends no Origin
    assert status_of(port, headers={"Origin": f"http://127.0.0.1:{port}"}) == 101
    assert status_of(port, headers={"Origin": f"HTTP://127.0.0.1:{port}"}) == 101
    refused = [
        "https://evil.example",
        f"http://evil.example:{port}",
        f"http://127.0.0.1:{port + 1 if port < 65535 else 1}",  # another port: another origin
        "http://127.0.0.1",
        "null",  # sandboxed iframes and file:// pages
        "",
    ]
    for origin in refused:
        handshake = Handshake(port, headers={"Origin": origin})
        handshake.close()
        assert handshake.status == 403, origin
        assert "upgrade" not in handshake.headers  # refused before the upgrade
    # The Sec-WebSocket-Origin header of protocol version 8 is checked the same way.
    assert status_of(port, headers={"Sec-WebSocket-Origin": "https://evil.example"}) == 403
    assert wait_until(lambda: "origin 'https://evil.example'" in server.log())
    assert wait_until(lambda: "status=403 origin=https://evil.example" in server.log())
    assert metric(server, "echoserver_handshakes_refused_total", reason="origin") == 7


def test_listed_origins_only(run_server):
    server = run_server("--allowed-origins", "https://app.example:8443,http://b.example")
    port = server.port
    for origin in [
        "https://app.example:8443",
        "HTTPS://App.Example:8443",  # scheme and host are case-insensitive
        "https://app.example:8443/",
        "http://b.example",
    ]:
        assert status_of(port, headers={"Origin": origin}) == 101, origin
    for origin in [
        "https://app.example",  # another port
        "http://app.example:8443",  # another scheme
        "https://b.example",
        f"http://127.0.0.1:{port}",  # same host is not implied once there is a list
        "https://app.example:8443.evil.example",
    ]:
        assert status_of(port, headers={"Origin": origin}) == 403, origin
    assert status_of(port) == 101


def test_star_allows_any_origin(run_server):
    server = run_server("--allowed-origins", "*")
    for origin in [
        "https://anything.example",
        "null",
        "http://127.0.0.1:1",
        "chrome-extension://x",
    ]:
        assert status_of(server.port, headers={"Origin": origin}) == 101, origin


@pytest.mark.parametrize("allowed", [None, "https://app.example"])
def test_malformed_origins_are_refused_not_errors(run_server, allowed):
    server = run_server(*(["--allowed-origins", allowed] if allowed else []))
    bad = [
        "http://[",
        "http://[::1",
        "http://a]b",
        "http://x:99999",
        "http://\xe9\xff",
        "   ",
        "://",
    ]
    for origin in bad:
        assert status_of(server.port, headers={"Origin": origin}) == 403, origin
    assert run(echo_ok(server.ws_url + "/ws"))
    assert "Traceback" not in server.log()
    assert "status=5" not in server.log()


# --- the auth token -----------------------------------------------------------------------


def test_token_is_required_in_header_or_query(run_server):
    server = run_server("--auth-token", TOKEN)
    port = server.port
    accepted = [
        ("/ws", {"Authorization": f"Bearer {TOKEN}"}),
        ("/ws", {"Authorization": f"bearer {TOKEN}"}),
        (f"/ws?token={TOKEN}", {}),
        (f"/ws?token={quote(TOKEN, safe='')}", {}),  # percent-encoded in the URL
        (f"/ws?x=1&token={quote(TOKEN)}", {}),
    ]
    for path, headers in accepted:
        assert status_of(port, path, headers) == 101, (path, headers)
    refused = [
        ("/ws", {}),
        ("/ws", {"Authorization": "Bearer wrong"}),
        # A bearer header, when there is one, is the credential: a wrong one is not
        # rescued by a right ?token=.
        (f"/ws?token={TOKEN}", {"Authorization": "Bearer wrong"}),
        # Nor is an empty one ("Bearer " arrives as "Bearer" once its space is stripped).
        (f"/ws?token={TOKEN}", {"Authorization": "Bearer "}),
        (f"/ws?token={TOKEN}", {"Authorization": "Bearer"}),
        ("/ws", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        ("/ws", {"Authorization": f"Bearer {TOKEN}x"}),
        ("/ws", {"Authorization": f"Bearer  {TOKEN}"}),
        ("/ws", {"Authorization": TOKEN}),
        ("/ws", {"Authorization": f"Basic {TOKEN}"}),
        ("/ws", {"Authorization": "Bearer"}),
        ("/ws", {"Authorization": "Bearer \xe9\xff"}),
        ("/ws?token=", {}),
        ("/ws?token=wrong", {}),
        (f"/ws?token={TOKEN[:5]}", {}),
        ("/ws?token=%ff%fe", {}),  # not UTF-8: a wrong token, not a 400
        (f"/ws?token={quote(TOKEN)}%ff", {}),
        (f"/ws?Token={TOKEN}", {}),
    ]
    for path, headers in refused:
        handshake = Handshake(port, path, headers)
        handshake.close()
        assert handshake.status == 401, (path, headers)
        assert "upgrade" not in handshake.headers
    assert metric(server, "echoserver_handshakes_refused_total", reason="auth") == len(refused)
    assert run(echo_ok(server.ws_url + "/ws", Authorization=f"Bearer {TOKEN}"))
    server.stop()
    log = server.log()
    assert "status=401" in log
    for form in (TOKEN, quote(TOKEN), quote(TOKEN, safe=""), TOKEN[:5] + "?"):
        assert form not in log


@pytest.mark.parametrize("level", ["debug", "info"])
def test_token_never_reaches_the_log(run_server, level):
    """Even when a request carrying the token fails in ways Tornado itself logs."""
    server = run_server("--auth-token", TOKEN, "--log-level", level, "--max-message-size", "40")
    port = server.port
    for path, headers in [
        (f"/ws?token={TOKEN}", {"Origin": "http://["}),  # a broken origin with a good token
        (f"/ws?token={TOKEN}", {"Origin": "https://evil.example"}),
        (f"/ws?token={TOKEN}&token=%ff", {}),
        (f"/ws?token={TOKEN}%ff", {}),
        (f"/ws?token={TOKEN}", {"Sec-WebSocket-Version": "99"}),
        (f"/ws?token={TOKEN}", {"Sec-WebSocket-Key": ""}),
        (f"/ws?token={TOKEN}", {"Upgrade": "h2c"}),
        ("/ws", {"Authorization": f"Bearer {TOKEN}x"}),
        (f"/nowhere?token={TOKEN}", {}),
        (f"/healthz?token={TOKEN}", {}),
    ]:
        assert status_of(port, path, headers) < 500, (path, headers)

    async def session() -> int | None:
        client = await websocket_connect(f"{server.ws_url}/ws?token={TOKEN}")
        await client.write_message(TOKEN)  # a message body is not for the log either
        assert await client.read_message() == TOKEN
        await client.write_message(TOKEN * 2)  # too big: closed with 1009
        return await close_code(client)

    assert run(session()) == 1009
    server.stop()
    assert "closing 127.0.0.1 /ws with 1009" in server.log()
    assert TOKEN not in server.log()
    assert quote(TOKEN) not in server.log()


@pytest.fixture
def settings():
    return make_settings(**{"websocket.auth_token": TOKEN})


@pytest.mark.gen_test
async def test_token_comparison_is_constant_time(http_server, http_port, monkeypatch):
    """The handshake compares tokens with hmac.compare_digest, whatever their length."""
    from echoserver.wire import handshake

    seen: list[tuple[bytes, bytes]] = []
    real = handshake.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(handshake.hmac, "compare_digest", spy)
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(f"ws://127.0.0.1:{http_port}/ws?token=x")
    assert refused.value.code == 401
    client = await websocket_connect(f"ws://127.0.0.1:{http_port}/ws?token={TOKEN}")
    client.close()
    assert seen == [(b"x", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


# --- max_connections ----------------------------------------------------------------------


def test_max_connections_503_when_full_and_freed_slots_are_reused(run_server):
    server = run_server("--max-connections", "2")
    port = server.port

    async def scenario() -> None:
        a = await websocket_connect(server.ws_url + "/ws")
        b = Peer(port)  # a peer that will vanish without a closing handshake
        assert b.status == 101
        full = Handshake(port)
        full.close()
        assert full.status == 503
        assert b"full" in full.rest
        # A clean close frees a slot...
        a.close(1000)
        assert await close_code(a) == 1000
        assert wait_until(lambda: connections(server) == 1)
        c = await websocket_connect(server.ws_url + "/ws")
        assert status_of(port) == 503
        # ...and so does a peer that simply disappears.
        b.close()
        assert wait_until(lambda: connections(server) == 1)
        assert await echo_ok(server.ws_url + "/ws")
        c.close()

    run(scenario())
    assert metric(server, "echoserver_handshakes_refused_total", reason="full") == 2
    assert wait_until(lambda: "status=503" in server.log())


def test_max_connections_holds_against_concurrent_handshakes(run_server):
    """Handshakes still in flight count: a burst cannot overshoot the limit."""
    server = run_server("--max-connections", "3")
    port = server.port
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        socks.append(sock)
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
    statuses = []
    for sock in socks:
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk
            head += chunk
        statuses.append(int(head.split(b" ", 2)[1]))
    assert sorted(statuses) == [101] * 3 + [503] * 17
    for sock in socks:
        sock.close()
    # Past max_connections and its headroom the burst was refused at accept, and so is a
    # probe until the server has seen the burst's sockets close.
    assert wait_until(lambda: fetch(server.url + "/healthz")[0] == 200 and connections(server) == 0)
    assert status_of(port) == 101


# --- max_message_size ---------------------------------------------------------------------


def test_message_over_max_message_size_closes_1009(run_server):
    server = run_server("--max-message-size", "1024")
    port = server.port
    bystander = Peer(port)

    def echo(client: Peer, payload: bytes) -> None:
        client.send_frame(OP_BINARY, payload)
        assert client.recv_frame() == (True, OP_BINARY, payload)

    whole = Peer(port)
    echo(whole, b"x" * 1024)  # exactly the limit passes
    whole.send_frame(OP_BINARY, b"x" * 1025)
    assert whole.recv_close_code() == 1009

    fragmented = Peer(port)  # the limit is on the message, not the frame
    fragmented.send_frame(OP_TEXT, b"a" * 600, fin=False)
    fragmented.send_frame(0x0, b"a" * 600)
    assert fragmented.recv_close_code() == 1009

    # A declared length over the limit is refused before the payload arrives.
    huge = Peer(port)
    huge.send(struct.pack("!BBQ", 0x82, 0xFF, 2**40) + os.urandom(4))
    assert huge.recv_close_code() == 1009

    for client in (whole, fragmented, huge):
        client.send_frame(OP_CLOSE, close_payload(1009))
        assert wait_until(client.at_eof, timeout=5)
        client.close()
    echo(bystander, b"unaffected")
    assert metric(server, "echoserver_closes_total", code="1009") == 3


# --- rate_limit ---------------------------------------------------------------------------


def test_rate_limit_closes_a_flood_with_1008_and_spares_a_steady_client(run_server):
    server = run_server("--rate-limit", "20")
    port = server.port
    steady = Peer(port)
    flood = Peer(port)
    flood.send(b"".join(build_frame(OP_TEXT, b"%d" % n) for n in range(200)))
    echoed = 0
    while True:
        frame = flood.recv_frame()
        assert frame is not None, "dropped without a close frame"
        if frame[1] == OP_CLOSE:
            assert struct.unpack("!H", frame[2][:2])[0] == 1008
            flood.send_frame(OP_CLOSE, frame[2][:2])  # the closing handshake's other half
            break
        echoed += 1
    assert 1 <= echoed <= 25  # the burst (one second's worth), then the close
    # 12 messages at 10/s, half the limit: every one comes back.
    for n in range(12):
        steady.send_frame(OP_TEXT, b"%d" % n)
        assert steady.recv_frame() == (True, OP_TEXT, b"%d" % n)
        time.sleep(0.1)
    steady.send_frame(OP_CLOSE, close_payload(1000))
    assert steady.recv_close_code() == 1000
    assert wait_until(lambda: metric(server, "echoserver_closes_total", code="1008") == 1)
    assert wait_until(lambda: "with 1008: rate limit exceeded" in server.log())


def test_rate_limit_allows_a_small_burst(run_server):
    server = run_server("--rate-limit", "5")
    client = Peer(server.port)
    client.send(b"".join(build_frame(OP_TEXT, b"b%d" % n) for n in range(5)))
    assert [client.recv_frame() for _ in range(5)] == [
        (True, OP_TEXT, b"b%d" % n) for n in range(5)
    ]
    time.sleep(0.5)  # refills about 2.5 tokens
    client.send_frame(OP_TEXT, b"after")
    assert client.recv_frame() == (True, OP_TEXT, b"after")


# --- ping_interval / ping_timeout ---------------------------------------------------------


def test_silent_peer_is_closed_and_a_live_one_is_kept(run_server):
    server = run_server("--ping-interval", "0.3", "--ping-timeout", "0.3")
    silent = RawClient(server.port, timeout=10)

    def read_silently() -> tuple[list[tuple[bool, int, bytes]], float]:
        """Read what the server sends, answer nothing; (frames, seconds until EOF)."""
        started = time.monotonic()
        frames = []
        for _ in range(100):
            frame = silent.recv_frame()
            if frame is None:
                break
            frames.append(frame)
        return frames, time.monotonic() - started

    async def live_client() -> bool:
        # Tornado's client answers pings by itself; it outlives several ping timeouts.
        client = await websocket_connect(server.ws_url + "/ws")
        await asyncio.sleep(2.0)
        await client.write_message("alive")
        ok = await client.read_message() == "alive"
        client.close(1000)
        return ok

    async def both() -> tuple[tuple[list[tuple[bool, int, bytes]], float], bool]:
        silent_result = asyncio.get_running_loop().run_in_executor(None, read_silently)
        return await asyncio.gather(silent_result, live_client())

    (frames, elapsed), alive = run(both())
    silent.close()
    assert alive
    assert frames[0][1] == OP_PING
    assert frames[-1][1] == OP_CLOSE
    assert struct.unpack("!H", frames[-1][2][:2])[0] == 1011  # as websockets does
    # At most interval + timeout, and the drop follows the close at once: nobody is there.
    assert elapsed < 2.0, elapsed
    assert wait_until(lambda: connections(server) == 0)


def test_pings_off_when_interval_is_zero(run_server):
    server = run_server("--ping-interval", "0")
    client = RawClient(server.port, timeout=1.0)
    with pytest.raises(TimeoutError):
        client.recv_frame()  # nothing arrives: no pings
    client.send_frame(OP_PING, b"p")
    assert client.recv_frame() == (True, OP_PONG, b"p")

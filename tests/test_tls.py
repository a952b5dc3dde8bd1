"""TLS: https:// and wss:// on one port, with a self-signed certificate made for the test.

A TLS connection stays on Tornado's SSLIOStream after the handshake (connection._StreamIO),
a different path from plain connections, so echo, broadcast, large and pipelined messages,
pings, a protocol error and an abrupt drop are all exercised over wss here.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.certs import make_certificate
from tests.conftest import fetch, open_connections, run, wait_until
from tests.servers import run_once
from tests.wspeer import Peer
from tests.wsraw import build_frame, close_payload

T = TypeVar("T")
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    certfile, keyfile, _ = make_certificate(tmp_path_factory.mktemp("tls"), ca=True)
    return str(certfile), str(keyfile)


@pytest.fixture
def client_context(cert: tuple[str, str]) -> ssl.SSLContext:
    """A client context that trusts only the test certificate (and checks the host)."""
    return ssl.create_default_context(cafile=cert[0])


@pytest.fixture
def tls_server(run_server, cert):
    """Factory: a server with TLS on, plus any other flags."""

    def start(*args: str) -> Any:
        server = run_server("--tls-certfile", cert[0], "--tls-keyfile", cert[1], *args)
        assert server.scheme == "https"
        return server

    return start


def wss(server: Any, path: str, context: ssl.SSLContext) -> HTTPRequest:
    return HTTPRequest(server.ws_url + path, ssl_options=context)


def test_https_page_and_wss_echo_on_the_same_port(tls_server, client_context):
    server = tls_server()
    assert f"page https://127.0.0.1:{server.port}/" in server.log()
    assert f"websocket wss://127.0.0.1:{server.port}/ws" in server.log()
    status, headers, body = fetch(server.url + "/", client_context)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"/static/app.js" in body
    assert fetch(server.url + "/static/app.js", client_context)[0] == 200
    status, _, body = fetch(server.url + "/healthz", client_context)
    assert status == 200 and json.loads(body)["status"] == "ok"

    big = os.urandom(300_000)  # several TLS records and several 64 KiB reads

    async def scenario() -> list[Any]:
        client = await websocket_connect(wss(server, "/ws", client_context))
        replies = []
        for message, binary in [("text", False), ("", False), (b"\x00\xff", True), (big, True)]:
            await client.write_message(message, binary=binary)
            replies.append(await client.read_message())
        # Pipelined: 200 messages written before any reply is read.
        for n in range(200):
            client.write_message(f"p{n}")
        replies.append([await client.read_message() for _ in range(200)])
        client.close(1000)
        return replies

    replies = run(scenario())
    assert replies[:4] == ["text", "", b"\x00\xff", big]
    assert replies[4] == [f"p{n}" for n in range(200)]


def test_a_certificate_is_required_by_clients_and_plain_http_is_refused(tls_server, client_context):
    server = tls_server()
    # A client that does not trust the self-signed certificate refuses it...
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/healthz", timeout=10)
    # ...and plain HTTP on the TLS port gets no page.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200")
    # The server is unharmed.
    assert fetch(server.url + "/healthz", client_context)[0] == 200


def test_wss_broadcast(tls_server, client_context):
    server = tls_server("--mode", "broadcast")

    async def scenario() -> tuple[list[list[Any]], Any]:
        room = [await websocket_connect(wss(server, "/ws/room", client_context)) for _ in range(3)]
        other = await websocket_connect(wss(server, "/ws/other", client_context))
        for n in range(30):
            await room[n % 3].write_message(f"m{n}")
        await room[0].write_message(b"\x01\x02", binary=True)
        seen = [[await c.read_message() for _ in range(31)] for c in room]
        await other.write_message("own")
        first = await other.read_message()
        for c in [*room, other]:
            c.close(1000)
        return seen, first

    seen, first = run(scenario())
    assert seen[0] == seen[1] == seen[2]
    texts = [m for m in seen[0] if isinstance(m, str)]
    assert sorted(texts, key=lambda m: int(m[1:])) == [f"m{n}" for n in range(30)]
    assert b"\x01\x02" in seen[0]  # binary stays binary
    assert first == "own"


def test_wss_mixed_mode_pipelined_requests_keep_their_order(tls_server, client_context):
    """Mixed-mode broadcasts are awaited per message: reading pauses and resumes on TLS."""
    server = tls_server("--mode", "mixed")

    async def scenario() -> tuple[list[Any], list[Any]]:
        sender = await websocket_connect(wss(server, "/ws/game", client_context))
        watcher = await websocket_connect(wss(server, "/ws/game", client_context))
        for n in range(50):  # all written before any reply is read
            kind = "broadcast" if n % 2 else "echo"
            sender.write_message(json.dumps({"type": kind, "payload": n}))
        sent = [json.loads(await sender.read_message()) for _ in range(75)]
        seen = [json.loads(await watcher.read_message()) for _ in range(25)]
        sender.close(1000)
        watcher.close(1000)
        return sent, seen

    sent, seen = run(scenario())
    payloads = [m["payload"] for m in sent if m["type"] in ("echo", "broadcastResult")]
    assert payloads == list(range(50))
    assert all(m["listenCount"] == 2 for m in sent if m["type"] == "broadcastResult")
    assert [m["payload"] for m in seen] == list(range(1, 50, 2))


def test_wss_protocol_error_closes_1002_and_spares_others(tls_server, client_context):
    server = tls_server("--max-message-size", "1000")
    bystander = Peer(server.port, tls=client_context)
    assert bystander.status == 101

    unmasked = Peer(server.port, tls=client_context)
    unmasked.send_frame(OP_TEXT, b"not masked", masked=False)
    assert unmasked.recv_close_code() == 1002
    assert wait_until(unmasked.at_eof, timeout=5)

    reserved = Peer(server.port, tls=client_context)
    reserved.send_frame(OP_TEXT, b"rsv", rsv=4)
    assert reserved.recv_close_code() == 1002

    too_big = Peer(server.port, tls=client_context)
    too_big.send_frame(OP_BINARY, b"x" * 1001)
    assert too_big.recv_close_code() == 1009

    bad_utf8 = Peer(server.port, tls=client_context)
    bad_utf8.send_frame(OP_TEXT, b"\xff\xfe")
    assert bad_utf8.recv_close_code() == 1007

    # Ping, echo and a clean closing handshake still work on the bystander.
    bystander.send_frame(OP_PING, b"hi")
    assert bystander.recv_frame() == (True, OP_PONG, b"hi")
    bystander.send_frame(OP_TEXT, b"still here")
    assert bystander.recv_frame() == (True, OP_TEXT, b"still here")
    bystander.send_frame(OP_CLOSE, close_payload(1000, b"bye"))
    assert bystander.recv_close_code() == 1000
    assert wait_until(bystander.at_eof, timeout=5)
    for client in (bystander, unmasked, reserved, too_big, bad_utf8):
        client.close()
    assert wait_until(lambda: open_connections(server, client_context) == 0)


def test_wss_abrupt_drops_free_their_connections(tls_server, client_context):
    server = tls_server()
    clients = [Peer(server.port, tls=client_context) for _ in range(6)]
    assert wait_until(lambda: open_connections(server, client_context) == 6)
    # Half vanish mid-frame: a header promising 100 bytes, 10 sent, then a TCP reset.
    for client in clients[:3]:
        client.send(build_frame(OP_TEXT, b"x" * 100)[:16])
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    # The others just close their sockets (TLS close_notify, then FIN).
    for client in clients[3:]:
        client.close()
    assert wait_until(lambda: open_connections(server, client_context) == 0, timeout=10)

    async def echo() -> Any:
        client = await websocket_connect(wss(server, "/ws", client_context))
        await client.write_message("after")
        reply = await client.read_message()
        client.close(1000)
        return reply

    assert run(echo()) == "after"
    assert "Traceback" not in server.log()


def test_tls_files_are_checked_at_startup(tmp_path: Path):
    """A certificate that cannot be read is a config error (exit 2, one line)."""
    missing = tmp_path / "missing.pem"
    result = run_once(
        "--tls-certfile", str(missing), "--tls-keyfile", str(missing), "--check-config"
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "tls.certfile" in result.stderr

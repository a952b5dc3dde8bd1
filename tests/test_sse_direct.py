"""Event streams written past Tornado's HTTP layer (transport/body_writer.py): once a
stream's headers are sent, each fan-out's chunk is framed once and written straight to the
connection, several per loop pass in one write.

Checked against real server processes: the chunked framing of coalesced bursts on many
streams at once, an HTTP/1.0 stream (no chunks), a reader too slow for the cap under the
drop policy, and a stream over TLS (written through its SSLIOStream), each ended by the
drain with the last chunk; and, under an application's gzip, Tornado's own write path.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.websocket import websocket_connect
from websockets.sync.client import connect as ws_connect

from echoserver import embed
from tests.certs import make_certificate
from tests.conftest import fetch, run, wait_until
from tests.test_sse import offset_of, parse_events


def members(server: Any, context: ssl.SSLContext | None = None) -> int:
    return json.loads(fetch(f"{server.url}/api/channels/news", context)[2])["members"]


class Stream:
    """A raw GET of an event stream over `sock`, its body de-chunked (HTTP/1.1) or taken
    as is (HTTP/1.0), checked for exact framing as it arrives."""

    def __init__(self, sock: socket.socket, path: str, version: str = "HTTP/1.1") -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.sock.sendall(f"GET {path} {version}\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        self.chunked = b"transfer-encoding: chunked" in head.lower()
        self.body = b""
        self.ended = False

    def _more(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:  # nothing more for now
            return False
        if not data:
            self.ended = True
            return False
        self.buffer += data
        return True

    def _take(self) -> None:
        if not self.chunked:
            self.body += self.buffer
            self.buffer = b""
            return
        while b"\r\n" in self.buffer:
            size_line, _, rest = self.buffer.partition(b"\r\n")
            size = int(size_line, 16)  # a broken frame fails here
            if len(rest) < size + 2:
                return
            assert rest[size : size + 2] == b"\r\n"
            if size == 0:
                self.ended = True
            self.body += rest[:size]
            self.buffer = rest[size + 2 :]

    def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._take()
            if len(parse_events(self.body)) >= count or self.ended or not self._more():
                break
        self._take()
        return parse_events(self.body)

    def at_end(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            self._take()
            if self.ended or not self._more():
                break
        self._take()
        return self.ended

    def close(self) -> None:
        self.sock.close()


def plain(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def burst(server: Any, count: int, size: int = 20, context: ssl.SSLContext | None = None) -> None:
    """`count` messages on "news", sent back to back (so fan-outs come several per loop
    pass), each its index padded to `size` characters."""
    with ws_connect(f"{server.ws_url}/ws/news", ssl=context) as sender:
        for index in range(count):
            sender.send(str(index).ljust(size, "."))
        for _ in range(count):
            sender.recv(timeout=10)


def check_in_order(events: list[dict[str, Any]], count: int, size: int = 20) -> None:
    assert [e["data"] for e in events] == [str(i).ljust(size, ".") for i in range(count)]
    assert [int(offset_of(e["id"])) for e in events] == list(range(1, count + 1))


def test_many_streams_get_every_burst_framed_and_in_order(run_server: Any) -> None:
    server = run_server("--mode", "broadcast")
    streams = [Stream(plain(server.port), "/sse/news") for _ in range(40)]
    try:
        assert all(s.status == 200 and s.chunked for s in streams)
        assert wait_until(lambda: members(server) == 40, 10)
        burst(server, 300)
        for stream in streams:
            check_in_order(stream.events(300), 300)
        server.proc.send_signal(signal.SIGTERM)
        assert all(stream.at_end(10) for stream in streams)
    finally:
        for stream in streams:
            stream.close()
    assert server.proc.wait(15) == 0


def test_an_http_1_0_stream_is_not_chunked(run_server: Any) -> None:
    server = run_server("--mode", "broadcast")
    stream = Stream(plain(server.port), "/sse/news", version="HTTP/1.0")
    try:
        assert stream.status == 200 and not stream.chunked
        assert wait_until(lambda: members(server) == 1, 10)
        burst(server, 50)
        check_in_order(stream.events(50), 50)
        server.proc.send_signal(signal.SIGTERM)
        assert stream.at_end(10)  # the server closes the connection
    finally:
        stream.close()
    assert server.proc.wait(15) == 0


def test_a_slow_reader_past_the_cap_loses_events_not_framing(run_server: Any) -> None:
    server = run_server(
        "--mode", "broadcast", "--max-queue-bytes", "65536", "--slow-client", "drop"
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    stream = Stream(sock, "/sse/news")
    try:
        assert wait_until(lambda: members(server) == 1, 10)
        with ws_connect(f"{server.ws_url}/ws/news") as sender:
            for index in range(400):  # 4 MB to a reader that takes none of it yet, paced
                sender.send(str(index).ljust(10_000, "."))  # by the sender's own copy
                sender.recv(timeout=10)
        assert members(server) == 1  # dropped events, not a dropped stream
        stream.sock.settimeout(1)
        events = stream.events(400, timeout=5)  # whatever was kept, every chunk whole
        numbers = [int(offset_of(e["id"])) for e in events]
        assert numbers == sorted(numbers) and 0 < len(numbers) < 400
        expected = [str(n - 1).ljust(10_000, ".") for n in numbers]
        assert [e["data"] for e in events] == expected
        assert "(1013)" not in server.log()
    finally:
        stream.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    certfile, keyfile, _ = make_certificate(tmp_path_factory.mktemp("tls"), ca=True)
    return certfile, keyfile


def test_a_stream_over_tls(run_server: Any, cert: tuple[Path, Path]) -> None:
    server = run_server(
        "--mode", "broadcast", "--tls-certfile", str(cert[0]), "--tls-keyfile", str(cert[1])
    )
    context = ssl.create_default_context(cafile=str(cert[0]))

    def wrap() -> socket.socket:
        return context.wrap_socket(plain(server.port), server_hostname="127.0.0.1")

    streams = [Stream(wrap(), "/sse/news") for _ in range(3)]
    try:
        assert all(s.status == 200 and s.chunked for s in streams)
        assert wait_until(lambda: members(server, context) == 3, 10)
        burst(server, 200, context=context)
        for stream in streams:
            check_in_order(stream.events(200), 200)
        server.proc.send_signal(signal.SIGTERM)
        assert all(stream.at_end(10) for stream in streams)
    finally:
        for stream in streams:
            stream.close()
    assert server.proc.wait(15) == 0


def test_under_an_application_that_compresses_its_responses() -> None:
    """An embedding application with compress_response: the stream stays on Tornado's
    write path, so its gzip transform still compresses every event."""
    settings = embed.settings(
        mode="broadcast", env={}, config_path="", flags={"websocket.ping_interval": 0.0}
    )

    async def scenario() -> None:
        rt = embed.Realtime(settings)
        app = tornado.web.Application(rt.routes(), compress_response=True)
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        await rt.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /sse/news HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"content-encoding: gzip" in head.lower()
            sender = await websocket_connect(f"ws://127.0.0.1:{port}/ws/news")
            for index in range(3):
                sender.write_message(str(index).ljust(20, "."))
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            body = b""
            while len(parse_events(body)) < 3:
                size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 10), 16)
                assert size > 0
                data = await asyncio.wait_for(reader.readexactly(size + 2), 10)
                body += inflate.decompress(data[:-2])
            check_in_order(parse_events(body), 3)
            sender.close()
            writer.close()
            await rt.stop(timeout=2.0)
        finally:
            server.stop()
            await server.close_all_connections()

    run(scenario())

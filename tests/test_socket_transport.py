"""transport/socket_transport.py on real TCP sockets over 127.0.0.1, on the test loop
(asyncio, or uvloop with ECHOSERVER_TEST_LOOP=uvloop): reading, pausing, write pressure with
its pause and resume calls, a close that waits for what is kept, an abort with a reset, the
peer's end of stream, connection_lost exactly once and from the loop, and the shared epoll
going away with its last socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys

import pytest
from tornado.websocket import websocket_connect

from echoserver.transport import socket_transport
from echoserver.transport.socket_transport import HIGH_WATER, SocketTransport, poller_for
from tests.conftest import eventually, run

pytestmark = pytest.mark.skipif(not socket_transport.AVAILABLE, reason="needs select.epoll")


class Owner:
    """Records what the transport calls."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.calls: list[str] = []

    def feed(self, data: bytes) -> None:
        self.received += data

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def connection_lost(self) -> None:
        self.calls.append("lost")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of one TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.setblocking(False)
    return server, client


async def read_all(client: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        chunk = await asyncio.wait_for(loop.sock_recv(client, 65536), timeout)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def open_transport(reading: bool = True) -> tuple[SocketTransport, Owner, socket.socket]:
    server, client = tcp_pair()
    owner = Owner()
    transport = SocketTransport(server, owner, poller_for(asyncio.get_running_loop()), reading)
    return transport, owner, client


def test_reads_go_to_feed_and_pausing_stops_them():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        client.send(b"hello")
        assert await eventually(lambda: owner.received == b"hello", 5)
        transport.pause_reading()
        client.send(b" world")
        await asyncio.sleep(0.2)
        assert owner.received == b"hello"
        transport.resume_reading()
        assert await eventually(lambda: owner.received == b"hello world", 5)
        transport.close()
        client.close()
        assert await eventually(lambda: owner.calls == ["lost"], 5)

    run(scenario())


def test_starts_without_reading_when_asked():
    async def scenario() -> None:
        transport, owner, client = open_transport(reading=False)
        client.send(b"early")
        await asyncio.sleep(0.2)
        assert owner.received == b""
        transport.resume_reading()
        assert await eventually(lambda: owner.received == b"early", 5)
        transport.abort()
        client.close()

    run(scenario())


def test_write_pressure_pauses_and_resumes_the_owner_and_keeps_every_byte():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        payload = os.urandom(1024 * 1024)
        for start in range(0, len(payload), 100_000):
            transport.write(payload[start : start + 100_000])
        assert transport.get_write_buffer_size() > HIGH_WATER
        assert owner.calls == ["pause"]  # once, however many writes
        got = await read_all(client, len(payload))
        assert got == payload
        assert await eventually(lambda: transport.get_write_buffer_size() == 0, 5)
        assert owner.calls == ["pause", "resume"]
        transport.write(b"after")
        assert await read_all(client, 5) == b"after"
        transport.close()
        assert await eventually(lambda: owner.calls[-1:] == ["lost"], 5)
        client.close()

    run(scenario())


def test_close_waits_for_what_is_kept_then_ends_the_stream():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        payload = os.urandom(512 * 1024)
        transport.write(payload)
        transport.close()
        assert transport.is_closing()
        assert "lost" not in owner.calls  # not before what is kept has left
        transport.write(b"")  # harmless while closing
        got = await read_all(client, len(payload) + 1)
        assert got == payload  # then end of stream, no reset
        assert await eventually(lambda: owner.calls.count("lost") == 1, 5)
        transport.close()
        transport.abort()
        await asyncio.sleep(0.1)
        assert owner.calls.count("lost") == 1
        client.close()

    run(scenario())


def test_abort_after_reset_resets_the_connection():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        transport.write(os.urandom(512 * 1024))  # more than the buffers take: some is kept
        transport.reset()
        transport.abort()
        assert transport.get_write_buffer_size() == 0
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                if not await asyncio.wait_for(loop.sock_recv(client, 65536), 5):
                    break
        assert owner.calls == ["pause", "lost"]
        client.close()

    run(scenario())


def test_the_peers_end_of_stream_closes_and_is_reported_once_from_the_loop():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        client.send(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert await eventually(lambda: owner.calls == ["lost"], 5)
        assert owner.received == b"last words"
        assert transport.is_closing()
        transport.write(b"too late")  # ignored: the descriptor is closed
        await asyncio.sleep(0.1)
        assert owner.calls == ["lost"]
        client.close()

    run(scenario())


def test_a_reset_from_the_peer_is_a_loss():
    async def scenario() -> None:
        transport, owner, client = open_transport()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert await eventually(lambda: owner.calls == ["lost"], 5)
        transport.write(b"x" * 100)
        await asyncio.sleep(0.05)
        assert owner.calls == ["lost"]

    run(scenario())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_shared_epoll_goes_with_its_last_socket():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fds_before = len(os.listdir("/proc/self/fd"))
        opened = [open_transport() for _ in range(5)]
        poller = poller_for(loop)
        assert all(transport.poller is poller for transport, _, _ in opened)
        assert len(poller.transports) == 5
        for transport, _owner, client in opened:
            client.send(b"x")
            transport.close()
            client.close()
        assert await eventually(lambda: all(o.calls == ["lost"] for _, o, _ in opened), 5)
        assert poller.epoll.closed
        assert poller_for(loop) is not poller  # a new one for the next connection
        poller_for(loop).close()
        assert len(os.listdir("/proc/self/fd")) == fds_before

    run(scenario())


@pytest.mark.gen_test
async def test_an_open_connection_holds_a_socket_transport_and_no_empty_buffers(
    app, http_server, http_port
):
    clients = [await websocket_connect(f"ws://127.0.0.1:{http_port}/ws") for _ in range(2)]
    clients[0].write_message("over the socket transport")
    assert await clients[0].read_message() == "over the socket transport"
    for handler in list(app.server.connections):
        connection = handler.connection
        assert isinstance(connection.transport, SocketTransport)
        assert connection.transport.get_write_buffer_size() == 0
        assert connection.protocol.parser._buffer == b""  # no bytearray until a partial frame
    for client in clients:
        client.close()


@pytest.mark.gen_test
async def test_without_epoll_a_connection_stays_on_the_loops_transport(
    app, http_server, http_port, monkeypatch
):
    # Where select.epoll is missing (not Linux) the connection takes the loop's transport.
    monkeypatch.setattr(socket_transport, "AVAILABLE", False)
    client = await websocket_connect(f"ws://127.0.0.1:{http_port}/ws")
    client.write_message("over the loop's transport")
    assert await client.read_message() == "over the loop's transport"
    (handler,) = list(app.server.connections)
    assert not isinstance(handler.connection.transport, SocketTransport)
    assert handler.connection.transport.get_extra_info("socket") is not None  # the loop's
    client.close()

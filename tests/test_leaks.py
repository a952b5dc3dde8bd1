"""Nothing leaks: connection churn, abrupt drops, malformed requests and resets mid-frame.

The server is a real subprocess; its open descriptors are counted in /proc/<pid>/fd and
its resident memory read from /proc/<pid>/status, before and after 1000 connections come
and go (a third of them vanishing without a closing handshake, some with a TCP reset).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
import urllib.request

import pytest

from tests.conftest import open_connections as connections
from tests.conftest import wait_until
from tests.wspeer import Peer
from tests.wsraw import build_frame, close_payload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8
CYCLES = 1000
BATCH = 20  # connections open at once in each round
FD_TOLERANCE = 4
RSS_TOLERANCE_KB = 3 * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN (SO_LINGER on, zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def churn(port: int, cycles: int, payload: bytes) -> None:
    """`cycles` connections, BATCH at a time: each echoes once, then leaves.

    Two thirds close properly (close frame, wait for the server's, then FIN); a third
    vanish without a closing handshake, half of those with a FIN and half with a RST.
    """
    done = 0
    while done < cycles:
        batch = [Peer(port) for _ in range(min(BATCH, cycles - done))]
        for client in batch:
            client.send_frame(OP_BINARY, payload)
        for n, client in enumerate(batch):
            assert client.recv_frame() == (True, OP_BINARY, payload)
            kind = (done + n) % 6
            if kind == 0:
                client.close()  # FIN, no close frame
            elif kind == 3:
                reset(client.sock)
            else:
                client.send_frame(OP_CLOSE, close_payload(1000))
                assert client.recv_close_code() == 1000
                client.close()
        done += len(batch)


def test_1000_connect_disconnect_cycles_leave_fds_and_rss_flat(run_server):
    server = run_server("--mode", "echo", "--no-log-access")
    pid = server.proc.pid
    payload = os.urandom(2048)
    churn(server.port, 200, payload)  # warm up: imports, allocator arenas, caches
    assert wait_until(lambda: connections(server) == 0, timeout=10)
    fds_before, rss_before = open_fds(pid), rss_kb(pid)

    started = time.monotonic()
    churn(server.port, CYCLES, payload)
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"{CYCLES} cycles took {elapsed:.1f}s"
    assert wait_until(lambda: connections(server) == 0, timeout=10)
    # Descriptors are released as soon as the server notices each close.
    assert wait_until(lambda: open_fds(pid) <= fds_before + FD_TOLERANCE, timeout=10), (
        fds_before,
        open_fds(pid),
    )
    rss_after = rss_kb(pid)
    assert rss_after <= rss_before + RSS_TOLERANCE_KB, (rss_before, rss_after)
    # Every connection was counted closed, with the right code.
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        samples = response.read().decode()
    clean = sum(1 for total in (200, CYCLES) for i in range(total) if i % 3)
    assert f'echoserver_closes_total{{code="1000"}} {float(clean)}' in samples
    assert f'echoserver_closes_total{{code="1006"}} {float(200 + CYCLES - clean)}' in samples
    assert "Traceback" not in server.log()


def test_malformed_http_requests_only_affect_their_own_connection(run_server):
    server = run_server("--mode", "echo")
    port = server.port
    bystander = Peer(port)
    requests = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /ws HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64),  # a TLS hello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        os.urandom(512),
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",  # cut off mid-headers
    ]
    for request in requests:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 5"), (request[:40], answer[:80])
        bystander.send_frame(OP_TEXT, request[:20].hex().encode())
        assert bystander.recv_frame() == (True, OP_TEXT, request[:20].hex().encode())
    # A half-sent request left open, then reset.
    dangling = socket.create_connection(("127.0.0.1", port), timeout=5)
    dangling.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    reset(dangling)
    bystander.send_frame(OP_TEXT, b"still")
    assert bystander.recv_frame() == (True, OP_TEXT, b"still")
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("mode", ["echo", "broadcast"])
def test_tcp_reset_mid_frame_only_affects_that_connection(run_server, mode):
    server = run_server("--mode", mode)
    port = server.port
    bystander = Peer(port)
    partial = [
        build_frame(OP_BINARY, b"x" * 100_000)[:5000],  # mid-payload of a large frame
        build_frame(OP_TEXT, b"hello")[:3],  # mid-header
        build_frame(OP_TEXT, b"a" * 300, fin=False) + build_frame(0x0, b"b" * 300)[:50],
        build_frame(OP_CLOSE, close_payload(1000))[:4],  # mid close frame
    ]
    for n in range(20):
        victim = Peer(port)
        victim.send(partial[n % len(partial)])
        time.sleep(0.005)  # let the server read it
        reset(victim.sock)
        bystander.send_frame(OP_TEXT, b"ok %d" % n)
        assert bystander.recv_frame() == (True, OP_TEXT, b"ok %d" % n)
    assert wait_until(lambda: connections(server) == 1, timeout=10)
    # A reset while the server is sending to that client, too.
    victim = Peer(port)
    victim.send(build_frame(OP_BINARY, b"y" * 500_000))
    reset(victim.sock)
    assert wait_until(lambda: connections(server) == 1, timeout=10)
    bystander.send_frame(OP_CLOSE, close_payload(1000))
    assert bystander.recv_close_code() == 1000
    assert "Traceback" not in server.log()

"""What a hostile client can pin before it is a WebSocket or an event stream: a request that
never completes (limits.request_timeout), connections that fill max_connections while still
in HTTP, one address taking every slot (max_connections_per_ip), and the open-files limit.

Real server subprocesses, raw sockets: the clients here misbehave on purpose.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import make_certificate
from tests.conftest import metric, wait_until
from tests.wsraw import RawClient, build_frame

API_KEY = "k" * 32
SLACK = 1.5  # seconds past the deadline a close may take on a loaded test machine


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """What the server sends until it closes, and how long from now that took."""
    start = time.monotonic()
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def status_of(sock: socket.socket, path: str, extra: str = "") -> int:
    """Send one GET on sock and read its status line (0 when closed without a response)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n"
    try:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            head += chunk
    except (ConnectionResetError, BrokenPipeError):
        return 0
    return int(head.split(b" ", 2)[1])


@contextlib.contextmanager
def closing(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def get(port: int, path: str, source: str = "127.0.0.1") -> int:
    """One GET on a connection of its own, closed after: its status."""
    with closing([connect(port, source)]) as (sock,):
        return status_of(sock, path)


def handshake(port: int, path: str = "/ws", source: str = "127.0.0.1") -> tuple[int, Any]:
    """A WebSocket handshake from `source`: (status, the socket if it opened, else None)."""
    sock = connect(port, source)
    extra = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    status = status_of(sock, path, extra)
    if status != 101:
        sock.close()
        return status, None
    return status, sock


def upgrades(port: int, kept: list[socket.socket], source: str = "127.0.0.1") -> bool:
    """Whether a handshake succeeds now; its socket is kept open in `kept`."""
    status, sock = handshake(port, source=source)
    if sock is not None:
        kept.append(sock)
    return status == 101


def held(server: Any) -> float:
    """Connections the server holds, less the one asking."""
    return metric(server, "echoserver_connections_held") - 1


def echo_works(client: RawClient) -> bool:
    client.send(build_frame(0x1, b"still here"))
    frame = client.recv_frame()
    return frame is not None and frame[2] == b"still here"


# --- 1. the whole request within limits.request_timeout ------------------------------------

INCOMPLETE_BODIES = {
    "healthz": "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "ws": (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ),
    "publish": (
        "POST /api/channels/news/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: text/plain\r\n"
    ),
}


@pytest.fixture
def slow_server(run_server) -> Any:
    return run_server(
        "--mode", "broadcast", "--request-timeout", "1", env={"ECHOSERVER_API_KEY": API_KEY}
    )


@pytest.mark.parametrize("route", sorted(INCOMPLETE_BODIES))
def test_a_body_that_never_completes_is_closed_at_the_deadline(slow_server, route) -> None:
    with closing([connect(slow_server.port)]) as (sock,):
        head = INCOMPLETE_BODIES[route] + "Content-Length: 65536\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 65535)
        data, took = read_until_closed(sock, 1 + SLACK + 5)
    assert took < 1 + SLACK, f"still open after {took:.1f}s"
    assert not data.startswith(b"HTTP/1.1 2"), data[:100]
    assert wait_until(
        lambda: "request did not arrive within limits.request_timeout" in slow_server.log()
    )
    assert metric(slow_server, "echoserver_request_timeouts_total") >= 1


def test_a_trickled_request_is_closed_at_the_deadline_with_408(slow_server) -> None:
    with closing([connect(slow_server.port)]) as (sock,):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        start = time.monotonic()
        received = b""
        # One byte every 0.3 s: each read is prompt, the request never ends.
        for _ in range(int((1 + SLACK) / 0.3) + 2):
            try:
                sock.sendall(b"a")
                sock.settimeout(0.3)
                received += sock.recv(4096)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if received:
                break
        took = time.monotonic() - start
        if received:
            rest, _ = read_until_closed(sock, 3)
            received += rest
    assert took < 1 + SLACK, f"trickle survived {took:.1f}s"
    assert received.startswith(b"HTTP/1.1 408"), received[:100]


def test_keep_alive_gets_a_fresh_deadline_per_request(slow_server) -> None:
    """The deadline runs from the end of the previous request, not from the accept."""
    conn = http.client.HTTPConnection("127.0.0.1", slow_server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/healthz")
            assert conn.getresponse().read()
            time.sleep(0.6)  # 1.8 s in all on one connection, each request well in time
    finally:
        conn.close()


@pytest.fixture
def tls_slow_server(run_server, tmp_path: Path) -> tuple[Any, ssl.SSLContext]:
    certfile, keyfile, _ = make_certificate(tmp_path, ca=True)
    server = run_server(
        "--tls-certfile", str(certfile), "--tls-keyfile", str(keyfile),
        "--request-timeout", "1",
    )  # fmt: skip
    return server, ssl.create_default_context(cafile=str(certfile))


def test_over_tls_an_incomplete_request_is_closed_at_the_deadline(tls_slow_server) -> None:
    server, context = tls_slow_server
    plain = connect(server.port)
    with closing([context.wrap_socket(plain, server_hostname="127.0.0.1")]) as (sock,):
        head = INCOMPLETE_BODIES["healthz"] + "Content-Length: 65536\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 1000)
        _, took = read_until_closed(sock, 1 + SLACK + 5)
    assert took < 1 + SLACK
    # A client that never even finishes the TLS handshake is closed too.
    with closing([connect(server.port)]) as (silent,):
        silent.sendall(b"\x16\x03\x01")  # the start of a ClientHello, no more
        _, took = read_until_closed(silent, 1 + SLACK + 5)
    assert took < 1 + SLACK


# --- connections in HTTP count against max_connections ----------------------------------


def test_connections_in_http_count_against_max_connections(run_server) -> None:
    server = run_server("--max-connections", "5", "--request-timeout", "2")
    port = server.port
    idle = [connect(port) for _ in range(5)]
    kept: list[socket.socket] = []
    with closing(idle), closing(kept):
        assert wait_until(lambda: handshake(port)[0] == 503)  # once all 5 are accepted
        # A full server still answers its probe (the headroom past max_connections).
        assert get(port, "/healthz") == 200
        idle.pop().close()
        assert wait_until(lambda: upgrades(port, kept))  # the freed slot is its
        assert handshake(port)[0] == 503  # 4 idle + 1 WebSocket
        # The idle ones time out (request_timeout 2 s) and give their slots back.
        assert wait_until(lambda: upgrades(port, kept), timeout=2 + 2 * SLACK)
        # The upgraded ones count once each: with the idle ones gone, 5 in all.
        assert wait_until(lambda: held(server) == len(kept))
        while len(kept) < 5:
            assert upgrades(port, kept)
        assert handshake(port)[0] == 503
    # Every slot came back, on every path taken above (close, timeout, refusal, upgrade).
    assert wait_until(lambda: held(server) == 0)
    assert metric(server, "echoserver_handshakes_refused_total", reason="full") >= 3


def test_past_the_headroom_a_connection_is_refused_at_accept(run_server) -> None:
    server = run_server("--max-connections", "2", "--request-timeout", "30")
    with closing([connect(server.port) for _ in range(2 + 8)]):
        assert wait_until(lambda: get(server.port, "/healthz") == 503)
        with closing([connect(server.port)]) as (sock,):
            data, _ = read_until_closed(sock, 5)
        assert data.startswith(b"HTTP/1.1 503"), data[:100]
        assert b"server is full" in data
        assert wait_until(lambda: "refused a connection from 127.0.0.1" in server.log())
    assert wait_until(lambda: get(server.port, "/healthz") == 200)
    assert metric(server, "echoserver_connections_refused_total", reason="full") >= 1


def test_an_event_stream_counts_and_its_end_gives_the_slot_back(run_server) -> None:
    server = run_server("--mode", "broadcast", "--max-connections", "2")
    streams = [connect(server.port) for _ in range(2)]
    with closing(streams):
        assert [status_of(sock, "/sse/news") for sock in streams] == [200, 200]
        assert handshake(server.port)[0] == 503
        assert get(server.port, "/sse/news") == 503
        streams.pop().close()
        kept: list[socket.socket] = []
        with closing(kept):
            assert wait_until(lambda: upgrades(server.port, kept))
    assert wait_until(lambda: held(server) == 0)


# --- 8. one address cannot take every slot ------------------------------------------------


def test_one_address_is_held_to_max_connections_per_ip(run_server) -> None:
    server = run_server("--mode", "broadcast", "--max-connections-per-ip", "3")
    port = server.port
    status, ws = handshake(port)
    assert status == 101
    sse = connect(port)
    assert status_of(sse, "/sse/news") == 200
    idle = connect(port)
    with closing([ws, sse, idle]):
        assert get(port, "/healthz") == 503
        assert handshake(port)[0] == 503
        assert wait_until(lambda: "refused a connection from 127.0.0.1" in server.log())
        # Another address is not affected.
        other: list[socket.socket] = []
        with closing(other):
            assert all(upgrades(port, other, source="127.0.0.2") for _ in range(3))
            assert get(port, "/healthz", source="127.0.0.2") == 503  # its own 3 are taken
        # One of 127.0.0.1's connections ends, and it may connect again.
        idle.close()
        assert wait_until(lambda: get(port, "/healthz") == 200, timeout=5)
        sse.close()  # an event stream's end gives its slot back too
        ws.close()
        kept: list[socket.socket] = []
        with closing(kept):
            for _ in range(3):
                assert wait_until(lambda: upgrades(port, kept), timeout=5)
            assert handshake(port)[0] == 503
    assert wait_until(lambda: get(port, "/healthz") == 200)
    assert metric(server, "echoserver_connections_refused_total", reason="per_address") >= 3


# --- 2. the open-files limit ----------------------------------------------------------------

FILES = 80


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_at_the_open_files_limit_the_server_pauses_instead_of_spinning(run_server, tmp_path):
    # The server under a low open-files limit: prlimit when installed, else the shell's.
    limit = (
        f"exec {shutil.which('prlimit')} --nofile={FILES}:{FILES}"
        if shutil.which("prlimit")
        else f"ulimit -n {FILES} && exec"
    )
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\n{limit} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    server = run_server("--request-timeout", "60", python=str(wrapper))
    port = server.port
    client = RawClient(port)  # a client from before the limit
    assert client.status == 101
    scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    scrape.request("GET", "/healthz")
    assert scrape.getresponse().read()
    held: list[socket.socket] = []
    with closing(held):
        for _ in range(FILES + 20):  # more than the server can hold: the rest wait queued
            held.append(connect(port))
        time.sleep(0.5)
        before = cpu_seconds(server.proc.pid)
        time.sleep(2.0)
        used = cpu_seconds(server.proc.pid) - before
        assert used < 0.5, f"{used:.2f}s of CPU in 2s: spinning"
        assert echo_works(client)
        scrape.request("GET", "/metrics")
        body = scrape.getresponse().read().decode()
        assert 'echoserver_accept_errors_total{reason="emfile"}' in body
        log = server.log()
        assert "Traceback" not in log
        warnings = [line for line in log.splitlines() if "cannot accept connections" in line]
        assert 1 <= len(warnings) <= 2, warnings
    # The held connections are gone: a new client is served.
    kept: list[socket.socket] = []
    with closing(kept):
        assert wait_until(lambda: upgrades(port, kept), timeout=10)
    assert echo_works(client)
    client.close()
    scrape.close()

"""Graceful shutdown on SIGTERM/SIGINT, JSON logs and access lines, and /metrics content.

All against real `python -m echoserver` subprocesses: a drain is watched from outside
(clients, /healthz, the exit status), logs are read from the process's stdout and stderr,
and metrics are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import fetch, run, wait_until
from tests.servers import run_once
from tests.wspeer import Peer
from tests.wsraw import build_frame, close_payload

TOKEN = "tok-3f9a1c-never-logged"
T = TypeVar("T")
OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8


def handshake_status(
    port: int, path: str = "/ws", extra: str = "", *, upgrade: str = "websocket", version: int = 13
) -> int:
    """A raw handshake's status; the socket is closed right after."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: {upgrade}\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            head += chunk
        return int(head.split(b" ", 2)[1])


# --- graceful shutdown --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_drains_then_exits_0(run_server, signum):
    timeout = 2.0
    server = run_server("--shutdown-timeout", str(timeout))
    port = server.port
    polite = Peer(port)  # answers the server's close
    silent = Peer(port)  # reads the close, never answers: the drain must wait for it
    for client in (polite, silent):
        client.send_frame(OP_TEXT, b"hi")
        assert client.recv_frame() == (True, OP_TEXT, b"hi")

    server.proc.send_signal(signum)
    signalled = time.monotonic()
    assert polite.recv_close_code() == 1001
    polite.send_frame(OP_CLOSE, close_payload(1001))
    assert wait_until(polite.at_eof, timeout=5)
    assert silent.recv_close_code() == 1001

    # The drain window: the port still answers, but only to say so.
    status, _, body = fetch(server.url + "/healthz")
    assert status == 503
    assert json.loads(body)["status"] == "draining"
    assert handshake_status(port) == 503  # no new WebSocket clients
    assert time.monotonic() - signalled < timeout

    assert server.proc.wait(15) == 0
    waited = time.monotonic() - signalled
    assert timeout - 0.3 <= waited < timeout + 4, waited  # waited for the silent client
    silent.close()
    log = server.log()
    assert "draining 2 connections" in log
    assert "1 connections did not close in time" in log
    assert "Traceback" not in log
    assert "close=1001" in log


def test_drain_ends_as_soon_as_the_last_client_leaves(run_server):
    server = run_server("--shutdown-timeout", "30")

    async def scenario() -> int | None:
        client = await websocket_connect(server.ws_url + "/ws")
        server.proc.send_signal(signal.SIGTERM)
        assert await client.read_message() is None  # Tornado's client answers the close
        return client.close_code

    started = time.monotonic()
    assert run(scenario()) == 1001
    assert server.proc.wait(15) == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_stops_at_once(run_server, signum, loop):
    """Signalled as soon as it says it is ready: a clean stop (it once died by the signal)."""
    server = run_server("--shutdown-timeout", "30", "--loop", loop)
    started = time.monotonic()
    assert server.stop(signum) == 0
    assert time.monotonic() - started < 5
    assert "stopped" in server.log()


# --- logs ---------------------------------------------------------------------------------


def parse_json_lines(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        record = json.loads(line)  # every line, whoever wrote it
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    return records


@pytest.mark.parametrize("level", ["debug", "info"])
def test_json_logs_every_line_and_structured_access_lines(run_server, level):
    server = run_server(
        "--log-format",
        "json",
        "--log-level",
        level,
        "--auth-token",
        TOKEN,
        "--max-message-size",
        "64",
    )
    port = server.port
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def clients() -> None:
        ok = await websocket_connect(HTTPRequest(server.ws_url + "/ws", headers=auth))
        await ok.write_message("a body that must not be logged at info")
        assert await ok.read_message() == "a body that must not be logged at info"
        ok.close(1000)
        big = await websocket_connect(f"{server.ws_url}/ws?token={TOKEN}")
        await big.write_message("x" * 65)
        assert await big.read_message() is None
        assert big.close_code == 1009
        with pytest.raises(HTTPClientError):
            await websocket_connect(server.ws_url + "/ws")  # no token: 401

    run(clients())
    assert handshake_status(port, f"/ws?token={TOKEN}", "Origin: https://evil.example\r\n") == 403
    assert handshake_status(port, f"/ws?token={TOKEN}", "Origin: http://[\r\n") == 403
    assert fetch(server.url + "/")[0] == 200
    assert fetch(server.url + "/nowhere")[0] == 404
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"BLAH\x00 / HTTP/1.1\r\n\r\n")  # Tornado logs a malformed request
        sock.recv(4096)
    abrupt = Peer(port, path=f"/ws?token={TOKEN}")
    abrupt.close()
    assert wait_until(lambda: sum('"status": 101' in line for line in server.lines) == 3)
    assert server.stop() == 0

    records = parse_json_lines(server.lines)
    loggers = {record["logger"] for record in records}
    assert "tornado.general" in loggers  # Tornado's own lines are JSON too
    access = [r for r in records if r["logger"] == "echoserver.access"]
    ws = [r for r in access if r["path"] == "/ws"]
    # One access line per handshake: 3 upgraded, 1 refused for the token, 2 for the origin.
    assert sorted(r["status"] for r in ws) == [101, 101, 101, 401, 403, 403]
    for record in access:
        assert record["peer"] == "127.0.0.1"
        assert isinstance(record["duration"], float) and record["duration"] >= 0
    assert sorted(r["close"] for r in ws if r["status"] == 101) == [1000, 1006, 1009]
    assert {r["origin"] for r in ws if r["status"] == 403} == {"https://evil.example", "http://["}
    assert {r["status"] for r in access if r["path"] != "/ws"} == {200, 404}
    text = "\n".join(server.lines)
    assert TOKEN not in text
    if level == "info":
        assert "a body that must not be logged" not in text


def test_uncaught_errors_are_json_too():
    """Even a failure to start (the port is taken) comes out as one JSON line per record."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_once("--port", str(port), "--log-format", "json")
    assert result.returncode != 0
    records = parse_json_lines((result.stdout + result.stderr).splitlines())
    assert any("Address already in use" in r.get("exception", "") for r in records)


def test_text_logs_one_access_line_per_handshake(run_server):
    server = run_server("--allowed-origins", "https://app.example")
    port = server.port
    for origin in ["https://app.example", "https://evil.example", None]:
        extra = f"Origin: {origin}\r\n" if origin else ""
        handshake_status(port, "/ws", extra)
    assert wait_until(lambda: sum("echoserver.access" in line for line in server.lines) == 3)
    lines = [line for line in server.lines if "echoserver.access" in line]
    assert sum("status=101 origin=https://app.example" in line for line in lines) == 1
    assert sum("status=403 origin=https://evil.example" in line for line in lines) == 1
    assert sum("status=101 origin=-" in line for line in lines) == 1
    assert all("close=" in line for line in lines if "status=101" in line)


def test_access_log_can_be_turned_off(run_server):
    server = run_server("--no-log-access")
    assert handshake_status(server.port) == 101
    assert fetch(server.url + "/healthz")[0] == 200
    time.sleep(0.3)
    assert "echoserver.access" not in server.log()


# --- metrics ------------------------------------------------------------------------------


def scrape(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = fetch(server.url + "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_echo_traffic_refusals_and_close_codes(run_server):
    server = run_server(
        "--auth-token", TOKEN, "--max-connections", "3", "--max-message-size", "100"
    )  # fmt: skip
    port = server.port
    path = f"/ws?token={TOKEN}"
    a = Peer(port, path=path)
    for payload in (b"abc", b"defgh"):
        a.send_frame(OP_TEXT, payload)
        assert a.recv_frame() == (True, OP_TEXT, payload)
    a.send_frame(OP_BINARY, b"\x00" * 10)
    assert a.recv_frame() == (True, OP_BINARY, b"\x00" * 10)
    b = Peer(port, path=path)
    c = Peer(port, path=path)
    samples = scrape(server)
    assert value(samples, "echoserver_connections", mode="echo", channel="default") == 3
    assert value(samples, "echoserver_messages_received_total") == 3
    assert value(samples, "echoserver_received_bytes_total") == 18
    assert value(samples, "echoserver_messages_sent_total") == 3
    assert value(samples, "echoserver_sent_bytes_total") == 18

    assert handshake_status(port, path) == 503  # full
    b.send_frame(OP_BINARY, b"x" * 101)
    assert b.recv_close_code() == 1009
    b.send_frame(OP_CLOSE, close_payload(1009))
    c.close()  # abrupt: 1006
    a.send_frame(OP_CLOSE, close_payload(1000))
    assert a.recv_close_code() == 1000
    assert wait_until(lambda: value(scrape(server), "echoserver_closes_total", code="1000") == 1)
    assert handshake_status(port, "/ws") == 401
    assert handshake_status(port, path, "Origin: https://evil.example\r\n") == 403
    assert handshake_status(port, path, upgrade="h2c") == 400
    assert handshake_status(port, path, version=99) == 426
    d = Peer(port, path=path)
    d.send_frame(OP_CLOSE)  # a close frame without a status code, as browsers send
    assert d.recv_close_code() is None
    assert wait_until(lambda: value(scrape(server), "echoserver_closes_total", code="1005") == 1)
    # b's oversized frame is skipped and its close frame found: closed at once.
    assert wait_until(lambda: value(scrape(server), "echoserver_closes_total", code="1009") == 1)
    samples = scrape(server)
    assert value(samples, "echoserver_connections", mode="echo", channel="default") == 0
    assert value(samples, "echoserver_handshakes_refused_total", reason="full") == 1
    assert value(samples, "echoserver_handshakes_refused_total", reason="auth") == 1
    assert value(samples, "echoserver_handshakes_refused_total", reason="origin") == 1
    assert value(samples, "echoserver_handshakes_refused_total", reason="bad_request") == 1
    assert value(samples, "echoserver_handshakes_refused_total", reason="version") == 1
    assert value(samples, "echoserver_closes_total", code="1009") == 1
    assert value(samples, "echoserver_closes_total", code="1006") == 1
    # /metrics is Prometheus text, content type included.
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_frame_sent_right_after_the_handshake_reaches_the_channel(run_server, loop):
    """Data that arrives before open() has joined the channel waits for it (it once went
    to channel "default" on uvloop, which reads before pause_reading takes effect)."""
    server = run_server("--mode", "broadcast", "--loop", loop)
    listener = Peer(server.port, path="/ws/room")
    bystander = Peer(server.port, path="/ws")  # channel "default"
    for n in range(10):
        frame = build_frame(OP_TEXT, b"early %d" % n)
        if n % 2:
            sender = Peer(server.port, path="/ws/room")
            sender.send(frame)  # no pause after the 101
        else:  # in the same write as the handshake request
            sender = Peer(server.port, path="/ws/room", with_request=frame)
        assert listener.recv_frame() == (True, OP_TEXT, b"early %d" % n)
        sender.close()
    bystander.send_frame(OP_TEXT, b"own")
    assert bystander.recv_frame() == (True, OP_TEXT, b"own")  # nothing leaked to default


def test_metrics_broadcast_connections_deliveries_and_drops(run_server):
    server = run_server(
        "--mode", "broadcast", "--no-include-sender", "--max-queue-bytes", "1024"
    )  # fmt: skip
    port = server.port
    listeners = [Peer(port, path="/ws/room") for _ in range(2)]
    other = Peer(port, path="/ws/other")
    sender = Peer(port, path="/ws/room")
    for n in range(5):
        sender.send_frame(OP_TEXT, b"m%d" % n)
    for listener in listeners:
        assert [listener.recv_frame() for _ in range(5)] == [
            (True, OP_TEXT, b"m%d" % n) for n in range(5)
        ]
    samples = scrape(server)
    assert value(samples, "echoserver_connections", mode="broadcast", channel="room") == 3
    assert value(samples, "echoserver_connections", mode="broadcast", channel="other") == 1
    assert value(samples, "echoserver_broadcast_deliveries_total", channel="room") == 10
    assert value(samples, "echoserver_broadcast_drops_total", channel="room") == 0

    # A receiver that stops reading, with a tiny receive window: its queue fills and the
    # server drops messages for it rather than buffering without bound.
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_sock.settimeout(10)
    slow_sock.connect(("127.0.0.1", port))
    slow_sock.sendall(
        b"GET /ws/flood HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert slow_sock.recv(4096).startswith(b"HTTP/1.1 101")
    flooder = Peer(port, path="/ws/flood", timeout=20)
    frame = build_frame(OP_BINARY, b"\x00" * 1000)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        flooder.send(frame * 500)  # 0.5 MB a batch
        if value(scrape(server), "echoserver_broadcast_drops_total", channel="flood") > 0:
            break
    samples = scrape(server)
    assert value(samples, "echoserver_broadcast_drops_total", channel="flood") > 0
    assert value(samples, "echoserver_broadcast_deliveries_total", channel="flood") > 0
    # Everyone else is unaffected.
    sender.send_frame(OP_TEXT, b"after")
    for listener in listeners:
        assert listener.recv_frame() == (True, OP_TEXT, b"after")
    # The other channel got none of it: its first message is its neighbour's.
    Peer(port, path="/ws/other").send_frame(OP_TEXT, b"for other")
    assert other.recv_frame() == (True, OP_TEXT, b"for other")
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    slow_sock.close()

"""The connection's edges against real server processes and real clients.

- A client that has its 101 is a member of its channel (on both loops and both brokers).
- The closing handshake: a peer gets the server's close frame and everything sent before
  it, never a reset, whatever it was still sending (blocking clients, as most are).
- A peer that stops reading costs a bounded amount of memory, kernel included, and one
  closed for it (1013) is reset instead of lingering with megabytes unsent.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
import websocket  # websocket-client
import websockets
from websockets.sync.client import connect as sync_connect

from tests.conftest import run, wait_until
from tests.redis_server import RedisServer, redis_server  # noqa: F401 (fixture)
from tests.servers import ServerProcess
from tests.wspeer import Peer
from tests.wsraw import build_frame

JOIN_ROUNDS = 200


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_a_client_with_its_101_gets_the_next_broadcast(
    run_server: Any, request: pytest.FixtureRequest, loop: str, broker: str
) -> None:
    args = ["--mode", "mixed", "--loop", loop]
    if broker == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        args += ["--broker", redis.url]
    server = run_server(*args)

    async def one_round(number: int) -> list[int]:
        # A fresh channel each round: the first joiner subscribes, the others join while
        # that subscription may still be on its way to Redis.
        url = f"{server.ws_url}/ws/join{number}"
        # Two join together, then the third; the broadcast leaves the moment it has its 101.
        clients = list(await asyncio.gather(websockets.connect(url), websockets.connect(url)))
        clients.append(await websockets.connect(url))
        try:
            message = json.dumps({"type": "broadcast", "payload": number})
            await clients[0].send(message)
            got = []
            for client in clients:
                try:
                    while True:
                        reply = json.loads(await asyncio.wait_for(client.recv(), 3))
                        if reply["type"] == "broadcast":
                            got.append(reply["payload"])
                            break
                except TimeoutError:
                    got.append(-1)
            return got
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    async def scenario() -> list[int]:
        missed = []
        for number in range(JOIN_ROUNDS):
            if await one_round(number) != [number] * 3:
                missed.append(number)
                if len(missed) >= 3:
                    break
        return missed

    assert run(scenario(), timeout=150) == []


# --- the closing handshake, with blocking clients -------------------------------------


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@LOOPS
def test_rate_limited_client_gets_its_echoes_and_1008(run_server: Any, loop: str) -> None:
    server = run_server("--rate-limit", "50", "--loop", loop)
    client = websocket.create_connection(server.ws_url + "/ws", timeout=10)
    for number in range(2000):  # all at once, before reading anything
        client.send(f"m{number}")
    echoes = 0
    while True:
        opcode, data = client.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        echoes += 1
    client.close()
    assert int.from_bytes(data[:2], "big") == 1008
    assert 40 <= echoes < 2000  # the burst allowed before the limit, all delivered
    assert "with 1008: rate limit exceeded" in server.log()


@LOOPS
def test_oversized_message_from_a_blocking_client_gets_1009(run_server: Any, loop: str) -> None:
    server = run_server("--max-message-size", "1024", "--loop", loop)
    with sync_connect(server.ws_url + "/ws", open_timeout=10) as client:
        client.send("small")
        assert client.recv(timeout=5) == "small"
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            client.send("x" * 4_000_000)  # keeps sending long after the server has refused it
            client.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def raw_peer(server: ServerProcess) -> Peer:
    return Peer(server.port, "/ws", timeout=10)


@LOOPS
@pytest.mark.parametrize(
    ("bad_frame", "code"),
    [
        (build_frame(0x1, b"unmasked", masked=False), 1002),
        (build_frame(0x1, b"\xff\xfe not UTF-8"), 1007),
    ],
    ids=["protocol-error", "invalid-utf8"],
)
def test_a_peer_still_sending_after_its_error_gets_the_close_frame(
    run_server: Any, bad_frame: bytes, code: int, loop: str
) -> None:
    server = run_server("--loop", loop)
    peer = raw_peer(server)
    peer.send_frame(0x1, b"before")
    # The bad frame, then 4 MB more, all written before the peer reads anything.
    peer.send(bad_frame + build_frame(0x2, b"z" * 40_000) * 100)
    frames = []
    while True:
        frame = peer.recv_frame()
        assert frame is not None, f"reset or EOF before the close frame: {frames}"
        frames.append(frame)
        if frame[1] == 0x8:
            break
    assert frames[0][2] == b"before"
    assert int.from_bytes(frames[-1][2][:2], "big") == code
    peer.send_frame(0x8, code.to_bytes(2, "big"))
    assert wait_until(peer.at_eof, 5)  # then the server closes, cleanly


@LOOPS
def test_drain_1001_reaches_a_client_that_is_busy_sending(run_server: Any, loop: str) -> None:
    server = run_server("--shutdown-timeout", "5", "--loop", loop)
    client = websocket.create_connection(server.ws_url + "/ws", timeout=10)
    stop = threading.Event()

    def send_forever() -> None:
        with_deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < with_deadline:
            try:
                client.send_binary(b"y" * 1000)
            except (OSError, websocket.WebSocketException):
                return

    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    code = None
    try:
        while code is None:
            opcode, data = client.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big")
    finally:
        stop.set()
        sender.join(5)
    assert code == 1001
    assert server.proc.wait(15) == 0


# --- a peer that stops reading -----------------------------------------------------------


def socket_memory(port: int, peer_port: int) -> tuple[str, int] | None:
    """(TCP state, kernel memory queued for sending) of the server's socket to a peer."""
    out = subprocess.run(
        ["ss", "-tanm", f"( sport = :{port} and dport = :{peer_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()[1:]
    if not lines:
        return None
    state = lines[0].split()[0]
    queued = re.search(r"w(\d+)", " ".join(lines))
    return state, int(queued.group(1)) if queued else 0


def broadcast_server(run_server: Any, slow_client: str, loop: str) -> ServerProcess:
    """A broadcast server with a 256 KiB queue cap per client and this slow-client policy."""
    return run_server(
        *("--mode", "broadcast", "--max-queue-bytes", str(256 * 1024)),
        *("--slow-client", slow_client, "--loop", loop),
    )


def never_reading_peer(server: ServerProcess, channel: str) -> Peer:
    return Peer(server.port, f"/ws/{channel}", receive_buffer=4096)


def flood(server: ServerProcess, channel: str, megabytes: int) -> None:
    with sync_connect(f"{server.ws_url}/ws/{channel}", open_timeout=10) as sender:
        chunk = b"f" * 65536
        for _ in range(megabytes * 16):
            sender.send(chunk)
            sender.recv(timeout=10)  # its own copy: paced by a reader that keeps up


@LOOPS
def test_a_never_reading_client_costs_a_bounded_amount(run_server: Any, loop: str) -> None:
    server = broadcast_server(run_server, "drop", loop)
    peer = never_reading_peer(server, "slow")
    flood(server, "slow", 16)
    state, queued = socket_memory(server.port, peer.sock.getsockname()[1])
    # The kernel's share is bounded by the server's fixed send buffer (2 x 128 KiB),
    # not autotuned to megabytes.
    assert state == "ESTAB"
    assert queued <= 2 * 128 * 1024 + 64 * 1024, queued
    peer.close()


@LOOPS
def test_a_slow_client_closed_with_1013_is_reset_not_left_lingering(
    run_server: Any, loop: str
) -> None:
    server = broadcast_server(run_server, "disconnect", loop)
    peer = never_reading_peer(server, "slow")
    flood(server, "slow", 8)
    assert "(1013)" in server.log()
    # Its close frame cannot leave (the peer's window is shut): within the closing bound
    # the server resets the socket instead of holding what it could not send.
    assert wait_until(lambda: socket_memory(server.port, peer.sock.getsockname()[1]) is None, 8)
    peer.close()

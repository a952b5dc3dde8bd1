"""TLS without a penalty: while busy wss clients keep the server saturated, new wss
handshakes still complete promptly, every busy client gets its share, and a burst of new
handshakes all succeed. The load runs in its own process (picows), as a real client would.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.sync.client import connect

from tests.certs import make_certificate
from tests.conftest import run

BUSY_CLIENTS = 8
IN_FLIGHT = 16
LOAD_SECONDS = 8.0

# Each busy client keeps IN_FLIGHT small messages in flight and counts its replies.
LOAD = """
import asyncio, json, ssl, sys
from picows import WSListener, WSMsgType, ws_connect

port, clients, in_flight = (int(arg) for arg in sys.argv[1:4])
seconds = float(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE

class Busy(WSListener):
    def __init__(self):
        self.replies = 0
        self.transport = None
    def on_ws_connected(self, transport):
        self.transport = transport
        for _ in range(in_flight):
            transport.send(WSMsgType.BINARY, b"x" * 32)
    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.BINARY:
            self.replies += 1
            transport.send(WSMsgType.BINARY, b"x" * 32)

async def main():
    busy = []
    for _ in range(clients):
        _, listener = await ws_connect(Busy, f"wss://127.0.0.1:{port}/ws", ssl_context=context)
        busy.append(listener)
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    print(json.dumps([b.replies for b in busy]), flush=True)
    for b in busy:
        b.transport.disconnect()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    certfile, keyfile, _ = make_certificate(tmp_path_factory.mktemp("fair"))
    return str(certfile), str(keyfile)


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def jain(values: list[int]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_new_tls_handshakes_and_busy_clients_are_served_fairly(
    run_server: Any, certificate: tuple[str, str], tmp_path: Path, loop: str
) -> None:
    server = run_server(
        *("--tls-certfile", certificate[0], "--tls-keyfile", certificate[1]),
        *("--loop", loop, "--max-connections", "0", "--no-log-access"),
    )
    load = subprocess.Popen(
        [sys.executable, "-c", LOAD, str(server.port), str(BUSY_CLIENTS), str(IN_FLIGHT),
         str(LOAD_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert load.stdout is not None
        assert load.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # saturated by now
        took = []
        for _ in range(20):
            started = time.monotonic()
            with connect(f"{server.ws_url}/ws", ssl=client_context(), open_timeout=5) as client:
                took.append(time.monotonic() - started)
                client.send("fresh")
                assert client.recv(timeout=5) == "fresh"
        burst = run(handshake_burst(server.ws_url + "/ws", 500), timeout=60)
        replies = json.loads(load.stdout.readline())
        assert load.wait(30) == 0
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    # Bounds far above what the server needs (a few ms), far below a starved handshake's
    # seconds: one busy TLS connection must not monopolise the loop.
    assert max(took) < 1.0, took
    assert sorted(took)[len(took) // 2] < 0.25, took
    assert burst == 500
    assert jain(replies) >= 0.9, replies


async def handshake_burst(url: str, count: int) -> int:
    """New wss connections all at once; how many completed their handshake."""

    async def one() -> bool:
        try:
            async with websockets.connect(url, ssl=client_context(), open_timeout=20):
                return True
        except (OSError, TimeoutError, websockets.WebSocketException):
            return False

    return sum(await asyncio.gather(*(one() for _ in range(count))))

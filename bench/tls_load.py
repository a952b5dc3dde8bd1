"""Load for bench_tls.py: picows clients over ws:// or wss://, one process, uvloop.

    python bench/tls_load.py echo URL --connections 64 --inflight 16 --size 32 --duration 5
    python bench/tls_load.py broadcast URL --receivers 200 --inflight 4 --size 200 --duration 5

Prints "window" when the measured window starts and when it ends (the benchmark reads the
server's CPU time then), then one JSON line. echo: replies per second in the window,
round-trip p50/p99 and Jain's index over connections. broadcast: one sender publishes (a
message carries its sequence number); a broadcast completes when every receiver has it;
deliveries/s and completion p50/p99 over the window. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import struct
import time
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECT_TIMEOUT = 10.0


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bench's own self-signed certificate
    return context


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Echo(WSListener):
    def __init__(self, state: dict[str, Any], inflight: int, size: int) -> None:
        self.state = state
        self.inflight = inflight
        self.padding = b"x" * (size - 8)
        self.replies = 0
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        for _ in range(self.inflight):
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.BINARY, struct.pack("!d", time.perf_counter()) + self.padding)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY:
            return
        if self.state["measuring"]:
            self.replies += 1
            sent = struct.unpack_from("!d", frame.get_payload_as_memoryview())[0]
            self.state["rtts"].append(time.perf_counter() - sent)
        if not self.state["stopping"]:
            self._send()


async def echo(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = {"measuring": False, "stopping": False, "rtts": []}
    context = client_context() if args.url.startswith("wss") else None
    clients = []
    for _ in range(args.connections):
        _, client = await asyncio.wait_for(
            ws_connect(
                lambda: Echo(state, args.inflight, args.size), args.url, ssl_context=context
            ),
            CONNECT_TIMEOUT,
        )
        clients.append(client)
    await asyncio.sleep(args.warmup)
    state["measuring"] = True
    print("window", flush=True)
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - started
    print("window", flush=True)
    state["stopping"] = True
    replies = [c.replies for c in clients]
    for client in clients:
        client.transport.disconnect()
    total = sum(replies)
    rtts = state["rtts"]
    return {
        "msgs_per_s": total / elapsed,
        "rtt_p50_ms": (percentile(rtts, 0.5) or 0) * 1000,
        "rtt_p99_ms": (percentile(rtts, 0.99) or 0) * 1000,
        "jain_index": total**2 / (len(replies) * sum(r * r for r in replies)) if total else 0,
    }


class Receiver(WSListener):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY:
            return
        state = self.state
        seq = struct.unpack_from("!Q", frame.get_payload_as_memoryview())[0]
        left = state["pending"].get(seq)
        if left is None:
            return
        state["deliveries"] += 1
        if left == 1:
            del state["pending"][seq]
            sent = state["sent_at"].pop(seq)
            if state["measuring"]:
                state["completions"].append(time.perf_counter() - sent)
            state["done"].set()
        else:
            state["pending"][seq] = left - 1


async def broadcast(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = {
        "measuring": False,
        "pending": {},
        "sent_at": {},
        "deliveries": 0,
        "completions": [],
        "done": asyncio.Event(),
    }
    context = client_context() if args.url.startswith("wss") else None
    receivers = []
    for _ in range(args.receivers):
        transport, _ = await asyncio.wait_for(
            ws_connect(lambda: Receiver(state), args.url, ssl_context=context), CONNECT_TIMEOUT
        )
        receivers.append(transport)
    sender = receivers[0]  # also a receiver: the server sends it its own broadcasts too
    padding = b"b" * (args.size - 8)
    seq = 0
    deadline = time.perf_counter() + args.warmup + args.duration + 30
    measured_from = time.perf_counter() + args.warmup
    window_end = measured_from + args.duration
    deliveries_at_start = 0
    while time.perf_counter() < window_end and time.perf_counter() < deadline:
        while len(state["pending"]) < args.inflight:
            seq += 1
            state["pending"][seq] = args.receivers
            state["sent_at"][seq] = time.perf_counter()
            sender.send(WSMsgType.BINARY, struct.pack("!Q", seq) + padding)
        state["done"].clear()
        try:
            await asyncio.wait_for(state["done"].wait(), 10)
        except TimeoutError:
            break
        if not state["measuring"] and time.perf_counter() >= measured_from:
            state["measuring"] = True
            print("window", flush=True)
            deliveries_at_start = state["deliveries"]
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    state["measuring"] = False
    print("window", flush=True)
    deliveries = state["deliveries"] - deliveries_at_start
    for transport in receivers:
        transport.disconnect()
    completions = state["completions"]
    return {
        "deliveries_per_s": deliveries / elapsed,
        "p50_ms": (percentile(completions, 0.5) or 0) * 1000,
        "p99_ms": (percentile(completions, 0.99) or 0) * 1000,
        "deliveries": deliveries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["echo", "broadcast"])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    run = echo if args.scenario == "echo" else broadcast
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()

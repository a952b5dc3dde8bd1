"""The load client's common parts: connecting many picows clients, frames, and the figures.

Every load.py subcommand opens its connections with connect_many (bounded in concurrency
and time), answers pings and closes through a Closing listener, and reports with the
helpers here (latency percentiles, run-queue waits, fairness) on one `RESULT {json}` line
(emit). Payload layouts shared by the subcommands (STAMP, SEQ_STAMP) live here too.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import struct
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import procs
import reporting
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE
PING = WSMsgType.PING
STAMP = struct.Struct("<q")  # echo: send time in ns
SEQ_STAMP = struct.Struct("<qq")  # broadcast: sequence number, send time in ns
perf_counter_ns = time.perf_counter_ns
monotonic_ns = time.monotonic_ns  # CLOCK_MONOTONIC on Linux: one clock for every process


def log(text: str) -> None:
    print(f"load: {text}", file=sys.stderr, flush=True)


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def cpu_self() -> float:
    times = os.times()
    return times.user + times.system


def latency_summary(samples_ns: array[int], prefix: str) -> dict[str, Any]:
    values = sorted(samples_ns)
    out: dict[str, Any] = {f"{prefix}_samples": len(values)}
    for name, q in (("p50", 50), ("p99", 99), ("p999", 99.9)):
        v = reporting.percentile(values, q)
        out[f"{prefix}_{name}_ms"] = None if v is None else v / 1e6
    out[f"{prefix}_max_ms"] = values[-1] / 1e6 if values else None
    return out


def run_queue_waits(
    before: tuple[float, float], after: tuple[float, float], elapsed: float
) -> dict[str, float]:
    """Percent of the window the server and the load spent runnable but not running."""
    return {
        "server_wait_pct": 100 * (after[0] - before[0]) / elapsed,
        "load_wait_pct": 100 * (after[1] - before[1]) / elapsed,
    }


def fairness(counts: Sequence[int]) -> dict[str, Any]:
    """How evenly the server served the connections: replies per connection in the window.

    Jain's index is 1.0 when every connection got the same share and 1/n when one got all.
    """
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return {
        "served_connections": sum(1 for c in counts if c),
        "replies_min": min(counts, default=0),
        "replies_median": reporting.median(counts),
        "replies_max": max(counts, default=0),
        "jain_index": total * total / (len(counts) * squares) if squares else None,
    }


async def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)
    return True


async def connect_many(
    url: str | Callable[[int], str],
    factory: Callable[[int], WSListener],
    count: int,
    *,
    concurrency: int,
    timeout: float,
    socket_factory: Callable[[int], socket.socket] | None = None,
    read_buffer: int = 16 * 1024,
) -> list[tuple[WSTransport, Any] | BaseException]:
    """Open `count` connections, at most `concurrency` handshakes at a time, within `timeout`.

    `url` is every connection's, or a function of the connection's index (its own token)."""
    gate = asyncio.Semaphore(concurrency)

    def url_of(i: int) -> str:
        return url(i) if callable(url) else url

    async def one(i: int) -> tuple[WSTransport, Any]:
        async with gate:
            sock_factory = None if socket_factory is None else (lambda _url: socket_factory(i))
            return await ws_connect(
                lambda: factory(i),
                url_of(i),
                websocket_handshake_timeout=min(timeout, 10),
                read_buffer_init_size=read_buffer,
                socket_factory=sock_factory,
                enable_auto_pong=False,
            )

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    results: list[tuple[WSTransport, Any] | BaseException] = []
    for task in tasks:
        if task in done and task.exception() is None:
            results.append(task.result())
        else:
            exc = task.exception() if task in done else None
            results.append(exc or TimeoutError("not connected in time"))
    return results


def all_connected(
    results: Sequence[tuple[WSTransport, Any] | BaseException], what: str
) -> list[Any]:
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for transport, _listener in (r for r in results if not isinstance(r, BaseException)):
            transport.disconnect()
        raise SystemExit(
            f"load: {len(failures)} of {len(results)} {what} connections failed, "
            f"first: {failures[0]!r}"
        )
    return [listener for _transport, listener in results]  # type: ignore[misc]


def hold_limit(count: int) -> None:
    """Raise the file limit; exit when it cannot hold `count` connections and some spare."""
    limit = procs.raise_nofile()
    if count + 100 > limit:
        raise SystemExit(f"load: RLIMIT_NOFILE is {limit}, too low for {count} connections")


def error_counts(results: Sequence[tuple[WSTransport, Any] | BaseException]) -> dict[str, int]:
    """The connections that failed, counted by exception name."""
    return dict(
        collections.Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    )


class Closing(WSListener):
    """Base listener: answers pings (auto-pong is off, so every frame reaches on_ws_frame)
    and a server's close, which it counts."""

    run: Any
    transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def control(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == CLOSE:
            self.run.server_closes += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.run.disconnects += 1


def server_frame_header(size: int) -> bytes:
    """The head of an unmasked binary server frame carrying `size` bytes."""
    if size < 126:
        return bytes([0x82, size])
    if size < 1 << 16:
        return bytes([0x82, 126]) + size.to_bytes(2, "big")
    return bytes([0x82, 127]) + size.to_bytes(8, "big")


def client_frame_header(size: int) -> bytes:
    """The head of a masked binary client frame whose masking key is zero.

    RFC 6455 lets the client pick any key; zero leaves the payload as it is, so frames can
    be built once and stamped, with no masking work per message.
    """
    head = bytearray(server_frame_header(size))
    head[1] |= 0x80
    return bytes(head) + b"\0\0\0\0"


class Idle(Closing):
    def __init__(self, run: Any) -> None:
        self.run = run

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.control(transport, frame)


class Counters:
    server_closes = 0
    disconnects = 0

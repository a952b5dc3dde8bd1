"""`load.py paced`: echo at a fixed total rate, spread over the connections every tick.

Unlike `load.py echo` (a closed loop that keeps messages in flight), this sends on a clock:
every `tick` (2 ms) each connection sends its share of `rate` messages per second, so the
server's reads hold about one message each, as with real clients that each send now and
then. It reports the achieved reply rate, the round trips, what was never answered, and the
server's CPU per reply (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from array import array
from typing import Any

import procstat
from load_client import (
    BINARY,
    STAMP,
    Closing,
    all_connected,
    client_frame_header,
    connect_many,
    cpu_self,
    latency_summary,
    log,
    perf_counter_ns,
    run_queue_waits,
    wait_until,
)
from picows import WSFrame, WSTransport


class PacedRun:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.recording = False
        self.latencies: array[int] = array("q")
        self.server_closes = 0
        self.disconnects = 0


class PacedClient(Closing):
    """One connection: sends when the ticker says so, records each reply's round trip."""

    def __init__(self, run: PacedRun, size: int) -> None:
        self.run = run
        self.head = client_frame_header(size)
        self.tail = bytes(size - STAMP.size)

    def send(self, count: int) -> None:
        if self.transport is None or self.transport.is_disconnected:
            return
        frame = self.head + STAMP.pack(perf_counter_ns()) + self.tail
        self.transport.underlying_transport.write(frame * count)  # one write per tick
        self.run.sent += count

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != BINARY:
            self.control(transport, frame)
            return
        run = self.run
        run.received += 1
        if run.recording:
            sent = STAMP.unpack_from(frame.get_payload_as_memoryview())[0]
            run.latencies.append(perf_counter_ns() - sent)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()


async def pace(clients: list[PacedClient], rate: float, tick: float, stop: asyncio.Event) -> None:
    """Every tick, send what the clock owes (rate x time so far), spread round robin over
    the connections starting where the last tick stopped, one write per connection."""
    start = time.perf_counter()
    owed_total = 0
    sent_total = 0
    turn = 0
    n = len(clients)
    while not stop.is_set():
        owed_total = int(rate * (time.perf_counter() - start))
        due = owed_total - sent_total
        if due > 0:
            per, extra = divmod(due, n)
            for k in range(n):
                count = per + (1 if k < extra else 0)
                if count:
                    clients[(turn + k) % n].send(count)
            turn = (turn + extra) % n
            sent_total = owed_total
        await asyncio.sleep(tick)


async def paced_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < STAMP.size:
        raise SystemExit(f"load: --size must be at least {STAMP.size}")
    run = PacedRun()
    url = f"ws://{args.host}:{args.port}{args.path}"
    results = await connect_many(
        url, lambda _i: PacedClient(run, args.size), args.connections, concurrency=64, timeout=30
    )
    clients: list[PacedClient] = all_connected(results, "paced")
    log(f"{len(clients)} connections open, {args.rate:g} msgs/s every {args.tick * 1e3:g} ms")
    stop = asyncio.Event()
    pacer = asyncio.ensure_future(pace(clients, args.rate, args.tick, stop))
    await asyncio.sleep(args.warmup)

    pid = args.server_pid
    server_cpu0 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits0 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    cpu0, t0, n0, s0 = cpu_self(), time.perf_counter(), run.received, run.sent
    run.recording = True
    await asyncio.sleep(args.duration)
    run.recording = False
    cpu1, t1, n1, s1 = cpu_self(), time.perf_counter(), run.received, run.sent
    server_cpu1 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits1 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    stop.set()
    await pacer
    await wait_until(lambda: run.received >= run.sent, 3)
    elapsed = t1 - t0
    replies = n1 - n0
    server_cpu = server_cpu1 - server_cpu0
    result: dict[str, Any] = {
        "connections": len(clients),
        "rate": args.rate,
        "tick_ms": args.tick * 1e3,
        "size": args.size,
        "duration_s": elapsed,
        "sent_per_s": (s1 - s0) / elapsed,
        "messages": replies,
        "msgs_per_s": replies / elapsed,
        "sent": run.sent,
        "lost": run.sent - run.received,
        "server_us_per_msg": 1e6 * server_cpu / replies if pid and replies else None,
        "load_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "server_cpu_pct": 100 * server_cpu / elapsed if pid else None,
        **run_queue_waits(waits0, waits1, elapsed),
        **latency_summary(run.latencies, "rtt"),
        "server_closes": run.server_closes,
        "disconnects_in_run": run.disconnects,
    }
    for client in clients:
        client.close()
    await asyncio.sleep(0.1)  # let the close frames leave
    return result

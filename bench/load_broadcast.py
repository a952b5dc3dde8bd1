"""`load.py broadcast`: fan-out to every receiver of one channel, the first one sending.

Each broadcast carries a sequence number and its send time; `inflight` are outstanding,
and each one that has reached every receiver sends the next, so the completion latency is
exact and each receiver checks it got every broadcast once and in order. Optional non-reading
clients (open_raw_reader) show what a slow member costs the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import time
from array import array
from typing import Any

import procs
import procstat
from load_client import (
    BINARY,
    SEQ_STAMP,
    STAMP,
    Closing,
    all_connected,
    connect_many,
    cpu_self,
    latency_summary,
    log,
    perf_counter_ns,
    run_queue_waits,
    wait_until,
)
from picows import WSFrame, WSTransport


class BroadcastRun:
    """The sender's side: broadcasts in flight and how many receivers each still awaits."""

    def __init__(self, receivers: int, size: int) -> None:
        self.receivers = receivers
        self.buf = bytearray(size)
        self.sender: WSTransport | None = None
        self.pending: dict[int, list[int]] = {}
        self.next_seq = 0
        self.sending = False
        self.recording = False
        self.deliveries = 0
        self.completed = 0
        self.latencies: array[int] = array("q")
        self.server_closes = 0
        self.disconnects = 0

    def send_next(self) -> None:
        assert self.sender is not None
        seq = self.next_seq
        self.next_seq = seq + 1
        now = perf_counter_ns()
        self.pending[seq] = [self.receivers, now]
        SEQ_STAMP.pack_into(self.buf, 0, seq, now)
        self.sender.send(BINARY, self.buf)

    def delivered(self, seq: int) -> None:
        self.deliveries += 1
        entry = self.pending.get(seq)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.pending[seq]
            self.completed += 1
            if self.recording:
                self.latencies.append(perf_counter_ns() - entry[1])
            if self.sending:
                self.send_next()


class Receiver(Closing):
    """One member of the channel; checks that sequence numbers arrive once and in order."""

    def __init__(self, run: BroadcastRun) -> None:
        self.run = run
        self.expected = 0
        self.gaps = 0
        self.repeats = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != BINARY:
            self.control(transport, frame)
            return
        seq = STAMP.unpack_from(frame.get_payload_as_memoryview())[0]
        if seq == self.expected:
            self.expected = seq + 1
        elif seq > self.expected:
            self.gaps += seq - self.expected
            self.expected = seq + 1
        else:
            self.repeats += 1
        self.run.delivered(seq)


def read_tokens(path: str, count: int) -> list[str]:
    """One token a line, at least `count` of them (every receiver its own)."""
    with open(path) as f:
        tokens = [line.strip() for line in f if line.strip()]
    if len(tokens) < count:
        raise SystemExit(f"load: {path} has {len(tokens)} tokens for {count} receivers")
    return tokens


def cpu_ns(pid: int) -> int:
    """A process's CPU time in ns (every thread, schedstat), 0 for no process."""
    return procstat.read_cpu_ns(pid) if pid else 0


def open_raw_reader(host: str, port: int, path: str, rcvbuf: int) -> socket.socket:
    """A client that completes the handshake and then never reads (small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
        chunk = sock.recv(1)  # byte by byte: read nothing past the response head
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise SystemExit(f"load: slow client handshake failed: {head[:100]!r}")
    return sock


async def broadcast_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < SEQ_STAMP.size:
        raise SystemExit(f"load: --size must be at least {SEQ_STAMP.size}")
    procs.raise_nofile()
    run = BroadcastRun(args.receivers, args.size)
    path = f"{args.path}/{args.channel}"
    url = f"ws://{args.host}:{args.port}{path}"
    tokens = read_tokens(args.tokens, args.receivers) if args.tokens else None
    pid, redis_pid = args.server_pid, args.redis_pid
    # The join phase: from the first connect to the probe's completion plus --join-settle
    # (what the joins set off after their 101: presence writes, webhook requests).
    join_cpu0 = cpu_ns(pid), cpu_ns(redis_pid)
    join_t0 = time.perf_counter()
    results = await connect_many(
        (lambda i: f"{url}?token={tokens[i]}") if tokens else url,
        lambda _i: Receiver(run),
        args.receivers,
        concurrency=64,
        timeout=60,
        read_buffer=max(16 * 1024, args.size + 64),
    )
    join_s = time.perf_counter() - join_t0
    receivers: list[Receiver] = all_connected(results, "receiver")
    run.sender = receivers[0].transport
    slow = [
        open_raw_reader(args.host, args.port, path, args.slow_rcvbuf)
        for _ in range(args.slow_clients)
    ]
    log(f"{len(receivers)} receivers and {len(slow)} non-reading clients on {path}")

    # Probe: broadcast #0 must reach every receiver, which proves they have all joined.
    run.send_next()
    if not await wait_until(lambda: run.completed == 1, 10):
        got = sum(1 for r in receivers if r.expected > 0)
        raise SystemExit(f"load: probe broadcast reached {got} of {len(receivers)} receivers")
    await asyncio.sleep(args.join_settle)
    join_cpu1 = cpu_ns(pid), cpu_ns(redis_pid)
    join = {
        "join_s": join_s,
        "join_joins_per_s": len(receivers) / join_s,
        "join_phase_s": time.perf_counter() - join_t0,
        "join_server_us_per_join": (join_cpu1[0] - join_cpu0[0]) / 1e3 / len(receivers),
    }
    if redis_pid:
        join["join_redis_us_per_join"] = (join_cpu1[1] - join_cpu0[1]) / 1e3 / len(receivers)

    peak = {"rss_kb": procstat.read_rss_kb(pid) if pid else 0}
    rss_before = peak["rss_kb"]
    stop_early: list[str] = []

    async def watch_rss() -> None:
        while True:
            await asyncio.sleep(0.2)
            rss = procstat.read_rss_kb(pid)
            peak["rss_kb"] = max(peak["rss_kb"], rss)
            if rss > args.rss_limit_mb * 1024:
                stop_early.append(f"server RSS {rss // 1024} MB over --rss-limit-mb")
                return

    watcher = asyncio.ensure_future(watch_rss()) if pid else None
    run.sending = True
    for _ in range(args.inflight):
        run.send_next()

    async def sleep_unless_stopped(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop_early:
            await asyncio.sleep(min(0.05, end - time.monotonic()))

    await sleep_unless_stopped(args.warmup)
    server_cpu0 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits0 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    redis0 = cpu_ns(redis_pid)
    rss0 = procstat.read_rss_kb(pid) if pid else 0
    cpu0, t0, d0, c0 = cpu_self(), time.perf_counter(), run.deliveries, run.completed
    run.recording = True
    await sleep_unless_stopped(args.duration)
    run.recording = False
    cpu1, t1, d1, c1 = cpu_self(), time.perf_counter(), run.deliveries, run.completed
    server_cpu1 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits1 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    redis1 = cpu_ns(redis_pid)
    rss1 = procstat.read_rss_kb(pid) if pid else 0
    run.sending = False
    if watcher is not None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    drained = await wait_until(lambda: not run.pending, 10)
    last = run.next_seq  # every receiver should now have seen 0 .. last-1
    lost = sum(r.gaps + (last - r.expected) for r in receivers)
    repeats = sum(r.repeats for r in receivers)
    elapsed = t1 - t0
    deliveries = d1 - d0
    result: dict[str, Any] = {
        "receivers": len(receivers),
        "slow_clients": len(slow),
        "inflight": args.inflight,
        "size": args.size,
        "duration_s": elapsed,
        "broadcasts": c1 - c0,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / elapsed,
        "broadcasts_sent": last,
        "lost": lost,
        "repeated_or_reordered": repeats,
        "undrained_broadcasts": 0 if drained else len(run.pending),
        "server_closes": run.server_closes,
        "load_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        **run_queue_waits(waits0, waits1, elapsed),
        "stopped_early": stop_early[0] if stop_early else None,
        **latency_summary(run.latencies, "completion"),
        **join,
    }
    if redis_pid and deliveries:
        result["redis_us_per_delivery"] = (redis1 - redis0) / 1e3 / deliveries
    if pid:
        result.update(
            server_cpu_s=server_cpu1 - server_cpu0,
            server_cpu_pct=100 * (server_cpu1 - server_cpu0) / elapsed,
            server_us_per_delivery=(
                1e6 * (server_cpu1 - server_cpu0) / deliveries if deliveries else None
            ),
            rss_before_kb=rss_before,
            rss_window_start_kb=rss0,
            rss_end_kb=rss1,
            rss_peak_kb=max(peak["rss_kb"], rss1),
        )
    for sock in slow:
        sock.close()
    for receiver in receivers:
        if receiver.transport is not None:
            receiver.transport.disconnect()
    return result

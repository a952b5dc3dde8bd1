"""`load.py echo` and `load.py handshakes`: throughput, round trips and new connections.

echo keeps `inflight` stamped messages outstanding on each connection and measures the
round trip of each; with --handshakes it also starts a `load.py handshakes` process (a
burst of new connections) while it keeps pumping, to see how handshakes slow the echo.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from array import array
from typing import Any

import procs
import procstat
import reporting
from load_client import (
    BINARY,
    STAMP,
    Closing,
    Counters,
    Idle,
    all_connected,
    client_frame_header,
    connect_many,
    cpu_self,
    fairness,
    latency_summary,
    log,
    perf_counter_ns,
    run_queue_waits,
    wait_until,
)
from picows import WSError, WSFrame, WSTransport, ws_connect


class EchoRun:
    def __init__(self, size: int) -> None:
        self.size = size
        self.sending = True
        self.recording = False
        self.received = 0
        self.outstanding = 0
        self.latencies: array[int] = array("q")
        self.server_closes = 0
        self.disconnects = 0


class EchoClient(Closing):
    """One connection keeping `inflight` messages outstanding; a reply triggers the next.

    With `batch` (the default) the replies to one read's worth of frames leave in one write
    of pre-built frames, instead of one picows send() (one write syscall) per message: this
    cuts the client's CPU per message by about a quarter, so that it stays ahead of a fast
    server on one core. The load is the same: every reply still triggers one new message.
    """

    def __init__(self, run: EchoRun, batch: bool) -> None:
        self.run = run
        self.batch = batch
        self.buf = bytearray(run.size)
        self.head = client_frame_header(run.size)
        self.tail = bytes(run.size - STAMP.size)
        self.out = bytearray()
        self.replies = 0
        self.last = perf_counter_ns()  # time of the last reply (or of the start)

    def frame(self, now: int) -> bytes:
        return self.head + STAMP.pack(now) + self.tail

    def start(self, inflight: int) -> None:
        assert self.transport is not None
        self.last = perf_counter_ns()
        if self.batch:
            frames = b"".join(self.frame(perf_counter_ns()) for _ in range(inflight))
            self.transport.underlying_transport.write(frames)
            return
        for _ in range(inflight):
            STAMP.pack_into(self.buf, 0, perf_counter_ns())
            self.transport.send(BINARY, self.buf)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != BINARY:
            self.control(transport, frame)
            if self.out and frame.last_in_buffer and not transport.is_disconnected:
                transport.underlying_transport.write(bytes(self.out))
                self.out.clear()
            return
        now = perf_counter_ns()
        run = self.run
        run.received += 1
        self.replies += 1
        self.last = now
        if run.recording:
            run.latencies.append(now - STAMP.unpack_from(frame.get_payload_as_memoryview())[0])
        if not run.sending:
            run.outstanding -= 1
        elif self.batch:
            out = self.out
            out += self.head
            out += STAMP.pack(now)
            out += self.tail
            if frame.last_in_buffer:
                transport.underlying_transport.write(bytes(out))
                out.clear()
        else:
            STAMP.pack_into(self.buf, 0, now)
            transport.send(BINARY, self.buf)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.run.disconnects += 1
        self.out.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()


async def echo_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < STAMP.size:
        raise SystemExit(f"load: --size must be at least {STAMP.size}")
    run = EchoRun(args.size)
    url = f"ws://{args.host}:{args.port}{args.path}"
    results = await connect_many(
        url, lambda _i: EchoClient(run, args.batch), args.connections, concurrency=64, timeout=30
    )
    clients: list[EchoClient] = all_connected(results, "echo")
    log(f"{len(clients)} connections open, pumping {args.inflight} in flight each")
    run.outstanding = len(clients) * args.inflight
    for client in clients:
        client.start(args.inflight)
    await asyncio.sleep(args.warmup)

    pid = args.server_pid
    server_cpu0 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits0 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    cpu0, t0, n0 = cpu_self(), time.perf_counter(), run.received
    per_connection = [client.replies for client in clients]
    run.recording = True
    await asyncio.sleep(args.duration)
    run.recording = False
    cpu1, t1, n1 = cpu_self(), time.perf_counter(), run.received
    end_ns = perf_counter_ns()
    # A starved connection's messages never come back, so they are in no percentile; how
    # long the worst-served connection has gone without a reply shows them.
    silent_ms = max((end_ns - client.last) / 1e6 for client in clients)
    server_cpu1 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits1 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
    per_connection = sorted(c.replies - n for c, n in zip(clients, per_connection, strict=True))
    elapsed = t1 - t0
    result: dict[str, Any] = {
        "connections": len(clients),
        "inflight": args.inflight,
        "size": args.size,
        "batch": args.batch,
        "duration_s": elapsed,
        "messages": n1 - n0,
        "msgs_per_s": (n1 - n0) / elapsed,
        "load_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "server_cpu_pct": 100 * (server_cpu1 - server_cpu0) / elapsed if pid else None,
        **run_queue_waits(waits0, waits1, elapsed),
        **latency_summary(run.latencies, "rtt"),
        **fairness(per_connection),
        "longest_silence_ms": silent_ms,
    }
    if args.handshakes:
        t2, n2 = time.perf_counter(), run.received
        result["handshakes"] = await handshake_burst(args)
        t3, n3 = time.perf_counter(), run.received
        result["msgs_per_s_during_handshakes"] = (n3 - n2) / (t3 - t2)

    run.sending = False
    drained = await wait_until(lambda: run.outstanding <= 0, 5)
    result["unanswered"] = 0 if drained else run.outstanding
    result["server_closes"] = run.server_closes
    for client in clients:
        client.close()
    await asyncio.sleep(0.1)  # let the close frames leave
    return result


async def handshake_burst(args: argparse.Namespace) -> dict[str, Any]:
    """Run `load.py handshakes` as a separate process while this one keeps pumping."""
    cmd = [
        sys.executable,
        str(procs.LOAD_SCRIPT),
        "handshakes",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--path",
        args.path,
        "--count",
        str(args.handshakes),
        "--timeout",
        str(args.handshake_timeout),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.handshake_timeout + 20)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": "handshake process did not finish"}
    return procs.parse_result(out.decode(), err.decode(), proc.returncode or 0)


async def handshakes_main(args: argparse.Namespace) -> dict[str, Any]:
    """Open `count` connections all at once; time each until its handshake completes."""
    url = f"ws://{args.host}:{args.port}{args.path}"
    counters = Counters()
    start = time.perf_counter()
    deadline = start + args.timeout

    async def one() -> tuple[float, WSTransport] | str:
        try:
            transport, _ = await asyncio.wait_for(
                ws_connect(
                    lambda: Idle(counters),
                    url,
                    websocket_handshake_timeout=args.timeout,
                    read_buffer_init_size=4096,
                    enable_auto_pong=False,
                ),
                max(0.001, deadline - time.perf_counter()),
            )
        except (asyncio.TimeoutError, OSError, WSError) as exc:
            return type(exc).__name__
        return time.perf_counter() - start, transport

    outcomes = await asyncio.gather(*(one() for _ in range(args.count)))
    times = sorted(o[0] for o in outcomes if not isinstance(o, str))
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if isinstance(outcome, str):
            errors[outcome] = errors.get(outcome, 0) + 1
        else:
            outcome[1].disconnect()
    within = sum(1 for t in times if t <= args.timeout)
    return {
        "count": args.count,
        "timeout_s": args.timeout,
        "completed": within,
        "time_all_s": times[-1] if within == args.count else None,
        "p50_s": reporting.percentile(times, 50),
        "p99_s": reporting.percentile(times, 99),
        "errors": errors,
    }

"""The load generator of the benchmarks: picows WebSocket clients on uvloop, in one process.

The benchmark scripts start it pinned to the load CPU; it can also be run by hand. Each
subcommand logs progress on stderr and prints one line `RESULT {json}` on stdout.

    python bench/load.py echo --port N [--connections 64 --inflight 16 --size 32 ...]
    python bench/load.py handshakes --port N [--count 500 --timeout 5]
    python bench/load.py broadcast --port N [--receivers 1000 --inflight 4 --size 200 ...]
    python bench/load.py idle --port N [--count 10000]   (holds them until stdin closes)
    python bench/load.py fanout --port N [--count 1000]  (broadcasts on command from stdin)
    python bench/load.py fanout --port N --arrival kernel --defer 2.5  (kernel receive times)

Every message carries what is needed to check it: echo payloads start with the send time
(perf_counter_ns, little-endian int64), broadcast payloads with a sequence number and the
send time, so round-trip and completion latencies are exact and every receiver can check
that it got every broadcast exactly once and in order. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop
from picows import WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting

BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE
PING = WSMsgType.PING
STAMP = struct.Struct("<q")  # echo: send time in ns
SEQ_STAMP = struct.Struct("<qq")  # broadcast: sequence number, send time in ns
perf_counter_ns = time.perf_counter_ns
monotonic_ns = time.monotonic_ns  # CLOCK_MONOTONIC on Linux: one clock for every process
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # == SCM_TIMESTAMPNS
TIMESPEC = struct.Struct("ll")  # struct timespec: seconds, nanoseconds (native longs)


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
    url: str,
    factory: Callable[[int], WSListener],
    count: int,
    *,
    concurrency: int,
    timeout: float,
    socket_factory: Callable[[int], socket.socket] | None = None,
    read_buffer: int = 16 * 1024,
) -> list[tuple[WSTransport, Any] | BaseException]:
    """Open `count` connections, at most `concurrency` handshakes at a time, within `timeout`."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[WSTransport, Any]:
        async with gate:
            sock_factory = None if socket_factory is None else (lambda _url: socket_factory(i))
            return await ws_connect(
                lambda: factory(i),
                url,
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


# ---------------------------------------------------------------------------- frames


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


# ---------------------------------------------------------------------------- echo


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
        str(Path(__file__).resolve()),
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


# ---------------------------------------------------------------------------- handshakes


class Idle(Closing):
    def __init__(self, run: Any) -> None:
        self.run = run

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.control(transport, frame)


class Counters:
    server_closes = 0
    disconnects = 0


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


# ---------------------------------------------------------------------------- broadcast


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
    results = await connect_many(
        url,
        lambda _i: Receiver(run),
        args.receivers,
        concurrency=64,
        timeout=60,
        read_buffer=max(16 * 1024, args.size + 64),
    )
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

    pid = args.server_pid
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
    rss0 = procstat.read_rss_kb(pid) if pid else 0
    cpu0, t0, d0, c0 = cpu_self(), time.perf_counter(), run.deliveries, run.completed
    run.recording = True
    await sleep_unless_stopped(args.duration)
    run.recording = False
    cpu1, t1, d1, c1 = cpu_self(), time.perf_counter(), run.deliveries, run.completed
    server_cpu1 = procstat.read_cpu_seconds(pid) if pid else 0.0
    waits1 = procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay()
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
    }
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


# ---------------------------------------------------------------------------- idle


async def wait_stdin_closed(timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(fd, 4096) and not closed.done():
            closed.set_result(True)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(closed, timeout)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def idle_main(args: argparse.Namespace) -> dict[str, Any]:
    limit = procs.raise_nofile()
    if args.count + 100 > limit:
        raise SystemExit(f"load: RLIMIT_NOFILE is {limit}, too low for {args.count} connections")
    counters = Counters()
    url = f"ws://{args.host}:{args.port}{args.path}"
    start = time.perf_counter()
    results = await connect_many(
        url,
        lambda _i: Idle(counters),
        args.count,
        concurrency=args.concurrency,
        timeout=args.connect_timeout,
        socket_factory=procs.source_socket_factory(args.count, args.per_address),
        read_buffer=1024,
    )
    elapsed = time.perf_counter() - start
    transports = [r[0] for r in results if not isinstance(r, BaseException)]
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, BaseException):
            errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    opened = {"opened": len(transports), "failed": len(results) - len(transports)}
    emit("OPEN", opened)
    log(f"{len(transports)} idle connections open in {elapsed:.1f}s; holding until stdin closes")
    held = await wait_stdin_closed(args.hold)
    still_open = sum(1 for t in transports if not t.is_disconnected)
    for transport in transports:
        transport.disconnect()
    return {
        **opened,
        "errors": errors,
        "connect_s": elapsed,
        "still_open_at_end": still_open,
        "server_closes": counters.server_closes,
        "released_by_stdin": held,
    }


# ---------------------------------------------------------------------------- fanout


class FanoutRun:
    """One load process's share of a channel: per broadcast, how many of its connections got
    it and when the first and the last did (CLOCK_MONOTONIC, the same clock in every process
    of the machine, so the processes' timestamps compare)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}  # seq -> [count, first ns, last ns]
        self.repeats = 0
        self.server_closes = 0
        self.disconnects = 0

    def delivered(self, seq: int, now: int | None = None) -> None:
        if now is None:
            now = monotonic_ns()
        entry = self.seen.get(seq)
        if entry is None:
            self.seen[seq] = [1, now, now]
        else:
            # Kernel stamps are recorded in member order, not arrival order.
            entry[0] += 1
            entry[1] = min(entry[1], now)
            entry[2] = max(entry[2], now)


class FanoutReceiver(Closing):
    """A member that records each broadcast's arrival; a repeated or older one is counted."""

    def __init__(self, run: FanoutRun) -> None:
        self.run = run
        self.expected = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in (BINARY, WSMsgType.TEXT):
            self.control(transport, frame)
            return
        seq = SEQ_STAMP.unpack_from(frame.get_payload_as_memoryview())[0]
        if seq < self.expected:
            self.run.repeats += 1
            return
        self.expected = seq + 1
        self.run.delivered(seq)


class KernelArrival:
    """Arrival by the kernel's receive timestamp, with the readers off the CPUs meanwhile.

    Before a broadcast every member stops reading (the transports are paused, so this
    process does nothing while the server fans out); after a deferral longer than the fan-out,
    each member's frame is read straight from its socket with recvmsg, whose SCM_TIMESTAMPNS
    says when the kernel queued it on the socket (CLOCK_REALTIME, turned into CLOCK_MONOTONIC
    here). Each socket is reached through a dup of its descriptor, one at a time, closed at
    once: the process holds close to its limit of open files. The frame is consumed there, so
    picows never sees it; reading resumes afterwards for whatever comes next.
    """

    def __init__(self, members: Sequence[tuple[WSTransport, FanoutReceiver]], size: int) -> None:
        self.members = members
        self.size = size
        self.header = server_frame_header(size)
        self.problems: dict[str, int] = {}

    @staticmethod
    def fd(transport: WSTransport) -> int:
        return int(transport.underlying_transport.get_extra_info("socket").fileno())

    def enable_timestamps(self) -> int:
        """SO_TIMESTAMPNS on every member; the kernel turns receive stamping on lazily (from
        a work queue) once some socket asks, so give it a moment before the first broadcast."""
        enabled = 0
        for transport, _listener in self.members:
            if transport.is_disconnected:
                continue
            with socket.socket(fileno=os.dup(self.fd(transport))) as sock:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            enabled += 1
        return enabled

    def pause(self) -> None:
        for transport, _listener in self.members:
            if not transport.is_disconnected:
                transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        for transport, _listener in self.members:
            if not transport.is_disconnected:
                transport.underlying_transport.resume_reading()

    def collect(self, seq: int, run: FanoutRun) -> None:
        """Read broadcast `seq` off every paused member; record its kernel receive time."""
        offset = realtime_offset_ns()
        for transport, listener in self.members:
            if transport.is_disconnected:
                continue
            try:
                with socket.socket(fileno=os.dup(self.fd(transport))) as sock:
                    stamp = self.read_frame(sock, seq)
            except NotReceived as missing:
                self.problems[str(missing)] = self.problems.get(str(missing), 0) + 1
                continue
            listener.expected = seq + 1  # consumed here: picows must not wait for it
            run.delivered(seq, stamp - offset)

    def read_frame(self, sock: socket.socket, seq: int) -> int:
        """The CLOCK_REALTIME ns at which the kernel received the data frame of `seq`.

        The descriptor is non-blocking (its flags are the transport's), so a frame that is not
        there is EAGAIN, never a wait. Control frames before it are skipped (the server runs
        without pings in this mode, so there should be none)."""
        try:
            for _ in range(8):
                head = sock.recv(2, socket.MSG_PEEK)
                if len(head) < 2:
                    raise NotReceived("connection closed" if not head else "partial frame")
                opcode, length = head[0] & 0x0F, head[1] & 0x7F
                if opcode == 0x8 or (opcode > 0x8 and length > 125):
                    raise NotReceived("close frame")
                if opcode > 0x8:
                    self.read_exactly(sock, 2 + length)
                    continue
                data, stamp = self.read_exactly(sock, len(self.header) + self.size)
                if not data.startswith(self.header):
                    raise NotReceived("unexpected frame")
                if stamp is None:
                    raise NotReceived("no timestamp")
                if SEQ_STAMP.unpack_from(data, len(self.header))[0] != seq:
                    raise NotReceived("another broadcast")
                return stamp
        except BlockingIOError:
            raise NotReceived("nothing to read") from None
        except OSError as exc:
            raise NotReceived(type(exc).__name__) from None
        raise NotReceived("control frames only")

    @staticmethod
    def read_exactly(sock: socket.socket, size: int) -> tuple[bytes, int | None]:
        """`size` bytes and the receive timestamp of the last of them (None if not stamped)."""
        data = b""
        stamp = None
        while len(data) < size:
            chunk, ancillary, _flags, _addr = sock.recvmsg(size - len(data), CMSG_SPACE)
            if not chunk:
                raise NotReceived("partial frame")
            data += chunk
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack_from(raw)
                    stamp = sec * 1_000_000_000 + nsec
        return data, stamp


class NotReceived(Exception):
    """A member whose broadcast could not be read with a receive timestamp (and why)."""


CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)


def realtime_offset_ns(samples: int = 5) -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in ns: of a few readings, the one bracketed most
    tightly by two monotonic readings."""
    best: tuple[int, int] | None = None
    for _ in range(samples):
        before = monotonic_ns()
        real = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, real - (before + after) // 2)
    assert best is not None
    return best[1]


def fanout_payload(seq: int, size: int) -> bytes:
    """A broadcast: sequence number and send time (CLOCK_MONOTONIC ns), padded to `size`."""
    return SEQ_STAMP.pack(seq, monotonic_ns()).ljust(size, b"x")


class StdinLines:
    """Lines from stdin without blocking the loop; None at EOF."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.buffer = b""
        self.eof = False
        self.fd = sys.stdin.fileno()
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        data = os.read(self.fd, 4096)
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.eof = True
            self.queue.put_nowait(None)
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.queue.put_nowait(line.decode().strip())

    async def next(self, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


async def fanout_main(args: argparse.Namespace) -> dict[str, Any]:
    """Open `count` members of one channel, then broadcast on command (several of these
    processes can share a channel; the script that runs them sends the commands):

        OPEN {...}  printed once every connection is open (or failed, or timed out)
        PAUSE       (with --arrival kernel) stop reading on every member; prints PAUSED {}
        SEND <seq>  the first connection sends broadcast <seq>; prints SENT {"seq", "sent_ns"}
        WAIT <seq> <seconds>  wait until every open connection has <seq> (bounded); prints
                    GOT {"seq", "received", "expected", "first_ns", "last_ns"}
        EOF         close everything, print RESULT

    With --arrival kernel, WAIT sleeps --defer seconds, then reads <seq> off every paused
    member with its kernel receive timestamp (see KernelArrival) and resumes reading; the
    first/last times are then when the frames reached the members' sockets.
    """
    if args.size < SEQ_STAMP.size:
        raise SystemExit(f"load: --size must be at least {SEQ_STAMP.size}")
    limit = procs.raise_nofile()
    if args.count + 100 > limit:
        raise SystemExit(f"load: RLIMIT_NOFILE is {limit}, too low for {args.count} connections")
    run = FanoutRun()
    url = f"ws://{args.host}:{args.port}{args.path}/{args.channel}"
    start_ns = monotonic_ns()
    sockets = procs.source_socket_factory(args.count, args.per_address, args.first_address)
    results = await connect_many(
        url,
        lambda _i: FanoutReceiver(run),
        args.count,
        concurrency=args.concurrency,
        timeout=args.connect_timeout,
        socket_factory=sockets,
        read_buffer=1024,
    )
    end_ns = monotonic_ns()
    members = [r for r in results if not isinstance(r, BaseException)]
    transports = [transport for transport, _listener in members]
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, BaseException):
            errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    arrival = KernelArrival(members, args.size) if args.arrival == "kernel" else None
    if arrival is not None:
        arrival.enable_timestamps()
        await asyncio.sleep(0.5)
    emit(
        "OPEN",
        {
            "opened": len(transports),
            "failed": len(results) - len(transports),
            "errors": errors,
            "connect_s": (end_ns - start_ns) / 1e9,
            "start_ns": start_ns,
            "end_ns": end_ns,
        },
    )
    log(f"{len(transports)} members of {args.channel} open in {(end_ns - start_ns) / 1e9:.1f}s")

    commands = StdinLines()
    deadline = time.monotonic() + args.hold
    released = False
    while time.monotonic() < deadline:
        line = await commands.next(max(0.0, deadline - time.monotonic()))
        if line is None:
            released = commands.eof
            break
        verb, *rest = line.split()
        if verb == "PAUSE":
            if arrival is not None:
                arrival.pause()
            emit("PAUSED", {})
        elif verb == "SEND" and transports:
            seq = int(rest[0])
            payload = fanout_payload(seq, args.size)
            transports[0].send(BINARY, payload)
            emit("SENT", {"seq": seq, "sent_ns": SEQ_STAMP.unpack_from(payload)[1]})
        elif verb == "WAIT":
            seq, timeout = int(rest[0]), min(float(rest[1]), args.hold)

            def open_count() -> int:
                return len(transports) - run.disconnects

            def complete(seq: int = seq) -> bool:
                return run.seen.get(seq, [0])[0] >= open_count()

            if arrival is None:
                await wait_until(complete, timeout, step=0.002)
            else:
                await asyncio.sleep(min(args.defer, timeout))
                arrival.collect(seq, run)
                arrival.resume()
            count, first, last = run.seen.get(seq, [0, 0, 0])
            emit(
                "GOT",
                {
                    "seq": seq,
                    "received": count,
                    "expected": open_count(),
                    "first_ns": first or None,
                    "last_ns": last or None,
                },
            )
    still_open = sum(1 for t in transports if not t.is_disconnected)
    for transport in transports:
        transport.disconnect()
    return {
        "opened": len(transports),
        "still_open_at_end": still_open,
        "repeated_or_reordered": run.repeats,
        "server_closes": run.server_closes,
        "released_by_stdin": released,
        "arrival": args.arrival,
        "not_received": arrival.problems if arrival is not None else {},
    }


# ---------------------------------------------------------------------------- reference server


class ServerSide(WSListener):
    """A picows server connection: echoes, or relays to every member of its channel."""

    def __init__(self, members: set[WSTransport] | None) -> None:
        self.members = members

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif kind in (BINARY, WSMsgType.TEXT):
            if self.members is None:
                transport.send(kind, frame.get_payload_as_memoryview())
            else:
                payload = frame.get_payload_as_bytes()
                for member in self.members:
                    member.send(kind, payload)


async def server_main(args: argparse.Namespace) -> dict[str, Any]:
    """A picows server on the same routes: the ceiling a Python server could reach, used to
    check that the load client is not the bottleneck (see bench/README.md)."""
    from picows import WSUpgradeRequest, ws_create_server

    procs.raise_nofile()
    channels: dict[str, set[WSTransport]] = {}

    def route(request: WSUpgradeRequest) -> ServerSide | None:
        path = request.path.decode()
        if path != "/ws" and not path.startswith("/ws/"):
            return None  # 404, which is answer enough for the benchmarks' readiness check
        if args.mode == "echo":
            return ServerSide(None)
        return ServerSide(channels.setdefault(path[4:] or "default", set()))

    server = await ws_create_server(route, args.host, args.port)
    log(f"reference picows server ({args.mode}) on ws://{args.host}:{args.port}/ws")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()
    return {"stopped": True}


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default=procs.HOST)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/ws")

    p = sub.add_parser("echo", help="throughput and round-trip latency")
    target(p)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--inflight", type=int, default=16, help="outstanding messages per connection")
    p.add_argument("--size", type=int, default=32, help="payload bytes (>= 8)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--handshakes", type=int, default=0, help="new connections after the window")
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, default=0, help="read its CPU time from /proc")
    p.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one write per read's worth of replies (default) or one picows send() per message",
    )

    p = sub.add_parser("handshakes", help="N new connections at once")
    target(p)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--timeout", type=float, default=5.0)

    p = sub.add_parser("broadcast", help="fan-out to every receiver on one channel")
    target(p)
    p.add_argument("--channel", default="bench")
    p.add_argument("--receivers", type=int, default=1000, help="the first one also sends")
    p.add_argument("--inflight", type=int, default=4, help="broadcasts outstanding")
    p.add_argument("--size", type=int, default=200, help="payload bytes (>= 16)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, default=0, help="read its CPU and RSS from /proc")
    p.add_argument("--slow-clients", type=int, default=0, help="clients that never read")
    p.add_argument("--slow-rcvbuf", type=int, default=4096, help="their SO_RCVBUF")
    p.add_argument("--rss-limit-mb", type=int, default=4096, help="stop if the server grows past")

    p = sub.add_parser("fanout", help="N members of one channel, broadcasts on command")
    target(p)
    p.add_argument("--channel", default="bench")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--size", type=int, default=100, help="broadcast payload bytes (>= 16)")
    p.add_argument("--concurrency", type=int, default=500, help="handshakes at a time")
    p.add_argument("--per-address", type=int, default=5000, help="connections per source IP")
    p.add_argument("--first-address", type=int, default=2, help="first source: 127.0.0.N")
    p.add_argument("--connect-timeout", type=float, default=120)
    p.add_argument("--hold", type=float, default=900, help="longest life in seconds")
    p.add_argument(
        "--arrival",
        choices=("read", "kernel"),
        default="read",
        help="receive time: when this process reads a frame (default), or the kernel's "
        "receive timestamp, read after --defer with every reader paused during the fan-out",
    )
    p.add_argument("--defer", type=float, default=2.5, help="kernel arrival: seconds to wait")

    p = sub.add_parser("server", help="reference picows server (checks the load client)")
    p.add_argument("--host", default=procs.HOST)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("echo", "broadcast"), default="echo")

    p = sub.add_parser("idle", help="hold N idle connections until stdin closes")
    target(p)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=100, help="handshakes at a time")
    p.add_argument("--per-address", type=int, default=5000, help="connections per source IP")
    p.add_argument("--connect-timeout", type=float, default=120)
    p.add_argument("--hold", type=float, default=300, help="longest hold in seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    handlers = {
        "echo": echo_main,
        "handshakes": handshakes_main,
        "broadcast": broadcast_main,
        "idle": idle_main,
        "fanout": fanout_main,
        "server": server_main,
    }
    result = uvloop.run(handlers[args.command](args))
    emit("RESULT", result)


if __name__ == "__main__":
    main()

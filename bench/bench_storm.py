"""Reconnect storm: how fast one server process accepts a crowd of WebSocket handshakes.

After a restart every client comes back at once. Per run and server (ours and the baseline,
alternating, each fresh, pinned to CPU 0), this script's own client (pinned to CPU 1) opens
`--count` (19,000) connections to one channel with `--concurrency` (500) handshakes in
flight, from source addresses 127.0.0.2, 127.0.0.3, ... (5000 per address), and holds them
until all are open. Reported: handshakes/s (connections / seconds from the first connect to
the last 101), the server's and the client's CPU µs per handshake (schedstat), and how busy
each was: a side near 100 % is the limit of that run.

The client is lean on purpose, so that it is not the limit: a plain asyncio protocol on
uvloop that writes a prepared upgrade request (a fresh Sec-WebSocket-Key each) and checks
the 101's status line, with a fixed pool of `--concurrency` workers rather than a task per
connection. bench_scale.py opens its members with picows clients instead, which cost about
300 µs per handshake themselves, so there the client, not the server, sets the rate.

    python bench/bench_storm.py [--runs 3] [--count 19000] [--only ours|baseline]
    python bench/bench_storm.py client --port N [--count 19000]   (the client, by hand: it
    prints OPEN {json} once all are open and holds them until its stdin closes)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import procstat
import reporting
import runner


class Upgrade(asyncio.Protocol):
    """One client: sends the upgrade request, then waits for the 101's head."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.head = b""
        self.request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # a ping, later on: the run is over before an answer is due
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.done.set_result(self.head.startswith(b"HTTP/1.1 101 "))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def storm(args: argparse.Namespace) -> dict[str, Any]:
    procs.raise_nofile()
    loop = asyncio.get_running_loop()
    head = (
        f"GET {args.path} HTTP/1.1\r\nHost: {procs.HOST}:{args.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    ).encode()
    transports: list[asyncio.BaseTransport] = []
    failures: dict[str, int] = {}
    indexes = iter(range(args.count))
    bound = procs.source_socket_factory(args.count, args.per_address)
    deadline = time.monotonic() + args.timeout

    async def worker() -> None:
        for i in indexes:
            if time.monotonic() > deadline:
                failures["timeout"] = failures.get("timeout", 0) + 1
                continue
            sock = bound(i)
            request = head + base64.b64encode(os.urandom(16)) + b"\r\n\r\n"
            done: asyncio.Future[bool] = loop.create_future()
            upgrade = Upgrade(request, done)
            try:
                await loop.sock_connect(sock, (procs.HOST, args.port))
                transport, _ = await loop.create_connection(lambda u=upgrade: u, sock=sock)
            except OSError as exc:
                sock.close()
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                continue
            transports.append(transport)
            try:
                ok = await asyncio.wait_for(done, max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                ok = False
            if not ok:
                failures["refused"] = failures.get("refused", 0) + 1

    cpu0 = time.process_time()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.count))))
    seconds = time.monotonic() - start
    cpu = time.process_time() - cpu0
    result = {
        "count": args.count,
        "opened": args.count - sum(failures.values()),
        "failures": failures,
        "seconds": seconds,
        "client_cpu_s": cpu,
    }
    # The driver reads the server's CPU now, before the connections close (closing 19,000
    # costs the server too, but is not part of accepting them); EOF on stdin releases us.
    print("OPEN " + json.dumps(result), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for transport in transports:
        transport.abort()
    return result


def client_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(storm(args))


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    port = procs.free_port()
    cmd = procs.server_command(kind, "broadcast", port, uvloop=args.uvloop, custom=args.server_cmd)
    with procs.Server(cmd, port) as server:
        rss0 = server.rss_kb()
        cpu0 = procstat.read_cpu_ns(server.pid)
        client = [
            "client", "--port", str(port), "--count", str(args.count),
            "--concurrency", str(args.concurrency), "--path", args.path,
            "--per-address", str(args.per_address), "--timeout", str(args.timeout),
        ]  # fmt: skip
        cmd = procs.pinned([sys.executable, __file__, *client], procs.LOAD_CPU)
        with subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().decode()  # the client's own deadline bounds it
            server_cpu_s = (procstat.read_cpu_ns(server.pid) - cpu0) / 1e9
            rss1 = server.rss_kb()
            try:
                _, err = proc.communicate(timeout=30)  # closes stdin: the client lets go
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError("the storm client did not exit") from None
        if not line.startswith("OPEN "):
            raise RuntimeError(f"the storm client failed: {err.decode()[-500:]}")
        result = json.loads(line[5:])
    opened = max(1, result["opened"])
    seconds = result["seconds"]
    return {
        **result,
        "handshakes_per_s": result["opened"] / seconds,
        "server_us_per_handshake": server_cpu_s * 1e6 / opened,
        "client_us_per_handshake": result["client_cpu_s"] * 1e6 / opened,
        "server_cpu_pct": 100 * server_cpu_s / seconds,
        "client_cpu_pct": 100 * result["client_cpu_s"] / seconds,
        "rss_growth_mb": (rss1 - rss0) / 1024,
    }


METRICS = [
    reporting.Metric("handshakes/s", "handshakes_per_s", 0),
    reporting.Metric("seconds", "seconds", 2),
    reporting.Metric("server µs/handshake", "server_us_per_handshake", 0),
    reporting.Metric("client µs/handshake", "client_us_per_handshake", 0),
    reporting.Metric("server CPU %", "server_cpu_pct", 0),
    reporting.Metric("client CPU %", "client_cpu_pct", 0),
    reporting.Metric("opened", "opened", 0, ratio=False),
]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    client = argv[:1] == ["client"]
    if client:
        argv = argv[1:]
        parser.add_argument("--port", type=int, required=True)
    else:
        runner.add_server_args(parser)
        parser.add_argument("--json", metavar="PATH", help="also write every run here")
    parser.add_argument("--count", type=int, default=19_000, help="connections to open")
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    parser.add_argument("--path", default="/ws/storm", help="the WebSocket path (a channel)")
    parser.add_argument("--per-address", type=int, default=5000, help="connections per source")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for all to open")
    args = parser.parse_args(argv)
    procs.source_socket_factory(args.count, args.per_address)  # exits when too many
    if client:
        client_main(args)
        return
    runner.apply_common_args(args)
    results, names = runner.run_all(args, one_run)
    print(f"## Reconnect storm: {args.count:,} connections, {args.concurrency} in flight\n")
    print(reporting.summary_table(results, METRICS, names))
    print("\nEvery run:\n")
    reporting.print_footer(args, results, METRICS, names, noise=False)


if __name__ == "__main__":
    main()

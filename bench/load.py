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

This file is the command line; each subcommand lives in its own module (load_echo.py,
load_broadcast.py, load_idle.py, load_fanout.py, load_server.py), on the shared parts in
load_client.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
from load_broadcast import broadcast_main
from load_client import emit
from load_echo import echo_main, handshakes_main
from load_fanout import FanoutRun, fanout_main
from load_idle import idle_main
from load_paced import paced_main
from load_server import server_main

__all__ = ["FanoutRun", "main", "parse_args"]  # FanoutRun: tests/test_bench_scripts.py


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

    p = sub.add_parser("paced", help="echo at a fixed total rate, sent every tick")
    target(p)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate", type=float, default=50_000, help="messages/s over all connections")
    p.add_argument("--tick", type=float, default=0.002, help="seconds between sends")
    p.add_argument("--size", type=int, default=32, help="payload bytes (>= 8)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, default=0, help="read its CPU time from /proc")

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
    p.add_argument(
        "--tokens", metavar="FILE", help="one token a line: receiver i sends ?token=<line i>"
    )
    p.add_argument(
        "--join-settle",
        type=float,
        default=0.0,
        help="seconds after the probe still counted in the join phase (work the joins started)",
    )
    p.add_argument("--redis-pid", type=int, default=0, help="also read this redis-server's CPU")

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
        "paced": paced_main,
        "broadcast": broadcast_main,
        "idle": idle_main,
        "fanout": fanout_main,
        "server": server_main,
    }
    result = uvloop.run(handlers[args.command](args))
    emit("RESULT", result)


if __name__ == "__main__":
    main()

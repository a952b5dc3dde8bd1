"""Echo benchmark: throughput, round-trip latency and handshakes under load, baseline vs ours.

Per run: start the server pinned to CPU 0, then the load (bench/load.py, pinned to CPU 1):
64 connections each keeping 16 messages of 32 bytes in flight (a reply triggers the next
message), 1 s warm-up, then a 5 s window that counts replies and records every round trip.
Right after the window, while the 64 connections keep pumping, a second load process opens
500 new connections at once and reports how many finished their handshake within 5 s.
Runs alternate baseline and ours; the report gives medians and the ratio ours/baseline.

    python bench/bench_echo.py [--runs 3] [--duration 5] [--only ours|baseline]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import reporting
import runner
from reporting import Metric

METRICS = [
    Metric("msgs/s", "msgs_per_s", 0),
    Metric("p50 ms", "rtt_p50_ms", 2),
    Metric("p99 ms", "rtt_p99_ms", 2),
    Metric("fairness", "jain_index", 3),
    Metric("longest silence ms", "longest_silence_ms", 1),
    Metric("handshakes ok", lambda r: r["handshakes"]["completed"], 0),
    Metric("all done s", lambda r: _never_if_none(r["handshakes"]["time_all_s"]), 2),
    Metric("msgs/s in burst", "msgs_per_s_during_handshakes", 0),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
]


def _never_if_none(seconds: float | None) -> float:
    """A burst where some handshakes never finished ranks after every finished one."""
    return float("inf") if seconds is None else seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--inflight", type=int, default=16, help="messages in flight per conn")
    parser.add_argument("--size", type=int, default=32, help="payload bytes (>= 8)")
    parser.add_argument(
        "--handshakes", type=int, default=500, help="new connections opened under load (0 = skip)"
    )
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    args = parser.parse_args()
    runner.apply_common_args(args)
    if args.size < 8:
        parser.error("--size must be at least 8 (the payload carries a timestamp)")
    return args


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with runner.started_server(kind, "echo", uvloop=args.uvloop, custom=args.server_cmd) as server:
        load_args = [
            "echo",
            "--port",
            str(server.port),
            "--connections",
            str(args.connections),
            "--inflight",
            str(args.inflight),
            "--size",
            str(args.size),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--handshakes",
            str(args.handshakes),
            "--handshake-timeout",
            str(args.handshake_timeout),
            "--server-pid",
            str(server.pid),
        ]
        timeout = args.warmup + args.duration + args.handshake_timeout + 90
        result = procs.run_load(load_args, timeout)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
        return result


def main() -> None:
    args = parse_args()
    procs.raise_nofile()
    results, names = runner.run_all(args, one_run)
    print(
        f"## Echo: {args.connections} connections x {args.inflight} in flight, "
        f"{args.size}-byte payload, {args.duration:g} s window after {args.warmup:g} s warm-up\n"
    )
    print(reporting.summary_table(results, METRICS, names))
    print(
        f"\nhandshakes ok = of {args.handshakes} new connections opened at once while the "
        f"pump runs, those done within {args.handshake_timeout:g} s; all done s = time until "
        "the last one (never = some did not finish). p50/p99 are over answered messages: the "
        "messages of a connection the server starves are in neither, so look at fairness "
        "(Jain's index of replies per connection in the window: 1 = even, 1/n = one "
        "connection got everything) and longest silence (the longest any connection had "
        "gone without a reply when the window closed). Lower is better for p50, p99, "
        "longest silence and all done s.\n"
    )
    reporting.print_footer(args, results, METRICS, names)


if __name__ == "__main__":
    main()

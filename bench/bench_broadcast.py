"""Broadcast benchmark: fan-out throughput, server CPU per delivery, slow clients; baseline vs ours.

Default scenario, per run: start the server (broadcast mode) pinned to CPU 0, then the load
pinned to CPU 1: 1000 clients on channel "bench"; the first also sends, keeping 4
broadcasts of 200 bytes in flight (a broadcast is complete when all 1000 got it; each
completion sends the next). 1 s warm-up, 5 s window. Reported: deliveries/s, p50/p99
completion latency, lost and repeated/reordered deliveries (every payload carries a
sequence number, every receiver checks it got each one once and in order), and the
server's CPU microseconds per delivery (/proc/<pid>/stat utime+stime over the window,
divided by the deliveries in the window).

--slow: 20 fast readers plus one client that completes the handshake and never reads
(SO_RCVBUF 4 KB), 64 KB messages, 10 s. Each run does it twice on fresh servers, without
and with the slow client, and reports the server's RSS growth and the fast clients'
delivery rate with the slow client relative to without.

    python bench/bench_broadcast.py [--runs 3] [--only ours|baseline] [--slow]
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
    Metric("deliveries/s", "deliveries_per_s", 0),
    Metric("p50 ms", "completion_p50_ms", 1),
    Metric("p99 ms", "completion_p99_ms", 1),
    Metric("server µs/delivery", "server_us_per_delivery", 2),
    Metric("lost", "lost", 0, ratio=False),
    Metric("repeated", "repeated_or_reordered", 0, ratio=False),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
]


SLOW_METRICS = [
    Metric("fast deliveries/s alone", lambda r: r["alone"]["deliveries_per_s"], 0),
    Metric("with slow client", lambda r: r["slow"]["deliveries_per_s"], 0),
    Metric(
        "rate kept",
        lambda r: r["slow"]["deliveries_per_s"] / r["alone"]["deliveries_per_s"],
        2,
    ),
    Metric("p99 ms alone", lambda r: r["alone"]["completion_p99_ms"], 1),
    Metric("p99 ms with slow", lambda r: r["slow"]["completion_p99_ms"], 1),
    Metric("RSS growth MB alone", lambda r: rss_growth_mb(r["alone"]), 1, ratio=False),
    Metric("RSS growth MB with slow", lambda r: rss_growth_mb(r["slow"]), 1),
    Metric("peak RSS MB with slow", lambda r: r["slow"]["rss_peak_kb"] / 1024, 0),
    Metric("lost (fast)", lambda r: r["alone"]["lost"] + r["slow"]["lost"], 0, ratio=False),
    Metric("server CPU % with slow", lambda r: r["slow"]["server_cpu_pct"], 0, ratio=False),
    Metric("load CPU % with slow", lambda r: r["slow"]["load_cpu_pct"], 0, ratio=False),
]


def rss_growth_mb(r: dict[str, Any]) -> float:
    """From just before the pumping started to the end of the window."""
    return float(r["rss_end_kb"] - r["rss_before_kb"]) / 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.add_argument("--slow", action="store_true", help="the slow-client scenario instead")
    parser.add_argument("--duration", type=float, help="measured seconds (default 5; --slow 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, help="receivers (default 1000; --slow 20)")
    parser.add_argument("--inflight", type=int, default=4, help="broadcasts in flight")
    parser.add_argument("--size", type=int, help="payload bytes (default 200; --slow 65536)")
    parser.add_argument(
        "--rss-limit-mb",
        type=int,
        default=4096,
        help="end a run early when the server's RSS passes this (protects the machine)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    args = parser.parse_args()
    runner.apply_common_args(args)
    if args.duration is None:
        args.duration = 10.0 if args.slow else 5.0
    if args.clients is None:
        args.clients = 20 if args.slow else 1000
    if args.size is None:
        args.size = 65536 if args.slow else 200
    if args.size < 16:
        parser.error("--size must be at least 16 (sequence number and timestamp)")
    if args.clients + 200 > procs.nofile_limit():
        parser.error(f"RLIMIT_NOFILE {procs.nofile_limit()} is too low for {args.clients}")
    return args


def load_once(kind: str, args: argparse.Namespace, slow_clients: int) -> dict[str, Any]:
    with runner.started_server(
        kind, "broadcast", uvloop=args.uvloop, custom=args.server_cmd
    ) as server:
        load_args = [
            "broadcast",
            "--port",
            str(server.port),
            "--receivers",
            str(args.clients),
            "--inflight",
            str(args.inflight),
            "--size",
            str(args.size),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--server-pid",
            str(server.pid),
            "--slow-clients",
            str(slow_clients),
            "--rss-limit-mb",
            str(args.rss_limit_mb),
        ]
        result = procs.run_load(load_args, args.warmup + args.duration + 120)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
        if result.get("stopped_early"):
            reporting.say(f"  stopped early: {result['stopped_early']}")
        return result


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if not args.slow:
        return load_once(kind, args, 0)
    return {"alone": load_once(kind, args, 0), "slow": load_once(kind, args, 1)}


def main() -> None:
    args = parse_args()
    procs.raise_nofile()
    results, names = runner.run_all(args, one_run)
    if args.slow:
        metrics = SLOW_METRICS
        print(
            f"## Broadcast, slow client: {args.clients} fast readers + 1 that never reads, "
            f"{args.size}-byte payload, {args.inflight} in flight, {args.duration:g} s window "
            f"after {args.warmup:g} s warm-up\n"
        )
    else:
        metrics = METRICS
        print(
            f"## Broadcast: {args.clients} clients on one channel, {args.size}-byte payload, "
            f"{args.inflight} broadcasts in flight, {args.duration:g} s window after "
            f"{args.warmup:g} s warm-up\n"
        )
    print(reporting.summary_table(results, metrics, names))
    if args.slow:
        print(
            "\nrate kept = fast clients' deliveries/s with the slow client / without it (1.00 = "
            "unaffected). RSS growth = server VmRSS at the end of the window minus just before "
            "the pumping started; each scenario on a fresh server.\n"
        )
    else:
        print(
            "\nA delivery is one message reaching one client; a broadcast completes when all "
            "clients got it. server µs/delivery = server CPU time (user+system) in the window / "
            "deliveries in the window. Lower is better for p50/p99/µs.\n"
        )
    reporting.print_footer(args, results, metrics, names)


if __name__ == "__main__":
    main()

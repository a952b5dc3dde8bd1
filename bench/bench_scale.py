"""Scale benchmark: memory, accept rate and broadcast cost as connections grow, baseline vs ours.

For each N (default 1000, 5000 and 19000 connections on one process), per run and per server
(fresh, pinned to CPU 0; runs alternate baseline and ours): read the server's RSS, have the
load (`load.py fanout`, pinned to CPU 1) open N members of one channel with 500 handshakes in
flight from source addresses 127.0.0.2, 127.0.0.3, ... and time it (accept rate = N /
seconds), read the RSS again once settled (KB per connection). Then one member sends a
100-byte message K times, one at a time, each once all N got the one before: per broadcast,
the time from the send to the last receiver and the server's CPU time over it / N (CPU µs per
delivery). Medians over the broadcasts of a run, then over runs; ratios ours / baseline.

    python bench/bench_scale.py [--counts 1000,5000,19000] [--runs 3] [--png bench/scale.png]

One load process holds up to 19,000 connections (a process may hold at most 20,000 open
files); the server's and the load's run-queue waits mark disturbed runs as elsewhere in bench/.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting
import runner
from fanout import Members, split
from reporting import Metric

METRICS = [
    Metric("KB/conn", "kb_per_connection", 2),
    Metric("handshakes/s", lambda r: r["connect"]["accept_per_s"], 0),
    Metric("open s", lambda r: r["connect"]["connect_s"], 2),
    Metric("server CPU % open", lambda r: r["connect"]["server_cpu_pct"], 0, ratio=False),
    Metric("load CPU % open", lambda r: r["connect"]["load_cpu_pct"], 0, ratio=False),
    Metric("µs/handshake", lambda r: r["connect"]["server_us_per_handshake"], 0),
    Metric("µs/delivery", "server_us_per_delivery", 2),
    Metric("load µs/delivery", "load_us_per_delivery", 2, ratio=False),
    Metric("last receiver ms", "last_ms", 1),
    Metric("first receiver ms", "first_ms", 2),
    Metric("delivered %", "delivered_pct", 2, ratio=False),
    Metric("RSS after MB", lambda r: r["rss_after_kb"] / 1024, 1),
]
MAX_PER_LOAD = 19_000  # connections per load process: under the 20,000 open files allowed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.set_defaults(quiet_wait=10.0)
    parser.add_argument(
        "--counts",
        default="1000,5000,19000",
        help="comma-separated connection counts, each held by one server process",
    )
    parser.add_argument("--broadcasts", type=int, default=5, help="measured broadcasts per run")
    parser.add_argument("--size", type=int, default=100, help="broadcast payload bytes (>= 16)")
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument(
        "--broadcast-timeout", type=float, default=30.0, help="longest wait for one broadcast"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before reading RSS")
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    parser.add_argument("--png", metavar="PATH", help="draw the curves here (needs matplotlib)")
    args = parser.parse_args(argv)
    runner.apply_common_args(args)
    try:
        args.counts = sorted({int(n) for n in args.counts.split(",")})
    except ValueError:
        parser.error("--counts takes integers separated by commas")
    if not args.counts or args.counts[0] < 2:
        parser.error("--counts must be at least 2 each")
    if not 1 <= args.broadcasts <= 100 or args.size < 16:
        parser.error("--broadcasts must be 1..100 and --size at least 16")
    limit = procs.raise_nofile()
    if min(args.counts[-1], MAX_PER_LOAD) + 100 > limit:
        parser.error(f"RLIMIT_NOFILE hard limit {limit} is too low for {args.counts[-1]}")
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--png needs matplotlib: pip install -e '.[bench]'")
    return args


Result = dict[str, Any]


def waits(server: int, loads: list[int]) -> tuple[float, float]:
    """Run-queue wait so far of the server and of the load process that waited most."""
    return procstat.read_run_delay(server), max(procstat.read_run_delay(pid) for pid in loads)


def cpu_ns(server: int, loads: list[int]) -> tuple[int, int]:
    """CPU time so far of the server and of the busiest load process."""
    return procstat.read_cpu_ns(server), max(procstat.read_cpu_ns(pid) for pid in loads)


def window(before: tuple[float, float], after: tuple[float, float], elapsed: float) -> Result:
    """Run-queue waits of the server and the load over a window, in percent of it."""
    return {
        "server_wait_pct": 100 * (after[0] - before[0]) / elapsed if elapsed > 0 else 0.0,
        "load_wait_pct": 100 * (after[1] - before[1]) / elapsed if elapsed > 0 else 0.0,
        "window_s": elapsed,
    }


def one_run(kind: str, count: int, args: argparse.Namespace) -> Result:
    with runner.started_server(
        kind, "broadcast", uvloop=args.uvloop, custom=args.server_cmd
    ) as server:
        rss_before = procstat.settled_rss(server.pid, args.settle / 2)
        members = Members(
            server.port,
            split(count, MAX_PER_LOAD),
            cpu=procs.LOAD_CPU,
            concurrency=args.concurrency,
            size=args.size,
            connect_timeout=args.connect_timeout,
        )
        try:
            pids = (server.pid, members.pids)
            w0, t0 = waits(*pids), time.monotonic()
            c0 = cpu_ns(*pids)
            connect = members.wait_open(args.connect_timeout + 30)
            elapsed = time.monotonic() - t0
            connect.update(window(w0, waits(*pids), elapsed))
            # Who limited the accept rate: the server near 100 % of its CPU, or the load.
            c1 = cpu_ns(*pids)
            opened = connect["opened"] or 1
            connect.update(
                server_cpu_pct=(c1[0] - c0[0]) / 1e7 / elapsed,
                load_cpu_pct=(c1[1] - c0[1]) / 1e7 / elapsed,
                server_us_per_handshake=(c1[0] - c0[0]) / 1e3 / opened,
                load_us_per_handshake=(c1[1] - c0[1]) / 1e3 / opened,
            )
            rss_after = procstat.settled_rss(server.pid, args.settle)
            seq, probe = members.probe(0, args.broadcast_timeout)
            broadcasts = []
            w0, t0 = waits(*pids), time.monotonic()
            for _ in range(args.broadcasts):
                cpu0 = cpu_ns(*pids)
                result = members.broadcast(seq, args.broadcast_timeout)
                cpu1 = cpu_ns(*pids)
                seq += 1
                received = result["received"] or 1
                result["server_cpu_ms"] = (cpu1[0] - cpu0[0]) / 1e6
                result["server_us_per_delivery"] = (cpu1[0] - cpu0[0]) / 1e3 / received
                # The busiest load process: the whole load when one process holds them all.
                result["load_us_per_delivery"] = (cpu1[1] - cpu0[1]) / 1e3 / received
                broadcasts.append(result)
            phase = window(w0, waits(*pids), time.monotonic() - t0)
            loads = members.finish(30)
        finally:
            members.kill()
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
    opened = connect["opened"]
    received = sum(b["received"] for b in broadcasts)
    expected = sum(b["expected"] for b in broadcasts)
    return {
        "connections": count,
        "connect": connect,
        "broadcast": phase,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "kb_per_connection": (rss_after - rss_before) / opened if opened else None,
        "probe": probe,
        "broadcasts": broadcasts,
        "server_us_per_delivery": reporting.median(
            [b["server_us_per_delivery"] for b in broadcasts]
        ),
        "load_us_per_delivery": reporting.median([b["load_us_per_delivery"] for b in broadcasts]),
        "last_ms": reporting.median([b["last_ms"] for b in broadcasts]),
        "first_ms": reporting.median([b["first_ms"] for b in broadcasts]),
        "delivered_pct": 100 * received / (opened * len(broadcasts)) if opened else 0.0,
        "all_delivered": received == expected == opened * len(broadcasts),
        "load": loads,
    }


def summary(
    all_results: dict[int, dict[str, list[Result]]], names: dict[str, str]
) -> tuple[str, dict[int, dict[str, list[float | None]]]]:
    """One table: per N, the medians of each server and the ratio ours / baseline."""
    rows = []
    medians: dict[int, dict[str, list[float | None]]] = {}
    for count, results in all_results.items():
        medians[count] = {}
        for kind, runs in results.items():
            ok = sum(1 for r in runs if "error" not in r)
            values = [reporting.median([m.value(r) for r in runs]) for m in METRICS]
            medians[count][kind] = values
            row = [f"{count:,}", f"{names[kind]} ({ok}/{len(runs)} runs)"]
            rows.append(
                row + [reporting.fmt(v, m.digits) for v, m in zip(values, METRICS, strict=True)]
            )
        if {"ours", "baseline"} <= set(results):
            pairs = zip(medians[count]["ours"], medians[count]["baseline"], METRICS, strict=True)
            rows.append(
                [f"{count:,}", f"{names['ours']} / baseline"]
                + [
                    reporting.fmt_ratio(reporting.ratio(o, b)) if m.ratio else ""
                    for o, b, m in pairs
                ]
            )
    headers = ["connections", "server (median)", *(m.title for m in METRICS)]
    return reporting.markdown_table(headers, rows), medians


def draw(
    path: str, medians: dict[int, dict[str, list[float | None]]], names: dict[str, str]
) -> None:
    """Three panels against connections: RSS per connection, handshakes/s, and CPU µs per
    delivery with the last receiver's delay on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(medians)
    index = {m.title: i for i, m in enumerate(METRICS)}
    colours = {"ours": "tab:blue", "baseline": "tab:orange"}
    kinds = [k for k in ("baseline", "ours") if all(k in medians[n] for n in counts)]

    def series(kind: str, title: str) -> list[float]:
        values = [medians[n][kind][index[title]] for n in counts]
        return [float("nan") if v is None else v for v in values]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    panels = [
        ("KB/conn", "server RSS per connection (KB)"),
        ("handshakes/s", "handshakes accepted per second"),
        ("µs/delivery", "server CPU per delivery (µs)"),
    ]
    for ax, (title, label) in zip(axes, panels, strict=True):
        for kind in kinds:
            ax.plot(counts, series(kind, title), "o-", color=colours[kind], label=names[kind])
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{n:,}" for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("connections on one process")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    late = axes[2].twinx()
    for kind in kinds:
        late.plot(counts, series(kind, "last receiver ms"), "s--", color=colours[kind], alpha=0.6)
    late.set_ylabel("send to last receiver (ms, dashed)")
    late.set_ylim(bottom=0)
    axes[0].legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    reporting.say(f"curves drawn in {path}")


def main() -> None:
    args = parse_args()

    def stop(signum: int, frame: object) -> None:
        # Not SystemExit: run_interleaved() counts that as one failed run and goes on.
        raise KeyboardInterrupt(f"signal {signum}")  # every server and load is stopped

    # Ctrl-C too, even where the shell started this with SIGINT ignored (in the background).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    kinds = runner.kinds_to_run(args.only)
    names = {k: runner.kind_label(k, args.server_cmd) for k in kinds}
    all_results: dict[int, dict[str, list[Result]]] = {}
    for count in args.counts:
        reporting.say(f"--- {count:,} connections")
        all_results[count] = runner.run_interleaved(
            kinds,
            args.runs,
            lambda kind, _i, n=count: one_run(kind, n, args),
            label=lambda kind, n=count: f"{names[kind]} x {n:,}",
            quiet_wait=args.quiet_wait,
        )
    table, medians = summary(all_results, names)
    print(
        f"## Scale: N members of one channel on one server process; {args.concurrency} "
        f"handshakes in flight; {args.broadcasts} broadcasts of {args.size} bytes, one at a "
        "time\n"
    )
    print(table)
    print(
        "\nKB/conn = server VmRSS growth / connections opened; handshakes/s = connections / "
        "time to open them all; µs/delivery = server CPU time over one broadcast (from "
        "/proc/<pid>/task/*/schedstat) / members that got it, median over the broadcasts "
        "(load µs/delivery: the same for the load process); µs/handshake = server CPU time "
        "while opening / connections; "
        "last / first receiver ms = from the send to the last / first member's receipt "
        "(CLOCK_MONOTONIC in the load); delivered % = deliveries / (members x broadcasts).\n"
    )
    for count, results in all_results.items():
        print(f"\n### {count:,} connections, every run\n")
        print(reporting.runs_table(results, METRICS, names))
        print(reporting.noise_note(results, names))
    print(f"\n{reporting.environment_note(args.uvloop)}")
    if args.server_cmd:
        print(f"custom server: {args.server_cmd}")
    print(f"command: {reporting.command_line()}")
    if args.png:
        draw(args.png, medians, names)
    reporting.write_json(
        args.json,
        {
            "command": reporting.command_line(),
            "environment": reporting.environment_note(args.uvloop),
            "metrics": [m.title for m in METRICS],
            "medians": {str(n): m for n, m in medians.items()},
            "results": {str(n): r for n, r in all_results.items()},
        },
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as exc:
        sys.exit(f"stopped ({exc or 'Ctrl-C'})")

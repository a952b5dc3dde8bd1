"""Paced echo: server CPU per message when each read holds about one message, ours vs picows.

Per run: start the server pinned to CPU 0, then the load (`load.py paced`, CPU 1): 64
connections sending 50,000 messages/s in all, each its share every 2 ms tick (so each of
the server's reads holds about one message), 1 s warm-up, 5 s window. The figure to compare
is the server's CPU µs per message (utime+stime from /proc over the window / replies). The
peer is a picows echo server on uvloop (`load.py server --mode echo`), pinned like ours;
runs alternate picows and ours, and the report gives medians and the ratio ours/picows.
With `--before REV` echoserver as built at REV (bench/prior_build.py, its own venv) runs
too, in turn with the others, and a second table gives each server's ratio to it.

    python bench/bench_paced.py [--rate 50000] [--connections 64] [--runs 3] [--before REV]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import reporting
import runner
from reporting import Metric

METRICS = [
    Metric("server µs/msg", "server_us_per_msg", 2),
    Metric("msgs/s", "msgs_per_s", 0),
    Metric("p50 ms", "rtt_p50_ms", 2),
    Metric("p99 ms", "rtt_p99_ms", 2),
    Metric("lost", "lost", 0, ratio=False),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
]
KINDS = ("picows", "ours")
BEFORE = "before"  # the kind of echoserver built at --before REV


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.add_argument("--rate", type=float, default=50_000, help="messages/s in all")
    parser.add_argument("--tick", type=float, default=0.002, help="seconds between sends")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="payload bytes (>= 8)")
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run echoserver as built at this commit (in its own venv), in turn with the "
        "others, e.g. the merge base: --before $(git merge-base HEAD main)",
    )
    args = parser.parse_args()
    runner.apply_common_args(args)
    if args.size < 8:
        parser.error("--size must be at least 8 (the payload carries a timestamp)")
    return args


def picows_command(port: int) -> list[str]:
    """The peer: bench's picows reference server (on uvloop) in echo mode."""
    return [sys.executable, str(procs.LOAD_SCRIPT), "server", "--mode", "echo", "--port", str(port)]


def before_command(script: Path, port: int, *, uvloop: bool) -> list[str]:
    """echoserver as this checkout's is started, through an earlier build's own script."""
    cmd = procs.server_command("ours", "echo", port, uvloop=uvloop)
    assert cmd[1:3] == ["-m", "echoserver"], cmd
    return [str(script), *cmd[3:]]


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    command: Callable[[int], list[str]] | None = None
    if kind == "picows":
        command = picows_command
    elif kind == BEFORE:
        command = functools.partial(before_command, args.before_script, uvloop=args.uvloop)
    with runner.started_server(
        kind, "echo", uvloop=args.uvloop, custom=args.server_cmd, command=command
    ) as server:
        load_args = [
            "paced",
            "--port",
            str(server.port),
            "--connections",
            str(args.connections),
            "--rate",
            str(args.rate),
            "--tick",
            str(args.tick),
            "--size",
            str(args.size),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--server-pid",
            str(server.pid),
        ]
        result = procs.run_load(load_args, args.warmup + args.duration + 60)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
        return result


def main() -> None:
    args = parse_args()
    kinds = {"ours": ["ours"], "baseline": ["picows"]}.get(args.only or "", list(KINDS))
    names = {"picows": "picows", "ours": runner.kind_label("ours", args.server_cmd)}
    if args.before:
        import prior_build

        args.before_script = prior_build.build(args.before)
        kinds.append(BEFORE)
        names[BEFORE] = f"ours at {args.before}"
    results = runner.run_interleaved(
        kinds,
        args.runs,
        lambda kind, _i: one_run(kind, args),
        label=names.get,
        quiet_wait=args.quiet_wait,
    )
    print(
        f"## Paced echo: {args.connections} connections, {args.rate:,.0f} msgs/s in all, "
        f"sent every {args.tick * 1e3:g} ms, {args.size}-byte payload, {args.duration:g} s "
        f"window after {args.warmup:g} s warm-up\n"
    )
    print(reporting.summary_table(results, METRICS, names, versus="picows"))
    if args.before:
        print()
        print(reporting.summary_table(results, METRICS, names, versus=BEFORE))
    print(
        "\nserver µs/msg = the server's CPU time (utime+stime, /proc) over the window / "
        "replies in it; lost = sent but never answered (waited up to 3 s after sending stopped)."
        " `--only baseline` runs the picows peer alone.\n"
    )
    reporting.print_footer(args, results, METRICS, names)


if __name__ == "__main__":
    main()

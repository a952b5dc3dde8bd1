"""Idle-connection benchmark: server memory per open WebSocket connection, baseline vs ours.

Per run: start the server pinned to CPU 0 and read its RSS (/proc/<pid>/status VmRSS); the
load (pinned to CPU 1) opens N idle connections (default 10000) from source addresses
127.0.0.2, 127.0.0.3, ... so that the ephemeral ports of one address never run out; once
they are all open and the server's RSS has settled, read it again. KB per connection =
(RSS after - RSS before) / connections opened. RLIMIT_NOFILE is raised in the load and in
the server (to the hard limit); N must stay below it.

With `--before REV` a third server runs in turn with the two: echoserver as it was at REV,
built once into its own venv (prior_build.py), so today's code and a change to it are
measured in the same run; the table then also gives ours / before.

    python bench/bench_idle.py [--runs 3] [--connections 10000] [--mode echo|broadcast]
                               [--before REV]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting
import runner
from reporting import Metric

METRICS = [
    Metric("KB/connection", "kb_per_connection", 2),
    Metric("RSS before MB", lambda r: r["rss_before_kb"] / 1024, 1),
    Metric("RSS after MB", lambda r: r["rss_after_kb"] / 1024, 1),
    Metric("opened", "opened", 0, ratio=False),
    Metric("open time s", "connect_s", 1),
    Metric("still open at end", "still_open_at_end", 0, ratio=False),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--mode", choices=("echo", "broadcast"), default="echo")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to wait before reading the RSS"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run echoserver as of this commit (built into its own venv), e.g. "
        "`git merge-base HEAD main`",
    )
    args = parser.parse_args()
    runner.apply_common_args(args)
    limit = procs.raise_nofile()
    if args.connections + 200 > limit:
        parser.error(f"RLIMIT_NOFILE hard limit {limit} is too low for {args.connections}")
    return args


BEFORE = "before"  # the kind run on the --before commit's build


def before_command(args: argparse.Namespace, port: int) -> list[str]:
    """The command of ours, run through the --before build's `echoserver` script."""
    cmd = procs.server_command("ours", args.mode, port, uvloop=args.uvloop)
    assert cmd[1:3] == ["-m", "echoserver"], cmd
    return [str(args.before_script), *cmd[3:]]


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    command = None
    if kind == BEFORE:
        command = functools.partial(before_command, args)
    with runner.started_server(
        kind, args.mode, uvloop=args.uvloop, custom=args.server_cmd, command=command
    ) as server:
        before = procstat.settled_rss(server.pid, args.settle / 2)
        load = procs.LoadProcess(
            ["idle", "--port", str(server.port), "--count", str(args.connections)]
        )
        try:
            opened = json.loads(load.read_line("OPEN", timeout=180))
            after = procstat.settled_rss(server.pid, args.settle)
            result = load.finish(timeout=60)
        finally:
            load.kill()
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
    count = opened["opened"]
    return {
        **result,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_connection": (after - before) / count if count else None,
    }


def main() -> None:
    args = parse_args()
    if args.before:
        import prior_build

        args.before_script = prior_build.build(args.before)
        kinds = [*runner.kinds_to_run(args.only), BEFORE]
        names = {k: runner.kind_label(k, args.server_cmd) for k in kinds}
        names[BEFORE] = f"ours at {args.before}"
        results = runner.run_interleaved(
            kinds,
            args.runs,
            lambda kind, _i: one_run(kind, args),
            label=names.get,
            quiet_wait=args.quiet_wait,
        )
    else:
        results, names = runner.run_all(args, one_run)
    print(f"## Idle connections: {args.connections} open WebSocket connections, {args.mode} mode\n")
    if "baseline" in results or "ours" not in results:
        print(reporting.summary_table(results, METRICS, names))
    if args.before and "ours" in results:
        print(reporting.summary_table(results, METRICS, names, versus=BEFORE))
    print(
        "\nKB/connection = server VmRSS growth / connections opened (user-space memory; the "
        "kernel's socket buffers are not in RSS). Lower is better.\n"
    )
    reporting.print_footer(args, results, METRICS, names, noise=False)


if __name__ == "__main__":
    main()

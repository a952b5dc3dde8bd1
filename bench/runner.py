"""The options every benchmark shares and the loop that runs it: servers in turn, run by run.

A benchmark script gives run_all (or run_interleaved) a function for one run against one
server kind ("baseline" or "ours", or a --server-cmd template standing in for ours); this
module starts that server fresh for it (started_server), waits for a quiet machine first,
and keeps a failed run as {"error": ...} so that it stays out of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import procs
from procstat import wait_quiet
from reporting import Result, say

# The server kinds a benchmark compares; "ours" is replaced by --server-cmd when given.
KINDS = ("baseline", "ours")


def kind_label(kind: str, custom: str | None) -> str:
    return "custom" if kind == "ours" and custom else kind


def add_server_args(parser: argparse.ArgumentParser, *, default_runs: int = 3) -> None:
    """The options every benchmark shares: runs, which servers, custom command, loop."""
    parser.add_argument("--runs", type=int, default=default_runs, help="runs per server")
    parser.add_argument(
        "--only", choices=KINDS, help="benchmark only the baseline or only ours (no ratio)"
    )
    parser.add_argument(
        "--server-cmd",
        metavar="TEMPLATE",
        help="benchmark this command instead of echoserver; {port} and {mode} are replaced, "
        "e.g. 'python -m echoserver --mode {mode} --port {port}'",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for the machine to be idle "
        "(other processes under 15%% busy); 0 = don't wait",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the server and the load at this niceness; e.g. -5 (as root) gives them "
        "priority over other people's processes on a shared machine (default 0)",
    )
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=procs.uvloop_available(),
        help="run both servers on uvloop (echoserver via --loop; one without that flag picks "
        "uvloop itself when installed); --no-uvloop: both on asyncio (default: on when "
        "uvloop is installed)",
    )


def apply_common_args(args: argparse.Namespace) -> None:
    """What the shared options change in this process: file limit and niceness."""
    check_runs(args.runs)
    procs.raise_nofile()
    procs.NICENESS = args.nice  # read by procs' children before they exec


def kinds_to_run(only: str | None) -> list[str]:
    return [only] if only else list(KINDS)


def check_runs(runs: int) -> None:
    if not 1 <= runs <= 50:
        sys.exit("--runs must be between 1 and 50")


@contextlib.contextmanager
def started_server(
    kind: str,
    mode: str,
    *,
    uvloop: bool,
    custom: str | None,
    command: Callable[[int], Sequence[str]] | None = None,
) -> Iterator[procs.Server]:
    """Start one server under test on a free port; stop it on the way out.

    `command(port)`, when given, is the server's command line in place of the kind's."""
    port = procs.free_port()
    server = procs.Server(
        command(port)
        if command is not None
        else procs.server_command(kind, mode, port, uvloop=uvloop, custom=custom),
        port,
    )
    try:
        server.start()
    except Exception as exc:
        raise RuntimeError(f"{kind} server did not start: {exc}\n{server.log_tail()}") from exc
    try:
        yield server
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- {kind} server log (tail) ---\n{server.log_tail()}") from exc
    finally:
        server.stop()


def run_interleaved(
    kinds: Sequence[str], runs: int, one_run: Any, *, label: Any = None, quiet_wait: float = 0
) -> dict[str, list[Result]]:
    """Call one_run(kind, i) for run 1..runs, alternating servers so drift hits both alike.

    Before each run, wait up to `quiet_wait` seconds for the machine to be idle. A run that
    fails is kept as {"error": "..."} and left out of the medians.
    """
    results: dict[str, list[Result]] = {kind: [] for kind in kinds}
    for i in range(1, runs + 1):
        for kind in kinds:
            name = label(kind) if label else kind
            waited, busy = wait_quiet(quiet_wait) if quiet_wait > 0 else (0.0, 0.0)
            say(
                f"run {i}/{runs}: {name} (machine {busy:.0f}% busy"
                f"{f' after waiting {waited:.0f}s' if waited >= 1 else ''}) ..."
            )
            started = time.monotonic()
            try:
                result = one_run(kind, i)
            except (RuntimeError, TimeoutError, OSError, SystemExit) as exc:
                text = str(exc).strip() or repr(exc)
                result = {"error": text.splitlines()[0]}
                say(f"run {i}/{runs}: {name} FAILED: {text}")
            else:
                say(f"run {i}/{runs}: {name} done in {time.monotonic() - started:.1f}s")
            result["busy_before_pct"] = busy
            results[kind].append(result)
    return results


def run_all(
    args: argparse.Namespace, one_run: Callable[[str, argparse.Namespace], Result]
) -> tuple[dict[str, list[Result]], dict[str, str]]:
    """Every run of every server (interleaved), and the servers' display names."""
    kinds = kinds_to_run(args.only)
    names = {k: kind_label(k, args.server_cmd) for k in kinds}
    results = run_interleaved(
        kinds,
        args.runs,
        lambda kind, _i: one_run(kind, args),
        label=names.get,
        quiet_wait=args.quiet_wait,
    )
    return results, names

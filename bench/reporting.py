"""What a benchmark prints: statistics, Metric columns, markdown tables and the footer.

The footer (print_footer) says every run, the run-queue noise of each, where and how the
figures were taken (environment_note) and the exact command (command_line), and writes the
raw results as JSON when asked. Progress goes to stderr (say) so stdout is the report alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from procs import LOAD_CPU, REPO_DIR, SERVER_CPU, can_pin


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, nearest rank; None if empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline is None or baseline == 0:
        return None
    if float("inf") in (ours, baseline):
        return None
    return ours / baseline


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    if round(value, digits) == 0:
        value = 0.0  # no "-0.0"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def command_line() -> str:
    """The exact command that produced a report, runnable from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_DIR)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=5, check=False
    ).stdout.strip()


def git_revision() -> str:
    """The checkout's short commit, "+dirty" when tracked files have changed."""
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def environment_note(uvloop: bool) -> str:
    """One line saying where and how the figures were taken."""
    import tornado

    pinning = (
        f"server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}"
        if can_pin()
        else "NOT pinned (taskset missing or < 2 CPUs)"
    )
    load1, _, _ = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, {pinning}; Python {platform.python_version()}, "
        f"Tornado {tornado.version}, loop {'uvloop' if uvloop else 'asyncio'}; "
        f"git {git_revision()}; load average at end {load1:.2f}"
    )


def say(text: str) -> None:
    """Progress, on stderr so that stdout carries only the report."""
    print(text, file=sys.stderr, flush=True)


Result = dict[str, Any]


def _windows(result: Result) -> list[Result]:
    """The measured windows of a run: itself, or its nested scenarios."""
    if "server_wait_pct" in result:
        return [result]
    return [v for v in result.values() if isinstance(v, dict) and "server_wait_pct" in v]


def disturbed(result: Result, limit: float = 5.0) -> bool:
    """Did the server or the load wait for its CPU more than `limit` % of a window?"""
    return any(w["server_wait_pct"] > limit or w["load_wait_pct"] > limit for w in _windows(result))


class Metric:
    """One column of a report: how to read it from a run's result and how to print it."""

    def __init__(self, title: str, key: Any, digits: int = 1, ratio: bool = True) -> None:
        self.title = title
        self.key = key if callable(key) else (lambda r, k=key: r.get(k))
        self.digits = digits
        self.ratio = ratio

    def value(self, result: Result) -> float | None:
        if "error" in result:
            return None
        try:
            v = self.key(result)
        except (KeyError, TypeError):
            return None
        return None if v is None else float(v)


def summary_table(
    results: dict[str, list[Result]],
    metrics: Sequence[Metric],
    names: dict[str, str],
    *,
    versus: str | None = None,
) -> str:
    """Medians per server, then the ratio ours/baseline when both ran; with `versus`, the
    ratio of every other server's medians to that one's instead."""
    rows = []
    medians: dict[str, list[float | None]] = {}
    for kind, runs in results.items():
        ok = sum(1 for r in runs if "error" not in r)
        medians[kind] = [median([m.value(r) for r in runs]) for m in metrics]
        rows.append(
            [f"{names[kind]} ({ok}/{len(runs)} runs)"]
            + [fmt(v, m.digits) for v, m in zip(medians[kind], metrics, strict=True)]
        )
    if versus is not None and versus in medians:
        for kind in medians:
            if kind == versus:
                continue
            rows.append(
                [f"{names[kind]} / {names[versus]}"]
                + [
                    fmt_ratio(ratio(o, b)) if m.ratio else ""
                    for o, b, m in zip(medians[kind], medians[versus], metrics, strict=True)
                ]
            )
    elif "baseline" in medians and "ours" in medians:
        rows.append(
            [f"{names['ours']} / baseline"]
            + [
                fmt_ratio(ratio(o, b)) if m.ratio else ""
                for o, b, m in zip(medians["ours"], medians["baseline"], metrics, strict=True)
            ]
        )
    return markdown_table(["server (median)", *(m.title for m in metrics)], rows)


def runs_table(
    results: dict[str, list[Result]], metrics: Sequence[Metric], names: dict[str, str]
) -> str:
    """Every run, so that the spread (noise) is visible."""
    rows = []
    for kind, runs in results.items():
        for i, r in enumerate(runs, 1):
            if "error" in r:
                rows.append([f"{names[kind]} #{i}", "FAILED"] + [""] * (len(metrics) - 1))
            else:
                label = f"{names[kind]} #{i}{' (disturbed)' if disturbed(r) else ''}"
                rows.append([label] + [fmt(m.value(r), m.digits) for m in metrics])
    return markdown_table(["run", *(m.title for m in metrics)], rows)


def noise_note(results: dict[str, list[Result]], names: dict[str, str]) -> str:
    """Run-queue waits of every run: time the server or the load was runnable but another
    process had its CPU. More than a few percent means the run was disturbed. Failures too."""
    parts = []
    failures = []
    for kind, runs in results.items():
        cells = []
        for i, r in enumerate(runs, 1):
            if "error" in r:
                failures.append(f"- {names[kind]} #{i} failed: {r['error'][:200]}")
            ws = _windows(r)
            cells.append(
                "+".join(f"{w['server_wait_pct']:.0f}/{w['load_wait_pct']:.0f}" for w in ws)
                if ws
                else "-"
            )
        parts.append(f"{names[kind]} {', '.join(cells)}")
    note = (
        "\nrun-queue wait % in the window, server/load, per run (time runnable while another "
        f"process had the CPU; > 5 marks a run disturbed): {'; '.join(parts)}"
    )
    return "\n".join([note, *failures])


def write_json(path: str | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        say(f"raw results written to {path}")


def print_footer(
    args: argparse.Namespace,
    results: Any,
    metrics: Any,
    names: Any,
    *,
    noise: bool = True,
) -> None:
    """What every benchmark prints after its summary: each run, noise, machine, command."""
    print(runs_table(results, metrics, names))
    if noise:
        print(noise_note(results, names))
    print(f"\n{environment_note(args.uvloop)}")
    if args.server_cmd:
        print(f"custom server: {args.server_cmd}")
    print(f"command: {command_line()}")
    write_json(args.json, {"command": command_line(), "results": results})

"""The scale benchmarks still run: bench_scale.py, bench_100k.py and bench_storm.py, tiny.

CI does not run the benchmarks; these run each script as a real subprocess, as a person
would, with a few dozen or hundred connections, and check the figures in its JSON output,
so that a change to the server, the load or the harness cannot leave them broken unnoticed.
They check that every member got every broadcast and that the figures are present and
positive, never how large or small they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import require_redis_server
from tests.servers import ROOT

BENCH = ROOT / "bench"

pytestmark = pytest.mark.timeout(90)


def run_script(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_bench_scale_measures_every_figure_at_a_tiny_scale(tmp_path: Path) -> None:
    pytest.importorskip("picows")
    out = tmp_path / "scale.json"
    args = ["--counts", "50", "--runs", "1", "--only", "ours", "--broadcasts", "2"]
    args += ["--quiet-wait", "0", "--settle", "0.2", "--json", str(out)]
    png = tmp_path / "scale.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass  # the drawing is in the bench extra, not the test one
    else:
        args += ["--png", str(png)]
    done = run_script("bench_scale.py", *args)

    report = json.loads(out.read_text())
    assert "bench/bench_scale.py" in report["command"]
    (run,) = report["results"]["50"]["ours"]
    assert "error" not in run, run
    assert run["connect"]["opened"] == 50 and run["connect"]["failed"] == 0
    assert positive(run["connect"]["accept_per_s"])
    assert positive(run["kb_per_connection"]) or run["kb_per_connection"] == 0
    assert run["all_delivered"] and run["delivered_pct"] == 100
    assert len(run["broadcasts"]) == 2
    for broadcast in run["broadcasts"]:
        assert broadcast["received"] == broadcast["expected"] == 50
        assert positive(broadcast["server_us_per_delivery"])
        assert positive(broadcast["last_ms"])
        assert broadcast["first_ms"] <= broadcast["last_ms"]
    assert run["load"][0]["repeated_or_reordered"] == 0
    assert "| 50 " in done.stdout and "ours (1/1 runs)" in done.stdout
    if "--png" in args:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_100k_holds_and_reaches_every_connection_at_a_tiny_scale(tmp_path: Path) -> None:
    pytest.importorskip("picows")
    require_redis_server()
    out = tmp_path / "100k.json"
    args = ["--connections", "200", "--processes", "2", "--load-processes", "1"]
    args += ["--broadcasts", "2", "--pause", "0", "--settle", "0.2", "--json", str(out)]
    done = run_script("bench_100k.py", *args)

    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["connections"] == 200 and summary["failed"] == 0
    assert summary["all_delivered"] and summary["delivered_pct"] == 100
    assert positive(summary["accept_per_s"]) and positive(summary["last_ms_median"])
    assert positive(summary["workers_us_per_delivery_median"])
    assert len(report["workers"]) == 2
    assert sum(w["connections"] for w in report["workers"]) >= 200
    for broadcast in report["broadcasts"]:
        assert broadcast["received"] == broadcast["expected"] == 200
        # the machine's TCP counters over the broadcast: they only ever grow
        assert "TCPTimeouts" in broadcast["tcp"] and min(broadcast["tcp"].values()) >= 0
    assert [load["repeated_or_reordered"] for load in report["load"]] == [0]
    assert "200 connections on 2 worker processes" in done.stdout


def test_bench_storm_opens_every_connection_at_a_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    args = ["--count", "100", "--concurrency", "20", "--runs", "1"]
    args += ["--quiet-wait", "0", "--json", str(out)]
    done = run_script("bench_storm.py", *args)

    report = json.loads(out.read_text())
    assert "bench/bench_storm.py" in report["command"]
    for kind in ("ours", "baseline"):
        (run,) = report["results"][kind]
        assert "error" not in run, run
        assert run["opened"] == 100 and run["failures"] == {}
        assert positive(run["handshakes_per_s"]) and positive(run["server_us_per_handshake"])
        assert positive(run["client_us_per_handshake"])
    assert "ours / baseline" in done.stdout


def test_bench_100k_times_kernel_arrival_at_a_tiny_scale(tmp_path: Path) -> None:
    """--arrival kernel: readers paused during the fan-out, the broadcast read later with the
    kernel's receive timestamp; every member still gets every broadcast, once."""
    pytest.importorskip("picows")
    require_redis_server()
    out = tmp_path / "100k.json"
    args = ["--connections", "100", "--processes", "2", "--load-processes", "2"]
    args += ["--broadcasts", "2", "--pause", "0", "--settle", "0.2", "--json", str(out)]
    args += ["--arrival", "kernel", "--defer", "0.5"]
    done = run_script("bench_100k.py", *args)

    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["arrival"] == "kernel"
    assert summary["all_delivered"] and summary["delivered_pct"] == 100
    for broadcast in report["broadcasts"]:
        assert broadcast["received"] == broadcast["expected"] == 100
        assert broadcast["last_ms"] >= broadcast["first_ms"] > 0
        # the spread over both load processes lies between the first and the last receipt
        spread = [broadcast[k] for k in ("first_ms", "median_ms", "p90_ms", "p99_ms", "last_ms")]
        assert spread == sorted(spread)
        assert max(broadcast["last_per_load_ms"]) == broadcast["last_ms"]
        assert len(broadcast["last_per_load_ms"]) == 2
    for load in report["load"]:
        # not_received may count members the probe found not yet joined; the broadcasts above
        # are what must reach everyone.
        assert load["arrival"] == "kernel" and isinstance(load["not_received"], dict)
        assert load["repeated_or_reordered"] == 0 and load["server_closes"] == 0
    assert "kernel receive timestamp, readers paused" in done.stdout
    assert "--ping-interval 0" in done.stdout


def test_fanout_run_keeps_the_earliest_and_latest_arrival_whatever_the_order() -> None:
    """Kernel stamps are collected member by member, not in arrival order: the first and last
    receipt of a broadcast are its earliest and latest stamp, not the first and last read."""
    pytest.importorskip("picows")
    sys.path.insert(0, str(BENCH))
    try:
        import load
    finally:
        sys.path.remove(str(BENCH))
    run = load.FanoutRun()
    for stamp in (500, 900, 100, 700):
        run.delivered(7, stamp)
    assert run.seen[7] == [4, 100, 900]
    marks = run.percentiles(7)
    # nearest rank over the sorted 100, 500, 700, 900: the 50th is index round(1.5) == 2
    assert len(marks) == 101 and marks[0] == 100 and marks[-1] == 900 and marks[50] == 700


def test_receipt_spread_weighs_each_load_process_by_its_members() -> None:
    """Percentiles over all members from each load process's own: a process with three
    times the members moves the median three times as far."""
    sys.path.insert(0, str(BENCH))
    try:
        from fanout import receipt_spread
    finally:
        sys.path.remove(str(BENCH))
    early = {"received": 300, "percentiles_ns": [1_000_000] * 101}  # all at 1 ms
    late = {"received": 100, "percentiles_ns": [9_000_000] * 101}  # all at 9 ms
    spread = receipt_spread([early, late], sent_ns=0)
    assert spread[50] == 1.0 and spread[90] == 9.0 and spread[99] == 9.0
    assert receipt_spread([{"received": 0, "percentiles_ns": []}], sent_ns=0) == {}

"""The paced echo benchmark still runs: bench_paced.py, tiny, against ours and picows.

Runs the script as a real subprocess at a tiny rate and checks that both servers ran, that
every figure is present and that the table has the ratio row; never how large the figures
are (nothing is asserted by a timed test). echoserver runs on the test's loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT, TEST_LOOP

pytestmark = pytest.mark.timeout(60)


def test_bench_paced_runs_ours_and_picows_and_reports_the_ratio(tmp_path: Path) -> None:
    pytest.importorskip("picows")
    out = tmp_path / "paced.json"
    loop = "--uvloop" if TEST_LOOP == "uvloop" else "--no-uvloop"
    args = ["--runs", "1", "--rate", "500", "--connections", "8", "--duration", "0.5"]
    args += ["--warmup", "0.2", "--quiet-wait", "0", loop, "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_paced.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ours / picows" in done.stdout
    assert "## Paced echo: 8 connections, 500 msgs/s" in done.stdout

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"picows", "ours"}
    for kind, runs in results.items():
        (run,) = runs
        assert "error" not in run, (kind, run)
        assert run["connections"] == 8
        assert run["messages"] > 0 and run["msgs_per_s"] > 0
        assert run["lost"] == 0
        assert run["server_us_per_msg"] is not None
        assert run["rtt_p50_ms"] is not None and run["rtt_p99_ms"] is not None

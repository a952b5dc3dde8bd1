"""bench/bench_lifecycle.py still runs: presence and webhooks on the broadcast path, tiny.

As tests/test_bench_scripts.py does for the scale benchmarks: the script runs as a real
subprocess with a few members and short windows, on the memory broker and on a real
redis-server, and its JSON and table are checked for every figure being there and every
member getting every broadcast, never for how large the figures are. The servers run on the
test's loop (ECHOSERVER_TEST_LOOP). The `before` variant is left out: it builds an older
commit into a venv of its own, which takes longer than a test should.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import require_redis_server
from tests.test_bench_scripts import positive, run_script

pytestmark = pytest.mark.timeout(90)

MEMBERS = 20


def run_lifecycle(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    pytest.importorskip("picows")
    out = tmp_path / "lifecycle.json"
    loop = "--uvloop" if os.environ.get("ECHOSERVER_TEST_LOOP") == "uvloop" else "--no-uvloop"
    common = ["--clients", str(MEMBERS), "--runs", "1", "--duration", "0.5", "--warmup", "0.2"]
    common += ["--join-settle", "0.3", "--quiet-wait", "0", loop, "--json", str(out)]
    done = run_script("bench_lifecycle.py", *common, *args)
    return json.loads(out.read_text()), done.stdout


def check_run(run: dict[str, Any]) -> None:
    assert "error" not in run, run
    assert run["receivers"] == MEMBERS
    assert run["lost"] == 0 and run["repeated_or_reordered"] == 0
    for key in ("join_s", "join_server_us_per_join", "deliveries_per_s"):
        assert positive(run[key]), (key, run)
    assert positive(run["server_us_per_delivery"])


def test_every_variant_of_this_checkout_on_the_memory_broker(tmp_path: Path) -> None:
    report, stdout = run_lifecycle(tmp_path, "--variants", "off,presence,webhooks,both")
    assert "bench/bench_lifecycle.py" in report["command"]
    for name in ("off", "presence", "webhooks", "both"):
        (run,) = report["results"][name]
        check_run(run)
    # Every member is its own user: online and joined once each, the channel occupied once.
    for name in ("webhooks", "both"):
        (run,) = report["results"][name]
        expected = {"channel_occupied": 1, "user_joined": MEMBERS, "user_online": MEMBERS}
        assert run["webhooks"]["events"] == expected
    assert "webhooks" not in report["results"]["off"][0]
    assert "memory broker" in stdout
    assert "| presence + webhooks / off " in stdout
    assert "server µs/join" in stdout and "redis µs/join" not in stdout


def test_redis_broker_adds_redis_cpu(tmp_path: Path) -> None:
    require_redis_server()
    report, stdout = run_lifecycle(tmp_path, "--variants", "off,both", "--broker", "redis")
    for name in ("off", "both"):
        (run,) = report["results"][name]
        check_run(run)
        assert positive(run["join_redis_us_per_join"]) and positive(run["redis_us_per_delivery"])
    assert report["results"]["both"][0]["webhooks"]["events"]["user_joined"] == MEMBERS
    assert "redis broker" in stdout and "redis µs/delivery" in stdout

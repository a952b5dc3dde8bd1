"""Drives `load.py fanout` processes that together hold the members of one channel.

It owns the conversation with them (bench_scale.py and bench_100k.py share it): start them
over disjoint sets of source addresses 127.0.0.x, wait until every connection is open, then
broadcast one message at a time and collect, from every process, how many members got it and
when the last one did. Receive times are CLOCK_MONOTONIC, one clock for the whole machine, so
"send to the last receiver" compares timestamps taken in different processes.

With `arrival="kernel"` the receive time is the kernel's receive timestamp of each member's
socket instead of the moment a load process read it: every process stops reading before the
send (PAUSE), and reads the broadcast off the sockets only `defer` seconds later, so the load
takes no CPU from the server during the fan-out (see load_fanout.py KernelArrival).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import procs

# A broadcast that has not reached every member after its WAIT gets this much longer to
# report before the process is taken for hung.
REPORT_GRACE_S = 15.0


def split(total: int, per_process: int) -> list[int]:
    """`total` connections over as few processes as hold at most `per_process` each, evenly."""
    processes = max(1, math.ceil(total / per_process))
    return [total // processes + (1 if i < total % processes else 0) for i in range(processes)]


class Members:
    """Load processes holding the members of one channel, each on its own source addresses."""

    def __init__(
        self,
        port: int,
        counts: Sequence[int],
        *,
        cpu: int | None,
        concurrency: int,
        per_address: int = 5000,
        channel: str = "bench",
        size: int = 100,
        connect_timeout: float = 120.0,
        hold: float = 900.0,
        arrival: str = "read",
        defer: float = 2.5,
    ) -> None:
        self.counts = list(counts)
        self.arrival = arrival
        self.defer = defer
        self.loads: list[procs.LoadProcess] = []
        first = 2
        each = max(1, concurrency // len(self.counts))
        try:
            for count in self.counts:
                args = ["fanout", "--port", str(port), "--channel", channel, "--count", str(count)]
                args += ["--size", str(size), "--concurrency", str(each)]
                args += ["--per-address", str(per_address), "--first-address", str(first)]
                args += ["--connect-timeout", str(connect_timeout), "--hold", str(hold)]
                args += ["--arrival", arrival, "--defer", str(defer)]
                self.loads.append(procs.LoadProcess(args, cpu=cpu))
                first += math.ceil(count / per_address)
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [load.pid for load in self.loads]

    def wait_open(self, timeout: float) -> dict[str, Any]:
        """Every process's OPEN report, and the window from the first start to the last end."""
        deadline = time.monotonic() + timeout
        reports = [
            json.loads(load.read_line("OPEN", max(1.0, deadline - time.monotonic())))
            for load in self.loads
        ]
        errors: dict[str, int] = {}
        for report in reports:
            for name, n in report["errors"].items():
                errors[name] = errors.get(name, 0) + n
        window = (max(r["end_ns"] for r in reports) - min(r["start_ns"] for r in reports)) / 1e9
        opened = sum(r["opened"] for r in reports)
        return {
            "opened": opened,
            "failed": sum(r["failed"] for r in reports),
            "errors": errors,
            "connect_s": window,
            "accept_per_s": opened / window if window > 0 else None,
            "per_process": [r["opened"] for r in reports],
        }

    def broadcast(
        self, seq: int, timeout: float, publish: Callable[[int], int] | None = None
    ) -> dict[str, Any]:
        """Send broadcast `seq` (from the first process's first member, or via `publish`,
        which returns its send time in CLOCK_MONOTONIC ns) and wait, at most `timeout`
        seconds, until every member has it (with kernel arrival: read it after the deferral)."""
        if self.arrival == "kernel":
            for load in self.loads:
                load.send("PAUSE")
            for load in self.loads:
                load.read_line("PAUSED", 10)
        if publish is None:
            self.loads[0].send(f"SEND {seq}")
            sent_ns = json.loads(self.loads[0].read_line("SENT", 10))["sent_ns"]
        else:
            sent_ns = publish(seq)
        for load in self.loads:
            load.send(f"WAIT {seq} {timeout}")
        reports = [
            json.loads(load.read_line("GOT", timeout + self.defer + REPORT_GRACE_S))
            for load in self.loads
        ]
        lasts = [r["last_ns"] for r in reports if r["last_ns"]]
        firsts = [r["first_ns"] for r in reports if r["first_ns"]]
        spread = receipt_spread(reports, sent_ns)
        return {
            "seq": seq,
            "received": sum(r["received"] for r in reports),
            "expected": sum(r["expected"] for r in reports),
            "first_ms": (min(firsts) - sent_ns) / 1e6 if firsts else None,
            "last_ms": (max(lasts) - sent_ns) / 1e6 if lasts else None,
            "median_ms": spread.get(50),
            "p90_ms": spread.get(90),
            "p99_ms": spread.get(99),
            "last_per_load_ms": [
                (r["last_ns"] - sent_ns) / 1e6 if r["last_ns"] else None for r in reports
            ],
        }

    def probe(self, seq: int, timeout: float, tries: int = 3) -> tuple[int, dict[str, Any]]:
        """Broadcast until one reaches every member (all have joined); returns the next seq."""
        result: dict[str, Any] = {}
        for _ in range(tries):
            result = self.broadcast(seq, timeout)
            seq += 1
            if result["received"] >= result["expected"] > 0:
                break
        return seq, result

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        """Release every process (EOF on stdin) and return their RESULTs."""
        deadline = time.monotonic() + timeout
        for load in self.loads:
            load.release()
        return [load.finish(max(1.0, deadline - time.monotonic())) for load in self.loads]

    def kill(self) -> None:
        for load in self.loads:
            load.kill()


def receipt_spread(reports: list[dict[str, Any]], sent_ns: int) -> dict[int, float]:
    """Every member's receipt time at percentiles 50, 90 and 99, in ms after the send, from
    each load process's own percentiles (each point weighs its process's count / 101)."""
    points: list[tuple[int, float]] = []
    for report in reports:
        marks = report.get("percentiles_ns") or []
        points += [(mark, report["received"] / len(marks)) for mark in marks]
    total = sum(weight for _mark, weight in points)
    if not total:
        return {}
    points.sort()
    spread: dict[int, float] = {}
    seen = 0.0
    wanted = [50, 90, 99]
    for mark, weight in points:
        seen += weight
        while wanted and seen >= total * wanted[0] / 100:
            spread[wanted.pop(0)] = (mark - sent_ns) / 1e6
    return spread

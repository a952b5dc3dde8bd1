"""Readings from /proc: a process's CPU time, run-queue wait and memory, the machine's load.

What a benchmark measures besides its own clients' figures, and how it tells a quiet
machine from a busy one (wait_quiet). Linux only; no other bench module is needed.
"""

from __future__ import annotations

import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, in seconds (/proc/<pid>/stat utime+stime)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, in ns (/proc/<pid>/task/*/schedstat).

    The scheduler's own account (user + system together), to the nanosecond: utime+stime
    in /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for one broadcast.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total


def read_run_delay(pid: int | str = "self") -> float:
    """Seconds a process's threads have waited on a run queue (/proc/<pid>/schedstat).

    Time spent runnable but not running: another process had the CPU. Its growth over a
    window is the noise indicator of a benchmark on a shared machine.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def read_status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def read_rss_kb(pid: int) -> int:
    return read_status_kb(pid, "VmRSS")


def settled_rss(pid: int, settle: float) -> int:
    """A process's VmRSS once it has stopped moving (or after `settle` * 3 seconds)."""
    time.sleep(settle)
    rss = read_rss_kb(pid)
    deadline = time.monotonic() + settle * 2
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read_rss_kb(pid)
        if abs(now - rss) < 256:
            return now
        rss = now
    return rss


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all CPUs (/proc/stat).

    Busy minus the CPU time of the processes a benchmark started is what everyone else on
    the machine took meanwhile: the noise of a benchmark that uses every CPU.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def cpu_busy_pct(sample: float = 0.5) -> float:
    """How busy the whole machine was over `sample` seconds (/proc/stat), in percent."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields)

    idle0, total0 = snapshot()
    time.sleep(sample)
    idle1, total1 = snapshot()
    total = total1 - total0
    return 100.0 * (1 - (idle1 - idle0) / total) if total else 0.0


def wait_quiet(max_wait: float, threshold: float = 15.0) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until other processes leave the CPUs mostly idle.

    Returns (seconds waited, busy percent of the last sample). Other people's test runs
    on a shared 2-CPU machine are the main source of noise; this skips the worst of it.
    """
    start = time.monotonic()
    busy = cpu_busy_pct()
    while busy > threshold and time.monotonic() - start < max_wait:
        busy = cpu_busy_pct()
    return time.monotonic() - start, busy


# What could hold a broadcast's tail in the kernel rather than in a process: a segment sent
# again (a tail-loss probe, or a retransmission timeout after a drop), TCP memory pressure,
# a receive queue pruned or dropped for want of memory.
TCP_TAIL_COUNTERS = (
    ("Tcp", "RetransSegs"),
    ("TcpExt", "TCPTimeouts"),
    ("TcpExt", "TCPLossProbes"),
    ("TcpExt", "TCPMemoryPressures"),
    ("TcpExt", "PruneCalled"),
    ("TcpExt", "TCPRcvQDrop"),
    ("TcpExt", "TCPBacklogDrop"),
)


def tcp_counters() -> dict[str, int]:
    """The machine's TCP_TAIL_COUNTERS (/proc/net/snmp and /proc/net/netstat), by name."""
    found: dict[tuple[str, str], int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path) as f:
            lines = f.read().splitlines()
        # Each group is a line of names followed by a line of values, both "Group: ...".
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            group, *keys = names.split()
            for key, value in zip(keys, values.split()[1:], strict=False):
                found[(group.rstrip(":"), key)] = int(value)
    return {key: found.get((group, key), 0) for group, key in TCP_TAIL_COUNTERS}

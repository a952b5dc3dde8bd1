"""The whole machine: worker processes sharing a broker hold 100,000 connections on one channel.

It starts its own redis-server (a free port, a temporary directory, no persistence) unless
`--broker URL` names one, then `python -m echoserver --mode broadcast --processes W` on one
port (the workers share the listening socket bound before the fork, so the kernel hands each
new connection to whichever worker accepts first), then load processes (`load.py fanout`,
at most 19,000 connections each, since a process may hold at most 20,000 open files), each
over its own source addresses 127.0.0.x. Nothing is pinned: the workers, Redis and the
load share every CPU, as they would on a host that runs them all.

It reports: the time to open every connection (and the rate), the workers' RSS per
connection (the sum over workers of the growth), how the connections spread over the workers,
then for each of K broadcasts of 100 bytes (sent by one member, or POSTed to the publish API
when `--api-key` is given) the time from the send to the first and to the last of all the
receivers, and the CPU time the workers and Redis spent on it per delivery.

Arrival: by default a member has a broadcast when its load process reads it, and that reading
takes CPU the workers then do not get. With `--arrival kernel` the load processes stop reading
before each send and read the broadcast only `--defer` seconds later, taking from every
member's socket the kernel's receive timestamp (SO_TIMESTAMPNS): the time the message reached
the receiver's socket, as it would with the clients on other machines. In that mode the
server runs with `--ping-interval 0`, so that readers paused for a few seconds are not
closed (pings cost nothing within a broadcast's window anyway).

    python bench/bench_100k.py                                  # 100,000 connections, 6 workers
    python bench/bench_100k.py --connections 20000 --processes 2
    python bench/bench_100k.py --broker redis://127.0.0.1:6379/0 --api-key KEY
    python bench/bench_100k.py --arrival kernel --defer 2.5

Noise: other people's processes on the machine are measured, not guessed: for every phase,
the machine's busy CPU time (/proc/stat) minus what this run's processes used is what
everyone else took. Every wait is bounded; every process it starts is stopped on the way out,
on errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import redis_helpers
import reporting
from fanout import Members, split

CHANNEL = "bench"
SEQ_STAMP_SIZE = 16  # load.py's broadcast payload head: sequence number, send time


# ----------------------------------------------------------------------------- processes


def server_command(args: argparse.Namespace, port: int, broker: str) -> list[str]:
    cmd = [sys.executable, "-m", "echoserver", "--mode", "broadcast"]
    cmd += ["--host", procs.HOST, "--port", str(port), "--processes", str(args.processes)]
    cmd += ["--broker", broker, "--max-connections", "0", "--no-log-access"]
    cmd += ["--log-level", "warning"]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if args.arrival == "kernel":
        cmd += ["--ping-interval", "0"]  # readers pause for --defer seconds
    return cmd + (args.server_args.split() if args.server_args else [])


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers of a forking server)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def wait_workers(server: procs.Server, count: int, timeout: float) -> list[int]:
    """The worker processes' pids; with one process the server serves in its own."""
    if count == 1:
        return [server.pid]
    deadline = time.monotonic() + timeout
    while True:
        workers = children(server.pid)
        if len(workers) >= count:
            return workers
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(workers)} of {count} workers after {timeout:.0f}s")
        time.sleep(0.1)


def kernel_memory_kb() -> tuple[int, int]:
    """(socket buffers, slab) of the whole machine in KB: the memory of connections that no
    process's RSS counts. Buffers: /proc/net/sockstat `TCP: ... mem` (pages); slab:
    /proc/meminfo `Slab` (socket, inode, file and epoll structures, among everything else)."""
    buffers = 0
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                buffers = int(fields[fields.index("mem") + 1]) * procstat.PAGE_KB
    with open("/proc/meminfo") as f:
        slab = next(int(line.split()[1]) for line in f if line.startswith("Slab:"))
    return buffers, slab


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ----------------------------------------------------------------------------- readings


class Meter:
    """CPU and run-queue waits of every process of the run, and of the whole machine."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, Any]:
        reading: dict[str, Any] = {"t": time.monotonic(), "machine": procstat.machine_cpu_seconds()}
        for name, pids in self.groups.items():
            reading[name] = (
                sum(procstat.read_cpu_ns(p) for p in pids) / 1e9,
                sum(procstat.read_run_delay(p) for p in pids),
            )
        return reading

    def window(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """CPU seconds per group, what other processes took, run-queue waits (% of window)."""
        elapsed = after["t"] - before["t"]
        busy = after["machine"][0] - before["machine"][0]
        capacity = after["machine"][1] - before["machine"][1]
        ours = 0.0
        out: dict[str, Any] = {"window_s": elapsed}
        for name in self.groups:
            cpu = after[name][0] - before[name][0]
            ours += cpu
            out[f"{name}_cpu_s"] = cpu
            out[f"{name}_wait_pct"] = 100 * (after[name][1] - before[name][1]) / elapsed
        out["machine_busy_pct"] = 100 * busy / capacity if capacity else None
        # What everyone else took: the noise. Clock ticks make it +- a few percent.
        out["others_cpu_pct"] = max(0.0, 100 * (busy - ours) / capacity) if capacity else None
        return out


def settled_sum_rss(pids: Sequence[int], settle: float) -> int:
    time.sleep(settle)
    total = sum(procstat.read_rss_kb(p) for p in pids)
    deadline = time.monotonic() + settle * 4
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sum(procstat.read_rss_kb(p) for p in pids)
        if abs(now - total) < 256 * len(pids):
            return now
        total = now
    return total


def publisher(port: int, key: str, size: int) -> Any:
    """POST broadcast `seq` to the publish API; returns its send time (CLOCK_MONOTONIC ns)."""
    url = f"http://{procs.HOST}:{port}/api/channels/{CHANNEL}/messages"

    def publish(seq: int) -> int:
        sent_ns = time.monotonic_ns()
        body = (seq.to_bytes(8, "little") + sent_ns.to_bytes(8, "little")).ljust(size, b"x")
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("Authorization", f"Bearer {key}")
        request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"publish API answered {response.status}")
        return sent_ns

    return publish


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, broker: str, redis_pid: int | None) -> dict[str, Any]:
    port = procs.free_port()
    server = procs.Server(server_command(args, port, broker), port, cpu=None)
    server.start(timeout=60)
    members: Members | None = None
    try:
        workers = wait_workers(server, args.processes, 30)
        time.sleep(1.0)  # every worker in its loop, listening
        fds_before = {pid: open_files(pid) for pid in workers}
        rss_before = settled_sum_rss(workers, 0.5)
        kernel_before = kernel_memory_kb()
        redis_rss_before = procstat.read_rss_kb(redis_pid) if redis_pid else None

        counts = split(args.connections, per_load(args))
        reporting.say(
            f"{args.processes} workers {workers}; {len(counts)} load processes "
            f"{counts}; opening {args.connections:,} connections ..."
        )
        members = Members(
            port,
            counts,
            cpu=None,
            concurrency=args.concurrency,
            size=args.size,
            connect_timeout=args.connect_timeout,
            hold=args.connect_timeout
            + args.broadcasts * (args.broadcast_timeout + args.defer + 30)
            + 300,
            arrival=args.arrival,
            defer=args.defer,
        )
        groups: dict[str, Sequence[int]] = {"workers": workers, "load": members.pids}
        if redis_pid:
            groups["redis"] = [redis_pid]
        meter = Meter(groups)
        m0 = meter.read()
        opened = members.wait_open(args.connect_timeout + 60)
        m1 = meter.read()
        opened.update(meter.window(m0, m1))
        if opened["opened"]:
            opened["workers_us_per_handshake"] = 1e6 * opened["workers_cpu_s"] / opened["opened"]
            opened["load_us_per_handshake"] = 1e6 * opened["load_cpu_s"] / opened["opened"]
        reporting.say(
            f"{opened['opened']:,} open ({opened['failed']:,} failed) in "
            f"{opened['connect_s']:.1f}s: {opened['accept_per_s'] or 0:,.0f}/s"
        )
        rss_after = settled_sum_rss(workers, args.settle)
        kernel_after = kernel_memory_kb()
        per_worker = [
            {
                "pid": pid,
                "connections": open_files(pid) - fds_before[pid],
                "rss_kb": procstat.read_rss_kb(pid),
            }
            for pid in workers
        ]
        memory = {
            "workers_rss_before_kb": rss_before,
            "workers_rss_after_kb": rss_after,
            "kb_per_connection": (rss_after - rss_before) / opened["opened"]
            if opened["opened"]
            else None,
            # Both ends of every connection are on this machine: per connection, not per
            # socket, and the slab also holds the load's side.
            "tcp_buffers_kb_per_connection": (kernel_after[0] - kernel_before[0])
            / max(1, opened["opened"]),
            "slab_kb_per_connection": (kernel_after[1] - kernel_before[1])
            / max(1, opened["opened"]),
            "redis_rss_before_kb": redis_rss_before,
            "redis_rss_after_kb": procstat.read_rss_kb(redis_pid) if redis_pid else None,
        }
        reporting.say(f"workers' RSS: {memory['kb_per_connection'] or 0:.2f} KB per connection")

        seq, probe = members.probe(0, args.broadcast_timeout)
        reporting.say(f"probe: {probe['received']:,} of {probe['expected']:,} members")
        publish = publisher(port, args.api_key, args.size) if args.api_key else None
        broadcasts = []
        b0 = meter.read()
        for _ in range(args.broadcasts):
            before, tcp_before = meter.read(), procstat.tcp_counters()
            result = members.broadcast(seq, args.broadcast_timeout, publish)
            result.update(meter.window(before, meter.read()))
            tcp_after = procstat.tcp_counters()
            result["tcp"] = {key: tcp_after[key] - tcp_before[key] for key in tcp_after}
            received = result["received"]
            result["workers_us_per_delivery"] = (
                1e6 * result["workers_cpu_s"] / received if received else None
            )
            result["load_us_per_delivery"] = (
                1e6 * result["load_cpu_s"] / received if received else None
            )
            if redis_pid:
                result["redis_us_per_broadcast"] = 1e6 * result["redis_cpu_s"]
            broadcasts.append(result)
            reporting.say(
                f"broadcast {seq}: {received:,}/{result['expected']:,} got it, last after "
                f"{result['last_ms'] or 0:.0f} ms; workers "
                f"{result['workers_us_per_delivery'] or 0:.2f} µs/delivery"
            )
            seq += 1
            time.sleep(args.pause)
        phase = meter.window(b0, meter.read())
        loads = members.finish(60)
        members = None
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
    finally:
        if members is not None:
            members.kill()
        server.stop(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)  # any worker left behind
    expected = opened["opened"] * len(broadcasts)
    received = sum(b["received"] for b in broadcasts)
    return {
        "open": opened,
        "memory": memory,
        "workers": per_worker,
        "probe": probe,
        "broadcasts": broadcasts,
        "broadcast_phase": phase,
        "summary": {
            "connections": opened["opened"],
            "failed": opened["failed"],
            "open_s": opened["connect_s"],
            "accept_per_s": opened["accept_per_s"],
            "kb_per_connection": memory["kb_per_connection"],
            "last_ms_median": reporting.median([b["last_ms"] for b in broadcasts]),
            "last_ms_max": max((b["last_ms"] or 0 for b in broadcasts), default=None),
            "first_ms_median": reporting.median([b["first_ms"] for b in broadcasts]),
            "median_receiver_ms_median": reporting.median([b["median_ms"] for b in broadcasts]),
            "workers_us_per_delivery_median": reporting.median(
                [b["workers_us_per_delivery"] for b in broadcasts]
            ),
            "load_us_per_delivery_median": reporting.median(
                [b["load_us_per_delivery"] for b in broadcasts]
            ),
            "workers_us_per_handshake": opened.get("workers_us_per_handshake"),
            "tcp_buffers_kb_per_connection": memory["tcp_buffers_kb_per_connection"],
            "slab_kb_per_connection": memory["slab_kb_per_connection"],
            "arrival": args.arrival,
            "delivered_pct": 100 * received / expected if expected else 0.0,
            "all_delivered": expected > 0 and received == expected,
            "others_cpu_pct_open": opened["others_cpu_pct"],
            # Over the whole phase: a single broadcast is too short for /proc/stat's ticks.
            "others_cpu_pct_broadcasts": phase["others_cpu_pct"],
        },
        "load": loads,
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    s = result["summary"]
    fmt = reporting.fmt
    print(
        f"## {s['connections']:,} connections on {args.processes} worker processes "
        f"(broker {args.broker or 'a private redis-server'}), {args.broadcasts} broadcasts of "
        f"{args.size} bytes {'via the publish API' if args.api_key else 'from one member'}\n"
    )
    print(f"arrival: {arrival_mode(args)}\n")
    rows = [
        ["connections open (failed)", f"{s['connections']:,} ({s['failed']:,})"],
        ["time to open all, s", fmt(s["open_s"], 1)],
        ["handshakes/s", fmt(s["accept_per_s"], 0)],
        ["workers' RSS per connection, KB", fmt(s["kb_per_connection"], 2)],
        ["kernel socket buffers per connection, KB", fmt(s["tcp_buffers_kb_per_connection"], 2)],
        ["kernel slab per connection (both ends), KB", fmt(s["slab_kb_per_connection"], 2)],
        ["workers' CPU µs per handshake", fmt(s["workers_us_per_handshake"], 0)],
        [
            "send to last receiver, ms (median / max)",
            f"{fmt(s['last_ms_median'], 0)} / {fmt(s['last_ms_max'], 0)}",
        ],
        ["send to first receiver, ms (median)", fmt(s["first_ms_median"], 1)],
        ["send to the median receiver, ms (median)", fmt(s["median_receiver_ms_median"], 0)],
        ["workers' CPU µs per delivery (median)", fmt(s["workers_us_per_delivery_median"], 2)],
        ["load's CPU µs per delivery (median)", fmt(s["load_us_per_delivery_median"], 2)],
        ["delivered %", fmt(s["delivered_pct"], 3)],
        ["arrival mode", ARRIVAL_MODES[args.arrival]],
        [
            "other processes' CPU %, open / broadcasts",
            f"{fmt(s['others_cpu_pct_open'], 0)} / {fmt(s['others_cpu_pct_broadcasts'], 0)}",
        ],
    ]
    print(reporting.markdown_table(["figure", "value"], rows))
    print("\n### Each broadcast\n")
    headers = ["seq", "received", "first ms", "median ms", "p90 ms", "p99 ms", "last ms"]
    headers += ["last per load process, ms", "workers µs/delivery", "workers CPU s"]
    headers += ["redis CPU ms", "load CPU s", "others CPU %", "workers wait %"]
    headers += ["TCP resent / timeouts / pressure / drops"]
    rows = [
        [
            str(b["seq"]),
            f"{b['received']:,}/{b['expected']:,}",
            fmt(b["first_ms"], 1),
            fmt(b.get("median_ms"), 0),
            fmt(b.get("p90_ms"), 0),
            fmt(b.get("p99_ms"), 0),
            fmt(b["last_ms"], 0),
            " ".join(fmt(ms, 0) for ms in b.get("last_per_load_ms", [])),
            fmt(b["workers_us_per_delivery"], 2),
            fmt(b["workers_cpu_s"], 3),
            fmt(1e3 * b["redis_cpu_s"], 1) if "redis_cpu_s" in b else "-",
            fmt(b["load_cpu_s"], 3),
            fmt(b["others_cpu_pct"], 0),
            fmt(b["workers_wait_pct"], 0),
            tcp_tail(b.get("tcp")),
        ]
        for b in result["broadcasts"]
    ]
    print(reporting.markdown_table(headers, rows))
    spread = ", ".join(f"{w['connections']:,}" for w in result["workers"])
    print(f"\nconnections per worker: {spread}")
    o = result["open"]
    redis = f", redis {o['redis_cpu_s']:.1f} s" if "redis_cpu_s" in o else ""
    print(
        f"while opening: workers {o['workers_cpu_s']:.1f} s CPU, load {o['load_cpu_s']:.1f} s"
        f"{redis}; machine {fmt(o['machine_busy_pct'], 0)} % busy, other processes "
        f"{fmt(o['others_cpu_pct'], 0)} %; run-queue wait (sum over processes, % of the "
        f"window): workers {o['workers_wait_pct']:.0f}, load {o['load_wait_pct']:.0f}"
    )
    p = result["broadcast_phase"]
    print(
        f"while broadcasting ({p['window_s']:.1f} s with the pauses): machine "
        f"{fmt(p['machine_busy_pct'], 0)} % busy, other processes {fmt(p['others_cpu_pct'], 0)} %"
    )
    print(
        "\nlast/first ms: from the send (CLOCK_MONOTONIC in the sender) to the last/first "
        "member's receipt (the same clock, in whichever load process); µs per delivery = "
        "the workers' CPU time over the broadcast (schedstat) / members that got it. "
        "'other processes' = the machine's busy time (/proc/stat) minus this run's "
        "processes: the noise of a shared machine. TCP: the machine's counters over the "
        "broadcast (segments sent again, retransmission timeouts, memory pressure, receive "
        "queues pruned or dropped). "
        + (
            "Receipt = the kernel's receive timestamp on the member's socket; the load "
            "processes read nothing until the deferral is over, so the load's CPU is spent "
            "after the fan-out, not during it."
            if args.arrival == "kernel"
            else "Workers, Redis and the load share the CPUs, so the last receiver's time "
            "includes the load's own reading."
        )
    )
    print(f"\n{environment()}")
    print(f"command: {reporting.command_line()}")


def tcp_tail(tcp: dict[str, int] | None) -> str:
    """A broadcast's window in the machine's TCP counters: segments sent again, timeouts,
    memory pressure, receive-queue prunes and drops."""
    if tcp is None:
        return "-"
    drops = tcp["PruneCalled"] + tcp["TCPRcvQDrop"] + tcp["TCPBacklogDrop"]
    return f"{tcp['RetransSegs']} / {tcp['TCPTimeouts']} / {tcp['TCPMemoryPressures']} / {drops}"


ARRIVAL_MODES = {
    "read": "read by the load process",
    "kernel": "kernel receive timestamp, readers paused",
}


def arrival_mode(args: argparse.Namespace) -> str:
    if args.arrival == "kernel":
        return (
            f"{ARRIVAL_MODES['kernel']} during the fan-out and read {args.defer:g} s after the "
            "send; the server runs with --ping-interval 0 (no pings, so paused readers are "
            "not closed)"
        )
    return ARRIVAL_MODES["read"]


def per_load(args: argparse.Namespace) -> int:
    """Connections per load process: --per-load, or an even share of --load-processes."""
    if args.load_processes:
        return math.ceil(args.connections / args.load_processes)
    return int(args.per_load)


def environment() -> str:
    import tornado

    return (
        f"{os.cpu_count()} CPUs shared by workers, Redis and load (not pinned); Python "
        f"{sys.version.split()[0]}, Tornado {tornado.version}; git {reporting.git_revision()}; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=6, help="echoserver worker processes")
    parser.add_argument(
        "--load-processes", type=int, default=0, help="default: as few as hold --per-load each"
    )
    parser.add_argument("--per-load", type=int, default=19_000, help="most per load process")
    parser.add_argument("--broker", metavar="URL", help="use this broker; default: own Redis")
    parser.add_argument("--api-key", help="publish through the API with this key")
    parser.add_argument("--broadcasts", type=int, default=5)
    parser.add_argument("--size", type=int, default=100, help="broadcast payload bytes")
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight, all")
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--broadcast-timeout", type=float, default=60.0)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between broadcasts")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    parser.add_argument("--server-args", help="more echoserver flags, space-separated")
    parser.add_argument(
        "--arrival",
        choices=("read", "kernel"),
        default="read",
        help="a member's receipt: when its load process reads it (default), or the kernel's "
        "receive timestamp with the readers paused during the fan-out (server pings off)",
    )
    parser.add_argument(
        "--defer", type=float, default=2.5, help="kernel arrival: seconds before reading"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw result here")
    args = parser.parse_args(argv)
    limit = procs.raise_nofile()
    if per_load(args) + 100 > limit:
        parser.error(f"{per_load(args)} connections per load process need over {limit} files")
    if not 1 <= args.processes <= 64 or args.connections < 2 or args.size < SEQ_STAMP_SIZE:
        parser.error("need 1..64 processes, at least 2 connections, --size >= 16")
    if not 0 < args.defer <= 60:
        parser.error("--defer must be in (0, 60] seconds")
    if not 1 <= args.broadcasts <= 100 or args.connect_timeout > 3600:
        parser.error("--broadcasts must be 1..100 and --connect-timeout at most 3600")
    if 2 + sum(math.ceil(n / 5000) for n in split(args.connections, per_load(args))) > 255:
        parser.error("too many connections for the source addresses 127.0.0.2-254")
    return args


def main() -> None:
    args = parse_args()

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    # Ctrl-C too, even where the shell started this with SIGINT ignored (in the background).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    busy = procstat.cpu_busy_pct(1.0)
    reporting.say(f"machine {busy:.0f}% busy before the run")
    with tempfile.TemporaryDirectory(prefix="bench-100k-") as tmp, contextlib.ExitStack() as stack:
        if args.broker:
            broker, redis_pid = args.broker, None
        else:
            broker, redis_pid = stack.enter_context(redis_helpers.redis_server(tmp))
        result = run(args, broker, redis_pid)
    result["busy_before_pct"] = busy
    report(args, result)
    reporting.write_json(
        args.json,
        {
            "command": reporting.command_line(),
            "environment": environment(),
            "settings": {k: v for k, v in vars(args).items() if k != "api_key"},
            **result,
        },
    )


if __name__ == "__main__":
    main()

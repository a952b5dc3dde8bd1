"""Broker benchmark: broadcast deliveries/s with the memory broker and with Redis.

This script owns the broker comparison: the same broadcast load against `python -m
echoserver --mode broadcast` with the memory broker, with a Redis broker and one process,
and with a Redis broker and two worker processes on one port. It starts its own
redis-server (a free port, a temporary directory, no persistence) and its own load client
(this script with --client, in a subprocess, on picows), all on 127.0.0.1.

The load: `--receivers` clients and `--senders` clients join one channel; each sender keeps
`--window` binary messages in flight (it sends the next when its own comes back), so queues
stay bounded. Deliveries are the frames all clients receive during `--seconds`, after a
warm-up; each configuration runs `--runs` times (round-robin) on a fresh server and
reports the median.

    python bench/bench_brokers.py                       # about a minute
    python bench/bench_brokers.py --receivers 500 --seconds 10 --runs 5
    python bench/bench_brokers.py --only redis --receivers 0 --senders 32   # Redis per message
    python bench/bench_brokers.py --only redis --receivers 0 --senders 32 --redis-processes 1,2,6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import redis_helpers

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHANNEL = "bench"

# (label, broker kind, worker processes)
CONFIGS = [
    ("memory", "memory", 1),
    ("redis, 1 process", "redis", 1),
    ("redis, 2 processes", "redis", 2),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not ready after {timeout:.0f}s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- servers


class Echoserver:
    def __init__(self, broker: str, processes: int, log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOSERVER_")}
        args = ["--mode", "broadcast", "--port", str(self.port), "--broker", broker]
        args += ["--processes", str(processes), "--no-log-access", "--ping-interval", "0"]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "echoserver", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ready = f"websocket ws://{HOST}:{self.port}/ws"
        wait_for(lambda: self._log().count(ready) >= processes or self._died(), 20, "echoserver")
        if self._died():
            raise SystemExit(f"bench: echoserver exited:\n{self._log()}")

    def _log(self) -> str:
        return self.log.read_text(errors="replace")

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> None:
        procs.stop_process(self.proc, 20)


# ------------------------------------------------------------------------- load client


async def client(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, wait for every member to be counted, then measure deliveries."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    received = [0]
    echoed = [0]
    sending = [True]
    payload_tail = b"x" * (args.size - 1)

    class Receiver(WSListener):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.BINARY:
                received[0] += 1
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()

    class Sender(Receiver):
        def __init__(self, index: int) -> None:
            self.message = bytes([index]) + payload_tail
            self.index = index

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            super().on_ws_frame(transport, frame)
            mine = frame.msg_type == WSMsgType.BINARY
            if mine and frame.get_payload_as_memoryview()[0] == self.index:
                echoed[0] += 1
                if sending[0]:
                    transport.send(WSMsgType.BINARY, self.message)

    url = f"ws://{HOST}:{args.port}/ws/{CHANNEL}"
    connections: list[tuple[WSTransport, Any]] = []
    for _ in range(args.receivers):
        connections.append(await ws_connect(Receiver, url))
    senders = []
    for index in range(args.senders):
        transport, sender = await ws_connect(lambda i=index: Sender(i), url)
        connections.append((transport, sender))
        senders.append((transport, sender))
    members_url = f"http://{HOST}:{args.port}/api/channels/{CHANNEL}"
    expected = args.receivers + args.senders
    deadline = time.monotonic() + 15
    while True:
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(members_url, timeout=5).read()
        )
        if json.loads(body)["members"] >= expected:
            break
        if time.monotonic() > deadline:
            raise SystemExit("bench client: not every client joined the channel in time")
        await asyncio.sleep(0.05)

    for transport, sender in senders:
        for _ in range(args.window):
            transport.send(WSMsgType.BINARY, sender.message)
    await asyncio.sleep(args.warmup)
    start_received, start_echoed, started = received[0], echoed[0], time.perf_counter()
    await asyncio.sleep(args.seconds)
    elapsed = time.perf_counter() - started
    deliveries, messages = received[0] - start_received, echoed[0] - start_echoed
    sending[0] = False
    await asyncio.sleep(0.2)
    for transport, _ in connections:
        transport.send_close()
        transport.disconnect()
    return {
        "deliveries_per_s": deliveries / elapsed,
        "messages_per_s": messages / elapsed,
        "seconds": elapsed,
        "messages_total": echoed[0],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/<pid>/stat utime+stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(port: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--client", "--port", str(port)]
    for name in ("receivers", "senders", "window", "size", "seconds", "warmup"):
        command += [f"--{name}", str(getattr(args, name))]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=args.seconds + args.warmup + 60
    )
    if result.returncode != 0:
        raise SystemExit(f"bench client failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=100, help="receiving clients")
    parser.add_argument("--senders", type=int, default=16, help="sending clients (<= 255)")
    parser.add_argument("--window", type=int, default=4, help="messages in flight per sender")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration")
    parser.add_argument("--only", choices=[kind for _, kind, _ in CONFIGS], help="one broker")
    parser.add_argument(
        "--redis-processes",
        default="1,2",
        help="worker process counts to run with Redis, comma-separated (default 1,2); each "
        "is one more process subscribed to the channel, which Redis writes every message to",
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        bad_processes = not all(1 <= int(n) <= 32 for n in args.redis_processes.split(","))
    except ValueError:
        bad_processes = True
    if bad_processes:
        parser.error("--redis-processes takes numbers from 1 to 32, comma-separated")
    if not 1 <= args.senders <= 255 or args.size < 1 or args.runs < 1 or args.seconds > 600:
        parser.error("need 1..255 senders, size >= 1, runs >= 1 and at most 600 seconds")
    return args


def main() -> None:
    args = parse_args()
    if args.client:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        print(json.dumps(asyncio.run(client(args))))
        return
    counts = sorted({int(n) for n in args.redis_processes.split(",")})
    redis_configs = [(f"redis, {n} process{'es' if n > 1 else ''}", "redis", n) for n in counts]
    configs = [c for c in CONFIGS[:1] + redis_configs if args.only in (None, c[1])]
    if any(kind == "redis" for _, kind, _ in configs) and shutil.which("redis-server") is None:
        print("redis-server is not installed: measuring the memory broker only", file=sys.stderr)
        configs = [c for c in configs if c[1] == "memory"]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
    with (
        tempfile.TemporaryDirectory(prefix="bench-brokers-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        directory = Path(tmp)
        redis = None  # (URL, pid) of its own redis-server
        if any(kind == "redis" for _, kind, _ in configs):
            redis = stack.enter_context(redis_helpers.redis_server(tmp))
        # Round-robin over the configurations, so a change in machine load between
        # runs touches each of them alike.
        for n in range(args.runs):
            for label, kind, processes in configs:
                broker = redis[0] if kind == "redis" and redis else "memory"
                server = Echoserver(broker, processes, directory / "server.log")
                try:
                    redis_cpu = cpu_seconds(redis[1]) if kind == "redis" and redis else 0
                    result = run_client(server.port, args)
                    if kind == "redis" and redis:
                        # Redis's CPU over the whole client run (connect, warm-up, window)
                        # per message published in it: what one message costs a shard.
                        redis_cpu = cpu_seconds(redis[1]) - redis_cpu
                        result["redis_us_per_message"] = (
                            1e6 * redis_cpu / result["messages_total"]
                            if result["messages_total"]
                            else None
                        )
                finally:
                    server.stop()
                runs[label].append(result)
                print(
                    f"run {n + 1}, {label}: {result['deliveries_per_s']:,.0f} deliveries/s",
                    file=sys.stderr,
                )
    rows = list(runs.items())

    cpus = os.cpu_count()
    print(
        f"\nBroadcast to one channel: {args.receivers} receivers + {args.senders} senders "
        f"({args.window} x {args.size}-byte binary messages in flight each), "
        f"{args.seconds:g} s measured per run, median of {args.runs} runs; server, "
        f"redis-server and load client share {cpus} CPUs on 127.0.0.1.\n"
    )
    print("| broker | deliveries/s | messages/s | Redis CPU µs/message | runs (deliveries/s) |")
    print("|---|---:|---:|---:|---|")
    for label, runs in rows:
        deliveries = statistics.median(r["deliveries_per_s"] for r in runs)
        messages = statistics.median(r["messages_per_s"] for r in runs)
        costs = [r["redis_us_per_message"] for r in runs if r.get("redis_us_per_message")]
        cost = f"{statistics.median(costs):.1f}" if costs else "-"
        each = ", ".join(f"{r['deliveries_per_s']:,.0f}" for r in runs)
        print(f"| {label} | {deliveries:,.0f} | {messages:,.0f} | {cost} | {each} |")
    print(
        "\nRedis CPU µs/message: redis-server's CPU time (utime+stime) over a whole client run "
        "/ messages published in it (an upper bound: connecting and Redis's own timers are "
        "in it); 1e6 / it is the messages/s one Redis core (one shard) could take."
    )
    print(f"\nCommand: python bench/bench_brokers.py {shlex.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()

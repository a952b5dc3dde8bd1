"""HTTP benchmark: the publish API and Server-Sent Events, each beside its WebSocket figure.

Both parts run echoserver in broadcast mode (`--api-key`, otherwise the benchmarks' usual
flags), pinned to CPU 0, with this script's own load client (uvloop, raw asyncio sockets for
HTTP, picows for WebSocket) pinned to CPU 1, and alternate the two variants run by run.

Part 1, publishing: `--publishers` (16) publishers each keep one message of `--pub-size` bytes
in flight on channel "bench", which `--members` (10) WebSocket members read. A publish is
complete when every member got it (and, for the publish API, its 200 arrived); each completion
sends that publisher's next. Variant "publish API": keep-alive HTTP clients POSTing to
/api/channels/bench/messages with the bearer key. Variant "WebSocket": the publishers are
WebSocket members sending text frames (so, as members, they also get every message: more
deliveries per publish, which the table shows). Variant "batch API": each publisher POSTs
`--batch` (100) messages at a time to /api/publish (a JSON array), its next batch once the
200 came back and every member got the whole batch; a publish there is one message.
Reported: publishes/s, p50/p99 completion, the API's p50/p99 response time, server CPU µs per
publish and per delivery, lost/repeated.

Part 2, fan-out: `--subscribers` (1000) on channel "bench" and one WebSocket member that sends
text messages of `--size` (200) bytes, `--inflight` (4) in flight, each completion (every
subscriber got it) sending the next. Variant "SSE": the other subscribers read GET /sse/bench
(chunked text/event-stream, parsed for `id:` lines; ids end in offsets that must arrive in order
without gaps). Variant "WebSocket": they are WebSocket members (payloads carry a sequence
number). Reported: deliveries/s, p50/p99 completion, server CPU µs per delivery, lost/repeated.

With `--before REV` each part also runs its HTTP variant (the one-message API, SSE) on the code of
commit REV, built once into its own venv (prior_build.py), interleaved with the others, and
prints this checkout's figure against it (the ratio a change is judged by on this machine,
whose absolute speed drifts between days).

    python bench/bench_http.py [--runs 3] [--part publish|fanout] [--duration 4] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting
import runner
from reporting import Metric

SCRIPT = Path(__file__).resolve()
API_KEY = "bench-key"
CHANNEL = "bench"
perf_counter_ns = time.perf_counter_ns

PUBLISH_NAMES = {"ws": "WebSocket publishers", "http": "publish API", "batch": "batch API"}
FANOUT_NAMES = {"ws": "WebSocket subscribers", "sse": "SSE subscribers"}
BEFORE = "-before"  # the suffix of a variant run on the `--before` commit's build

PUBLISH_METRICS = [
    Metric("publishes/s", "publishes_per_s", 0),
    Metric("p50 ms", "completion_p50_ms", 2),
    Metric("p99 ms", "completion_p99_ms", 2),
    Metric("API p50 ms", "response_p50_ms", 2, ratio=False),
    Metric("API p99 ms", "response_p99_ms", 2, ratio=False),
    Metric("server µs/publish", "server_us_per_publish", 1),
    Metric("deliveries/publish", "deliveries_per_publish", 1, ratio=False),
    Metric("server µs/delivery", "server_us_per_delivery", 2),
    Metric("lost", "lost", 0, ratio=False),
    Metric("repeated", "repeated_or_reordered", 0, ratio=False),
    Metric("errors", "errors", 0, ratio=False),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
]

FANOUT_METRICS = [
    Metric("deliveries/s", "deliveries_per_s", 0),
    Metric("p50 ms", "completion_p50_ms", 1),
    Metric("p99 ms", "completion_p99_ms", 1),
    Metric("server µs/delivery", "server_us_per_delivery", 2),
    Metric("lost", "lost", 0, ratio=False),
    Metric("repeated", "repeated_or_reordered", 0, ratio=False),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
]


# ============================================================================ orchestration


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument("--part", choices=("publish", "fanout"), help="only this part")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--publishers", type=int, default=16, help="part 1: publishers")
    parser.add_argument("--members", type=int, default=10, help="part 1: WebSocket readers")
    parser.add_argument("--pub-size", type=int, default=64, help="part 1: body bytes")
    parser.add_argument("--batch", type=int, default=100, help="part 1: messages per batch")
    parser.add_argument(
        "--no-batch-variant", action="store_true", help="part 1: no batch API variant"
    )
    parser.add_argument("--subscribers", type=int, default=1000, help="part 2: receivers")
    parser.add_argument("--inflight", type=int, default=4, help="part 2: messages in flight")
    parser.add_argument("--size", type=int, default=200, help="part 2: payload bytes")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument("--nice", type=int, default=0, help="niceness of server and load")
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=procs.uvloop_available(),
        help="echoserver on uvloop (--loop uvloop) or asyncio",
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run the HTTP variants on this commit, built into its own venv, and compare",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    args = parser.parse_args()
    args.server_cmd = None  # read by reporting.print_footer
    runner.check_runs(args.runs)
    procs.raise_nofile()
    procs.NICENESS = args.nice
    if not 0.5 <= args.duration <= 60 or not 0 <= args.warmup <= 30:
        parser.error("--duration must be 0.5..60 s and --warmup 0..30 s")
    if not 1 <= args.publishers <= 256 or not 1 <= args.members <= 1000:
        parser.error("--publishers must be 1..256 and --members 1..1000")
    if not 1 <= args.batch <= 1000:
        parser.error("--batch must be 1..1000")
    if args.pub_size < 32 or args.size < 32:
        parser.error("--pub-size and --size must be at least 32 (ids and timestamps)")
    if not 2 <= args.subscribers <= 10000 or not 1 <= args.inflight <= 256:
        parser.error("--subscribers must be 2..10000 and --inflight 1..256")
    if args.subscribers + 200 > procs.nofile_limit():
        parser.error(f"RLIMIT_NOFILE {procs.nofile_limit()} is too low for {args.subscribers}")
    return args


def server_cmd(port: int, uvloop: bool, before: Path | None = None) -> list[str]:
    """echoserver in broadcast mode with the API key; `before`: the `echoserver` script of
    an earlier build to run instead of this checkout."""
    cmd = procs.server_command("ours", "broadcast", port, uvloop=uvloop)
    if before is not None:
        assert cmd[1:3] == ["-m", "echoserver"], cmd
        cmd = [str(before), *cmd[3:]]
    return [*cmd, "--api-key", API_KEY]


def run_load_here(load_args: Sequence[str], timeout: float) -> dict[str, Any]:
    """This script's `load` subcommand, pinned to the load CPU; its RESULT object."""
    cmd = procs.pinned([sys.executable, str(SCRIPT), "load", *load_args], procs.LOAD_CPU)
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            timeout=timeout,
            check=False,
            preexec_fn=procs.preexec_load,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"load did not finish within {timeout:.0f}s: {shlex.join(cmd)}") from exc
    return procs.parse_result(done.stdout.decode(), done.stderr.decode(), done.returncode)


def one_run(part: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    port = procs.free_port()
    before = args.before_script if variant.endswith(BEFORE) else None
    variant = variant.removesuffix(BEFORE)
    server = procs.Server(server_cmd(port, args.uvloop, before), port)
    try:
        server.start()
    except Exception as exc:
        raise RuntimeError(f"server did not start: {exc}\n{server.log_tail()}") from exc
    try:
        load_args = [
            part,
            variant,
            "--port",
            str(port),
            "--server-pid",
            str(server.pid),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
        ]
        if part == "publish":
            load_args += ["--publishers", str(args.publishers), "--members", str(args.members)]
            load_args += ["--size", str(args.pub_size), "--batch", str(args.batch)]
        else:
            load_args += ["--subscribers", str(args.subscribers)]
            load_args += ["--inflight", str(args.inflight), "--size", str(args.size)]
        result = run_load_here(load_args, args.warmup + args.duration + 120)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
        return result
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- server log (tail) ---\n{server.log_tail()}") from exc
    finally:
        server.stop()


def summary(
    results: dict[str, list[dict[str, Any]]],
    metrics: Sequence[Metric],
    names: dict[str, str],
    top: str,
    bottom: str,
) -> str:
    """Medians per variant, then the ratio top / bottom."""
    rows = []
    medians: dict[str, list[float | None]] = {}
    for kind, runs in results.items():
        ok = sum(1 for r in runs if "error" not in r)
        medians[kind] = [reporting.median([m.value(r) for r in runs]) for m in metrics]
        rows.append(
            [f"{names[kind]} ({ok}/{len(runs)} runs)"]
            + [reporting.fmt(v, m.digits) for v, m in zip(medians[kind], metrics, strict=True)]
        )
    if top in medians and bottom in medians:
        rows.append(
            [f"{names[top]} / {names[bottom]}"]
            + [
                reporting.fmt_ratio(reporting.ratio(t, b)) if m.ratio else ""
                for t, b, m in zip(medians[top], medians[bottom], metrics, strict=True)
            ]
        )
    return reporting.markdown_table(["variant (median)", *(m.title for m in metrics)], rows)


def main() -> None:
    args = parse_args()
    parts = [args.part] if args.part else ["publish", "fanout"]
    everything: dict[str, Any] = {}
    json_path, args.json = args.json, None
    args.before_script = None
    if args.before:
        import prior_build

        args.before_script = prior_build.build(args.before)
    for part in parts:
        if part == "publish":
            kinds, names, metrics = ["ws", "http"], dict(PUBLISH_NAMES), PUBLISH_METRICS
            if not args.no_batch_variant:
                kinds.append("batch")
                names["batch"] = f"batch API ({args.batch}/request)"
        else:
            kinds, names, metrics = ["ws", "sse"], dict(FANOUT_NAMES), FANOUT_METRICS
        http = kinds[1]
        if args.before:
            kinds.append(http + BEFORE)
            names[http + BEFORE] = f"{names[http]} at {args.before}"
        results = runner.run_interleaved(
            kinds,
            args.runs,
            lambda kind, _i, part=part: one_run(part, kind, args),
            label=lambda kind, part=part, names=names: f"{part} {names[kind]}",
            quiet_wait=args.quiet_wait,
        )
        everything[part] = results
        if part == "publish":
            print(
                f"## Publishing: {args.publishers} publishers x 1 in flight, {args.pub_size}-byte "
                f"text, {args.members} WebSocket members reading channel {CHANNEL!r}, "
                f"{args.duration:g} s window after {args.warmup:g} s warm-up\n"
            )
            print(summary(results, metrics, names, "http", "ws"))
            if args.before:
                print(summary(results, metrics, names, "http", "http" + BEFORE))
            if "batch" in results:
                # publishes/s: messages/s of the batch API against requests/s of the other
                print(summary(results, metrics, names, "batch", "http"))
                if args.before:
                    print(summary(results, metrics, names, "batch", "http" + BEFORE))
            print(
                "\nA publish completes when every member got it (and, for the API, its 200 "
                "came back); API p50/p99 = request sent to response read. WebSocket publishers "
                "are members too, so each publish is also delivered to them "
                "(deliveries/publish). server µs = server CPU (user+system) in the window / "
                "publishes or deliveries in it. For the batch API a publish is one message "
                "(one item of a batch), so its publishes/s are messages/s.\n"
            )
        else:
            print(
                f"\n## Fan-out: {args.subscribers} subscribers on one channel (one of them a "
                f"WebSocket member that sends), {args.size}-byte text, {args.inflight} in "
                f"flight, {args.duration:g} s window after {args.warmup:g} s warm-up\n"
            )
            print(summary(results, metrics, names, "sse", "ws"))
            if args.before:
                print(summary(results, metrics, names, "sse", "sse" + BEFORE))
            print(
                "\nA delivery is one message reaching one subscriber; a message completes when "
                "all got it. SSE: each event is `id: <epoch>:<offset>` + one `data:` line in a "
                "chunk of the chunked response; ids are checked for order and gaps.\n"
            )
        reporting.print_footer(args, results, metrics, names)
    if json_path:
        reporting.write_json(
            json_path, {"command": reporting.command_line(), "results": everything}
        )


# ============================================================================ load (CPU 1)


def log(text: str) -> None:
    print(f"load: {text}", file=sys.stderr, flush=True)


def cpu_self() -> float:
    times = os.times()
    return times.user + times.system


class Window:
    """The measured window: elapsed time, server and load CPU, run-queue waits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = cpu_self()
        self.server0 = procstat.read_cpu_seconds(self.pid)
        self.waits0 = procstat.read_run_delay(self.pid), procstat.read_run_delay()

    def stop(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        server = procstat.read_cpu_seconds(self.pid) - self.server0
        waits = procstat.read_run_delay(self.pid), procstat.read_run_delay()
        return {
            "duration_s": elapsed,
            "server_cpu_s": server,
            "server_cpu_pct": 100 * server / elapsed,
            "load_cpu_pct": 100 * (cpu_self() - self.cpu0) / elapsed,
            "server_wait_pct": 100 * (waits[0] - self.waits0[0]) / elapsed,
            "load_wait_pct": 100 * (waits[1] - self.waits0[1]) / elapsed,
        }


class Tracker:
    """Messages in flight and how many arrivals each still awaits; latencies when recording."""

    def __init__(self, need: int) -> None:
        self.need = need
        self.pending: dict[int, list[int]] = {}
        self.completed = 0
        self.deliveries = 0  # every message received by every connection of the load
        self.recording = False
        self.latencies: array[int] = array("q")
        self.on_complete: Callable[[int], None] = lambda _key: None

    def sent(self, key: int, extra: int = 0) -> None:
        self.pending[key] = [self.need + extra, perf_counter_ns()]

    def tick(self, key: int) -> None:
        entry = self.pending.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.pending[key]
            self.completed += 1
            if self.recording:
                self.latencies.append(perf_counter_ns() - entry[1])
            self.on_complete(key)


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def padded(head: bytes, size: int) -> bytes:
    return head + b"x" * (size - len(head))


# ---------------------------------------------------------------------------- WebSocket side


def ws_listeners() -> Any:
    """picows listeners (imported here: only the load process needs picows)."""
    from load_client import Closing  # answers pings and a server's close
    from picows import WSFrame, WSMsgType, WSTransport

    text = WSMsgType.TEXT

    class Counter(Closing):
        """A member that only counts what it gets (the WebSocket publishers of part 1)."""

        def __init__(self, run: Any) -> None:
            self.run = run

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type != text:
                self.control(transport, frame)
                return
            self.run.tracker.deliveries += 1

    class PubMember(Closing):
        """Part 1 reader: payload `<publisher> <seq> ...`, in order per publisher."""

        def __init__(self, run: Any) -> None:
            self.run = run
            self.expected = [0] * run.publishers
            self.gaps = 0
            self.repeats = 0

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type != text:
                self.control(transport, frame)
                return
            pub_b, seq_b, _ = frame.get_payload_as_bytes().split(b" ", 2)
            pub, seq = int(pub_b), int(seq_b)
            expected = self.expected[pub]
            if seq == expected:
                self.expected[pub] = seq + 1
            elif seq > expected:
                self.gaps += seq - expected
                self.expected[pub] = seq + 1
            else:
                self.repeats += 1
            tracker = self.run.tracker
            tracker.deliveries += 1
            tracker.tick(pub << 32 | seq)

    class FanMember(Closing):
        """Part 2 receiver: payload `<seq> ...`, in order."""

        def __init__(self, run: Any) -> None:
            self.run = run
            self.expected = 0
            self.gaps = 0
            self.repeats = 0

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type != text:
                self.control(transport, frame)
                return
            data = frame.get_payload_as_bytes()
            seq = int(data[: data.index(b" ")])
            if seq == self.expected:
                self.expected = seq + 1
            elif seq > self.expected:
                self.gaps += seq - self.expected
                self.expected = seq + 1
            else:
                self.repeats += 1
            tracker = self.run.tracker
            tracker.deliveries += 1
            tracker.tick(seq)

    return Counter, PubMember, FanMember, text


async def open_ws(url: str, factory: Callable[[int], Any], count: int) -> list[Any]:
    from load_client import all_connected, connect_many

    results = await connect_many(url, factory, count, concurrency=64, timeout=60)
    return all_connected(results, "WebSocket")


# ---------------------------------------------------------------------------- HTTP side

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
# An event's id is `<epoch>:<offset>` (a bare offset from servers before epochs).
SSE_ID = re.compile(rb"^id: (?:[A-Za-z0-9_-]+:)?(\d+)$", re.MULTILINE)


class HttpPublisher(asyncio.Protocol):
    """One keep-alive connection POSTing to the publish API, one request at a time."""

    def __init__(self, run: Any, index: int, head: bytes) -> None:
        self.run = run
        self.index = index
        self.head = head
        self.buf = b""
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] (uvloop's is no subclass)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, body: bytes) -> None:
        assert self.transport is not None
        self.sent_at = perf_counter_ns()
        if self.head.endswith(b"\r\n\r\n"):
            self.transport.write(self.head + body)
        else:  # the batch API: a length per request
            self.transport.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            match = CONTENT_LENGTH.search(buf, 0, end + 2)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(buf) < total:
                break
            ok = buf.startswith(b"HTTP/1.1 200 ")
            buf = buf[total:]
            self.run.responded(self, ok)
        self.buf = buf


class SSEStream(asyncio.Protocol):
    """GET /sse/<channel>: de-chunks the response and checks the `id:` of every event.

    The server writes whole events and Tornado sends each flush as one chunk, so an `id:`
    line is never split across chunks; the ids are searched chunk by chunk (one regex call
    per chunk, no copy of the stream).
    """

    def __init__(self, run: Any, request: bytes) -> None:
        self.run = run
        self.request = request
        self.buf = b""
        self.head_ok: bool | None = None
        self.expected = -1  # next sequence number (offset - base); -1 until the first event
        self.gaps = 0
        self.repeats = 0
        self.events = 0
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] (uvloop's is no subclass)
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.head_ok is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            self.head_ok = head.startswith(b"http/1.1 200") and b"chunked" in head
            buf = buf[end + 4 :]
            if not self.head_ok:
                log(f"SSE answer: {head[:200]!r}")
                self.buf = b""
                return
        pos = 0
        size_buf = len(buf)
        run = self.run
        tracker = run.tracker
        findall = SSE_ID.findall
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            end = eol + 2 + size
            if size == 0 or end + 2 > size_buf:
                break
            for id_bytes in findall(buf, eol + 2, end):
                if run.base < 0:
                    run.base = int(id_bytes)
                seq = int(id_bytes) - run.base
                expected = self.expected
                if seq == expected or expected < 0:
                    self.expected = seq + 1
                elif seq > expected:
                    self.gaps += seq - expected
                    self.expected = seq + 1
                else:
                    self.repeats += 1
                self.events += 1
                tracker.deliveries += 1
                tracker.tick(seq)
            pos = end + 2
        self.buf = buf[pos:]


async def open_sse(run: Any, host: str, port: int, count: int) -> list[SSEStream]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)
    request = (
        f"GET /sse/{CHANNEL} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()

    async def one() -> SSEStream:
        async with gate:
            _, stream = await loop.create_connection(lambda: SSEStream(run, request), host, port)
            return stream

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failed = [t for t in tasks if t not in done or t.exception() is not None]
    if failed:
        raise SystemExit(f"load: {len(failed)} of {count} SSE connections failed")
    streams = [t.result() for t in tasks]
    if not await wait_until(lambda: all(s.head_ok is not None for s in streams), 30):
        raise SystemExit("load: not every SSE stream answered within 30 s")
    bad = sum(1 for s in streams if not s.head_ok)
    if bad:
        raise SystemExit(f"load: {bad} SSE streams were refused")
    return streams


def latency_summary(samples: array[int], prefix: str) -> dict[str, float | None]:
    values = sorted(samples)
    out: dict[str, float | None] = {}
    for name, q in (("p50", 50), ("p99", 99)):
        v = reporting.percentile(values, q)
        out[f"{prefix}_{name}_ms"] = None if v is None else v / 1e6
    return out


# ---------------------------------------------------------------------------- part 1


class PublishRun:
    def __init__(
        self, publishers: int, members: int, size: int, http: bool, batch: int = 0
    ) -> None:
        self.publishers = publishers
        self.size = size
        self.http = http
        self.batch = batch  # messages per POST /api/publish; 0: one message per request
        self.tracker = Tracker(members)
        self.tracker.on_complete = self.completed
        self.next_seq = [0] * publishers
        self.sending = False
        self.senders: list[Any] = []
        self.responses: array[int] = array("q")
        self.errors = 0
        self.ws_text: Any = None
        self.server_closes = 0  # counted by load_client.Closing
        self.disconnects = 0

    def body(self, pub: int) -> tuple[int, bytes]:
        seq = self.next_seq[pub]
        self.next_seq[pub] = seq + 1
        return pub << 32 | seq, padded(b"%d %d " % (pub, seq), self.size)

    def send_next(self, pub: int) -> None:
        if self.batch:
            self.send_batch(pub)
            return
        key, body = self.body(pub)
        if self.http:
            self.tracker.sent(key, extra=1)
            self.senders[pub].send(body)
        else:
            self.tracker.sent(key)
            self.senders[pub].transport.send(self.ws_text, body)

    def send_batch(self, pub: int) -> None:
        """One POST /api/publish of `batch` messages; its last one also awaits the 200."""
        items = []
        tracker = self.tracker
        for i in range(self.batch):
            key, payload = self.body(pub)
            tracker.sent(key, extra=1 if i == self.batch - 1 else 0)
            items.append(b'{"channel":"%s","data":"%s"}' % (CHANNEL.encode(), payload))
        self.senders[pub].send(b"[" + b",".join(items) + b"]")

    def completed(self, key: int) -> None:
        if self.sending:
            pub = key >> 32
            # a batch is done once its last message is (one order per channel)
            if not self.batch or key & 0xFFFFFFFF == self.next_seq[pub] - 1:
                self.send_next(pub)

    def responded(self, publisher: HttpPublisher, ok: bool) -> None:
        if not ok:
            self.errors += 1
        if self.tracker.recording:
            self.responses.append(perf_counter_ns() - publisher.sent_at)
        pub = publisher.index
        self.tracker.tick(pub << 32 | (self.next_seq[pub] - 1))


async def publish_main(args: argparse.Namespace) -> dict[str, Any]:
    counter, pub_member, _fan_member, text = ws_listeners()
    http = args.variant in ("http", "batch")
    batch = args.batch if args.variant == "batch" else 0
    run = PublishRun(args.publishers, args.members, args.size, http, batch)
    run.ws_text = text
    url = f"ws://{args.host}:{args.port}/ws/{CHANNEL}"
    members = await open_ws(url, lambda _i: pub_member(run), args.members)
    if http:
        loop = asyncio.get_running_loop()
        head = (
            f"POST /api/channels/{CHANNEL}/messages HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {args.size}\r\n\r\n"
        ).encode()
        if batch:
            head = (
                f"POST /api/publish HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            ).encode()
        for i in range(args.publishers):
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda i=i: HttpPublisher(run, i, head), args.host, args.port
                ),
                10,
            )
            run.senders.append(proto)
    else:
        run.senders = await open_ws(url, lambda _i: counter(run), args.publishers)
    log(f"{len(members)} members, {len(run.senders)} {'HTTP' if http else 'WebSocket'} publishers")

    # Probe: one publish from each publisher must reach every member (all have joined).
    for pub in range(args.publishers):
        run.send_next(pub)
    if not await wait_until(lambda: not run.tracker.pending, 10):
        raise SystemExit(f"load: {len(run.tracker.pending)} probe publishes never completed")

    window = Window(args.server_pid)
    run.sending = True
    for pub in range(args.publishers):
        run.send_next(pub)
    await asyncio.sleep(args.warmup)
    tracker = run.tracker
    window.start()
    c0, d0, e0 = tracker.completed, tracker.deliveries, run.errors
    tracker.recording = True
    await asyncio.sleep(args.duration)
    tracker.recording = False
    c1, d1, e1 = tracker.completed, tracker.deliveries, run.errors
    measured = window.stop()
    run.sending = False
    drained = await wait_until(lambda: not tracker.pending, 10)
    await asyncio.sleep(0.2)  # the WebSocket publishers' own copies

    lost = sum(m.gaps for m in members) + sum(
        run.next_seq[p] - m.expected[p] for m in members for p in range(args.publishers)
    )
    publishes = c1 - c0
    deliveries = d1 - d0
    elapsed = measured["duration_s"]
    result: dict[str, Any] = {
        "variant": args.variant,
        "publishers": args.publishers,
        "members": len(members),
        "size": args.size,
        "publishes": publishes,
        "publishes_per_s": publishes / elapsed,
        "deliveries": deliveries,
        "deliveries_per_publish": deliveries / publishes if publishes else None,
        "server_us_per_publish": 1e6 * measured["server_cpu_s"] / publishes if publishes else None,
        "server_us_per_delivery": (
            1e6 * measured["server_cpu_s"] / deliveries if deliveries else None
        ),
        "lost": lost,
        "repeated_or_reordered": sum(m.repeats for m in members),
        "errors": e1 - e0,
        "undrained": 0 if drained else len(tracker.pending),
        **measured,
        **latency_summary(tracker.latencies, "completion"),
        **(latency_summary(run.responses, "response") if http else {}),
    }
    for sender in run.senders:
        if http:
            if sender.transport is not None:
                sender.transport.close()
        elif sender.transport is not None:
            sender.transport.disconnect()
    for member in members:
        if member.transport is not None:
            member.transport.disconnect()
    return result


# ---------------------------------------------------------------------------- part 2


class FanoutRun:
    def __init__(self, receivers: int, size: int) -> None:
        self.tracker = Tracker(receivers)
        self.tracker.on_complete = self.completed
        self.size = size
        self.next_seq = 0
        self.sending = False
        self.sender: Any = None
        self.ws_text: Any = None
        self.base = -1  # SSE: the offset of sequence number 0
        self.server_closes = 0  # counted by load_client.Closing
        self.disconnects = 0

    def send_next(self) -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        self.tracker.sent(seq)
        self.sender.send(self.ws_text, padded(b"%d %d " % (seq, perf_counter_ns()), self.size))

    def completed(self, _key: int) -> None:
        if self.sending:
            self.send_next()


async def fanout_main(args: argparse.Namespace) -> dict[str, Any]:
    _counter, _pub_member, fan_member, text = ws_listeners()
    sse = args.variant == "sse"
    run = FanoutRun(args.subscribers, args.size)
    run.ws_text = text
    url = f"ws://{args.host}:{args.port}/ws/{CHANNEL}"
    # Receiver 0 is always a WebSocket member, and the sender.
    ws_count = 1 if sse else args.subscribers
    ws_members = await open_ws(url, lambda _i: fan_member(run), ws_count)
    run.sender = ws_members[0].transport
    streams = await open_sse(run, args.host, args.port, args.subscribers - 1) if sse else []
    receivers: list[Any] = [*ws_members, *streams]
    log(f"{len(ws_members)} WebSocket and {len(streams)} SSE subscribers")

    run.send_next()  # probe: reaches every subscriber once all have joined
    if not await wait_until(lambda: run.tracker.completed == 1, 10):
        got = sum(1 for r in receivers if r.expected > 0)
        raise SystemExit(f"load: probe reached {got} of {len(receivers)} subscribers")

    window = Window(args.server_pid)
    run.sending = True
    for _ in range(args.inflight):
        run.send_next()
    await asyncio.sleep(args.warmup)
    tracker = run.tracker
    window.start()
    c0, d0 = tracker.completed, tracker.deliveries
    tracker.recording = True
    await asyncio.sleep(args.duration)
    tracker.recording = False
    c1, d1 = tracker.completed, tracker.deliveries
    measured = window.stop()
    run.sending = False
    drained = await wait_until(lambda: not tracker.pending, 10)

    last = run.next_seq
    lost = sum(r.gaps + (last - r.expected) for r in receivers)
    deliveries = d1 - d0
    elapsed = measured["duration_s"]
    result: dict[str, Any] = {
        "variant": args.variant,
        "subscribers": len(receivers),
        "sse_subscribers": len(streams),
        "inflight": args.inflight,
        "size": args.size,
        "messages": c1 - c0,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / elapsed,
        "server_us_per_delivery": (
            1e6 * measured["server_cpu_s"] / deliveries if deliveries else None
        ),
        "messages_sent": last,
        "lost": lost,
        "repeated_or_reordered": sum(r.repeats for r in receivers),
        "closed_streams": sum(1 for s in streams if s.closed),
        "undrained": 0 if drained else len(tracker.pending),
        **measured,
        **latency_summary(tracker.latencies, "completion"),
    }
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    for member in ws_members:
        if member.transport is not None:
            member.transport.disconnect()
    return result


def load_entry(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_http.py load")
    parser.add_argument("part", choices=("publish", "fanout"))
    parser.add_argument("variant", choices=("ws", "http", "batch", "sse"))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--host", default=procs.HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--publishers", type=int, default=16)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args(argv)
    procs.raise_nofile()
    import uvloop

    main_fn = publish_main if args.part == "publish" else fanout_main
    result = uvloop.run(main_fn(args))
    print(f"RESULT {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        load_entry(sys.argv[2:])
    else:
        main()

"""Reconnect storm: how fast one server process accepts a crowd of WebSocket handshakes.

After a restart every client comes back at once. Per run and server (ours and the baseline,
alternating, each fresh, pinned to CPU 0), this script's own client (pinned to CPU 1) opens
`--count` (19,000) connections to one channel with `--concurrency` (500) handshakes in
flight, from source addresses 127.0.0.2, 127.0.0.3, ... (5000 per address), and holds them
until all are open. Reported: handshakes/s (connections / seconds from the first connect to
the last 101), the server's and the client's CPU µs per handshake (schedstat), and how busy
each was: a side near 100 % is the limit of that run.

The client is lean on purpose, so that it is not the limit: a plain asyncio protocol on
uvloop that writes a prepared upgrade request (a fresh Sec-WebSocket-Key each) and checks
the 101's status line, with a fixed pool of `--concurrency` workers rather than a task per
connection. bench_scale.py opens its members with picows clients instead, which cost about
300 µs per handshake themselves, so there the client, not the server, sets the rate.

    python bench/bench_storm.py [--runs 3] [--count 19000] [--only ours|baseline]
    python bench/bench_storm.py --auth none,token,hs256,rs256,es256,eddsa [--token-in header]
        (ours only, once per auth variant beside no auth: what a credential costs a
        handshake; the keys, tokens and flags are storm_auth.py's)
    python bench/bench_storm.py client --port N [--count 19000]   (the client, by hand: it
    prints OPEN {json} once all are open and holds them until its stdin closes)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import procstat
import reporting
import runner
import storm_auth


class Upgrade(asyncio.Protocol):
    """One client: sends the upgrade request, then waits for the 101's head."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.head = b""
        self.request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # a ping, later on: the run is over before an answer is due
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.done.set_result(self.head.startswith(b"HTTP/1.1 101 "))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


def request_head(path: str, port: int, token: str | None = None, token_in: str = "query") -> bytes:
    """An upgrade request up to its Sec-WebSocket-Key value, with the token when given."""
    header = ""
    if token is not None and token_in == "query":
        sep = "&" if "?" in path else "?"
        path = f"{path}{sep}token={urllib.parse.quote(token, safe='')}"
    elif token is not None:
        header = f"Authorization: Bearer {token}\r\n"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {procs.HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{header}Sec-WebSocket-Key: "
    ).encode()


def request_heads(args: argparse.Namespace) -> list[bytes]:
    """Connection i's request head is heads[i % len(heads)]: one per token (--tokens, read and
    built before the timed part), or one for all without tokens."""
    if not args.tokens:
        return [request_head(args.path, args.port)]
    tokens = storm_auth.read_tokens(args.tokens)
    if not tokens:
        raise SystemExit(f"no tokens in {args.tokens}")
    return [request_head(args.path, args.port, t, args.token_in) for t in tokens]


def probe(port: int, head: bytes, timeout: float = 5.0) -> int:
    """One handshake with a blocking socket: the status code of the answer (0: none)."""
    with socket.create_connection((procs.HOST, port), timeout=timeout) as sock:
        sock.sendall(head + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer and len(answer) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def check_auth(port: int, path: str, prepared: storm_auth.Prepared, token_in: str) -> None:
    """Before a variant's storm: the server refuses a client without a token (401) and takes
    the first of the minted ones (101), so the run measures the check it says it measures."""
    if prepared.tokens_file is None:
        return
    status = probe(port, request_head(path, port))
    if status != 401:
        raise RuntimeError(f"{prepared.name}: a client without a token got {status}, not 401")
    token = storm_auth.read_tokens(str(prepared.tokens_file))[0]
    status = probe(port, request_head(path, port, token, token_in))
    if status != 101:
        raise RuntimeError(f"{prepared.name}: a client with a minted token got {status}, not 101")


async def storm(args: argparse.Namespace) -> dict[str, Any]:
    procs.raise_nofile()
    loop = asyncio.get_running_loop()
    heads = request_heads(args)
    transports: list[asyncio.BaseTransport] = []
    failures: dict[str, int] = {}
    indexes = iter(range(args.count))
    bound = procs.source_socket_factory(args.count, args.per_address)
    deadline = time.monotonic() + args.timeout

    async def worker() -> None:
        for i in indexes:
            if time.monotonic() > deadline:
                failures["timeout"] = failures.get("timeout", 0) + 1
                continue
            sock = bound(i)
            head = heads[i % len(heads)]
            request = head + base64.b64encode(os.urandom(16)) + b"\r\n\r\n"
            done: asyncio.Future[bool] = loop.create_future()
            upgrade = Upgrade(request, done)
            try:
                await loop.sock_connect(sock, (procs.HOST, args.port))
                transport, _ = await loop.create_connection(lambda u=upgrade: u, sock=sock)
            except OSError as exc:
                sock.close()
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                continue
            transports.append(transport)
            try:
                ok = await asyncio.wait_for(done, max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                ok = False
            if not ok:
                failures["refused"] = failures.get("refused", 0) + 1

    cpu0 = time.process_time()
    delay0 = procstat.read_run_delay()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.count))))
    seconds = time.monotonic() - start
    cpu = time.process_time() - cpu0
    result = {
        "count": args.count,
        "opened": args.count - sum(failures.values()),
        "failures": failures,
        "seconds": seconds,
        "client_cpu_s": cpu,
        "client_run_delay_s": procstat.read_run_delay() - delay0,
    }
    # The driver reads the server's CPU now, before the connections close (closing 19,000
    # costs the server too, but is not part of accepting them); EOF on stdin releases us.
    print("OPEN " + json.dumps(result), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for transport in transports:
        transport.abort()
    return result


def client_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(storm(args))


def one_run(
    kind: str, args: argparse.Namespace, auth: storm_auth.Prepared | None = None
) -> dict[str, Any]:
    port = procs.free_port()
    cmd = procs.server_command(kind, "broadcast", port, uvloop=args.uvloop, custom=args.server_cmd)
    if auth is not None:
        cmd += auth.server_args
    with procs.Server(cmd, port) as server:
        if auth is not None:
            check_auth(port, args.path, auth, args.token_in)
        rss0 = server.rss_kb()
        cpu0 = procstat.read_cpu_ns(server.pid)
        delay0 = procstat.read_run_delay(server.pid)
        client = [
            "client", "--port", str(port), "--count", str(args.count),
            "--concurrency", str(args.concurrency), "--path", args.path,
            "--per-address", str(args.per_address), "--timeout", str(args.timeout),
        ]  # fmt: skip
        if auth is not None and auth.tokens_file is not None:
            client += ["--tokens", str(auth.tokens_file), "--token-in", args.token_in]
        cmd = procs.pinned([sys.executable, __file__, *client], procs.LOAD_CPU)
        with subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().decode()  # the client's own deadline bounds it
            server_cpu_s = (procstat.read_cpu_ns(server.pid) - cpu0) / 1e9
            server_delay_s = procstat.read_run_delay(server.pid) - delay0
            rss1 = server.rss_kb()
            try:
                _, err = proc.communicate(timeout=30)  # closes stdin: the client lets go
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError("the storm client did not exit") from None
        if not line.startswith("OPEN "):
            raise RuntimeError(f"the storm client failed: {err.decode()[-500:]}")
        result = json.loads(line[5:])
    opened = max(1, result["opened"])
    seconds = result["seconds"]
    return {
        **result,
        "handshakes_per_s": result["opened"] / seconds,
        "server_us_per_handshake": server_cpu_s * 1e6 / opened,
        "client_us_per_handshake": result["client_cpu_s"] * 1e6 / opened,
        "server_cpu_pct": 100 * server_cpu_s / seconds,
        "client_cpu_pct": 100 * result["client_cpu_s"] / seconds,
        "rss_growth_mb": (rss1 - rss0) / 1024,
        **(auth_fields(auth, result, server_delay_s) if auth else {}),
    }


def auth_fields(
    auth: storm_auth.Prepared, result: dict[str, Any], server_delay_s: float
) -> dict[str, Any]:
    """What an --auth run adds: the variant, and the run-queue waits over the storm (the
    server's from before the client started, so a little more than the storm itself), which
    mark a run disturbed in the report when either passes 5 %."""
    seconds = max(result["seconds"], 1e-9)
    return {
        "auth": auth.name,
        "token_bytes": auth.token_bytes,
        "server_wait_pct": 100 * server_delay_s / seconds,
        "load_wait_pct": 100 * result.get("client_run_delay_s", 0.0) / seconds,
    }


METRICS = [
    reporting.Metric("handshakes/s", "handshakes_per_s", 0),
    reporting.Metric("seconds", "seconds", 2),
    reporting.Metric("server µs/handshake", "server_us_per_handshake", 0),
    reporting.Metric("client µs/handshake", "client_us_per_handshake", 0),
    reporting.Metric("server CPU %", "server_cpu_pct", 0),
    reporting.Metric("client CPU %", "client_cpu_pct", 0),
    reporting.Metric("opened", "opened", 0, ratio=False),
]


def check_server_flags(args: argparse.Namespace, prepared: dict[str, storm_auth.Prepared]) -> None:
    """echoserver takes each variant's flags (--check-config), or the script stops here with
    its one-line error rather than failing every run. A --server-cmd is not checked."""
    if args.server_cmd:
        return
    for variant in prepared.values():
        cmd = procs.server_command("ours", "broadcast", procs.free_port(), uvloop=args.uvloop)
        done = subprocess.run(
            [*cmd, *variant.server_args, "--check-config"],
            cwd=procs.REPO_DIR,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            error = done.stderr.strip()[-500:]
            if variant.secret:
                error = error.replace(variant.secret, "<secret>")
            sys.exit(f"echoserver refuses the {variant.name} flags: {error}")


def auth_table(
    results: dict[str, list[reporting.Result]], prepared: dict[str, storm_auth.Prepared]
) -> str:
    """Medians per variant beside the no-auth run's: ratios, and the server's extra µs."""

    fmt = reporting.fmt

    def med(runs: list[reporting.Result], key: str) -> float | None:
        return reporting.median([reporting.Metric("", key).value(r) for r in runs])

    ref_rate = med(results["none"], "handshakes_per_s")
    ref_us = med(results["none"], "server_us_per_handshake")
    rows = []
    for name, runs in results.items():
        ok = sum(1 for r in runs if "error" not in r)
        rate = med(runs, "handshakes_per_s")
        us = med(runs, "server_us_per_handshake")
        extra = None if us is None or ref_us is None else us - ref_us
        rows.append(
            [
                f"{name} ({ok}/{len(runs)} runs)",
                reporting.fmt(rate, 0),
                reporting.fmt_ratio(reporting.ratio(rate, ref_rate)),
                reporting.fmt(us, 0),
                reporting.fmt_ratio(reporting.ratio(us, ref_us)),
                "" if name == "none" else f"{extra:+,.0f}" if extra is not None else "-",
                reporting.fmt(med(runs, "client_us_per_handshake"), 0),
                reporting.fmt(med(runs, "server_cpu_pct"), 0),
                reporting.fmt(med(runs, "client_cpu_pct"), 0),
                str(prepared[name].token_bytes or ""),
                "" if prepared[name].decode_us is None else fmt(prepared[name].decode_us, 0),
            ]
        )
    headers = [
        "auth (median)", "handshakes/s", "/ none", "server µs/handshake", "/ none",
        "µs vs none", "client µs/handshake", "server CPU %", "client CPU %", "token bytes",
        "PyJWT decode µs",
    ]  # fmt: skip
    return reporting.markdown_table(headers, rows)


def auth_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--auth: the storm against ours once per variant, run by run, beside no auth."""
    try:
        variants = storm_auth.parse_variants(args.auth)
    except ValueError as exc:
        parser.error(str(exc))
    if args.only == "baseline":
        parser.error("--auth measures echoserver's checks: not with --only baseline")
    if any(storm_auth.VARIANTS[v] for v in variants):
        try:
            import jwt  # noqa: F401
        except ImportError:
            sys.exit("the JWT variants need PyJWT (pip install pyjwt)")
    with tempfile.TemporaryDirectory(prefix="bench-storm-auth-") as tmp:
        prepared = {}
        for name in variants:
            started = time.monotonic()
            prepared[name] = storm_auth.prepare(name, args.count, Path(tmp))
            if prepared[name].tokens_file:
                reporting.say(f"{name}: credentials ready in {time.monotonic() - started:.1f}s")
        check_server_flags(args, prepared)
        results = runner.run_interleaved(
            variants,
            args.runs,
            lambda name, _i: one_run("ours", args, prepared[name]),
            quiet_wait=args.quiet_wait,
        )
    where = "?token=" if args.token_in == "query" else "Authorization: Bearer"
    print(
        f"## Reconnect storm with auth: {args.count:,} connections, {args.concurrency} in "
        f"flight, the token in {where}\n"
    )
    print(auth_table(results, prepared))
    print(
        "\n/ none: the median over the no-auth run's; µs vs none: the server's CPU per handshake"
        " minus the no-auth run's; PyJWT decode µs: one token's decode (signature and claims)"
        " by PyJWT alone, in this process before the runs."
    )
    print("\nVariants (every JWT its own sub, minted before the runs):\n")
    for variant in prepared.values():
        print(f"- {variant.name}: {variant.description}")
    print("\nEvery run:\n")
    reporting.print_footer(args, results, METRICS, {v: v for v in variants})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    client = argv[:1] == ["client"]
    if client:
        argv = argv[1:]
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--tokens", metavar="FILE", help="one token per line, one each")
    else:
        runner.add_server_args(parser)
        parser.add_argument("--json", metavar="PATH", help="also write every run here")
        parser.add_argument(
            "--auth",
            metavar="VARIANTS",
            help="compare auth on ours instead of ours with the baseline: a comma-separated "
            f"list of {','.join(storm_auth.VARIANTS)} (none is always run, as the reference); "
            "e.g. none,token,hs256,rs256,es256,eddsa",
        )
    parser.add_argument("--count", type=int, default=19_000, help="connections to open")
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    parser.add_argument("--path", default="/ws/storm", help="the WebSocket path (a channel)")
    parser.add_argument("--per-address", type=int, default=5000, help="connections per source")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for all to open")
    parser.add_argument(
        "--token-in",
        choices=("query", "header"),
        default="query",
        help="with --auth: the token as ?token= (as a browser sends it, the default) or in "
        "an Authorization: Bearer header",
    )
    args = parser.parse_args(argv)
    procs.source_socket_factory(args.count, args.per_address)  # exits when too many
    if client:
        client_main(args)
        return
    runner.apply_common_args(args)
    if args.auth:
        auth_main(args, parser)
        return
    results, names = runner.run_all(args, one_run)
    print(f"## Reconnect storm: {args.count:,} connections, {args.concurrency} in flight\n")
    print(reporting.summary_table(results, METRICS, names))
    print("\nEvery run:\n")
    reporting.print_footer(args, results, METRICS, names, noise=False)


if __name__ == "__main__":
    main()

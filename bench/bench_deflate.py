"""Compressed echo: server CPU per message with permessage-deflate, three servers.

echoserver (`--compression`) against the websockets library's server (its defaults:
compression="deflate", `async for message in ws: await ws.send(message)`) and the seed-style
Tornado baseline with compression on (bench/baseline.py's echo handler whose
get_compression_options returns {}). Per run: the server pinned to CPU 0, this script's
load (picows on uvloop, pinned to CPU 1) opens 64 connections offering permessage-deflate
as a browser does, each keeping 8 compressed text messages (~260-byte JSON) in flight; a
reply triggers the next message. 1 s warm-up, then a 5 s window: messages/s and the
server's CPU time per message (utime+stime from /proc). The load inflates every reply and
checks it against what it sent. Runs rotate the three servers; medians and ratios.

    python bench/bench_deflate.py [--runs 3] [--duration 5] [--offer OFFER]
    python bench/bench_deflate.py load --port N [--server-pid P ...]   (the load, by hand)
    python bench/bench_deflate.py serve websockets|baseline --port N [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting
import runner
from reporting import Metric

KINDS = ("baseline", "websockets", "ours")
OFFER = "permessage-deflate; client_max_window_bits"  # what browsers offer
TAIL = b"\x00\x00\xff\xff"

METRICS = [
    Metric("msgs/s", "msgs_per_s", 0),
    Metric("server CPU µs/msg", "server_cpu_us_per_msg", 2),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
    Metric("reply bytes", "reply_bytes", 1, ratio=False),
]


def payloads(size: int, count: int = 64) -> list[bytes]:
    """Chat-like JSON text messages of about `size` bytes, alike but not equal."""
    words = "the quick brown fox jumps over a lazy dog while servers echo frames".split()  # noqa: SIM905
    out = []
    for n in range(count):
        text = " ".join(words[(n * 7 + i * i) % len(words)] for i in range(size // 5))
        message = {"type": "chat", "user": f"user{n % 7}", "seq": n, "text": text}
        out.append(json.dumps(message).encode()[:size])
    return out


# ---------------------------------------------------------------------------- servers


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_deflate.py serve")
    parser.add_argument("kind", choices=("websockets", "baseline"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=procs.HOST)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    serve = serve_websockets if args.kind == "websockets" else serve_baseline
    asyncio.run(serve(args.host, args.port))


async def serve_websockets(host: str, port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, host, port, compression="deflate"):
        print(f"websockets ready on {host}:{port}", flush=True)
        await _until_signalled()


async def serve_baseline(host: str, port: int) -> None:
    import tornado.web
    from baseline import EchoHandler, HealthHandler

    class DeflateEcho(EchoHandler):
        def get_compression_options(self) -> dict[str, Any]:
            return {}

    app = tornado.web.Application([(r"/ws", DeflateEcho), (r"/healthz", HealthHandler)])
    server = app.listen(port, address=host)
    print(f"baseline (compression) ready on {host}:{port}", flush=True)
    await _until_signalled()
    server.stop()


async def _until_signalled() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def server_cmd(kind: str, port: int, args: argparse.Namespace) -> list[str]:
    if kind == "ours":
        cmd = procs.server_command("ours", "echo", port, uvloop=args.uvloop, custom=args.server_cmd)
        return cmd if args.server_cmd else [*cmd, "--compression"]
    loop = ["--uvloop"] if args.uvloop else []
    return [sys.executable, __file__, "serve", kind, "--port", str(port), *loop]


# ---------------------------------------------------------------------------- load


def client_header(size: int) -> bytes:
    """A final text frame with RSV1 (compressed), masked with a zero key (RFC 6455 allows
    any key; zero leaves the payload as it is)."""
    if size < 126:
        return bytes([0xC1, 0x80 | size]) + b"\0\0\0\0"
    if size < 1 << 16:
        return bytes([0xC1, 0x80 | 126]) + size.to_bytes(2, "big") + b"\0\0\0\0"
    return bytes([0xC1, 0x80 | 127]) + size.to_bytes(8, "big") + b"\0\0\0\0"


def agreed(header: str) -> dict[str, Any]:
    """What the client needs from the server's answer (a well-formed one is assumed)."""
    params = {
        p.split("=")[0].strip(): p.partition("=")[2].strip().strip('"')
        for p in header.split(";")[1:]
    }
    return {
        "client_bits": int(params.get("client_max_window_bits") or 15),
        "client_alone": "client_no_context_takeover" in params,
        "server_alone": "server_no_context_takeover" in params,
    }


async def load_main(args: argparse.Namespace) -> dict[str, Any]:
    import load_client
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    messages = payloads(args.size)
    stats = {"received": 0, "wire": 0, "wrong": 0, "sending": True, "outstanding": 0}

    class Client(WSListener):
        transport: WSTransport | None = None

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport
            header = transport.response.headers.get("Sec-WebSocket-Extensions", "")
            if not header.startswith("permessage-deflate"):
                raise RuntimeError(f"compression not accepted: {header!r}")
            self.terms = agreed(header)
            self.deflate = zlib.compressobj(6, zlib.DEFLATED, -self.terms["client_bits"])
            self.inflate = zlib.decompressobj(-15)
            self.sent: deque[int] = deque()
            self.n = 0
            self.out = bytearray()
            if self.terms["client_alone"]:  # each message alone: compress each one once
                self.ready = [self._frame(m) for m in messages]

        def _frame(self, message: bytes) -> bytes:
            z = (
                self.deflate
                if not self.terms["client_alone"]
                else zlib.compressobj(6, zlib.DEFLATED, -self.terms["client_bits"])
            )
            data = (z.compress(message) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
            return client_header(len(data)) + data

        def queue_next(self) -> None:
            n = self.n % len(messages)
            self.n += 1
            self.sent.append(n)
            self.out += self.ready[n] if self.terms["client_alone"] else self._frame(messages[n])

        def start(self, inflight: int) -> None:
            for _ in range(inflight):
                self.queue_next()
            self.write()

        def write(self) -> None:
            assert self.transport is not None
            if self.out and not self.transport.is_disconnected:
                self.transport.underlying_transport.write(bytes(self.out))
            self.out.clear()

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            if frame.msg_type != WSMsgType.TEXT:
                return
            data = frame.get_payload_as_bytes()
            stats["received"] += 1
            stats["wire"] += len(data)
            if frame.rsv1:
                if self.terms["server_alone"]:
                    self.inflate = zlib.decompressobj(-15)
                data = self.inflate.decompress(data + TAIL)
            if data != messages[self.sent.popleft()]:
                stats["wrong"] += 1
            if stats["sending"]:
                self.queue_next()
            else:
                stats["outstanding"] -= 1
            if frame.last_in_buffer:
                self.write()

    url = f"ws://{procs.HOST}:{args.port}/ws"
    headers = {"Sec-WebSocket-Extensions": args.offer}
    connecting = [
        ws_connect(Client, url, extra_headers=headers, enable_auto_pong=False)
        for _ in range(args.connections)
    ]
    opened = await asyncio.wait_for(asyncio.gather(*connecting), 30)
    clients: list[Any] = [listener for _transport, listener in opened]
    for client in clients:
        client.start(args.inflight)
    await asyncio.sleep(args.warmup)
    pid = args.server_pid

    def snapshot() -> tuple[int, int, float, float, tuple[float, float], float]:
        cpu = procstat.read_cpu_seconds(pid) if pid else 0.0
        waits = (procstat.read_run_delay(pid) if pid else 0.0, procstat.read_run_delay())
        return (
            stats["received"],
            stats["wire"],
            cpu,
            load_client.cpu_self(),
            waits,
            time.monotonic(),
        )

    r0, w0, s0, l0, d0, t0 = snapshot()
    await asyncio.sleep(args.duration)
    r1, w1, s1, l1, d1, t1 = snapshot()
    stats["sending"] = False
    stats["outstanding"] = sum(len(c.sent) for c in clients)
    await load_client.wait_until(lambda: stats["outstanding"] <= 0, 5.0)
    for client in clients:
        client.transport.disconnect()
    replies, elapsed = r1 - r0, t1 - t0
    return {
        "msgs_per_s": replies / elapsed,
        "server_cpu_us_per_msg": 1e6 * (s1 - s0) / replies if replies and pid else None,
        "server_cpu_pct": 100 * (s1 - s0) / elapsed,
        "load_cpu_pct": 100 * (l1 - l0) / elapsed,
        "reply_bytes": (w1 - w0) / replies if replies else None,
        "wrong": stats["wrong"],
        "negotiated": clients[0].transport.response.headers.get("Sec-WebSocket-Extensions"),
        **load_client.run_queue_waits(d0, d1, elapsed),
    }


def load_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_deflate.py load")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, default=0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--offer", default=OFFER)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    import uvloop

    procs.raise_nofile()
    result = uvloop.run(asyncio.wait_for(load_main(args), args.warmup + args.duration + 60))
    print(f"RESULT {json.dumps(result)}", flush=True)


# ---------------------------------------------------------------------------- benchmark


def one_run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    port = procs.free_port()
    server = procs.Server(server_cmd(kind, port, args), port)
    try:
        server.start()
    except Exception as exc:
        raise RuntimeError(f"{kind} server did not start: {exc}\n{server.log_tail()}") from exc
    try:
        load_args = [
            "--port", str(port), "--server-pid", str(server.pid), "--offer", args.offer,
            "--connections", str(args.connections), "--inflight", str(args.inflight),
            "--warmup", str(args.warmup), "--duration", str(args.duration),
            "--size", str(args.size),
        ]  # fmt: skip
        cmd = procs.pinned([sys.executable, __file__, "load", *load_args], procs.LOAD_CPU)
        result = run_pinned_load(cmd, args.warmup + args.duration + 90)
        if result.get("wrong"):
            raise RuntimeError(f"{result['wrong']} replies did not match what was sent")
        return result
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- {kind} server log (tail) ---\n{server.log_tail()}") from exc
    finally:
        server.stop()


def run_pinned_load(cmd: list[str], timeout: float) -> dict[str, Any]:
    import subprocess

    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"load did not finish within {timeout:.0f}s") from exc
    return procs.parse_result(done.stdout.decode(), done.stderr.decode(), done.returncode)


def ratio_rows(results: dict[str, list[dict[str, Any]]], names: dict[str, str]) -> str:
    """ours / each other server, for messages/s and server CPU per message."""
    med = {
        k: {m.title: reporting.median([m.value(r) for r in runs]) for m in METRICS[:2]}
        for k, runs in results.items()
    }
    rows = []
    for other in ("websockets", "baseline"):
        if "ours" in med and other in med:
            rows.append(
                [f"ours / {names[other]}"]
                + [
                    reporting.fmt_ratio(reporting.ratio(med["ours"][t], med[other][t]))
                    for t in med["ours"]
                ]
            )
    return reporting.markdown_table(["ratio (medians)", *(m.title for m in METRICS[:2])], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runner.add_server_args(parser)
    parser.set_defaults(only=None)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--inflight", type=int, default=8, help="messages in flight per conn")
    parser.add_argument("--offer", default=OFFER, help="the Sec-WebSocket-Extensions offer")
    parser.add_argument("--size", type=int, default=256, help="bytes per message (JSON text)")
    parser.add_argument("--servers", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    args = parser.parse_args()
    runner.apply_common_args(args)
    kinds = [k for k in args.servers.split(",") if k in KINDS]
    if args.only:
        kinds = [args.only]
    names = {k: runner.kind_label(k, args.server_cmd) for k in kinds}
    results = runner.run_interleaved(
        kinds,
        args.runs,
        lambda kind, _i: one_run(kind, args),
        label=names.get,
        quiet_wait=args.quiet_wait,
    )
    print(
        f"## Compressed echo: {args.connections} connections x {args.inflight} in flight, "
        f"{args.size}-byte JSON text, offer "
        f"`{args.offer}`, {args.duration:g} s window after {args.warmup:g} s warm-up\n"
    )
    print(reporting.summary_table(results, METRICS, names))
    print()
    print(ratio_rows(results, names))
    negotiated = {
        names[k]: next((r.get("negotiated") for r in runs if "error" not in r), None)
        for k, runs in results.items()
    }
    print("\nnegotiated: " + "; ".join(f"{k}: `{v}`" for k, v in negotiated.items()))
    print(
        "server CPU µs/msg = the server's CPU time over the window / replies in the window "
        "(lower is better); reply bytes = mean compressed payload of a reply.\n"
    )
    reporting.print_footer(args, results, METRICS, names)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        load_cli(sys.argv[2:])
    else:
        main()

"""TLS benchmark: echoserver over wss:// beside itself over ws:// and the websockets
library's wss:// server, in the same run.

Per run and server (each started fresh, pinned to CPU 0; the load, bench/tls_load.py with
picows on uvloop, pinned to CPU 1):
- echo: 64 connections x 16 messages of 32 bytes in flight, 1 s warm-up, 5 s window:
  messages/s, round-trip p50/p99, Jain's index over connections, server CPU µs per message;
- broadcast: 200 receivers on one channel, 4 broadcasts of 200 bytes in flight:
  deliveries/s, completion p50/p99, server CPU µs per delivery.
Servers alternate within each run, so drift on the machine hits all alike. A self-signed
certificate (ECDSA P-256) is made for the run.

    python bench/bench_tls.py [--runs 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
import procstat
import reporting

LOAD = Path(__file__).resolve().parent / "tls_load.py"

# The websockets library's server, as its documentation writes one (uvloop, TLS).
WEBSOCKETS_SERVER = """
import asyncio, ssl, sys
import uvloop
from websockets.asyncio.server import broadcast, serve

port, mode, certfile, keyfile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(certfile, keyfile)
members = set()

async def handler(ws):
    if mode == "echo":
        async for message in ws:
            await ws.send(message)
        return
    members.add(ws)
    try:
        async for message in ws:
            broadcast(members, message)
    finally:
        members.discard(ws)

async def main():
    async with serve(handler, "127.0.0.1", port, ssl=context, compression=None,
                     max_size=None, ping_interval=None):
        await asyncio.Future()

uvloop.run(main())
"""

SERVERS = ("echoserver ws", "echoserver wss", "websockets wss")


def make_certificate(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "bench.crt", directory / "bench.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(certfile), str(keyfile)


def server_command(name: str, mode: str, port: int, cert: tuple[str, str]) -> list[str]:
    if name == "websockets wss":
        return [sys.executable, "-c", WEBSOCKETS_SERVER, str(port), mode, *cert]
    cmd = procs.server_command("ours", mode, port, uvloop=True)
    if name == "echoserver wss":
        cmd += ["--tls-certfile", cert[0], "--tls-keyfile", cert[1]]
    return cmd


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        procs.pinned(cmd, procs.SERVER_CPU),
        cwd=procs.REPO_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            socket.create_connection((procs.HOST, port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not listen within 15 s")


def one_run(name: str, scenario: str, args: argparse.Namespace, cert: tuple[str, str]) -> Any:
    port = procs.free_port()
    mode = "echo" if scenario == "echo" else "broadcast"
    proc = start(server_command(name, mode, port, cert), port)
    try:
        scheme = "ws" if name == "echoserver ws" else "wss"
        url = f"{scheme}://{procs.HOST}:{port}/ws"
        load = [sys.executable, str(LOAD), scenario, url, "--duration", str(args.duration)]
        if scenario == "echo":
            load += ["--connections", "64", "--inflight", "16", "--size", "32"]
        else:
            load += ["--receivers", str(args.receivers), "--inflight", "4", "--size", "200"]
        runner = subprocess.Popen(
            procs.pinned(load, procs.LOAD_CPU),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert runner.stdout is not None
        cpu: list[float] = []
        try:
            for _ in range(2):  # the measured window's start and end
                if runner.stdout.readline().strip() != "window":
                    break
                cpu.append(procstat.read_cpu_seconds(proc.pid))
            out, err = runner.communicate(timeout=args.duration + 120)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        if runner.returncode != 0 or len(cpu) != 2:
            return {"error": (err or "no window")[-500:]}
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        rate = result.get("msgs_per_s") or result.get("deliveries_per_s") or 0
        # Server CPU in the window per message (echo) or per delivery (broadcast).
        result["cpu_us"] = (cpu[1] - cpu[0]) / (rate * args.duration) * 1e6 if rate else None
        return result
    finally:
        procs.stop_process(proc, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    args = parser.parse_args()
    procs.raise_nofile()
    with tempfile.TemporaryDirectory() as directory:
        cert = make_certificate(Path(directory))
        results: dict[tuple[str, str], list[Any]] = {}
        for scenario in ("echo", "broadcast"):
            for number in range(args.runs):
                for name in SERVERS:
                    procstat.wait_quiet(args.quiet_wait)
                    print(f"run {number + 1}/{args.runs}: {scenario} {name}", file=sys.stderr)
                    results.setdefault((scenario, name), []).append(
                        one_run(name, scenario, args, cert)
                    )
    report(results, args)


def report(results: dict[tuple[str, str], list[Any]], args: argparse.Namespace) -> None:
    def med(scenario: str, name: str, key: str) -> float | None:
        runs = [r.get(key) for r in results[(scenario, name)] if "error" not in r]
        return reporting.median(runs)

    print("## Echo over TLS: 64 connections x 16 in flight, 32-byte messages\n")
    rows = []
    for name in SERVERS:
        rows.append(
            [
                name,
                reporting.fmt(med("echo", name, "msgs_per_s"), 0),
                reporting.fmt(med("echo", name, "rtt_p50_ms"), 2),
                reporting.fmt(med("echo", name, "rtt_p99_ms"), 2),
                reporting.fmt(med("echo", name, "jain_index"), 3),
                reporting.fmt(med("echo", name, "cpu_us"), 2),
            ]
        )
    print(
        reporting.markdown_table(
            ["server (median)", "msgs/s", "p50 ms", "p99 ms", "fairness", "server µs/msg"], rows
        )
    )
    print(f"\n## Broadcast over TLS: {args.receivers} receivers, 200-byte messages, 4 in flight\n")
    rows = []
    for name in SERVERS:
        rows.append(
            [
                name,
                reporting.fmt(med("broadcast", name, "deliveries_per_s"), 0),
                reporting.fmt(med("broadcast", name, "p50_ms"), 2),
                reporting.fmt(med("broadcast", name, "p99_ms"), 2),
                reporting.fmt(med("broadcast", name, "cpu_us"), 2),
            ]
        )
    print(
        reporting.markdown_table(
            ["server (median)", "deliveries/s", "p50 ms", "p99 ms", "server µs/delivery"], rows
        )
    )
    errors = [r["error"] for runs in results.values() for r in runs if "error" in r]
    if errors:
        print(f"\n{len(errors)} failed runs; first: {errors[0]}")
    print(f"\nruns: {args.runs} per server and scenario; {reporting.environment_note(True)}")
    print(f"command: {reporting.command_line()}")


if __name__ == "__main__":
    main()

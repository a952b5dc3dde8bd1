"""Processes of a benchmark: the server under test and the load, pinned to their CPUs.

Conventions (see bench/README.md): the server under test runs on CPU 0, the load on CPU 1
(`taskset -c`), everything on loopback (127.0.0.1), and every wait is bounded in time.
This module owns starting and stopping them (with their file limit and niceness), the
server's command line, and the conversation with bench/load.py (its RESULT line). The
scripts import it as `procs` (they put bench/ on sys.path first), so it has no dependency
on the echoserver package and can benchmark any server command.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from procstat import read_cpu_seconds, read_rss_kb

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LOAD_SCRIPT = BENCH_DIR / "load.py"
BASELINE_SCRIPT = BENCH_DIR / "baseline.py"

HOST = "127.0.0.1"
SERVER_CPU = 0
LOAD_CPU = 1


def raise_nofile(wanted: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(wanted, hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# Linux: choose the source port at connect(), per destination, not at bind(): one source
# address then has ~28,000 ports for each server port, not ~28,000 in all.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def source_socket_factory(
    count: int, per_address: int, first: int = 2
) -> Callable[[int], socket.socket]:
    """Bind connection i to 127.0.0.(first + i // per_address), so ports never run out.

    Load processes that run side by side give each a different `first`, so that no two
    share an address (one address has ~28,000 ephemeral ports for one server port).
    """

    def make(i: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.0.{first + i // per_address}", 0))
        sock.setblocking(False)
        return sock

    if first < 2 or first + (count - 1) // per_address > 254:
        raise SystemExit(f"too many connections for 127.0.0.{first}-254")
    return make


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback address."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def can_pin() -> bool:
    """True when taskset exists and the machine has the two CPUs the convention needs."""
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: Sequence[str], cpu: int) -> list[str]:
    """`cmd` run under `taskset -c cpu`, or unchanged when pinning is impossible."""
    if can_pin():
        return ["taskset", "-c", str(cpu), *cmd]
    return list(cmd)


def server_command(
    kind: str, mode: str, port: int, *, uvloop: bool, custom: str | None = None
) -> list[str]:
    """The command line of one server under test.

    `custom` is a shell-like template with {port} and {mode} placeholders; it stands in
    for "ours". echoserver picks uvloop by itself whenever it is installed.
    """
    if kind == "baseline":
        cmd = [sys.executable, str(BASELINE_SCRIPT), "--mode", mode, "--port", str(port)]
        return [*cmd, "--uvloop"] if uvloop else cmd
    if custom:
        return shlex.split(custom.format(port=port, mode=mode))
    loop = ["--loop", "uvloop" if uvloop else "asyncio"] if echoserver_has_loop_flag() else []
    return [
        sys.executable,
        "-m",
        "echoserver",
        "--mode",
        mode,
        "--port",
        str(port),
        "--host",
        HOST,
        # No per-handshake access line (the baseline logs nothing) and no connection cap
        # (the idle benchmark opens 10000).
        "--no-log-access",
        "--log-level",
        "warning",
        "--max-connections",
        "0",
        *loop,
    ]


@functools.cache
def echoserver_has_loop_flag() -> bool:
    """Whether this checkout's echoserver takes --loop (older ones always chose uvloop)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "echoserver", "--help"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--loop" in done.stdout


# Niceness given to the server and the load (--nice); negative values need root.
NICENESS = 0


def preexec_load() -> None:
    """In a child started by a benchmark: the niceness --nice asked for (see runner)."""
    if NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)


def _preexec_server() -> None:
    """In the server's child: as many file descriptors as allowed, its own process group."""
    raise_nofile()
    os.setpgrp()
    preexec_load()


class Server:
    """A server under test: started pinned to SERVER_CPU, ready when it answers HTTP."""

    def __init__(self, cmd: Sequence[str], port: int, *, cpu: int | None = SERVER_CPU) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> Server:
        self._log = tempfile.TemporaryFile(prefix="bench-server-")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd if self.cpu is None else pinned(self.cmd, self.cpu),
            cwd=REPO_DIR,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec_server,
        )
        try:
            wait_http(HOST, self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_kb(self) -> int:
        return read_rss_kb(self.pid)

    def cpu_seconds(self) -> float:
        return read_cpu_seconds(self.pid)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something answers an HTTP request on host:port (any status will do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                if sock.recv(16).startswith(b"HTTP/"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no HTTP answer on {host}:{port} within {timeout:.0f}s")


def run_load(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run bench/load.py pinned to LOAD_CPU; return its RESULT object."""
    cmd = pinned([sys.executable, str(LOAD_SCRIPT), *args], LOAD_CPU)
    try:
        done = subprocess.run(
            cmd, capture_output=True, timeout=timeout, check=False, preexec_fn=preexec_load
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"load did not finish within {timeout:.0f}s: {shlex.join(cmd)}") from exc
    return parse_result(done.stdout.decode(), done.stderr.decode(), done.returncode)


class LoadProcess:
    """bench/load.py pinned to LOAD_CPU (or unpinned with cpu=None), for a benchmark that talks
    to it while it runs: lines from its stdout, commands to its stdin, EOF on its stdin to
    release it, stderr kept in a file."""

    def __init__(self, args: Sequence[str], *, cpu: int | None = LOAD_CPU) -> None:
        self.stderr = tempfile.TemporaryFile(prefix="bench-load-")  # noqa: SIM115 (closed in kill)
        cmd = [sys.executable, str(LOAD_SCRIPT), *args]
        self.proc = subprocess.Popen(
            cmd if cpu is None else pinned(cmd, cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            preexec_fn=preexec_load,
        )
        self.lines: list[str] = []
        self._unread = b""  # read from the pipe, not yet returned as a line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        """One command line to its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix` (its rest), within `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                # Lines already read come first: the pipe is read in chunks, which may hold
                # several lines, so waiting on the pipe alone could miss one.
                while b"\n" in self._unread:
                    raw, self._unread = self._unread.split(b"\n", 1)
                    line = raw.decode() + "\n"
                    self.lines.append(line)
                    if line.startswith(prefix + " "):
                        return line[len(prefix) + 1 :].rstrip("\n")
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"load exited before {prefix!r}:\n{self.stderr_tail()}")
                self._unread += chunk
        raise RuntimeError(f"no {prefix!r} line from the load within {timeout:.0f}s")

    def release(self) -> None:
        """EOF on its stdin, the signal to stop; finish() then collects its RESULT.

        Releasing several processes first lets them all wind down at once."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None  # so communicate() does not flush it again

    def finish(self, timeout: float) -> dict[str, Any]:
        """Close its stdin (the signal to stop) and return its RESULT."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)  # closes stdin first
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise RuntimeError(f"load did not finish within {timeout:.0f}s") from exc
        return parse_result(
            "".join(self.lines) + (self._unread + out).decode(),
            self.stderr_tail(),
            self.proc.returncode,
        )

    def stderr_tail(self, limit: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()


def parse_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(
        f"load exited with {returncode} and no RESULT line; stderr:\n{stderr[-3000:]}"
    )


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)

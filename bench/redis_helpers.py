"""A private redis-server for the benchmarks that need one (the Redis brokers)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

from procs import HOST, free_port, stop_process


@contextlib.contextmanager
def redis_server(directory: str) -> Iterator[tuple[str, int]]:
    """A private redis-server on a free port; yields (URL, pid)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", HOST, "--save", ""),
            *("--appendonly", "no", "--dir", directory),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0", proc.pid
    finally:
        stop_process(proc, 10)


def redis_ping(port: int) -> bool:
    """Whether a redis-server answers PING on this port of HOST."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False

"""A real redis-server for tests: on a free loopback port, in a temporary directory.

This module owns RedisServer (start, stop, start again on the same port) and the
`redis_server` pytest fixture. Without redis-server installed the fixture skips with the
reason, unless the CI environment variable is set: there a missing Redis is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """redis-server without persistence, bound to 127.0.0.1 only."""

    def __init__(
        self,
        directory: Path,
        port: int = 0,
        args: tuple[str, ...] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.args = args  # more redis-server options
        self.tls = tls  # how to reach the port when args make it a TLS port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """host:port, as a broker's health reason names it."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as plain:
                conn = (
                    self.tls.wrap_socket(plain, server_hostname="127.0.0.1") if self.tls else plain
                )
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def require_redis_server() -> str:
    """The redis-server path; skip (or fail on CI) when it is not installed."""
    if REDIS_SERVER is None:
        reason = "redis-server is not installed (apt-get install redis-server; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason + ", and CI is set: the Redis tests must run there")
        pytest.skip(reason)
    return REDIS_SERVER


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of its own for one test."""
    require_redis_server()
    server = RedisServer(tmp_path)
    for attempt in range(3):  # the free port may be taken before redis binds it
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()

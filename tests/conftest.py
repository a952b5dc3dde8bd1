"""Shared fixtures: the pytest-tornado `app`, settings builders and real server processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echoserver.config import Settings
from echoserver.web.app import make_app

ROOT = Path(__file__).resolve().parent.parent
# ECHOSERVER_TEST_LOOP=uvloop|asyncio runs the in-process tests on that loop and the server
# subprocesses on the other one, so one pass each way covers both loops everywhere. It is
# taken out of the environment: the server refuses ECHOSERVER_* variables it does not know,
# and both config.load() in-process and every server subprocess read the environment.
TEST_LOOP = os.environ.pop("ECHOSERVER_TEST_LOOP", "asyncio")
SERVER_LOOP = {"asyncio": "uvloop", "uvloop": "asyncio"}[TEST_LOOP]
READY = re.compile(r"page (https?)://([\d.]+):(\d+)/")


def pytest_configure(config: pytest.Config) -> None:
    if TEST_LOOP == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def pytest_report_header(config: pytest.Config) -> str:
    import tornado

    return (
        f"event loops: {TEST_LOOP} in-process, {SERVER_LOOP} in server subprocesses; "
        f"tornado {tornado.version}"
    )


def make_settings(**changes: Any) -> Settings:
    """Settings with dotted overrides: make_settings(mode="mixed", **{"broadcast.history": 3})."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    # In-process apps die with their test's loop, so no keepalive task unless a test asks;
    # pings are tested against real server processes.
    changes = {"websocket.ping_interval": 0.0, **changes}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    base = Settings()
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(base, section), **values)
    return dataclasses.replace(base, **top)


@pytest.fixture
def settings() -> Settings:
    """The settings the `app` fixture is built from; override this fixture to change them."""
    return make_settings()


@pytest.fixture
def app(settings: Settings):
    return make_app(settings)


class ServerProcess:
    """`python -m echoserver` in a subprocess, with its log lines collected."""

    def __init__(self, args: list[str], env: dict[str, str] | None, cwd: Path, python: str) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOSERVER_")}
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [python, "-m", "echoserver", "--port", "0", "--loop", SERVER_LOOP, *args],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.scheme = "http"
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match and not self._ready.is_set():
                self.scheme, self.port = match.group(1), int(match.group(3))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 15.0) -> ServerProcess:
        if not self._ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def run_server() -> Iterator[Any]:
    """Factory: run_server("--mode", "broadcast", env={...}) -> a started ServerProcess."""
    started: list[ServerProcess] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        python: str = sys.executable,
    ) -> ServerProcess:
        server = ServerProcess(list(args), env, cwd, python)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop()


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """asyncio.run with a bound: a client scenario that hangs fails instead."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET: (status, headers, body), an HTTP error status included."""
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metric(server: Any, name: str, **labels: str) -> float:
    """One sample from the server's /metrics (0 when absent)."""
    body = fetch(server.url + "/metrics")[2]
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def open_connections(server: Any, context: ssl.SSLContext | None = None) -> int:
    """The server's open WebSocket connections, from /healthz."""
    return json.loads(fetch(server.url + "/healthz", context)[2])["connections"]

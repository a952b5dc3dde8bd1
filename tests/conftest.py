"""Shared fixtures and helpers: the pytest-tornado `app`, settings builders, `run_server`
(tests/servers.py starts the processes), a bounded coroutine runner and HTTP probes."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echoserver.brokers import Broker, BrokerUnavailable, Envelope
from echoserver.config import Settings
from echoserver.web.app import make_app
from tests.servers import ROOT, SERVER_LOOP, TEST_LOOP, ServerProcess


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


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    """wait_until for coroutines: poll `check` (a bool, or an awaitable of one) until true or
    `timeout` seconds have passed; its last answer."""

    async def answer() -> bool:
        value = check()
        return bool(await value if inspect.isawaitable(value) else value)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await answer():
            return True
        await asyncio.sleep(0.05)
    return await answer()


async def kept(broker: Broker, channel: str, limit: int) -> list[Envelope]:
    """The channel's last `limit` kept envelopes, oldest first, read as the hub reads them
    (backlog after offset 0); empty when unknown or while the broker cannot tell."""
    if limit <= 0:
        return []
    try:
        return (await broker.backlog(channel, 0, limit)).envelopes
    except BrokerUnavailable:
        return []


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """For eventually(): eventually(lambda: equals(members(server), 3))."""
    return await value == expected


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET: (status, headers, body), an HTTP error status included."""
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def fetch_json(url: str) -> tuple[int, Any]:
    """GET a JSON document: (status, the parsed body), an HTTP error status included."""
    status, _, body = fetch(url)
    return status, json.loads(body)


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

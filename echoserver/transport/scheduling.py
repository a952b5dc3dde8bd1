"""When connections write and ping: one write per connection per loop pass, one ping timer.

Flusher gathers the connections that have frames queued from elsewhere (broadcasts) and
writes each once at the end of the loop pass, so many messages to one client leave in one
send. Keepalive pings every connection from one task per server instead of a timer per
connection: an idle connection costs a few objects, not a coroutine of its own.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from echoserver.wire.framing import CloseCode


class Flushable(Protocol):
    def flush(self) -> object:
        """Write what is queued, in one write."""


class Pingable(Protocol):
    awaiting_pong: bool

    def ping(self) -> None:
        """Queue a ping frame."""

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""

    def give_up(self, code: int, reason: str) -> None:
        """Close without waiting for the peer."""


class Flusher:
    """Sends the frames queued for many connections in one pass: one write per connection."""

    def __init__(self) -> None:
        self._pending: list[Flushable] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, connection: Flushable) -> None:
        if not self._pending:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush_all)
        self._pending.append(connection)

    def _flush_all(self) -> None:
        pending, self._pending = self._pending, []
        for connection in pending:
            connection.flush()


class Keepalive:
    """Pings every connection every `interval` seconds; closes those silent for `timeout`."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = min(timeout, interval) if timeout > 0 else interval
        self._connections: set[Pingable] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, connection: Pingable) -> None:
        if self.interval <= 0:
            return
        self._connections.add(connection)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def discard(self, connection: Pingable) -> None:
        self._connections.discard(connection)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self.interval)
            while self._connections:
                started = loop.time()
                pinged = list(self._connections)
                for connection in pinged:
                    connection.awaiting_pong = True
                    connection.ping()
                await asyncio.sleep(self.timeout)
                for connection in pinged:
                    if connection.awaiting_pong and not connection.is_closing():
                        # As websockets does: 1011, and no wait for a peer that is not there.
                        connection.give_up(
                            CloseCode.INTERNAL_ERROR, f"no pong within {self.timeout}s"
                        )
                await asyncio.sleep(max(0.0, started + self.interval - loop.time()))
        finally:
            self._task = None

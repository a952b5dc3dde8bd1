"""When connections are pinged: one ping task per server, not a timer per connection.

Keepalive pings every connection from one task, so an idle connection costs a few
objects, not a coroutine of its own; one silent past the timeout is closed with 1011.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from echoserver.wire.framing import CloseCode


class Pingable(Protocol):
    awaiting_pong: bool

    def ping(self) -> None:
        """Queue a ping frame."""

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""

    def close_now(self, code: int, reason: str) -> None:
        """Send the close frame and close without waiting for the peer's."""


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
                        connection.close_now(
                            CloseCode.INTERNAL_ERROR, f"no pong within {self.timeout}s"
                        )
                await asyncio.sleep(max(0.0, started + self.interval - loop.time()))
        finally:
            self._task = None

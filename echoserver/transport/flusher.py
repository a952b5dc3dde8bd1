"""When connections write: one write per connection per loop pass.

Flusher gathers the connections that have frames queued from elsewhere (broadcasts) and
writes each once at the end of the loop pass, so many messages to one client leave in one
send.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Flushable(Protocol):
    def flush(self) -> object:
        """Write what is queued, in one write."""


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

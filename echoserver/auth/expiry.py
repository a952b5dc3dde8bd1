"""ExpiryClock: closes each connection when its token runs out, with one timer for all.

A connection's deadline is its token's exp plus auth.leeway. Deadlines sit in a heap; one
timer waits for the earliest. Refreshing a token moves the connection's deadline (the old
heap entry is skipped when it comes up); a closed connection is forgotten at once, and the
heap is rebuilt when skipped entries outnumber live ones, so churn cannot grow it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Expiring(Protocol):
    def token_expired(self) -> None:
        """The connection's token ran out: close it (4001) or end the stream."""


class ExpiryClock:
    def __init__(self, leeway: float = 0.0) -> None:
        self.leeway = leeway
        self._deadlines: dict[int, tuple[float, Expiring]] = {}  # id(conn) -> (when, conn)
        self._heap: list[tuple[float, int, int]] = []  # (when, order, id(conn))
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._deadlines)

    def watch(self, connection: Expiring, exp: float | None) -> None:
        """Close the connection at exp + leeway (unix seconds); None: never (forget it)."""
        if exp is None:
            self.forget(connection)
            return
        when = exp + self.leeway
        key = id(connection)
        self._deadlines[key] = (when, connection)
        heapq.heappush(self._heap, (when, next(self._order), key))
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._rebuild()
        self._arm()

    def forget(self, connection: Expiring) -> None:
        self._deadlines.pop(id(connection), None)

    def _rebuild(self) -> None:
        self._heap = [(when, next(self._order), key) for key, (when, _) in self._deadlines.items()]
        heapq.heapify(self._heap)

    def _arm(self) -> None:
        heap = self._heap
        if not heap:
            return
        when = heap[0][0]
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._timer = loop.call_at(loop.time() + delay, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        heap = self._heap
        due: list[Expiring] = []
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            entry = self._deadlines.get(key)
            if entry is not None and entry[0] == when:
                del self._deadlines[key]
                due.append(entry[1])
        for connection in due:
            connection.token_expired()
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""channel_occupied / channel_vacated from what exists today: the hub's presence counts.

WatchedPresence wraps the hub's Presence: after this process writes its member count of a
channel, it reads the count across every process and reports "occupied" (> 0) at once, or
"vacated" (0) once `grace` seconds have passed and the count is still 0 (a quick
reconnect, here or on another process, is then neither), to Webhooks.emit, whose ledger
sends each transition once however many processes report it.

What it does not cover (the presence part's to add): a channel left empty by a crashed
worker (no process writes its count then); and the count and the report are two steps,
so two processes racing at the last leave and a new join can leave the ledger one report
behind until the next change on that channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from echoserver.brokers import Presence
from echoserver.brokers.base import Roll
from echoserver.webhooks.events import Webhooks


class WatchedPresence(Presence):
    def __init__(self, inner: Presence, webhooks: Webhooks, grace: float = 0.0) -> None:
        self.inner = inner
        self.webhooks = webhooks
        self.grace = grace
        self._waiting: dict[str, asyncio.Task[None]] = {}  # channels in their grace

    async def set_local(self, channel: str, members: int) -> None:
        await self.inner.set_local(channel, members)
        total = await self.inner.count(channel)
        if total > 0:
            waiting = self._waiting.pop(channel, None)
            if waiting is not None:
                waiting.cancel()
            self.webhooks.emit("channel_occupied", channel=channel)
        elif self.grace <= 0:
            self.webhooks.emit("channel_vacated", channel=channel)
        elif channel not in self._waiting:
            task = asyncio.ensure_future(self._vacate_later(channel, time.time()))
            self._waiting[channel] = task

    async def _vacate_later(self, channel: str, left: float) -> None:
        try:
            await asyncio.sleep(self.grace)
            if await self.inner.count(channel) == 0:
                self.webhooks.emit("channel_vacated", channel=channel, at=left)
        finally:
            if self._waiting.get(channel) is asyncio.current_task():
                del self._waiting[channel]

    async def count(self, channel: str) -> int:
        return await self.inner.count(channel)

    # Users (fanout/presence.py's Roster): passed through, nothing to report here.
    async def set_user(
        self, channel: str, user: str, connections: int, info: Any, present: bool = True
    ) -> tuple[int, int]:
        return await self.inner.set_user(channel, user, connections, info, present)

    async def roll(self, channel: str) -> Roll:
        return await self.inner.roll(channel)

    async def close(self) -> None:
        """Stop the graces under way (the server is stopping: nothing is reported)."""
        waiting, self._waiting = list(self._waiting.values()), {}
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""channel_occupied / channel_vacated from what exists today: the hub's presence counts.

WatchedPresence wraps the hub's Presence: after this process writes its member count of a
channel, it reads the count across every process and reports "occupied" (> 0) or
"vacated" (0) to Webhooks.emit, whose ledger sends each transition once however many
processes report it. What it does not cover (the presence part's to add): a grace before
"vacated" (presence_grace), a channel left empty by a crashed worker (no process writes
its count then), and the count and the report are two steps, so two processes racing at
the last leave and a new join can settle the ledger one report late until the next
change on that channel.
"""

from __future__ import annotations

from echoserver.brokers import Presence
from echoserver.webhooks.events import Webhooks


class WatchedPresence(Presence):
    def __init__(self, inner: Presence, webhooks: Webhooks) -> None:
        self.inner = inner
        self.webhooks = webhooks

    async def set_local(self, channel: str, members: int) -> None:
        await self.inner.set_local(channel, members)
        total = await self.inner.count(channel)
        kind = "channel_occupied" if total > 0 else "channel_vacated"
        self.webhooks.emit(kind, channel=channel)

    async def count(self, channel: str) -> int:
        return await self.inner.count(channel)

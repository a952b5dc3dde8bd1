"""The embedded broker: delivery, history and presence inside one process.

Publishing calls the hub back synchronously, so a channel's order is simply the order of
publish() calls, publish() returns the offset itself (never a future), and a joiner that
reads the history and subscribes in one loop pass can neither miss nor repeat a message.

A channel's history outlives its members (a later joiner still gets it), so the number of
channels that keep one is capped: past MAX_HISTORY_CHANNELS the least recently used goes.
Nothing else is kept for a channel nobody is on.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from echoserver.brokers.base import Broker, Envelope, OnEnvelope, Presence

MAX_HISTORY_CHANNELS = 10_000


class MemoryPresence(Presence):
    """One process: the count is this process's own."""

    def __init__(self) -> None:
        self._members: dict[str, int] = {}

    async def set_local(self, channel: str, members: int) -> None:
        if members:
            self._members[channel] = members
        else:
            self._members.pop(channel, None)

    async def count(self, channel: str) -> int:
        return self._members.get(channel, 0)


class MemoryBroker(Broker):
    def __init__(self, *, history: int = 0) -> None:
        self.history_size = history
        self.presence = MemoryPresence()
        self._on_envelope: OnEnvelope | None = None
        self._subscribed: set[str] = set()
        self._history: OrderedDict[str, deque[Envelope]] = OrderedDict()
        self._last_seq: dict[str, int] = {}

    async def start(self, on_envelope: OnEnvelope) -> None:
        self._on_envelope = on_envelope

    async def close(self) -> None:
        self._on_envelope = None
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)
        if channel not in self._history:
            self._last_seq.pop(channel, None)

    def publish(self, envelope: Envelope) -> int:
        seq = envelope.seq = self._last_seq.get(envelope.channel, 0) + 1
        self._last_seq[envelope.channel] = seq
        if self.history_size > 0:
            self._keep(envelope, self.history_size)
        if self._on_envelope is not None and envelope.channel in self._subscribed:
            self._on_envelope(envelope)
        return seq

    def _keep(self, envelope: Envelope, size: int) -> None:
        channel = envelope.channel
        kept = self._history.get(channel)
        if kept is None or kept.maxlen != size:
            kept = self._history[channel] = deque(kept or (), maxlen=size)
        self._history.move_to_end(channel)
        kept.append(envelope)
        if len(self._history) > MAX_HISTORY_CHANNELS:
            oldest, _ = self._history.popitem(last=False)
            if oldest not in self._subscribed:
                self._last_seq.pop(oldest, None)

    async def history(self, channel: str, limit: int) -> list[Envelope]:
        kept = self._history.get(channel)
        if not kept or limit <= 0:
            return []
        return list(kept)[-limit:]

    @property
    def healthy(self) -> bool:
        return True

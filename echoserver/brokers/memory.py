"""The embedded broker: delivery, history and presence inside one process.

Publishing calls the hub back synchronously, so a channel's order is simply the order of
publish() calls, publish() returns the offset itself (never a future), and a joiner that
reads the history and subscribes in one loop pass can neither miss nor repeat a message.

A channel's offset counter and history outlive its members (a client that comes back
resumes from its offset, a later joiner still gets the history), so the number of
channels remembered is capped: past MAX_CHANNELS the least recently published-to channel
that nobody here is subscribed to is forgotten (its offsets then start again at 1).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from itertools import islice

from echoserver.brokers.base import Backlog, Broker, Envelope, OnEnvelope, Presence

MAX_CHANNELS = 10_000


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


class _Channel:
    """A channel's last offset and its kept messages with the time each was published."""

    __slots__ = ("kept", "last")

    def __init__(self) -> None:
        self.last = 0
        self.kept: deque[tuple[float, Envelope]] = deque()


class MemoryBroker(Broker):
    def __init__(self, *, history: int = 0, history_ttl: float = 0.0) -> None:
        self.history_size = history
        self.history_ttl = history_ttl
        self.presence = MemoryPresence()
        self._on_envelope: OnEnvelope | None = None
        self._subscribed: set[str] = set()
        self._channels: OrderedDict[str, _Channel] = OrderedDict()

    async def start(self, on_envelope: OnEnvelope) -> None:
        self._on_envelope = on_envelope

    async def close(self) -> None:
        self._on_envelope = None
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def publish(self, envelope: Envelope) -> int:
        name = envelope.channel
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
            if len(self._channels) > MAX_CHANNELS:
                self._forget_one()
        else:
            self._channels.move_to_end(name)
        seq = envelope.seq = channel.last = channel.last + 1
        size = self.history_size
        if size > 0:
            now = time.monotonic()
            kept = channel.kept
            kept.append((now, envelope))
            while len(kept) > size:
                kept.popleft()
            self._expire(channel, now)
        elif channel.kept:
            channel.kept.clear()
        if self._on_envelope is not None and name in self._subscribed:
            self._on_envelope(envelope)
        return seq

    def _forget_one(self) -> None:
        """Forget the least recently used channel nobody here is subscribed to."""
        for name in self._channels:
            if name not in self._subscribed:
                del self._channels[name]
                return

    def _expire(self, channel: _Channel, now: float) -> None:
        ttl = self.history_ttl
        if ttl > 0:
            kept = channel.kept
            while kept and now - kept[0][0] > ttl:
                kept.popleft()

    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        state = self._channels.get(channel)
        if state is None:
            return Backlog([], 0)
        self._expire(state, time.monotonic())
        kept = state.kept
        # Kept offsets are consecutive and end at `last`: the wanted ones are the newest n.
        count = min(state.last - after, limit, len(kept))
        if count <= 0:
            return Backlog([], state.last)
        wanted = islice(kept, len(kept) - count, None)
        return Backlog([envelope for _, envelope in wanted], state.last)

    @property
    def healthy(self) -> bool:
        return True

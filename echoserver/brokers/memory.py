"""The embedded broker: delivery, history and presence inside one process.

Publishing calls the hub back synchronously, so a channel's order is simply the order of
publish() calls and a joiner that reads the history and subscribes in one loop pass can
neither miss nor repeat a message.

A channel's history outlives its members (a later joiner still gets it), so the number of
channels that keep one is capped: past MAX_HISTORY_CHANNELS the least recently used goes.
Nothing else is kept for a channel nobody is on.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from echoserver.brokers.base import Broker, Envelope, OnEnvelope

MAX_HISTORY_CHANNELS = 10_000


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._on_envelope: OnEnvelope | None = None
        self._subscribed: set[str] = set()
        self._history: OrderedDict[str, deque[Envelope]] = OrderedDict()
        self._presence: dict[str, int] = {}
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

    async def publish(self, envelope: Envelope, history: int = 0) -> None:
        self.publish_nowait(envelope, history)

    def publish_nowait(self, envelope: Envelope, history: int = 0) -> bool:
        seq = envelope.seq = self._last_seq.get(envelope.channel, 0) + 1
        self._last_seq[envelope.channel] = seq
        if history > 0:
            self._keep(envelope, history)
        if self._on_envelope is not None and envelope.channel in self._subscribed:
            self._on_envelope(envelope)
        return True

    def _keep(self, envelope: Envelope, history: int) -> None:
        channel = envelope.channel
        kept = self._history.get(channel)
        if kept is None or kept.maxlen != history:
            kept = self._history[channel] = deque(kept or (), maxlen=history)
        self._history.move_to_end(channel)
        kept.append(envelope)
        if len(self._history) > MAX_HISTORY_CHANNELS:
            oldest, _ = self._history.popitem(last=False)
            if oldest not in self._subscribed:
                self._last_seq.pop(oldest, None)

    async def history(self, channel: str, limit: int) -> list[Envelope]:
        return self.history_now(channel, limit)

    def history_now(self, channel: str, limit: int) -> list[Envelope]:
        kept = self._history.get(channel)
        if not kept or limit <= 0:
            return []
        return list(kept)[-limit:]

    async def set_presence(self, channel: str, local_members: int) -> None:
        if local_members:
            self._presence[channel] = local_members
        else:
            self._presence.pop(channel, None)

    async def presence(self, channel: str) -> int:
        return self._presence.get(channel, 0)

    @property
    def healthy(self) -> bool:
        return True

"""The embedded broker: delivery, history and presence inside one process.

Publishing calls the hub back synchronously, so a channel's order is simply the order of
publish() calls and a joiner that reads the history and subscribes in one loop pass can
neither miss nor repeat a message.
"""

from __future__ import annotations

from collections import deque

from echoserver.brokers.base import Broker, Envelope, OnEnvelope


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._on_envelope: OnEnvelope | None = None
        self._subscribed: set[str] = set()
        self._history: dict[str, deque[Envelope]] = {}
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

    async def publish(self, envelope: Envelope, history: int = 0) -> None:
        self.publish_nowait(envelope, history)

    def publish_nowait(self, envelope: Envelope, history: int = 0) -> bool:
        seq = envelope.seq = self._last_seq.get(envelope.channel, 0) + 1
        self._last_seq[envelope.channel] = seq
        if history > 0:
            kept = self._history.get(envelope.channel)
            if kept is None or kept.maxlen != history:
                kept = self._history[envelope.channel] = deque(kept or (), maxlen=history)
            kept.append(envelope)
        if self._on_envelope is not None and envelope.channel in self._subscribed:
            self._on_envelope(envelope)
        return True

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

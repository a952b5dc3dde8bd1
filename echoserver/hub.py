"""Channel membership and fan-out; knows nothing of HTTP or WebSocket framing.

The hub keeps, per channel, the local subscribers (one per connection) in join order. It
publishes through its broker and fans out what the broker delivers back, so the same code
serves one embedded process and a Redis-backed cluster. Every subscriber on a channel gets
that channel's messages in the broker's order; a joiner gets the last `history` messages
first, then the live stream, spliced by sequence number so nothing is lost or repeated.

deliver() must not block or await: a subscriber queues the message (or drops it, or closes
itself) and returns, so one slow client never holds up the others.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Protocol

from echoserver.brokers.base import Broker, Envelope


class Subscriber(Protocol):
    """One connection's end of a channel."""

    sub_id: str

    def deliver(self, envelope: Envelope) -> None:
        """Take one message for this connection without blocking."""


class _Joining:
    """Live messages that arrive for a subscriber while its history is being fetched."""

    __slots__ = ("buffered", "subscriber")

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.buffered: list[Envelope] = []

    def deliver(self, envelope: Envelope) -> None:
        self.buffered.append(envelope)


class Hub:
    """Local channel membership and fan-out over one broker."""

    def __init__(self, broker: Broker, *, include_sender: bool = True, history: int = 0) -> None:
        self.broker = broker
        self.include_sender = include_sender
        self.history = history
        self._channels: dict[str, dict[str, Subscriber | _Joining]] = {}
        self._node = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self.delivered = 0
        self._started = False

    async def start(self) -> None:
        """Connect the broker; join() does it on first use if the server has not."""
        if not self._started:
            self._started = True
            await self.broker.start(self._fan_out)

    async def close(self) -> None:
        await self.broker.close()
        self._channels.clear()

    def new_subscriber_id(self) -> str:
        """An id unique across every process sharing the broker."""
        return f"{self._node}:{next(self._ids)}"

    async def join(self, channel: str, subscriber: Subscriber) -> None:
        """Add a subscriber: history first (if configured), then the live stream."""
        if not self._started:
            await self.start()
        members = self._channels.get(channel)
        first = members is None
        if members is None:
            members = self._channels[channel] = {}
        if self.history <= 0:
            members[subscriber.sub_id] = subscriber
            if first:
                await self.broker.subscribe(channel)
            await self.broker.set_presence(channel, len(members))
            return
        joining = _Joining(subscriber)
        members[subscriber.sub_id] = joining
        try:
            if first:
                await self.broker.subscribe(channel)
            past = await self.broker.history(channel, self.history)
        finally:
            # The subscriber may have left (or the hub closed) while history was fetched.
            members = self._channels.get(channel)
            still_joining = members is not None and members.get(subscriber.sub_id) is joining
            if still_joining:
                members[subscriber.sub_id] = subscriber
        if not still_joining:
            return
        last_seq = 0
        for envelope in past:
            subscriber.deliver(envelope)
            last_seq = envelope.seq
        for envelope in joining.buffered:
            if envelope.seq > last_seq or envelope.seq == 0:
                subscriber.deliver(envelope)
        await self.broker.set_presence(channel, len(members))

    async def leave(self, channel: str, subscriber: Subscriber) -> None:
        members = self._channels.get(channel)
        if members is None or members.pop(subscriber.sub_id, None) is None:
            return
        if not members:
            del self._channels[channel]
            await self.broker.set_presence(channel, 0)
            await self.broker.unsubscribe(channel)
        else:
            await self.broker.set_presence(channel, len(members))

    async def publish(self, channel: str, data: bytes, binary: bool, sender: str | None) -> None:
        """Send to the channel; raises BrokerUnavailable when the broker cannot take it."""
        await self.broker.publish(Envelope(channel, data, binary, sender), self.history)

    def publish_nowait(self, channel: str, data: bytes, binary: bool, sender: str | None) -> bool:
        """Publish synchronously when the broker can (memory); False means await publish()."""
        return self.broker.publish_nowait(Envelope(channel, data, binary, sender), self.history)

    async def members(self, channel: str) -> int:
        """The channel's members across every process."""
        return await self.broker.presence(channel)

    def local_members(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def channels(self) -> Iterator[tuple[str, int]]:
        """(channel, local member count) for every channel with members here."""
        for name, members in self._channels.items():
            yield name, len(members)

    def _fan_out(self, envelope: Envelope) -> None:
        members = self._channels.get(envelope.channel)
        if not members:
            return
        skip = None if self.include_sender else envelope.sender
        # A copy, because a deliver() may close its connection and leave the channel.
        for sub_id, subscriber in list(members.items()):
            if sub_id != skip:
                subscriber.deliver(envelope)
        self.delivered += len(members) - (skip in members)

"""The broker interface: how a hub hands a channel's messages to every process.

A broker carries published messages to every hub subscribed to the channel (its own
included) in one order per channel, keeps a channel's recent history, and counts a
channel's members across processes. The memory broker does this inside one process; the
Redis broker does it across processes and hosts.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Envelope:
    """One published message as brokers carry it. Receivers must not change it."""

    channel: str
    data: bytes
    binary: bool
    sender: str | None = None
    # Position in the channel's order as the broker assigned it (1, 2, ...); 0 = not yet
    # published. Lets a joiner splice history and live messages without gap or repeat.
    seq: int = 0
    # The message's WebSocket frame, encoded by its first receiver and reused by the rest;
    # and its permessage-deflate frame (window bits, frame) for receivers that share one.
    frame: bytes | None = field(default=None, compare=False, repr=False)
    deflated: tuple[int, bytes] | None = field(default=None, compare=False, repr=False)


OnEnvelope = Callable[[Envelope], None]
OnHealthChange = Callable[[bool, str], None]


class BrokerUnavailable(Exception):
    """Raised by publish() when the broker cannot take the message right now."""


class Broker(abc.ABC):
    """What a hub needs from a broker. One instance belongs to one hub."""

    @abc.abstractmethod
    async def start(self, on_envelope: OnEnvelope) -> None:
        """Connect; from now on every envelope of a subscribed channel goes to on_envelope."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect and release everything; idempotent."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving the channel's envelopes."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving the channel's envelopes."""

    @abc.abstractmethod
    async def publish(self, envelope: Envelope, history: int = 0) -> None:
        """Send to every subscriber of envelope.channel, keeping the last `history` of them.

        Raises BrokerUnavailable when the message could not be handed over.
        """

    def publish_nowait(self, envelope: Envelope, history: int = 0) -> bool:
        """publish() done synchronously if this broker can; False means use publish()."""
        return False

    def publish_soon(self, envelope: Envelope, history: int = 0) -> asyncio.Future[None]:
        """Start publish() now and return its outcome, so a sender can have several in flight.

        Envelopes started one after another are published in that order. Raises
        BrokerUnavailable at once when the broker is known to be down.
        """
        return asyncio.ensure_future(self.publish(envelope, history))

    @abc.abstractmethod
    async def history(self, channel: str, limit: int) -> list[Envelope]:
        """The channel's last `limit` envelopes, oldest first."""

    @abc.abstractmethod
    async def set_presence(self, channel: str, local_members: int) -> None:
        """Record how many members this process has on the channel."""

    @abc.abstractmethod
    async def presence(self, channel: str) -> int:
        """Members of the channel across every process using this broker."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False while the broker cannot deliver (e.g. Redis unreachable)."""

    @property
    def health_reason(self) -> str:
        """Why the broker is unhealthy; empty when healthy."""
        return ""

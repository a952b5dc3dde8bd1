"""The broker interface: how a hub hands a channel's messages to every process.

A broker carries published messages to every hub subscribed to the channel (its own
included) in one order per channel, numbers them (the offset, per channel: 1, 2, ...),
keeps a channel's last `history_size` messages (no older than `history_ttl` seconds when
that is set, no more than `history_bytes` of payload), and, through its `presence`,
counts a channel's members across processes.
Kept messages are always the newest ones, so their offsets follow each other without gap:
a reader can tell whether they reach back to a given offset. The memory broker does this
inside one process; the Redis broker does it across processes and hosts.

A channel's numbering has an epoch: a short opaque string made with its counter, and a new
one whenever the broker lost the channel's state (a restarted memory broker, a channel it
forgot, a flushed Redis), when the counter starts again from 1. An offset means something
only with its epoch: the broker sets `Envelope.epoch` on what it publishes and delivers,
and `Backlog.epoch` says the numbering its offsets belong to ("" = nothing published yet).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(slots=True)
class Envelope:
    """One published message as brokers carry it. Receivers must not change it."""

    channel: str
    data: bytes
    binary: bool
    sender: str | None = None
    # The message's offset: its position in the channel's order as the broker assigned it
    # (1, 2, ...); 0 = not yet published. Lets a joiner splice history and live messages
    # without gap or repeat.
    seq: int = 0
    # The epoch of the channel's numbering `seq` belongs to (see the module docstring); ""
    # until published.
    epoch: str = ""


@dataclass(slots=True)
class Backlog:
    """What a channel keeps after an offset, read at one instant."""

    envelopes: list[Envelope]  # oldest first, offsets consecutive
    last: int  # the channel's latest offset at that instant; 0 = nothing published yet
    epoch: str = ""  # the numbering `last` and the envelopes' offsets belong to


OnEnvelope = Callable[[Envelope], None]

# What publish() returns: the offset, or a future of it when the publish is not done yet.
Published: TypeAlias = int | asyncio.Future[int]


class BrokerUnavailable(Exception):
    """The broker cannot take the message right now (unreachable, or refusing it)."""


class Presence(abc.ABC):
    """A channel's member count across every process sharing one broker.

    Each process records its own count per channel; count() adds up the live processes'.
    """

    @abc.abstractmethod
    async def set_local(self, channel: str, members: int) -> None:
        """Record how many members this process has on the channel (0 = none)."""

    @abc.abstractmethod
    async def count(self, channel: str) -> int:
        """Members of the channel across every process using this broker."""


class Broker(abc.ABC):
    """What a hub needs from a broker. One instance belongs to one hub."""

    presence: Presence
    # Messages kept per channel for joiners (0 = none); configuration, set before start().
    history_size: int = 0
    # Seconds a kept message stays kept (0 = no age limit); configuration, like history_size.
    history_ttl: float = 0.0
    # Payload bytes kept per channel; the oldest messages go first past it (configuration).
    history_bytes: int = 1 << 20
    # Payload bytes kept by this process, all channels together: the memory broker only
    # (a Redis server has its own maxmemory).
    history_total_bytes: int = 64 << 20
    # Seconds a publish waits for a broker that is down before it fails with BrokerUnavailable
    # (a broker that is never down ignores it).
    publish_timeout: float = 5.0

    # Per-channel history limits where some channels differ (namespaces): channel ->
    # (messages, seconds). None: every channel keeps history_size and history_ttl.
    retention: Callable[[str], tuple[int, float]] | None = None

    def kept_for(self, channel: str) -> tuple[int, float]:
        """(messages, seconds) of history this channel keeps."""
        rule = self.retention
        return (self.history_size, self.history_ttl) if rule is None else rule(channel)

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
    def publish(self, envelope: Envelope) -> Published:
        """Start sending to every subscriber of envelope.channel, keeping it in history.

        Publishes started one after another are published in that order, so a sender can
        have several in flight. Returns the message's offset when the publish is already
        done (the memory broker delivers at once), else a future of it, which fails with
        BrokerUnavailable when the message could not be handed over: refused, or the broker
        stayed down for `publish_timeout` seconds. Raises BrokerUnavailable at once when it
        cannot even wait (closing, or too much already waits). Once the offset is known,
        envelope.epoch is set too (before the future is done).
        """

    @abc.abstractmethod
    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        """The kept envelopes with an offset above `after` (the newest `limit` of them at
        most), the channel's latest offset and its epoch, as one consistent read. Raises
        BrokerUnavailable when the broker cannot tell (e.g. Redis unreachable)."""

    async def renew_epoch(self, channel: str, epoch: str) -> str:
        """Give the channel a new epoch if `epoch` is still its own, dropping what is kept
        under it; returns the channel's epoch. For a hub that saw the channel's offsets go
        back under one epoch (a Redis replica promoted before it had the last publishes
        reissues their offsets): from then on they cannot be mistaken for the old ones.
        A broker whose offsets never go back (memory) has nothing to do."""
        return epoch

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False while the broker cannot deliver (e.g. Redis unreachable)."""

    @property
    def health_reason(self) -> str:
        """Why the broker is unhealthy; empty when healthy."""
        return ""

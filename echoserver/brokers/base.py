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
from dataclasses import dataclass, field
from typing import Any, TypeAlias


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


# The offset of an envelope that is no message (a presence event, see Broker.signal):
# neither numbered nor kept.
SIGNAL = -1

OnEnvelope = Callable[[Envelope], None]

# What publish() returns: the offset, or a future of it when the publish is not done yet.
Published: TypeAlias = int | asyncio.Future[int]


class BrokerUnavailable(Exception):
    """The broker cannot take the message right now (unreachable, or refusing it)."""


@dataclass(slots=True)
class PresentUser:
    """One user on a channel, across every live process."""

    user: str  # the token's sub
    info: Any  # the token's info claim (as one of the user's processes last wrote it)
    connections: int  # 0 while within the presence grace after their last one closed


@dataclass(slots=True)
class Roll:
    """Who is on a channel, across every live process, read at one instant."""

    users: list[PresentUser] = field(default_factory=list)
    connections: int = 0  # every member: users' connections and guests


class Presence(abc.ABC):
    """A channel's members across every process sharing one broker.

    Each process records its own count per channel (set_local); count() adds up the live
    processes'. Each process also records, per channel and user, its connections of that
    user (set_user); roll() lists the users of the live processes. A process that dies
    without a word (SIGKILL) drops out of both within the broker's presence TTL.
    """

    @abc.abstractmethod
    async def set_local(self, channel: str, members: int) -> None:
        """Record how many members this process has on the channel (0 = none)."""

    @abc.abstractmethod
    async def count(self, channel: str) -> int:
        """Members of the channel across every process using this broker."""

    @abc.abstractmethod
    async def set_user(
        self, channel: str, user: str, connections: int, info: Any, present: bool = True
    ) -> tuple[int, int]:
        """Record this process's connections of `user` on the channel, and return how many
        live processes have the user there (an entry) just before and just after, read
        atomically with the write: (0, n) is the user's arrival, (n, 0) their departure,
        across every process. `present` False removes this process's entry; an entry may
        be present with 0 connections (a user within the presence grace)."""

    @abc.abstractmethod
    async def roll(self, channel: str) -> Roll:
        """The channel's users and members across every live process."""


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

    def publish_many(self, envelopes: list[Envelope]) -> list[Published]:
        """publish() of each envelope, in list order (so each channel keeps that order),
        started at once: a batch (the batch publish API). The memory broker delivers each
        at once; the Redis brokers queue them synchronously, so the batch goes out in one
        pipelined round trip (one per primary on a cluster) rather than one per message.
        Raises BrokerUnavailable at once when one cannot even be queued (those before it
        may still be published: their failures are not reported)."""
        started: list[Published] = []
        try:
            for envelope in envelopes:
                started.append(self.publish(envelope))
        except BrokerUnavailable:
            for outcome in started:
                if not isinstance(outcome, int):
                    outcome.add_done_callback(_retrieved)
            raise
        return started

    @abc.abstractmethod
    def signal(self, envelope: Envelope) -> None:
        """Deliver an envelope that is no message (a presence event) to every subscriber of
        its channel like a publish, but with offset SIGNAL: not numbered, not kept. Best
        effort: dropped while the broker is down (raises BrokerUnavailable at once then)."""

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


def _retrieved(future: asyncio.Future[int]) -> None:
    """A publish whose batch failed: its own outcome is nobody's to report."""
    if not future.cancelled():
        future.exception()

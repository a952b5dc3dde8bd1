"""What the hub hands out: a Delivery per message and fan-out (with the cache its receivers
share), a Replay per joiner, a Posted per message from the publish API.

Receivers see a Delivery, never the broker's Envelope. The wire and the transport know it
only as wire.shared.SharedMessage, which it satisfies.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from echoserver.brokers.base import Envelope


class Delivery:
    """One message as the hub hands it to the receivers of one fan-out.

    Receivers read it and share `encoded`, the message's bytes by encoding: the first
    receiver of an encoding (a WebSocket frame, a deflated frame for one window size, mixed
    mode's envelope, a Server-Sent Events chunk: the receivers name their own keys) builds
    them, the others reuse them. The hub knows none of these encodings. The broker's
    Envelope is never handed out.
    """

    __slots__ = ("binary", "channel", "data", "encoded", "envelope", "epoch", "seq")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.channel = envelope.channel  # a connection may follow several (issue 21)
        self.data = envelope.data
        self.binary = envelope.binary
        self.seq = envelope.seq  # the message's offset on its channel
        self.epoch = envelope.epoch  # the numbering that offset belongs to
        self.encoded: dict[Hashable, bytes] = {}


@dataclass(frozen=True, slots=True)
class Replay:
    """What a joiner was given before the live stream (see Hub.join)."""

    since: int | None  # the offset the joiner asked to resume after; None = plain join
    count: int  # messages replayed
    first: int | None  # offset of the first replayed message; None when none was
    # The channel's latest offset when the history was read: the live stream goes on from
    # the next one. None when not read (no history, no since) or the broker could not tell.
    last: int | None
    # With since: every message after it was replayed (or none was published); else None.
    recovered: bool | None
    # The epoch of `last` and of the replayed offsets ("" = nothing published yet); None
    # when not read, like `last`.
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Posted:
    """A message published on behalf of no member (the publish API)."""

    offset: int
    local_receivers: int  # members on this process
    receivers: int  # members across every process, as far as presence knows
    epoch: str = ""  # the epoch of `offset`

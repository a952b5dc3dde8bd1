"""What the wire and the transport read of a broadcast: SharedMessage.

A broadcast reaches every receiver as one object (the fan-out's Delivery) whose cache the
receivers share, keyed by encoding: the first one of an encoding renders, frames or
deflates it, the others reuse the bytes.
The wire and the transport see it only through this protocol, so they do not import the
fan-out; fanout.hub.Delivery satisfies it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol


class SharedMessage(Protocol):
    data: bytes  # the payload as published
    binary: bool
    seq: int  # the message's offset on its channel
    channel: str  # the channel it was published on
    epoch: str  # the epoch of its channel's numbering that `seq` belongs to
    encoded: dict[Hashable, bytes]  # its bytes by encoding, built by the first receiver

"""What the wire and the transport read of a broadcast: SharedMessage.

A broadcast reaches every receiver as one object (the fan-out's Delivery) whose caches the
receivers share: the first one renders, frames or deflates it, the others reuse the bytes.
The wire and the transport see it only through this protocol, so they do not import the
fan-out; fanout.hub.Delivery satisfies it.
"""

from __future__ import annotations

from typing import Protocol


class SharedMessage(Protocol):
    data: bytes  # the payload as published
    binary: bool
    seq: int  # the message's offset on its channel
    rendered: bytes | None  # the payload as the receivers' protocol wraps it (mixed mode)
    frame: bytes | None  # the encoded WebSocket frame
    deflated: tuple[int, bytes] | None  # (window bits, deflated frame)

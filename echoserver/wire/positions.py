"""Where a client stands in a channel's numbering: an offset and the epoch it belongs to.

This module owns the text forms of that position: an epoch as a client sends it back
(`?epoch=E` on a WebSocket URL, `"epoch"` in JSON), and a Server-Sent Events id,
``<epoch>:<offset>``, which an EventSource returns as `Last-Event-ID` on reconnecting. A
bare offset (no epoch: a client from before epochs, or one that lost the epoch) is taken
as an offset of the channel's current epoch, as offsets were before epochs existed.

Epochs are opaque: the broker makes them (brokers/base.py); here they are only checked to
be short and URL-safe, so they travel in URLs, headers and ids unescaped.
"""

from __future__ import annotations

import re

# An epoch as a client may send it back: the memory broker's are URL-safe base64, the
# Redis brokers' base 36; both well under 32 characters.
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,32}")
# An offset: a non-negative integer of at most 18 digits (fits in 63 bits).
OFFSET = re.compile(r"[0-9]{1,18}")


def valid_epoch(text: str) -> bool:
    """Whether `text` can be an epoch this server handed out."""
    return EPOCH.fullmatch(text) is not None


def event_id(epoch: str, offset: int) -> bytes:
    """A Server-Sent Events id for a message (no epoch: the bare offset)."""
    return b"%s:%d" % (epoch.encode(), offset) if epoch else b"%d" % offset


def parse_event_id(text: str) -> tuple[int, str | None] | None:
    """(offset, epoch or None) of an id event_id() made, or of a bare offset; None when it
    is neither."""
    epoch, colon, offset = text.rpartition(":")
    if not OFFSET.fullmatch(offset):
        return None
    if not colon:
        return int(offset), None
    return (int(offset), epoch) if valid_epoch(epoch) else None

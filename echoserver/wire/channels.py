"""What a client says about the several channels one connection follows, sans-I/O.

A mixed-mode ``{"type":"subscribe","channel":C,"since":N}`` names a channel and where to
resume it (channel_name, since_value, epoch_value). A multi-channel event stream
(``/sse?channel=a&channel=b``) gives each event an ``id:`` that resumes every channel of the
stream at once, its cursor: ``a:E:12,b:F:40``, one ``channel:epoch:offset`` per channel with
a known position, comma-separated (channel names and epochs hold neither ":" nor ","). An
entry without its epoch, ``a:12``, is an offset of the channel's current epoch, as a bare
since is (wire/positions.py). A browser's EventSource sends the last id back as
``Last-Event-ID`` when it reconnects (parse_cursor).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from echoserver.routes import CHANNEL_PATTERN
from echoserver.wire.positions import valid_epoch

CHANNEL = re.compile(CHANNEL_PATTERN)
OFFSET = re.compile(r"[0-9]{1,18}")  # as ?since=N: Redis counts to 2**63 - 1
# The longest `channel:epoch:offset,` a cursor holds per channel: bounds what is parsed.
MAX_CURSOR_ENTRY = 64 + 1 + 32 + 1 + 18 + 1

Position = tuple[int, "str | None"]  # (offset, its epoch; None: the current one)


class BadChannelRequest(ValueError):
    """A channel or a position a client gave that the server will not take (the message
    is for the client)."""


def channel_name(value: object) -> str:
    """A channel a client named: 1-64 characters of [A-Za-z0-9_.-]."""
    if not isinstance(value, str) or not CHANNEL.fullmatch(value):
        raise BadChannelRequest("a channel is 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def since_value(value: object) -> int | None:
    """A subscribe's `since`: absent (None) or an offset, a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**18:
        raise BadChannelRequest("since must be an offset: a non-negative integer")
    return value


def epoch_value(value: object) -> str | None:
    """A subscribe's `epoch`: absent (None) or an epoch the server could have handed out."""
    if value is None:
        return None
    if not isinstance(value, str) or not valid_epoch(value):
        raise BadChannelRequest("epoch must be 1-32 characters of A-Z a-z 0-9 _ -")
    return value


def cursor_text(positions: Mapping[str, Position]) -> bytes:
    """The `id:` of a multi-channel stream: ``a:E:12,b:F:40`` (an entry with no epoch yet,
    nothing published there, is ``channel:offset``)."""
    return ",".join(
        f"{channel}:{epoch}:{offset}" if epoch else f"{channel}:{offset}"
        for channel, (offset, epoch) in positions.items()
    ).encode()


def parse_cursor(text: str, channels: Collection[str]) -> dict[str, Position]:
    """Where to resume each of `channels` from a cursor (Last-Event-ID); a channel the
    cursor does not name is joined plainly, a name the stream does not follow is ignored
    (a client may drop a channel when it reconnects). Bounded: a cursor longer than the
    stream's channels could need is refused before it is split."""
    text = text.strip()
    if not text:
        return {}
    if len(text) > max(1, len(channels)) * MAX_CURSOR_ENTRY:
        raise BadChannelRequest("the event id is longer than this stream's channels need")
    positions: dict[str, Position] = {}
    for entry in text.split(","):
        parts = entry.strip().split(":")
        epoch: str | None = None
        if len(parts) == 3 and valid_epoch(parts[1]):
            channel, epoch, offset = parts
        elif len(parts) == 2:
            channel, offset = parts
        else:
            channel = offset = ""
        if not CHANNEL.fullmatch(channel) or not OFFSET.fullmatch(offset):
            raise BadChannelRequest(
                "the event id must be channel:epoch:offset,... as the server sent"
            )
        if channel in channels:
            positions[channel] = (int(offset), epoch)
    return positions

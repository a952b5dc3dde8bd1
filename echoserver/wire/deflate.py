"""permessage-deflate (RFC 7692) on the server side: negotiation and the zlib objects.

This module owns everything compression: it reads a client's Sec-WebSocket-Extensions
offers (several, comma-separated, parameters `;`-separated, values plain or quoted),
accepts the first offer it can honour (an offer with an unknown, repeated or invalid
parameter is declined and the next one tried), builds the response header, and makes the
connection's Deflater and Inflater from zlib directly. Inflating is bounded by the
message size limit (ValueError past it, which the connection turns into 1009).

What the server asks for itself, as the websockets library does by default: a 4 KiB
window (12 bits) for what it compresses and, when the client lets it choose
(`client_max_window_bits` without a value), for what the client compresses; zlib memLevel
5. That keeps a compressed connection at tens of kilobytes instead of ~300 KB, for a
compression ratio that differs little on WebSocket-sized messages. Tornado's
`compression_level` and `mem_level` compression options are honoured.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

NAME = "permessage-deflate"
SERVER_WINDOW_BITS = 12  # the most the server compresses with (the client may ask for less)
CLIENT_WINDOW_BITS = 12  # asked of a client that offers client_max_window_bits without a value
MEM_LEVEL = 5
LEVEL = 6
# zlib refuses a raw deflate window of 8 bits (madler/zlib#171), so an offer that limits
# the server to 8 is declined, as the websockets library does.
MIN_SERVER_WINDOW_BITS = 9

_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with; stripped on the wire (RFC 7692 7.2.1)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_WINDOW_BITS = re.compile(r"8|9|1[0-5]")  # decimal 8..15, no leading zero (RFC 7692 7.1.2)
_ESCAPE = re.compile(r"\\(.)")
_PARAMETERS = frozenset(
    (
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    )
)

Extension = tuple[str, list[tuple[str, str | None]]]


def parse_extensions(header: str) -> list[Extension | None]:
    """Each element of a Sec-WebSocket-Extensions value: (name, [(param, value or None)]),
    or None for an element that is not well formed. Empty elements are skipped."""
    extensions: list[Extension | None] = []
    for element in _split(header, ","):
        if element.strip():
            extensions.append(_parse_element(element))
    return extensions


def _split(text: str, separator: str) -> list[str]:
    """Split at `separator` where it is not inside a quoted string."""
    if '"' not in text:
        return text.split(separator)
    parts = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == separator:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_element(element: str) -> Extension | None:
    name, *pieces = (piece.strip() for piece in _split(element, ";"))
    if not _TOKEN.fullmatch(name):
        return None
    params: list[tuple[str, str | None]] = []
    for piece in pieces:
        key, equals, value = piece.partition("=")
        key = key.strip()
        if not _TOKEN.fullmatch(key):
            return None
        if not equals:
            params.append((key, None))
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = _ESCAPE.sub(r"\1", value[1:-1])
        # A quoted value must still be a token once unquoted (RFC 6455 9.1).
        if not _TOKEN.fullmatch(value):
            return None
        params.append((key, value))
    return name, params


@dataclass(frozen=True, slots=True)
class Agreement:
    """The accepted offer: what each side compresses with, and the response to send."""

    server_no_context_takeover: bool
    client_no_context_takeover: bool
    server_max_window_bits: int | None  # as answered; None = not in the answer (15)
    client_max_window_bits: int | None  # as answered; None = not in the answer (15)
    level: int = LEVEL
    mem_level: int = MEM_LEVEL

    def response(self) -> str:
        """The Sec-WebSocket-Extensions value of the 101 response."""
        parts = [NAME]
        if self.server_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.client_no_context_takeover:
            parts.append("client_no_context_takeover")
        if self.server_max_window_bits is not None:
            parts.append(f"server_max_window_bits={self.server_max_window_bits}")
        if self.client_max_window_bits is not None:
            parts.append(f"client_max_window_bits={self.client_max_window_bits}")
        return "; ".join(parts)

    def deflater(self) -> Deflater:
        bits = self.server_max_window_bits or 15
        return Deflater(bits, self.server_no_context_takeover, self.level, self.mem_level)

    def inflater(self, max_size: int) -> Inflater:
        bits = self.client_max_window_bits or 15
        return Inflater(bits, self.client_no_context_takeover, max_size)


def negotiate(
    header: str | None,
    *,
    server_no_context_takeover: bool = False,
) -> Agreement | None:
    """The first acceptable permessage-deflate offer in `header`, or None (no compression).

    server_no_context_takeover: ask for it even when the client did not offer it (RFC 7692
    7.1.1.1), so that every message compresses alone.
    """
    if not header:
        return None
    for extension in parse_extensions(header):
        if extension is None or extension[0] != NAME:
            continue
        agreement = _accept(extension[1], server_no_context_takeover, LEVEL, MEM_LEVEL)
        if agreement is not None:
            return agreement
    return None


def _accept(
    params: list[tuple[str, str | None]],
    server_no_context_takeover: bool,
    level: int,
    mem_level: int,
) -> Agreement | None:
    """The answer to one offer, or None when it carries a parameter we cannot accept."""
    offer: dict[str, str | None] = {}
    for key, value in params:
        if key not in _PARAMETERS or key in offer:
            return None  # unknown or repeated (RFC 7692 7.1)
        if key.endswith("takeover") and value is not None:
            return None  # these take no value
        if value is not None and not _WINDOW_BITS.fullmatch(value):
            return None
        offer[key] = value
    if "server_max_window_bits" in offer:
        value = offer["server_max_window_bits"]
        if value is None:
            return None  # needs a value
        server_bits = min(int(value), SERVER_WINDOW_BITS)
        if server_bits < MIN_SERVER_WINDOW_BITS:
            return None
    else:
        server_bits = SERVER_WINDOW_BITS  # the server may always say it uses less
    client_bits: int | None = None  # not offered: must not be answered (RFC 7692 7.1.2.2)
    if "client_max_window_bits" in offer:
        value = offer["client_max_window_bits"]
        client_bits = CLIENT_WINDOW_BITS if value is None else min(int(value), CLIENT_WINDOW_BITS)
    return Agreement(
        server_no_context_takeover=server_no_context_takeover
        or "server_no_context_takeover" in offer,
        client_no_context_takeover="client_no_context_takeover" in offer,
        server_max_window_bits=server_bits if server_bits < 15 else None,
        client_max_window_bits=client_bits,
        level=level,
        mem_level=mem_level,
    )


# Compressors for messages that compress alone, shared by every connection with the same
# settings: a full flush after each message resets the state (RFC 7692 7.1.1.1 asks no
# more), so one zlib object serves them all and a connection holds none of its own.
_shared: dict[tuple[int, int, int], Any] = {}


class Deflater:
    """Compresses the server's messages: payload in, RFC 7692 payload out (RSV1 is the
    caller's). `shared` is True when each message compresses alone, so that one compressed
    frame serves every receiver whose window is `window_bits`."""

    __slots__ = ("_flush", "_zlib", "shared", "window_bits")

    def __init__(self, window_bits: int, no_context_takeover: bool, level: int, mem_level: int):
        self.window_bits = window_bits
        self.shared = no_context_takeover
        if no_context_takeover:
            key = (window_bits, level, mem_level)
            if key not in _shared:
                _shared[key] = zlib.compressobj(level, zlib.DEFLATED, -window_bits, mem_level)
            self._zlib = _shared[key]
            self._flush = zlib.Z_FULL_FLUSH
        else:
            self._zlib = zlib.compressobj(level, zlib.DEFLATED, -window_bits, mem_level)
            self._flush = zlib.Z_SYNC_FLUSH

    def compress(self, data: bytes) -> bytes:
        z = self._zlib
        return (z.compress(data) + z.flush(self._flush))[:-4]


class Inflater:
    """Decompresses the client's messages, at most `max_size` bytes each: ValueError past
    that, zlib.error when the data is not a valid deflate stream."""

    __slots__ = ("_alone", "_window_bits", "_zlib", "max_size")

    def __init__(self, window_bits: int, no_context_takeover: bool, max_size: int) -> None:
        self._window_bits = window_bits
        self._alone = no_context_takeover  # each message alone: no state kept in between
        self._zlib: Any = None  # made on first use
        self.max_size = max_size

    def decompress(self, data: bytes) -> bytes:
        z = self._zlib
        if z is None:
            z = self._zlib = zlib.decompressobj(-self._window_bits)
        out = z.decompress(data + _TAIL, self.max_size + 1)
        if len(out) > self.max_size:
            self._zlib = None
            raise ValueError(f"message over {self.max_size} bytes once inflated")
        if self._alone or z.eof:  # (eof: the client ended the stream with a final block)
            self._zlib = None
        return out

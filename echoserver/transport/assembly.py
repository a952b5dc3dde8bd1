"""Assembling one WebSocket connection after its handshake: the frame parser (with
Tornado's C unmasking), the permessage-deflate agreement, the protocol, the rate limiter
and the connection around them.

The endpoint calls new_connection() once per handshake and adds the extension header it
returns to its 101; it never builds the protocol's parts itself.
"""

from __future__ import annotations

import time

from echoserver.config import WebSocketSettings
from echoserver.transport.connection import Endpoint, WebSocketConnection
from echoserver.transport.flusher import Flusher
from echoserver.transport.keepalive import Keepalive
from echoserver.transport.tornado_seam import websocket_mask
from echoserver.wire import deflate
from echoserver.wire.framing import FrameParser
from echoserver.wire.protocol import ServerProtocol


class RateLimit:
    """A token bucket: `rate` messages a second, bursts of up to one second's worth."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._tokens = self.burst
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def new_connection(
    endpoint: Endpoint,
    ws: WebSocketSettings,
    flusher: Flusher,
    keepalive: Keepalive,
    extensions: str | None,
    shares_frames: bool = False,
) -> tuple[WebSocketConnection, str | None]:
    """The connection for one handshake, and the Sec-WebSocket-Extensions value for its 101
    (None: no compression). `extensions` is the client's offer; with `shares_frames` every
    message is compressed alone (RFC 7692 7.1.1.1 lets the server ask), so one deflated
    frame serves every receiver with the same window."""
    parser = FrameParser(ws.max_message_size, unmask=websocket_mask)
    deflater = None
    response = None
    if ws.compression:
        agreement = deflate.negotiate(extensions, server_no_context_takeover=shares_frames)
        if agreement is not None:
            response = agreement.response()
            deflater = agreement.deflater()
            parser.decompress = agreement.inflater(ws.max_message_size).decompress
    limit = RateLimit(ws.rate_limit) if ws.rate_limit > 0 else None
    connection = WebSocketConnection(
        endpoint, ServerProtocol(parser, deflater), flusher, keepalive, limit
    )
    return connection, response

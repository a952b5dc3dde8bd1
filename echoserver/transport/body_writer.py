"""Writing a started HTTP response's body straight to its connection: BodyWriter.

Once an event stream's headers are sent (endpoints/sse.py), each fan-out's bytes would go
through RequestHandler.write/flush and HTTP1Connection's chunk framing: a buffer, a join,
a format and a future per stream and per flush. BodyWriter does that part itself: the
caller frames a body part once (frame(), shareable between every stream with the same
framing), parts gather until the Flusher's pass (flush(): once per loop pass, marked by
the first part of a pass) and leave in one write: straight
to the socket when Tornado holds nothing unsent for it (the common case), else through the
IOStream, which keeps the order and reports a gone peer as before. A TLS stream always
writes through its SSLIOStream (its socket's state is Tornado's).

Tornado still owns the connection: the terminal chunk, the access log and the close are
the handler's finish() as before; send() must run before it, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import tornado.iostream

from echoserver.transport.flusher import Flusher
from echoserver.transport.tornado_seam import unsent_bytes


def chunk(body: bytes) -> bytes:
    """One HTTP/1.1 chunk of a non-empty body (an empty one would end the response)."""
    return b"%x\r\n%s\r\n" % (len(body), body)


class BodyWriter:
    """The body of one response whose headers have left, written without Tornado's
    HTTP layer; `chunked` when the response uses chunked transfer encoding."""

    __slots__ = ("chunked", "dirty", "flusher", "parts", "size", "sock", "stream")

    def __init__(self, stream: tornado.iostream.IOStream, chunked: bool, flusher: Flusher) -> None:
        self.stream = stream
        self.chunked = chunked
        self.flusher = flusher
        self.dirty = False  # marked with the flusher
        self.size = 0  # bytes in parts
        self.sock: socket.socket | None = (
            None if isinstance(stream, tornado.iostream.SSLIOStream) else stream.socket
        )
        self.parts: list[bytes] = []  # framed, not sent yet

    def frame(self, body: bytes) -> bytes:
        """`body` as it goes on the wire: a chunk, or as is (an HTTP/1.0 response)."""
        return chunk(body) if self.chunked else body

    def add(self, framed: bytes) -> None:
        """Queue a framed part (see frame()) for this loop pass's write."""
        self.parts.append(framed)
        self.size += len(framed)
        if not self.dirty:
            self.dirty = True
            self.flusher.mark(self)

    def queued_bytes(self) -> int:
        """What the peer has not taken yet: queued here, or unsent in the IOStream."""
        return self.size + unsent_bytes(self.stream)

    def flush(self) -> None:
        """Write every part gathered since the last flush, in one write."""
        self.dirty = False
        parts = self.parts
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.size = 0
        stream = self.stream
        sock = self.sock
        if sock is not None and unsent_bytes(stream) == 0:
            try:
                sent = sock.send(data)
            except OSError:  # full, or gone: the stream's write handles both as it did
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        # A closed stream: the peer is gone, and the handler hears of it from Tornado.
        with contextlib.suppress(tornado.iostream.StreamClosedError):
            stream.write(data).add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a gone peer: nothing to report

"""Every Tornado internal the server relies on, and nothing else.

Tornado does the HTTP side (the listener, request parsing, routing, static files); the
WebSocket handshake and everything after it is the server's own code. Where the fast path
needs something Tornado does not expose, it is reached here and only here, so a new Tornado
release that changes one of them fails tests/test_tornado_seam.py loudly instead of
changing behaviour at run time. INTERNALS lists each with the signature relied on.

Supported: the current Tornado release series and the one before it (see setup.cfg).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import tornado.http1connection
import tornado.iostream
import tornado.tcpserver
import tornado.web
from tornado.util import _websocket_mask

# XOR-unmasking of a client frame's payload: Tornado's C speedup when built (else Python).
websocket_mask: Callable[[bytes, bytes], bytes] = _websocket_mask


def take_read_buffer(stream: tornado.iostream.IOStream) -> bytes:
    """What Tornado read from the socket past the HTTP request (frames sent right after
    the handshake), taken out of its buffer so the connection can parse it."""
    return stream._consume(stream._read_buffer_size)


def stream_with_bytes(sock: socket.socket, data: bytes) -> tornado.iostream.IOStream:
    """A new IOStream on `sock` whose read buffer holds `data` (read from the socket
    elsewhere): what a connection served outside Tornado hands back to it."""
    stream = tornado.iostream.IOStream(sock)
    if data:
        stream._read_buffer += data
        stream._read_buffer_size += len(data)
    return stream


def unsent_bytes(stream: tornado.iostream.IOStream) -> int:
    """Bytes written to the stream that have not reached the socket yet."""
    return stream._total_write_index - stream._total_write_done_index


def chunked_response(connection: object) -> bool | None:
    """Whether the response on an HTTP/1.x connection, its headers sent, frames its body
    as chunks (HTTP/1.1, no Content-Length); None on another kind of connection."""
    if not isinstance(connection, tornado.http1connection.HTTP1Connection):
        return None
    return bool(connection._chunking_output)


class SummaryHandler(tornado.web.RequestHandler):
    """A handler whose request summary, in Tornado's own warning and error lines about a
    request, is summary(): Tornado's has the URI with its query, so a ?token=."""

    def summary(self) -> str:
        """The request as log lines name it: method, path (never the query) and peer."""
        request = self.request
        return f"{request.method} {request.path} ({request.remote_ip})"

    def _request_summary(self) -> str:
        return self.summary()


def forget_response(handler: tornado.web.RequestHandler) -> None:
    """The 101 is sent: drop its headers and the (empty) output buffer, held for the
    connection's lifetime otherwise."""
    handler._headers = None  # type: ignore[assignment]
    handler._write_buffer = None  # type: ignore[assignment]


def handle_connection(
    server: tornado.tcpserver.TCPServer, connection: socket.socket, address: Any
) -> None:
    """Serve a socket the server's own accept loop accepted, as Tornado's would: wrapped
    for TLS when the server has ssl_options (read per connection, so a reload applies),
    in an IOStream, handed to server.handle_stream."""
    server._handle_connection(connection, address)


# (owner, attribute, the parameter names relied on, or None for an attribute that an
# instance sets). tests/test_tornado_seam.py checks each against the installed Tornado.
INTERNALS: list[tuple[Any, str, tuple[str, ...] | None]] = [
    (tornado.util, "_websocket_mask", ("mask", "data")),
    (tornado.iostream.BaseIOStream, "_consume", ("self", "loc")),
    (tornado.iostream.BaseIOStream, "_read_buffer", None),
    (tornado.iostream.BaseIOStream, "_read_buffer_size", None),
    (tornado.iostream.BaseIOStream, "_total_write_index", None),
    (tornado.iostream.BaseIOStream, "_total_write_done_index", None),
    (tornado.http1connection.HTTP1Connection, "_chunking_output", None),
    (tornado.tcpserver.TCPServer, "_handle_connection", ("self", "connection", "address")),
    (tornado.web.RequestHandler, "_headers", None),
    (tornado.web.RequestHandler, "_request_summary", ("self",)),
    (tornado.web.RequestHandler, "_write_buffer", None),
]

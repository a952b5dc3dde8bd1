"""The WebSocket connection after the handshake: the I/O adapter around ServerProtocol.

The endpoint (endpoints/websocket.py) answers the handshake and hands the detached stream to run().
Plain connections then move to a socket_transport.SocketTransport (on Linux; elsewhere to
the loop's own transport); TLS connections stay on Tornado's stream through
stream_io.StreamIO. Either way:

- each read goes to the protocol whole; the application's messages are dispatched in
  order and the replies they cause leave in one write at the end of the read;
- frames queued from elsewhere (broadcasts) leave in one write per connection per loop
  pass (flusher.Flusher); the loop serves every ready socket once per pass, so no
  connection can monopolise it;
- after the server's close frame the socket is read (and discarded) until the peer's
  close frame, so nothing sent before the close is destroyed by a reset; a close the peer
  never answers, or that waits behind data it does not read, ends in a reset after
  CLOSING_TIMEOUT, which frees what the kernel holds for it.

As a hub subscriber it shares one encoded frame (and one deflated frame per window size)
among every receiver of a broadcast.

Why one module of this length: reading, writing, pausing and closing act on the same few
fields of one object on the hot path (a method call per message is the cost that matters
here), so they stay together; the protocol rules themselves are in wire/protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import tornado.iostream

from echoserver.transport import socket_transport
from echoserver.transport.flusher import Flusher
from echoserver.transport.keepalive import Keepalive
from echoserver.transport.socket_transport import SocketTransport
from echoserver.transport.stream_io import StreamIO
from echoserver.transport.tornado_seam import take_read_buffer
from echoserver.wire.framing import (
    CLOSE,
    FAIL,
    MESSAGE,
    OP_BINARY,
    PONG,
    CloseCode,
    Event,
)
from echoserver.wire.protocol import CLOSED, OPEN, ServerProtocol
from echoserver.wire.shared import SharedMessage

if TYPE_CHECKING:
    pass

log = logging.getLogger("echoserver.ws")

# How long to wait for the peer's half of a closing handshake before resetting the socket;
# also how long a close frame may wait behind what a peer that stopped reading left unread.
CLOSING_TIMEOUT = 3.0
# After a protocol error (1002) the peer's frames cannot be followed to its close frame: the
# socket is closed once the peer has sent nothing for this long (nothing left unread, so no
# reset that would destroy the close frame on its way).
CLOSING_QUIET = 0.5
# The kernel's send buffer per connection (it reserves twice this): a peer that stops
# reading pins at most max_queue_bytes in the server plus about 2 x this in the kernel.
SEND_BUFFER = 128 * 1024

# Why reading is paused (bits of WebSocketConnection._paused).
PAUSED_OPENING = 1  # the endpoint's on_open() has not run
PAUSED_HANDLER = 2  # an on_raw_message coroutine is running
PAUSED_WRITES = 4  # the peer is not taking what we write


class Endpoint(Protocol):
    """What a connection needs of the handler it serves (see endpoints/websocket.py)."""

    @property
    def peer(self) -> str:
        """Who it is, for log lines: "address path"."""

    def on_open(self) -> None:
        """The socket is taken over; messages may now arrive."""

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        """One message (text already checked as UTF-8); an awaitable pauses reading."""

    def on_connection_closed(self, code: int) -> None:
        """The connection is gone, with this close code (1006: no close frame)."""


class EchoCounts(Protocol):
    """Where an echoing connection counts what it echoes (the server's metrics)."""

    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int


class RateLimiter(Protocol):
    def allow(self) -> bool:
        """Whether one more message may pass now."""


Transport = SocketTransport | StreamIO | asyncio.Transport


class _TransportIO(asyncio.Protocol):
    """asyncio's side of a connection, where SocketTransport is not available: bytes in,
    write pressure, loss.

    Bytes in go straight to the connection's feed(): `data_received` is that bound method,
    set per instance (both loops call `protocol.data_received`; uvloop looks it up once,
    when the transport is made), so a read costs no Python call of ours in between.
    """

    __slots__ = ("connection", "data_received")

    def __init__(self, connection: WebSocketConnection) -> None:
        self.connection = connection
        self.data_received = connection.feed  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop may call this after connect_accepted_socket() has returned, so the
        # connection learns of its transport here, not from that call.
        self.connection.transport_made(transport)  # type: ignore[arg-type]

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost()

    def pause_writing(self) -> None:
        # The peer reads slower than it makes us write: stop reading what it sends.
        self.connection.pause_reading()

    def resume_writing(self) -> None:
        self.connection.resume_reading()


class WebSocketConnection:
    """Server side of one WebSocket connection: I/O, timers, dispatch, fan-out role."""

    __slots__ = (
        "_backlog",
        "_closing_timer",
        "_dirty",
        "_feeding",
        "_lost",
        "_paused",
        "_pending",
        "_quiet_timer",
        "awaiting_pong",
        "echo",
        "encoding",
        "endpoint",
        "flusher",
        "keepalive",
        "protocol",
        "rate_limit",
        "render",
        "sub_id",
        "transport",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        protocol: ServerProtocol,
        flusher: Flusher,
        keepalive: Keepalive,
        rate_limit: RateLimiter | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.flusher = flusher
        self.keepalive = keepalive
        self.rate_limit = rate_limit
        self.transport: Transport | None = None
        self.sub_id = ""  # its id as a hub subscriber
        # How a broadcast's payload is wrapped for this client (mixed mode's JSON envelope);
        # None = sent as is. Returning None skips the message.
        self.render: Callable[[SharedMessage], bytes | None] | None = None
        # The key of this client's frames in a delivery's shared `encoded`; None when its
        # frames are its own (compressed with context takeover).
        self.encoding: str | None = self._encoding()
        self.awaiting_pong = False
        self.echo: EchoCounts | None = None  # set by echo_messages()
        self._dirty = False  # marked with the flusher
        self._feeding = False  # inside feed(): it writes once at its end
        self._paused = PAUSED_OPENING
        self._pending = b""  # bytes that arrived while reading was paused
        self._backlog: tuple[list[Event], int] | None = None
        self._closing_timer: asyncio.TimerHandle | None = None
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._lost = False

    # --- taking the socket over ----------------------------------------------------------

    async def run(self, stream: tornado.iostream.IOStream, response: bytes = b"") -> None:
        """Write the handshake's `response` (the 101) on Tornado's stream, then take the
        socket off it and serve it."""
        try:
            read_loop = await self._take_over(stream, response)
        except (OSError, tornado.iostream.StreamClosedError):
            self.connection_lost()
            return
        self.keepalive.add(self)
        try:
            self.endpoint.on_open()
        except Exception:
            log.exception("opening %s failed", self.endpoint.peer)
            self._finish(reset=True)
            return
        if self._lost:
            return
        self.resume_reading(PAUSED_OPENING)
        if read_loop is not None:
            await read_loop

    async def _take_over(
        self, stream: tornado.iostream.IOStream, response: bytes
    ) -> Awaitable[None] | None:
        """Move the socket to a SocketTransport (or the loop's transport where epoll is
        missing); return a read loop if it stays on the stream (TLS)."""
        await stream.write(response)  # the 101 response has left
        self._pending = take_read_buffer(stream)  # frames sent right after the handshake
        if isinstance(stream, tornado.iostream.SSLIOStream):
            io = StreamIO(stream, self, self.connection_lost)
            self.transport = io
            if self.protocol.buffered:  # queued before the 101 (a channel's replayed history)
                self.flush()
            return io.read_loop()
        sock = stream.socket.dup()
        stream.close()  # closes Tornado's descriptor; the duplicate keeps the connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A fixed send buffer instead of the kernel's autotuned one (up to 4 MB): what a
        # peer that stops reading can pin in the kernel is bounded (see SEND_BUFFER).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        loop = asyncio.get_running_loop()
        if socket_transport.AVAILABLE:
            poller = socket_transport.poller_for(loop)
            self.transport_made(SocketTransport(sock, self, poller, reading=not self._paused))
            return None
        await loop.connect_accepted_socket(lambda: _TransportIO(self), sock=sock)
        return None

    def transport_made(self, transport: SocketTransport | asyncio.Transport) -> None:
        self.transport = transport
        if self._paused:
            transport.pause_reading()
        if self.protocol.buffered:
            self.flush()
        if not self._paused:
            self._feed_pending()

    def _feed_pending(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, b""
            self.feed(pending)

    # --- reading -------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the peer: act on every complete frame, then write once."""
        if self._lost:
            return
        if self._paused:
            # uvloop may deliver data after pause_reading() (even before on_open() has
            # run): keep it for resume_reading(), in order.
            self._pending += data
            return
        protocol = self.protocol
        if protocol.state != OPEN:
            self._feed_closing(data)
            return
        self._feeding = True
        try:
            events = protocol.parser.receive(data)  # protocol.receive() while OPEN
            if events:
                self._handle_events(events, 0)
        finally:
            self._feeding = False
            if protocol.buffered:
                # flush(), inlined on the hot path: the transport exists while it feeds us,
                # and a lost connection's protocol holds nothing.
                self._dirty = False
                self.transport.write(protocol.data_to_send())  # type: ignore[union-attr]
        if protocol.state != OPEN:
            self._after_close_sent()

    def echo_messages(self, counts: EchoCounts) -> None:
        """Send every message back as it came, same bytes, same type, counted in `counts`
        (in and out): the echo, done here instead of by a call to the endpoint per message.
        Everything else about a message (the rate limit, the rules, order with pings and
        closes) is as for any other."""
        self.echo = counts

    def _handle_events(self, events: list[Event], index: int) -> None:
        protocol = self.protocol
        on_message = self.endpoint.on_raw_message
        rate_limit = self.rate_limit
        echo = self.echo
        count = len(events)
        while index < count:
            event = events[index]
            kind, arg, payload = event
            index += 1
            if kind == MESSAGE:
                if protocol.state != OPEN:
                    break
                if rate_limit is not None and not rate_limit.allow():
                    self.fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                    break
                if echo is not None:
                    # Queued while OPEN (checked above), so it is sent: counted out too.
                    # (No flusher mark: this runs inside a read, which writes at its end.)
                    protocol.send_message(payload, arg == OP_BINARY)  # type: ignore[arg-type]
                    size = len(payload)
                    echo.messages_in += 1
                    echo.bytes_in += size
                    echo.messages_out += 1
                    echo.bytes_out += size
                    continue
                try:
                    result = on_message(payload, arg == OP_BINARY)  # type: ignore[arg-type]
                except Exception:
                    self._internal_error()
                    break
                if result is not None:
                    self._wait_for(result, events, index)
                    return
            elif kind == FAIL:
                self.fail(arg, payload)  # type: ignore[arg-type]
                break
            elif kind != CLOSE and rate_limit is not None and not rate_limit.allow():
                # Pings and pongs cost a token each, like messages.
                self.fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                break
            elif kind == PONG:
                self.awaiting_pong = False
            elif protocol.handle(event):  # the peer's close
                return
        if index < count and protocol.state != OPEN:
            # Closed with events left in this read: the peer's close frame may be among them.
            protocol.after_close(events[index:])

    def _wait_for(self, result: Awaitable[Any], events: list[Event], index: int) -> None:
        """on_raw_message returned an awaitable: read nothing more until it ends."""
        self.pause_reading(PAUSED_HANDLER)
        self._backlog = (events, index)
        future = asyncio.ensure_future(result)
        future.add_done_callback(self._handler_done)

    def _handler_done(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            if error is not None:
                log.error("handling a message from %s failed", self.endpoint.peer, exc_info=error)
            self._internal_error(logged=True)
            return
        backlog, self._backlog = self._backlog, None
        if backlog is not None and backlog[1] < len(backlog[0]):  # events left to handle
            self._feeding = True
            try:
                self._handle_events(*backlog)
            finally:
                self._feeding = False
                if self.protocol.buffered:
                    self.flush()
            if self.protocol.state != OPEN:
                self._after_close_sent()
        if self._backlog is None:
            self.resume_reading(PAUSED_HANDLER)

    def pause_reading(self, reason: int = PAUSED_WRITES) -> None:
        if self.protocol.state != OPEN:
            return  # closing: read on until the peer's close frame
        if not self._paused and self.transport is not None and not self._lost:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int = PAUSED_WRITES) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused or self.transport is None or self._lost:
            return
        self.transport.resume_reading()
        self._feed_pending()

    # --- writing -------------------------------------------------------------------------

    # The protocol frames and queues; the connection only marks itself with the flusher, so
    # that what was queued outside a read leaves in this loop pass (inside a read, feed()
    # writes once at its end).

    def send(self, payload: bytes, binary: bool) -> None:
        """Queue one message (text payloads must already be UTF-8)."""
        self.protocol.send_message(payload, binary)
        if not self._dirty:
            self._dirty = True
            if not self._feeding:
                self.flusher.mark(self)

    def ping(self) -> None:
        self.protocol.ping()
        self._mark()

    def _mark(self) -> None:
        if not self._dirty:
            self._dirty = True
            if not self._feeding:
                self.flusher.mark(self)

    def flush(self) -> None:
        """Write what the protocol has queued, in one write."""
        self._dirty = False
        if self.transport is None:
            return  # kept until the transport exists (transport_made flushes)
        protocol = self.protocol
        if protocol.buffered:
            self.transport.write(protocol.data_to_send())

    # --- as a hub subscriber -------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self.endpoint.peer

    def wrap_broadcasts(self, render: Callable[[SharedMessage], bytes | None]) -> None:
        """Send broadcasts as `render` makes them (None from it: skip the message)."""
        self.render = render
        self.encoding = self._encoding()

    def _encoding(self) -> str | None:
        # An interned string: its hash is computed once, not per delivery as a tuple's is.
        render = (
            "" if self.render is None else f" {self.render.__module__}.{self.render.__qualname__}"
        )
        deflater = self.protocol.deflater
        if deflater is None:
            return sys.intern("frame" + render)
        if deflater.shared:  # without context takeover the same bytes serve every such receiver
            return sys.intern(f"deflated {deflater.window_bits}{render}")
        return None

    def deliver(self, delivery: SharedMessage) -> None:
        """Queue a broadcast: framed once per encoding and shared by its receivers."""
        protocol = self.protocol
        if protocol.state:  # not OPEN (CLOSED once the socket is lost)
            return
        frame = delivery.encoded.get(self.encoding)
        if frame is None:
            frame = self._frame_for(delivery)
            if frame is None:
                return
        protocol.send_frame(frame)
        if not self._dirty:
            self._dirty = True
            if not self._feeding:
                self.flusher.mark(self)

    def _frame_for(self, delivery: SharedMessage) -> bytes | None:
        """This receiver's frame of a delivery, built and (when it can be shared) kept
        under its encoding for the others; None when this receiver skips the message."""
        data = delivery.data if self.render is None else self.render(delivery)
        if data is None:
            return None
        frame = self.protocol.encode(data, delivery.binary)
        if self.encoding is not None:
            delivery.encoded[self.encoding] = frame
        return frame

    def queued_bytes(self) -> int:
        """Bytes queued for this peer that it has not taken yet."""
        if self.transport is None:
            return self.protocol.buffered
        return self.protocol.buffered + self.transport.get_write_buffer_size()

    def close_slow(self) -> None:
        self.close(CloseCode.TRY_AGAIN_LATER, "receiving too slowly")

    # --- closing -------------------------------------------------------------------------
    #
    # One path: close() (or fail(), or close_now()) queues our close frame through the
    # protocol, then _after_close_sent() reads on until the peer's close frame
    # (_feed_closing) or the closing timeout; every way out ends in _finish(), the one place
    # the socket is closed (gracefully, or reset); connection_lost() is the transport
    # telling us it is gone, and tells the endpoint.

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (once): send our close frame, wait for the peer's."""
        if self.protocol.state == OPEN and not self._lost:
            self.protocol.close(code, reason)
            self.flush()
            self._after_close_sent()

    def fail(self, code: int, reason: str) -> None:
        """The peer broke a rule or a policy: close with `code`, logged."""
        if self.protocol.state == OPEN:
            log.info("closing %s with %d: %s", self.endpoint.peer, code, reason)
        self.close(code, reason)

    def close_now(self, code: int, reason: str) -> None:
        """Send our close frame and close the socket without waiting for the peer's (a peer
        that does not answer pings is not there to answer)."""
        log.info("closing %s with %d: %s", self.endpoint.peer, code, reason)
        self.protocol.close(code, reason)
        self.protocol.end()
        self.flush()
        self._after_close_sent()

    def abort(self) -> None:
        """The HTTP side saw the connection go (before the take-over finished)."""
        self._finish(reset=True)

    def is_closing(self) -> bool:
        return self.protocol.state != OPEN  # CLOSED once the socket is lost, too

    def _internal_error(self, logged: bool = False) -> None:
        if not logged:
            log.exception("handling a message from %s failed", self.endpoint.peer)
        self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _after_close_sent(self) -> None:
        """The protocol left OPEN: read until the peer closes, or close the socket now."""
        if self._lost:
            return
        if self.protocol.state == CLOSED:
            self._finish()
        else:
            self._read_until_peer_closes()
        if self._closing_timer is None:
            # Also bounds a close that waits behind data the peer does not read.
            loop = asyncio.get_running_loop()
            self._closing_timer = loop.call_later(CLOSING_TIMEOUT, self._finish, True)

    def _read_until_peer_closes(self) -> None:
        """Whatever paused reading, the peer's close frame must be read."""
        if self.protocol.discarding:
            self._wait_for_quiet()
        paused, self._paused = self._paused, 0
        if paused and self.transport is not None:
            self.transport.resume_reading()
            if not self._feeding:
                self._feed_pending()

    def _feed_closing(self, data: bytes) -> None:
        """Our close frame is sent: only the peer's close frame matters now.

        Closing a socket with unread data makes the kernel reset the connection, and a
        reset destroys what the peer has not read yet: the last replies and the close frame.
        """
        protocol = self.protocol
        protocol.receive(data)
        if protocol.state == CLOSED:  # the peer's close frame
            self._finish()
        elif protocol.discarding:
            self._wait_for_quiet()

    def _wait_for_quiet(self) -> None:
        """The peer's frames can no longer be parsed (after a 1002): close once it has sent
        nothing for CLOSING_QUIET, so that nothing is left unread to turn the close into a
        reset."""
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        loop = asyncio.get_running_loop()
        self._quiet_timer = loop.call_later(CLOSING_QUIET, self._finish)

    def _finish(self, reset: bool = False) -> None:
        """The one place the socket is closed: after what is buffered has been sent, or
        with `reset` (the closing timeout, a failed open, the HTTP side's abort) at once,
        dropping what the kernel still holds for it."""
        self.protocol.end()
        transport = self.transport
        if reset:
            timer, self._closing_timer = self._closing_timer, None
            if timer is not None:
                timer.cancel()  # a no-op when it is the timer that called
        if transport is None:
            if reset:
                self.connection_lost()  # nothing to close: the stream was never taken over
        elif not self._lost:
            if reset:
                reset_on_close(transport)
                transport.abort()
            else:
                transport.close()

    def connection_lost(self) -> None:
        """The transport is gone: stop the timers and tell the endpoint, once."""
        if self._lost:
            return
        self._lost = True
        for timer in (self._closing_timer, self._quiet_timer):
            if timer is not None:
                timer.cancel()
        self._closing_timer = self._quiet_timer = None
        self.keepalive.discard(self)
        protocol = self.protocol
        code = protocol.close_code
        protocol.end(discard_output=True)
        self.endpoint.on_connection_closed(code)


def reset_on_close(transport: Transport) -> None:
    """Make the coming close a reset (SO_LINGER 0): a plain close of a socket whose peer
    stopped reading keeps its unsent megabytes in the kernel (FIN-WAIT-1) for minutes."""
    if isinstance(transport, SocketTransport):
        transport.reset()
        return
    sock = transport.get_extra_info("socket")
    if not isinstance(sock, socket.socket) and not hasattr(sock, "setsockopt"):
        return
    with contextlib.suppress(OSError):  # already closed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

"""The WebSocket connection after the handshake: socket I/O, coalesced writes, closing.

Tornado does the HTTP handshake; WebSocketConnection (returned by the handler's
get_websocket_protocol hook) then takes the socket off Tornado's IOStream and hands it to
an asyncio (or uvloop) transport. Each read is parsed whole by protocol.FrameParser, the
replies it causes leave in one write at the end of that read, and frames queued for a
connection from elsewhere (broadcasts) leave in one write per connection per loop pass.
The loop serves every ready socket once per pass, so no connection can monopolise it.

TLS connections keep Tornado's SSLIOStream (its TLS state cannot move to a new transport)
and go through the same parser and write queue.

Pings come from one Keepalive per server, not one task per connection: an idle
connection costs a few objects, not a coroutine and a timer of its own.

Relies on WebSocketProtocol13 and IOStream internals of the Tornado range pinned in
setup.cfg: _challenge_response and IOStream._consume. permessage-deflate is deflate.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import tornado.escape
import tornado.iostream
from tornado.websocket import (
    WebSocketHandler,
    WebSocketProtocol13,
    _WebSocketParams,
)

from echoserver import deflate
from echoserver import framing as protocol
from echoserver.framing import (
    CLOSE,
    CLOSE_NO_STATUS,
    FAIL,
    MESSAGE,
    OP_BINARY,
    OP_PONG,
    OP_TEXT,
    PING,
    PONG,
    Event,
    FrameParser,
)

if TYPE_CHECKING:
    from echoserver.hub import Delivery

log = logging.getLogger("echoserver.ws")

CLOSE_POLICY = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
# How long to wait for the peer's half of a closing handshake before resetting the socket;
# also how long a close frame may wait behind what a peer that stopped reading left unread.
CLOSING_TIMEOUT = 3.0
# After a protocol failure the peer's frames cannot be followed to its close frame: the
# socket is closed once the peer has sent nothing for this long (nothing left unread, so no
# reset that would destroy the close frame on its way).
CLOSING_QUIET = 0.5
# The kernel's send buffer per connection (it reserves twice this): a peer that stops
# reading pins at most max_queue_bytes in the server plus about 2 x this in the kernel.
SEND_BUFFER = 128 * 1024


class RateLimiter(Protocol):
    def allow(self) -> bool:
        """Whether one more message may pass now."""


class Flusher:
    """Sends the frames queued for many connections in one pass: one write per connection."""

    def __init__(self) -> None:
        self._pending: list[WebSocketConnection] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, connection: WebSocketConnection) -> None:
        if not self._pending:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush_all)
        self._pending.append(connection)

    def _flush_all(self) -> None:
        pending, self._pending = self._pending, []
        for connection in pending:
            connection.flush()


class Keepalive:
    """Pings every connection every `interval` seconds; closes those silent for `timeout`."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = min(timeout, interval) if timeout > 0 else interval
        self._connections: set[WebSocketConnection] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, connection: WebSocketConnection) -> None:
        if self.interval <= 0:
            return
        self._connections.add(connection)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def discard(self, connection: WebSocketConnection) -> None:
        self._connections.discard(connection)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self.interval)
            while self._connections:
                started = loop.time()
                pinged = list(self._connections)
                for connection in pinged:
                    connection.awaiting_pong = True
                    connection.write_ping(b"")
                await asyncio.sleep(self.timeout)
                for connection in pinged:
                    if connection.awaiting_pong and not connection.is_closing():
                        # As websockets does: 1011, and no wait for a peer that is not there.
                        connection.give_up(CLOSE_INTERNAL_ERROR, f"no pong within {self.timeout}s")
                await asyncio.sleep(max(0.0, started + self.interval - loop.time()))
        finally:
            self._task = None


class _TransportIO(asyncio.Protocol):
    """asyncio's side of a connection: bytes in, write pressure, loss."""

    def __init__(self, connection: WebSocketConnection) -> None:
        self.connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop may call this after connect_accepted_socket() has returned, so the
        # connection learns of its transport here, not from that call.
        self.connection.transport_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.connection.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost()

    def pause_writing(self) -> None:
        # The peer reads slower than it makes us write: stop reading what it sends.
        self.connection.pause_reading()

    def resume_writing(self) -> None:
        self.connection.resume_reading()


class _StreamIO:
    """The same transport interface over Tornado's IOStream (TLS connections)."""

    def __init__(self, stream: tornado.iostream.IOStream, connection: WebSocketConnection) -> None:
        self.stream = stream
        self.connection = connection
        self._reading = asyncio.Event()
        stream.set_close_callback(connection.connection_lost)

    async def read_loop(self) -> None:
        try:
            while not self.stream.closed():
                await self._reading.wait()
                data = await self.stream.read_bytes(65536, partial=True)
                self.connection.feed(data)
        except tornado.iostream.StreamClosedError:
            pass

    def write(self, data: bytes) -> None:
        if not self.stream.closed():
            self.stream.write(data).add_done_callback(_ignore_stream_closed)

    def get_write_buffer_size(self) -> int:
        return self.stream._total_write_index - self.stream._total_write_done_index

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        if not self.stream.closed():
            self.stream.write(b"").add_done_callback(lambda _: self.stream.close())

    def abort(self) -> None:
        self.stream.close()

    def is_closing(self) -> bool:
        return self.stream.closed()


def _ignore_stream_closed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so a closed stream is not logged as unhandled


# Why reading is paused (bits of WebSocketConnection._paused).
PAUSED_OPENING = 1  # the handler's open() has not finished
PAUSED_HANDLER = 2  # an on_message coroutine is running
PAUSED_WRITES = 4  # the peer is not taking what we write


class WebSocketConnection(WebSocketProtocol13):
    """Server side of one WebSocket connection, strict and fast.

    Slotted, and WebSocketProtocol13.__init__ is not called: it sets some twenty
    attributes for Tornado's own frame reader, which this class replaces.
    """

    __slots__ = (
        "_backlog",
        "_closing_timer",
        "_compression_options",
        "_compressor",
        "_decompressor",
        "_dirty",
        "_feeding",
        "_lost",
        "_on_raw",
        "_out",
        "_out_size",
        "_paused",
        "_peer_closed",
        "_pending_leftover",
        "_quiet_timer",
        "_selected_subprotocol",
        "awaiting_pong",
        "client_terminated",
        "close_code",
        "close_code_sent",
        "close_reason",
        "flusher",
        "handler",
        "keepalive",
        "params",
        "parser",
        "rate_limit",
        "server_terminated",
        "stream",
        "sub_id",
        "transport",
    )

    def __init__(
        self,
        handler: WebSocketHandler,
        params: _WebSocketParams,
        flusher: Flusher,
        keepalive: Keepalive,
        rate_limit: RateLimiter | None = None,
    ) -> None:
        self.handler = handler
        self.params = params
        self.stream: tornado.iostream.IOStream | None = None
        self.client_terminated = False
        self.server_terminated = False
        self._compression_options = params.compression_options
        self._compressor: deflate.Deflater | None = None
        self._decompressor: deflate.Inflater | None = None
        self._selected_subprotocol: str | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.close_code_sent: int | None = None
        self.flusher = flusher
        self.keepalive = keepalive
        self.rate_limit = rate_limit
        self.parser = FrameParser(params.max_message_size)
        self.transport: asyncio.Transport | _StreamIO | None = None
        self.sub_id = ""
        self.awaiting_pong = False
        self._out: list[bytes] = []
        self._out_size = 0
        self._dirty = False
        self._feeding = False
        self._paused = 0
        self._pending_leftover = b""
        self._backlog: tuple[list[Event], int] | None = None
        self._closing_timer: asyncio.TimerHandle | None = None
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._peer_closed = False  # the peer sent a close frame
        # A handler may take raw payloads (bytes, text already checked) to skip decoding.
        self._on_raw = getattr(handler, "on_raw_message", None)

    # --- handshake and take-over --------------------------------------------------------

    async def _accept_connection(self, handler: WebSocketHandler) -> None:
        header = handler.request.headers.get("Sec-WebSocket-Protocol")
        offered = [s.strip() for s in header.split(",")] if header else []
        self.selected_subprotocol = handler.select_subprotocol(offered)
        if self.selected_subprotocol:
            handler.set_header("Sec-WebSocket-Protocol", self.selected_subprotocol)
        self._negotiate_compression(handler)
        # What the client may count on once it has its 101 (a channel's membership, with
        # its broker subscription active) happens before the 101 is sent.
        try:
            await handler.before_upgrade()  # type: ignore[attr-defined]
        except Exception:
            handler.log_exception(*sys.exc_info())
            if not self._lost:
                handler.send_error(503)
            return
        if self._lost:  # the client went away meanwhile
            return
        handler.clear_header("Content-Type")
        handler.set_status(101)
        handler.set_header("Upgrade", "websocket")
        handler.set_header("Connection", "Upgrade")
        handler.set_header("Sec-WebSocket-Accept", self._challenge_response(handler))
        handler.finish()
        stream = handler._detach_stream()
        self.stream = stream
        try:
            read_loop = await self._take_over(stream)
        except (OSError, tornado.iostream.StreamClosedError):
            self.connection_lost()
            return
        self.stream = None  # closed, or owned by the TLS reader
        release_handshake(handler)
        self.keepalive.add(self)
        try:
            opened = handler.open(*handler.open_args, **handler.open_kwargs)
            if opened is not None:
                await opened
        except Exception:
            handler.log_exception(*sys.exc_info())
            self._abort()
            return
        if self._lost:
            return
        self.resume_reading(PAUSED_OPENING)
        if read_loop is not None:
            await read_loop

    def _negotiate_compression(self, handler: WebSocketHandler) -> None:
        if self._compression_options is None:
            return
        agreement = deflate.negotiate(
            handler.request.headers.get("Sec-WebSocket-Extensions"),
            # No context takeover (RFC 7692 7.1.1.1 lets the server ask for it): each
            # message compresses alone, so one compressed frame serves every receiver
            # with the same window; a broadcast is deflated once, not once per client.
            server_no_context_takeover=getattr(handler, "shares_frames", False),
            options=self._compression_options,
        )
        if agreement is None:
            return
        handler.set_header("Sec-WebSocket-Extensions", agreement.response())
        self._compressor = agreement.deflater()
        self._decompressor = agreement.inflater(self.params.max_message_size)
        self.parser.decompress = self._decompressor.decompress

    async def _take_over(self, stream: tornado.iostream.IOStream) -> Awaitable[None] | None:
        """Move the socket to an asyncio transport; return a read loop if it stays on stream."""
        await stream.write(b"")  # the 101 response has left
        leftover = stream._consume(stream._read_buffer_size)
        self._paused |= PAUSED_OPENING
        if isinstance(stream, tornado.iostream.SSLIOStream):
            io = _StreamIO(stream, self)
            self.transport = io
            if leftover:
                self._pending_leftover = leftover
            if self._out:  # queued before the 101 (a channel's replayed history)
                self.flush()
            return io.read_loop()
        sock = stream.socket.dup()
        stream.close()  # closes Tornado's descriptor; the duplicate keeps the connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A fixed send buffer instead of the kernel's autotuned one (up to 4 MB): what a
        # peer that stops reading can pin in the kernel is bounded (see SEND_BUFFER).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _TransportIO(self), sock=sock)
        if leftover:
            self._pending_leftover = leftover
        return None

    def transport_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self._paused:
            transport.pause_reading()
        if self._out:
            self.flush()
        if not self._paused:
            self._feed_leftover()

    def _feed_leftover(self) -> None:
        """Frames that arrived with the handshake, read by Tornado before the take-over."""
        if self._pending_leftover:
            leftover, self._pending_leftover = self._pending_leftover, b""
            self.feed(leftover)

    # --- reading -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the peer: parse every complete frame, act, then write once."""
        if self.client_terminated:
            return
        if self.server_terminated:
            self._feed_closing(data)
            return
        if self._paused:
            # uvloop may deliver data after pause_reading() (even before open() has run):
            # keep it for resume_reading(), in order.
            self._pending_leftover += data
            return
        self._feeding = True
        try:
            events = self.parser.receive(data)
            if events:
                self._handle_events(events, 0)
        finally:
            self._feeding = False
            if self._out:
                self.flush()

    def _feed_closing(self, data: bytes) -> None:
        """Our close frame is sent: read and discard until the peer's close frame.

        Closing a socket with unread data makes the kernel reset the connection, and a
        reset destroys what the peer has not read yet: the last replies and the close frame.
        """
        if not self.parser.failed:
            for kind, arg, payload in self.parser.receive(data):
                if kind == CLOSE:
                    self._on_peer_close(arg, payload)  # type: ignore[arg-type]
                    return
            if not self.parser.failed:
                return
        self._wait_for_quiet()

    def _wait_for_quiet(self) -> None:
        """The peer's frames can no longer be parsed: close once it has fallen quiet."""
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        loop = asyncio.get_running_loop()
        self._quiet_timer = loop.call_later(CLOSING_QUIET, self._peer_fell_quiet)

    def _peer_fell_quiet(self) -> None:
        self._quiet_timer = None
        self.client_terminated = True
        self._close_transport()

    def _handle_events(self, events: list[Event], index: int) -> None:
        handler = self.handler
        count = len(events)
        while index < count:
            kind, arg, payload = events[index]
            index += 1
            if kind == MESSAGE:
                if self.client_terminated or self.server_terminated:
                    return
                if self.rate_limit is not None and not self.rate_limit.allow():
                    self.fail(CLOSE_POLICY, "rate limit exceeded")
                    return
                try:
                    if self._on_raw is not None:
                        result = self._on_raw(payload, arg == OP_BINARY)
                    elif arg == OP_TEXT:
                        result = handler.on_message(payload.decode())  # type: ignore[union-attr]
                    else:
                        result = handler.on_message(payload)
                except Exception:
                    self._internal_error()
                    return
                if result is not None:
                    self._wait_for(result, events, index)
                    return
            elif kind == PING:
                self.send_frame(protocol.encode_frame(OP_PONG, payload))  # type: ignore[arg-type]
                handler.on_ping(payload)  # type: ignore[arg-type]
            elif kind == PONG:
                self.awaiting_pong = False
                handler.on_pong(payload)  # type: ignore[arg-type]
            elif kind == CLOSE:
                self._on_peer_close(arg, payload)  # type: ignore[arg-type]
                return
            elif kind == FAIL:
                self.fail(arg, payload)  # type: ignore[arg-type]
                return

    def _wait_for(self, result: Awaitable[Any], events: list[Event], index: int) -> None:
        """on_message returned an awaitable: read nothing more from this peer until it ends."""
        self.pause_reading(PAUSED_HANDLER)
        self._backlog = (events, index)
        future = asyncio.ensure_future(result)
        future.add_done_callback(self._handler_done)

    def _handler_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                exc = future.exception()
                self.handler.log_exception(type(exc), exc, exc.__traceback__)  # type: ignore[arg-type]
            self._internal_error(logged=True)
            return
        backlog, self._backlog = self._backlog, None
        if backlog is not None and backlog[1] < len(backlog[0]):  # events left to handle
            self._feeding = True
            try:
                self._handle_events(*backlog)
            finally:
                self._feeding = False
                if self._out:
                    self.flush()
        if self._backlog is None:
            self.resume_reading(PAUSED_HANDLER)

    def pause_reading(self, reason: int = PAUSED_WRITES) -> None:
        if self.server_terminated:
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
        self._feed_leftover()

    # --- writing -----------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame; it leaves with the others queued this loop pass."""
        self._out.append(frame)
        self._out_size += len(frame)
        if not self._dirty:
            self._dirty = True
            if not self._feeding:
                self.flusher.mark(self)

    def send(self, payload: bytes, binary: bool) -> None:
        """Queue one message (text payloads must already be UTF-8)."""
        opcode = OP_BINARY if binary else OP_TEXT
        if self._compressor is not None:
            self.send_frame(protocol.encode_frame(opcode, self._compressor.compress(payload), True))
        else:
            self.send_frame(protocol.encode_frame(opcode, payload))

    # --- as a hub subscriber -------------------------------------------------------------

    @property
    def peer(self) -> str:
        return f"{self.handler.request.remote_ip} {self.handler.request.path}"

    def deliver(self, delivery: Delivery) -> None:
        """Queue a broadcast: encoded once and shared by every receiver without compression."""
        if self.server_terminated or self._lost:
            return
        compressor = self._compressor
        if compressor is not None:
            self.send_frame(self._deflated_frame(delivery, compressor))
            return
        frame = delivery.frame
        if frame is None:
            opcode = OP_BINARY if delivery.binary else OP_TEXT
            frame = delivery.frame = protocol.encode_frame(opcode, delivery.data)
        self.send_frame(frame)

    def _deflated_frame(self, delivery: Delivery, compressor: deflate.Deflater) -> bytes:
        opcode = OP_BINARY if delivery.binary else OP_TEXT
        if not compressor.shared:  # context takeover: a stream of its own
            return protocol.encode_frame(opcode, compressor.compress(delivery.data), True)
        window = compressor.window_bits
        cached = delivery.deflated
        if cached is not None and cached[0] == window:
            return cached[1]
        frame = protocol.encode_frame(opcode, compressor.compress(delivery.data), True)
        delivery.deflated = (window, frame)
        return frame

    def flush(self) -> None:
        self._dirty = False
        out = self._out
        if self.transport is None:
            return  # kept until the transport exists (transport_made flushes)
        if not out or self._lost:
            out.clear()
            self._out_size = 0
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._out_size = 0

    def close_slow(self) -> None:
        self.close(CLOSE_TRY_AGAIN, "receiving too slowly")

    def queued_bytes(self) -> int:
        """Bytes queued for this peer that it has not taken yet."""
        if self.transport is None:
            return self._out_size
        return self._out_size + self.transport.get_write_buffer_size()

    def write_message(
        self, message: str | bytes | dict[str, Any], binary: bool = False
    ) -> asyncio.Future[None]:
        """Tornado's API: queue a message; the returned future is already done."""
        if isinstance(message, dict):
            message = tornado.escape.json_encode(message)
        self.send(tornado.escape.utf8(message), binary)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def write_ping(self, data: bytes) -> None:
        self.send_frame(protocol.encode_frame(protocol.OP_PING, data))

    # --- closing -----------------------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start (or finish) the closing handshake."""
        if not self.server_terminated:
            self.server_terminated = True
            if code is None and reason is not None:
                code = protocol.CLOSE_NORMAL
            self.close_code_sent = code
            self.send_frame(protocol.encode_close(code, reason or ""))
            self.flush()
            if not self.client_terminated:
                self._read_until_peer_closes()
        if self.client_terminated:
            self._close_transport()
        if self._closing_timer is None and not self._lost:
            # Also bounds a close that waits behind data the peer does not read.
            loop = asyncio.get_running_loop()
            self._closing_timer = loop.call_later(CLOSING_TIMEOUT, self._abort)

    def _read_until_peer_closes(self) -> None:
        """Whatever paused reading, the peer's close frame must be read (see _feed_closing)."""
        if self.parser.failed:
            self._wait_for_quiet()
        paused, self._paused = self._paused, 0
        if paused and self.transport is not None and not self._lost:
            self.transport.resume_reading()
            if not self._feeding:
                self._feed_leftover()

    def _on_peer_close(self, code: int, reason: bytes) -> None:
        initiated = self.server_terminated  # the peer answers our close
        self.client_terminated = True
        self._peer_closed = True
        if code != CLOSE_NO_STATUS and not initiated:
            self.close_code = code
            self.close_reason = reason.decode()
        # Echo the peer's code (RFC 6455 5.5.1); an empty close answers an empty close.
        self.close(None if code == CLOSE_NO_STATUS else code)

    def fail(self, code: int, reason: str) -> None:
        """The peer broke the rules: send the close code, then drop the connection."""
        request = self.handler.request
        log.info("closing %s %s with %d: %s", request.remote_ip, request.path, code, reason)
        self.close(code, reason)

    def give_up(self, code: int, reason: str) -> None:
        """Send the close frame and close without waiting for a peer that is not there."""
        request = self.handler.request
        log.info("closing %s %s with %d: %s", request.remote_ip, request.path, code, reason)
        self.client_terminated = True
        self.close(code, reason)

    def _internal_error(self, logged: bool = False) -> None:
        if not logged:
            self.handler.log_exception(*sys.exc_info())
        self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _close_transport(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()  # after what is buffered has been sent

    def _abort(self) -> None:
        """Reset the connection: nothing it still holds in the kernel is kept or sent."""
        self.client_terminated = self.server_terminated = True
        if self.transport is not None and not self._lost:
            reset_on_close(self.transport)
            self.transport.abort()
        elif self.transport is None:
            self.connection_lost()

    def connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self.client_terminated = self.server_terminated = True
        if self._closing_timer is not None:
            self._closing_timer.cancel()
            self._closing_timer = None
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        self.keepalive.discard(self)
        self._out.clear()
        code = self.close_code if self.close_code is not None else self.close_code_sent
        if code is None and self._peer_closed:
            code = CLOSE_NO_STATUS  # a clean close without a status code, not 1006
        self.handler.on_ws_connection_close(code, self.close_reason)

    def on_connection_close(self) -> None:
        self._abort()

    def is_closing(self) -> bool:
        return self.client_terminated or self.server_terminated or self._lost

    def set_nodelay(self, x: bool) -> None:
        """Always on: writes are already coalesced per loop pass."""


def reset_on_close(transport: asyncio.Transport | _StreamIO) -> None:
    """Make the coming close a reset (SO_LINGER 0): a plain close of a socket whose peer
    stopped reading keeps its unsent megabytes in the kernel (FIN-WAIT-1) for minutes."""
    if isinstance(transport, _StreamIO):
        sock = transport.stream.socket
    else:
        sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def release_handshake(handler: WebSocketHandler) -> None:
    """Drop what the handler kept of the HTTP exchange and no longer needs (memory)."""
    handler.request.connection = None  # the detached HTTP/1 connection
    handler.request.server_connection = None  # its server side, holding the old stream
    handler._headers = None  # type: ignore[assignment]  # the 101 response's, sent
    handler.ui = None  # template helpers

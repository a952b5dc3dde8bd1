"""The publish lane: a keep-alive connection's next publish requests served without
Tornado's HTTP1Connection.

A backend publishes over a pooled keep-alive connection, one request after another. Once
Tornado has answered a publish request on a plain (non-TLS) HTTP/1.1 connection of the
server's own Application, the web layer hands the socket to Lanes.take_over(): it moves
to an asyncio (or uvloop) transport, as a WebSocket does after its handshake, and
PublishLane reads the requests itself (wire/http_requests.py parses them strictly). Each
one is served by the same HTTPMessageDelegate the Tornado route gives (Lanes.start, set by
the web layer), the lane standing in for its HTTPConnection; the answer leaves in one write.

A request the lane does not serve (another path or method, chunked, Expect, Upgrade,
HTTP/1.0, Connection: close, headers too long or not plainly well-formed, a refused Host)
goes back to Tornado with the bytes already read, once every earlier answer has left:
Lanes.hand_back gives a new IOStream to the server's handle_stream, so a client mixing
routes on one connection is answered in order.

The bounds of a Tornado connection hold here too: the request deadline
(limits.request_timeout from the end of the previous request to the end of this one's
body; 408 and close when the headers had not come, close otherwise), the header limit
(by hand-back), the body limit (the delegate's own 413, then close, as on Tornado), the
connection's slot (filed under the lane while it is here, given back when it closes) and
the drain
(close_all(), as HTTPServer.close_all_connections closes Tornado's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol, cast

import tornado.httputil
import tornado.iostream

from echoserver.transport.tornado_seam import stream_with_bytes, take_read_buffer
from echoserver.wire.http_requests import HAND_BACK, Head, parse_head, response_head

log = logging.getLogger("echoserver")


class Context(Protocol):
    """Tornado's _HTTPRequestContext: where the connection comes from."""

    address: Any
    remote_ip: str


Start = Callable[["PublishLane", Head], "tornado.httputil.HTTPMessageDelegate | None"]
HandBack = Callable[[tornado.iostream.IOStream, Any, "PublishLane"], None]
Refile = Callable[[Hashable, Hashable], None]


class Lanes:
    """One server's lanes: taking connections over, their deadlines, handing them back.

    `start(lane, head)`: the delegate serving a request (its headers_received already
    called), or None to hand the request back. `refile(old, new)`: the connection's slot,
    held under `old`, is now held under `new`; `leave(key)`: the connection under `key` is
    gone. `hand_back(stream, address, lane)`: serve the stream in Tornado again (its slot
    still under the lane). `timed_out(peer)`: count and log a request that missed
    its deadline. `timeout_answer`: what a client that sent no headers in time is told
    before the close, which comes at the latest `close_after` seconds later.
    """

    def __init__(
        self,
        *,
        request_timeout: float,
        hand_back: HandBack,
        refile: Refile,
        leave: Callable[[Hashable], None],
        timed_out: Callable[[str], None],
        timeout_answer: bytes,
        close_after: float,
    ) -> None:
        self.start: Start | None = None
        self.request_timeout = request_timeout
        self.hand_back = hand_back
        self.refile = refile
        self.leave = leave
        self.timed_out = timed_out
        self.timeout_answer = timeout_answer
        self.close_after = close_after
        self.open: set[PublishLane] = set()
        self._deadlines: OrderedDict[PublishLane, None] = OrderedDict()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.taken = 0  # connections taken over, and given back, so far
        self.given_back = 0

    def take_over(self, stream: tornado.iostream.IOStream, context: Context) -> None:
        """Serve the detached `stream` (its answer sent, nothing left unwritten) here."""
        self.taken += 1
        pending = take_read_buffer(stream)
        sock = stream.socket.dup()
        stream.close()  # closes Tornado's descriptor; the duplicate keeps the connection
        lane = PublishLane(self, context, pending)
        self.refile(stream, lane)
        self.open.add(lane)
        self.track(lane)
        task = asyncio.get_running_loop().create_task(self._connect(lane, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, lane: PublishLane, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: lane, sock=sock)
        except OSError:
            sock.close()
            lane.connection_lost(None)

    def close_all(self) -> None:
        """Close every lane (the drain), as Tornado closes its keep-alive connections."""
        for lane in list(self.open):
            lane.close()

    # --- deadlines: all request_timeout long, so kept in expiry order with one timer -----

    def track(self, lane: PublishLane) -> None:
        lane.expires = time.monotonic() + self.request_timeout
        deadlines = self._deadlines
        deadlines.pop(lane, None)
        deadlines[lane] = None
        if self._sweep_timer is None:
            self._schedule_sweep()

    def untrack(self, lane: PublishLane) -> None:
        self._deadlines.pop(lane, None)

    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.request_timeout / 4)  # as runtime/intake.FrontDoor's
        self._sweep_timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        deadlines = self._deadlines
        now = time.monotonic()
        while deadlines:
            lane = next(iter(deadlines))
            if lane.expires > now:
                break
            del deadlines[lane]
            lane.expire()
        if deadlines:
            self._schedule_sweep()


class PublishLane(asyncio.Protocol):
    """One connection in the lane; the HTTPConnection of the delegate serving its request."""

    def __init__(self, lanes: Lanes, context: Context, pending: bytes) -> None:
        self.lanes = lanes
        self.context = context
        self.remote_ip = context.remote_ip
        self.held = True  # its slot is filed under this lane
        self.buffer = bytearray(pending)
        self.transport: asyncio.Transport | None = None
        self.expires = 0.0
        self.delegate: tornado.httputil.HTTPMessageDelegate | None = None
        self.head: Head | None = None  # the request whose body is awaited
        self.waiting = False  # a request is whole and its answer not written yet
        self.finishing = False  # inside the delegate's finish()
        self.blocked = False  # the transport holds unsent bytes
        self.handing_back = False
        self.closed = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.closed:  # the drain came first
            transport.abort()
            return
        # Anything unsent makes pause_writing() come: a hand-back waits for resume_writing().
        transport.set_write_buffer_limits(high=0)
        self.process()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.waiting and not self.handing_back:
            self.process()

    def eof_received(self) -> bool | None:
        return None  # the transport closes

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        if self.handing_back:
            self._hand_back()

    def connection_lost(self, exc: Exception | None) -> None:
        lanes = self.lanes
        lanes.untrack(self)
        lanes.open.discard(self)
        self.closed = True
        self.buffer = bytearray()
        delegate, self.delegate = self.delegate, None
        if delegate is not None and self.head is not None:
            delegate.on_connection_close()  # its body never came
        if self.held:
            self.held = False
            lanes.leave(self)

    # --- reading requests --------------------------------------------------------------------

    def process(self) -> None:
        """Serve the whole requests in the buffer, one at a time, in order."""
        lanes = self.lanes
        while not self.waiting and not self.closed:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            buffer = self.buffer
            head = self.head
            if head is None:
                if not buffer:
                    return
                parsed = parse_head(buffer)
                if parsed is None:
                    return
                start = lanes.start
                delegate = None
                if parsed is not HAND_BACK and start is not None:
                    assert isinstance(parsed, Head)
                    self.head = head = parsed
                    delegate = start(self, parsed)
                if delegate is None:
                    self.head = None
                    self._hand_back()
                    return
                assert head is not None
                self.delegate = delegate
                if self.closed or transport.is_closing():
                    return  # refused on its headers (answered and closing, as Tornado does)
            end = head.size + head.length
            if len(buffer) < end:
                return
            body = bytes(buffer[head.size : end])
            del buffer[:end]
            delegate = self.delegate
            assert delegate is not None
            self.head = None
            self.waiting = True
            lanes.untrack(self)  # whole: no deadline while the answer is made
            if body:
                delegate.data_received(body)
            self.finishing = True
            try:
                delegate.finish()
            finally:
                self.finishing = False
            if self.waiting:  # the publish waits (a broker's round trip): no reading
                transport.pause_reading()

    # --- the delegate's HTTPConnection ------------------------------------------------------

    def write_headers(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> None:
        assert isinstance(start_line, tornado.httputil.ResponseStartLine)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = response_head(start_line.code, start_line.reason, headers.get_all())
        transport.write(data + chunk if chunk else data)

    def finish(self) -> None:
        """The answer is written: the next request may be read."""
        self.delegate = None
        transport = self.transport
        if self.closed or transport is None:
            return
        if self.head is not None:
            # Answered before its body was read (a refusal on the headers): closed after
            # the answer, as Tornado's HTTP1Connection does.
            self.head = None
            self.lanes.untrack(self)
            transport.close()
            return
        self.lanes.track(self)
        if not self.finishing:  # answered later than finish(): reading resumes
            self.waiting = False
            transport.resume_reading()
            self.process()
        else:
            self.waiting = False

    # --- leaving -----------------------------------------------------------------------------

    def _hand_back(self) -> None:
        """Give the connection, with the bytes read and not served, back to Tornado once
        every answer written here has left."""
        self.handing_back = True
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.blocked:
            transport.pause_reading()
            return  # resume_writing() comes back here
        self.lanes.untrack(self)
        self.lanes.open.discard(self)
        raw = transport.get_extra_info("socket")
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            transport.abort()
            return
        transport.abort()  # closes the transport's descriptor; the duplicate stays open
        data, self.buffer = bytes(self.buffer), bytearray()
        self.closed = True
        self.held = False
        stream = stream_with_bytes(sock, data)
        self.lanes.given_back += 1
        try:
            self.lanes.hand_back(stream, self.context.address, self)
        except Exception:
            log.exception("handing a connection back to Tornado failed")
            stream.close()
            self.lanes.leave(self)
            self.lanes.leave(stream)

    def expire(self) -> None:
        """The request deadline passed."""
        transport = self.transport
        self.lanes.timed_out(self.remote_ip)
        if transport is None or transport.is_closing():
            self.close()
            return
        if self.head is not None:
            transport.abort()
            return
        transport.write(self.lanes.timeout_answer)
        transport.close()
        asyncio.get_running_loop().call_later(self.lanes.close_after, transport.abort)

    def close(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

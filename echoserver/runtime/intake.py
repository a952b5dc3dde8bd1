"""The server's front door: accepting connections, and what a client may hold before it is
a WebSocket or an event stream.

FrontDoor is the HTTPServer the server runs. Over Tornado's own it adds:

- its own accept loop on the listening sockets. At the open-files limit (EMFILE, ENFILE,
  or any other accept() failure) Tornado's loop would fail on every pass, a traceback
  each; this one stops accepting for PAUSE seconds (or until a connection closes),
  answers the oldest waiting client 503 with the descriptors it keeps in reserve for
  that, counts the failure in /metrics and logs one warning line per LOG_INTERVAL;
- a slot per accepted connection (occupancy.py): past websocket.max_connections (plus a
  little headroom for /healthz) or websocket.max_connections_per_ip a new connection is
  answered 503 at accept and closed;
- a deadline per request, limits.request_timeout from the accept (or from the end of the
  previous request on the connection) to the end of the request's body: a client that
  sends its headers or body slowly, or not at all, is closed (408 when it had not sent
  its headers yet), over TLS too;
- with `publish_lane=True` (plain HTTP, the server's own EchoServerApp) the publish lane
  (transport/publish_lane.py): the connections it takes over keep their slot and the same
  deadline, come back through handle_stream, and close with close_all_connections().

Log lines a client can cause here are rate-limited (logs.OncePer): one per LOG_INTERVAL per
kind, with the count of what was held back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, cast

import tornado.httpserver
import tornado.httputil
import tornado.iostream
from tornado.http1connection import HTTP1ServerConnection
from tornado.ioloop import IOLoop

from echoserver.endpoints.occupancy import Occupancy
from echoserver.metrics import Metrics
from echoserver.runtime.logs import OncePer
from echoserver.transport.publish_lane import Lanes, PublishLane
from echoserver.transport.tornado_seam import handle_connection
from echoserver.web.app import EchoServerApp
from echoserver.web.publish_delegate import LaneRoutes

log = logging.getLogger("echoserver")

ACCEPTS_PER_WAKE = 128  # as Tornado's accept loop: then the loop serves the others
PAUSE = 0.1  # seconds without accepting after accept() failed (out of descriptors)
RESERVE_FILES = 2  # descriptors held to answer a client 503 at the open-files limit
LOG_INTERVAL = 10.0  # seconds between two log lines of one kind a client can cause
LINGER = 0.5  # seconds a refused connection stays open after its 503, then closed
CLOSE_AFTER_408 = 1.0  # seconds a timed-out connection's 408 may take before a close

FULL = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
REFUSAL_TEXT = {
    "full": "server is full",
    "per_address": "too many connections from this address",
    "emfile": "server is out of file descriptors",
}


def response_503(reason: str) -> bytes:
    body = REFUSAL_TEXT.get(reason, "try again later").encode() + b"\n"
    return FULL + b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class FrontDoor(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer with the accept loop, slots and request deadline above.

    Extra keyword arguments: occupancy, metrics, request_timeout (seconds), publish_lane
    (bool, default False).
    """

    occupancy: Occupancy
    metrics: Metrics
    request_timeout: float
    lanes: Lanes | None

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        self.occupancy = kwargs.pop("occupancy")
        self.metrics = kwargs.pop("metrics")
        self.request_timeout = kwargs.pop("request_timeout")
        publish_lane = kwargs.pop("publish_lane", False)
        super().initialize(*args, **kwargs)
        self.lanes = None
        application = args[0] if args else kwargs.get("request_callback")
        if publish_lane and self.ssl_options is None and isinstance(application, EchoServerApp):
            self.lanes = lanes = Lanes(
                request_timeout=self.request_timeout,
                hand_back=self._lane_handed_back,
                refile=self.occupancy.move,
                leave=self.occupancy.leave_http,
                timed_out=self._lane_timed_out,
                timeout_answer=TIMEOUT_408,
                close_after=CLOSE_AFTER_408,
            )
            lanes.start = LaneRoutes(application.server).start
            application.server.lanes = lanes
        params = self.conn_params
        if params.header_timeout is not None and params.header_timeout > (
            self.request_timeout + self._sweep_interval()
        ):
            # The deadline closes a client waiting on its headers before Tornado's own
            # header timeout could: that one would only cost every request a timer set
            # and cancelled (gen.with_timeout around each header read).
            params.header_timeout = None
        self._listeners: list[socket.socket] = []
        self._accepting = False
        self._resume_timer: object | None = None
        self._reserve: list[int] = []
        # The requests under way, oldest first: every deadline is request_timeout long, so
        # this is also the order they expire in, and one sweep timer serves them all (a
        # timer per request cost every handshake a timer set and cancelled, and memory).
        self._deadlines: OrderedDict[tornado.iostream.IOStream, RequestDeadline] = OrderedDict()
        self._sweep_timer: object | None = None
        self._log_timeout = OncePer(logging.INFO, LOG_INTERVAL)
        self._log_refused = {
            "full": OncePer(logging.WARNING, LOG_INTERVAL),
            "per_address": OncePer(logging.WARNING, LOG_INTERVAL),
        }
        self._log_accept_error = OncePer(logging.WARNING, LOG_INTERVAL)
        self.occupancy.on_release = self._slot_released

    # --- accepting -----------------------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            sock.setblocking(False)
            self._listeners.append(sock)
        self._fill_reserve()
        self._start_accepting()

    def stop(self) -> None:
        self._stop_accepting()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        self._empty_reserve()
        super().stop()

    def _start_accepting(self) -> None:
        self._cancel_resume()
        if self._accepting:
            return
        self._accepting = True
        io_loop = IOLoop.current()
        for sock in self._listeners:
            io_loop.add_handler(sock, self._accept, IOLoop.READ)

    def _stop_accepting(self) -> None:
        self._cancel_resume()
        if not self._accepting:
            return
        self._accepting = False
        io_loop = IOLoop.current()
        for sock in self._listeners:
            io_loop.remove_handler(sock)

    def _cancel_resume(self) -> None:
        if self._resume_timer is not None:
            IOLoop.current().remove_timeout(self._resume_timer)
            self._resume_timer = None

    def _accept(self, sock: socket.socket, events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            if not self._accepting:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                self._cannot_accept(sock, error)
                return
            self._admit(connection, address)

    def _admit(self, connection: socket.socket, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) and address else ""
        reason = self.occupancy.refusal(ip)
        if reason is None:
            handle_connection(self, connection, address)  # calls handle_stream
            return
        self.metrics.connections_refused[reason] += 1
        if reason == "per_address":
            limit = self.occupancy.max_per_address
            self._log_refused[reason](
                "refused a connection from %s: it holds %d, websocket.max_connections_per_ip",
                ip,
                limit,
            )
        else:
            limit = self.occupancy.max_connections
            self._log_refused[reason](
                "refused a connection from %s: %d connections held, websocket.max_connections "
                "is %d",
                ip,
                self.occupancy.total,
                limit,
            )
        self._refuse(connection, reason)

    def _refuse(self, connection: socket.socket, reason: str) -> None:
        """Answer 503 before reading anything, then close.

        Over TLS nothing can be written before a handshake the client may never finish,
        so the connection is just closed. Otherwise the 503 goes out with a FIN, and the
        socket is closed LINGER seconds later after reading what the client sent: closing
        with its request unread would reset the connection, and a reset can destroy the
        503 before the client reads it.
        """
        if self.ssl_options is not None:
            connection.close()
            return
        try:
            connection.setblocking(False)
            connection.send(response_503(reason))  # a new socket's send buffer is empty
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            connection.close()
            return
        IOLoop.current().call_later(LINGER, _drain_and_close, connection)

    def _cannot_accept(self, sock: socket.socket, error: OSError) -> None:
        code = error.errno or 0
        reason = errno.errorcode.get(code, "error").lower()
        if code == errno.ENFILE:
            reason = "emfile"  # the system's limit rather than the process's: the same cure
        self.metrics.accept_errors[reason] += 1
        limit = _open_files_limit()
        self._log_accept_error(
            "cannot accept connections: %s (open files limit %s); pausing new connections "
            "for %.1fs, serving the open ones",
            error.strerror or error,
            limit,
            PAUSE,
        )
        self._stop_accepting()
        self._answer_one_waiting(sock)
        self._resume_timer = IOLoop.current().call_later(PAUSE, self._resume)

    def _answer_one_waiting(self, sock: socket.socket) -> None:
        """With the reserve's descriptors, tell the oldest waiting client 503, so it does
        not wait in the kernel's queue for a descriptor that may not come soon."""
        if not self._reserve:
            self._fill_reserve()  # one left over from the last time, if any came free
            return
        self._empty_reserve()
        with contextlib.suppress(OSError):
            connection, _ = sock.accept()
            with contextlib.suppress(OSError):
                connection.setblocking(False)
                connection.send(response_503("emfile"))
            connection.close()
        self._fill_reserve()

    def _resume(self) -> None:
        self._resume_timer = None
        if not self._listeners:
            return
        if len(self._reserve) < RESERVE_FILES:
            self._fill_reserve()
        self._start_accepting()

    def _slot_released(self) -> None:
        # A descriptor came free: a client waiting at the open-files limit can be taken now.
        if not self._accepting and self._resume_timer is not None:
            self._cancel_resume()
            self._resume_timer = IOLoop.current().call_later(0, self._resume)

    def _fill_reserve(self) -> None:
        while len(self._reserve) < RESERVE_FILES:
            try:
                self._reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def _empty_reserve(self) -> None:
        while self._reserve:
            os.close(self._reserve.pop())

    # --- slots and deadlines (Tornado's HTTPServerConnectionDelegate) --------------------

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        ip = address[0] if isinstance(address, tuple) and address else ""
        self.occupancy.admit(stream, ip)
        super().handle_stream(stream, address)

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = cast(HTTP1ServerConnection, server_conn).stream
        deadline = RequestDeadline(self, stream, delegate)
        self._deadlines.pop(stream, None)  # the previous request's, if still there
        self._deadlines[stream] = deadline  # the newest: last in expiry order
        if self._sweep_timer is None:
            self._schedule_sweep()
        return deadline

    def _sweep_interval(self) -> float:
        # Deadlines are met within a quarter of request_timeout (at most 1 s) of their time.
        return min(1.0, self.request_timeout / 4)

    def _schedule_sweep(self) -> None:
        self._sweep_timer = IOLoop.current().call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        deadlines = self._deadlines
        now = time.monotonic()
        while deadlines:
            stream = next(iter(deadlines))
            deadline = deadlines[stream]
            if deadline.expires > now:
                break
            del deadlines[stream]
            deadline.expire()
        if deadlines:
            self._schedule_sweep()

    def cancel_deadline(self, deadline: RequestDeadline) -> None:
        """A request arrived whole (or its connection closed): its deadline is off."""
        stream = deadline.stream
        if self._deadlines.get(stream) is deadline:
            del self._deadlines[stream]

    def on_close(self, server_conn: object) -> None:
        stream = cast(HTTP1ServerConnection, server_conn).stream
        self._deadlines.pop(stream, None)
        self.occupancy.leave_http(stream)
        super().on_close(server_conn)

    async def close_all_connections(self) -> None:
        if self.lanes is not None:
            self.lanes.close_all()
        await super().close_all_connections()

    def _lane_handed_back(
        self, stream: tornado.iostream.IOStream, address: Any, lane: PublishLane
    ) -> None:
        # Its slot, held under the lane, is the stream's again: counted once all along.
        self.occupancy.move(lane, stream)
        super().handle_stream(stream, address)

    def _lane_timed_out(self, peer: str) -> None:
        self._note_timeout(peer)

    def _note_timeout(self, peer: str) -> None:
        self.metrics.request_timeouts += 1
        self._log_timeout(
            "closed a connection from %s: its request did not arrive within "
            "limits.request_timeout (%gs)",
            peer,
            self.request_timeout,
        )

    def request_timed_out(self, stream: tornado.iostream.IOStream, headers_in: bool) -> None:
        if stream.closed():
            return
        self._note_timeout(_peer(stream))
        if headers_in:
            # A handler may have begun its answer (the publish API refuses early): close.
            stream.close()
            return
        stream.write(TIMEOUT_408).add_done_callback(lambda _: stream.close())
        IOLoop.current().call_later(CLOSE_AFTER_408, stream.close)


class RequestDeadline(tornado.httputil.HTTPMessageDelegate):
    """Tornado's delegate for one request, with a deadline: the FrontDoor's sweep closes
    the connection if the request's headers and body have not all arrived by `expires`."""

    __slots__ = ("_delegate", "_headers_in", "_server", "expires", "stream")

    def __init__(
        self,
        server: FrontDoor,
        stream: tornado.iostream.IOStream,
        delegate: tornado.httputil.HTTPMessageDelegate,
    ) -> None:
        self._server = server
        self.stream = stream
        self._delegate = delegate
        self._headers_in = False
        self.expires = time.monotonic() + server.request_timeout

    def cancel(self) -> None:
        self._server.cancel_deadline(self)

    def expire(self) -> None:
        self._server.request_timed_out(self.stream, self._headers_in)

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Any:
        self._headers_in = True
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        self.cancel()
        self._delegate.finish()

    def on_connection_close(self) -> None:
        self.cancel()
        self._delegate.on_connection_close()


def _drain_and_close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        for _ in range(16):  # what a client sent after its refusal, up to 1 MiB, unread
            if not connection.recv(65536):
                break
    connection.close()


def _peer(stream: tornado.iostream.IOStream) -> str:
    try:
        address = stream.socket.getpeername()
    except (OSError, AttributeError):
        return "a client"
    return str(address[0]) if isinstance(address, tuple) else "a client"


def _open_files_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"

"""The WebSocket endpoints: echo and broadcast (mixed mode is in mixed.py), and the handshake
they share.

Each endpoint is a plain Tornado RequestHandler whose GET is the opening handshake, decided
in our own code (handshake.py: policy, upgrade checks, origin) before anything is upgraded;
the 101 is written by Tornado, then the stream is detached and served by a
connection.WebSocketConnection. Endpoints are thin: they turn messages into hub calls and
hub deliveries into frames. A channel member joins before its 101 is sent, so a client
that has its 101 is a member (with a remote broker, subscribed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable

from echoserver.auth.identity import GUEST
from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.access import RequestRecord, write_access_line
from echoserver.endpoints.admission import AdmittedHandler
from echoserver.endpoints.occupancy import Slot
from echoserver.fanout.delivery import Replay
from echoserver.transport.assembly import new_connection
from echoserver.transport.connection import WebSocketConnection
from echoserver.transport.tornado_seam import forget_response
from echoserver.wire.envelopes import notice, without_signals
from echoserver.wire.framing import CloseCode
from echoserver.wire.handshake import (
    VERSIONS,
    Refusal,
    accept_value,
    check_upgrade,
)

log = logging.getLogger("echoserver.ws")

# A sender's broadcasts that a remote broker may hold unanswered before we stop reading it.
MAX_PUBLISHES_IN_FLIGHT = 64
NO_HEADERS: list[tuple[str, str]] = []  # never appended to (see add_upgrade_header)
# What Tornado's RequestHandler and the handshake set on the handler that an open connection
# never reads again: dropped from its __dict__ once the socket is taken over (attributes
# with a class-level default read that default from then on). Tornado's own _execute still
# reads _finished, _auto_finish and _prepared_future after get() returns: kept.
HTTP_ONLY = frozenset(
    {
        "application",
        "ui",
        "path_args",
        "path_kwargs",
        "_headers",
        "_write_buffer",
        "_headers_written",
        "_status_code",
        "_reason",
        "_transforms",
        "_upgrade_headers",
        "since",
        "epoch",
    }
)


class BaseSocket(AdmittedHandler):
    """What every WebSocket endpoint shares: the handshake and the connection's bookkeeping."""

    logs_own_access = True  # one access line when the connection ends, with its close code
    shares_frames = False  # see ChannelSocket
    channel = "default"
    connection: WebSocketConnection | None = None
    record: RequestRecord | None = None  # the request, once the handshake is over
    close_code: int | None = None
    _reserved = False  # holds one of server.handshakes until the connection opens
    _slot: Slot | None = None  # its place in server.occupancy (None: not served by ours)
    _upgrade_headers: list[tuple[str, str]] = NO_HEADERS  # the 101's, past the fixed ones
    _gone = False  # the client went away during the handshake
    _closed = False

    # --- the opening handshake ------------------------------------------------------------

    async def get(self, channel: str | None = None) -> None:
        # The token and the channel's rights come before the request's own validity as an
        # upgrade, as the shared token does (in the policy): a plain GET of the URL, which
        # the page sends to learn why its handshake failed, then answers 401 or 403 too.
        refusal = self.policy_refusal(reserved=self.server.handshakes)
        if refusal is None:
            refusal = await self.authenticate()
            if refusal is None:
                refusal = self.rights_refusal(channel or "default")
            if self._gone:
                return
        if refusal is None:
            refusal = self._refusal()
        if refusal is not None:
            self.refuse(refusal)
            return
        # Handshakes in flight count against max_connections, so a burst cannot overshoot.
        self.server.handshakes += 1
        self._reserved = True
        self._slot = self.server.occupancy.begin_stream(self.stream_key())
        self.connection = connection = self._new_connection()
        try:
            await self.before_upgrade(channel or "default")
        except Exception:
            log.exception("%s: the handshake could not complete", self.peer)
            if not self._gone:
                self._release()
                self.server.occupancy.end_stream(self._slot)  # the connection stays in HTTP
                self._slot = None
                self.refuse(Refusal(503, "unavailable", "try again later"))
            return
        if self._gone:
            return
        response = self._switching_protocols()
        stream = self.detach()
        # The connection's slot moves from Tornado's HTTP side to this endpoint, which
        # gives it back when the WebSocket closes: one slot from accept to close.
        self.server.occupancy.take(stream)
        self._forget_http()
        await connection.run(stream, response)

    def _switching_protocols(self) -> bytes:
        """The 101 response, written by the connection on the detached stream.

        Not through RequestHandler.finish(): its flush, header formatting, log call and
        stream write were ~8% of a handshake's CPU in a reconnect storm, for a response
        that is a few fixed lines.
        """
        key = self.request.headers["Sec-WebSocket-Key"]
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_value(key)}",
        ]
        lines += [f"{name}: {value}" for name, value in self._upgrade_headers]
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def add_upgrade_header(self, name: str, value: str) -> None:
        """A header for the 101 (values are the server's own: no CR or LF)."""
        if self._upgrade_headers is NO_HEADERS:
            self._upgrade_headers = []
        self._upgrade_headers.append((name, value))

    def _refusal(self) -> Refusal | None:
        """Why the request itself is not a handshake this endpoint takes, or None."""
        return check_upgrade(self.request.method or "", self.request.headers.get)

    def rights_refusal(self, channel: str) -> Refusal | None:
        """Why the identity may not have this connection (a channel's rights), or None."""
        return None

    def refuse(self, refusal: Refusal) -> None:
        if refusal.status == 426:
            self.set_header("Sec-WebSocket-Version", ", ".join(reversed(VERSIONS)))
        super().refuse(refusal)

    def _new_connection(self) -> WebSocketConnection:
        server = self.server
        connection, extensions = new_connection(
            self,
            server.config.websocket,
            server.flusher,
            server.keepalive,
            self.request.headers.get("Sec-WebSocket-Extensions"),
            shares_frames=self.shares_frames,
        )
        if extensions is not None:
            self.add_upgrade_header("Sec-WebSocket-Extensions", extensions)
        return connection

    async def before_upgrade(self, channel: str) -> None:
        """Runs before the 101 is sent: what a client may count on once it has its 101."""

    def _forget_http(self) -> None:
        """Drop what the handler kept of the HTTP exchange and no longer needs.

        A connection lives for hours: the request (its headers, arguments, strings), the
        response's buffers and the path arguments are ~2 KB and a dozen objects that every
        full GC pass would visit. What the connection still needs of the request (peer,
        path, origin, start time) is kept in a RequestRecord; self.request is gone.
        """
        self.record = RequestRecord(self.request, address=self._slot_address())
        del self.request
        forget_response(self)
        # The handler's __dict__ grew to ~20 entries (832 bytes) during the request; a
        # dict built from the few entries left is sized for them (and drops the UI
        # namespace, whose closures refer back to the handler: a cycle only the GC frees).
        self.__dict__ = {name: value for name, value in vars(self).items() if name not in HTTP_ONLY}

    def _slot_address(self) -> str | None:
        slot = self._slot
        return slot.address if slot is not None else None

    @property
    def peer(self) -> str:
        record = self.record
        if record is None:
            return super().peer
        return f"{record.remote_ip} {record.path}"

    def summary(self) -> str:
        record = self.record
        if record is None:
            return super().summary()
        return f"{record.method} {record.path} ({record.remote_ip})"

    def on_connection_close(self) -> None:
        """Tornado: the client went away before the handshake was over."""
        self._gone = True
        if self.connection is not None:
            self.connection.abort()  # tells on_connection_closed
        else:
            self._release()

    def _release(self) -> None:
        if self._reserved:
            self._reserved = False
            self.server.handshakes -= 1

    # --- the connection's life (connection.Endpoint) ----------------------------------------

    def on_open(self) -> None:
        self._release()
        self.server.connections.add(self)
        if self.identity is not GUEST:
            self.server.authority.admit(self, self.identity)
        if self.server.draining:  # the handshake began before the drain
            self.going_away()

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        raise NotImplementedError

    def on_connection_closed(self, code: int) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_code = code
        server = self.server
        self._release()
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        server.connections.discard(self)
        if self.identity is not GUEST:
            server.authority.release(self, self.identity)
        server.metrics.closes[code] += 1
        if server.config.log.access:
            write_access_line(self.record or RequestRecord(self.request), 101, close=code)

    def going_away(self) -> None:
        """The server is shutting down: close with 1001."""
        self.close(CloseCode.GOING_AWAY, "server shutting down")

    def token_expired(self) -> None:
        """The token ran out (auth.expiry): close with 4001."""
        log.info("closing %s: its token expired", self.peer)
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def disconnect(self) -> None:
        """DELETE /api/users/<sub>/connections: close with 4003."""
        self.close(CloseCode.DISCONNECTED_BY_THE_SERVER, "disconnected by the server")

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection (the server's drain, a lost broadcast)."""
        if self.connection is not None:
            self.connection.close(code, reason)

    def send(self, data: bytes, binary: bool) -> None:
        """Queue one message to this client (text as UTF-8); a closed connection drops it."""
        connection = self.connection
        if connection is None or connection.is_closing():
            return
        metrics = self.server.metrics
        metrics.messages_out += 1
        metrics.bytes_out += len(data)
        connection.send(data, binary)

    def count_in(self, data: bytes) -> None:
        metrics = self.server.metrics
        metrics.messages_in += 1
        metrics.bytes_in += len(data)


class EchoSocket(BaseSocket):
    """Each message goes back to its sender, same bytes, same type."""

    def _new_connection(self) -> WebSocketConnection:
        # The connection echoes by itself, counting in the server's metrics: with one
        # message per read, calls per message (this handler's, its send's) were a good part
        # of the Python work per message.
        connection = super()._new_connection()
        connection.echo_messages(self.server.metrics)
        return connection

    def on_raw_message(self, payload: bytes, binary: bool) -> None:
        # What the connection does itself (echo_messages); kept for the Endpoint protocol.
        self.count_in(payload)
        self.send(payload, binary)


class ChannelSocket(BaseSocket):
    """A member of one channel: its connection is the hub's subscriber."""

    # Broadcasts are deflated once for every receiver (see connection.py).
    shares_frames = True

    member: WebSocketConnection | None = None
    since: int | None = None  # ?since=N: resume after offset N
    epoch: str | None = None  # ?epoch=E: the epoch of that offset (None: the current one)
    may_publish = True  # whether its rights let it publish on the channel (namespaces)
    _in_flight = 0  # publishes handed to the broker and not yet answered
    _in_flight_bytes = 0  # their payload bytes
    _drained: asyncio.Future[None] | None = None

    def _refusal(self) -> Refusal | None:
        refusal = super()._refusal()
        if refusal is not None:
            return refusal
        since = self.offset_argument("since")
        if isinstance(since, Refusal):
            return since
        self.since = since
        epoch = self.epoch_argument()
        if isinstance(epoch, Refusal):
            return epoch
        self.epoch = epoch
        return None

    def rights_refusal(self, channel: str) -> Refusal | None:
        return self.join_refusal(channel)

    async def before_upgrade(self, channel: str) -> None:
        """Join the channel before the 101: a client that has its 101 is a member, and with
        a remote broker its subscription is active, so it cannot miss the next broadcast."""
        self.channel = channel
        if not self.server.authority.rights.may_publish(self.identity, channel):
            self.may_publish = False
        hub = self.server.hub
        member = self.connection
        assert member is not None
        member.sub_id = hub.new_subscriber_id()
        self.member = member
        if member.render is None and self.server.roster.announces(channel):
            member.wrap_broadcasts(without_signals)  # no join/leave events in broadcast mode
        await hub.join(channel, member, self.before_replay, self.since, self.epoch)
        # Presence (fanout/presence.py): a user's connection counts once it is a member.
        await self.server.roster.arrive(channel, self.identity.sub, self.identity.info)

    def before_replay(self, replay: Replay) -> None:
        """Kept messages are about to be replayed to this member: the 101's headers say
        where its stream starts, for clients that cannot see offsets in the frames."""
        if replay.last is not None:
            self.add_upgrade_header("Echoserver-Last-Offset", str(replay.last))
            self.add_upgrade_header("Echoserver-Replayed", str(replay.count))
        if replay.epoch:
            self.add_upgrade_header("Echoserver-Epoch", replay.epoch)
        if replay.first is not None:
            self.add_upgrade_header("Echoserver-First-Offset", str(replay.first))
        if replay.recovered is not None:
            self.add_upgrade_header("Echoserver-Recovered", "true" if replay.recovered else "false")

    def on_connection_closed(self, code: int) -> None:
        first = not self._closed
        super().on_connection_closed(code)
        if first and self.member is not None:
            self.server.spawn(self._leave(self.channel, self.member))

    async def _leave(self, channel: str, member: WebSocketConnection) -> None:
        await self.server.hub.leave(channel, member)
        await self.server.roster.depart(channel, self.identity.sub)

    def publish(self, data: bytes, binary: bool) -> Awaitable[None] | None:
        """Publish to this channel without waiting for the broker.

        The memory broker delivers synchronously. A remote broker gets up to
        MAX_PUBLISHES_IN_FLIGHT of this sender's messages at once (in order); past that the
        returned future makes the connection stop reading until half have been answered.
        A message the broker could not take is reported to the sender, never silently lost.

        While the broker is down its messages wait for it (up to publish_timeout), at most
        max_queue_bytes of them per connection (one message always may): past that it is
        told at once, as when the wait times out.
        """
        hub = self.server.hub
        sender = self.member.sub_id if self.member is not None else None
        size = len(data)
        waiting = self._in_flight_bytes
        try:
            if waiting and waiting + size > hub.max_queue_bytes and not hub.healthy:
                raise BrokerUnavailable(
                    f"{hub.max_queue_bytes} bytes of this connection wait; {hub.health_reason}"
                )
            outcome = hub.publish(self.channel, data, binary, sender)
        except BrokerUnavailable as exc:
            self.not_delivered(exc)
            return None
        if isinstance(outcome, int):
            return None
        self._in_flight += 1
        self._in_flight_bytes += size
        outcome.add_done_callback(functools.partial(self._published, size))
        if self._in_flight < MAX_PUBLISHES_IN_FLIGHT:
            return None
        self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def _published(self, size: int, outcome: asyncio.Future[int]) -> None:
        self._in_flight -= 1
        self._in_flight_bytes -= size
        error = None if outcome.cancelled() else outcome.exception()
        if error is not None:
            if not isinstance(error, BrokerUnavailable):
                log.error("publishing on %s failed: %r", self.channel, error)
            self.not_delivered(error)
        drained = self._drained
        if drained is not None and self._in_flight <= MAX_PUBLISHES_IN_FLIGHT // 2:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    def not_delivered(self, error: BaseException) -> None:
        """Tell the sender; mixed mode's JSON notices cannot be forged by peers, whose
        messages reach others only inside broadcast envelopes."""
        self.send(notice("error", error=f"not delivered: {error}"), False)


class BroadcastSocket(ChannelSocket):
    """Each message goes to every member of the channel."""

    def not_delivered(self, error: BaseException) -> None:
        """In a raw relay any peer can send any text, so a notice in a frame could be
        forged: a sender whose message was lost is closed with 1013 (try again later),
        which no peer can fake. Receivers stay connected."""
        connection = self.connection
        if connection is not None and not connection.is_closing():
            log.info("closing %s: not delivered: %s", self.peer, error)
            connection.close(CloseCode.TRY_AGAIN_LATER, f"not delivered: {error}")

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        self.count_in(payload)
        if not self.may_publish:
            # A raw relay has no notice a peer could not forge: the sender is closed.
            log.info("closing %s: not allowed to publish on %s", self.peer, self.channel)
            self.close(CloseCode.POLICY_VIOLATION, "not allowed to publish")
            return None
        return self.publish(payload, binary)

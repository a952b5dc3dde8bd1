"""Server-Sent Events: a channel as a text/event-stream (GET /sse, /sse/<channel>).

Each message is one event whose `id:` is its offset: text as `data:` lines (one per line of
the message), binary as base64 under `event: binary`; in mixed mode the data is the
broadcast's payload (JSON). A comment every KEEPALIVE seconds keeps proxies from closing an
idle stream. `Last-Event-ID` (the header a browser's EventSource sends when it reconnects,
or ?last_event_id= / ?since= for clients that cannot set headers) resumes exactly as a
WebSocket's ?since= does: every kept message after it, then the live stream, preceded by
`event: recovery` saying whether nothing was lost.

An event-stream subscriber is a channel member like a WebSocket one: it counts in presence
and listenCount, in max_connections and in /metrics, obeys the same origin and token rules
and the same slow-client cap and policy (past the cap its events are dropped, or the stream
is ended: EventSource then reconnects and resumes), and is ended by the drain on SIGTERM.
With connection tokens (JWT), a stream whose token runs out gets `event: expired` and ends
(an EventSource cannot swap its token: it reconnects with a new one); one closed by the
user API gets `event: disconnected` and ends.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re

from echoserver.auth.identity import GUEST
from echoserver.endpoints.admission import AdmittedHandler, parse_offset
from echoserver.endpoints.occupancy import Slot
from echoserver.fanout.delivery import Delivery, Replay
from echoserver.transport.flusher import Flusher
from echoserver.transport.tornado_seam import unsent_bytes
from echoserver.wire.envelopes import recovery_fields
from echoserver.wire.handshake import Refusal

log = logging.getLogger("echoserver.sse")

KEEPALIVE = 15.0  # seconds between comment lines on an idle stream
RETRY_MS = 2000  # how long an EventSource waits before it reconnects
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def event(data: bytes, *, offset: int | None = None, kind: str | None = None) -> bytes:
    """One event: `id:`, `event:` and one `data:` line per line of data (which must not be
    binary: encode that first)."""
    head = b""
    if offset:
        head += b"id: %d\n" % offset
    if kind:
        head += b"event: " + kind.encode() + b"\n"
    lines = _LINE_BREAK.split(data)
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


SSE_EVENT = "sse event"  # the key of message_event's bytes in a delivery


def message_event(delivery: Delivery) -> bytes:
    if delivery.seq < 0:  # a presence event (fanout/presence.py): no id, named by its type
        kind = "join" if delivery.data.startswith(b'{"type":"join"') else "leave"
        return event(delivery.data, kind=kind)
    if delivery.binary:
        return event(base64.b64encode(delivery.data), offset=delivery.seq, kind="binary")
    return event(delivery.data, offset=delivery.seq)


class EventStream(AdmittedHandler):
    """One subscriber's event stream; its own hub subscriber."""

    channel = "default"
    sub_id = ""
    _pending_size = 0  # bytes written to the handler's buffer, not yet flushed
    _dirty = False
    _ended = False
    _keepalive: asyncio.TimerHandle | None = None
    _done: asyncio.Future[None] | None = None
    _flusher: Flusher | None = None
    _slot: Slot | None = None  # its place in server.occupancy, while a stream

    async def get(self, channel: str | None = None) -> None:
        refusal = self.policy_refusal()
        since = self.offset_argument("last_event_id", "since")
        if refusal is None and isinstance(since, Refusal):
            refusal = since
        header = self.request.headers.get("Last-Event-ID")
        if refusal is None and header is not None:
            resumed = self._header_offset(header)  # the header wins: it is the newest
            if isinstance(resumed, Refusal):
                refusal = resumed
            elif resumed is not None:
                since = resumed
        if refusal is None:
            refusal = await self.authenticate()
            if refusal is None:
                refusal = self.join_refusal(channel or "default")
        if refusal is not None:
            self.refuse(refusal)
            return
        assert not isinstance(since, Refusal)
        server = self.server
        self.channel = channel or "default"
        self.sub_id = server.hub.new_subscriber_id()
        self._flusher = server.flusher
        self._done = asyncio.get_running_loop().create_future()
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # no buffering in a proxy in front
        self.write(b"retry: %d\n\n" % RETRY_MS)
        server.connections.add(self)
        self._slot = server.occupancy.begin_stream(self.stream_key())
        try:
            await server.hub.join(self.channel, self, self._before_replay, since)
        except Exception:
            log.exception("%s: could not join %s", self.peer, self.channel)
            server.connections.discard(self)
            server.occupancy.end_stream(self._slot)
            self._slot = None
            self.send_error(503)
            return
        if self._ended:  # gone while joining
            await server.hub.leave(self.channel, self)
            return
        self._send_now()
        self._schedule_keepalive()
        identity = self.identity
        if identity is not GUEST:
            server.authority.admit(self, identity)
        await server.roster.arrive(self.channel, identity.sub, identity.info)
        await self._done
        if identity is not GUEST:
            server.authority.release(self, identity)
        await server.hub.leave(self.channel, self)
        await server.roster.depart(self.channel, identity.sub)

    @staticmethod
    def _header_offset(value: str) -> int | Refusal | None:
        value = value.strip()
        if value == "":
            return None  # an EventSource that saw no id yet: a plain join
        return parse_offset(value)

    def _before_replay(self, replay: Replay) -> None:
        if replay.since is None:
            return
        body = recovery_fields(replay.since, replay.recovered, replay.first)
        self._queue(event(json.dumps(body).encode(), kind="recovery"))

    # --- as a hub subscriber -----------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        if not self._ended:
            chunk = delivery.encoded.get(SSE_EVENT)
            if chunk is None:  # the first stream of this fan-out builds it for the rest
                chunk = delivery.encoded[SSE_EVENT] = message_event(delivery)
            self._queue(chunk)

    def queued_bytes(self) -> int:
        stream = getattr(self.request.connection, "stream", None)  # HTTP1Connection's
        return self._pending_size + (unsent_bytes(stream) if stream is not None else 0)

    def close_slow(self) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------

    def _queue(self, chunk: bytes) -> None:
        self.write(chunk)
        self._pending_size += len(chunk)
        if not self._dirty and self._flusher is not None:
            self._dirty = True
            self._flusher.mark(self)

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        """Send what is queued (the Flusher calls this once per loop pass)."""
        self._dirty = False
        self._pending_size = 0
        future = super().flush(include_footers)
        future.add_done_callback(_retrieve)
        return future

    def _send_now(self) -> None:
        if not self._ended:
            self.flush()

    def _schedule_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        self._keepalive = loop.call_later(KEEPALIVE, self._send_keepalive)

    def _send_keepalive(self) -> None:
        if self._ended:
            return
        self._queue(b": keepalive\n\n")
        self._schedule_keepalive()

    # --- ending ------------------------------------------------------------------------------

    def going_away(self) -> None:
        """The server is shutting down: end the stream (an event stream has no close
        code); the client reconnects, elsewhere or later, and resumes."""
        self.close()

    def token_expired(self) -> None:
        """The token ran out (auth.expiry): say so, and end the stream."""
        self._last_event(b"expired")

    def disconnect(self) -> None:
        """DELETE /api/users/<sub>/connections: say so, and end the stream."""
        self._last_event(b"disconnected")

    def _last_event(self, kind: bytes) -> None:
        if not self._ended:
            self.write(b"event: " + kind + b"\ndata: {}\n\n")
            self.close()

    def close(self) -> None:
        """End the stream (the drain, a slow client); the client may reconnect and resume."""
        if self._ended:
            return
        self.finish()
        self._end()

    def on_connection_close(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.server.connections.discard(self)
        # Its connection's slot stays held (by Tornado's HTTP side) until it closes.
        self.server.occupancy.end_stream(self._slot)
        self._slot = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a closed stream is a client gone: nothing to report

"""Server-Sent Events: a channel as a text/event-stream (GET /sse, /sse/<channel>).

Each message is one event whose `id:` is ``<epoch>:<offset>`` (wire/positions.py; the bare
offset for a message without an epoch): text as `data:` lines (one per line of
the message), binary as base64 under `event: binary`; in mixed mode the data is the
broadcast's payload (JSON). A comment every KEEPALIVE seconds keeps proxies from closing an
idle stream. `Last-Event-ID` (the header a browser's EventSource sends when it reconnects,
or ?last_event_id= / ?since= for clients that cannot set headers) resumes exactly as a
WebSocket's ?since= does: every kept message after it, then the live stream, preceded by
`event: recovery` saying whether nothing was lost and the channel's epoch. An id from
another epoch is not recovered (hub.join); a bare offset, as ?since=N without ?epoch=, is
taken as the current epoch's.

An event-stream subscriber is a channel member like a WebSocket one: it counts in presence
and listenCount, in max_connections and in /metrics, obeys the same origin and token rules
and the same slow-client cap and policy (past the cap its events are dropped, or the stream
is ended: EventSource then reconnects and resumes), and is ended by the drain on SIGTERM.
With connection tokens (JWT), a stream whose token runs out gets `event: expired` and ends
(an EventSource cannot swap its token: it reconnects with a new one); one closed by the
user API gets `event: disconnected` and ends.

Several channels in one stream (issue 21): /sse?channel=a&channel=b (rights checked for
each: 403 if any is refused; at most websocket.max_subscriptions). Each event's data is then
JSON that says its channel and offset: {"channel":C,"offset":N,"epoch":E,"payload":P} in mixed mode,
{"channel":C,"offset":N,"epoch":E,"text":T} for text and, under `event: binary`,
{"channel":C,"offset":N,"epoch":E,"base64":B} otherwise; `event: recovery` data carries
"channel" too. Its `id:` is the stream's cursor, `a:E:12,b:F:40` (wire/channels.py), which
resumes every channel at once as Last-Event-ID (or ?last_event_id= / ?since=); an entry
without its epoch, `a:12`, is taken as the current epoch's.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import re

from echoserver.auth.identity import GUEST
from echoserver.endpoints.admission import BAD_OFFSET, AdmittedHandler
from echoserver.endpoints.occupancy import Slot
from echoserver.fanout.delivery import Delivery, Replay
from echoserver.transport.body_writer import BodyWriter
from echoserver.transport.flusher import Flusher
from echoserver.transport.tornado_seam import chunked_response, unsent_bytes
from echoserver.wire.channels import (
    BadChannelRequest,
    Position,
    channel_name,
    cursor_text,
    parse_cursor,
)
from echoserver.wire.envelopes import recovery_fields
from echoserver.wire.handshake import Refusal
from echoserver.wire.positions import event_id, parse_event_id

log = logging.getLogger("echoserver.sse")

KEEPALIVE = 15.0  # seconds between comment lines on an idle stream
RETRY_MS = 2000  # how long an EventSource waits before it reconnects
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def event(
    data: bytes, *, offset: int | None = None, kind: str | None = None, epoch: str = ""
) -> bytes:
    """One event: `id:`, `event:` and one `data:` line per line of data (which must not be
    binary: encode that first)."""
    head = b""
    if offset:
        head += b"id: " + event_id(epoch, offset) + b"\n"
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
        return event(
            base64.b64encode(delivery.data),
            offset=delivery.seq,
            kind="binary",
            epoch=delivery.epoch,
        )
    return event(delivery.data, offset=delivery.seq, epoch=delivery.epoch)


# The key of message_event's bytes as one HTTP/1.1 chunk: what a chunked stream writes.
SSE_CHUNK = "sse event chunk"

CHANNEL_EVENT = "sse channel event"  # the key of channel_event's bytes in a delivery


def channel_event(delivery: Delivery, mixed: bool) -> bytes:
    """A multi-channel stream's event, but its `id:` (each stream's own cursor): the data is
    JSON with the channel and offset, the same bytes for every stream of the fan-out."""
    head = b'{"channel":%s,"offset":%d,"epoch":"%s",' % (
        json.dumps(delivery.channel).encode(),
        delivery.seq,
        delivery.epoch.encode(),
    )
    if delivery.binary:
        encoded = base64.b64encode(delivery.data)
        return b"event: binary\ndata: " + head + b'"base64":"' + encoded + b'"}\n\n'
    if mixed:  # the payload is compact JSON already: one line
        body = b'"payload":' + delivery.data
    else:
        body = b'"text":' + json.dumps(delivery.data.decode("utf-8", "replace")).encode()
    return b"data: " + head + body + b"}\n\n"


class EventStream(AdmittedHandler):
    """One subscriber's event stream; its own hub subscriber, in one channel or several."""

    channel = "default"
    channels: tuple[str, ...] = ()  # every channel of the stream, the first is `channel`
    # A multi-channel stream's cursor: each channel's last offset sent (None: one channel).
    _positions: dict[str, Position] | None = None
    _mixed = False
    sub_id = ""
    _pending_size = 0  # bytes written to the handler's buffer, not yet flushed
    _dirty = False
    _ended = False
    _keepalive: asyncio.TimerHandle | None = None
    _done: asyncio.Future[None] | None = None
    _flusher: Flusher | None = None
    _slot: Slot | None = None  # its place in server.occupancy, while a stream
    # Once the headers and the first events have left: the body's writer, past Tornado's
    # HTTP layer (transport/body_writer.py), and a done future for flush() to answer.
    _writer: BodyWriter | None = None
    _written: asyncio.Future[None] | None = None

    async def get(self, channel: str | None = None) -> None:
        refusal = self.policy_refusal()
        named = self.request.query_arguments.get("channel")
        positions: dict[str, Position] = {}
        if named is not None:
            found = self._channels_and_cursor(channel, named)
            if refusal is None and isinstance(found, Refusal):
                refusal = found
            elif not isinstance(found, Refusal):
                self.channels, positions = found
                self._positions = dict(positions)
        else:
            self.channels = (channel or "default",)
            since, epoch, refusal = self._position(refusal)
            if since is not None:
                positions = {self.channels[0]: (since, epoch)}
        if refusal is None:
            refusal = await self.authenticate()
            for name in self.channels:
                if refusal is not None:
                    break
                refusal = self.join_refusal(name)
        if refusal is not None:
            self.refuse(refusal)
            return
        server = self.server
        self.channel = self.channels[0]
        self._mixed = server.config.mode == "mixed"
        self.sub_id = server.hub.new_subscriber_id()
        self._flusher = server.flusher
        self._done = asyncio.get_running_loop().create_future()
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # no buffering in a proxy in front
        self.write(b"retry: %d\n\n" % RETRY_MS)
        server.connections.add(self)
        self._slot = server.occupancy.begin_stream(self.stream_key())
        joined: list[str] = []
        try:
            for name in self.channels:
                joined.append(name)  # left below even if its join fails half-way
                replayed = functools.partial(self._before_replay, name)
                since, epoch = positions.get(name, (None, None))
                await server.hub.join(name, self, replayed, since, epoch)
        except Exception:
            log.exception("%s: could not join %s", self.peer, joined[-1])
            await self._leave(joined)
            server.connections.discard(self)
            server.occupancy.end_stream(self._slot)
            self._slot = None
            self.send_error(503)
            return
        if self._ended:  # gone while joining
            await self._leave(joined)
            return
        self._send_now()
        self._write_directly()
        self._schedule_keepalive()
        identity = self.identity
        if identity is not GUEST:
            server.authority.admit(self, identity)
        for name in self.channels:  # presence (fanout/presence.py): once a member of each
            await server.roster.arrive(name, identity.sub, identity.info)
        await self._done
        if identity is not GUEST:
            server.authority.release(self, identity)
        await self._leave(self.channels)
        for name in self.channels:
            await server.roster.depart(name, identity.sub)

    async def _leave(self, channels: list[str] | tuple[str, ...]) -> None:
        for name in channels:
            await self.server.hub.leave(name, self)

    def _channels_and_cursor(
        self, channel: str | None, named: list[bytes]
    ) -> tuple[tuple[str, ...], dict[str, Position]] | Refusal:
        """A multi-channel stream's channels (?channel=, each once, in order) and where to
        resume them (Last-Event-ID, else ?last_event_id= or ?since=: a cursor)."""
        if channel is not None:
            return Refusal(400, "bad_request", "name the channels in the path or as ?channel=")
        limit = self.server.config.websocket.max_subscriptions
        if len(named) > limit:
            return Refusal(400, "bad_request", f"at most {limit} channels per stream")
        arguments = self.request.query_arguments
        try:
            channels = tuple(dict.fromkeys(channel_name(v.decode("latin-1")) for v in named))
            cursor = self.request.headers.get("Last-Event-ID", "").strip()
            for name in ("last_event_id", "since"):
                if cursor:
                    break
                values = arguments.get(name)
                if values is not None:
                    if len(values) != 1:
                        raise BadChannelRequest(f"?{name}= once")
                    cursor = values[0].decode("latin-1")
            return channels, parse_cursor(cursor, channels)
        except BadChannelRequest as error:
            return Refusal(400, "bad_request", str(error))

    def _position(self, refusal: Refusal | None) -> tuple[int | None, str | None, Refusal | None]:
        """(since, its epoch, refusal) from Last-Event-ID (it wins: it is the newest), else
        ?last_event_id= (an id) or ?since= with ?epoch=."""
        arguments = self.request.query_arguments
        header = self.request.headers.get("Last-Event-ID")
        if header is not None and header.strip():
            text: str | None = header.strip()
        elif "last_event_id" in arguments:
            values = arguments["last_event_id"]
            text = values[0].decode("latin-1") if len(values) == 1 else "\n"
        else:
            text = None  # an EventSource that saw no id yet sends an empty header
        if text is not None:
            position = parse_event_id(text)
            if position is None:
                return None, None, refusal or BAD_OFFSET
            return position[0], position[1], refusal
        since = self.offset_argument("since")
        epoch = self.epoch_argument()
        for bad in (since, epoch):
            if isinstance(bad, Refusal):
                return None, None, refusal or bad
        assert not isinstance(since, Refusal) and not isinstance(epoch, Refusal)
        return since, epoch, refusal

    def _before_replay(self, channel: str, replay: Replay) -> None:
        positions = self._positions
        if positions is not None and replay.count == 0 and replay.last is not None:
            # nothing to replay: the stream is at its last
            positions[channel] = (replay.last, replay.epoch)
        if replay.since is None:
            return
        body = recovery_fields(replay.since, replay.recovered, replay.first, replay.epoch)
        if positions is not None:
            body = {"channel": channel, **body}
        self._queue(event(json.dumps(body).encode(), kind="recovery"))

    # --- as a hub subscriber -----------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        if self._ended:
            return
        positions = self._positions
        writer = self._writer
        if positions is None and writer is not None and writer.chunked:
            # The hot path: one chunk per fan-out, shared by every chunked stream of it.
            framed = delivery.encoded.get(SSE_CHUNK)
            if framed is None:
                chunk = delivery.encoded.get(SSE_EVENT)
                if chunk is None:
                    chunk = delivery.encoded[SSE_EVENT] = message_event(delivery)
                framed = delivery.encoded[SSE_CHUNK] = writer.frame(chunk)
            writer.parts.append(framed)  # writer.add(framed), inlined on the hot path
            writer.size += len(framed)
            if not writer.dirty:
                writer.dirty = True
                writer.flusher.mark(writer)
            return
        if positions is None:
            chunk = delivery.encoded.get(SSE_EVENT)
            if chunk is None:  # the first stream of this fan-out builds it for the rest
                chunk = delivery.encoded[SSE_EVENT] = message_event(delivery)
            self._queue(chunk)
            return
        if delivery.seq < 0:  # a join or leave: its JSON says its channel; no id
            chunk = delivery.encoded.get(SSE_EVENT)
            if chunk is None:
                chunk = delivery.encoded[SSE_EVENT] = message_event(delivery)
            self._queue(chunk)
            return
        chunk = delivery.encoded.get(CHANNEL_EVENT)
        if chunk is None:
            chunk = delivery.encoded[CHANNEL_EVENT] = channel_event(delivery, self._mixed)
        if delivery.seq:
            positions[delivery.channel] = (delivery.seq, delivery.epoch)
        if positions:  # the id is this stream's own: every channel's position so far
            chunk = b"id: " + cursor_text(positions) + b"\n" + chunk
        self._queue(chunk)

    def queued_bytes(self) -> int:
        writer = self._writer
        if writer is not None:  # writer.queued_bytes(), inlined: once per delivery
            return writer.size + unsent_bytes(writer.stream)
        stream = getattr(self.request.connection, "stream", None)  # HTTP1Connection's
        return self._pending_size + (unsent_bytes(stream) if stream is not None else 0)

    def close_slow(self) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------

    def _queue(self, chunk: bytes) -> None:
        writer = self._writer
        if writer is not None:
            writer.add(writer.frame(chunk))
            return
        self.write(chunk)
        self._pending_size += len(chunk)
        if not self._dirty and self._flusher is not None:
            self._dirty = True
            self._flusher.mark(self)

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        """Send what is queued (the Flusher calls this once per loop pass; finish() too)."""
        self._dirty = False
        self._pending_size = 0
        writer = self._writer
        if writer is not None:
            writer.flush()
            if not include_footers and self._written is not None:
                return self._written  # nothing went to the handler's own buffer
        future = super().flush(include_footers)
        future.add_done_callback(_retrieve)
        return future

    def _send_now(self) -> None:
        if not self._ended:
            self.flush()

    def _write_directly(self) -> None:
        """The headers have left: from now on events go to the connection through a
        BodyWriter, framed once per fan-out, not through RequestHandler.write/flush."""
        if self._ended:
            return
        connection = self.request.connection
        stream = getattr(connection, "stream", None)
        chunked = chunked_response(connection)
        if stream is None or chunked is None or self._flusher is None:
            return  # not an HTTP/1.x connection: Tornado's write path, as before
        if self.application.transforms:
            return  # an embedding application's output transforms (compress_response)
        written = asyncio.get_running_loop().create_future()
        written.set_result(None)
        self._written = written
        self._writer = BodyWriter(stream, chunked, self._flusher)

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
            last = b"event: " + kind + b"\ndata: {}\n\n"
            if self._writer is None:
                self.write(last)
            else:
                self._writer.add(self._writer.frame(last))
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
        writer = self._writer
        if writer is not None:  # what a gone peer was never sent
            writer.parts.clear()
            writer.size = 0
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

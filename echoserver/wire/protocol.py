"""One server-side WebSocket connection's protocol state, without I/O (RFC 6455 and 7692).

ServerProtocol takes the bytes a peer sent and returns the events they make; the I/O
adapter hands messages to the application and control events back to handle(), in order.
What has to go back (pongs, close frames, replies, broadcasts) is framed and queued here;
the adapter asks for it with data_to_send() and writes it in one go, as the websockets
library's sans-I/O layer does. It owns the rules that do not depend on sockets or clocks:

- pings are answered; a close frame from the peer is echoed (its code, or an empty close
  for an empty one) and ends the connection (state CLOSED: the adapter closes the socket);
- a frame that breaks the protocol fails the connection with its close code (1002, 1007,
  1009); after the server has sent its close frame (state CLOSING) the parser skims: every
  data frame is skipped unkept and only the peer's close frame matters, which ends the
  connection as soon as it arrives; if the peer's stream cannot be parsed any more (a
  1002: `discarding`), the adapter waits for it to fall quiet instead;
- which close code the connection ended with, for logs and metrics.

Timers (the closing timeout, keepalive pings) and policy (rate limits) belong to the adapter
in transport/connection.py, which calls close() or end() when they fire.
"""

from __future__ import annotations

from typing import Final

from echoserver.wire.deflate import Deflater
from echoserver.wire.framing import (
    CLOSE,
    OP_BINARY,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING,
    SHORT_BINARY_HEADERS,
    SHORT_TEXT_HEADERS,
    CloseCode,
    Event,
    FrameParser,
    encode_close,
    encode_frame,
)

OPEN: Final = 0
CLOSING: Final = 1  # our close frame is queued; waiting for the peer's
CLOSED: Final = 2  # both close frames exchanged (or given up): close the socket


class ServerProtocol:
    """The protocol state of one connection: bytes in, events and frames to send out.

    receive(data) parses `data` into events, in order; none once the server has sent its
    close frame (then only the peer's close frame is looked for). MESSAGE and PONG events
    are the application's. PING and CLOSE events go to handle() in their turn, after the
    messages before them, so that replies to those messages leave before a pong or a close
    frame; the adapter turns FAIL events into close(). (While OPEN, receive() is the
    parser's: an adapter that has checked the state may call parser.receive itself, one
    call less per read on the hot path.)

    Frames to send are queued here (send_message, send_frame, ping, close, and the replies
    handle() makes); the adapter takes them with data_to_send() and reads `buffered` for
    its queue cap. Nothing is queued once the server's close frame is (RFC 6455 5.5.1).
    """

    __slots__ = (
        "_out",
        "buffered",
        "close_received",
        "close_sent",
        "deflater",
        "parser",
        "peer_initiated",
        "state",
    )

    def __init__(self, parser: FrameParser, deflater: Deflater | None = None) -> None:
        self.parser = parser
        self.deflater = deflater  # set when permessage-deflate was negotiated
        self.state = OPEN
        # Encoded frames not yet taken by data_to_send(); None when there are none (an idle
        # connection keeps no empty list).
        self._out: list[bytes] | None = None
        self.buffered = 0  # their size in bytes (read-only outside this class)
        self.close_sent: int | None = None  # the code of our close frame (None: empty close)
        self.close_received: int | None = None  # the peer's (1005 for an empty close)
        self.peer_initiated = False  # the peer sent the first close frame

    # --- bytes in -------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """The events `data` makes (see the class doc)."""
        if self.state == OPEN:
            return self.parser.receive(data)
        return self._receive_closing(data)

    def handle(self, event: Event) -> bool:
        """Act on a PING or CLOSE event; True after the peer's close (the events after it
        must be ignored)."""
        kind = event[0]
        if kind == PING:
            self.send_frame(encode_frame(OP_PONG, event[2]))  # type: ignore[arg-type]
            return False
        if kind == CLOSE:
            self._peer_closed(event[1])
            return True
        return False  # MESSAGE, PONG and FAIL are the adapter's

    def _receive_closing(self, data: bytes) -> list[Event]:
        if self.state == CLOSED or self.parser.failed:
            return []
        self.after_close(self.parser.skim(data))
        return []

    def after_close(self, events: list[Event]) -> None:
        """Events parsed after our close frame (the rest of a read): only the peer's close
        frame counts."""
        for event in events:
            if event[0] == CLOSE and self.state == CLOSING:
                self._peer_closed(event[1])
                break

    def _leave(self, state: int) -> None:
        self.state = state
        self.parser.stop_messages()

    def _peer_closed(self, code: int) -> None:
        self.close_received = int(code)
        if self.state == OPEN:
            self.peer_initiated = True
            # Echo the peer's code (RFC 6455 5.5.1); an empty close answers an empty close.
            self._queue_close(None if code == CloseCode.NO_STATUS else int(code), "")
        self._leave(CLOSED)

    # --- frames out -----------------------------------------------------------------------

    def encode(self, payload: bytes, binary: bool) -> bytes:
        """One message as this connection's frame: text or binary, deflated when that was
        negotiated (a text payload must already be UTF-8). The one place a message is
        framed; a broadcast's shared frame is made here too, by its first receiver."""
        opcode = OP_BINARY if binary else OP_TEXT
        if self.deflater is not None:
            return encode_frame(opcode, self.deflater.compress(payload), True)
        if len(payload) < 126:
            return (SHORT_BINARY_HEADERS if binary else SHORT_TEXT_HEADERS)[len(payload)] + payload
        return encode_frame(opcode, payload)

    def send_message(self, payload: bytes, binary: bool) -> None:
        """Frame one message and queue it (dropped once our close frame is queued)."""
        if self.state:  # not OPEN
            return
        if self.deflater is None and len(payload) < 126:
            # encode()'s short frame, inlined: an echo's reply is framed here per message.
            frame = (SHORT_BINARY_HEADERS if binary else SHORT_TEXT_HEADERS)[len(payload)] + payload
        else:
            frame = self.encode(payload, binary)
        out = self._out
        if out is None:
            self._out = [frame]
        else:
            out.append(frame)
        self.buffered += len(frame)

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame (a broadcast's, shared by every receiver); dropped once
        our close frame is queued."""
        if self.state:  # not OPEN
            return
        out = self._out
        if out is None:
            self._out = [frame]
        else:
            out.append(frame)
        self.buffered += len(frame)

    def ping(self, data: bytes = b"") -> None:
        self.send_frame(encode_frame(OP_PING, data))

    def data_to_send(self) -> bytes:
        """Everything queued, as one write (b"" when nothing is); the queue is then empty."""
        out = self._out
        if out is None:
            return b""
        self._out = None
        self.buffered = 0
        return out[0] if len(out) == 1 else b"".join(out)

    # --- closing ---------------------------------------------------------------------------

    def close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (once): queue the close frame, then wait for the peer's."""
        if self.state == OPEN:
            self._queue_close(code, reason)
            self._leave(CLOSING)

    def _queue_close(self, code: int | None, reason: str) -> None:
        self.close_sent = None if code is None else int(code)
        frame = encode_close(code, reason)
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        self.buffered += len(frame)

    def end(self, discard_output: bool = False) -> None:
        """The connection ends now, handshake finished or not (a timeout, a peer that fell
        quiet or went away): state CLOSED; with discard_output, what is still queued is
        dropped (the socket is gone)."""
        self._leave(CLOSED)
        if discard_output:
            self._out = None
            self.buffered = 0

    @property
    def discarding(self) -> bool:
        """True while closing after a frame that could not be parsed: the peer's close frame
        cannot be found, so the adapter closes once the peer falls quiet."""
        return self.state == CLOSING and self.parser.failed

    @property
    def close_code(self) -> int:
        """The code the connection ended with: the peer's when it closed first, else ours;
        1006 when no close frame was exchanged."""
        if self.peer_initiated:
            return self.close_received  # type: ignore[return-value]
        if self.state != OPEN:
            return CloseCode.NO_STATUS if self.close_sent is None else self.close_sent
        return CloseCode.ABNORMAL

"""One server-side WebSocket connection's protocol state, without I/O (RFC 6455 and 7692).

ServerProtocol takes the bytes a peer sent and returns the events they make; the I/O
adapter hands messages to the application and control events back to handle(), in order.
What has to go back (pongs, close frames, replies, broadcasts) is queued in `out` for the
adapter to write in one go. It owns the rules that do not
depend on sockets or clocks:

- pings are answered; a close frame from the peer is echoed (its code, or an empty close
  for an empty one) and ends the connection (state CLOSED: the adapter closes the socket);
- a frame that breaks the protocol fails the connection with its close code (1002, 1007,
  1009); after the server has sent its close frame (state CLOSING) the parser skims: every
  data frame is skipped unkept and only the peer's close frame matters, which ends the
  connection as soon as it arrives; if the peer's stream cannot be parsed any more (a
  1002: `discarding`), the adapter waits for it to fall quiet instead;
- which close code the connection ended with, for logs and metrics.

Timers (the closing timeout, keepalive pings) and policy (rate limits) belong to the adapter
in transport/connection.py, which calls close() or fail() when they fire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from echoserver.wire.deflate import Deflater
from echoserver.wire.framing import (
    CLOSE,
    FAIL,
    OP_BINARY,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING,
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
    """The protocol state of one connection: bytes in, events out, frames queued in `out`.

    receive(data) parses `data` into events, in order; none once the server has sent its
    close frame (then only the peer's close frame is looked for). MESSAGE and PONG events
    are the application's. Every other event (PING, CLOSE, FAIL) goes to handle() in its
    turn, after the messages before it, so that replies to those messages leave before a
    pong or a close frame. (receive is an attribute: the parser's own method while OPEN,
    one call less per read on the hot path, then _receive_closing.)
    """

    __slots__ = (
        "close_reason",
        "close_received",
        "close_sent",
        "deflater",
        "out",
        "out_size",
        "parser",
        "peer_initiated",
        "receive",
        "state",
    )

    def __init__(self, parser: FrameParser, deflater: Deflater | None = None) -> None:
        self.parser = parser
        self.deflater = deflater  # set when permessage-deflate was negotiated
        self.state = OPEN
        self.receive: Callable[[bytes], list[Event]] = parser.receive
        self.out: list[bytes] = []  # encoded frames not yet handed to the transport
        self.out_size = 0
        self.close_sent: int | None = None  # the code of our close frame (None: empty close)
        self.close_received: int | None = None  # the peer's (1005 for an empty close)
        self.close_reason = ""
        self.peer_initiated = False  # the peer sent the first close frame

    # --- bytes in -------------------------------------------------------------------------

    def handle(self, event: Event) -> bool:
        """Act on a control event; True when the events after it must be ignored."""
        kind = event[0]
        if kind == PING:
            self.send_frame(encode_frame(OP_PONG, event[2]))  # type: ignore[arg-type]
            return False
        if kind == CLOSE:
            self._peer_closed(event[1], event[2])  # type: ignore[arg-type]
            return True
        if kind == FAIL:
            self.fail(event[1], event[2])  # type: ignore[arg-type]
            return True
        return False  # MESSAGE and PONG: nothing for the protocol to do

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
                self._peer_closed(event[1], event[2])  # type: ignore[arg-type]
                break

    def _leave(self, state: int) -> None:
        self.state = state
        self.receive = self._receive_closing
        self.parser.stop_messages()

    def _peer_closed(self, code: int, reason: bytes) -> None:
        self.close_received = int(code)
        self.close_reason = reason.decode()
        if self.state == OPEN:
            self.peer_initiated = True
            # Echo the peer's code (RFC 6455 5.5.1); an empty close answers an empty close.
            self._queue_close(None if code == CloseCode.NO_STATUS else int(code), "")
        self._leave(CLOSED)

    # --- frames out -----------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame (a broadcast's, shared by every receiver)."""
        self.out.append(frame)
        self.out_size += len(frame)

    def encode(self, payload: bytes, binary: bool) -> bytes:
        """One message as this connection's frame: deflated when that was negotiated (a
        text payload must already be UTF-8)."""
        opcode = OP_BINARY if binary else OP_TEXT
        if self.deflater is not None:
            return encode_frame(opcode, self.deflater.compress(payload), True)
        return encode_frame(opcode, payload)

    def ping(self, data: bytes = b"") -> None:
        self.send_frame(encode_frame(OP_PING, data))

    def take_output(self) -> bytes:
        """Everything queued, as one write; the queue is then empty."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_size = 0
        return data

    # --- closing ---------------------------------------------------------------------------

    def close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (once): queue the close frame, then wait for the peer's."""
        if self.state == OPEN:
            self._queue_close(code, reason)
            self._leave(CLOSING)

    def fail(self, code: int, reason: str) -> None:
        """The peer broke the rules (or a policy): close with `code`."""
        self.close(code, reason)

    def _queue_close(self, code: int | None, reason: str) -> None:
        self.close_sent = None if code is None else int(code)
        self.send_frame(encode_close(code, reason))

    def give_up(self) -> None:
        """Stop waiting for the peer (timeout, a peer that is not there): close the socket."""
        self._leave(CLOSED)

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

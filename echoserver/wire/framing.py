"""RFC 6455 framing without I/O: a strict parser for client frames, frame encoders, close codes.

FrameParser.receive(data) takes whatever bytes arrived and returns the events that every
complete frame in them produced, in order: whole messages (fragments joined, text checked
for UTF-8), pings, pongs, a close, or a failure with its close code. Text that is not
UTF-8 fails (1007) as soon as the bytes that make it invalid arrive: a fragmented or partly
received text message is checked as it comes in (compressed messages once inflated, whole).
Every frame of a fragmented message is charged FRAME_COST bytes on top of its payload
against max_size, so a flood of tiny or empty fragments ends in 1009 like a big message.

After a failure that leaves the framing intact (1007, 1009) the parser skims: it follows
the peer's frames without keeping data frames (a huge one is skipped as it streams in) and
reports only control frames, so the peer's close frame is found (RFC 6455 7.1.1). After a
protocol error (1002) the stream cannot be followed: `failed`, nothing more is parsed.

Unmasking is injected: a parser takes the unmask function (the server gives it Tornado's
C speedup, from transport.tornado_seam; python_unmask is the pure default). The encoders
build unmasked server frames; a broadcast is encoded once and the same bytes go to every
receiver. CloseCode is the one list of close codes the server sends or names.

Why one module of this length: receive() and skim() walk the same frame headers with the
same state, and the parser is the per-read hot path (a call per frame is what costs), so
the two loops stay inline and side by side rather than behind a shared helper.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections.abc import Callable
from enum import IntEnum
from typing import Final

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# Event kinds returned by FrameParser.receive: (kind, opcode_or_code, payload_or_reason).
MESSAGE: Final = 0  # (MESSAGE, OP_TEXT | OP_BINARY, payload bytes)
PING: Final = 1  # (PING, 0, payload)
PONG: Final = 2  # (PONG, 0, payload)
CLOSE: Final = 3  # (CLOSE, code or 1005 when absent, reason bytes)
FAIL: Final = 4  # (FAIL, close code to send, reason str)


class CloseCode(IntEnum):
    """Close codes (RFC 6455 7.4.1 and the IANA registry) with the names the page shows."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: a close frame without a code
    ABNORMAL = 1006  # never sent: the connection dropped without a close frame
    INVALID_DATA = 1007  # text that is not UTF-8
    POLICY_VIOLATION = 1008  # origin, token, rate limit
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011  # also: no pong within ping_timeout
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013  # a slow client, or a message the broker could not take
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015
    # The server's own (the private-use range 4000-4999):
    TOKEN_EXPIRED = 4001  # the connection's token ran out, and was not refreshed
    DISCONNECTED_BY_THE_SERVER = 4003  # an operator closed the user's connections

    @property
    def label(self) -> str:
        """A reader's name: "message too big"."""
        return self.name.lower().replace("_", " ")


Event = tuple[int, int, bytes | str]

# What a fragment costs while its message is open, beyond its payload: the bytes object's
# header (33), the allocator's rounding (up to 15) and its slot in the fragment list (8, and
# the list's over-allocation): 57 measured with tracemalloc, rounded up. Charged against
# max_size for every frame of a fragmented message, empty ones included.
FRAME_COST: Final = 64

UTF8_FAILURE: Final = "text message is not valid UTF-8"


def close_code_allowed(code: int) -> bool:
    """Whether a peer may send this close code on the wire (RFC 6455 7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def utf8_goes_on(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> bool:
    """Feed a piece of text to `decoder`: False once the text can no longer be valid UTF-8."""
    try:
        decoder.decode(data, final)
    except UnicodeDecodeError:
        return False
    # CPython holds ED A0..ED BF (a UTF-16 surrogate) until its third byte; it is already wrong.
    pending = decoder.getstate()[0]
    return not (len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0)


def python_unmask(mask: bytes, data: bytes) -> bytes:
    """`data` XORed with the 4-byte `mask` repeated: the pure-Python unmasking, for a
    parser not given a faster one (the server's is Tornado's C one)."""
    size = len(data)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(size, "big")


def _frame_sizes(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(header size, payload length) of the masked frame at `pos`, or None while its
    extended length is not all in. The parser's hot loop inlines the same reading."""
    length = data[pos + 1] & 0x7F
    if length < 126:
        return 6, length
    header = 8 if length == 126 else 14
    if end - pos < header:
        return None
    return header, int.from_bytes(data[pos + 2 : pos + header - 4], "big")


class FrameParser:
    """Client-to-server frames in, events out. One parser per connection."""

    __slots__ = (
        "_buffer",
        "_checked",
        "_compressed",
        "_fragments",
        "_fragments_size",
        "_message_opcode",
        "_need",
        "_skip",
        "_text",
        "_text_at",
        "decompress",
        "failed",
        "max_size",
        "skimming",
        "unmask",
    )

    def __init__(
        self,
        max_size: int,
        decompress: Callable[[bytes], bytes] | None = None,
        unmask: Callable[[bytes, bytes], bytes] | None = None,
    ) -> None:
        self.max_size = max_size
        # unmask(mask, data): XOR data with the 4-byte mask repeated (RFC 6455 5.3).
        self.unmask = unmask or python_unmask
        # Set when permessage-deflate was negotiated; raises ValueError past max_size
        # and zlib.error on a corrupt stream.
        self.decompress = decompress
        self.failed = False  # the framing is lost: nothing more is parsed
        self.skimming = False  # no more messages: data frames are skipped (see skim())
        # Bytes of a frame not all in yet: a bytearray while it grows, else b"" (an idle
        # connection holds no empty bytearray).
        self._buffer: bytes | bytearray = b""
        self._need = 0  # bytes the buffered frame needs before parsing is worth trying
        self._skip = 0  # bytes of a skipped data frame still to come
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._message_opcode = 0
        self._compressed = False
        # Text checked as it arrives (fragmented, or a frame over several reads): the
        # decoder, where the pending frame's payload starts in the buffer (0 = no pending
        # text frame to check) and how much of that payload has been checked.
        self._text: codecs.IncrementalDecoder | None = None
        self._text_at = 0
        self._checked = 0

    def receive(self, data: bytes) -> list[Event]:
        """Parse every complete frame now buffered; keep the rest for the next call."""
        if self.skimming:
            return self.skim(data)
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._need:
                return self._check_partial() if self._text_at else []
            data = bytes(self._buffer)
            self._buffer = b""
            self._need = 0
        events: list[Event] = []
        unmask = self.unmask
        pos = 0
        end = len(data)
        while end - pos >= 2:
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            header = 6
            if length < 126:
                # The common frame: a whole, unfragmented, uncompressed text or binary message
                # of under 126 bytes, masked, with no message open. Judged here as
                # _check_header, _on_frame and _message judge it (no rule of theirs can fail
                # it but the UTF-8 check), without their three calls; anything else takes
                # the general path below. (_message_opcode and _compressed are left alone:
                # they are read only while a fragmented message is open.)
                frame_end = pos + 6 + length
                if (
                    (first == 0x82 or first == 0x81)
                    and second & 0x80
                    and frame_end <= end
                    and self._fragments is None
                    and self._text is None
                    and length <= self.max_size
                ):
                    payload = unmask(data[pos + 2 : pos + 6], data[pos + 6 : frame_end])
                    pos = frame_end
                    if first == 0x81 and not payload.isascii() and not is_utf8(payload):
                        events.append((FAIL, CloseCode.INVALID_DATA, UTF8_FAILURE))
                        return events + self._stop(data, pos)
                    events.append((MESSAGE, first & 0x0F, payload))
                    continue
            elif length == 126:
                header = 8
                if end - pos < 8:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                header = 14
                if end - pos < 14:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            failure = self._check_header(first, second, length)
            frame_end = pos + header + length
            if failure is not None:
                events.append(failure)
                if failure[1] == CloseCode.PROTOCOL_ERROR:
                    self._lose()
                    return events
                # Too big, but its length is known: skip it and follow the frames after it.
                return events + self._stop(data, frame_end)
            if frame_end > end:
                self._need = frame_end - pos
                if self._is_plain_text(first):
                    self._buffer = bytearray(data[pos:] if pos else data)
                    self._text_at = header
                    if self._text is None:
                        self._text = _Utf8Decoder()
                    events += self._check_partial()
                    return events
                break
            mask = data[pos + header - 4 : pos + header]
            payload = unmask(mask, data[pos + header : frame_end]) if length else b""
            pos = frame_end
            event = self._on_frame(first, payload)
            if event is not None:
                events.append(event)
                if event[0] == FAIL:
                    if first & 0x08 or event[1] == CloseCode.PROTOCOL_ERROR:  # a control frame
                        self._lose()
                        return events
                    return events + self._stop(data, pos)
        if pos < end:  # the buffer is empty here: its bytes were taken into data
            self._buffer = bytearray(data[pos:] if pos else data)
        return events

    def stop_messages(self) -> None:
        """No more messages (a failure, or the server sent its close): from now on data
        frames are skipped unkept and only control frames are reported (see skim())."""
        if self.skimming:
            return
        self.skimming = True
        self._fragments = None
        self._fragments_size = 0
        self._text = None
        self._text_at = self._checked = 0
        if self._need and self._buffer[0] & 0x0F < OP_CLOSE:
            # Part of a data frame is buffered (its header whole): skip the rest as it comes.
            self._skip = self._need - len(self._buffer)
            self._buffer = b""
        self._need = 0

    def _stop(self, data: bytes, frame_end: int) -> list[Event]:
        """A message failed at a frame ending at `frame_end`: skim whatever follows it."""
        self.stop_messages()
        end = len(data)
        if frame_end >= end:
            self._skip = frame_end - end
            return []
        return self.skim(data[frame_end:])

    def _lose(self) -> None:
        self.failed = self.skimming = True
        self._buffer = b""
        self._fragments = None

    def skim(self, data: bytes) -> list[Event]:
        """Follow the peer's frames without keeping any message: data frames are skipped
        (bounded memory whatever their length), control frames reported; nothing is
        parsed after a close or a protocol error."""
        if self.failed:
            return []
        skip = self._skip
        if skip:
            if len(data) <= skip:
                self._skip = skip - len(data)
                return []
            data = data[skip:]
            self._skip = 0
        if self._buffer:  # at most a header or a control frame
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer = b""
        events: list[Event] = []
        pos = 0
        end = len(data)
        while end - pos >= 2:
            sizes = _frame_sizes(data, pos, end)
            if sizes is None:
                break
            header, length = sizes
            first = data[pos]
            failure = self._check_skimmed(first, data[pos + 1], length)
            if failure is not None:
                events.append(failure)
                self._lose()
                return events
            frame_end = pos + header + length
            if not first & 0x08:  # a data frame: skipped
                if frame_end > end:
                    self._skip = frame_end - end
                    return events
                pos = frame_end
                continue
            if frame_end > end:
                break
            mask = data[pos + header - 4 : pos + header]
            event = self._on_control(
                first & 0x0F, self.unmask(mask, data[pos + header : frame_end])
            )
            events.append(event)
            pos = frame_end
            if event[0] == FAIL:
                self._lose()
                return events
            if event[0] == CLOSE:
                return events  # the peer has closed: what follows its close frame is not read
        if pos < end:  # the buffer is empty here: its bytes were taken into data
            self._buffer = bytearray(data[pos:] if pos else data)
        return events

    @staticmethod
    def _check_skimmed(first: int, second: int, length: int) -> Event | None:
        """What breaks the framing itself (a message's rules no longer apply)."""
        opcode = first & 0x0F
        if not second & 0x80:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "client frame not masked")
        if OP_BINARY < opcode < OP_CLOSE or opcode > OP_PONG:
            return (FAIL, CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if opcode >= OP_CLOSE and (length > 125 or not first & 0x80 or first & 0x70):
            return (FAIL, CloseCode.PROTOCOL_ERROR, "invalid control frame")
        if length >> 63:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "64-bit payload length with its top bit set")
        return None

    def _is_plain_text(self, first: int) -> bool:
        """Whether a data frame carries uncompressed text (text is checked after inflating)."""
        opcode = first & 0x0F
        if opcode == OP_TEXT:
            return not first & 0x40
        return opcode == OP_CONT and self._message_opcode == OP_TEXT and not self._compressed

    def _check_partial(self) -> list[Event]:
        """Check the text that has arrived of a frame still incomplete in the buffer."""
        start = self._text_at + self._checked
        if len(self._buffer) <= start:
            return []
        at = self._text_at
        turn = self._checked % 4
        mask = bytes(self._buffer[at - 4 + turn : at] + self._buffer[at - 4 : at - 4 + turn])
        assert self._text is not None
        chunk = bytes(self._buffer[start:])
        self._checked += len(chunk)
        if utf8_goes_on(self._text, self.unmask(mask, chunk), False):
            return []
        self.stop_messages()  # skips the rest of this frame
        return [(FAIL, CloseCode.INVALID_DATA, UTF8_FAILURE)]

    def _check_header(self, first: int, second: int, length: int) -> Event | None:
        """Everything that can be judged before the payload has arrived."""
        opcode = first & 0x0F
        if not second & 0x80:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "client frame not masked")
        rsv = first & 0x70
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                return (FAIL, CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if rsv:
                return (FAIL, CloseCode.PROTOCOL_ERROR, "reserved bits set on a control frame")
            if not first & 0x80:
                return (FAIL, CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                return (FAIL, CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
            return None
        if opcode > OP_BINARY:
            return (FAIL, CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if length >> 63:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "64-bit payload length with its top bit set")
        if rsv and not (rsv == 0x40 and opcode != OP_CONT and self.decompress is not None):
            return (FAIL, CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if opcode == OP_CONT:
            if self._fragments is None:
                reason = "continuation without a message to continue"
                return (FAIL, CloseCode.PROTOCOL_ERROR, reason)
        elif self._fragments is not None:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")
        if self._fragments_size + length > self.max_size:
            return (FAIL, CloseCode.MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")
        return None

    def _on_frame(self, first: int, payload: bytes) -> Event | None:
        opcode = first & 0x0F
        fin = first & 0x80
        if opcode >= OP_CLOSE:
            return self._on_control(opcode, payload)
        if opcode != OP_CONT:
            self._message_opcode = opcode
            self._compressed = bool(first & 0x40)
            if fin and self._text is None:  # the common case: a whole message in one read
                return self._message(payload, False)
        checked = self._message_opcode == OP_TEXT and not self._compressed
        if checked and (self._text is not None or not payload.isascii()):
            # (ASCII so far needs no decoder: it leaves no code point half done.)
            if self._text is None:
                self._text = _Utf8Decoder()
            done = self._checked
            self._checked = self._text_at = 0
            if not utf8_goes_on(self._text, payload[done:] if done else payload, bool(fin)):
                return (FAIL, CloseCode.INVALID_DATA, UTF8_FAILURE)
            if fin:
                self._text = None
        if not fin:
            if self._fragments is None:
                self._fragments = [payload]
            else:
                self._fragments.append(payload)
            self._fragments_size += len(payload) + FRAME_COST
            return None
        if self._fragments is not None:
            self._fragments.append(payload)
            payload = b"".join(self._fragments)
            self._fragments = None
            self._fragments_size = 0
        return self._message(payload, checked)

    def _message(self, payload: bytes, checked: bool) -> Event:
        opcode = self._message_opcode
        if self._compressed:
            assert self.decompress is not None
            try:
                payload = self.decompress(payload)
            except zlib.error as error:
                return (FAIL, CloseCode.INVALID_DATA, f"cannot inflate: {error}")
            except ValueError as error:
                return (FAIL, CloseCode.MESSAGE_TOO_BIG, str(error))
        if opcode == OP_TEXT and not checked and not is_utf8(payload):
            return (FAIL, CloseCode.INVALID_DATA, UTF8_FAILURE)
        return (MESSAGE, opcode, payload)

    @staticmethod
    def _on_control(opcode: int, payload: bytes) -> Event:
        if opcode == OP_PING:
            return (PING, 0, payload)
        if opcode == OP_PONG:
            return (PONG, 0, payload)
        if not payload:
            return (CLOSE, CloseCode.NO_STATUS, b"")
        if len(payload) == 1:
            return (FAIL, CloseCode.PROTOCOL_ERROR, "close payload of one byte")
        code = int.from_bytes(payload[:2], "big")
        if not close_code_allowed(code):
            return (FAIL, CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        reason = payload[2:]
        if not is_utf8(reason):
            return (FAIL, CloseCode.INVALID_DATA, "close reason is not valid UTF-8")
        return (CLOSE, code, reason)


# The first two bytes of an unmasked, final, uncompressed server frame of under 126 bytes,
# by payload length: such a message is framed with a lookup and one concatenation.
SHORT_TEXT_HEADERS: Final = tuple(bytes((0x80 | OP_TEXT, n)) for n in range(126))
SHORT_BINARY_HEADERS: Final = tuple(bytes((0x80 | OP_BINARY, n)) for n in range(126))


def encode_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One unmasked, final server frame."""
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def encode_close(code: int | None, reason: str = "") -> bytes:
    """A close frame; its reason is cut so the payload stays within 125 bytes."""
    if code is None:
        return encode_frame(OP_CLOSE, b"")
    body = reason.encode()[:123]
    while not is_utf8(body):  # never cut a code point in half
        body = body[:-1]
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + body)

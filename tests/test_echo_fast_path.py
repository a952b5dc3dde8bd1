"""The short-message fast paths of the echo: the parser's inline frame, the framing table,
the echo handler's inline counting.

The parser judges a whole short text or binary frame inline and hands everything else to
its general path. Encoding a frame's length in the 16-bit form (legal, and never taken by
the inline path) sends the same frames down the general path, so every stream of frames,
valid or not, must give the same events both ways, whole or split anywhere. The server
end to end (a real process, raw frames): short and boundary-sized replies, text that is
not UTF-8 (1007), the metrics counts.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from echoserver.wire.deflate import Deflater
from echoserver.wire.framing import (
    CLOSE,
    FAIL,
    MESSAGE,
    OP_BINARY,
    OP_TEXT,
    CloseCode,
    FrameParser,
    encode_frame,
    python_unmask,
)
from echoserver.wire.protocol import ServerProtocol
from tests.conftest import metric
from tests.servers import ServerProcess
from tests.wsraw import RawClient, close_payload

pytestmark = pytest.mark.timeout(60)

MASK = b"\x11\x7f\xa0\x05"


def client_frame(first: int, payload: bytes, *, masked: bool, wide: bool) -> bytes:
    """One client frame; `wide`: its length in the 16-bit form even when under 126."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126 and not wide:
        header = bytes((first, mask_bit | length))
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    return header + MASK + python_unmask(MASK, payload)


TEXTS = st.one_of(
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),  # mostly not UTF-8
    st.sampled_from([b"\xed\xa0\x80", b"caf\xc3", b"\xc3\xa9t\xc3\xa9", b"x" * 125, b"y" * 126]),
)
FRAMES = st.lists(
    st.tuples(
        # the first byte (FIN, RSV, opcode), mostly one of the common frames
        st.one_of(
            st.sampled_from([0x81, 0x82, 0x01, 0x02, 0x00, 0x80, 0x89, 0x8A, 0x88, 0xC1, 0x83]),
            st.integers(0, 255),
        ),
        TEXTS,
        st.integers(0, 20).map(lambda n: n != 0),  # masked, nearly always
    ),
    max_size=8,
)


def parse(
    frames: list[tuple[int, bytes, bool]], wide: bool, max_size: int, cuts: list[int]
) -> list:
    """The events of `frames` (lengths in the 16-bit form when `wide`), fed in pieces cut
    at `cuts`."""
    stream = b"".join(
        client_frame(first, payload, masked=masked, wide=wide) for first, payload, masked in frames
    )
    parser = FrameParser(max_size)
    events = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        events += parser.receive(stream[start:cut])
        start = cut
    # Up to the peer's close frame: the protocol reads nothing after it (a parser given
    # more bytes after it, in a later call, would go on).
    kinds = [event[0] for event in events]
    return events[: kinds.index(CLOSE) + 1] if CLOSE in kinds else events


@settings(deadline=None, max_examples=400)
# a frame after the peer's close, cut off where the close frame ends
@example(
    frames=[(0x81, b"", True), (0x81, b"0", True), (0x88, b"", True), (0x81, b"", False)],
    max_size=0,
    cuts=[19],
)
# a new message inside a fragmented one (binary, and text still ASCII), then what follows it
@example(frames=[(0x02, b"ab", True), (0x82, b"c", True), (0x80, b"", True)], max_size=99, cuts=[])
@example(frames=[(0x01, b"ab", True), (0x81, b"c", True)], max_size=99, cuts=[5])
@example(frames=[(0x82, b"abcd", True), (0x81, b"abc\xff", True)], max_size=3, cuts=[])
# text checked as it came in (cut after its first character), then a fragmented one
@example(
    frames=[(0x81, "éé".encode(), True), (0x01, b"\xc3", True), (0x80, b"\xa9", True)],
    max_size=99,
    cuts=[8],
)
@given(
    frames=FRAMES,
    max_size=st.sampled_from([0, 3, 30, 125, 1 << 20]),
    cuts=st.lists(st.integers(0, 2000), max_size=4),
)
def test_inline_and_general_paths_give_the_same_events(frames, max_size, cuts):
    fast = parse(frames, False, max_size, [])
    assert parse(frames, False, max_size, cuts) == fast
    if all(masked for _, _, masked in frames):
        # (An unmasked frame's wide header is judged only once 8 bytes, the size of a
        # masked one, are in: at the end of the stream it would wait for more.)
        assert parse(frames, True, max_size, []) == fast
        assert parse(frames, True, max_size, cuts) == fast


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"plain", [(MESSAGE, OP_TEXT, b"plain")]),
        ("été".encode(), [(MESSAGE, OP_TEXT, "été".encode())]),
        (b"\xff", [(FAIL, CloseCode.INVALID_DATA, "text message is not valid UTF-8")]),
        (b"\xed\xa0\x80", [(FAIL, CloseCode.INVALID_DATA, "text message is not valid UTF-8")]),
    ],
)
def test_short_text_is_checked_for_utf8(payload, expected):
    frame = client_frame(0x81, payload, masked=True, wide=False)
    assert FrameParser(1 << 20).receive(frame) == expected


def test_after_an_invalid_short_text_only_control_frames_count():
    parser = FrameParser(1 << 20)
    stream = (
        client_frame(0x81, b"\xff", masked=True, wide=False)
        + client_frame(0x82, b"dropped", masked=True, wide=False)
        + client_frame(0x88, close_payload(1000), masked=True, wide=False)
    )
    events = parser.receive(stream)
    assert [kind for kind, _, _ in events] == [FAIL, CLOSE]


def test_the_size_limit_holds_for_short_frames():
    parser = FrameParser(4)
    assert parser.receive(client_frame(0x82, b"abcd", masked=True, wide=False)) == [
        (MESSAGE, OP_BINARY, b"abcd")
    ]
    assert parser.receive(client_frame(0x82, b"abcde", masked=True, wide=False)) == [
        (FAIL, CloseCode.MESSAGE_TOO_BIG, "message over 4 bytes")
    ]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("deflate", [False, True])
def test_queued_frames_are_the_encoders_for_every_length(binary, deflate):
    def protocol() -> ServerProtocol:
        return ServerProtocol(FrameParser(1 << 20), Deflater(15, False, 6, 8) if deflate else None)

    for length in (0, 1, 100, 125, 126, 127, 65535, 65536):
        payload = b"a" * length
        queued, reference = protocol(), protocol()
        queued.send_message(payload, binary)
        expected = reference.encode(payload, binary)
        if not deflate:
            assert expected == encode_frame(OP_BINARY if binary else OP_TEXT, payload)
        assert queued.data_to_send() == expected


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(["--mode", "echo"]).wait_ready()
    yield process
    process.stop()


def test_echo_replies_and_counts_short_and_long_messages(server):
    before_in = metric(server, "echoserver_messages_received_total")
    before_out = metric(server, "echoserver_messages_sent_total")
    before_bytes = metric(server, "echoserver_sent_bytes_total")
    client = RawClient(server.port)
    try:
        sent = 0
        size = 0
        for length in (0, 1, 32, 125, 126, 200, 70_000):
            for opcode in (OP_TEXT, OP_BINARY):
                payload = b"\x00" * length
                if opcode == OP_TEXT:  # two-byte characters when they fit exactly
                    payload = b"a" * length if length % 2 else ("é" * length).encode()[:length]
                client.send(client_frame(0x80 | opcode, payload, masked=True, wide=False))
                assert client.recv_frame() == (True, opcode, payload)
                sent += 1
                size += length
        # Several short frames in one write: one reply each, in order.
        burst = [b"one", b"two", "trois é".encode()]
        client.send(b"".join(client_frame(0x81, p, masked=True, wide=False) for p in burst))
        for payload in burst:
            assert client.recv_frame() == (True, OP_TEXT, payload)
        sent += 3
        size += sum(map(len, burst))
    finally:
        client.close()
    assert metric(server, "echoserver_messages_received_total") - before_in == sent
    assert metric(server, "echoserver_messages_sent_total") - before_out == sent
    assert metric(server, "echoserver_sent_bytes_total") - before_bytes == size


def test_echo_closes_on_short_text_that_is_not_utf8(server):
    client = RawClient(server.port)
    try:
        client.send(
            client_frame(0x81, b"fine", masked=True, wide=False)
            + client_frame(0x81, b"bad \xff", masked=True, wide=False)
            + client_frame(0x81, b"never echoed", masked=True, wide=False)
        )
        assert client.recv_frame() == (True, OP_TEXT, b"fine")
        assert client.recv_close_code() == CloseCode.INVALID_DATA
        with contextlib.suppress(OSError):
            client.send(client_frame(0x88, close_payload(1000), masked=True, wide=False))
    finally:
        client.close()

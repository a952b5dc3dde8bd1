"""The frame parser and encoders on their own: no socket, no loop."""

from __future__ import annotations

import struct

import pytest

from echoserver.wire.framing import (
    CLOSE,
    FAIL,
    MESSAGE,
    OP_BINARY,
    OP_TEXT,
    PING,
    FrameParser,
    close_code_allowed,
    encode_close,
    encode_frame,
)
from tests.wsraw import build_frame, close_payload


def parse_all(parser: FrameParser, data: bytes, chunk: int) -> list:
    events = []
    for start in range(0, len(data), chunk):
        events += parser.receive(data[start : start + chunk])
    return events


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100_000])
def test_any_split_of_the_byte_stream_gives_the_same_events(chunk):
    stream = (
        build_frame(OP_TEXT, b"hello")
        + build_frame(OP_BINARY, bytes(range(256)) * 300)  # 64-bit length
        + build_frame(OP_TEXT, b"frag", fin=False)
        + build_frame(0x9, b"p")
        + build_frame(0x0, b"mented")
        + build_frame(OP_BINARY, b"x" * 200)  # 16-bit length
        + build_frame(0x8, close_payload(1000, b"bye"))
    )
    events = parse_all(FrameParser(1 << 20), stream, chunk)
    assert events == [
        (MESSAGE, OP_TEXT, b"hello"),
        (MESSAGE, OP_BINARY, bytes(range(256)) * 300),
        (PING, 0, b"p"),
        (MESSAGE, OP_TEXT, b"fragmented"),
        (MESSAGE, OP_BINARY, b"x" * 200),
        (CLOSE, 1000, b"bye"),
    ]


def test_nothing_is_parsed_after_a_failure():
    parser = FrameParser(1 << 20)
    events = parser.receive(build_frame(OP_TEXT, b"a", masked=False) + build_frame(OP_TEXT, b"b"))
    assert [kind for kind, _, _ in events] == [FAIL]
    assert parser.receive(build_frame(OP_TEXT, b"c")) == []


def test_the_size_limit_is_judged_from_the_header_alone():
    parser = FrameParser(100)
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, 10**9) + b"mask"
    assert parser.receive(header) == [(FAIL, 1009, "message over 100 bytes")]


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_encoded_frames_use_the_shortest_length_form(length):
    frame = encode_frame(OP_BINARY, b"z" * length)
    second = frame[1]
    if length < 126:
        assert second == length and len(frame) == 2 + length
    elif length < 65536:
        assert second == 126 and struct.unpack("!H", frame[2:4])[0] == length
    else:
        assert second == 127 and struct.unpack("!Q", frame[2:10])[0] == length
    assert frame[0] == 0x82
    assert frame.endswith(b"z" * length)


def test_close_reason_is_cut_within_125_bytes_without_splitting_a_character():
    frame = encode_close(1001, "\u20ac" * 100)  # 300 bytes of UTF-8
    payload = frame[2:]
    assert len(payload) <= 125
    assert struct.unpack("!H", payload[:2])[0] == 1001
    payload[2:].decode()  # still valid UTF-8


@pytest.mark.parametrize(
    ("code", "allowed"),
    [(999, False), (1000, True), (1003, True), (1004, False), (1005, False), (1006, False),
     (1007, True), (1014, True), (1015, False), (2999, False), (3000, True), (4999, True),
     (5000, False)],
)  # fmt: skip
def test_close_codes_allowed_on_the_wire(code, allowed):
    assert close_code_allowed(code) is allowed


# --- UTF-8 checked as text arrives (Autobahn 6.4.1-6.4.4, strict) ---------------------------

KOSME = "\u03ba\u1f79\u03c3\u03bc\u03b5".encode()  # valid
BAD_TAIL = b"\xf4\x90\x80\x80"  # beyond U+10FFFF: invalid from its second byte


@pytest.mark.parametrize(
    "fragments",
    [
        [KOSME, BAD_TAIL, b"edited"],  # 6.4.1: the bad code point in a fragment of its own
        [KOSME + BAD_TAIL[:1], BAD_TAIL[1:2], BAD_TAIL[2:] + b"edited"],  # 6.4.2: split
        [KOSME, b"\xed\xa0\x80", b"edited"],  # a UTF-16 surrogate
    ],
)
def test_invalid_text_fails_at_the_fragment_that_breaks_it(fragments):
    parser = FrameParser(1 << 20)
    assert parser.receive(build_frame(OP_TEXT, fragments[0], fin=False)) == []
    events = parser.receive(build_frame(0x0, fragments[1], fin=False))
    assert events == [(FAIL, 1007, "text message is not valid UTF-8")]
    assert parser.receive(build_frame(0x0, fragments[2])) == []  # failed: nothing more


@pytest.mark.parametrize("fin", [True, False])
def test_invalid_text_fails_before_its_frame_has_fully_arrived(fin):
    """6.4.3/6.4.4: one frame sent in pieces; the bad bytes are in the first piece."""
    frame = build_frame(OP_TEXT, KOSME + BAD_TAIL + b"edited" * 100, fin=fin)
    parser = FrameParser(1 << 20)
    cut = 8 + len(KOSME)  # header (16-bit length) and the valid text: still fine
    assert parser.receive(frame[:cut]) == []
    assert parser.receive(frame[cut : cut + 2]) == [(FAIL, 1007, "text message is not valid UTF-8")]


def test_invalid_text_in_a_continuation_frame_split_across_reads():
    parser = FrameParser(1 << 20)
    assert parser.receive(build_frame(OP_TEXT, b"ok ", fin=False)) == []
    frame = build_frame(0x0, b"fine " + b"\xff" + b"x" * 300)  # 16-bit length
    assert parser.receive(frame[:9]) == []  # header and one byte of text
    assert parser.receive(frame[9:15]) == [(FAIL, 1007, "text message is not valid UTF-8")]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_valid_text_split_anywhere_is_one_message(chunk):
    text = ("\u20ac\U0001f600 caf\u00e9 " * 40).encode()
    stream = (
        build_frame(OP_TEXT, text[:101], fin=False)
        + build_frame(0x9, b"p")
        + build_frame(0x0, text[101:203], fin=False)
        + build_frame(0x0, text[203:])
        + build_frame(OP_TEXT, text)
        + build_frame(OP_BINARY, b"\xff" * 300)
    )
    events = parse_all(FrameParser(1 << 20), stream, chunk)
    assert events == [
        (PING, 0, b"p"),
        (MESSAGE, OP_TEXT, text),
        (MESSAGE, OP_TEXT, text),
        (MESSAGE, OP_BINARY, b"\xff" * 300),
    ]


def test_text_cut_in_the_middle_of_a_code_point_fails_at_the_final_fragment():
    parser = FrameParser(1 << 20)
    assert parser.receive(build_frame(OP_TEXT, b"price \xe2\x82", fin=False)) == []
    assert parser.receive(build_frame(0x0, b"")) == [
        (FAIL, 1007, "text message is not valid UTF-8")
    ]

"""The frame parser and encoders on their own: no socket, no loop."""

from __future__ import annotations

import struct

import pytest

from echoserver.protocol import (
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

"""The connection's protocol state machine without a socket: every raw-socket RFC case of
tests/test_rfc.py, plus the closing handshake, as fast unit tests.

Each case feeds client frames to a ServerProtocol and reads what it queued to send back:
the pong, the echoed close, or the failure's close frame.
"""

from __future__ import annotations

import struct

import pytest

from echoserver.wire.framing import MESSAGE, PONG, Event, FrameParser
from echoserver.wire.protocol import CLOSED, CLOSING, OPEN, ServerProtocol
from tests.wsraw import build_frame, close_payload

MAX_SIZE = 4096


def new_protocol() -> ServerProtocol:
    return ServerProtocol(FrameParser(MAX_SIZE))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in data."""
    frames = []
    pos = 0
    while pos < len(data):
        opcode = data[pos] & 0x0F
        length = data[pos + 1] & 0x7F
        header = 2
        if length == 126:
            length = struct.unpack("!H", data[pos + 2 : pos + 4])[0]
            header = 4
        elif length == 127:
            length = struct.unpack("!Q", data[pos + 2 : pos + 10])[0]
            header = 10
        frames.append((opcode, data[pos + header : pos + header + length]))
        pos += header + length
    return frames


def drive(protocol: ServerProtocol, data: bytes) -> list[Event]:
    """What the I/O adapter does with a read: the application's events, control handled."""
    for_application = []
    for event in protocol.receive(data):
        if event[0] in (MESSAGE, PONG):
            for_application.append(event)
        elif protocol.handle(event):
            break
    return for_application


def sent(protocol: ServerProtocol) -> list[tuple[int, bytes]]:
    return server_frames(protocol.take_output()) if protocol.out else []


def close_code_of(frames: list[tuple[int, bytes]]) -> int | None:
    (opcode, payload) = frames[-1]
    assert opcode == 0x8, frames
    return struct.unpack("!H", payload[:2])[0] if payload else None


def fails_with(data: bytes, code: int) -> None:
    protocol = new_protocol()
    assert drive(protocol, data) == []
    assert close_code_of(sent(protocol)) == code
    assert protocol.state == CLOSING
    assert protocol.close_code == code


# --- 1002 ------------------------------------------------------------------------------


def test_unmasked_client_frame() -> None:
    fails_with(build_frame(0x1, b"hello", masked=False), 1002)


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
def test_reserved_bits(rsv: int) -> None:
    fails_with(build_frame(0x1, b"hello", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(opcode: int) -> None:
    fails_with(build_frame(opcode, b""), 1002)


def test_control_frame_over_125_bytes() -> None:
    fails_with(build_frame(0x9, b"x" * 126), 1002)


def test_fragmented_control_frame() -> None:
    fails_with(build_frame(0x9, b"ping", fin=False), 1002)


def test_continuation_without_a_start() -> None:
    fails_with(build_frame(0x0, b"orphan"), 1002)


def test_new_message_inside_a_fragmented_one() -> None:
    fails_with(build_frame(0x1, b"first half", fin=False) + build_frame(0x1, b"intruder"), 1002)


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_invalid_close_codes(code: int) -> None:
    fails_with(build_frame(0x8, close_payload(code)), 1002)


def test_payload_length_with_the_top_bit_set() -> None:
    fails_with(bytes([0x82, 0x80 | 127]) + (1 << 63).to_bytes(8, "big") + b"mask", 1002)


def test_one_byte_close_payload() -> None:
    fails_with(build_frame(0x8, b"\x03"), 1002)


# --- 1007 and 1009 ---------------------------------------------------------------------


def test_invalid_utf8_text() -> None:
    fails_with(
        build_frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80ed"), 1007
    )


def test_code_point_split_across_fragments_is_fine_when_valid() -> None:
    euro = "\u20ac".encode()
    protocol = new_protocol()
    events = drive(
        protocol,
        build_frame(0x1, b"price " + euro[:1], fin=False)
        + build_frame(0x0, euro[1:2], fin=False)
        + build_frame(0x0, euro[2:] + b"!"),
    )
    assert events == [(MESSAGE, 0x1, "price \u20ac!".encode())]


def test_code_point_split_across_fragments_invalid_once_joined() -> None:
    fails_with(build_frame(0x1, b"bad \xf0\x90", fin=False) + build_frame(0x0, b"\x28\x8c"), 1007)


@pytest.mark.parametrize(
    "fragments",
    [
        [b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", b"\xf4\x90\x80\x80"],  # 6.4.1
        [b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4", b"\x90"],  # 6.4.2
    ],
)
def test_invalid_utf8_fails_before_the_final_fragment(fragments: list[bytes]) -> None:
    fails_with(
        build_frame(0x1, fragments[0], fin=False) + build_frame(0x0, fragments[1], fin=False),
        1007,
    )


def test_invalid_utf8_fails_before_its_frame_has_fully_arrived() -> None:
    broken = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90"
    frame = build_frame(0x1, broken + b"x" * 200)
    fails_with(frame[: 8 + len(broken)], 1007)


def test_invalid_utf8_close_reason() -> None:
    fails_with(build_frame(0x8, close_payload(1000, b"\xff\xfe")), 1007)


def test_message_over_the_limit() -> None:
    fails_with(build_frame(0x2, b"x" * (MAX_SIZE + 1)), 1009)


def test_fragments_adding_up_over_the_limit() -> None:
    half = b"x" * (MAX_SIZE // 2 + 1)
    fails_with(build_frame(0x2, half, fin=False) + build_frame(0x0, half), 1009)


def test_message_at_the_limit_is_fine() -> None:
    protocol = new_protocol()
    assert drive(protocol, build_frame(0x2, b"y" * MAX_SIZE)) == [(MESSAGE, 0x2, b"y" * MAX_SIZE)]


# --- what must work --------------------------------------------------------------------


def test_ping_gets_a_pong_with_the_same_payload() -> None:
    protocol = new_protocol()
    assert drive(protocol, build_frame(0x9, b"are you there")) == []
    assert sent(protocol) == [(0xA, b"are you there")]


def test_ping_between_fragments() -> None:
    protocol = new_protocol()
    events = drive(
        protocol,
        build_frame(0x1, b"frag", fin=False) + build_frame(0x9, b"p") + build_frame(0x0, b"ment"),
    )
    assert events == [(MESSAGE, 0x1, b"fragment")]
    assert sent(protocol) == [(0xA, b"p")]


def test_unsolicited_pong_reaches_the_application() -> None:
    protocol = new_protocol()
    events = drive(protocol, build_frame(0xA, b"nobody asked") + build_frame(0x1, b"after"))
    assert events == [(PONG, 0, b"nobody asked"), (MESSAGE, 0x1, b"after")]


def test_pipelined_messages_in_order() -> None:
    protocol = new_protocol()
    data = b"".join(build_frame(0x1, f"msg {n}".encode()) for n in range(200))
    assert [e[2] for e in drive(protocol, data)] == [f"msg {n}".encode() for n in range(200)]


def test_frames_split_at_every_byte_still_parse() -> None:
    protocol = new_protocol()
    events = []
    for byte in build_frame(0x2, bytes(range(200))):
        events += drive(protocol, bytes([byte]))
    assert events == [(MESSAGE, 0x2, bytes(range(200)))]


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_valid_close_is_echoed(code: int) -> None:
    protocol = new_protocol()
    assert drive(protocol, build_frame(0x8, close_payload(code, b"bye"))) == []
    assert close_code_of(sent(protocol)) == code
    assert protocol.state == CLOSED
    assert (protocol.close_code, protocol.close_reason) == (code, "bye")


def test_empty_close_gets_an_empty_close() -> None:
    protocol = new_protocol()
    drive(protocol, build_frame(0x8, b""))
    assert close_code_of(sent(protocol)) is None
    assert protocol.state == CLOSED
    assert protocol.close_code == 1005


# --- the closing handshake -------------------------------------------------------------


def test_after_our_close_data_is_discarded_until_the_peers_close() -> None:
    protocol = new_protocol()
    protocol.close(1001, "server shutting down")
    assert close_code_of(sent(protocol)) == 1001
    assert protocol.state == CLOSING and not protocol.discarding
    assert drive(protocol, build_frame(0x1, b"late") + build_frame(0x9, b"p")) == []
    assert sent(protocol) == []  # no echo, no pong once closing
    drive(protocol, build_frame(0x8, close_payload(1001)))
    assert protocol.state == CLOSED
    assert sent(protocol) == []  # the peer's close answers ours: nothing more to send
    assert protocol.close_code == 1001


def test_a_failure_leaves_the_stream_unparseable() -> None:
    protocol = new_protocol()
    drive(protocol, build_frame(0x1, b"x", masked=False))
    assert protocol.discarding  # the adapter waits for the peer to fall quiet
    drive(protocol, build_frame(0x8, close_payload(1002)))
    assert protocol.state == CLOSING  # its close frame cannot be told from garbage


def test_close_is_sent_once() -> None:
    protocol = new_protocol()
    protocol.close(1000)
    protocol.close(1011)
    protocol.fail(1002, "again")
    assert [close_code_of([f]) for f in sent(protocol)] == [1000]


def test_no_close_at_all_is_1006() -> None:
    assert new_protocol().close_code == 1006
    assert new_protocol().state == OPEN


def test_give_up_ends_a_close_the_peer_never_answers() -> None:
    protocol = new_protocol()
    protocol.close(1013, "receiving too slowly")
    protocol.give_up()
    assert protocol.state == CLOSED
    assert protocol.close_code == 1013

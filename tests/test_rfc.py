"""Strict RFC 6455 over a raw socket against a real server (Autobahn families 1-7, 9, 10).

Each case sends hand-built frames and checks the close code the server answers with, and
that a bystander connection keeps working.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT, ServerProcess
from tests.wsraw import RawClient, build_frame, close_payload

MAX_SIZE = 4096


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(
        # No keepalive pings: RawClient shows every frame, and this server serves many cases.
        ["--mode", "echo", "--max-message-size", str(MAX_SIZE), "--ping-interval", "0"],
        None,
        ROOT,
        sys.executable,
    )
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture
def client(server):
    raw = RawClient(server.port)
    assert raw.status == 101
    yield raw
    raw.close()


@pytest.fixture
def bystander(server):
    """Another client, open across the case: it must be untouched."""
    raw = RawClient(server.port)
    yield raw
    raw.send_frame(0x1, b"still fine")
    assert raw.recv_frame() == (True, 0x1, b"still fine")
    raw.close()


def assert_fails_with(client: RawClient, code: int) -> None:
    assert client.recv_close_code() == code
    assert client.at_eof()


# --- 1002: protocol errors -------------------------------------------------------------------


def test_unmasked_client_frame(client, bystander):
    client.send_frame(0x1, b"hello", masked=False)
    assert_fails_with(client, 1002)


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
def test_reserved_bits(client, bystander, rsv):
    client.send_frame(0x1, b"hello", rsv=rsv)
    assert_fails_with(client, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(client, bystander, opcode):
    client.send_frame(opcode, b"")
    assert_fails_with(client, 1002)


def test_control_frame_over_125_bytes(client, bystander):
    client.send_frame(0x9, b"x" * 126)
    assert_fails_with(client, 1002)


def test_fragmented_control_frame(client, bystander):
    client.send_frame(0x9, b"ping", fin=False)
    assert_fails_with(client, 1002)


def test_continuation_without_a_start(client, bystander):
    client.send_frame(0x0, b"orphan")
    assert_fails_with(client, 1002)


def test_new_message_inside_a_fragmented_one(client, bystander):
    client.send_frame(0x1, b"first half", fin=False)
    client.send_frame(0x1, b"intruder")
    assert_fails_with(client, 1002)


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_invalid_close_codes(client, bystander, code):
    client.send_frame(0x8, close_payload(code))
    assert_fails_with(client, 1002)


def test_payload_length_with_the_top_bit_set(client, bystander):
    client.send(bytes([0x82, 0x80 | 127]) + (1 << 63).to_bytes(8, "big") + b"mask")
    assert_fails_with(client, 1002)


def test_one_byte_close_payload(client, bystander):
    client.send_frame(0x8, b"\x03")
    assert_fails_with(client, 1002)


# --- 1007 and 1009 ---------------------------------------------------------------------------


def test_invalid_utf8_text(client, bystander):
    client.send_frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")
    assert_fails_with(client, 1007)


def test_code_point_split_across_fragments_is_fine_when_valid(client):
    euro = "\u20ac".encode()  # three bytes
    client.send_frame(0x1, b"price " + euro[:1], fin=False)
    client.send_frame(0x0, euro[1:2], fin=False)
    client.send_frame(0x0, euro[2:] + b"!")
    assert client.recv_frame() == (True, 0x1, "price \u20ac!".encode())


def test_code_point_split_across_fragments_invalid_once_joined(client, bystander):
    client.send_frame(0x1, b"bad \xf0\x90", fin=False)
    client.send_frame(0x0, b"\x28\x8c")  # a broken 4-byte sequence
    assert_fails_with(client, 1007)


@pytest.mark.parametrize(
    "fragments",
    [
        [b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", b"\xf4\x90\x80\x80"],  # 6.4.1
        [b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4", b"\x90"],  # 6.4.2
    ],
)
def test_invalid_utf8_fails_before_the_final_fragment_is_sent(client, bystander, fragments):
    """Strict (Autobahn 6.4.x): the 1007 comes at the fragment that broke the text; the
    final fragment is never sent."""
    client.send_frame(0x1, fragments[0], fin=False)
    client.send_frame(0x0, fragments[1], fin=False)
    assert client.recv_close_code() == 1007


def test_invalid_utf8_fails_before_its_frame_has_fully_arrived(client, bystander):
    """Autobahn 6.4.3: one text frame sent in pieces; its rest is never sent."""
    broken = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90"  # invalid at its end
    frame = build_frame(0x1, broken + b"x" * 200)
    client.send(frame[: 8 + len(broken)])  # the 16-bit-length header and the broken text
    assert client.recv_close_code() == 1007


def test_invalid_utf8_close_reason(client, bystander):
    client.send_frame(0x8, close_payload(1000, b"\xff\xfe"))
    assert_fails_with(client, 1007)


def test_message_over_the_limit(client, bystander):
    client.send_frame(0x2, b"x" * (MAX_SIZE + 1))
    assert_fails_with(client, 1009)


def test_fragments_adding_up_over_the_limit(client, bystander):
    client.send_frame(0x2, b"x" * (MAX_SIZE // 2 + 1), fin=False)
    client.send_frame(0x0, b"x" * (MAX_SIZE // 2 + 1))
    assert_fails_with(client, 1009)


def test_message_at_the_limit_is_fine(client):
    client.send_frame(0x2, b"y" * MAX_SIZE)
    assert client.recv_frame() == (True, 0x2, b"y" * MAX_SIZE)


# --- what must work --------------------------------------------------------------------------


def test_ping_gets_a_pong_with_the_same_payload(client):
    client.send_frame(0x9, b"are you there")
    assert client.recv_frame() == (True, 0xA, b"are you there")


def test_ping_between_fragments(client):
    client.send_frame(0x1, b"frag", fin=False)
    client.send_frame(0x9, b"p")
    client.send_frame(0x0, b"ment")
    assert client.recv_frame() == (True, 0xA, b"p")
    assert client.recv_frame() == (True, 0x1, b"fragment")


def test_unsolicited_pong_is_ignored(client):
    client.send_frame(0xA, b"nobody asked")
    client.send_frame(0x1, b"after pong")
    assert client.recv_frame() == (True, 0x1, b"after pong")


def test_pipelined_messages_answered_in_order(client):
    frames = b"".join(build_frame(0x1, f"msg {n}".encode()) for n in range(200))
    client.send(frames)
    for n in range(200):
        assert client.recv_frame() == (True, 0x1, f"msg {n}".encode())


def test_frames_sent_with_the_handshake_are_answered(server):
    early = b"".join(build_frame(0x1, f"early {n}".encode()) for n in range(3))
    raw = RawClient(server.port, with_request=early)
    assert raw.status == 101
    for n in range(3):
        assert raw.recv_frame() == (True, 0x1, f"early {n}".encode())
    raw.close()


def test_frames_split_at_every_byte_still_parse(client):
    frame = build_frame(0x2, bytes(range(200)))
    for byte in frame:
        client.send(bytes([byte]))
    assert client.recv_frame() == (True, 0x2, bytes(range(200)))


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_valid_close_is_echoed(client, code):
    client.send_frame(0x8, close_payload(code, b"bye"))
    assert client.recv_close_code() == code
    assert client.at_eof()


def test_empty_close_gets_an_empty_close(client):
    client.send_frame(0x8, b"")
    assert client.recv_close_code() is None
    assert client.at_eof()


def test_protocol_errors_are_logged(server):
    raw = RawClient(server.port)
    raw.send_frame(0x1, b"x", masked=False)
    assert raw.recv_close_code() == 1002
    raw.close()
    from tests.conftest import wait_until

    assert wait_until(lambda: "with 1002: client frame not masked" in server.log())

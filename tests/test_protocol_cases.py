"""One table of RFC 6455 protocol cases (Autobahn families 1-7, 9, 10), run at three levels:

- the sans-I/O state machine (ServerProtocol, fed the bytes whole and as sent);
- an in-process server (pytest-tornado's app), over a raw socket;
- a server subprocess (`python -m echoserver`), over a raw socket (tests/wsraw.py).

A case is the bytes a client sends (one write each) and what the echo server must answer:
its frames in order, then its close code (None: an empty close; NO_CLOSE: none), who
closed, and whether the server then closes the TCP connection promptly. At the socket
levels a bystander connection must be untouched by the case. The closing handshake's
own rules (state only) and what only a socket can show follow the table.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import tornado.ioloop

from echoserver.config import Settings
from echoserver.wire.framing import FAIL, MESSAGE, OP_BINARY, PONG, FrameParser
from echoserver.wire.protocol import CLOSED, CLOSING, OPEN, ServerProtocol
from tests.conftest import ROOT, ServerProcess, make_settings, wait_until
from tests.wsraw import RawClient, build_frame, close_payload

MAX_SIZE = 4096
NO_CLOSE = -1  # the case ends with the connection open


@dataclass(frozen=True)
class Case:
    name: str
    sends: list[bytes]  # each one write (one read for the "as sent" state runner)
    replies: list[tuple[int, bytes]] = field(default_factory=list)  # (opcode, payload)
    close: int | None = NO_CLOSE
    by_peer: bool = False  # the peer's close, echoed (else the server closed first)
    eof: bool = True  # the server closes the TCP connection once the close is sent


def frames(*specs: tuple) -> list[bytes]:
    return [build_frame(*spec[:2], **(spec[2] if len(spec) > 2 else {})) for spec in specs]


def fails(name: str, code: int, *sends: bytes, eof: bool = True) -> Case:
    return Case(name, list(sends), close=code, eof=eof)


EURO = "\u20ac".encode()  # three bytes
KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"
BROKEN = KOSME + b"\xf4\x90"  # invalid at its end
LONG_BROKEN = build_frame(0x1, BROKEN + b"x" * 200)

CASES: list[Case] = [
    # --- 1002: protocol errors ---
    fails("unmasked", 1002, build_frame(0x1, b"hello", masked=False)),
    *(fails(f"rsv-{rsv}", 1002, build_frame(0x1, b"hello", rsv=rsv)) for rsv in range(1, 8)),
    *(
        fails(f"reserved-opcode-{op:#x}", 1002, build_frame(op, b""))
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    fails("control-over-125", 1002, build_frame(0x9, b"x" * 126)),
    fails("fragmented-control", 1002, build_frame(0x9, b"ping", fin=False)),
    fails("continuation-without-start", 1002, build_frame(0x0, b"orphan")),
    fails(
        "new-message-inside-fragmented",
        1002,
        *frames((0x1, b"first half", {"fin": False}), (0x1, b"intruder")),
    ),
    *(
        fails(f"invalid-close-code-{code}", 1002, build_frame(0x8, close_payload(code)))
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
    ),
    fails(
        "length-top-bit-set",
        1002,
        bytes([0x82, 0x80 | 127]) + (1 << 63).to_bytes(8, "big") + b"mask",
    ),
    fails("one-byte-close-payload", 1002, build_frame(0x8, b"\x03")),
    # --- 1007 and 1009 ---
    fails("invalid-utf8-text", 1007, build_frame(0x1, KOSME + b"\xed\xa0\x80edited")),
    fails(
        "code-point-split-invalid-once-joined",
        1007,
        *frames((0x1, b"bad \xf0\x90", {"fin": False}), (0x0, b"\x28\x8c")),
    ),
    # Strict (Autobahn 6.4.1, 6.4.2): the 1007 comes at the fragment that broke the text;
    # the final fragment is never sent.
    fails(
        "invalid-utf8-before-final-fragment-6.4.1",
        1007,
        *frames((0x1, KOSME, {"fin": False}), (0x0, b"\xf4\x90\x80\x80", {"fin": False})),
        eof=False,
    ),
    fails(
        "invalid-utf8-before-final-fragment-6.4.2",
        1007,
        *frames((0x1, KOSME + b"\xf4", {"fin": False}), (0x0, b"\x90", {"fin": False})),
        eof=False,
    ),
    # Autobahn 6.4.3: one text frame sent in part (its 16-bit-length header and the broken
    # text); its rest is never sent.
    fails("invalid-utf8-before-frame-arrived", 1007, LONG_BROKEN[: 8 + len(BROKEN)], eof=False),
    fails("invalid-utf8-close-reason", 1007, build_frame(0x8, close_payload(1000, b"\xff\xfe"))),
    fails("message-over-limit", 1009, build_frame(0x2, b"x" * (MAX_SIZE + 1))),
    fails(
        "fragments-over-limit",
        1009,
        *frames(
            (0x2, b"x" * (MAX_SIZE // 2 + 1), {"fin": False}), (0x0, b"x" * (MAX_SIZE // 2 + 1))
        ),
    ),
    # --- what must work ---
    Case(
        "code-point-split-valid",
        frames((0x1, b"price " + EURO[:1], {"fin": False}), (0x0, EURO[1:2], {"fin": False}))
        + frames((0x0, EURO[2:] + b"!")),
        replies=[(0x1, "price \u20ac!".encode())],
    ),
    Case("message-at-limit", frames((0x2, b"y" * MAX_SIZE)), replies=[(0x2, b"y" * MAX_SIZE)]),
    Case("ping-pong", frames((0x9, b"are you there")), replies=[(0xA, b"are you there")]),
    Case(
        "ping-between-fragments",
        frames((0x1, b"frag", {"fin": False}), (0x9, b"p"), (0x0, b"ment")),
        replies=[(0xA, b"p"), (0x1, b"fragment")],
    ),
    Case(
        "unsolicited-pong-ignored",
        frames((0xA, b"nobody asked"), (0x1, b"after pong")),
        replies=[(0x1, b"after pong")],
    ),
    Case(
        "pipelined-in-order",
        [b"".join(build_frame(0x1, f"msg {n}".encode()) for n in range(200))],
        replies=[(0x1, f"msg {n}".encode()) for n in range(200)],
    ),
    Case(
        "split-at-every-byte",
        [bytes([byte]) for byte in build_frame(0x2, bytes(range(200)))],
        replies=[(0x2, bytes(range(200)))],
    ),
    *(
        Case(
            f"close-{code}-echoed",
            [build_frame(0x8, close_payload(code, b"bye"))],
            close=code,
            by_peer=True,
        )
        for code in (1000, 1001, 1003, 1011, 3000, 4999)
    ),
    Case("empty-close-answered-empty", [build_frame(0x8, b"")], close=None, by_peer=True),
]
IDS = [case.name for case in CASES]


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in data."""
    found = []
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
        found.append((opcode, data[pos + header : pos + header + length]))
        pos += header + length
    return found


def close_code_of(frame: tuple[int, bytes]) -> int | None:
    opcode, payload = frame
    assert opcode == 0x8, frame
    return struct.unpack("!H", payload[:2])[0] if payload else None


# --- level 1: the state machine ----------------------------------------------------------


def new_protocol() -> ServerProtocol:
    return ServerProtocol(FrameParser(MAX_SIZE))


def echo_read(protocol: ServerProtocol, data: bytes) -> list:
    """One read as the echo server's connection handles it (connection._handle_events,
    without rate limits and awaitables): messages echoed, a failure closed with its code,
    pings and closes to the protocol, in order; returns the application's events."""
    for_application = []
    events = protocol.receive(data)
    for index, event in enumerate(events):
        kind, arg, payload = event
        if kind == MESSAGE:
            for_application.append(event)
            protocol.send_message(payload, arg == OP_BINARY)  # type: ignore[arg-type]
        elif kind == PONG:
            for_application.append(event)
        elif kind == FAIL:
            protocol.close(arg, payload)  # type: ignore[arg-type]
            protocol.after_close(events[index + 1 :])
            break
        elif protocol.handle(event):  # the peer's close
            break
    return for_application


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "as-sent"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_machine(case: Case, whole: bool) -> None:
    protocol = new_protocol()
    for data in [b"".join(case.sends)] if whole else case.sends:
        echo_read(protocol, data)
    sent = server_frames(protocol.data_to_send())
    if case.close == NO_CLOSE:
        assert sent == case.replies
        assert protocol.state == OPEN
        assert protocol.close_code == 1006
        return
    assert sent[:-1] == case.replies
    assert close_code_of(sent[-1]) == case.close
    assert protocol.state == (CLOSED if case.by_peer else CLOSING)
    assert protocol.close_code == (1005 if case.close is None else case.close)


# --- levels 2 and 3: a server over a raw socket ------------------------------------------


def play(port: int, case: Case) -> None:
    """The case over a raw socket, with a bystander that must be untouched."""
    bystander = RawClient(port)
    client = RawClient(port)
    try:
        assert client.status == 101
        for data in case.sends:
            client.send(data)
        for reply in case.replies:
            assert client.recv_frame() == (True, *reply)
        if case.close != NO_CLOSE:
            assert client.recv_close_code() == case.close
            if case.eof:
                assert client.at_eof()
        bystander.send_frame(0x1, b"still fine")
        assert bystander.recv_frame() == (True, 0x1, b"still fine")
    finally:
        client.close()
        bystander.close()


@pytest.fixture
def settings() -> Settings:
    return make_settings(**{"websocket.max_message_size": MAX_SIZE})


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_in_process(http_server, http_port, case: Case) -> None:
    # The raw client blocks: it runs on a thread while the server serves on this loop.
    await tornado.ioloop.IOLoop.current().run_in_executor(None, play, http_port, case)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_subprocess(server: ServerProcess, case: Case) -> None:
    play(server.port, case)


# --- the closing handshake (state machine) -----------------------------------------------


def test_unsolicited_pong_reaches_the_application() -> None:
    protocol = new_protocol()
    events = echo_read(protocol, build_frame(0xA, b"nobody asked") + build_frame(0x1, b"after"))
    assert events == [(PONG, 0, b"nobody asked"), (MESSAGE, 0x1, b"after")]


def test_after_our_close_data_is_discarded_until_the_peers_close() -> None:
    protocol = new_protocol()
    protocol.close(1001, "server shutting down")
    assert [close_code_of(f) for f in server_frames(protocol.data_to_send())] == [1001]
    assert protocol.state == CLOSING and not protocol.discarding
    assert echo_read(protocol, build_frame(0x1, b"late") + build_frame(0x9, b"p")) == []
    assert protocol.data_to_send() == b""  # no echo, no pong once closing
    echo_read(protocol, build_frame(0x8, close_payload(1001)))
    assert protocol.state == CLOSED
    assert protocol.data_to_send() == b""  # the peer's close answers ours: nothing more
    assert protocol.close_code == 1001


def test_nothing_is_queued_after_our_close_frame() -> None:
    protocol = new_protocol()
    protocol.close(1000)
    protocol.send_message(b"late", False)
    protocol.ping()
    assert [f[0] for f in server_frames(protocol.data_to_send())] == [0x8]
    assert protocol.buffered == 0


def test_a_failure_leaves_the_stream_unparseable() -> None:
    protocol = new_protocol()
    echo_read(protocol, build_frame(0x1, b"x", masked=False))
    assert protocol.discarding  # the adapter waits for the peer to fall quiet
    echo_read(protocol, build_frame(0x8, close_payload(1002)))
    assert protocol.state == CLOSING  # its close frame cannot be told from garbage


def test_close_is_sent_once() -> None:
    protocol = new_protocol()
    protocol.close(1000)
    protocol.close(1011)
    protocol.close(1002, "again")
    assert [close_code_of(f) for f in server_frames(protocol.data_to_send())] == [1000]


def test_no_close_at_all_is_1006() -> None:
    assert new_protocol().close_code == 1006
    assert new_protocol().state == OPEN


def test_end_finishes_a_close_the_peer_never_answers() -> None:
    protocol = new_protocol()
    protocol.close(1013, "receiving too slowly")
    protocol.end()
    assert protocol.state == CLOSED
    assert protocol.close_code == 1013


def test_output_is_counted_and_taken_in_one_piece() -> None:
    protocol = new_protocol()
    protocol.send_message(b"a", False)
    protocol.send_message(b"bc", True)
    assert protocol.buffered == 3 + 4
    assert protocol.data_to_send() == build_frame(0x1, b"a", masked=False) + build_frame(
        0x2, b"bc", masked=False
    )
    assert (protocol.buffered, protocol.data_to_send()) == (0, b"")


# --- what only a socket shows (subprocess) -----------------------------------------------


def test_frames_sent_with_the_handshake_are_answered(server: ServerProcess) -> None:
    early = b"".join(build_frame(0x1, f"early {n}".encode()) for n in range(3))
    raw = RawClient(server.port, with_request=early)
    assert raw.status == 101
    for n in range(3):
        assert raw.recv_frame() == (True, 0x1, f"early {n}".encode())
    raw.close()


def test_protocol_errors_are_logged(server: ServerProcess) -> None:
    raw = RawClient(server.port)
    raw.send_frame(0x1, b"x", masked=False)
    assert raw.recv_close_code() == 1002
    raw.close()
    assert wait_until(lambda: "with 1002: client frame not masked" in server.log())

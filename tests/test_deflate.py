"""permessage-deflate (RFC 7692): negotiation of every offer form, the zlib objects, and
compressed echo and broadcast end to end with the websockets library as the client."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import zlib

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from echoserver.wire.deflate import Deflater, Inflater, negotiate, parse_extensions
from echoserver.wire.framing import FAIL, MESSAGE, OP_TEXT, FrameParser
from tests.conftest import run
from tests.servers import ServerProcess
from tests.wsraw import build_frame

PMD = "permessage-deflate"
SERVER_BITS = "server_max_window_bits=12"  # the server's own window, always said
PLAIN = f"{PMD}; {SERVER_BITS}"  # the answer to a bare offer


# --- negotiation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (PMD, PLAIN),
        # client_max_window_bits without a value: the server chooses; with one: at most it
        (f"{PMD}; client_max_window_bits", f"{PLAIN}; client_max_window_bits=12"),
        (f"{PMD}; client_max_window_bits=10", f"{PLAIN}; client_max_window_bits=10"),
        (f"{PMD}; client_max_window_bits=15", f"{PLAIN}; client_max_window_bits=12"),
        (f"{PMD}; client_max_window_bits=8", f"{PLAIN}; client_max_window_bits=8"),
        # server_max_window_bits: the same or smaller (zlib cannot deflate with 8: declined)
        (f"{PMD}; server_max_window_bits=10", f"{PMD}; server_max_window_bits=10"),
        (f"{PMD}; server_max_window_bits=9", f"{PMD}; server_max_window_bits=9"),
        (f"{PMD}; server_max_window_bits=15", PLAIN),
        (f"{PMD}; server_max_window_bits=8", None),
        # the no-context-takeover flags are honoured and answered
        (
            f"{PMD}; server_no_context_takeover",
            f"{PMD}; server_no_context_takeover; server_max_window_bits=12",
        ),
        (
            f"{PMD}; client_no_context_takeover",
            f"{PMD}; client_no_context_takeover; server_max_window_bits=12",
        ),
        (
            f"{PMD}; client_no_context_takeover; server_no_context_takeover; "
            "server_max_window_bits=9; client_max_window_bits=11",
            f"{PMD}; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=9; client_max_window_bits=11",
        ),
        # quoted values and loose spacing
        (f'{PMD}; server_max_window_bits="10"', f"{PMD}; server_max_window_bits=10"),
        (f"{PMD} ;client_max_window_bits = 11", f"{PLAIN}; client_max_window_bits=11"),
        # several offers: the first acceptable one wins, other extensions are skipped
        (
            f"x-webkit-deflate-frame, {PMD}; client_no_context_takeover, {PMD}",
            f"{PMD}; client_no_context_takeover; server_max_window_bits=12",
        ),
        (f'foo; bar="a,b", {PMD}', PLAIN),  # a comma inside quotes separates nothing
        (f", , {PMD},", PLAIN),  # empty list elements are allowed
        ("", None),
        ("x-webkit-deflate-frame", None),
    ],
)
def test_offer_forms(offer, answer):
    agreement = negotiate(offer)
    assert (agreement and agreement.response()) == answer


@pytest.mark.parametrize(
    "params",
    [
        "x=1",  # unknown
        "server_no_context_takeover; server_no_context_takeover",  # repeated
        "client_max_window_bits; client_max_window_bits=10",  # repeated, other form
        "server_no_context_takeover=1",  # takes no value
        "client_no_context_takeover=true",
        "server_max_window_bits",  # needs a value
        "server_max_window_bits=16",
        "server_max_window_bits=7",
        "server_max_window_bits=010",  # leading zero
        "client_max_window_bits=abc",
        'client_max_window_bits="1 0"',  # not a token once unquoted
        "server_max_window_bits=8",  # zlib cannot deflate with a 256-byte window
    ],
)
def test_an_offer_we_cannot_honour_is_declined_and_the_next_one_tried(params):
    assert negotiate(f"{PMD}; {params}") is None
    agreement = negotiate(f"{PMD}; {params}, {PMD}; client_no_context_takeover")
    assert agreement is not None
    assert agreement.response() == f"{PMD}; client_no_context_takeover; server_max_window_bits=12"


def test_an_unclosed_quote_spoils_the_rest_of_the_header():
    assert negotiate(f'{PMD}; client_max_window_bits="10, {PMD}') is None
    assert negotiate(f'{PMD}, {PMD}; client_max_window_bits="10') is not None


def test_the_server_can_ask_for_no_context_takeover_itself():
    agreement = negotiate(PMD, server_no_context_takeover=True)
    assert agreement is not None
    assert agreement.response() == f"{PMD}; server_no_context_takeover; server_max_window_bits=12"
    assert agreement.deflater().shared


def test_parse_extensions():
    header = 'a; b; c=1; d="x\\y", bad;;, e ; f = "2"'
    assert parse_extensions(header) == [
        ("a", [("b", None), ("c", "1"), ("d", "xy")]),
        None,
        ("e", [("f", "2")]),
    ]


# --- compressing and inflating ---------------------------------------------------------------

MESSAGES = [b"", b"hello", b"hello " * 500, os.urandom(3000), b"hello " * 500]


@pytest.mark.parametrize("alone", [False, True])
def test_deflated_messages_inflate_back(alone):
    deflater = Deflater(12, alone, 6, 5)
    inflater = Inflater(12, alone, 1 << 20)
    for message in MESSAGES:
        data = deflater.compress(message)
        assert not data.endswith(b"\x00\x00\xff\xff")
        assert inflater.decompress(data) == message


def test_without_context_takeover_each_message_inflates_alone():
    """Every message after a full flush decodes with a fresh inflater, and a shared frame is
    byte for byte what a fresh compressor makes."""
    deflater = Deflater(12, True, 6, 5)
    for message in MESSAGES:
        data = deflater.compress(message)
        assert zlib.decompressobj(-12).decompress(data + b"\x00\x00\xff\xff") == message
        fresh = zlib.compressobj(6, zlib.DEFLATED, -12, 5)
        assert data == (fresh.compress(message) + fresh.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_context_takeover_compresses_repeats_better():
    deflater = Deflater(12, False, 6, 5)
    first = deflater.compress(b"the same words again " * 20)
    second = deflater.compress(b"the same words again " * 20)
    assert len(second) < len(first)


def test_inflating_is_bounded_by_the_size_limit():
    deflater = Deflater(15, False, 6, 5)
    inflater = Inflater(15, False, 1000)
    assert inflater.decompress(deflater.compress(b"a" * 1000)) == b"a" * 1000
    with pytest.raises(ValueError, match="over 1000 bytes"):
        inflater.decompress(deflater.compress(b"a" * 1001))
    with pytest.raises(ValueError):
        Inflater(15, False, 1000).decompress(Deflater(15, False, 9, 9).compress(b"\0" * 10**7))


def test_a_client_that_breaks_no_context_takeover_fails():
    client = Deflater(15, False, 6, 5)  # keeps its context although it agreed not to
    inflater = Inflater(15, True, 1 << 20)
    assert inflater.decompress(client.compress(b"repeat me " * 10)) == b"repeat me " * 10
    with pytest.raises(zlib.error):
        inflater.decompress(client.compress(b"repeat me " * 10))


def test_corrupt_data_is_a_zlib_error():
    with pytest.raises(zlib.error):
        Inflater(15, False, 1 << 20).decompress(b"\xff\xff\xff\xff")


def test_parser_inflates_compressed_frames_and_checks_the_text():
    agreement = negotiate(f"{PMD}; client_max_window_bits")
    assert agreement is not None
    inflater = agreement.inflater(100)
    client = Deflater(12, False, 6, 5)
    parser = FrameParser(100, inflater.decompress)
    frame = build_frame(OP_TEXT, client.compress("caf\u00e9".encode()), rsv=4)
    assert parser.receive(frame) == [(MESSAGE, OP_TEXT, "caf\u00e9".encode())]
    bad = build_frame(OP_TEXT, client.compress(b"\xff"), rsv=4)
    assert parser.receive(bad) == [(FAIL, 1007, "text message is not valid UTF-8")]
    parser = FrameParser(100, inflater.decompress)
    big = build_frame(OP_TEXT, client.compress(b"a" * 101), rsv=4)
    assert parser.receive(big) == [(FAIL, 1009, "message over 100 bytes once inflated")]


# --- end to end: the websockets library against the server -----------------------------------

MAX_SIZE = 65536


@pytest.fixture(scope="module")
def echo_server():
    args = ["--mode", "echo", "--compression", "--max-message-size", str(MAX_SIZE)]
    process = ServerProcess(args).wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def broadcast_server():
    args = ["--mode", "broadcast", "--compression"]
    process = ServerProcess(args).wait_ready()
    yield process
    process.stop()


def offered_answer(port: int, offer: str) -> str | None:
    """The server's Sec-WebSocket-Extensions answer to a raw handshake with this offer."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Extensions: {offer}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "closed during the handshake"
            head += chunk
    lines = head.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-extensions":
            return value.strip()
    return None


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (f"{PMD}; client_no_context_takeover", f"{PMD}; client_no_context_takeover; {SERVER_BITS}"),
        (f"{PMD}; server_no_context_takeover", f"{PMD}; server_no_context_takeover; {SERVER_BITS}"),
        (
            f"{PMD}; server_max_window_bits=8, {PMD}; client_max_window_bits",
            f"{PLAIN}; client_max_window_bits=12",
        ),
        (f"{PMD}; x=1", None),
    ],
)
def test_the_server_answers_the_offer(echo_server, offer, answer):
    assert offered_answer(echo_server.port, offer) == answer


def test_a_broadcast_server_asks_for_no_context_takeover(broadcast_server):
    answer = offered_answer(broadcast_server.port, f"{PMD}; client_max_window_bits")
    assert answer == f"{PMD}; server_no_context_takeover; {SERVER_BITS}; client_max_window_bits=12"


CLIENT_OFFERS = {
    "default": {"compression": "deflate"},
    "client_no_context_takeover": {
        "compression": None,
        "extensions": [ClientPerMessageDeflateFactory(client_no_context_takeover=True)],
    },
    "everything": {
        "compression": None,
        "extensions": [
            ClientPerMessageDeflateFactory(
                server_no_context_takeover=True,
                client_no_context_takeover=True,
                server_max_window_bits=10,
                client_max_window_bits=9,
            )
        ],
    },
}


@pytest.mark.parametrize("offer", sorted(CLIENT_OFFERS))
def test_websockets_client_echo(echo_server, offer):
    messages = ["caf\u00e9 " * 300, "caf\u00e9 " * 300, b"\x00\x01" * 5000, "x", ""]

    async def scenario() -> tuple[list[str | bytes], str]:
        async with connect(echo_server.ws_url + "/ws", **CLIENT_OFFERS[offer]) as ws:
            replies = []
            for message in messages:
                await ws.send(message)
                replies.append(await ws.recv())
            return replies, ws.response.headers["Sec-WebSocket-Extensions"]

    replies, extensions = run(scenario())
    assert replies == messages
    assert extensions.startswith(PMD)
    if offer != "default":
        assert "client_no_context_takeover" in extensions


def test_websockets_client_broadcast(broadcast_server):
    async def scenario() -> list[list[str]]:
        url = broadcast_server.ws_url + "/ws/deflate"
        async with (
            connect(url, **CLIENT_OFFERS["default"]) as a,
            connect(url, **CLIENT_OFFERS["everything"]) as b,
            connect(url, compression=None) as plain,
        ):
            for n in range(5):
                await a.send(f"message {n} " * 50)
            return [[await ws.recv() for _ in range(5)] for ws in (a, b, plain)]

    got = run(scenario())
    assert got == [[f"message {n} " * 50 for n in range(5)]] * 3


def test_a_message_too_big_once_inflated_gets_1009(echo_server):
    async def scenario() -> int | None:
        async with connect(echo_server.ws_url + "/ws", compression="deflate") as ws:
            await ws.send(b"\x00" * (MAX_SIZE + 1))  # compresses to a few bytes
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosedError as closed:
                return closed.rcvd.code if closed.rcvd else None
            return None

    assert run(scenario()) == 1009

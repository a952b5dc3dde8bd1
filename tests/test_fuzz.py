"""Hypothesis: any configuration value and any handshake gets a clear answer.

Configuration: values for every key, from the environment, from flags (in-process
``cli.main`` and ``load(flags=...)``) and from a TOML file, end as valid Settings or as a
one-line ConfigError naming the key -- never another exception.

Handshakes: generated request lines and headers (Origin, Authorization, the Sec-WebSocket-*
headers, Upgrade, Connection, odd paths and queries, raw bytes) against one running server
get a 101 or a 4xx, never a 5xx or a hang, and a bystander connection keeps echoing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from echoserver import cli
from echoserver.config import KEYS, ConfigError, Settings, format_value, load
from tests.servers import ServerProcess
from tests.wspeer import Peer
from tests.wsraw import build_frame, close_payload

TOKEN = "fuzz-token"
EXAMPLES = 120

# --- configuration ------------------------------------------------------------------------

KEY_NAMES = [key.name for key in KEYS]
BY_NAME = {key.name: key for key in KEYS}

# What an operator might plausibly type, wrongly or not, plus what nobody would.
NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1",
        "+1",
        "1.5",
        "1e3",
        "1e999",
        "-1e999",
        "nan",
        "inf",
        "-0",
        "0x10",
        "1_000",
        "9" * 5000,  # past Python's int-from-string digit limit
        "9" * 400,  # past a float's range
        "true",
        "yes",
        "off",
        "*",
        ",",
        "*,https://a.example",
        "https://a.example",
        "HTTPS://A.EXAMPLE",
        "http://[::1]:8080",
        "/ws",
        "/ws/",
        "//",
        "/healthz",
        "memory",
        "redis://",
        "redis://:p@h:99999",
        "unix://",
        "/dev/null",
        "/etc",
        "/nonexistent",
        "\u00e9",
        "\t",
        "a b",
        "\udcff",  # a surrogate-escaped undecodable byte, as os.environ would give it
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=30))
# Environment variables and command-line arguments cannot hold NUL.
OS_TEXT = TEXT.filter(lambda s: "\x00" not in s)


def check_outcome(call: Any, key_name: str | None = None) -> Settings | None:
    """Run a load(): Settings, or a one-line ConfigError naming the key; nothing else."""
    try:
        result = call()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message and "\r" not in message
        if key_name is not None:
            assert key_name in message or (error.key or "") in message
        return None
    assert isinstance(result, Settings)
    return result


@settings(deadline=None, max_examples=EXAMPLES)
@given(name=st.sampled_from(KEY_NAMES), value=OS_TEXT)
def test_env_values(name: str, value: str) -> None:
    check_outcome(lambda: load("", env={BY_NAME[name].env: value}))


@settings(deadline=None, max_examples=EXAMPLES)
@given(
    values=st.dictionaries(st.sampled_from(KEY_NAMES), TEXT, min_size=1, max_size=4),
)
def test_flag_strings_through_load(values: dict[str, str]) -> None:
    check_outcome(lambda: load("", env={}, flags=values))


TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),  # past a float's range
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
TOML_VALUES = st.one_of(
    TOML_SCALARS,
    st.lists(TOML_SCALARS, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), TOML_SCALARS, max_size=2),
)


@settings(deadline=None, max_examples=EXAMPLES)
@given(
    name=st.sampled_from(KEY_NAMES),
    # An integer too long for Python to print as text, as only the API can pass one.
    value=st.one_of(TOML_VALUES, st.just(10**5000), st.just(-(10**5000))),
)
def test_typed_flag_values(name: str, value: Any) -> None:
    check_outcome(lambda: load("", env={}, flags={name: value}), name)


@contextlib.contextmanager
def toml_file(text: str | bytes) -> Iterator[str]:
    handle, path = tempfile.mkstemp(suffix=".toml")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        yield path
    finally:
        os.unlink(path)


@settings(deadline=None, max_examples=EXAMPLES)
@given(name=st.sampled_from(KEY_NAMES), value=TOML_VALUES)
def test_file_values(name: str, value: Any) -> None:
    section, _, field = name.rpartition(".")
    text = (f"[{section}]\n" if section else "") + f"{field} = {format_value(value)}\n"
    with toml_file(text) as path:
        check_outcome(lambda: load(path, env={}))


@settings(deadline=None, max_examples=EXAMPLES)
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80),
        st.builds(lambda n: f"port = {'9' * n}\n", st.integers(4000, 6000)),
        st.sampled_from(["[websocket]\nmax_message_size = 1e400\n", "[tls]\ncertfile = 1\n"]),
    )
)
def test_whole_files(text: str | bytes) -> None:
    with toml_file(text) as path:
        check_outcome(lambda: load(path, env={}))


@settings(deadline=None, max_examples=EXAMPLES)
@given(name=st.sampled_from(KEY_NAMES), value=OS_TEXT, bare=st.booleans())
def test_cli_flags(name: str, value: str, bare: bool) -> None:
    key = BY_NAME[name]
    argv = [key.flag] if bare else [f"{key.flag}={value}"]
    out, err = io.StringIO(), io.StringIO()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOSERVER_")}
    with (
        mock.patch.dict(os.environ, clean_env, clear=True),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        status = cli.main([*argv, "--check-config"])
    if status == 0:
        assert out.getvalue() == "config ok\n"
    else:
        assert status == 2
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("echoserver: "), err.getvalue()
        assert "Traceback" not in err.getvalue()


# --- handshakes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        ["--auth-token", TOKEN, "--compression", "--max-message-size", "4096"]
    ).wait_ready()
    yield process
    assert process.stop() == 0
    log = process.log()
    assert "Traceback" not in log
    assert "status=5" not in log
    assert TOKEN not in log


@pytest.fixture(scope="module")
def bystander(server: ServerProcess) -> Iterator[Peer]:
    client = Peer(server.port, path=f"/ws?token={TOKEN}")
    assert client.status == 101
    yield client
    client.close()


def assert_still_echoing(client: Peer, payload: bytes) -> None:
    client.send_frame(0x2, payload)
    assert client.recv_frame() == (True, 0x2, payload)


def exchange(port: int, request: bytes, timeout: float = 5.0) -> int | None:
    """Send a request; the status of the answer, or None if the server just closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR) if not request.endswith(b"\r\n\r\n") else None
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
        except ConnectionResetError:
            return None
        # socket.timeout propagates: a hang fails the test.
        status_line = data.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), data[:200]
        status = int(status_line.split(b" ", 2)[1])
        if status == 101:
            sock.sendall(build_frame(0x8, close_payload(1000)))
        return status


def key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


# Header values as Tornado may receive them: latin-1 text without CR/LF.
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x09, max_codepoint=0xFF, exclude_characters="\r\n"),
    max_size=40,
)
ORIGINS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "http://127.0.0.1:{port}",
            "https://evil.example",
            "null",
            "",
            "http://[",
            "http://[::1",
            "http://a]b",
            "http://127.0.0.1:{port}/path?q#f",
            "file://",
        ]
    ),
    HEADER_TEXT,
)
AUTHORIZATION = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}"),
    st.just(f"bearer {TOKEN}"),
    st.builds(lambda s: f"Bearer {s}", HEADER_TEXT),
    HEADER_TEXT,
)
KEYS_ = st.one_of(st.none(), st.just("valid"), HEADER_TEXT)
VERSIONS = st.one_of(st.none(), st.sampled_from(["13", "8", "7", "12", "0", "13, 8"]), HEADER_TEXT)
UPGRADES = st.one_of(st.none(), st.sampled_from(["websocket", "WebSocket", "h2c"]), HEADER_TEXT)
CONNECTIONS = st.one_of(
    st.none(), st.sampled_from(["Upgrade", "keep-alive, Upgrade", "close"]), HEADER_TEXT
)
EXTENSIONS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=99",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover; x=1",
            "x-webkit-deflate-frame",
            ";;,,",
        ]
    ),
    HEADER_TEXT,
)
PATH_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
PATHS = st.one_of(
    st.sampled_from(
        [
            "/ws",
            "/ws/",
            "/ws/room",
            "/WS",
            "/ws?",
            "/ws?token=",
            f"/ws?token={TOKEN}",
            f"/ws?token={TOKEN}&token=x",
            "/ws?token=%ff",
            "/ws?token=%",
            "/ws?%zz=1",
            "/ws#frag",
            "/ws/../ws",
            "//ws",
            "/static/../../../etc/passwd",
            "/static/%2e%2e/%2e%2e/etc/passwd",
            "/healthz",
            "/metrics",
            "/api/channels/x",
            "*",
            "http://127.0.0.1/ws",
            "/" + "a" * 5000,
        ]
    ),
    st.builds(lambda s: "/ws?" + s, st.text(PATH_CHARS, max_size=40)),
    st.builds(lambda s: "/" + s, st.text(PATH_CHARS, max_size=40)),
)


# Each example starts from a valid, authorised handshake and changes one to three of its
# parts, so most of them get as far as the check the changed part is for.
MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(["POST", "HEAD", "OPTIONS", "PUT", "get", "GET"]),
    "path": PATHS,
    "Host": st.one_of(st.none(), HEADER_TEXT),
    "Upgrade": UPGRADES,
    "Connection": CONNECTIONS,
    "Sec-WebSocket-Key": KEYS_,
    "Sec-WebSocket-Version": VERSIONS,
    "Origin": ORIGINS,
    "Authorization": AUTHORIZATION,
    "Sec-WebSocket-Extensions": EXTENSIONS,
    "Sec-WebSocket-Protocol": st.one_of(st.none(), HEADER_TEXT),
}
CHANGES = st.dictionaries(
    st.sampled_from(list(MUTATIONS)), st.none(), min_size=1, max_size=3
).flatmap(lambda chosen: st.fixed_dictionaries({name: MUTATIONS[name] for name in chosen}))


def handshake_request(port: int, changes: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    fields: dict[str, Any] = {
        "method": "GET",
        "path": "/ws",
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "valid",
        "Sec-WebSocket-Version": "13",
        "Origin": None,
        "Authorization": f"Bearer {TOKEN}",
        "Sec-WebSocket-Extensions": None,
        "Sec-WebSocket-Protocol": None,
        **changes,
    }
    if fields["Sec-WebSocket-Key"] == "valid":
        fields["Sec-WebSocket-Key"] = key()
    if fields["Origin"]:
        fields["Origin"] = fields["Origin"].replace("{port}", str(port))
    head = f"{fields['method']} {fields['path']} HTTP/1.1\r\n"
    for name, value in fields.items():
        if name not in ("method", "path") and value is not None:
            head += f"{name}: {value}\r\n"
    return head.encode("latin-1") + b"\r\n", fields


@settings(deadline=None, max_examples=EXAMPLES * 3)
@example(changes={"Origin": "http://["})
@example(changes={"path": "/ws?token=%ff", "Authorization": None})
@example(changes={"path": f"/ws?token={TOKEN}", "Authorization": "Bearer "})
@example(changes={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits=7"})
@given(changes=CHANGES)
def test_handshake_headers(server: ServerProcess, bystander: Peer, changes: dict[str, Any]) -> None:
    request, fields = handshake_request(server.port, changes)
    status = exchange(server.port, request)
    # A complete request always gets an answer: malformed ones a 400 from Tornado.
    assert status is not None
    assert status == 101 or 400 <= status < 500 or status in (200, 304)
    if status == 101:
        assert fields["method"] == "GET"
        authorization = fields["Authorization"] or ""
        if authorization.lower().startswith("bearer "):
            assert authorization[7:] == TOKEN
        else:
            assert f"token={TOKEN}" in fields["path"]
        # Default origin policy: the Origin's host:port is the one the request was sent to.
        origin = fields["Origin"]
        assert origin is None or urlsplit(origin).netloc.lower() == fields["Host"].lower()
    if status in (200, 304):
        assert fields["method"] in ("GET", "HEAD") and not fields["path"].startswith("/ws")
    assert_still_echoing(bystander, request[:100])


@settings(deadline=None, max_examples=EXAMPLES)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from(
                [
                    b"GET /ws HTTP/1.1\r\n",
                    b"GET /ws HTTP/1.0\r\n",
                    b"GET /ws HTTP/9.9\r\n",
                    b"GET /ws\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                    b"GET /ws HTTP/1.1\r\nContent-Length: -1\r\n",
                    b"GET /ws HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                ]
            ),
            st.binary(max_size=200),
        ),
    )
)
def test_raw_request_bytes(server: ServerProcess, bystander: Peer, raw: bytes) -> None:
    status = exchange(server.port, raw)
    assert status is None or status < 500
    assert_still_echoing(bystander, raw[:50])


def test_server_is_still_healthy_after_the_fuzzing(server: ServerProcess, bystander: Peer) -> None:
    assert_still_echoing(bystander, b"last")
    bystander.send_frame(0x8, struct.pack("!H", 1000))
    assert bystander.recv_close_code() == 1000

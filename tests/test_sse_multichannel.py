"""Several channels in one event stream (issue 21, part 1): /sse?channel=a&channel=b.

Each event's data says its channel and offset; its id is the stream's cursor
("a:12,b:40"), which resumes every channel at once as Last-Event-ID. Real server
processes, read over a raw socket; the rights test runs in process.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from echoserver.config import Settings
from echoserver.config.settings import NamespaceSettings
from tests.authkeys import SECRET, mint
from tests.conftest import fetch, make_settings, wait_until
from tests.servers import ServerProcess

KEY = "sse-multi-key"
Event = dict[str, Any]


def parse_events(data: bytes) -> list[Event]:
    """The complete events of an event-stream body (comments and retry lines skipped)."""
    events = []
    for block in data.split(b"\n\n")[:-1]:
        event: Event = {"data": []}
        for line in block.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                event["data"].append(value.decode())
            elif name in (b"id", b"event"):
                event[name.decode()] = value.decode()
        if event["data"]:
            event["data"] = json.loads("\n".join(event["data"]))
            events.append(event)
    return events


class Reader:
    """A raw HTTP GET of an event stream (chunked), read as it arrives."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                break
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        self.body = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def _dechunk(self) -> None:
        while b"\r\n" in self.buffer:
            size_line, _, rest = self.buffer.partition(b"\r\n")
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.buffer = rest[size + 2 :]

    def events(self, count: int, timeout: float = 10.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        self._dechunk()
        while len(parse_events(self.body)) < count and time.monotonic() < deadline:
            if not self._more():
                break
            self._dechunk()
        return parse_events(self.body)

    def close(self) -> None:
        self.sock.close()


def publish(
    server: ServerProcess, channel: str, body: bytes, kind: str = "application/json"
) -> int:
    request = urllib.request.Request(
        f"{server.url}/api/channels/{channel}/messages",
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": kind},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["offset"])


def members(server: ServerProcess, channel: str) -> int:
    return json.loads(fetch(f"{server.url}/api/channels/{channel}")[2])["members"]


def status_of(server: ServerProcess, path: str, headers: dict[str, str] | None = None) -> int:
    reader = Reader(server.port, path, headers)
    reader.close()
    return reader.status


def test_one_stream_carries_several_channels_and_resumes_them_all(run_server: Any) -> None:
    server = run_server("--mode", "mixed", "--api-key", KEY, "--history", "100")
    stream = Reader(server.port, "/sse?channel=a&channel=b&channel=a")  # a twice: once
    assert stream.status == 200
    assert wait_until(lambda: (members(server, "a"), members(server, "b")) == (1, 1), 10)
    for channel, value in [("a", 1), ("b", "x"), ("a", {"n": 2})]:
        publish(server, channel, json.dumps(value).encode())
    events = stream.events(3)
    ea, eb = events[0]["data"]["epoch"], events[1]["data"]["epoch"]
    assert [(e.get("id"), e["data"]) for e in events] == [
        (f"a:{ea}:1,b:0", {"channel": "a", "offset": 1, "epoch": ea, "payload": 1}),  # b: none
        (f"a:{ea}:1,b:{eb}:1", {"channel": "b", "offset": 1, "epoch": eb, "payload": "x"}),
        (f"a:{ea}:2,b:{eb}:1", {"channel": "a", "offset": 2, "epoch": ea, "payload": {"n": 2}}),
    ]
    stream.close()
    assert wait_until(lambda: (members(server, "a"), members(server, "b")) == (0, 0), 10)
    for n in range(3, 6):
        publish(server, "a", str(n).encode())
    publish(server, "b", b'"y"')

    back = Reader(server.port, "/sse?channel=a&channel=b", {"Last-Event-ID": events[-1]["id"]})
    resumed = back.events(6)
    back.close()
    recoveries = [e["data"] for e in resumed if e.get("event") == "recovery"]
    assert recoveries == [
        {"channel": "a", "recovered": True, "since": 2, "first": 3, "epoch": ea},
        {"channel": "b", "recovered": True, "since": 1, "first": 2, "epoch": eb},
    ]
    messages = [(e["id"], e["data"]["payload"]) for e in resumed if "event" not in e]
    assert messages == [
        (f"a:{ea}:3,b:{eb}:1", 3),
        (f"a:{ea}:4,b:{eb}:1", 4),
        (f"a:{ea}:5,b:{eb}:1", 5),
        (f"a:{ea}:5,b:{eb}:2", "y"),
    ]

    # The query form, for clients that cannot set the header, with entries that give no
    # epoch (the current one); a channel the cursor does not name is joined plainly (its
    # history), one it names but the stream left is ignored.
    query = Reader(server.port, "/sse?channel=a&channel=c&last_event_id=a:5,b:2")
    assert query.status == 200
    assert wait_until(lambda: members(server, "c") == 1, 10)
    publish(server, "c", b"7")
    publish(server, "a", b"6")
    after = query.events(3)
    query.close()
    assert after[0] == {
        "event": "recovery",
        "data": {"channel": "a", "recovered": True, "since": 5, "first": None, "epoch": ea},
    }
    # Nothing was kept on c when it joined: its position starts at its first event.
    ec = after[1]["data"]["epoch"]
    assert [(e["id"], e["data"]["channel"]) for e in after[1:]] == [
        (f"a:{ea}:5,c:{ec}:1", "c"),
        (f"a:{ea}:6,c:{ec}:1", "a"),
    ]

    # An entry from another epoch is not recovered: the current epoch's kept messages.
    other = Reader(server.port, f"/sse?channel=a&last_event_id=a:{ea}x:3")
    assert other.events(1)[0] == {
        "event": "recovery",
        "data": {"channel": "a", "recovered": False, "since": 3, "first": 1, "epoch": ea},
    }
    other.close()


def test_a_channel_with_nothing_to_replay_starts_the_cursor_at_its_last_offset(
    run_server: Any,
) -> None:
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--history", "10")
    publish(server, "quiet", b"old", "text/plain")
    stream = Reader(server.port, "/sse?channel=quiet&channel=busy", {"Last-Event-ID": "quiet:1"})
    assert wait_until(lambda: members(server, "busy") == 1, 10)
    publish(server, "busy", "two\nlines é".encode(), "text/plain")
    publish(server, "busy", b"\x00\x01", "application/octet-stream")
    events = stream.events(3)
    stream.close()
    eq, eb = events[0]["data"]["epoch"], events[1]["data"]["epoch"]
    assert events == [
        {
            "event": "recovery",
            "data": {"channel": "quiet", "recovered": True, "since": 1, "first": None, "epoch": eq},
        },
        {
            "id": f"quiet:{eq}:1,busy:{eb}:1",
            "data": {"channel": "busy", "offset": 1, "epoch": eb, "text": "two\nlines é"},
        },
        {
            "id": f"quiet:{eq}:1,busy:{eb}:2",
            "event": "binary",
            "data": {"channel": "busy", "offset": 2, "epoch": eb, "base64": "AAE="},
        },
    ]


def test_what_a_multi_channel_stream_refuses(run_server: Any) -> None:
    server = run_server("--mode", "mixed", "--max-subscriptions", "3")
    assert status_of(server, "/sse?channel=a&channel=b&channel=c") == 200
    assert status_of(server, "/sse?channel=a&channel=b&channel=c&channel=d") == 400
    assert status_of(server, "/sse/a?channel=b") == 400
    assert status_of(server, "/sse?channel=bad%2Fname") == 400
    assert status_of(server, "/sse?channel=") == 400
    bad = ("12", "a:", "a:x", "a:1;b:2", "a:E:x", "a:b:c:1", "a:E!:1", "a:1," + "b" * 500 + ":1")
    for cursor in bad:
        assert status_of(server, "/sse?channel=a", {"Last-Event-ID": cursor}) == 400, cursor
    assert status_of(server, "/sse?channel=a&since=a:1&since=a:2") == 400
    assert status_of(server, "/sse?channel=a", {"Last-Event-ID": " "}) == 200


NAMESPACES = (
    NamespaceSettings("chat.*", subscribe="user"),
    NamespaceSettings("vip.*", subscribe="claim"),
)


async def sse_status(port: int, query: str, token: str | None) -> int:
    opened: list[bytes] = []
    request = HTTPRequest(
        f"http://127.0.0.1:{port}/sse?{query}" + (f"&token={token}" if token else ""),
        streaming_callback=opened.append,
        request_timeout=0.3,
    )
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except HTTPClientError as timeout:  # a stream that stays open runs into the timeout
        assert timeout.code == 599 and opened
        return 200
    return response.code


class TestRights:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(
            mode="mixed",
            namespaces=NAMESPACES,
            **{"auth.jwt_secret": (SECRET,), "auth.anonymous": True},
        )

    @pytest.mark.gen_test(timeout=20)
    async def test_every_channel_is_checked_and_one_refused_refuses_the_stream(
        self, http_server: Any, http_port: int
    ) -> None:
        alice = mint(sub="alice", channels=["vip.gold"])
        cases = [
            ("channel=free&channel=chat.room", None, 403),
            ("channel=free&channel=chat.room", alice, 200),
            ("channel=chat.room&channel=vip.gold", alice, 200),
            ("channel=chat.room&channel=vip.gold&channel=vip.silver", alice, 403),
        ]
        for query, token, status in cases:
            assert await sse_status(http_port, query, token) == status, query

"""Server-Sent Events (/sse/<channel>) against real server processes: curl, a raw HTTP
reader, and a browser's EventSource that recovers by itself after a reconnect.

The stream carries each message as an event whose id is its epoch and offset;
Last-Event-ID resumes as a WebSocket's ?since= does; a subscriber counts as a member and
obeys the same policy.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any
from unittest.mock import ANY  # a wildcard for an epoch

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import fetch, wait_until
from tests.redis_server import RedisServer, redis_server
from tests.servers import ServerProcess
from tests.test_browser import browser, start_server

__all__ = ["browser", "redis_server"]  # fixtures

KEY = "sse-key"
Event = dict[str, Any]


def parse_events(data: bytes) -> list[Event]:
    """The complete events in an event-stream body (comments and retry lines skipped)."""
    events = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        event: Event = {"data": []}
        for line in block.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                event["data"].append(value.decode())
            elif name in (b"id", b"event"):
                event[name.decode()] = value.decode()
        if event["data"]:
            event["data"] = "\n".join(event["data"])
            events.append(event)
    return events


class Reader:
    """A raw HTTP GET of an event stream, read as it arrives."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        self.headers = head.decode("latin-1").lower()
        self.body = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def _dechunk(self) -> None:
        """Move complete chunks of the chunked body from buffer to body."""
        while b"\r\n" in self.buffer:
            size_line, _, rest = self.buffer.partition(b"\r\n")
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.buffer = rest[size + 2 :]

    def events(self, count: int, timeout: float = 10.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        while len(parse_events(self.body)) < count and time.monotonic() < deadline:
            self._dechunk()
            if len(parse_events(self.body)) >= count or not self._more():
                break
        self._dechunk()
        return parse_events(self.body)

    def at_end(self, timeout: float = 10.0) -> bool:
        """True once the server ended the stream (the last chunk, or the socket closed)."""
        self.sock.settimeout(timeout)
        try:
            while b"0\r\n\r\n" not in self.buffer:
                if not self._more():
                    return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def offset_of(event_id: str) -> str:
    """The offset of an event id, ``<epoch>:<offset>``."""
    return event_id.rpartition(":")[2]


def publish(server: ServerProcess, body: bytes, content_type: str = "text/plain") -> int:
    request = urllib.request.Request(
        f"{server.url}/api/channels/news/messages",
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["offset"])


def members(server: ServerProcess, channel: str = "news") -> int:
    return json.loads(fetch(f"{server.url}/api/channels/{channel}")[2])["members"]


def test_curl_shows_messages_as_they_arrive(run_server: Any) -> None:
    server = run_server("--mode", "broadcast")
    curl = subprocess.Popen(
        ["curl", "-sN", "--max-time", "20", f"{server.url}/sse/news"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: members(server) == 1, 10)  # an SSE subscriber is a member
        with ws_connect(f"{server.ws_url}/ws/news") as sender:
            sender.send("one")
            sender.send("two\nlines")
            sender.send(b"\x00\x01\xff")
        assert curl.stdout is not None
        body = b""
        deadline = time.monotonic() + 10
        while len(parse_events(body)) < 3 and time.monotonic() < deadline:
            body += curl.stdout.read1(65536)  # type: ignore[attr-defined]
    finally:
        curl.kill()
        curl.wait(10)
    events = parse_events(body)
    epoch = events[0]["id"].partition(":")[0]
    assert events == [
        {"id": f"{epoch}:1", "data": "one"},
        {"id": f"{epoch}:2", "data": "two\nlines"},
        {
            "id": f"{epoch}:3",
            "event": "binary",
            "data": base64.b64encode(b"\x00\x01\xff").decode(),
        },
    ]
    assert body.startswith(b"retry: ")


@pytest.mark.parametrize("how", ["header", "query", "since"])
def test_last_event_id_resumes_exactly(run_server: Any, how: str) -> None:
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--history", "100")
    for n in range(1, 6):
        assert publish(server, b"m%d" % n) == n
    path, headers = "/sse/news", {}
    if how == "header":
        headers = {"Last-Event-ID": "2"}
    else:
        path += "?last_event_id=2" if how == "query" else "?since=2"
    reader = Reader(server.port, path, headers)
    try:
        assert reader.status == 200 and "text/event-stream" in reader.headers
        replay = reader.events(4)
        recovery = json.loads(replay[0]["data"])
        assert recovery == {"recovered": True, "since": 2, "first": 3, "epoch": ANY}
        assert replay[0]["event"] == "recovery"
        epoch = recovery["epoch"]
        assert [(e["id"], e["data"]) for e in replay[1:]] == [
            (f"{epoch}:{n}", f"m{n}") for n in (3, 4, 5)
        ]
        publish(server, b"m6")  # then the live stream
        assert reader.events(5)[-1] == {"id": f"{epoch}:6", "data": "m6"}
    finally:
        reader.close()


def test_a_resume_older_than_the_history_is_not_recovered(run_server: Any) -> None:
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--history", "3")
    for n in range(1, 11):
        publish(server, b"m%d" % n)
    reader = Reader(server.port, "/sse/news", {"Last-Event-ID": "2"})
    try:
        events = reader.events(4)
    finally:
        reader.close()
    assert json.loads(events[0]["data"]) == {
        "recovered": False,
        "since": 2,
        "first": 8,
        "epoch": ANY,
    }
    assert [offset_of(e["id"]) for e in events[1:]] == ["8", "9", "10"]


def status_of(server: ServerProcess, path: str, headers: dict[str, str] | None = None) -> int:
    reader = Reader(server.port, path, headers)
    reader.close()
    return reader.status


def test_the_same_policy_as_websockets(run_server: Any) -> None:
    server = run_server(
        "--mode", "mixed", "--auth-token", "tok", "--allowed-origins", "https://app.example",
        "--max-connections", "1",
    )  # fmt: skip
    assert status_of(server, "/sse/news") == 401
    assert status_of(server, "/sse/news?token=tok", {"Origin": "https://evil.example"}) == 403
    assert status_of(server, "/sse/news?last_event_id=x&token=tok") == 400
    first = Reader(server.port, "/sse/news?token=tok", {"Origin": "https://app.example"})
    try:
        assert first.status == 200
        assert status_of(server, "/sse/news?token=tok") == 503  # full, counted with the rest
        assert members(server) == 1  # a member like any other
    finally:
        first.close()
    assert wait_until(lambda: members(server) == 0, 10)
    assert "refused /sse/news" in server.log()


def test_echo_mode_has_no_event_streams(run_server: Any) -> None:
    server = run_server("--mode", "echo")
    assert fetch(server.url + "/sse/news")[0] == 404


def test_the_drain_ends_the_stream(run_server: Any) -> None:
    server = run_server("--mode", "broadcast")
    reader = Reader(server.port, "/sse/news")
    try:
        assert wait_until(lambda: members(server) == 1, 10)
        server.proc.send_signal(signal.SIGTERM)
        assert reader.at_end(10)
    finally:
        reader.close()
    assert server.proc.wait(15) == 0


def test_a_stream_that_is_not_read_is_ended_past_the_cap(run_server: Any) -> None:
    server = run_server(
        "--mode", "broadcast", "--max-queue-bytes", "65536", "--slow-client", "disconnect"
    )
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(b"GET /sse/news HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        assert wait_until(lambda: members(server) == 1, 10)
        with ws_connect(f"{server.ws_url}/ws/news") as sender:
            for _ in range(200):  # 6 MB, paced by the sender's own copy
                sender.send("x" * 30_000)
                sender.recv(timeout=10)
        assert wait_until(lambda: "(1013)" in server.log(), 10)
        assert wait_until(lambda: members(server) == 0, 10)
    finally:
        slow.close()


@pytest.mark.redis
def test_eventsource_in_chromium_recovers_by_itself(
    browser: Any, redis_server: RedisServer
) -> None:
    """The page's server is killed and started again on the same port while the other
    server publishes; the browser's EventSource reconnects with Last-Event-ID and gets
    every message exactly once, in order, from the history kept in Redis."""
    common = ("--broker", redis_server.url, "--history", "1000", "--api-key", KEY)
    a = start_server("broadcast", *common)
    b = start_server("broadcast", *common)
    page = browser.new_page()
    try:
        page.goto(a.url + "/healthz")
        page.evaluate(
            """() => { window.got = []; window.opens = 0;
                const source = new EventSource('/sse/news');
                source.onopen = () => { window.opens += 1; };
                source.onmessage = (e) => window.got.push([e.lastEventId, e.data]); }"""
        )
        page.wait_for_function("window.opens === 1", timeout=10_000)
        for n in range(1, 101):
            publish_to(b, f"m{n}")
        page.wait_for_function("window.got.length === 100", timeout=10_000)
        a.kill()
        for n in range(101, 301):  # published while the browser's server is away
            publish_to(b, f"m{n}")
        a.restart().wait_healthy()  # the same port
        for n in range(301, 401):
            publish_to(b, f"m{n}")
        page.wait_for_function("window.got.length >= 400", timeout=30_000)
        got = page.evaluate("window.got")
        opens = page.evaluate("window.opens")
    finally:
        page.close()
        a.stop()
        b.stop()
    assert opens >= 2  # it did reconnect
    epoch = got[0][0].partition(":")[0]  # one epoch: Redis kept the channel's state
    assert got == [[f"{epoch}:{n}", f"m{n}"] for n in range(1, 401)]


def publish_to(server: ServerProcess, text: str) -> None:
    request = urllib.request.Request(
        f"{server.url}/api/channels/news/messages",
        data=text.encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as error:  # pragma: no cover - shows the refusal
        raise AssertionError(f"publish refused: {error.code} {error.read()!r}") from None


@pytest.mark.redis
def test_a_stream_away_during_1000_messages_gets_each_once_in_order(
    run_server: Any, redis_server: RedisServer
) -> None:
    """Published by a WebSocket member on one server and by the API on both, while the
    event-stream reader leaves the first server and comes back to the second (and then
    with curl) with Last-Event-ID."""
    a, b = (
        run_server("--mode", "broadcast", "--broker", redis_server.url, "--history", "2000",
                   "--api-key", KEY)
        for _ in "ab"
    )  # fmt: skip
    total = 1000
    reader = Reader(a.port, "/sse/news")
    try:
        assert wait_until(lambda: members(a) == 1, 10)
        with ws_connect(f"{b.ws_url}/ws/news") as member:
            for n in range(200):
                member.send(f"m{n}")
            first = reader.events(200)
            reader.close()
            for n in range(200, total):  # while the reader is away
                if n % 2:
                    member.send(f"m{n}")
                else:
                    publish(a if n % 4 else b, b"m%d" % n)
        last_seen = first[-1]["id"]
        reader = Reader(b.port, "/sse/news", {"Last-Event-ID": last_seen})
        rest = reader.events(1 + total - len(first), timeout=20)
    finally:
        reader.close()
    recovery, rest = rest[0], rest[1:]
    assert recovery["event"] == "recovery"
    assert json.loads(recovery["data"])["recovered"] is True
    got = first + rest
    assert [int(offset_of(e["id"])) for e in got] == list(range(1, total + 1))
    assert sorted(e["data"] for e in got) == sorted(f"m{n}" for n in range(total))
    member_order = [e["data"] for e in got if int(e["data"][1:]) < 200 or int(e["data"][1:]) % 2]
    assert member_order == [f"m{n}" for n in range(total) if n < 200 or n % 2]

    # curl resumes the same way, from any offset still kept.
    done = subprocess.run(
        ["curl", "-sN", "--max-time", "3", "-H", "Last-Event-ID: 990", f"{a.url}/sse/news"],
        capture_output=True,
        timeout=30,
    )
    tail = parse_events(done.stdout)
    assert json.loads(tail[0]["data"]) == {
        "recovered": True,
        "since": 990,
        "first": 991,
        "epoch": ANY,
    }
    assert [offset_of(e["id"]) for e in tail[1:]] == [str(n) for n in range(991, 1001)]


def test_the_last_event_id_header_wins_over_the_query(run_server: Any) -> None:
    """An EventSource made with ?since=N sends Last-Event-ID on its reconnects: that one
    is where it really is. An empty header (no id seen yet) changes nothing."""
    server = run_server("--mode", "broadcast", "--api-key", KEY, "--history", "100")
    for n in range(1, 6):
        publish(server, b"m%d" % n)
    for headers, first in (({"Last-Event-ID": "3"}, 4), ({"Last-Event-ID": ""}, 2)):
        reader = Reader(server.port, "/sse/news?since=1", headers)
        try:
            recovery = reader.events(1)[0]
        finally:
            reader.close()
        assert json.loads(recovery["data"])["first"] == first, headers

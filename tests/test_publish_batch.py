"""The batch publish API, POST /api/publish, on real server processes: arrays of messages
and one message to many channels, each channel's order kept through the memory broker,
one Redis and a Redis Cluster; every refusal answered before anything is published."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import fetch_json, metric, wait_until
from tests.redis_cluster import LocalCluster, clean_redis_cluster, redis_cluster
from tests.redis_server import redis_server
from tests.wsraw import RawClient

__all__ = ["clean_redis_cluster", "redis_cluster", "redis_server"]  # fixtures

KEY = "batch-key-123"
TEXT, BINARY = 1, 2


def publish(
    server: Any, body: Any, key: str | None = KEY, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """POST /api/publish: (status, the JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.url}/api/publish", data=data, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        answer = error.read()
        is_json = error.headers.get("Content-Type") == "application/json"
        return error.code, json.loads(answer) if is_json else {}


def start(run_server: Any, *args: str) -> Any:
    return run_server(
        "--mode",
        "broadcast",
        "--api-key",
        KEY,
        "--history",
        "100",
        "--max-message-size",
        "256",
        *args,
    )


def joined(server: Any, channel: str) -> RawClient:
    """A member of the channel, counted by the server before this returns."""
    client = RawClient(server.port, f"/ws/{channel}")
    assert client.status == 101
    assert wait_until(lambda: fetch_json(f"{server.url}/api/channels/{channel}")[1]["members"] >= 1)
    return client


def frames(client: RawClient, count: int) -> list[tuple[int, bytes]]:
    got = []
    for _ in range(count):
        frame = client.recv_frame()
        assert frame is not None, f"closed after {len(got)} frames"
        got.append((frame[1], frame[2]))
    return got


def replay(server: Any, channel: str, count: int) -> list[bytes]:
    """What the channel keeps, in its order (a joiner with ?since=0)."""
    client = RawClient(server.port, f"/ws/{channel}?since=0")
    try:
        return [payload for _, payload in frames(client, count)]
    finally:
        client.close()


def interleaved(channels: list[str], per_channel: int) -> list[dict[str, Any]]:
    return [
        {"channel": channel, "data": f"{channel}-{n}"}
        for n in range(per_channel)
        for channel in channels
    ]


def check_order(results: list[dict[str, Any]], items: list[dict[str, Any]]) -> None:
    """Answers in the request's order, each channel's offsets consecutive in it."""
    assert [r["channel"] for r in results] == [i["channel"] for i in items]
    last: dict[str, int] = {}
    for result in results:
        channel = result["channel"]
        if channel in last:
            assert result["offset"] == last[channel] + 1
        last[channel] = result["offset"]
        assert isinstance(result["epoch"], str) and result["epoch"]


# --- the memory broker --------------------------------------------------------------------


def test_an_array_of_messages_keeps_each_channels_order(run_server) -> None:
    server = start(run_server)
    member = joined(server, "a")
    items = interleaved(["a", "b", "c"], 20)
    status, body = publish(server, items)
    assert status == 200, body
    check_order(body["results"], items)
    assert body["results"][0] == {
        "channel": "a",
        "offset": 1,
        "epoch": body["results"][0]["epoch"],
        "local_receivers": 1,
    }
    assert body["results"][1]["local_receivers"] == 0
    assert frames(member, 20) == [(TEXT, f"a-{n}".encode()) for n in range(20)]
    assert replay(server, "b", 20) == [f"b-{n}".encode() for n in range(20)]
    # A second batch goes on from there.
    status, body = publish(server, [{"channel": "a", "data": "more"}])
    assert (status, body["results"][0]["offset"]) == (200, 21)
    assert metric(server, "echoserver_api_publish_requests_total", status="200") == 2
    member.close()


def test_data_kinds_text_json_and_binary(run_server) -> None:
    server = start(run_server)
    member = joined(server, "k")
    items = [
        {"channel": "k", "data": "héllo"},
        {"channel": "k", "data": {"b": [1, 2.5, None], "a": "x"}},
        {"channel": "k", "data": 7},
        {"channel": "k", "data_base64": base64.b64encode(b"\x00\xff").decode()},
    ]
    assert publish(server, items)[0] == 200
    assert frames(member, 4) == [
        (TEXT, "héllo".encode()),
        (TEXT, b'{"b":[1,2.5,null],"a":"x"}'),
        (TEXT, b"7"),
        (BINARY, b"\x00\xff"),
    ]
    member.close()


def test_one_message_to_many_channels(run_server) -> None:
    server = start(run_server)
    a, b = joined(server, "a"), joined(server, "b")
    status, body = publish(server, {"channels": ["a", "b", "c"], "data": "all"})
    assert status == 200, body
    assert [(r["channel"], r["offset"]) for r in body["results"]] == [("a", 1), ("b", 1), ("c", 1)]
    assert frames(a, 1) == frames(b, 1) == [(TEXT, b"all")]
    payload = base64.b64encode(b"\x01\x02").decode()
    status, body = publish(server, {"channels": ["b"], "data_base64": payload})
    assert (status, body["results"][0]["offset"]) == (200, 2)
    assert frames(b, 1) == [(BINARY, b"\x01\x02")]
    a.close()
    b.close()


REFUSED = [
    # (body, index named)
    ([{"channel": "ok", "data": "x"}, {"channel": "bad name", "data": "x"}], 1),
    ([{"channel": "ok", "data": "x"}, {"channel": "ok"}], 1),
    ([{"channel": "ok", "data": "x", "data_base64": "eA=="}], 0),
    ([{"channel": "ok", "data": "x", "extra": 1}], 0),
    ([{"channel": "ok", "data": "x"}, "not an object"], 1),
    ([{"channel": 5, "data": "x"}], 0),
    ([{"channel": "ok", "data": "x"}, {"channel": "ok", "data": "y" * 300}], 1),
    ([{"channel": "ok", "data_base64": "not base64!"}], 0),
    ([{"channel": "ok", "data_base64": 5}], 0),
    ({"channels": ["ok", "no/slash"], "data": "x"}, 1),
    ({"channels": [], "data": "x"}, None),
    ({"channels": "ok", "data": "x"}, None),
    ({"channels": ["ok"]}, None),
    ({"channels": ["ok"], "data": "y" * 300}, None),
    ([], None),
    ("just a string", None),
    ([{"channel": "ok", "data": "x"}] * 6, None),  # over --api-max-batch 5
]


def test_every_refusal_names_the_item_and_publishes_nothing(run_server) -> None:
    server = start(run_server, "--api-max-batch", "5")
    for body, index in REFUSED:
        status, answer = publish(server, body)
        assert status == 400, (body, answer)
        assert answer["index"] == index, (body, answer)
        assert answer["error"]
    for raw in (b"[{", b'[{"channel":"ok","data":NaN}]', b"\xff\xfe", b"[" * 100 + b"]" * 100):
        status, answer = publish(server, None, raw=raw)
        assert (status, answer["index"]) == (400, None), raw
    # A lone surrogate is no UTF-8 text.
    status, answer = publish(server, None, raw=b'[{"channel":"ok","data":"\\ud800"}]')
    assert (status, answer["index"]) == (400, 0)
    assert publish(server, [{"channel": "ok", "data": "x"}], key=None)[0] == 401
    assert publish(server, [{"channel": "ok", "data": "x"}], key="wrong")[0] == 401
    # The body: up to 4 x max_message_size (256 here) or 1 MiB, told by its Content-Length.
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {(1 << 20) + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"[")  # answered before the body is read
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"1048576 bytes" in answer
    # Nothing was published: the first message that is goes out at offset 1.
    status, answer = publish(server, [{"channel": "ok", "data": "x"}] * 5)
    assert status == 200
    assert [r["offset"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    assert metric(server, "echoserver_api_publish_requests_total", status="400") == len(REFUSED) + 5


def test_off_without_the_key_and_in_echo_mode(run_server) -> None:
    server = run_server("--mode", "broadcast")
    assert publish(server, [{"channel": "a", "data": "x"}])[0] == 404
    echo = run_server("--mode", "echo", "--api-key", KEY)
    assert publish(echo, [{"channel": "a", "data": "x"}])[0] == 404


def test_mixed_mode_publishes_json_and_refuses_binary(run_server) -> None:
    server = run_server("--mode", "mixed", "--api-key", KEY)
    member = RawClient(server.port, "/ws/m")
    assert member.status == 101
    assert wait_until(lambda: fetch_json(f"{server.url}/api/channels/m")[1]["members"] >= 1)
    items = [{"channel": "m", "data": {"text": "hi"}}, {"channel": "m", "data": "plain"}]
    status, body = publish(server, items)
    assert status == 200, body
    got = [json.loads(payload) for _, payload in frames(member, 2)]
    assert [(g["type"], g["payload"], g["offset"]) for g in got] == [
        ("broadcast", {"text": "hi"}, 1),
        ("broadcast", "plain", 2),
    ]
    binary = [{"channel": "m", "data": "x"}, {"channel": "m", "data_base64": "AAE="}]
    status, body = publish(server, binary)
    assert (status, body["index"]) == (400, 1)
    status, body = publish(server, {"channels": ["m"], "data_base64": "AAE="})
    assert (status, body["index"]) == (400, None)
    member.close()


# --- Redis and the Cluster ----------------------------------------------------------------


@pytest.mark.redis
def test_redis_keeps_each_channels_order_then_503_while_down(run_server, redis_server) -> None:
    server = start(run_server, "--broker", redis_server.url)
    member = joined(server, "a")
    items = interleaved(["a", "b"], 50)
    status, body = publish(server, items)
    assert status == 200, body
    check_order(body["results"], items)
    assert [r["offset"] for r in body["results"][:4]] == [1, 1, 2, 2]
    assert frames(member, 50) == [(TEXT, f"a-{n}".encode()) for n in range(50)]
    assert replay(server, "b", 50) == [f"b-{n}".encode() for n in range(50)]
    member.close()
    redis_server.stop()
    assert wait_until(lambda: publish(server, [{"channel": "a", "data": "x"}])[0] == 503, 15)
    status, body = publish(server, [{"channel": "a", "data": "x"}])
    assert status == 503 and "not published" in body["error"]


@pytest.mark.redis
def test_the_cluster_keeps_each_channels_order(
    run_server, clean_redis_cluster: LocalCluster
) -> None:
    server = start(run_server, "--broker", clean_redis_cluster.url)
    channels = [f"c{n}" for n in range(8)]  # spread over the primaries
    member = joined(server, "c0")
    items = interleaved(channels, 12)
    status, body = publish(server, items)
    assert status == 200, body
    check_order(body["results"], items)
    assert frames(member, 12) == [(TEXT, f"c0-{n}".encode()) for n in range(12)]
    for channel in channels[1:3]:
        assert replay(server, channel, 12) == [f"{channel}-{n}".encode() for n in range(12)]
    status, body = publish(server, {"channels": channels, "data": "all"})
    assert status == 200
    assert [r["offset"] for r in body["results"]] == [13] * 8
    member.close()

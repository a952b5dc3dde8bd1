"""Broadcast end to end: many clients, concurrent senders, slow receivers, history, deflate."""

from __future__ import annotations

import asyncio
import json
from unittest.mock import ANY  # a wildcard for an epoch

from tornado.websocket import websocket_connect

from tests.conftest import metric, wait_until
from tests.wsraw import RawClient


def test_concurrent_senders_reach_every_client_in_one_order(run_server):
    server = run_server("--mode", "broadcast")
    clients_count, senders_count, per_sender = 40, 5, 20

    async def scenario():
        clients = [
            await websocket_connect(server.ws_url + "/ws/many") for _ in range(clients_count)
        ]
        # Every join is done once each client has seen a marker sent after the last join.
        await clients[-1].write_message("ready")
        for client in clients:
            assert await client.read_message() == "ready"

        async def sender(index: int) -> None:
            for n in range(per_sender):
                await clients[index].write_message(f"{index}:{n}")

        await asyncio.gather(*(sender(i) for i in range(senders_count)))
        total = senders_count * per_sender
        seen = [[await client.read_message() for _ in range(total)] for client in clients]
        for client in clients:
            client.close()
        return seen

    seen = asyncio.run(scenario())
    first = seen[0]
    assert len(first) == len(set(first)) == senders_count * per_sender
    for index in range(senders_count):  # each sender's messages in the order sent
        mine = [m for m in first if m.startswith(f"{index}:")]
        assert mine == [f"{index}:{n}" for n in range(per_sender)]
    for other in seen[1:]:
        assert other == first


def slow_reader(port: int, path: str) -> RawClient:
    """A client that completes the handshake and then never reads, with a tiny window."""
    return RawClient(port, path, receive_buffer=4096)


def pump_with_a_slow_reader(server, path: str, messages: int = 150, size: int = 65536):
    """One sender, two fast readers and one that never reads; what the fast ones got."""

    async def scenario():
        fast = [await websocket_connect(server.ws_url + path, max_message_size=1 << 20)]
        fast.append(await websocket_connect(server.ws_url + path, max_message_size=1 << 20))
        slow = slow_reader(server.port, path)
        payload = b"x" * (size - 8)
        got = [0, 0]

        async def read(index: int) -> None:
            for _ in range(messages):
                message = await fast[index].read_message()
                assert message is not None
                got[index] += 1

        readers = [asyncio.ensure_future(read(i)) for i in range(2)]
        for n in range(messages):
            await fast[0].write_message(b"%08d" % n + payload, binary=True)
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        for client in fast:
            client.close()
        return got, slow

    return asyncio.run(scenario())


def test_a_client_that_never_reads_is_capped_and_the_others_get_everything(run_server):
    server = run_server("--mode", "broadcast", "--max-queue-bytes", "262144")
    got, slow = pump_with_a_slow_reader(server, "/ws/slowdrop")
    assert got == [150, 150]
    assert metric(server, "echoserver_broadcast_drops_total", channel="slowdrop") > 0
    assert "dropping messages for it" in server.log()
    slow.close()


def test_disconnect_policy_closes_the_slow_client_with_1013(run_server):
    server = run_server(
        "--mode", "broadcast", "--max-queue-bytes", "262144", "--slow-client", "disconnect"
    )
    got, slow = pump_with_a_slow_reader(server, "/ws/slowkick")
    assert got == [150, 150]
    assert metric(server, "echoserver_slow_client_disconnects_total", channel="slowkick") == 1
    assert wait_until(lambda: "close=1013" in server.log(), timeout=10)
    slow.close()


def test_history_then_live(run_server):
    server = run_server("--mode", "broadcast", "--history", "3")

    async def scenario():
        sender = await websocket_connect(server.ws_url + "/ws/hist")
        for n in range(5):
            await sender.write_message(f"old {n}")
            assert await sender.read_message() == f"old {n}"
        joiner = await websocket_connect(server.ws_url + "/ws/hist")
        past = [await joiner.read_message() for _ in range(3)]
        await sender.write_message("live")
        live = await joiner.read_message()
        sender.close()
        joiner.close()
        return past, live

    past, live = asyncio.run(scenario())
    assert past == ["old 2", "old 3", "old 4"]
    assert live == "live"


def test_deflate_and_plain_receivers_get_the_same_broadcasts(run_server):
    """Deflate receivers share one compressed frame (no context takeover), plain ones the
    plain frame; every receiver decodes every message, in order."""
    server = run_server("--mode", "broadcast", "--compression")
    messages: list[str | bytes] = [
        "compress me " * 200,
        b"\x00" * 5000,
        "compress me " * 200,  # the same again: no stale dictionary state
        "short",
        bytes(range(256)) * 20,
    ]

    async def scenario():
        plain = await websocket_connect(server.ws_url + "/ws/z")
        deflated = [
            await websocket_connect(server.ws_url + "/ws/z", compression_options={})
            for _ in range(2)
        ]
        received: list[list[str | bytes | None]] = [[], [], []]
        for n, message in enumerate(messages):
            sender = deflated[0] if n % 2 else plain  # compressed and plain senders
            await sender.write_message(message, binary=isinstance(message, bytes))
            for client, got in zip([plain, *deflated], received, strict=True):
                got.append(await client.read_message())
        extensions = deflated[0].headers.get("Sec-WebSocket-Extensions", "")
        for client in [plain, *deflated]:
            client.close()
        return received, extensions

    received, extensions = asyncio.run(scenario())
    assert "permessage-deflate" in extensions
    assert "server_no_context_takeover" in extensions
    for got in received:
        assert got == messages


def test_echo_mode_keeps_the_compression_context(run_server):
    server = run_server("--mode", "echo", "--compression")

    async def scenario():
        client = await websocket_connect(server.ws_url + "/ws", compression_options={})
        replies = []
        for message in ["again " * 100, "again " * 100]:
            await client.write_message(message)
            replies.append(await client.read_message())
        extensions = client.headers.get("Sec-WebSocket-Extensions", "")
        client.close()
        return replies, extensions

    replies, extensions = asyncio.run(scenario())
    assert replies == ["again " * 100] * 2
    assert "permessage-deflate" in extensions
    assert "server_no_context_takeover" not in extensions


def test_mixed_mode_counts_listeners_and_refuses_binary(run_server):
    server = run_server("--mode", "mixed")

    async def scenario():
        clients = [await websocket_connect(server.ws_url + "/ws/arena") for _ in range(3)]
        await clients[0].write_message(json.dumps({"type": "broadcast", "payload": "hi"}))
        for client in clients:
            assert json.loads(await client.read_message()) == {
                "type": "broadcast",
                "channel": "arena",
                "payload": "hi",
                "offset": 1,
                "epoch": ANY,
            }
        result = json.loads(await clients[0].read_message())
        await clients[1].write_message(b"\x01\x02", binary=True)
        error = json.loads(await clients[1].read_message())
        for client in clients:
            client.close()
        return result, error

    result, error = asyncio.run(scenario())
    assert result == {
        "type": "broadcastResult",
        "channel": "arena",
        "payload": "hi",
        "listenCount": 3,
        "offset": 1,
        "epoch": ANY,
    }
    assert error["type"] == "error"

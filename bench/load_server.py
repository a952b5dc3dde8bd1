"""`load.py server`: a picows reference server on the same routes as echoserver.

The ceiling a Python server could reach, used to check that the load client is not the
bottleneck (see bench/README.md): it echoes, or relays to every member of its channel.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import procs
from load_client import BINARY, CLOSE, log
from picows import WSFrame, WSListener, WSMsgType, WSTransport


class ServerSide(WSListener):
    """A picows server connection: echoes, or relays to every member of its channel."""

    def __init__(self, members: set[WSTransport] | None) -> None:
        self.members = members

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif kind in (BINARY, WSMsgType.TEXT):
            if self.members is None:
                transport.send(kind, frame.get_payload_as_memoryview())
            else:
                payload = frame.get_payload_as_bytes()
                for member in self.members:
                    member.send(kind, payload)


async def server_main(args: argparse.Namespace) -> dict[str, Any]:
    """A picows server on the same routes: the ceiling a Python server could reach, used to
    check that the load client is not the bottleneck (see bench/README.md)."""
    from picows import WSUpgradeRequest, ws_create_server

    procs.raise_nofile()
    channels: dict[str, set[WSTransport]] = {}

    def route(request: WSUpgradeRequest) -> ServerSide | None:
        path = request.path.decode()
        if path != "/ws" and not path.startswith("/ws/"):
            return None  # 404, which is answer enough for the benchmarks' readiness check
        if args.mode == "echo":
            return ServerSide(None)
        return ServerSide(channels.setdefault(path[4:] or "default", set()))

    server = await ws_create_server(route, args.host, args.port)
    log(f"reference picows server ({args.mode}) on ws://{args.host}:{args.port}/ws")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()
    return {"stopped": True}

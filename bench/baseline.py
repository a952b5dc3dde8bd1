"""The seed-style Tornado WebSocket server that the benchmarks measure echoserver against.

It is what a first Tornado WebSocket server looks like: `on_message` calls `write_message`
(echo), or loops `write_message` over the set of clients on the channel (broadcast). No
limits, no metrics, no pings, no backpressure, Tornado's defaults everywhere.

    python bench/baseline.py --mode echo|broadcast --port N [--uvloop]

Routes: /ws and /ws/<channel> (both modes; echo ignores the channel) and /healthz. It
prints one ready line on stdout once it listens and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal

import tornado.web
import tornado.websocket

CHANNEL = r"([A-Za-z0-9_.-]{1,64})"


class EchoHandler(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, channel: str = "default") -> None:
        pass

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


class BroadcastHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, channels: dict[str, set[BroadcastHandler]]) -> None:
        self.channels = channels
        self.channel = "default"

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, channel: str = "default") -> None:
        self.channel = channel
        self.channels.setdefault(channel, set()).add(self)

    def on_close(self) -> None:
        clients = self.channels.get(self.channel)
        if clients is not None:
            clients.discard(self)
            if not clients:
                del self.channels[self.channel]

    def on_message(self, message: str | bytes) -> None:
        binary = isinstance(message, bytes)
        for client in self.channels.get(self.channel, ()):
            try:  # noqa: SIM105 (a context manager per delivery would slow the baseline)
                client.write_message(message, binary=binary)
            except tornado.websocket.WebSocketClosedError:
                pass


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


def make_app(mode: str) -> tornado.web.Application:
    if mode == "echo":
        handler: type[tornado.websocket.WebSocketHandler] = EchoHandler
        kwargs: dict[str, object] = {}
    else:
        handler = BroadcastHandler
        kwargs = {"channels": {}}
    return tornado.web.Application(
        [
            (r"/ws", handler, kwargs),
            (rf"/ws/{CHANNEL}", handler, kwargs),
            (r"/healthz", HealthHandler),
        ]
    )


async def serve(mode: str, host: str, port: int, loop_name: str) -> None:
    server = make_app(mode).listen(port, address=host)
    print(f"baseline ready: {mode} mode, {loop_name}, ws://{host}:{port}/ws", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("echo", "broadcast"), default="echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8889)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop_name = "asyncio"
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop_name = "uvloop"
    asyncio.run(serve(args.mode, args.host, args.port, loop_name))


if __name__ == "__main__":
    main()

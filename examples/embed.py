"""Broadcast mode inside your own Tornado application.

    python examples/embed.py 8000

serves your own handler at http://127.0.0.1:8000/hello and echoserver's broadcast mode
under /rt: WebSocket clients on ws://127.0.0.1:8000/rt/ws/<channel> receive what anyone on
the same channel sends (and /rt/healthz, /rt/metrics, /rt/sse/<channel>, /rt/api/... work
too). SIGTERM or Ctrl-C closes the clients with 1001 and exits 0. See docs/embedding.md.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import tornado.web

from echoserver import embed


class Hello(tornado.web.RequestHandler):
    """One of your own handlers, next to the mounted ones."""

    def get(self) -> None:
        self.write("hello")


async def main(port: int) -> None:
    # The same layering as the command line: defaults < $ECHOSERVER_CONFIG file <
    # ECHOSERVER_* environment < these flags. ConfigError says what is wrong, in one line.
    settings = embed.settings(mode="broadcast", flags={"websocket.max_message_size": 64 * 1024})
    # The hub, broker (broadcast.broker: memory here), metrics and limits, under /rt.
    rt = embed.Realtime(settings, prefix="/rt")
    # Your handlers beside the mounted ones; app_settings() gives the server's access log.
    app = tornado.web.Application([*rt.routes(), (r"/hello", Hello)], **rt.app_settings())
    # Loopback only; to serve other hosts, set `host` or websocket.allowed_hosts so the
    # Host check under /rt admits the names clients use.
    server = app.listen(port, address="127.0.0.1")
    await rt.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on http://127.0.0.1:{port}/hello and ws://127.0.0.1:{port}/rt/ws/<channel>")
    await stop.wait()

    await rt.stop(timeout=5.0)  # new clients get 503 while the open ones close with 1001
    server.stop()
    await server.close_all_connections()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

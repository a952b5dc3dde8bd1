"""Embedding: the endpoints mounted in a user's own tornado.web.Application (echoserver.embed).

examples/embed.py runs as a user runs it, a subprocess on its own loop (the other one than
the test's, as for the server's own processes); the in-process tests mount the routes under
another prefix beside a handler of the test's own, on a plain Tornado HTTPServer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Iterator

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver import embed
from tests.conftest import ROOT, SERVER_LOOP, fetch, run
from tests.redis_server import free_port
from tests.servers import ServerProcess

EXAMPLE = ROOT / "examples" / "embed.py"
# The example on the chosen loop: as `python examples/embed.py PORT`, uvloop installed first.
UVLOOP_FIRST = (
    "import asyncio, runpy, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


# The example is up once it says where it listens.
EXAMPLE_READY = re.compile(r"listening on (http)://(127\.0\.0\.1):(\d+)/hello")


@pytest.fixture
def example() -> Iterator[ServerProcess]:
    port = free_port()
    program = [str(EXAMPLE), str(port)]
    if SERVER_LOOP == "uvloop":
        program[0:0] = ["-c", UVLOOP_FIRST]
    started = ServerProcess([], port=port, program=program, ready=EXAMPLE_READY)
    try:
        yield started.wait_ready()
    finally:
        started.kill()


async def receive(client: WebSocketClientConnection, timeout: float = 5.0) -> str | bytes | None:
    return await asyncio.wait_for(client.read_message(), timeout)


def test_the_example_serves_hello_and_broadcast_under_rt(example: ServerProcess) -> None:
    base = f"127.0.0.1:{example.port}"
    assert fetch(f"http://{base}/hello")[2] == b"hello"
    health = json.loads(fetch(f"http://{base}/rt/healthz")[2])
    assert (health["status"], health["mode"], health["path"]) == ("ok", "broadcast", "/rt/ws")
    # The server's own routes are not at the root: only what the example mounts.
    assert fetch(f"http://{base}/ws")[0] == 404

    async def scenario() -> int | None:
        a = await websocket_connect(f"ws://{base}/rt/ws/news")
        b = await websocket_connect(f"ws://{base}/rt/ws/news")
        other = await websocket_connect(f"ws://{base}/rt/ws/sports")
        a.write_message("from a")
        assert await receive(b) == "from a"
        assert await receive(a) == "from a"  # broadcast.include_sender
        b.write_message("from b")
        assert await receive(a) == "from b"
        assert await receive(b) == "from b"
        # Delivered to both on "news" already; the other channel's first message is its own.
        other.write_message("sports only")
        assert await receive(other) == "sports only"
        # The example's websocket.max_message_size is 64 KiB: the bound applies mounted too.
        other.write_message(b"x" * (64 * 1024 + 1), binary=True)
        assert await receive(other) is None
        code = other.close_code
        for client in (a, b):
            client.close()
        return code

    assert run(scenario()) == 1009
    assert example.stop() == 0, example.log()


def test_sigterm_closes_the_clients_with_1001_and_exits_0(example: ServerProcess) -> None:
    async def scenario() -> int | None:
        client = await websocket_connect(f"ws://127.0.0.1:{example.port}/rt/ws/news")
        client.write_message("hi")
        assert await receive(client) == "hi"
        example.proc.send_signal(signal.SIGTERM)
        assert await receive(client) is None
        return client.close_code

    assert run(scenario()) == 1001
    assert example.proc.wait(15) == 0, example.log()


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")


def test_mounted_under_another_prefix_in_an_application_of_our_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = embed.settings(
        mode="broadcast", env={}, config_path="", flags={"websocket.ping_interval": 0.0}
    )

    async def scenario() -> None:
        rt = embed.Realtime(settings, prefix="/live/v2")
        assert rt.websocket_path == "/live/v2/ws"
        app = tornado.web.Application([(r"/hello", Hello), *rt.routes()], **rt.app_settings())
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        await rt.start()
        base = f"127.0.0.1:{port}"
        http = AsyncHTTPClient()
        try:
            a = await websocket_connect(f"ws://{base}/live/v2/ws/room")
            b = await websocket_connect(f"ws://{base}/live/v2/ws/room")
            a.write_message("hi")
            assert await receive(b) == "hi"
            assert await receive(a) == "hi"  # broadcast.include_sender
            assert rt.connections == 2
            assert "echoserver_" in rt.metrics.render().decode()
            # The mounted routes check Host (DNS rebinding); the application's own do not.
            caplog.set_level(logging.DEBUG)
            for path in ("/live/v2/healthz", "/live/v2/ws/room", "/live/v2"):
                rebound = HTTPRequest(f"http://{base}{path}", headers={"Host": "evil.test"})
                with pytest.raises(HTTPClientError) as refused:
                    await http.fetch(rebound)
                assert refused.value.code == 403
            # Three refusals, one warning (the throttled one); the access lines at debug.
            assert [r.levelno >= logging.WARNING for r in caplog.records].count(True) == 1
            mine = await http.fetch(
                HTTPRequest(f"http://{base}/hello", headers={"Host": "evil.test"})
            )
            assert mine.body == b"hello"
            # stop(): the open clients get 1001, a new handshake 503 while the port is open.
            stopping = asyncio.ensure_future(rt.stop(timeout=5.0))
            assert await receive(a) is None and a.close_code == 1001
            assert await receive(b) is None and b.close_code == 1001
            with pytest.raises(HTTPClientError) as late:
                await websocket_connect(f"ws://{base}/live/v2/ws/room")
            assert late.value.code == 503
            await asyncio.wait_for(stopping, 5)
            assert rt.connections == 0
        finally:
            server.stop()
            await server.close_all_connections()
            http.close()

    run(scenario())


def test_echo_mode_mounted_at_the_root_beside_other_handlers() -> None:
    settings = embed.settings(
        mode="echo", env={}, config_path="", flags={"websocket.ping_interval": 0.0}
    )

    async def scenario() -> None:
        rt = embed.Realtime(settings)
        app = tornado.web.Application([*rt.routes(), (r"/hello", Hello)])
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        await rt.start()
        try:
            client = await websocket_connect(f"ws://127.0.0.1:{port}/ws")
            for n in range(3):
                client.write_message(f"echo {n}")
                assert await receive(client) == f"echo {n}"
            response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/hello")
            assert response.body == b"hello"
            client.close()
            await rt.stop(timeout=2.0)
        finally:
            server.stop()
            await server.close_all_connections()

    run(scenario())


@pytest.mark.parametrize("prefix", ["rt", "/rt/", "/"])
def test_a_prefix_is_a_path_without_a_trailing_slash(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        embed.Realtime(embed.settings(env={}, config_path=""), prefix=prefix)


def test_the_application_disconnects_a_user_itself() -> None:
    """A logout in the host application: disconnect_user() closes that user's sockets
    (4003) and nobody else's."""
    from tests.authkeys import SECRET, mint

    settings = embed.settings(
        mode="broadcast",
        env={},
        config_path="",
        flags={"websocket.ping_interval": 0.0, "auth.jwt_secret": SECRET},
    )

    async def scenario() -> None:
        rt = embed.Realtime(settings, prefix="/rt")
        app = tornado.web.Application(rt.routes())
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        await rt.start()
        try:
            url = f"ws://127.0.0.1:{port}/rt/ws/room?token="
            alice = [await websocket_connect(url + mint(sub="alice")) for _ in range(2)]
            bob = await websocket_connect(url + mint(sub="bob"))
            await rt.disconnect_user("alice")
            for tab in alice:
                assert await receive(tab) is None
                assert (tab.close_code, tab.close_reason) == (4003, "disconnected by the server")
            bob.write_message("still here")
            assert await receive(bob) == "still here"
            await rt.stop(timeout=2.0)
        finally:
            server.stop()
            await server.close_all_connections()

    run(scenario())

"""An idle WebSocket connection keeps none of its HTTP handshake once the socket is taken over.

Checked structurally, in-process (pytest-tornado's http_server), on whichever loop the
tests run: no Tornado request object survives a full GC while connections are open, the
handler's __dict__ holds only what the connection uses (nothing Tornado's HTTP side made),
and what it still refers to is not the application, the stream or the HTTP connection.
"""

from __future__ import annotations

import gc

import pytest
import tornado.httputil
import tornado.iostream
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.websocket import websocket_connect

from echoserver.endpoints.websocket import HTTP_ONLY, BaseSocket
from tests.conftest import make_settings

# What the handshake's HTTP side made, that an open connection must not keep alive.
HTTP_KINDS = (
    tornado.httputil.HTTPServerRequest,
    tornado.httputil.HTTPHeaders,
    tornado.iostream.IOStream,
    HTTP1Connection,
    tornado.web.Application,
)


def live_requests() -> list[tornado.httputil.HTTPServerRequest]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, tornado.httputil.HTTPServerRequest)]


def check_idle(handler: BaseSocket) -> None:
    assert not hasattr(handler, "request") or "request" not in vars(handler)
    left = set(vars(handler)) & HTTP_ONLY
    assert not left, f"kept after the take-over: {sorted(left)}"
    reached = list(gc.get_referents(handler)) + list(vars(handler).values())
    kept = [type(o).__name__ for o in reached if isinstance(o, HTTP_KINDS)]
    assert not kept, f"the handler still refers to {kept}"
    assert handler.record is not None  # what the access line at close needs
    assert handler.peer.startswith("127.0.0.1 /ws")


@pytest.mark.gen_test
async def test_echo_connections_keep_no_http_request(app, http_server, http_port):
    clients = [await websocket_connect(f"ws://127.0.0.1:{http_port}/ws") for _ in range(3)]
    handlers = list(app.server.connections)
    assert len(handlers) == 3
    for handler in handlers:
        check_idle(handler)
        assert len(vars(handler)) <= 12, sorted(vars(handler))  # rebuilt, not just emptied
    assert live_requests() == []
    clients[0].write_message("after the take-over")
    assert await clients[0].read_message() == "after the take-over"
    for client in clients:
        client.close()


class TestBroadcast:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast")

    @pytest.mark.gen_test
    async def test_members_keep_no_http_request(self, app, http_server, http_port):
        url = f"ws://127.0.0.1:{http_port}/ws/idle"
        clients = [await websocket_connect(url) for _ in range(3)]
        handlers = list(app.server.connections)
        assert len(handlers) == 3
        for handler in handlers:
            check_idle(handler)
        assert live_requests() == []
        # Still members: a broadcast reaches the others.
        clients[0].write_message("after the take-over")
        assert await clients[1].read_message() == "after the take-over"
        assert await clients[2].read_message() == "after the take-over"
        for client in clients:
            client.close()


class TestMixed:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="mixed")

    @pytest.mark.gen_test
    async def test_mixed_connections_keep_no_http_request(self, app, http_server, http_port):
        clients = [await websocket_connect(f"ws://127.0.0.1:{http_port}/ws") for _ in range(2)]
        for handler in list(app.server.connections):
            check_idle(handler)
        assert live_requests() == []
        for client in clients:
            client.close()

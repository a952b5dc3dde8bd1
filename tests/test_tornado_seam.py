"""The installed Tornado still has every internal the server relies on, as relied on.

A Tornado release that renames or changes one of them fails here, by name, instead of
changing the server's behaviour at run time. Also: nothing outside the seam module touches
a private Tornado name.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from pathlib import Path

import pytest
import tornado.http1connection
import tornado.httputil
import tornado.iostream
import tornado.web

from echoserver.transport import tornado_seam
from echoserver.transport.tornado_seam import INTERNALS

PACKAGE = Path(tornado_seam.__file__).parent.parent


def instance_attributes(owner: type) -> set[str]:
    """What an instance of owner has once made (and, for a handler, once cleared)."""
    if issubclass(owner, tornado.iostream.BaseIOStream):
        left, right = socket.socketpair()
        try:
            stream = tornado.iostream.IOStream(left)
            names = set(vars(stream))
            stream.close()
            return names
        finally:
            right.close()
    if issubclass(owner, tornado.http1connection.HTTP1Connection):
        source = inspect.getsource(owner.__init__)
        return set(re.findall(r"self\.(_\w+)\s*[:=]", source))
    source = inspect.getsource(owner.clear)  # RequestHandler.clear() sets the headers
    return set(re.findall(r"self\.(_\w+)\s*[:=]", source))


@pytest.mark.parametrize(
    ("owner", "name", "parameters"), INTERNALS, ids=[name for _, name, _ in INTERNALS]
)
def test_internal_is_there_as_relied_on(owner, name, parameters) -> None:
    if parameters is None:
        assert name in instance_attributes(owner), f"{owner.__name__}.{name} is gone"
        return
    function = getattr(owner, name, None)
    assert function is not None, f"{name} is gone"
    try:
        found = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # the C speedup has no signature: its behaviour is checked
        assert callable(function)
        return
    assert found == parameters


def test_seam_helpers_work_on_a_real_stream() -> None:
    left, right = socket.socketpair()
    try:
        stream = tornado.iostream.IOStream(left)
        assert tornado_seam.take_read_buffer(stream) == b""
        assert tornado_seam.unsent_bytes(stream) == 0
        stream.close()
    finally:
        right.close()
    assert tornado_seam.websocket_mask(b"\x01\x02\x03\x04", b"\x01\x02\x03\x04\x05") == (
        b"\x00\x00\x00\x00\x04"
    )


PRIVATE_USE = re.compile(
    r"from tornado[\w.]* import [^\n]*\b_\w+"  # importing a private name
    r"|\b(?:stream|handler|request|connection)\._(?!_)\w+"  # touching a Tornado object's
)


def test_nothing_else_touches_tornado_internals() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "tornado_seam.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_USE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize(("version", "chunked"), [("HTTP/1.1", True), ("HTTP/1.0", False)])
def test_chunked_response_reads_the_connection_s_framing(version: str, chunked: bool) -> None:
    # The request line as the connection would have read it, then the response's headers.
    async def framing() -> bool | None:
        left, right = socket.socketpair()
        try:
            stream = tornado.iostream.IOStream(left)
            connection = tornado.http1connection.HTTP1Connection(stream, is_client=False)
            connection._request_start_line = tornado.httputil.RequestStartLine(
                "GET", "/sse", version
            )
            connection._request_headers = tornado.httputil.HTTPHeaders()
            connection.write_headers(
                tornado.httputil.ResponseStartLine("HTTP/1.1", 200, "OK"),
                tornado.httputil.HTTPHeaders({"Content-Type": "text/event-stream"}),
            )
            found = tornado_seam.chunked_response(connection)
            stream.close()
            return found
        finally:
            right.close()

    assert asyncio.run(framing()) is chunked
    assert tornado_seam.chunked_response(object()) is None

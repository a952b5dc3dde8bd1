"""A TLS connection's transport: Tornado's SSLIOStream behind the asyncio transport calls.

A TLS socket's state cannot move to a new asyncio transport after Tornado's handshake, so
TLS connections stay on their SSLIOStream; StreamIO gives the connection the same
interface as an asyncio transport (write, pause/resume reading, close, abort, write
buffer size) and a read loop that feeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import tornado.iostream

from echoserver.transport.tornado_seam import unsent_bytes


class Reader(Protocol):
    def feed(self, data: bytes) -> None:
        """Bytes from the peer."""


class StreamIO:
    """The transport interface over a Tornado IOStream."""

    def __init__(
        self, stream: tornado.iostream.IOStream, reader: Reader, on_lost: Callable[[], None]
    ) -> None:
        self.stream = stream
        self.reader = reader
        self._reading = asyncio.Event()
        stream.set_close_callback(on_lost)

    async def read_loop(self) -> None:
        with contextlib.suppress(tornado.iostream.StreamClosedError):
            while not self.stream.closed():
                await self._reading.wait()
                data = await self.stream.read_bytes(65536, partial=True)
                self.reader.feed(data)
                # read_bytes answers at once while Tornado holds decrypted data, so without
                # this a busy peer would be served read after read, never yielding to the
                # loop: one read per connection per loop pass, as on the plain path.
                await asyncio.sleep(0)

    def write(self, data: bytes) -> None:
        if not self.stream.closed():
            self.stream.write(data).add_done_callback(_ignore_stream_closed)

    def get_write_buffer_size(self) -> int:
        return unsent_bytes(self.stream)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        if not self.stream.closed():
            self.stream.write(b"").add_done_callback(lambda _: self.stream.close())

    def abort(self) -> None:
        self.stream.close()

    def is_closing(self) -> bool:
        return self.stream.closed()

    def get_extra_info(self, name: str) -> object:
        return self.stream.socket if name == "socket" else None


def _ignore_stream_closed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so a closed stream is not logged as unhandled

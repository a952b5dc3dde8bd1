"""A plain WebSocket's socket after the handshake: reads, writes, pausing and closing on
one epoll per event loop, for a fraction of the memory of the loop's own transports.

An idle connection's largest part was the loop's transport: uvloop's TCPTransport with
its libuv handle, copied Context and bookkeeping, ~1.3 KB (asyncio's is similar), and
even a bare `loop.add_reader` registration is ~520 bytes. Here every connection's socket
is in one epoll (Poller) that the loop watches as a single reader; a connection costs
its SocketTransport (a few slots), its descriptor number and a dict entry.

SocketTransport keeps the asyncio transport semantics the connection relies on:

- each readable socket is read once (up to READ_SIZE) per loop pass and the bytes go to
  the owner's feed(); end of stream closes our side too;
- write() sends at once; what the kernel does not take is kept and sent when the socket
  is writable; past HIGH_WATER bytes kept the owner's pause_reading() is called, and
  resume_reading() once they are back under LOW_WATER (asyncio's pause_writing and
  resume_writing, which the connection answers that way);
- pause_reading()/resume_reading() take the socket out of and back into the epoll's
  read set (reading stays off once closing);
- close() closes once what is kept has been sent; abort() closes at once, dropping it
  (reset() before it makes that close a TCP reset); the owner's connection_lost() is
  called exactly once, from the loop, after the descriptor is closed.

Linux only (select.epoll); elsewhere the connection stays on the loop's transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
from typing import Protocol

log = logging.getLogger("echoserver.ws")

AVAILABLE = hasattr(select, "epoll")

READ_SIZE = 65536
# asyncio's and uvloop's default write-buffer limits.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024

_IN = getattr(select, "EPOLLIN", 0x001)
_OUT = getattr(select, "EPOLLOUT", 0x004)
_ERR = getattr(select, "EPOLLERR", 0x008)
_HUP = getattr(select, "EPOLLHUP", 0x010)
_READABLE = _IN | _ERR | _HUP  # an error or a hang-up is found by reading, or by writing
_WRITABLE = _OUT | _ERR | _HUP

# SocketTransport.flags (one int rather than two booleans: 16 bytes less per connection).
CLOSING = 1  # close() was called: the descriptor closes once what is kept has left
OWNER_PAUSED = 2  # the owner's pause_reading() was called for what is kept

# Called once or twice per message: module globals, not attribute lookups on os.
_read = os.read
_write = os.write


class Owner(Protocol):
    """What the transport calls (transport/connection.py's WebSocketConnection)."""

    def feed(self, data: bytes) -> None:
        """Bytes from the peer."""

    def pause_reading(self) -> None:
        """More than HIGH_WATER bytes wait for the peer to read them."""

    def resume_reading(self) -> None:
        """They are back under LOW_WATER."""

    def connection_lost(self) -> None:
        """The socket is closed."""


class Poller:
    """One epoll holding the sockets of one event loop's SocketTransports; the loop watches
    its descriptor. Closed when its last socket is (poller_for makes a new one)."""

    __slots__ = ("epoll", "loop", "transports")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.transports: dict[int, SocketTransport] = {}
        loop.add_reader(self.epoll.fileno(), self._ready)

    def _ready(self) -> None:
        """Serve every ready socket once (the loop calls this once per pass while any is)."""
        try:
            ready = self.epoll.poll(0)
        except (InterruptedError, ValueError):  # ValueError: closed earlier in this pass
            return
        transports = self.transports
        for fd, mask in ready:
            transport = transports.get(fd)
            if transport is None:
                continue
            try:
                if mask & _READABLE and transport.events & _IN:
                    transport.read_ready()
                if mask & _WRITABLE and transport.events & _OUT:
                    transport.write_ready()
            except Exception:
                # As the loop does with a callback that raises: logged, the others served.
                log.exception("serving a socket failed")

    def forget(self, fd: int, events: int) -> None:
        if events:
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
        self.transports.pop(fd, None)
        if not self.transports:
            self.close()

    def close(self) -> None:
        if _pollers.get(self.loop) is self:
            del _pollers[self.loop]
        if self.epoll.closed:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()

    def discard(self) -> None:
        """Its loop closed with sockets open (a test's, an embedder's): close them all."""
        for transport in list(self.transports.values()):
            fd, transport.fd, transport.events = transport.fd, -1, 0
            with contextlib.suppress(OSError):
                os.close(fd)
        self.transports.clear()
        self.close()


_pollers: dict[asyncio.AbstractEventLoop, Poller] = {}


def poller_for(loop: asyncio.AbstractEventLoop) -> Poller:
    """The running loop's poller."""
    poller = _pollers.get(loop)
    if poller is None:
        for stale in [p for other, p in _pollers.items() if other.is_closed()]:
            stale.discard()
        poller = _pollers[loop] = Poller(loop)
    return poller


class SocketTransport:
    """One connected, non-blocking TCP socket on the loop's Poller (see the module doc)."""

    __slots__ = ("_kept", "events", "fd", "flags", "owner", "poller")

    def __init__(
        self, sock: socket.socket, owner: Owner, poller: Poller, reading: bool = True
    ) -> None:
        sock.setblocking(False)
        self.owner = owner
        self.poller = poller
        self.events = 0  # what the epoll watches for this socket (0: not in it)
        self._kept: bytearray | None = None  # written, not yet taken by the kernel
        self.flags = 0  # CLOSING, OWNER_PAUSED
        self.fd = fd = sock.detach()  # the object goes; the descriptor is ours to close
        poller.transports[fd] = self
        if reading:
            self._watch(_IN)

    def _watch(self, events: int) -> None:
        if events == self.events:
            return
        epoll = self.poller.epoll
        if not self.events:
            epoll.register(self.fd, events)
        elif events:
            epoll.modify(self.fd, events)
        else:
            epoll.unregister(self.fd)
        self.events = events

    # --- reading -------------------------------------------------------------------------

    def read_ready(self) -> None:
        try:
            data = _read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer
            self._shut()
            return
        if data:
            self.owner.feed(data)
        else:  # end of stream: close our side too, once what is kept has left
            self.close()

    def pause_reading(self) -> None:
        if self.fd >= 0:
            self._watch(self.events & ~_IN)

    def resume_reading(self) -> None:
        if self.fd >= 0 and not self.flags & CLOSING:
            self._watch(self.events | _IN)

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        kept = self._kept
        if kept is not None:
            kept += data
        elif data:
            try:
                sent = _write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the peer is gone (or we closed: fd is -1)
                self._shut()
                return
            if sent == len(data):
                return
            self._kept = kept = bytearray(memoryview(data)[sent:])
            self._watch(self.events | _OUT)
        else:
            return
        if len(kept) > HIGH_WATER and not self.flags & OWNER_PAUSED:
            self.flags |= OWNER_PAUSED
            self.owner.pause_reading()

    def write_ready(self) -> None:
        kept = self._kept
        if kept is None:
            return
        try:
            sent = _write(self.fd, kept)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._shut()
            return
        del kept[:sent]
        if self.flags & OWNER_PAUSED and len(kept) <= LOW_WATER:
            self.flags &= ~OWNER_PAUSED
            self.owner.resume_reading()
        if kept or self.fd < 0:
            return
        self._kept = None
        if self.flags & CLOSING:
            self._shut()
        else:
            self._watch(self.events & ~_OUT)

    def get_write_buffer_size(self) -> int:
        kept = self._kept
        return 0 if kept is None else len(kept)

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close once what is kept has been sent; no more reading."""
        if self.flags & CLOSING or self.fd < 0:
            return
        self.flags |= CLOSING
        if self._kept is None:
            self._shut()
        else:
            self._watch(self.events & ~_IN)

    def abort(self) -> None:
        """Close now, dropping what is kept."""
        self._shut()

    def reset(self) -> None:
        """Make the coming close a TCP reset (SO_LINGER 0)."""
        if self.fd < 0:
            return
        sock = socket.socket(fileno=self.fd)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.detach()

    def is_closing(self) -> bool:
        return bool(self.flags & CLOSING) or self.fd < 0

    def get_extra_info(self, name: str) -> object:
        return None

    def _shut(self) -> None:
        """The one place the descriptor is closed; the owner hears of it once, from the loop."""
        fd = self.fd
        if fd < 0:
            return
        self.fd = -1
        self._kept = None
        self.poller.forget(fd, self.events)
        self.events = 0
        with contextlib.suppress(OSError):
            os.close(fd)
        self.poller.loop.call_soon(self.owner.connection_lost)

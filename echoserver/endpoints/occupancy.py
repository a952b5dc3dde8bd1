"""Who holds a connection slot: every client connection the server accepted, counted per
process and per client address, whatever it is now (an HTTP request in flight, an event
stream, a WebSocket).

A slot is taken when a connection is accepted (runtime/intake.py) and given back exactly once when
it ends: by the HTTP side when the connection leaves Tornado's HTTP loop (closed, timed
out, an event stream ended), unless a WebSocket endpoint took the slot over when it
detached the connection, in which case the endpoint gives it back when the WebSocket
closes. So a handshake that upgrades is counted once, from accept to close. No I/O here.

Whether a connection may become a WebSocket or an event stream (a "stream": it will hold
its slot for long) is decided first come, first served: the streams already open or being
opened, plus the plain HTTP connections accepted before this one and still held, must be
fewer than max_connections. So idle HTTP connections keep newer clients out, but a burst
of handshakes arriving together cannot refuse each other: the oldest ones get in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

# Connections accepted past max_connections for plain HTTP only: a full server still
# answers /healthz, /metrics and the page, while a WebSocket or an event stream past
# max_connections gets 503. Past max_connections + HEADROOM a connection is refused at
# accept, whatever it asks for.
HEADROOM = 8


class Slot:
    """One accepted connection's place in the counts."""

    __slots__ = ("_occupancy", "address", "held", "key", "stream")

    def __init__(self, occupancy: Occupancy, key: Hashable | None, address: str) -> None:
        self._occupancy = occupancy
        self.key = key
        self.address = address
        self.held = True
        self.stream = False  # a WebSocket or an event stream, open or being opened

    def release(self) -> None:
        if self.held:
            self.held = False
            self._occupancy._give_back(self)


class Occupancy:
    """Slots per process and per address, and the caps they are held to (0 = no cap)."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self.streams = 0  # slots that are streams
        self.by_address: dict[str, int] = {}
        self._in_http: dict[Hashable, Slot] = {}  # by stream, while Tornado's HTTP owns it
        # The slots in _in_http that are not streams, in the order they were accepted: what
        # stream_refused() walks, so thousands of open event streams do not slow a handshake.
        self._plain: dict[Hashable, Slot] = {}
        # Called whenever a slot is given back (the accept loop resumes at once if it paused).
        self.on_release: Callable[[], None] | None = None

    def refusal(self, address: str) -> str | None:
        """Why a new connection from `address` is refused at accept ("full",
        "per_address"), or None."""
        if self.max_per_address and self.by_address.get(address, 0) >= self.max_per_address:
            return "per_address"
        if self.max_connections and self.total >= self.max_connections + HEADROOM:
            return "full"
        return None

    def admit(self, key: Hashable, address: str) -> Slot:
        """A slot for a connection just accepted, held by the HTTP side under `key`."""
        slot = Slot(self, key, address)
        self.total += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self._in_http[key] = slot
        self._plain[key] = slot
        return slot

    def holds(self, key: Hashable) -> bool:
        """Whether the connection under `key` is counted here (served by our server)."""
        return key in self._in_http

    def take(self, key: Hashable) -> Slot | None:
        """The WebSocket endpoint takes its connection's slot over from the HTTP side."""
        self._plain.pop(key, None)
        slot = self._in_http.pop(key, None)
        if slot is not None:
            slot.key = None  # the HTTP stream it was filed under is not kept alive with it
        return slot

    def move(self, old: Hashable, new: Hashable) -> None:
        """The connection held by the HTTP side under `old` is now under `new` (the
        publish lane took it over, or gave it back): still counted once, among the plain
        HTTP connections as the newest."""
        slot = self._in_http.pop(old, None)
        if slot is None:
            return
        slot.key = new
        self._in_http[new] = slot
        if self._plain.pop(old, None) is not None:
            self._plain[new] = slot

    def leave_http(self, key: Hashable) -> None:
        """The connection left Tornado's HTTP loop: its slot goes back unless taken."""
        self._plain.pop(key, None)
        slot = self._in_http.pop(key, None)
        if slot is not None:
            slot.release()

    def stream_refused(self, key: Hashable) -> bool:
        """Whether the connection in HTTP under `key` may not become a stream now: the
        streams and the older plain HTTP connections already fill max_connections."""
        if not self.max_connections:
            return False
        older = 0
        for other in self._plain:  # in the order they were accepted
            if other is key:
                break
            older += 1
        return self.streams + older >= self.max_connections

    def begin_stream(self, key: Hashable) -> Slot | None:
        """The connection under `key` is becoming a stream: its slot, counted as one."""
        slot = self._in_http.get(key)
        if slot is not None and not slot.stream:
            slot.stream = True
            self.streams += 1
            self._plain.pop(key, None)
        return slot

    def end_stream(self, slot: Slot | None) -> None:
        """The stream ended, or never began, and its connection may stay in HTTP."""
        if slot is not None and slot.stream and slot.held:
            slot.stream = False
            self.streams -= 1
            if slot.key in self._in_http:  # back among the plain ones, as the newest
                self._plain[slot.key] = slot

    def _give_back(self, slot: Slot) -> None:
        self.total -= 1
        if slot.stream:
            self.streams -= 1
        left = self.by_address[slot.address] - 1
        if left:
            self.by_address[slot.address] = left
        else:
            del self.by_address[slot.address]
        if self.on_release is not None:
            self.on_release()

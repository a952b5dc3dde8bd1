"""Which Host header values the server answers: the DNS-rebinding defence.

A page on attacker.example whose name is rebound to 127.0.0.1 reaches a developer's local
server as a same-origin request, with `Host: attacker.example:PORT`. The server refuses a
Host it does not recognise (websocket.allowed_hosts) on every route, since a rebound page
reads responses too. This module owns that rule and the parsing of a Host or origin
authority into (name, port). It is sans-I/O: no Tornado, no asyncio.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# The names a loopback listener answers by default, besides its configured host.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


# Every request's Host goes through it, and a client sends the same one every time: the
# parse (urlsplit) was a noticeable share of a publish request's own CPU.
@functools.lru_cache(maxsize=256)
def split_authority(authority: str, scheme: str = "http") -> tuple[str, int] | None:
    """(lower-case name, port) of `host[:port]` (IPv6 in brackets, kept); the scheme's
    default port when none is given. None when it is not an authority at all."""
    text = authority.strip()
    if not text or any(ch in text for ch in "/?#@\\"):
        return None
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:  # "[::1", ":99999", "a:b"
        return None
    name = (parts.hostname or "").rstrip(".")
    if not name:
        return None
    if ":" in name:  # urlsplit drops the brackets of an IPv6 literal
        name = f"[{name}]"
    return name, port if port is not None else DEFAULT_PORTS.get(scheme, 80)


def is_loopback(host: str) -> bool:
    """Whether the configured listen address is a loopback one (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The Host values admitted: any (`names` None), or names each with a port or None
    (any port)."""

    names: frozenset[tuple[str, int | None]] | None

    @classmethod
    def build(cls, listen_host: str, allowed_hosts: Iterable[str]) -> HostPolicy:
        """The policy for websocket.allowed_hosts on a server listening on `listen_host`."""
        items = tuple(allowed_hosts)
        if items == ("*",) or (not items and not is_loopback(listen_host)):
            return cls(None)
        if not items:
            own = listen_host.strip().lower()
            if ":" in own and not own.startswith("["):
                own = f"[{own}]"
            items = (*LOOPBACK_NAMES, own)
        names: set[tuple[str, int | None]] = set()
        for item in items:
            parsed = split_authority(item)
            if parsed is None:
                continue  # config refuses such items; nothing to match
            name, port = parsed
            names.add((name, port if ":" in item.rsplit("]", 1)[-1] else None))
        return cls(frozenset(names))

    def allows(self, host: str | None) -> bool:
        """Whether a request with this Host header (None: no header) is answered.

        A request without Host (HTTP/1.0) is not a browser's, so not a rebound page's: it
        is admitted.
        """
        if self.names is None or host is None:
            return True
        parsed = split_authority(host)
        if parsed is None:
            return False
        name, port = parsed
        return (name, None) in self.names or (name, port) in self.names


class Throttle:
    """At most one line per `interval` seconds, counting the ones it held back: what a
    client can make the server log at INFO or above by being refused stays bounded."""

    __slots__ = ("_held_back", "_next", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._held_back = 0

    def ready(self, now: float) -> int | None:
        """The count held back since the last line when one may be written now, else None."""
        if now < self._next:
            self._held_back += 1
            return None
        held_back, self._held_back = self._held_back, 0
        self._next = now + self.interval
        return held_back

"""The HTTP/1.1 requests the publish lane serves, parsed strictly, and its answers' bytes.

Sans-I/O: parse_head() reads a request's line and headers from the start of a buffer, and
gives a Head only for a plainly well-formed `POST <path> HTTP/1.1` whose body has a
Content-Length: single spaces in the request line, CRLF line ends, token header names,
values without control characters, each header once, no Transfer-Encoding, Expect or
Upgrade, Connection absent or keep-alive, no query string. Anything else is HAND_BACK:
the connection goes back to Tornado with the bytes read, so whatever Tornado answers a
request it answers here too (the lane never answers a request it does not fully
understand). response_head() gives the bytes Tornado's HTTP1Connection writes for an
HTTP/1.1 keep-alive answer with a Content-Length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

# A request whose line and headers are not whole within this many bytes goes back to
# Tornado (which reads up to its own, larger, max_header_size and answers as it does).
HEAD_LIMIT: Final = 8192

# Tornado ends the headers at the first \r?\n\r?\n: anything but CRLF CRLF is handed back.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_REFUSED_HEADERS = frozenset(("Transfer-Encoding", "Expect", "Upgrade"))


class HandBack:
    """parse_head()'s answer for a request the lane leaves to Tornado."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HAND_BACK"


HAND_BACK: Final = HandBack()


class Head:
    """A request's line and headers: its path, its headers (names as Tornado normalises
    them), its body's length and where the body starts in the buffer."""

    __slots__ = ("headers", "length", "path", "size")

    def __init__(self, path: str, headers: dict[str, str], length: int, size: int) -> None:
        self.path = path
        self.headers = headers
        self.length = length
        self.size = size


@lru_cache(maxsize=256)
def normalise(name: str) -> str:
    """A header name as tornado.httputil.HTTPHeaders files it (Content-Type)."""
    return "-".join(word.capitalize() for word in name.split("-"))


def parse_head(buffer: bytes | bytearray) -> Head | HandBack | None:
    """The request at the start of `buffer`: a Head, HAND_BACK, or None while its headers
    are not whole (and under HEAD_LIMIT)."""
    match = _HEAD_END.search(buffer, 0, HEAD_LIMIT + 4)
    if match is None:
        return HAND_BACK if len(buffer) > HEAD_LIMIT else None
    end = match.start()
    if match.end() - end != 4:
        return HAND_BACK
    try:
        text = bytes(buffer[:end]).decode("ascii")
    except UnicodeDecodeError:
        return HAND_BACK
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "POST" or parts[2] != "HTTP/1.1":
        return HAND_BACK
    path = parts[1]
    if not path.startswith("/") or "?" in path or "#" in path:
        return HAND_BACK
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name) or _BAD_VALUE.search(value):
            return HAND_BACK  # also a line folded onto the one before (starts with a space)
        name = normalise(name)
        if name in headers or name in _REFUSED_HEADERS:
            return HAND_BACK
        headers[name] = value.strip(" \t")
    length = headers.get("Content-Length")
    if length is None or not length.isdigit() or len(length) > 18:
        return HAND_BACK
    connection = headers.get("Connection")
    if connection is not None and connection.lower() != "keep-alive":
        return HAND_BACK
    return Head(path, headers, int(length), match.end())


def response_head(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An answer's status line and headers, as Tornado's HTTP1Connection writes them."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")

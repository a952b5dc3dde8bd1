"""The WebSocket opening handshake (RFC 6455 section 4.2), decided in our own code.

This module owns who is let in and what the 101 says: the upgrade request's checks, the
origin policy, the token check and the Sec-WebSocket-Accept value. It knows nothing of
Tornado: handlers give it header values and act on its answer, so a change in Tornado's own
upgrade logic cannot change who is let in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from echoserver.wire.hosts import split_authority

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# 13 is RFC 6455; 7 and 8 are the drafts before it, whose framing is the same.
VERSIONS = ("7", "8", "13")

Headers = Callable[[str], "str | None"]  # a case-insensitive header lookup


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer other than 101: the HTTP status, the metric reason and a short message;
    `detail`, when given, is what the server's log says instead of the message (why a
    token was refused is not the client's to learn)."""

    status: int
    reason: str
    message: str
    detail: str = ""


def check_upgrade(method: str, header: Headers) -> Refusal | None:
    """The request's own validity as a WebSocket upgrade (400, or 426 for the version)."""
    if method != "GET":
        return Refusal(405, "bad_request", "a WebSocket handshake is a GET")
    if (header("Upgrade") or "").strip().lower() != "websocket":
        return Refusal(400, "bad_request", 'Can "Upgrade" only to "WebSocket".')
    tokens = {t.strip().lower() for t in (header("Connection") or "").split(",")}
    if "upgrade" not in tokens:
        return Refusal(400, "bad_request", '"Connection" must be "Upgrade".')
    key = header("Sec-WebSocket-Key") or ""
    if not header("Host") or not valid_key(key):
        return Refusal(400, "bad_request", "Missing/Invalid WebSocket headers")
    if header("Sec-WebSocket-Version") not in VERSIONS:
        return Refusal(426, "version", "Upgrade Required")
    return None


def valid_key(key: str) -> bool:
    """A Sec-WebSocket-Key is 16 random bytes in base64 (RFC 6455 4.1)."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    digest = hashlib.sha1(key.strip().encode("ascii") + GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def request_origin(header: Headers) -> str | None:
    """The browser's origin: Origin (RFC 6455), else Sec-WebSocket-Origin (drafts 7 and 8)."""
    origin = header("Origin")
    return origin if origin is not None else header("Sec-WebSocket-Origin")


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(
    origin: str | None, allowed: Collection[str], host: str, scheme: str = "http"
) -> bool:
    """The origin policy (websocket.allowed_origins, normalised):

    - no origin at all: not a browser, let in (tokens are how such clients are checked);
    - ["*"]: any origin;
    - an explicit list: exactly those origins, the server's own host included only if listed;
    - empty list: the server's own origin only: the request's `scheme` (http, or https
      over TLS), and the host and port of its Host header (default ports normalised).
    A malformed origin is refused, never an error.
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    if allowed:
        return normalise_origin(origin) in allowed
    try:
        parts = urlsplit(origin.strip())
    except ValueError:  # "http://[": not an origin at all
        return False
    origin_scheme = parts.scheme.lower()
    if origin_scheme != scheme or parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    theirs = split_authority(parts.netloc, origin_scheme)
    return theirs is not None and theirs == split_authority(host, scheme)


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a client's token with the configured one."""
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when the header does not
    name the Bearer scheme.

    A header that names it is the credential even when the token is empty ("Bearer", as
    HTTP parsers leave "Bearer " once trailing space is stripped): it is then a wrong
    token, never a reason to look for one elsewhere (?token=).
    """
    value = authorization or ""
    scheme = value[:6]
    if scheme.lower() != "bearer" or value[6:7] not in ("", " "):
        return None
    return value[7:]

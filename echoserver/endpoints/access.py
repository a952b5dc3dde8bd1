"""The access log: one line per HTTP request, and one per WebSocket connection when it ends.

A WebSocket's line is written when it closes, so it carries the close code; health probes
and metric scrapes log at debug unless they fail. request.path has no query string, so a
?token= never reaches the log. The JSON formatter keeps the fields apart (extra["access"]);
in a text line a value a client chose (its Origin, its path) is written as logfmt does:
bare when it is plain URL characters, else in double quotes with JSON escapes, so it cannot
forge another field (`origin="x status=101"`) or a line break.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

import tornado.httputil
import tornado.web

access_log = logging.getLogger("echoserver.access")

# What a text line may show unquoted: URL characters, but no "=", quote, space or control.
BARE = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;%-]+")


def text_value(value: str | None) -> str:
    """A client-chosen value for a text access line: "-" when absent, quoted when needed."""
    if value is None:
        return "-"
    return value if BARE.fullmatch(value) else json.dumps(value)


class RequestRecord:
    """What an access line needs of a request. A WebSocket connection keeps this for its
    lifetime instead of the request itself (its headers, arguments and strings are ~2 KB)."""

    __slots__ = ("method", "origin", "path", "remote_ip", "started")

    def __init__(
        self, request: tornado.httputil.HTTPServerRequest, address: str | None = None
    ) -> None:
        """`address`: the same peer address as a string already kept elsewhere (the
        connection's slot), kept instead of the request's equal copy."""
        remote_ip = request.remote_ip
        self.remote_ip = address if address == remote_ip else remote_ip
        # Interned: thousands of connections share a few methods, paths and origins.
        method, origin = request.method, request.headers.get("Origin")
        self.method = None if method is None else sys.intern(method)
        self.path = sys.intern(request.path)
        self.origin = None if origin is None else sys.intern(origin)
        self.started = time.time() - request.request_time()

    def request_time(self) -> float:
        return time.time() - self.started


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The Application's log_function."""
    if not handler.application.settings.get("access_log", True):
        return
    status = handler.get_status()
    if status == 101 and getattr(handler, "logs_own_access", False):
        return  # logged when the connection closes, with its close code
    # Probes and scrapes come every few seconds: only worth a line when they fail.
    quiet = getattr(handler, "quiet_when_ok", False) and status < 500
    record = RequestRecord(handler.request)
    write_access_line(record, status, level=logging.DEBUG if quiet else None)


def write_access_line(
    request: RequestRecord,
    status: int,
    close: int | None = None,
    level: int | None = None,
) -> None:
    fields: dict[str, Any] = {
        "peer": request.remote_ip,
        "method": request.method,
        "path": request.path,
        "origin": request.origin,
        "status": status,
        "duration": round(request.request_time(), 6),
    }
    text = (
        "%(peer)s %(method)s %(path)s status=%(status)d origin=%(origin)s duration=%(duration).3fs"
    )
    if close is not None:
        fields["close"] = int(close)
        text += " close=%(close)d"
    if level is None:
        level = logging.INFO if status < 500 else logging.WARNING
    shown = {**fields, "path": text_value(request.path), "origin": text_value(request.origin)}
    access_log.log(level, text, shown, extra={"access": fields})

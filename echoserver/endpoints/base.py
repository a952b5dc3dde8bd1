"""What every HTTP response of the server shares, whatever its route.

BaseHandler is the base of every handler the server mounts (the page and its assets, the
JSON routes, /metrics, the WebSocket and SSE endpoints). It owns the headers every response
carries (a `Server` that names no version, `X-Content-Type-Options: nosniff`) and how
Tornado's lines about a failed request are written: the request summarised without its
query string, an uncaught exception without the request's repr (whose URI has the query),
and no raw request value quoted back. HostRefused answers a Host that
websocket.allowed_hosts does not admit (hosts.py decides); NotFound is every unmatched
route's 404, so it carries the same headers.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

import tornado.web
from tornado.log import app_log, gen_log

from echoserver.endpoints.context import ServerContext
from echoserver.transport.tornado_seam import SummaryHandler

log = logging.getLogger("echoserver.http")

SERVER = "echoserver"  # the Server header: no version for a scanner to match
# Tornado's message when a path or query argument is not UTF-8 goes on with the raw value
# (a ?token= among them), which is not for the log: only the argument's name is kept.
INVALID_UNICODE = "Invalid unicode in "


class BaseHandler(SummaryHandler):
    # The server-wide state, from the route's init kwargs ({"server": ...}), so a handler
    # works mounted in any Application (web.app builds every route with it).
    server: ServerContext

    def initialize(self, server: ServerContext) -> None:
        self.server = server

    def set_default_headers(self) -> None:
        self.set_header("Server", SERVER)
        self.set_header("X-Content-Type-Options", "nosniff")

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(value, tornado.web.HTTPError):
            template = value.log_message
            if not template:
                return
            message = template % value.args if value.args else template
            if message.startswith(INVALID_UNICODE):
                message = message.split(":", 1)[0]
            gen_log.warning("%d %s: %s", value.status_code, self.summary(), message)
        else:
            app_log.error("Uncaught exception %s", self.summary(), exc_info=value or True)


class HostRefused(BaseHandler):
    """403 for a Host that websocket.allowed_hosts does not admit, on any route and method.

    Its access line is at debug, and the warning is throttled (hosts.Throttle): a client
    cannot make the server write more than one INFO-or-above line per interval this way.
    """

    quiet_when_ok = True  # the access line at debug: see above

    def prepare(self) -> None:
        server = self.server
        request = self.request
        host = request.headers.get("Host", "")
        held_back = server.refused_hosts.ready(time.monotonic())
        if held_back is not None:
            log.warning(
                "refused Host %r from %s: not in websocket.allowed_hosts (%d more refused "
                "since the last such line; each is logged at debug)",
                host[:100],
                request.remote_ip,
                held_back,
            )
        else:
            log.debug("refused Host %r from %s", host[:100], request.remote_ip)
        self.set_status(403)
        self.finish("host not allowed\n")


class NotFound(BaseHandler):
    """The 404 of every path no route matches."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)

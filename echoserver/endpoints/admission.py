"""Who may open a long-lived connection: a WebSocket (websocket.py) or an event stream (sse.py).

AdmittedHandler is the base of both endpoints. It owns the server's admission policy, in
this order: a draining server answers 503, a missing or wrong token 401, a full server 503,
and a browser origin that is not allowed 403. Each refusal is counted by reason in
/metrics and logged without the query string (it may hold the token). The decisions
themselves (token comparison, the origin rule) are handshake.py's.
"""

from __future__ import annotations

import logging
import re

import tornado.web

from echoserver.endpoints.base import BaseHandler
from echoserver.wire.handshake import (
    Refusal,
    bearer_token,
    origin_allowed,
    request_origin,
    token_matches,
)

log = logging.getLogger("echoserver.ws")

# An offset a client resumes after (?since=N, Last-Event-ID): a non-negative integer
# (Redis counts to 2**63 - 1).
OFFSET = re.compile(r"[0-9]{1,18}")
BAD_OFFSET = Refusal(400, "bad_request", "since must be an offset: a non-negative integer")


def parse_offset(text: str) -> int | Refusal:
    """An offset a client resumes after, or the 400 that refuses it."""
    return int(text) if OFFSET.fullmatch(text) else BAD_OFFSET


class AdmittedHandler(BaseHandler):
    """A handler whose connections count against max_connections and obey the policy."""

    @property
    def peer(self) -> str:
        return f"{self.request.remote_ip} {self.request.path}"

    def policy_refusal(self, reserved: int = 0) -> Refusal | None:
        """Why the server will not take this connection now, or None.

        `reserved`: connections under way that count against max_connections besides the
        open ones (WebSocket handshakes in flight).
        """
        server = self.server
        ws = server.config.websocket
        if server.draining:
            return Refusal(503, "draining", "server is shutting down")
        if ws.auth_token and not self._token_ok(ws.auth_token):
            return Refusal(401, "auth", "missing or wrong token")
        if ws.max_connections and self._full(reserved):
            return Refusal(503, "full", "server is full")
        origin = request_origin(self.request.headers.get)
        if not origin_allowed(
            origin, server.allowed_origins, self.request.host, self.request.protocol
        ):
            return Refusal(403, "origin", f"origin {origin!r} not allowed")
        return None

    def _full(self, reserved: int) -> bool:
        """Whether the others already fill max_connections: the streams and the older
        connections in HTTP when the server holds this one's slot (occupancy.py), else
        the open connections and the `reserved`."""
        server = self.server
        occupancy = server.occupancy
        if occupancy.holds(self.stream_key()):
            return occupancy.stream_refused(self.stream_key())
        return len(server.connections) + reserved >= server.config.websocket.max_connections

    def stream_key(self) -> object:
        """What the connection's slot is filed under: its stream."""
        return getattr(self.request.connection, "stream", None)

    def _token_ok(self, expected: str) -> bool:
        given = bearer_token(self.request.headers.get("Authorization"))
        if given is None:
            try:
                given = self.get_query_argument("token", "")
            except tornado.web.HTTPError:  # not UTF-8: a wrong token, and not for the log
                return False
        return token_matches(given, expected)

    def offset_argument(self, *names: str) -> int | Refusal | None:
        """The first of the query arguments `names` as an offset; None when absent."""
        for name in names:
            values = self.request.query_arguments.get(name)
            if values is None:
                continue
            return parse_offset(values[0].decode("latin-1")) if len(values) == 1 else BAD_OFFSET
        return None

    def refuse(self, refusal: Refusal) -> None:
        self.server.metrics.handshakes_refused[refusal.reason] += 1
        request = self.request
        log.info("refused %s from %s: %s", request.path, request.remote_ip, refusal.message)
        self.set_status(refusal.status)
        self.finish(refusal.message)

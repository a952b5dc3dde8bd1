"""Who may open a long-lived connection: a WebSocket (websocket.py) or an event stream (sse.py).

AdmittedHandler is the base of both endpoints. It owns the server's admission policy, in
this order: a draining server answers 503, a missing or wrong shared token 401, a full
server 503, a browser origin that is not allowed 403; then (authenticate()) a connection
token (JWT) that does not verify 401, and (join_refusal()) a channel the identity's rights
do not open 403. Each refusal is counted by reason in /metrics and logged without the query
string (it may hold the token); why a token was refused is logged, never told the client.
The decisions themselves are handshake.py's (token comparison, the origin rule) and the
auth package's (tokens, rights).
"""

from __future__ import annotations

import logging
import re

import tornado.web

from echoserver.auth.identity import GUEST, Identity
from echoserver.auth.verifier import TokenRefused
from echoserver.endpoints.base import BaseHandler
from echoserver.wire.handshake import (
    Refusal,
    bearer_token,
    origin_allowed,
    request_origin,
    token_matches,
)
from echoserver.wire.positions import valid_epoch

log = logging.getLogger("echoserver.ws")

# An offset a client resumes after (?since=N, Last-Event-ID): a non-negative integer
# (Redis counts to 2**63 - 1).
OFFSET = re.compile(r"[0-9]{1,18}")
BAD_OFFSET = Refusal(400, "bad_request", "since must be an offset: a non-negative integer")
BAD_EPOCH = Refusal(400, "bad_request", "epoch must be one this server gave (A-Z a-z 0-9 _ -)")
# What a client whose token was refused learns: the status, never which check failed.
BAD_TOKEN_MESSAGE = "missing or invalid token"


def parse_offset(text: str) -> int | Refusal:
    """An offset a client resumes after, or the 400 that refuses it."""
    return int(text) if OFFSET.fullmatch(text) else BAD_OFFSET


class AdmittedHandler(BaseHandler):
    """A handler whose connections count against max_connections and obey the policy."""

    identity: Identity = GUEST  # who the client is, once authenticate() let it in

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
        given = self.given_token()
        return given is not None and token_matches(given, expected)

    def given_token(self) -> str | None:
        """The client's token: Authorization: Bearer, else ?token= ("" when neither; None
        when the argument is not UTF-8, which is a wrong token and not for the log)."""
        given = bearer_token(self.request.headers.get("Authorization"))
        if given is None:
            try:
                given = self.get_query_argument("token", "")
            except tornado.web.HTTPError:
                return None
        return given

    async def authenticate(self) -> Refusal | None:
        """Verify the client's connection token (with JWT keys set): sets self.identity,
        or logs why not and returns the 401."""
        authority = self.server.authority
        if not authority.uses_tokens:
            return None
        token = self.given_token()
        try:
            if token is None:
                raise TokenRefused("a token that is not UTF-8", "malformed")
            self.identity = await authority.identify(token)
        except TokenRefused as refused:
            self.server.metrics.tokens_refused[refused.label] += 1
            return Refusal(401, "auth", BAD_TOKEN_MESSAGE, f"token refused: {refused.reason}")
        return None

    def join_refusal(self, channel: str) -> Refusal | None:
        """403 when the identity's rights do not let it join the channel."""
        why = self.server.authority.rights.join_refusal(self.identity, channel)
        if why is None:
            return None
        who = self.identity.sub or "a guest"
        return Refusal(403, "forbidden", f"not allowed to join {channel}", f"{who[:64]}: {why}")

    def offset_argument(self, *names: str) -> int | Refusal | None:
        """The first of the query arguments `names` as an offset; None when absent."""
        for name in names:
            values = self.request.query_arguments.get(name)
            if values is None:
                continue
            return parse_offset(values[0].decode("latin-1")) if len(values) == 1 else BAD_OFFSET
        return None

    def epoch_argument(self) -> str | Refusal | None:
        """The ?epoch= query argument (the epoch of ?since=); None when absent or empty."""
        values = self.request.query_arguments.get("epoch")
        if values is None:
            return None
        text = values[0].decode("latin-1") if len(values) == 1 else "\n"
        if text == "":
            return None
        return text if valid_epoch(text) else BAD_EPOCH

    def refuse(self, refusal: Refusal) -> None:
        self.server.metrics.handshakes_refused[refusal.reason] += 1
        request = self.request
        why = refusal.detail or refusal.message
        log.info("refused %s from %s: %s", request.path, request.remote_ip, why)
        self.set_status(refusal.status)
        if refusal.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
        self.finish(refusal.message)

"""Mixed mode's WebSocket endpoint: the websocket-shootout protocol, where a JSON envelope
chooses echo or broadcast, broadcasts reach receivers in an envelope with their offset,
and a joiner is told what it was replayed; and {"type":"refresh","token":T}, which replaces
the connection's token with a newer one for the same user before it expires.

The envelopes themselves are sans-I/O, in wire/envelopes.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from echoserver.auth.verifier import TokenRefused
from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.websocket import ChannelSocket
from echoserver.fanout.delivery import Replay
from echoserver.wire.envelopes import (
    NotJson,
    load_json,
    mixed_broadcast,
    mixed_payload,
    notice,
    recovery_fields,
)

log = logging.getLogger("echoserver.ws")


class MixedSocket(ChannelSocket):
    """The websocket-shootout protocol: a JSON envelope chooses echo or broadcast."""

    async def before_upgrade(self, channel: str) -> None:
        member = self.connection
        assert member is not None
        member.wrap_broadcasts(mixed_broadcast)  # payloads go out in broadcast envelopes
        await super().before_upgrade(channel)

    def before_replay(self, replay: Replay) -> None:
        super().before_replay(replay)
        if replay.since is not None:
            fields = recovery_fields(replay.since, replay.recovered, replay.first)
            self.send(notice("recovery", **fields), False)
        elif replay.count:
            self.send(notice("history", count=replay.count), False)

    def on_raw_message(self, payload: bytes, binary: bool) -> Awaitable[None] | None:
        self.count_in(payload)
        if binary:
            self._error("binary messages are not supported in mixed mode; send JSON text")
            return None
        try:
            request = load_json(payload)
            kind = request["type"] if isinstance(request, dict) else None
        except NotJson as error:
            self._error(f"not JSON: {error}")
            return None
        except (ValueError, KeyError):
            self._error("expected a JSON object with a type")
            return None
        if kind == "echo":
            self.send(payload, False)  # the reply is the request, byte for byte
            return None
        if kind == "broadcast":
            return self._broadcast(request.get("payload"))
        if kind == "refresh":
            return self._refresh(request.get("token"))
        self._error(f"unknown type {kind!r}; expected 'echo', 'broadcast' or 'refresh'")
        return None

    async def _broadcast(self, inner: Any) -> None:
        """Publish the payload (receivers get it in an envelope with its offset), then
        tell the sender its offset and how many members the channel has."""
        hub = self.server.hub
        if not self.may_publish:
            self._error(f"not allowed to publish on {self.channel}")
            return
        sender = self.member.sub_id if self.member is not None else None
        try:
            outcome = hub.publish(self.channel, mixed_payload(inner), False, sender)
            offset = outcome if isinstance(outcome, int) else await outcome
        except BrokerUnavailable as exc:
            self.not_delivered(exc)
            return
        listeners = await hub.members(self.channel)
        result = notice("broadcastResult", payload=inner, listenCount=listeners, offset=offset)
        self.send(result, False)

    async def _refresh(self, token: Any) -> None:
        """Take a newer token for the same user: the connection's expiry moves to its exp.
        A refused one leaves the old token (and its expiry) in place."""
        authority = self.server.authority
        if not authority.uses_tokens:
            self._error("this server does not use connection tokens")
            return
        if not isinstance(token, str) or not token:
            self._error("refresh needs a token")
            return
        old = self.identity
        try:
            new = await authority.identify(token)
        except TokenRefused as refused:
            self.server.metrics.tokens_refused[refused.label] += 1
            log.info("refused a refresh on %s: %s", self.peer, refused.reason)
            self._error("token refused")
            return
        if new.sub != old.sub:
            self._error("the new token is for another user; reconnect with it")
            return
        why = authority.rights.join_refusal(new, self.channel)
        if why is not None:
            self._error(f"the new token does not allow {self.channel}")
            return
        if self._closed:
            return
        self.identity = new
        self.may_publish = authority.rights.may_publish(new, self.channel)
        authority.refreshed(self, new)
        exp = None if new.exp is None else (int(new.exp) if new.exp.is_integer() else new.exp)
        self.send(notice("refreshed", exp=exp), False)

    def _error(self, text: str) -> None:
        self.send(notice("error", error=text), False)

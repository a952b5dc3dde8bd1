"""Mixed mode's WebSocket endpoint: the websocket-shootout protocol, where a JSON envelope
chooses echo or broadcast, broadcasts reach receivers in an envelope with their offset,
and a joiner is told what it was replayed.

The envelopes themselves are sans-I/O, in wire/envelopes.py.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

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
        self._error(f"unknown type {kind!r}; expected 'echo' or 'broadcast'")
        return None

    async def _broadcast(self, inner: Any) -> None:
        """Publish the payload (receivers get it in an envelope with its offset), then
        tell the sender its offset and how many members the channel has."""
        hub = self.server.hub
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

    def _error(self, text: str) -> None:
        self.send(notice("error", error=text), False)

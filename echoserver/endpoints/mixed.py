"""Mixed mode's WebSocket endpoint: the websocket-shootout protocol, where a JSON envelope
chooses echo or broadcast, broadcasts reach receivers in an envelope with their offset,
and a joiner is told what it was replayed; and {"type":"refresh","token":T}, which replaces
the connection's token with a newer one for the same user before it expires.

One connection follows several channels (issue 21): the URL's first, then each
{"type":"subscribe","channel":C,"since":N,"epoch":E} (answered {"type":"subscribed",...} with the
recovery fields, then C's replay) until {"type":"unsubscribe","channel":C}; a broadcast may
name its "channel", and every envelope the client receives carries its "channel".

The envelopes themselves are sans-I/O, in wire/envelopes.py.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from typing import Any

from echoserver.auth.identity import Identity
from echoserver.auth.rights import Rights
from echoserver.auth.verifier import TokenRefused
from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.websocket import ChannelSocket
from echoserver.fanout.delivery import Replay
from echoserver.wire.channels import BadChannelRequest, channel_name, epoch_value, since_value
from echoserver.wire.envelopes import (
    NotJson,
    load_json,
    mixed_broadcast,
    mixed_payload,
    notice,
    recovery_fields,
)

log = logging.getLogger("echoserver.ws")


NO_SUBSCRIPTIONS: dict[str, None] = {}  # before the handshake joins (never written to)


def publishes_unsubscribed(rights: Rights, identity: Identity, channel: str) -> bool:
    """Whether a connection may publish on a channel it does not follow: only where its
    namespace grants publishing by claim and the token's publish claim covers it; elsewhere
    the right to publish comes with membership ("members")."""
    namespace = rights.namespace_of(channel)
    return (
        namespace is not None
        and namespace.settings.publish == "claim"
        and identity.may_publish_by_claim(channel)
    )


class MixedSocket(ChannelSocket):
    """The websocket-shootout protocol: a JSON envelope chooses echo or broadcast."""

    # The channels this connection follows, in the order joined (the URL's first).
    subscriptions: dict[str, None] = NO_SUBSCRIPTIONS
    # Those where its user counts in presence (roster.arrive called, depart not yet):
    # each departs once, whichever of unsubscribe and close comes first.
    _present: set[str] | None = None

    async def before_upgrade(self, channel: str) -> None:
        member = self.connection
        assert member is not None
        member.wrap_broadcasts(mixed_broadcast)  # payloads go out in broadcast envelopes
        self.subscriptions = {channel: None}
        # The URL's channel departs on close as ChannelSocket's does: once a member.
        self._present = {channel}
        await super().before_upgrade(channel)  # joins, then arrives (presence)

    def before_replay(self, replay: Replay) -> None:
        super().before_replay(replay)
        if replay.since is not None:
            fields = recovery_fields(replay.since, replay.recovered, replay.first, replay.epoch)
            self.send(notice("recovery", channel=self.channel, **fields), False)
        elif replay.count:
            self.send(notice("history", channel=self.channel, count=replay.count), False)

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
            return self._broadcast(request.get("payload"), request.get("channel"))
        if kind == "subscribe":
            return self._subscribe(
                request.get("channel"), request.get("since"), request.get("epoch")
            )
        if kind == "unsubscribe":
            return self._unsubscribe(request.get("channel"))
        if kind == "refresh":
            return self._refresh(request.get("token"))
        self._error(
            f"unknown type {kind!r}; expected 'echo', 'broadcast', 'subscribe', "
            "'unsubscribe' or 'refresh'"
        )
        return None

    async def _broadcast(self, inner: Any, named: Any = None) -> None:
        """Publish the payload (receivers get it in an envelope with its channel and
        offset), then tell the sender its offset and how many members the channel has.
        Without a "channel", on the URL's."""
        hub = self.server.hub
        if named is None:
            channel = self.channel
        else:
            try:
                channel = channel_name(named)
            except BadChannelRequest as error:
                self._error(str(error))
                return
        why = self._publish_refusal(channel)
        if why is not None:
            self._error(why, channel)
            return
        sender = self.member.sub_id if self.member is not None else None
        try:
            offset, epoch = await hub.published(channel, mixed_payload(inner), False, sender)
        except BrokerUnavailable as exc:
            self._error(f"not delivered: {exc}", channel)
            return
        listeners = await hub.members(channel)
        result = notice(
            "broadcastResult",
            channel=channel,
            payload=inner,
            listenCount=listeners,
            offset=offset,
            epoch=epoch,
        )
        self.send(result, False)

    def _publish_refusal(self, channel: str) -> str | None:
        """Why this connection may not publish on the channel, or None."""
        rights = self.server.authority.rights
        if channel in self.subscriptions:
            if channel == self.channel:
                allowed = self.may_publish  # the URL's, kept up to date by a refresh
            else:
                allowed = rights.may_publish(self.identity, channel)
            return None if allowed else f"not allowed to publish on {channel}"
        if publishes_unsubscribed(rights, self.identity, channel):
            return None
        return f"not subscribed to {channel}: subscribe before publishing there"

    async def _subscribe(self, named: Any, since_field: Any, epoch_field: Any = None) -> None:
        """Join one more channel: {"type":"subscribed",...} (its recovery fields), then its
        replay, then its live stream. Reading waits for this, so a broadcast sent after a
        subscribe is handled after it."""
        try:
            channel = channel_name(named)
            since = since_value(since_field)
            epoch = epoch_value(epoch_field)
        except BadChannelRequest as error:
            self._error(str(error), named if isinstance(named, str) and len(named) <= 64 else None)
            return
        subscriptions = self.subscriptions
        member = self.member
        if member is None or self._closed:
            return
        if channel in subscriptions:
            self._error(f"already subscribed to {channel}", channel)
            return
        limit = self.server.config.websocket.max_subscriptions
        if len(subscriptions) >= limit:
            self._error(f"at most {limit} channels per connection", channel)
            return
        why = self.server.authority.rights.join_refusal(self.identity, channel)
        if why is not None:
            log.info("refused a subscribe on %s: %s", self.peer, why)
            self._error(f"not allowed to join {channel}", channel)
            return
        hub = self.server.hub
        subscriptions[channel] = None  # before the join: a close meanwhile leaves it too
        try:
            subscribed = functools.partial(self._subscribed, channel)
            await hub.join(channel, member, subscribed, since, epoch)
        except Exception as exc:
            log.warning("%s: could not subscribe to %s: %r", self.peer, channel, exc)
            subscriptions.pop(channel, None)
            await hub.leave(channel, member)
            self._error(f"could not subscribe to {channel}; try again later", channel)
            return
        if self._closed:  # gone while joining: on_connection_closed may have left too early
            await hub.leave(channel, member)
            return
        await self._arrive(channel)

    def _subscribed(self, channel: str, replay: Replay) -> None:
        if replay.since is not None:
            fields = recovery_fields(replay.since, replay.recovered, replay.first, replay.epoch)
        else:
            fields = {
                "recovered": None,
                "since": None,
                "first": replay.first,
                "epoch": replay.epoch,
            }
        # count: messages replayed next; last: the channel's latest offset when its
        # history was read (null when none is kept), a `since` to resume from.
        fields.update(count=replay.count, last=replay.last)
        self.send(notice("subscribed", channel=channel, **fields), False)

    async def _unsubscribe(self, named: Any) -> None:
        """Leave a channel: nothing of it arrives after {"type":"unsubscribed"}."""
        try:
            channel = channel_name(named)
        except BadChannelRequest as error:
            self._error(str(error))
            return
        member = self.member
        if member is None or channel not in self.subscriptions:
            self._error(f"not subscribed to {channel}", channel)
            return
        del self.subscriptions[channel]
        await self._leave(channel, member)
        self.send(notice("unsubscribed", channel=channel), False)

    def on_connection_closed(self, code: int) -> None:
        first = not self._closed
        super().on_connection_closed(code)  # leaves the URL's channel
        others = [channel for channel in self.subscriptions if channel != self.channel]
        if first and others and self.member is not None:
            self.server.spawn(self._leave_all(others, self.member))

    async def _leave_all(self, channels: list[str], member: Any) -> None:
        for channel in channels:
            await self._leave(channel, member)

    async def _arrive(self, channel: str) -> None:
        """Presence (fanout/presence.py): the user counts on the channel once a member."""
        present = self._present
        if present is None or channel in present:
            return
        present.add(channel)  # before the await: a close meanwhile departs it
        await self.server.roster.arrive(channel, self.identity.sub, self.identity.info)

    async def _leave(self, channel: str, member: Any) -> None:
        """Leave a channel (unsubscribe, close) and depart from its presence, once."""
        await self.server.hub.leave(channel, member)
        present = self._present
        if present is not None and channel in present:
            present.discard(channel)
            await self.server.roster.depart(channel, self.identity.sub)

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
        for channel in (self.channel, *self.subscriptions):
            if authority.rights.join_refusal(new, channel) is not None:
                self._error(f"the new token does not allow {channel}")
                return
        if self._closed:
            return
        self.identity = new
        self.may_publish = authority.rights.may_publish(new, self.channel)
        authority.refreshed(self, new)
        exp = None if new.exp is None else (int(new.exp) if new.exp.is_integer() else new.exp)
        self.send(notice("refreshed", exp=exp), False)

    def _error(self, text: str, channel: str | None = None) -> None:
        """An error notice; with the channel it concerns, when there is one."""
        if channel is None:
            self.send(notice("error", error=text), False)
        else:
            self.send(notice("error", error=text, channel=channel), False)

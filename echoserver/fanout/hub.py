"""Channel membership and fan-out; knows nothing of HTTP or WebSocket framing.

The hub keeps, per channel, the local subscribers (one per connection) in join order. It
publishes through its broker and fans out what the broker delivers back, so the same code
serves one embedded process and a Redis-backed cluster. Every subscriber on a channel gets
that channel's messages in the broker's order; a joiner gets the broker's kept history
first, then the live stream, spliced by offset so nothing is lost or repeated.

Offsets are the broker's per-channel numbers (1, 2, ...), the same on every process. A
joiner that gives `since` (a WebSocket client's ?since=, an SSE client's Last-Event-ID)
gets every kept message after that offset, then the live stream, and a Replay saying
whether that was everything it missed (`recovered`): the history (its size and age limit)
must still reach back to since + 1, or nothing may have been published since.

Epochs: a joiner may also give the epoch its `since` belongs to. When the channel's epoch
is another one (the broker lost the channel's state and numbers it again), the offset
means nothing here: the joiner gets what is kept of the current numbering, `recovered`
False and the current epoch, never a replay that claims to continue its own. A `since`
without an epoch is taken as the current epoch's (clients from before epochs).

A broker may also reissue offsets under the epoch they had: a Redis replica promoted
before it had the last publishes numbers on from where it was. Every hub remembers, per
channel it has members on, the last (epoch, offset) it delivered; an offset at or below it
under the same epoch makes it ask the broker for a new epoch (Broker.renew_epoch, once for
all processes: it replaces only the epoch it is given). The few messages published before
the new epoch lands still carry reissued offsets; a channel nobody here listens to is not
watched (docs/protocol.md, "Offsets and recovery", says what a client sees).

Handlers see only this module: publish() is the one way to send (it never waits, and keeps
call order), a failure is the broker's own BrokerUnavailable (passed through, never
wrapped), and each receiver gets a Delivery, the hub's
own object per fan-out, never the broker's Envelope. A Delivery carries a frame cache that
all receivers of one fan-out share, so a broadcast to 1000 receivers is encoded once.

A fan-out never waits on a receiver: deliver() only queues bytes. What a receiver has not
taken yet is capped (max_queue_bytes); a message that would take it past the cap is
dropped for that receiver (slow_client = "drop", counted, logged once per episode) or the
receiver is closed with 1013 ("disconnect"). So a client that stops reading costs at most
the cap in memory and never slows the others; the price is that it misses messages.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Protocol

from echoserver.brokers.base import Backlog, Broker, BrokerUnavailable, Envelope
from echoserver.fanout.delivery import Delivery, Posted, Replay

log = logging.getLogger("echoserver.hub")

MAX_TRACKED_CHANNELS = 1000  # channels with counters of their own in /metrics
OTHER_CHANNELS = "(other)"  # where the rest are counted
# Bytes a replayed message may take beyond its payload and its channel's name in a
# receiver's queue: a frame header (up to 10) and mixed mode's
# {"type":"broadcast","channel":"","payload":,"offset":N} around it (52 and N's 18 digits),
# with room to spare. An upper bound: a replay must never be cut by the cap on its way.
REPLAY_OVERHEAD = 96
# Where control messages travel between processes (the user API's disconnect): never a
# client's channel, whose names cannot hold "#".
CONTROL_CHANNEL = "#control"


class Subscriber(Protocol):
    """One connection's end of a channel."""

    sub_id: str

    @property
    def peer(self) -> str:
        """Who it is, for log lines."""

    def deliver(self, delivery: Delivery) -> None:
        """Queue one message for this connection without blocking."""

    def queued_bytes(self) -> int:
        """Bytes queued for this connection that it has not taken yet."""

    def close_slow(self) -> None:
        """Close the connection for falling behind (1013)."""


class ChannelStats:
    """What happened on one channel, for /metrics."""

    __slots__ = ("delivered_bytes", "deliveries", "drops", "slow_disconnects")

    def __init__(self) -> None:
        self.deliveries = 0
        self.delivered_bytes = 0
        self.drops = 0
        self.slow_disconnects = 0


class _Joining:
    """Live messages that arrive for a subscriber while its history is being fetched."""

    __slots__ = ("buffered", "peer", "sub_id", "subscriber")

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.sub_id = subscriber.sub_id
        self.peer = subscriber.peer
        self.buffered: list[Delivery] = []

    def deliver(self, delivery: Delivery) -> None:
        self.buffered.append(delivery)

    def queued_bytes(self) -> int:
        return 0  # replayed through the cap once the history is in

    def close_slow(self) -> None:
        self.subscriber.close_slow()


class _Mark:
    """The (epoch, offset) of the last message fanned out on a channel."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq


def _recovered(since: int, past: list[Envelope], last: int | None) -> bool:
    """Whether a replay after `since` holds every message published after it."""
    if last is None or last < since:
        return False  # unknown, or the channel was numbered again from 1
    if last == since:
        return True  # nothing was published after it
    return bool(past) and past[0].seq == since + 1


class Hub:
    """Local channel membership and fan-out over one broker.

    `history`, when given, sets how many messages the broker keeps per channel (its
    history_size), which joiners get first; `history_ttl`, when given, how many seconds
    they stay kept (0 = no age limit); `history_bytes` and `history_total_bytes`, the
    broker's byte bounds on them (per channel, per process); `publish_timeout`, how long a
    publish waits for a broker that is down.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        include_sender: bool = True,
        history: int | None = None,
        history_ttl: float | None = None,
        history_bytes: int | None = None,
        history_total_bytes: int | None = None,
        publish_timeout: float | None = None,
        max_queue_bytes: int = 1 << 20,
        slow_client: str = "drop",
    ) -> None:
        self.broker = broker
        if history is not None:
            broker.history_size = history
        if history_ttl is not None:
            broker.history_ttl = history_ttl
        if history_bytes is not None:
            broker.history_bytes = history_bytes
        if history_total_bytes is not None:
            broker.history_total_bytes = history_total_bytes
        if publish_timeout is not None:
            broker.publish_timeout = publish_timeout
        self.presence = broker.presence
        self.include_sender = include_sender
        self.max_queue_bytes = max_queue_bytes
        self.disconnect_slow = slow_client == "disconnect"
        self.stats: dict[str, ChannelStats] = {}
        self._channels: dict[str, dict[str, Subscriber | _Joining]] = {}
        self._dropping: set[str] = set()  # subscribers in a drop episode
        # In how many channels each subscriber is (a mixed-mode connection or an event
        # stream may follow several): its drop episode ends when it leaves the last.
        self._memberships: dict[str, int] = {}
        self._node = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._started = False
        self._on_control: Callable[[bytes], None] | None = None
        # Channels whose broker subscription is on its way: later joiners wait for it.
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        # Per channel with members: [epoch, offset] of the last message fanned out, to see
        # offsets reissued under one epoch (see the module docstring).
        self._last_seen: dict[str, _Mark] = {}
        self._renewing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect the broker; join() does it on first use if the server has not."""
        if not self._started:
            self._started = True
            await self.broker.start(self._fan_out)

    def keep_history(self, rule: Callable[[str, tuple[int, float]], tuple[int, float]]) -> None:
        """Let `rule(channel, (messages, seconds))` set a channel's history (namespaces);
        the control channel keeps none."""
        broker = self.broker
        default = (broker.history_size, broker.history_ttl)

        def retention(channel: str) -> tuple[int, float]:
            return (0, 0.0) if channel == CONTROL_CHANNEL else rule(channel, default)

        broker.retention = retention

    async def listen(self, on_control: Callable[[bytes], None]) -> None:
        """Receive what control() sends, from this and every process sharing the broker."""
        self._on_control = on_control
        if self.broker.retention is None:
            # No per-channel rule (no namespaces): set one all the same, so control keeps none.
            self.keep_history(lambda channel, default: default)
        await self.start()
        await self.broker.subscribe(CONTROL_CHANNEL)

    def control(self, data: bytes) -> int | asyncio.Future[int]:
        """Send a control message to every process's listen() handler (the user API's
        disconnect); like publish(), it never waits."""
        return self.broker.publish(Envelope(CONTROL_CHANNEL, data, False, None))

    async def close(self) -> None:
        await self.broker.close()
        self._channels.clear()
        self._last_seen.clear()
        self._memberships.clear()

    @property
    def healthy(self) -> bool:
        """False while the broker cannot deliver (e.g. Redis unreachable)."""
        return self.broker.healthy

    @property
    def health_reason(self) -> str:
        return self.broker.health_reason

    def new_subscriber_id(self) -> str:
        """An id unique across every process sharing the broker."""
        return f"{self._node}:{next(self._ids)}"

    async def join(
        self,
        channel: str,
        subscriber: Subscriber,
        before_replay: Callable[[Replay], None] | None = None,
        since: int | None = None,
        epoch: str | None = None,
    ) -> Replay:
        """Add a subscriber: kept messages first, then the live stream.

        Without `since`, the last `history` kept messages are replayed; with it, every kept
        message with an offset above it (of `epoch`, when given: see the module
        docstring). Returns once the subscriber is a member whose
        broker subscription is active, so a message published after join() returns reaches
        it (the handshake's 101 waits for this). before_replay(replay) is called once, just
        before the replayed messages are delivered (also when there are none).
        """
        if not self._started:
            await self.start()
        members = self._channels.get(channel)
        first = members is None
        if members is None:
            members = self._channels[channel] = {}
        sub_id = subscriber.sub_id
        if sub_id not in members:
            self._memberships[sub_id] = self._memberships.get(sub_id, 0) + 1
        kept = self.broker.kept_for(channel)[0]
        if kept <= 0 and since is None:
            members[subscriber.sub_id] = subscriber
            await self._subscribed(channel, first)
            replay = Replay(None, 0, None, None, None)
            if before_replay is not None:
                before_replay(replay)
            await self.presence.set_local(channel, len(members))
            return replay
        joining = _Joining(subscriber)
        members[subscriber.sub_id] = joining
        try:
            await self._subscribed(channel, first)
            backlog, renumbered = await self._backlog(channel, since, epoch, kept)
        finally:
            # The subscriber may have left (or the hub closed) while history was fetched.
            now = self._channels.get(channel)
            still_joining = now is not None and now.get(subscriber.sub_id) is joining
            if now is not None and still_joining:
                now[subscriber.sub_id] = subscriber
        past = backlog.envelopes if backlog is not None else []
        last = backlog.last if backlog is not None else None
        if past and now is not None and still_joining:
            # Only what fits under the joiner's queue cap: the newest kept messages, never
            # a replay that loses messages on its way (a since join is then not recovered).
            past = self._fitting(past, self.max_queue_bytes - subscriber.queued_bytes())
        replay = Replay(
            since,
            len(past),
            past[0].seq if past else None,
            last,
            None if since is None else not renumbered and _recovered(since, past, last),
            backlog.epoch if backlog is not None else None,
        )
        if now is None or not still_joining:
            return replay
        # Live messages already in the read history (or older) are not delivered again.
        floor = last if last is not None else (past[-1].seq if past else since or 0)
        # (Offsets <= 0: not numbered, e.g. a presence event (brokers.base.SIGNAL): kept.)
        live = [d for d in joining.buffered if d.seq > floor or d.seq <= 0]
        if before_replay is not None:
            before_replay(replay)
        stats = self._stats(channel)
        for envelope in past:
            self._offer((subscriber,), Delivery(envelope), stats)
        for delivery in live:
            self._offer((subscriber,), delivery, stats)
        await self.presence.set_local(channel, len(now))
        return replay

    @staticmethod
    def _fitting(past: list[Envelope], budget: int) -> list[Envelope]:
        """The newest of `past` whose frames fit in `budget` bytes (each counted with
        REPLAY_OVERHEAD and its channel's name for its frame header and envelope)."""
        start = len(past)
        while start > 0:
            envelope = past[start - 1]
            size = len(envelope.data) + len(envelope.channel) + REPLAY_OVERHEAD
            if size > budget:
                break
            budget -= size
            start -= 1
        return past[start:] if start else past

    async def _backlog(
        self, channel: str, since: int | None, epoch: str | None, kept: int
    ) -> tuple[Backlog | None, bool]:
        """What to replay to a joiner (None when the broker cannot tell: unreachable), and
        whether `since` belongs to another numbering than the channel's (not recovered)."""
        broker = self.broker
        try:
            backlog = await broker.backlog(channel, since or 0, kept)
            if since is None:
                return backlog, False
            other_epoch = bool(epoch) and epoch != backlog.epoch
            if other_epoch or backlog.last < since:
                # Another epoch, or an offset ahead of the channel: its broker lost its
                # state (a restarted memory broker, a flushed Redis) and numbers it again:
                # replay what is kept of the new numbering (not recovered).
                backlog = await broker.backlog(channel, 0, kept)
                return backlog, True
        except BrokerUnavailable:
            return None, False
        return backlog, False

    async def _subscribed(self, channel: str, first: bool) -> None:
        """Wait until the broker delivers the channel to this process.

        The first joiner subscribes; later joiners wait for that subscription, which may
        still be on its way to a remote broker.
        """
        if not first:
            pending = self._subscribing.get(channel)
            if pending is not None:
                await asyncio.shield(pending)
            return
        done = self._subscribing[channel] = asyncio.get_running_loop().create_future()
        try:
            await self.broker.subscribe(channel)
        finally:
            done.set_result(None)
            if self._subscribing.get(channel) is done:
                del self._subscribing[channel]

    async def leave(self, channel: str, subscriber: Subscriber) -> None:
        members = self._channels.get(channel)
        sub_id = subscriber.sub_id
        if members is None or members.pop(sub_id, None) is None:
            return
        left = self._memberships.pop(sub_id, 1) - 1
        if left > 0:
            self._memberships[sub_id] = left  # still in other channels: same episode
        else:
            self._dropping.discard(sub_id)
        if not members:
            del self._channels[channel]
            self._last_seen.pop(channel, None)
            await self.presence.set_local(channel, 0)
            await self.broker.unsubscribe(channel)
        else:
            await self.presence.set_local(channel, len(members))

    def publish(
        self, channel: str, data: bytes, binary: bool, sender: str | None
    ) -> int | asyncio.Future[int]:
        """Send to the channel: starts now and never waits; publishes keep their call order.

        Returns the message's offset when the broker has delivered it already (memory),
        else a future of it, which waits up to publish_timeout for a broker that is down.
        Raises BrokerUnavailable at once when the broker cannot even queue it; the future
        fails with BrokerUnavailable when the message could not be published.
        """
        return self.broker.publish(Envelope(channel, data, binary, sender))

    async def post(self, channel: str, data: bytes, binary: bool) -> Posted:
        """Publish from outside the channel (the publish API): like a member's message, it
        reaches every member on every process and is kept in history. Raises BrokerUnavailable
        when the broker could not take it."""
        offset, epoch = await self.published(channel, data, binary, None)
        local = len(self._channels.get(channel) or ())
        return Posted(offset, local, await self.members(channel), epoch)

    async def post_many(
        self, messages: list[tuple[str, bytes, bool]]
    ) -> list[tuple[int, str, int]]:
        """Publish a batch from outside its channels (the batch publish API), in list order:
        (offset, epoch, local members) per message. Every publish starts before the first
        await, as one batch through the broker. Raises BrokerUnavailable when the broker
        could not take one of them (those before it may be published)."""
        envelopes = [Envelope(channel, data, binary, None) for channel, data, binary in messages]
        waiting = [o for o in self.broker.publish_many(envelopes) if not isinstance(o, int)]
        if waiting:
            # gather retrieves the others' failures once one failed
            await asyncio.gather(*waiting)
        channels = self._channels
        # Once published, each envelope carries its offset and epoch.
        return [(e.seq, e.epoch, len(channels.get(e.channel) or ())) for e in envelopes]

    async def published(
        self, channel: str, data: bytes, binary: bool, sender: str | None
    ) -> tuple[int, str]:
        """publish(), then wait for its (offset, epoch). The publish starts before the first
        await, so calls keep their order as publish()'s do."""
        envelope = Envelope(channel, data, binary, sender)
        outcome = self.broker.publish(envelope)
        offset = outcome if isinstance(outcome, int) else await outcome
        return offset, envelope.epoch

    # i21 webhooks: the snapshot API (GET /api/channels) lists this process's channels.
    def local_members(self) -> dict[str, int]:
        """Members per channel in this process, joining ones included."""
        return {channel: len(members) for channel, members in self._channels.items()}

    async def members(self, channel: str) -> int:
        """The channel's members across every process."""
        return await self.presence.count(channel)

    def _stats(self, channel: str) -> ChannelStats:
        stats = self.stats.get(channel)
        if stats is None:
            # Channel names come from clients: past a bound they share one entry, so
            # neither memory nor the metrics' label set grows without end.
            if len(self.stats) >= MAX_TRACKED_CHANNELS:
                channel = OTHER_CHANNELS
                stats = self.stats.get(channel)
            if stats is None:
                stats = self.stats[channel] = ChannelStats()
        return stats

    def _fan_out(self, envelope: Envelope) -> None:
        members = self._channels.get(envelope.channel)
        if not members:
            if envelope.channel == CONTROL_CHANNEL and self._on_control is not None:
                self._on_control(envelope.data)
            return
        seen = self._last_seen.get(envelope.channel)
        if envelope.seq < 0:
            pass  # a presence event (brokers.base.SIGNAL): not numbered, not watched
        elif seen is None:
            self._last_seen[envelope.channel] = _Mark(envelope.epoch, envelope.seq)
        else:
            if envelope.seq <= seen.seq and envelope.epoch == seen.epoch and envelope.epoch:
                self._reissued(envelope, seen.seq)
            seen.epoch = envelope.epoch
            seen.seq = envelope.seq
        skip = None if self.include_sender else envelope.sender
        # A copy, because closing a slow receiver may make it leave the channel. Of the
        # values, not the items: a (key, value) tuple per member is an allocation the
        # cyclic GC counts, so a fan-out to 19,000 members set off ~30 collections.
        self._offer(list(members.values()), Delivery(envelope), self._stats(envelope.channel), skip)

    def _reissued(self, envelope: Envelope, last: int) -> None:
        """The broker numbered a message at or below one already delivered under the same
        epoch: it lost publishes (a failover). Ask it for a new epoch."""
        log.warning(
            "offset %d on %s follows %d under epoch %s: the broker lost messages; "
            "giving the channel a new epoch",
            envelope.seq,
            envelope.channel,
            last,
            envelope.epoch,
        )
        task = asyncio.ensure_future(self._renew(envelope.channel, envelope.epoch))
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    async def _renew(self, channel: str, epoch: str) -> None:
        try:
            await self.broker.renew_epoch(channel, epoch)
        except BrokerUnavailable as error:
            # The next reissued offset this hub sees asks again.
            log.warning("could not renew the epoch of %s: %s", channel, error)

    def _offer(
        self,
        receivers: Iterable[Subscriber],
        delivery: Delivery,
        stats: ChannelStats,
        skip: str | None = None,
    ) -> None:
        """One delivery (one per fan-out: its receivers share its bytes) to each receiver
        but `skip`, through the queue cap."""
        limit = self.max_queue_bytes - len(delivery.data)
        dropping = self._dropping
        delivered = 0
        for subscriber in receivers:
            if skip is not None and subscriber.sub_id == skip:
                continue
            if subscriber.queued_bytes() > limit:
                self._fall_behind(subscriber, stats)
            else:
                if dropping and subscriber.sub_id in dropping:
                    dropping.discard(subscriber.sub_id)
                    log.info("%s on %s caught up", subscriber.peer, delivery.envelope.channel)
                subscriber.deliver(delivery)
                delivered += 1
        stats.deliveries += delivered
        stats.delivered_bytes += delivered * len(delivery.data)

    def _fall_behind(self, subscriber: Subscriber | _Joining, stats: ChannelStats) -> None:
        if self.disconnect_slow:
            if subscriber.sub_id in self._dropping:
                return  # already closing
            self._dropping.add(subscriber.sub_id)
            stats.slow_disconnects += 1
            log.warning(
                "closing %s: over its %d-byte queue (1013)", subscriber.peer, self.max_queue_bytes
            )
            subscriber.close_slow()
            return
        stats.drops += 1
        if subscriber.sub_id not in self._dropping:
            self._dropping.add(subscriber.sub_id)
            log.warning(
                "%s is over its %d-byte queue: dropping messages for it",
                subscriber.peer,
                self.max_queue_bytes,
            )

"""The embedded broker: delivery, history and presence inside one process.

Publishing calls the hub back synchronously, so a channel's order is simply the order of
publish() calls, publish() returns the offset itself (never a future), and a joiner that
reads the history and subscribes in one loop pass can neither miss nor repeat a message.

A channel's offset counter and history outlive its members (a client that comes back
resumes from its offset, a later joiner still gets the history), so the number of
channels remembered is capped: past MAX_CHANNELS the least recently published-to channel
that nobody here is subscribed to is forgotten (its offsets then start again at 1, under
a new epoch: every channel state gets a random epoch when it is made, so a restarted
process or a forgotten channel never reissues an offset under an epoch already handed out).

Kept history is bounded in bytes (payload bytes) as well as in messages: per channel
(`history_bytes`: its oldest messages go while it is over) and for the whole process
(`history_total_bytes`: the oldest kept messages of any channel go while it is over). A
message larger than `history_bytes` is not kept, and nothing before it stays kept either,
so what a channel keeps always ends at its last offset (recovery past it is reported as
not recovered). The process-wide order is one FIFO of (channel, offset) entries, so
eviction costs O(1) amortised per publish however many channels there are; entries whose
message went another way (count cap, age, per-channel bytes) are skipped when reached and
swept out whenever they outnumber the kept messages. A channel whose history empties keeps
only its counter: its offsets go on as before.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from itertools import islice
from typing import Any

from echoserver.brokers.base import (
    SIGNAL,
    Backlog,
    Broker,
    Envelope,
    OnEnvelope,
    Presence,
    PresentUser,
    Roll,
)

MAX_CHANNELS = 10_000
# The process-wide FIFO is swept of stale entries once it holds more than twice the kept
# messages plus this many.
_SWEEP_SLACK = 1024


class MemoryPresence(Presence):
    """One process: the count is this process's own."""

    def __init__(self) -> None:
        self._members: dict[str, int] = {}
        self._users: dict[str, dict[str, tuple[int, Any]]] = {}  # channel -> user -> (n, info)

    async def set_local(self, channel: str, members: int) -> None:
        if members:
            self._members[channel] = members
        else:
            self._members.pop(channel, None)

    async def count(self, channel: str) -> int:
        return self._members.get(channel, 0)

    async def set_user(
        self, channel: str, user: str, connections: int, info: Any, present: bool = True
    ) -> tuple[int, int]:
        users = self._users.get(channel)
        before = int(users is not None and user in users)
        if present:
            if users is None:
                users = self._users[channel] = {}
            users[user] = (connections, info)
        elif users is not None:
            users.pop(user, None)
            if not users:
                del self._users[channel]
        return before, int(present)

    async def roll(self, channel: str) -> Roll:
        users = self._users.get(channel) or {}
        return Roll(
            [PresentUser(user, info, n) for user, (n, info) in users.items()],
            self._members.get(channel, 0),
        )


class _Channel:
    """A channel's last offset and its kept messages with the time each was published;
    `kept` is None while nothing is kept (an idle channel costs only its counter)."""

    __slots__ = ("epoch", "kept", "kept_bytes", "last")

    def __init__(self) -> None:
        self.last = 0
        self.epoch = secrets.token_urlsafe(6)  # 8 characters, 48 random bits
        self.kept: deque[tuple[float, Envelope]] | None = None
        self.kept_bytes = 0


class MemoryBroker(Broker):
    def __init__(
        self,
        *,
        history: int = 0,
        history_ttl: float = 0.0,
        history_bytes: int = Broker.history_bytes,
        history_total_bytes: int = Broker.history_total_bytes,
    ) -> None:
        self.history_size = history
        self.history_ttl = history_ttl
        self.history_bytes = history_bytes
        self.history_total_bytes = history_total_bytes
        self.presence = MemoryPresence()
        self._on_envelope: OnEnvelope | None = None
        self._subscribed: set[str] = set()
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        # Every kept message in publish order, as (its channel, its offset); some stale.
        self._fifo: deque[tuple[_Channel, int]] = deque()
        self._kept_count = 0  # messages kept, all channels
        self.kept_bytes = 0  # payload bytes kept, all channels

    async def start(self, on_envelope: OnEnvelope) -> None:
        self._on_envelope = on_envelope

    async def close(self) -> None:
        self._on_envelope = None
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def signal(self, envelope: Envelope) -> None:
        envelope.seq = SIGNAL
        if self._on_envelope is not None and envelope.channel in self._subscribed:
            self._on_envelope(envelope)

    def publish(self, envelope: Envelope) -> int:
        name = envelope.channel
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
            if len(self._channels) > MAX_CHANNELS:
                self._forget_one()
        else:
            self._channels.move_to_end(name)
        seq = envelope.seq = channel.last = channel.last + 1
        envelope.epoch = channel.epoch
        size, ttl = self.kept_for(name)
        if size > 0:
            self._keep(channel, envelope, size, ttl)
        elif channel.kept:
            self._drop_all(channel)
        if self._on_envelope is not None and name in self._subscribed:
            self._on_envelope(envelope)
        return seq

    def _keep(self, channel: _Channel, envelope: Envelope, limit: int, ttl: float) -> None:
        size = len(envelope.data)
        if size > self.history_bytes:
            # Not kept, and neither is anything older: kept offsets must end at the last.
            self._drop_all(channel)
            return
        now = time.monotonic()
        kept = channel.kept
        if kept is None:
            kept = channel.kept = deque()
        kept.append((now, envelope))
        channel.kept_bytes += size
        self._kept_count += 1
        self.kept_bytes += size
        self._fifo.append((channel, envelope.seq))
        while len(kept) > limit or channel.kept_bytes > self.history_bytes:
            self._drop_oldest(channel)
        self._expire(channel, now, ttl)
        fifo = self._fifo
        while self.kept_bytes > self.history_total_bytes and fifo:
            oldest, seq = fifo.popleft()
            if oldest.kept and oldest.kept[0][1].seq == seq:
                self._drop_oldest(oldest)
        if len(fifo) > 2 * self._kept_count + _SWEEP_SLACK:
            self._fifo = deque(entry for entry in fifo if self._is_kept(*entry))

    @staticmethod
    def _is_kept(channel: _Channel, seq: int) -> bool:
        # Kept offsets are consecutive and end at the channel's last one.
        return bool(channel.kept) and channel.kept[0][1].seq <= seq  # type: ignore[index]

    def _drop_oldest(self, channel: _Channel) -> None:
        kept = channel.kept
        assert kept
        size = len(kept.popleft()[1].data)
        channel.kept_bytes -= size
        self.kept_bytes -= size
        self._kept_count -= 1
        if not kept:
            channel.kept = None

    def _drop_all(self, channel: _Channel) -> None:
        while channel.kept:
            self._drop_oldest(channel)

    def _forget_one(self) -> None:
        """Forget the least recently used channel nobody here is subscribed to."""
        for name in self._channels:
            if name not in self._subscribed:
                self._drop_all(self._channels.pop(name))
                return

    def _expire(self, channel: _Channel, now: float, ttl: float) -> None:
        if ttl > 0:
            kept = channel.kept
            while kept and now - kept[0][0] > ttl:
                self._drop_oldest(channel)
                kept = channel.kept

    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        state = self._channels.get(channel)
        if state is None:
            return Backlog([], 0)
        self._expire(state, time.monotonic(), self.kept_for(channel)[1])
        kept = state.kept
        if not kept:
            return Backlog([], state.last, state.epoch)
        # Kept offsets are consecutive and end at `last`: the wanted ones are the newest n.
        count = min(state.last - after, limit, len(kept))
        if count <= 0:
            return Backlog([], state.last, state.epoch)
        wanted = islice(kept, len(kept) - count, None)
        return Backlog([envelope for _, envelope in wanted], state.last, state.epoch)

    async def renew_epoch(self, channel: str, epoch: str) -> str:
        state = self._channels.get(channel)
        if state is None:
            return ""
        if state.epoch == epoch:
            self._drop_all(state)
            state.epoch = secrets.token_urlsafe(6)
        return state.epoch

    @property
    def healthy(self) -> bool:
        return True

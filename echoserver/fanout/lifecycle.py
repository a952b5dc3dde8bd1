"""Lifecycle across processes: user_online/user_offline, channel_occupied/channel_vacated,
and the sweep of a crashed process's users and channels.

A user is online while they have a connection (any channel, WebSocket or SSE) on any
process; a channel is occupied while it has a member (guests included) on any process.
This process counts its own (Authority.on_user for users; the hub's member counts, through
TrackedPresence.set_local, for channels) and holds an entry in the scope while its count
is above 0, and for `grace` seconds (broadcast.presence_grace) after it reaches 0: a
return within the grace, here or on another process, changes nothing, a second tab
neither. The entry is written with brokers/lifecycle_holds.py's hold(), which moves the
ledger's flag in the same atomic step: the write that made a scope go from no entry to
one (or back) gets its sequence number and sends the event, once, whichever process it
is, in the order the broker applied the writes.

The sweep (shared brokers only): every presence_ttl/4 this process marks itself alive
and looks for processes past their deadline (a SIGKILLed worker). The first to claim one
removes each entry of its index with the same writes as a normal departure: its users'
entries per channel (broker presence: a user whose last entry that was has left: a leave
in join_leave namespaces and user_left, through Roster.decided), its channels'
(channel_vacated) and its users' (user_offline), each only if no other process holds it.
A cleanly stopped process is swept the same way, presence_ttl after its last beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from echoserver.brokers.base import BrokerUnavailable, Presence, Roll
from echoserver.brokers.lifecycle_holds import Holds, Moved
from echoserver.fanout.hub import Hub
from echoserver.fanout.presence import Roster
from echoserver.webhooks.events import Webhooks

log = logging.getLogger("echoserver.lifecycle")

# Index entries: "u\t<sub>", "c\t<channel>", "r\t<channel>\t<sub>\t<info JSON>".
USER, CHANNEL, ROSTER = "u", "c", "r"
_FLAGS = {USER: "#online", CHANNEL: "#occupied"}  # the ledger's flag of each scope
_KINDS = {
    USER: ("user_online", "user_offline"),
    CHANNEL: ("channel_occupied", "channel_vacated"),
    ROSTER: ("user_joined", "user_left"),  # the flag "u:<sub>" of "c:<channel>"
}


def scope_of(kind: str, key: str) -> tuple[str, str]:
    """The ledger's (scope, flag) of a user's or a channel's entry."""
    return f"{kind}:{key}", _FLAGS[kind]


def _target(entry: str) -> tuple[str, str, str, str, Any] | None:
    """An index entry's (kind, key, scope, flag, info); key of a roster entry:
    "<channel>\t<user>". None for an entry this version does not know."""
    kind, _, rest = entry.partition("\t")
    if kind in _FLAGS:
        return (kind, rest, *scope_of(kind, rest), None)
    parts = rest.split("\t", 2)
    if kind != ROSTER or len(parts) != 3:
        return None
    channel, user, info = parts
    try:
        decoded = json.loads(info)
    except ValueError:
        decoded = None
    return ROSTER, f"{channel}\t{user}", f"{CHANNEL}:{channel}", f"{USER}:{user}", decoded


class _Held:
    """This process's count of one user or channel, and its grace."""

    __slots__ = ("count", "indexed", "info", "since", "timer")

    def __init__(self, count: int, info: Any) -> None:
        self.count = count
        self.info = info
        self.since = 0.0  # when the count reached 0
        self.timer: asyncio.TimerHandle | None = None
        self.indexed = False


class Lifecycle:
    """This process's users and channels held in the lifecycle holds; the sweep."""

    def __init__(
        self, hub: Hub, holds: Holds, webhooks: Webhooks, roster: Roster, *, grace: float
    ) -> None:
        self.hub = hub
        self.holds = holds
        self.webhooks = webhooks
        self.roster = roster
        self.grace = grace
        self._held: dict[str, dict[str, _Held]] = {USER: {}, CHANNEL: {}}
        # The roster's (channel, user) in this process's index: their entry there.
        self._indexed: dict[tuple[str, str], str] = {}
        self._since: dict[tuple[str, str], float] = {}  # users within the roster's grace
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A write the broker may have missed (it was down): the next beat reconciles.
        self._dirty = False
        self._last_beat = 0.0  # time.monotonic() of the last beat the broker took
        self._quiet_until = 0.0  # no sweeping before: this process was cut off itself

    # -- counts ---------------------------------------------------------------------

    def user_count(self, sub: str, info: Any, connections: int) -> None:
        """The user's open connections on this process (Authority.on_user)."""
        self._count(USER, sub, connections, info)

    def channel_count(self, channel: str, members: int) -> None:
        """The channel's members on this process (the hub's set_local)."""
        if channel.startswith("#"):  # the hub's own (CONTROL_CHANNEL): no client's channel
            return
        self._count(CHANNEL, channel, members, None)

    def roster_entry(
        self, channel: str, user: str, info: Any, connections: int, present: bool
    ) -> None:
        """The Roster writes (present) or removes the user's entry on the channel (its
        grace included, with 0 connections). The first write and the removal move the
        user's hold on the channel (user_joined/user_left), and the index: before the
        write (a crash right after still finds it), with the info a sweep's leave carries."""
        place = (channel, user)
        if present and connections == 0:
            self._since.setdefault(place, time.time())  # their grace began
        elif present:
            self._since.pop(place, None)
        entry = self._indexed.get(place)
        if present == (entry is not None):
            return
        at = self._since.pop(place, time.time())
        if entry is None:
            entry = f"{ROSTER}\t{channel}\t{user}\t{json.dumps(info, separators=(',', ':'))}"
            self._indexed[place] = entry
        else:
            del self._indexed[place]
        scope, flag = f"{CHANNEL}:{channel}", f"{USER}:{user}"
        try:
            if present:
                self.holds.index(entry, True)
            moved = self.holds.hold(scope, flag, 1, present)
            if not present:
                self.holds.index(entry, False)
        except BrokerUnavailable:
            self._dirty = True
            return
        moved.add_done_callback(
            lambda done: self._settled(ROSTER, f"{channel}\t{user}", done, at, info, True)
        )

    def _count(self, kind: str, key: str, count: int, info: Any) -> None:
        table = self._held[kind]
        held = table.get(key)
        if count > 0:
            if held is None:
                held = table[key] = _Held(count, info)
                self._write(kind, key, held, True)
                return
            if held.timer is not None:  # back within the grace: the entry is still there
                held.timer.cancel()
                held.timer = None
            changed = held.count != count
            held.count = count
            if info is not None:
                held.info = info
            if changed and kind == USER:  # the snapshot's connections per process
                self._write(kind, key, held, True)
            return
        if held is None or held.count == 0:
            return
        held.count = 0
        held.since = time.time()
        if self.grace > 0:
            loop = asyncio.get_running_loop()
            held.timer = loop.call_later(self.grace, self._grace_over, kind, key, held)
            if kind == USER:
                self._write(kind, key, held, True)
            return
        self._grace_over(kind, key, held)

    def _grace_over(self, kind: str, key: str, held: _Held) -> None:
        held.timer = None
        if kind == CHANNEL:  # after its users' leaves: they end their grace at this moment too
            task = asyncio.ensure_future(self._vacate(key, held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._release(kind, key, held)

    async def _vacate(self, channel: str, held: _Held) -> None:
        await self.roster.settle(channel, self.grace + 1.0)
        self._release(CHANNEL, channel, held)

    def _release(self, kind: str, key: str, held: _Held) -> None:
        table = self._held[kind]
        if table.get(key) is held and held.count == 0 and held.timer is None:
            del table[key]
            self._write(kind, key, held, False)

    def _write(self, kind: str, key: str, held: _Held, present: bool) -> None:
        scope, flag = scope_of(kind, key)
        entry = f"{kind}\t{key}"
        at = time.time() if present else held.since
        count = held.count if kind == USER else 1
        crossing = not (present and held.indexed)  # this process's entry comes or goes
        try:
            if present and not held.indexed:
                self.holds.index(entry, True)
                held.indexed = True
            moved = self.holds.hold(scope, flag, count, present)
            if not present:
                self.holds.index(entry, False)
        except BrokerUnavailable as error:
            log.debug("lifecycle of %s not written: %s", scope, error)
            self._dirty = True
            return
        info = held.info
        moved.add_done_callback(lambda done: self._settled(kind, key, done, at, info, crossing))

    def _settled(
        self,
        kind: str,
        key: str,
        done: asyncio.Future[Moved],
        at: float,
        info: Any,
        crossing: bool,
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            log.debug("lifecycle of %s %s not written: %s", kind, key, error)
            self._dirty = True
            return
        self._report(kind, key, done.result(), at, info, crossing)

    def _report(
        self, kind: str, key: str, moved: Moved, at: float, info: Any, crossing: bool = True
    ) -> None:
        """Send what a hold changed. `key`: the user, the channel, or "<channel>\t<user>"."""
        name = _KINDS[kind][0 if moved.after > 0 else 1]
        if not moved.seq:
            if crossing:  # another process's entry keeps the state as it was
                self.webhooks.unchanged(name)
            return
        if kind == USER:
            self.webhooks.deliver(name, moved.seq, user=key, at=at, info=info)
        elif kind == CHANNEL:
            self.webhooks.deliver(name, moved.seq, channel=key, at=at)
        else:
            channel, _, user = key.partition("\t")
            self.webhooks.deliver(name, moved.seq, channel=channel, user=user, at=at, info=info)

    # -- the sweep ------------------------------------------------------------------

    def start(self) -> None:
        if self.holds.ttl > 0 and self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def close(self) -> None:
        """Stop the graces and the sweep. This process's entries stay: the survivors
        sweep them once its deadline passes (a clean stop is reported like a crash)."""
        for table in self._held.values():
            for held in table.values():
                if held.timer is not None:
                    held.timer.cancel()
            table.clear()
        for task in list(self._tasks):
            task.cancel()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _sweep_forever(self) -> None:
        interval = self.holds.ttl / 4
        while True:
            try:
                await self.sweep_once()
            except BrokerUnavailable as error:
                log.debug("lifecycle sweep skipped: %s", error)
            except Exception:
                log.exception("lifecycle sweep failed")
            await asyncio.sleep(interval)

    async def sweep_once(self) -> None:
        """Mark this process alive; re-write what the broker may have lost; sweep every
        dead process this process claims."""
        now = time.monotonic()
        await self.holds.beat()
        if self._last_beat and now - self._last_beat > self.holds.ttl:
            # Cut off from the broker for longer than a process lives: the others may
            # have been too (Redis itself was down); let them beat again before judging.
            self._quiet_until = now + self.holds.ttl
        self._last_beat = now
        await self._reconcile()
        if now < self._quiet_until:
            return
        for process_id in await self.holds.dead():
            entries = await self.holds.claim(process_id)
            if entries is None:
                continue  # another survivor's
            log.info("sweeping %d lifecycle entries of %s", len(entries), process_id)
            await self._sweep(process_id, entries)
            await self.holds.swept(process_id)

    def _wanted(self) -> set[str]:
        """This process's index as it should be."""
        wanted = set(self._indexed.values())
        for kind, table in self._held.items():
            wanted.update(f"{kind}\t{key}" for key in table)
        return wanted

    def _holds_entry(self, entry: str) -> bool:
        kind, _, rest = entry.partition("\t")
        if kind == ROSTER:
            parts = rest.split("\t", 2)
            return len(parts) == 3 and self._indexed.get((parts[0], parts[1])) == entry
        return kind in self._held and rest in self._held[kind]

    async def _reconcile(self) -> None:
        """After a failed write, or when the broker's copy of this process's index is not
        the right size (a restarted Redis lost it): make the index and the entries match
        what this process holds, reporting what that changes, as any write would."""
        wanted = self._wanted()
        if not self._dirty and await self.holds.own_index_size() == len(wanted):
            return
        self._dirty = False
        stored = await self.holds.own_index()
        wanted = self._wanted()
        now = time.time()
        # Each entry checked again when written: this process's state moves meanwhile.
        for entry in sorted(stored - wanted):
            target = _target(entry)
            if target is None or self._holds_entry(entry):
                continue
            kind, key, scope, flag, _ = target
            self.holds.index(entry, False)
            moved = await self.holds.hold(scope, flag, 0, False)
            self._report(kind, key, moved, now, None, False)
        for entry in sorted(wanted):
            target = _target(entry)
            if target is None or not self._holds_entry(entry):
                continue
            kind, key, scope, flag, info = target
            count = 1
            held = self._held.get(kind, {}).get(key)
            if held is not None:
                held.indexed = True
                info = held.info
                count = held.count if kind == USER else 1
            self.holds.index(entry, True)
            moved = await self.holds.hold(scope, flag, count, True)
            self._report(kind, key, moved, now, info, False)
        log.info("lifecycle entries re-written: %d", len(wanted))

    async def _sweep(self, process_id: str, entries: list[str]) -> None:
        """Remove a dead process's entries: its users' per channel (leaves), then its
        channels (vacated), then its users (offline); each group's writes at once."""
        now = time.time()
        forget = getattr(self.hub.broker.presence, "forget_user", None)
        targets = [target for target in map(_target, entries) if target is not None]
        for kind in (ROSTER, CHANNEL, USER):
            group = sorted((t for t in targets if t[0] == kind), key=lambda t: t[1])
            if kind == ROSTER and forget is not None:
                places = [key.partition("\t") for _, key, _, _, _ in group]
                left = await asyncio.gather(
                    *(forget(ch, user, process_id) for ch, _, user in places)
                )
                for (channel, _, user), after, target in zip(places, left, group, strict=True):
                    if after == 0:  # their last entry on the channel: the leave signal
                        self.roster.decided("leave", channel, user, target[4])
            moves = [self.holds.hold(scope, flag, 0, False, owner=process_id)
                     for _, _, scope, flag, _ in group]  # fmt: skip
            for (_, key, _, _, info), moved in zip(
                group, await asyncio.gather(*moves), strict=True
            ):
                self._report(kind, key, moved, now, info)

    # -- snapshots ------------------------------------------------------------------

    async def indexes(self) -> dict[str, list[str]]:
        return await self.holds.indexes()

    async def user_connections(self, sub: str) -> dict[str, int]:
        """The user's connections per process holding them online (0: within the grace)."""
        return await self.holds.holders(*scope_of(USER, sub))


class TrackedPresence(Presence):
    """The hub's presence, telling the lifecycle each member count and roster entry."""

    def __init__(self, inner: Presence, lifecycle: Lifecycle) -> None:
        self.inner = inner
        self.lifecycle = lifecycle

    async def set_local(self, channel: str, members: int) -> None:
        self.lifecycle.channel_count(channel, members)
        await self.inner.set_local(channel, members)

    async def count(self, channel: str) -> int:
        return await self.inner.count(channel)

    async def set_user(
        self, channel: str, user: str, connections: int, info: Any, present: bool = True
    ) -> tuple[int, int]:
        self.lifecycle.roster_entry(channel, user, info, connections, present)
        return await self.inner.set_user(channel, user, connections, info, present)

    async def roll(self, channel: str) -> Roll:
        return await self.inner.roll(channel)

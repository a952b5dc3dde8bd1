"""Users on channels: this process's connections per (channel, user), written to the
broker's presence, and the join and leave events they decide.

Endpoints call arrive() once a connection of a user (a verified token's sub) is a member
of a channel, and depart() once it has left; guests (no sub) are not tracked here (they
count in the channel's members). The Roster keeps this process's connections per
(channel, user) and writes each change to the broker's presence (Presence.set_user),
which answers, atomically with the write, how many live processes have the user there
before and after: a user whose count crosses 0 there, across every process, has joined
or left; a second tab on any process changes nothing.

The grace: when a user's last connection on this process goes, their entry stays, with 0
connections, for `grace` seconds before it is removed. A reconnect within it, here or on
another process, finds the user still there: no leave, no join. So a leave comes `grace`
seconds after the last connection went, and only when none came back anywhere.

In channels where `announces(channel)` (namespaces with join_leave = true), joins and
leaves go to the channel's members as {"type":"join"|"leave","channel":C,"user":sub,
"info":I} through the broker's signal(): the channel's own delivery path (every process
with members gets it, in order with the channel's messages), with offset SIGNAL, so it is
neither numbered nor kept in history. A crashed (SIGKILLed) process's users drop out of
presence when its entries expire; the survivor that sweeps it (fanout/lifecycle.py)
announces their leave through decided().
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from echoserver.brokers.base import BrokerUnavailable, Envelope
from echoserver.fanout.hub import Hub

log = logging.getLogger("echoserver.presence")

# The sender of a presence event: never a subscriber id (those are "<node>:<n>").
PRESENCE_SENDER = "#presence"


def presence_event(kind: str, channel: str, user: str, info: Any) -> bytes:
    """{"type":"join"|"leave","channel":C,"user":sub,"info":I}: always starts with
    {"type":"<kind>", which the event stream reads for its event name."""
    return json.dumps(
        {"type": kind, "channel": channel, "user": user, "info": info}, separators=(",", ":")
    ).encode()


class _Here:
    """One user's connections on one channel, on this process."""

    __slots__ = ("connections", "info", "timer")

    def __init__(self, info: Any) -> None:
        self.connections = 0
        self.info = info
        self.timer: asyncio.TimerHandle | None = None


class Roster:
    """This process's users per channel, and their joins and leaves (see the module)."""

    def __init__(
        self,
        hub: Hub,
        *,
        grace: float = 5.0,
        announces: Callable[[str], bool] = lambda channel: False,
        lists_users: bool = True,
    ) -> None:
        self.hub = hub
        self.grace = grace
        self.announces = announces
        # False when nothing reads the users (no API key for the presence API, no join_leave
        # namespace, no webhooks): then a user's join writes nothing to the broker.
        self.lists_users = lists_users
        self._here: dict[tuple[str, str], _Here] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def arrive(self, channel: str, user: str | None, info: Any) -> None:
        """A connection of `user` has become a member of the channel (after hub.join)."""
        if user is None or not self.lists_users:
            return
        place = (channel, user)
        here = self._here.get(place)
        if here is None:
            here = self._here[place] = _Here(info)
        elif here.timer is not None:
            here.timer.cancel()  # back within the grace
            here.timer = None
        here.connections += 1
        here.info = info
        await self._write(place, here, present=True)

    async def depart(self, channel: str, user: str | None) -> None:
        """A connection of `user` has left the channel (after hub.leave)."""
        if user is None or not self.lists_users:
            return
        place = (channel, user)
        here = self._here.get(place)
        if here is None or here.connections <= 0:
            return
        here.connections -= 1
        if here.connections > 0 or self.grace > 0:
            if here.connections == 0:
                loop = asyncio.get_running_loop()
                here.timer = loop.call_later(self.grace, self._grace_over, place, here)
            await self._write(place, here, present=True)  # held with 0 during the grace
            return
        del self._here[place]
        await self._write(place, here, present=False)

    async def settle(self, channel: str, limit: float) -> None:
        """Wait (up to `limit` seconds) until no user of the channel is here, or within
        the grace here, and their removals are written: for a channel this process has no
        member of any more, so that its vacated comes after its users' leaves."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self._tasks and all(where != channel for where, _ in self._here):
                return
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the grace timers (the broker's clean exit removes this process's entries)."""
        for here in self._here.values():
            if here.timer is not None:
                here.timer.cancel()
        self._here.clear()
        for task in self._tasks:
            task.cancel()

    def _grace_over(self, place: tuple[str, str], here: _Here) -> None:
        here.timer = None
        if self._here.get(place) is not here or here.connections:
            return
        del self._here[place]
        task = asyncio.ensure_future(self._remove(place, here))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove(self, place: tuple[str, str], here: _Here) -> None:
        # The user may have come back between the timer and this task: their new
        # connection's entry is written already, and is the one that counts.
        if place not in self._here:
            await self._write(place, here, present=False)

    async def _write(self, place: tuple[str, str], here: _Here, *, present: bool) -> None:
        channel, user = place
        try:
            before, after = await self.hub.presence.set_user(
                channel, user, here.connections, here.info, present
            )
        except BrokerUnavailable as error:  # a refusing Redis: it is re-written on resync
            log.debug("presence of %s on %s not written: %s", user, channel, error)
            return
        if before == 0 and after > 0:
            kind = "join"
        elif before > 0 and after == 0:
            kind = "leave"
        else:
            return
        self.decided(kind, channel, user, here.info)

    def decided(self, kind: str, channel: str, user: str, info: Any) -> None:
        """A join or leave decided once across processes (here, or by the sweep of a
        crashed process's entries, fanout/lifecycle.py): announced where `announces`."""
        if not self.announces(channel):
            return
        envelope = Envelope(channel, presence_event(kind, channel, user, info), False)
        envelope.sender = PRESENCE_SENDER
        try:
            self.hub.broker.signal(envelope)
        except BrokerUnavailable as error:
            log.info("%s of %s on %s not announced: %s", kind, user, channel, error)

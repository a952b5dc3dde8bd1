"""Presence on Redis: a channel's members across every process sharing one Redis.

A hash per channel {process id: local members} plus one heartbeat key per process with a
TTL (the Redis broker refreshes it). A reader counts only processes whose heartbeat is
alive, so a crashed worker's members disappear within the TTL. While Redis is unreachable,
set_local() only records the count (re-written when Redis is back) and count() answers
with this process's own members.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from echoserver.brokers import redis_users
from echoserver.brokers.base import BrokerUnavailable, Presence, PresentUser, Roll
from echoserver.brokers.redis_wire import sha1


# KEYS: the channel's presence hash. ARGV: heartbeat key prefix.
# Heartbeat keys are not declared in KEYS: fine on a standalone Redis (not Redis Cluster).
def count_script(*, before: bytes = b"", entry: bytes = b"", alive: bytes, members: bytes) -> bytes:
    """A script that adds up the live entries of the presence hash KEYS[1] and drops the
    others. In the loop, ``fields[i]`` is an entry's process id and ``fields[i + 1]`` its
    value; `entry` (Lua) runs first for each, `alive` says whether it counts, `members` is
    how many it counts for. `before` runs once, before the loop."""
    return b"""
local fields = redis.call('HGETALL', KEYS[1])
%s
local total = 0
for i = 1, #fields, 2 do
  %s
  if %s then
    total = total + %s
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return total
""" % (before, entry, alive, members)


COUNT_SCRIPT = count_script(
    alive=b"redis.call('EXISTS', ARGV[1] .. fields[i]) == 1", members=b"tonumber(fields[i + 1])"
)
_COUNT_SHA = sha1(COUNT_SCRIPT)

Command = tuple[Any, ...]


class RedisPresence(Presence):
    """This process's members per channel, written to Redis through the broker's queue;
    its users per channel likewise (redis_users.py)."""

    SET_USER = redis_users.SET_BY_HEARTBEAT
    ROLL = redis_users.ROLL_BY_HEARTBEAT
    USER_TTL_MS = 0  # the user keys do not expire: dead entries go when read

    def __init__(
        self,
        command: Callable[..., asyncio.Future[Any]],
        *,
        prefix: str,
        process_id: str,
        heartbeat_prefix: str,
    ) -> None:
        self._command = command  # queues one command; raises BrokerUnavailable when down
        self._key_prefix = f"{prefix}:members:"
        self._process_id = process_id
        self._heartbeat_prefix = heartbeat_prefix
        self.local: dict[str, int] = {}  # this process's members per channel
        self._unsynced: set[str] = set()  # changes Redis may have missed
        self._prefix = prefix
        # This process's users per channel: (channel, user) -> (connections, info JSON).
        self.users: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._unsynced_users: set[tuple[str, str]] = set()

    async def set_local(self, channel: str, members: int) -> None:
        if members > 0:
            self.local[channel] = members
        else:
            self.local.pop(channel, None)
        try:
            await self._command(*self._write(channel))
        except BrokerUnavailable:
            self._unsynced.add(channel)  # written when Redis is back

    async def count(self, channel: str) -> int:
        """Members on every live process; this process's own while Redis is unreachable."""
        try:
            return int(
                await self._command(
                    "EVALSHA", _COUNT_SHA, 1, self.key(channel), self._heartbeat_prefix
                )
            )
        except BrokerUnavailable:
            return self.local.get(channel, 0)

    async def set_user(
        self, channel: str, user: str, connections: int, info: Any, present: bool = True
    ) -> tuple[int, int]:
        place = (channel, user)
        had = place in self.users
        if present:
            self.users[place] = (connections, json.dumps(info, separators=(",", ":")).encode())
        else:
            self.users.pop(place, None)
        try:
            before, after = await self._command(*self._write_user(place))
        except BrokerUnavailable:
            # Redis cannot tell: this process's own view (no other process hears of it).
            self._unsynced_users.add(place)
            return int(had), int(present)
        return int(before), int(after)

    async def roll(self, channel: str) -> Roll:
        """The users on every live process; this process's own while Redis is unreachable."""
        try:
            reply = await self._command(
                "EVALSHA",
                redis_users.SHA[self.ROLL],
                1,
                self.users_key(channel),
                self.user_key(channel, ""),
                self._heartbeat_prefix,
            )
        except BrokerUnavailable:
            users = [
                PresentUser(user, json.loads(info), n)
                for (where, user), (n, info) in self.users.items()
                if where == channel
            ]
            return Roll(users, self.local.get(channel, 0))
        found = [
            PresentUser(reply[i].decode(), json.loads(reply[i + 2]), int(reply[i + 1]))
            for i in range(0, len(reply), 3)
        ]
        return Roll(found, await self.count(channel))

    async def forget_user(self, channel: str, user: str, process_id: str) -> int:
        """Remove a dead process's entry of the user on the channel (a crashed worker's
        sweep, fanout/lifecycle.py); the user's live entries left there."""
        _, after = await self._command(
            "EVALSHA", redis_users.SHA[self.SET_USER], 2, self.user_key(channel, user),
            self.users_key(channel), process_id, 0, 0, b"null", self.USER_TTL_MS, user,
            self._heartbeat_prefix,
        )  # fmt: skip
        return int(after)

    def lost(self) -> None:
        """Redis may have lost everything this process wrote (a restarted server)."""
        self._unsynced.update(self.local)
        self._unsynced_users.update(self.users)

    def resync(self) -> list[Command]:
        """The commands that re-write what Redis may have missed; it is then assumed synced."""
        unsynced, self._unsynced = self._unsynced, set()
        users, self._unsynced_users = self._unsynced_users, set()
        return [self._write(channel) for channel in unsynced] + [
            self._write_user(place) for place in users
        ]

    def removal(self) -> list[Command]:
        """The commands that take this process's members out of every channel (a clean exit)."""
        return [("HDEL", self.key(channel), self._process_id) for channel in self.local] + [
            ("HDEL", self.user_key(*place), self._process_id) for place in self.users
        ]

    def users_key(self, channel: str) -> str:
        """The set of the channel's users (on the channel's slot)."""
        return f"{self._prefix}:{{{channel}}}:users"

    def user_key(self, channel: str, user: str) -> str:
        """The hash of one user's entries on the channel, per process (the channel's slot)."""
        return f"{self._prefix}:{{{channel}}}:user:{user}"

    def _write_user(self, place: tuple[str, str]) -> Command:
        channel, user = place
        entry = self.users.get(place)
        connections, info = entry if entry is not None else (0, b"null")
        return (
            "EVALSHA",
            redis_users.SHA[self.SET_USER],
            2,
            self.user_key(channel, user),
            self.users_key(channel),
            self._process_id,
            connections,
            1 if entry is not None else 0,
            info,
            self.USER_TTL_MS,
            user,
            self._heartbeat_prefix,
        )

    def key(self, channel: str) -> str:
        """The channel's presence hash."""
        return self._key_prefix + channel

    def _write(self, channel: str) -> Command:
        members = self.local.get(channel, 0)
        key = self.key(channel)
        if members:
            return ("HSET", key, self._process_id, members)
        return ("HDEL", key, self._process_id)

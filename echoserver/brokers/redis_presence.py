"""Presence on Redis: a channel's members across every process sharing one Redis.

A hash per channel {process id: local members} plus one heartbeat key per process with a
TTL (the Redis broker refreshes it). A reader counts only processes whose heartbeat is
alive, so a crashed worker's members disappear within the TTL. While Redis is unreachable,
set_local() only records the count (re-written when Redis is back) and count() answers
with this process's own members.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from echoserver.brokers.base import BrokerUnavailable, Presence
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
    """This process's members per channel, written to Redis through the broker's queue."""

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

    def lost(self) -> None:
        """Redis may have lost everything this process wrote (a restarted server)."""
        self._unsynced.update(self.local)

    def resync(self) -> list[Command]:
        """The commands that re-write what Redis may have missed; it is then assumed synced."""
        unsynced, self._unsynced = self._unsynced, set()
        return [self._write(channel) for channel in unsynced]

    def removal(self) -> list[Command]:
        """The commands that take this process's members out of every channel (a clean exit)."""
        return [("HDEL", self.key(channel), self._process_id) for channel in self.local]

    def key(self, channel: str) -> str:
        """The channel's presence hash."""
        return self._key_prefix + channel

    def _write(self, channel: str) -> Command:
        members = self.local.get(channel, 0)
        key = self.key(channel)
        if members:
            return ("HSET", key, self._process_id, members)
        return ("HDEL", key, self._process_id)

"""Presence on a Redis Cluster: a channel's members counted on the channel's own slot.

The single-Redis presence checks per-process heartbeat keys, which live on other slots: a
cluster refuses that script. Here the channel's hash ``<prefix>:{channel}:members`` (the
channel's slot) maps each process id to ``<members> <deadline>``, the deadline in Redis's
own clock (ms): each live process re-writes its entries every few seconds (refresh()), the
count script adds up the entries whose deadline has not passed and drops the others. So a
crashed worker's members disappear within `ttl`, without a key on another slot, and hosts'
clocks do not matter. The hash itself expires once no process refreshes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from echoserver.brokers import redis_users
from echoserver.brokers.base import BrokerUnavailable
from echoserver.brokers.redis_presence import Command, RedisPresence, count_script
from echoserver.brokers.redis_wire import sha1

# KEYS: the channel's presence hash. ARGV: process id, members, ttl in ms.
SET_SCRIPT = b"""
if tonumber(ARGV[2]) <= 0 then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now + ttl))
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# KEYS: the channel's presence hash. Counts the live entries, drops the expired ones.
COUNT_SCRIPT = count_script(
    before=b"""local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)""",
    entry=b"local members, deadline = string.match(fields[i + 1], '^(%d+) (%d+)$')",
    alive=b"members and tonumber(deadline) >= now",
    members=b"tonumber(members)",
)
SET_SHA = sha1(SET_SCRIPT)
COUNT_SHA = sha1(COUNT_SCRIPT)


class ClusterPresence(RedisPresence):
    """This process's members per channel, in hashes on each channel's own slot; its
    users per channel likewise, alive until a deadline (redis_users.py)."""

    SET_USER = redis_users.SET_BY_DEADLINE
    ROLL = redis_users.ROLL_BY_DEADLINE

    def __init__(
        self,
        command: Callable[..., asyncio.Future[Any]],
        *,
        prefix: str,
        process_id: str,
        ttl: float,
    ) -> None:
        super().__init__(command, prefix=prefix, process_id=process_id, heartbeat_prefix="")
        self._prefix = prefix
        self._ttl_ms = int(ttl * 1000)
        self.USER_TTL_MS = self._ttl_ms

    def key(self, channel: str) -> str:
        return f"{self._prefix}:{{{channel}}}:members"

    async def count(self, channel: str) -> int:
        """Members on every live process; this process's own while the cluster is unreachable."""
        try:
            return int(await self._command("EVALSHA", COUNT_SHA, 1, self.key(channel)))
        except BrokerUnavailable:
            return self.local.get(channel, 0)

    def refresh(self) -> list[Command]:
        """The commands that push this process's deadlines on (sent every few seconds)."""
        return [self._write(channel) for channel in self.local] + [
            self._write_user(place) for place in self.users
        ]

    def _write(self, channel: str) -> Command:
        members = self.local.get(channel, 0)
        return ("EVALSHA", SET_SHA, 1, self.key(channel), self._process_id, members, self._ttl_ms)

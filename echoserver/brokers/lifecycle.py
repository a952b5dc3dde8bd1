"""The lifecycle ledger: which process owns a lifecycle event, and its sequence number.

Several processes may observe the same transition (every worker sees a channel's member
count reach 0 once its presence entries expire). Each one asks the ledger to move a flag
(`field` of a `scope`: "#occupied" of "c:room") to the state it observed; the move is a
compare-and-set, atomic in the broker, so exactly one caller changes it and gets the
scope's next sequence number; every other caller gets 0 and sends nothing. The sequence
counts the events sent for a scope (a channel, a user): 1, 2, 3, ... without gap, so a
backend that sees a gap knows it missed one.

With the memory broker the ledger is a dict in this process. On Redis it is one script
run over the broker's own command connection (the state hash and the counter of a scope
share a hash tag, so it runs on a Redis Cluster too). A flag at rest is no field at all:
a scope's hash holds only what is active now and disappears when nothing is. The counter
outlives it by SEQ_TTL seconds, past which a scope numbers from 1 again.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from echoserver.brokers.base import Broker, BrokerUnavailable
from echoserver.brokers.memory import MemoryBroker

__all__ = ["BrokerUnavailable", "Ledger", "MemoryLedger", "RedisLedger", "ledger_for"]

SEQ_TTL = 30 * 24 * 3600  # seconds a scope's counter is kept after its last event


class Ledger(abc.ABC):
    """Flags per scope, moved by compare-and-set, and a counter per scope."""

    @abc.abstractmethod
    async def transition(self, scope: str, field: str, active: bool) -> int:
        """Set the flag to `active`. The scope's next sequence number when this call changed
        it, 0 when it already was so. Raises BrokerUnavailable when the broker cannot
        tell (then nobody may assume the event was sent)."""


class MemoryLedger(Ledger):
    """One process: the flags and counters in dicts."""

    def __init__(self) -> None:
        self._active: dict[str, set[str]] = {}
        self._seq: dict[str, int] = {}

    async def transition(self, scope: str, field: str, active: bool) -> int:
        return self.move(scope, field, active)

    def move(self, scope: str, field: str, active: bool) -> int:
        """transition() at once (the lifecycle holds move a flag with their own write)."""
        flags = self._active.get(scope)
        if (flags is not None and field in flags) == active:
            return 0
        if active:
            self._active.setdefault(scope, set()).add(field)
        else:
            assert flags is not None
            flags.discard(field)
            if not flags:
                del self._active[scope]
        seq = self._seq[scope] = self._seq.get(scope, 0) + 1
        return seq


# KEYS: the scope's state hash, its counter. ARGV: field, "1"/"0", counter TTL in seconds.
TRANSITION_SCRIPT = b"""
local was = redis.call('HEXISTS', KEYS[1], ARGV[1])
local want = tonumber(ARGV[2])
if was == want then
  return 0
end
if want == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], '1')
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local seq = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""


class RedisLedger(Ledger):
    """The flags and counters in Redis (one server or a Cluster), through `command`: the
    broker's queue of commands, which raises BrokerUnavailable while Redis is down."""

    def __init__(self, command: Callable[..., Any], prefix: str) -> None:
        self._command = command
        self._prefix = f"{prefix}:lifecycle:"

    def keys(self, scope: str) -> tuple[str, str]:
        tag = f"{self._prefix}{{{scope}}}"
        return tag + ":state", tag + ":seq"

    async def transition(self, scope: str, field: str, active: bool) -> int:
        state, seq = self.keys(scope)
        # EVAL rather than EVALSHA: lifecycle events are rare next to messages, and the
        # script then needs no loading after a Redis restart or failover.
        reply = await self._command(
            "EVAL", TRANSITION_SCRIPT, 2, state, seq, field, "1" if active else "0", SEQ_TTL
        )
        return int(reply)


def ledger_for(broker: Broker) -> Ledger:
    """The ledger that shares `broker`'s reach: the memory broker's process, or its Redis."""
    if isinstance(broker, MemoryBroker):
        return MemoryLedger()
    from echoserver.brokers.redis_base import PipelinedRedisBroker

    if isinstance(broker, PipelinedRedisBroker):
        # The broker's own pipelined command connection (what its presence uses too).
        return RedisLedger(broker._command, broker._keys.prefix)
    raise TypeError(f"no lifecycle ledger for {type(broker).__name__}")

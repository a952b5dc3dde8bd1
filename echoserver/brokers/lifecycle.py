"""The lifecycle ledger: a flag per lifecycle state and a sequence number per scope.

A flag (`field` of a `scope`: "#occupied" of "c:room", "#online" of "u:alice", "u:alice" of
"c:room" for a user on a channel) is on while some process holds an entry for it. The
lifecycle holds (brokers/lifecycle_holds.py) move it in the same atomic write that records
or removes a process's entry, so exactly one write changes it, however many processes race,
and that write takes the scope's next sequence number; its process sends the event. The
sequence counts the events of a scope (a channel, a user): 1, 2, 3, ... without gap, so a
backend that sees a gap knows it missed one.

With the memory broker the ledger is dicts in this process (MemoryLedger.move). On Redis
it is two keys per scope that the holds' script writes, named by RedisLedger.keys(): the
state hash and the counter share a hash tag, so the script runs on a Redis Cluster too. A
flag at rest is no field at all: a scope's hash holds only what is active now and
disappears when nothing is. The counter outlives it by SEQ_TTL seconds, past which a scope
numbers from 1 again.
"""

from __future__ import annotations

from typing import TypeAlias

from echoserver.brokers.base import Broker
from echoserver.brokers.memory import MemoryBroker

__all__ = ["SEQ_TTL", "Ledger", "MemoryLedger", "RedisLedger", "ledger_for"]

SEQ_TTL = 30 * 24 * 3600  # seconds a scope's counter is kept after its last event


class MemoryLedger:
    """One process: the flags and counters in dicts."""

    def __init__(self) -> None:
        self._active: dict[str, set[str]] = {}
        self._seq: dict[str, int] = {}

    def move(self, scope: str, field: str, active: bool) -> int:
        """Set the flag to `active`: the scope's next sequence number when this call changed
        it, 0 when it already was so (the memory holds call it with their own write)."""
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


class RedisLedger:
    """The flags and counters in Redis (one server or a Cluster): where they are; the
    holds' script (brokers/lifecycle_holds.py) moves them."""

    def __init__(self, prefix: str) -> None:
        self._prefix = f"{prefix}:lifecycle:"

    def keys(self, scope: str) -> tuple[str, str]:
        """The scope's state hash and its counter (one hash tag)."""
        tag = f"{self._prefix}{{{scope}}}"
        return tag + ":state", tag + ":seq"


Ledger: TypeAlias = MemoryLedger | RedisLedger


def ledger_for(broker: Broker) -> Ledger:
    """The ledger that shares `broker`'s reach: the memory broker's process, or its Redis."""
    if isinstance(broker, MemoryBroker):
        return MemoryLedger()
    from echoserver.brokers.redis_base import PipelinedRedisBroker

    if isinstance(broker, PipelinedRedisBroker):
        return RedisLedger(broker._keys.prefix)
    raise TypeError(f"no lifecycle ledger for {type(broker).__name__}")

"""Lifecycle holds: which processes hold a lifecycle scope (a user online, a channel
occupied), written atomically with the ledger's flag, and what a survivor sweeps when a
process dies.

A flag of a scope (the ledger's: "#online" of "u:alice", "#occupied" of "c:room", "u:alice"
of "c:room") has one entry per process that holds it (a count: the user's connections
there; 1 for a channel with members or a user on a channel there). hold() writes or
removes this process's entry and, in the same atomic step, sets the ledger's flag to "some
entry exists" and takes the scope's next sequence number if that changed it. Two
processes racing (one's last member leaving as another's first arrives) are thus ordered
by the broker: the one whose write made the state change reports it, with its seq, and
the ledger always ends matching the entries (no read-after-write to lose).

A crashed (SIGKILLed) process never removes its entries. Every process adds what it
holds to its own index (a set) and marks itself alive with a deadline in a sorted set of
processes. A survivor that finds a process past its deadline claims it (SET NX), reads
its index and removes each entry with the same hold() as a normal departure (owner = the
dead process): whatever that empties is reported once, by the claimer.

Redis keys (prefix = the broker's): ``<prefix>:lifecycle:{<scope>}:live`` (hash, process
id -> count; ``:live:u:<sub>`` for a user on a channel) beside the ledger's ``:state`` and
``:seq`` of the scope (one hash tag: one slot on a Cluster); ``<prefix>:lifecycle:procs``
(sorted set, process id -> deadline ms, Redis clock); ``<prefix>:lifecycle:{proc:<id>}:index``
and ``:claim`` (one slot per process).
With the memory broker everything is this one process: dicts, and nothing ever dies.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from echoserver.brokers.base import Broker
from echoserver.brokers.lifecycle import SEQ_TTL, Ledger, MemoryLedger, RedisLedger, ledger_for
from echoserver.brokers.memory import MemoryBroker

CLAIM_TTL_MS = 60_000  # a claimer that dies mid-sweep: another takes over after this


@dataclass(frozen=True, slots=True)
class Moved:
    """What a hold() did: live entries of the scope before and after, and the scope's
    sequence number if this write changed the flag (then it is on iff after > 0)."""

    before: int
    after: int
    seq: int


class Holds(abc.ABC):
    """Entries per scope and process, moved with the ledger; the process index (above)."""

    process_id: str
    ttl: float = 0.0  # seconds a process stays alive after its last beat (0: never dies)

    @abc.abstractmethod
    def hold(
        self, scope: str, field: str, count: int, present: bool, owner: str | None = None
    ) -> asyncio.Future[Moved]:
        """Write (or remove) the entry of `owner` (default this process) in `scope`, and
        move the ledger's `field` of it to match. Queued at once, in call order; raises
        BrokerUnavailable at once when the broker is down."""

    @abc.abstractmethod
    def index(self, entry: str, present: bool) -> None:
        """Add (remove) an entry to this process's index; queued at once, in call order."""

    @abc.abstractmethod
    async def own_index(self) -> set[str]:
        """This process's index as the broker has it."""

    @abc.abstractmethod
    async def own_index_size(self) -> int:
        """How many entries the broker has in this process's index."""

    @abc.abstractmethod
    async def holders(self, scope: str, field: str) -> dict[str, int]:
        """The entries of a scope's flag: process id -> count."""

    @abc.abstractmethod
    async def indexes(self) -> dict[str, list[str]]:
        """Each live process's index (the snapshots)."""

    # Liveness: only for brokers shared by several processes.
    async def beat(self) -> None:
        """Mark this process alive for `ttl` seconds more."""
        return None

    async def dead(self) -> list[str]:
        """Processes past their deadline, not yet swept."""
        return []

    async def claim(self, process_id: str) -> list[str] | None:
        """The index of a dead process if this process is the first to claim it."""
        return None

    async def swept(self, process_id: str) -> None:
        """The dead process's entries are all removed: forget it."""
        return None


def live_name(scope: str, field: str) -> str:
    """Where a flag's entries are: "<scope>:live" for the scope's own flag (#online,
    #occupied), "<scope>:live:<field>" for another (a user on a channel: "u:alice")."""
    return f"{scope}:live" if field.startswith("#") else f"{scope}:live:{field}"


class MemoryHolds(Holds):
    """One process: its own entries only."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self.process_id = "local"
        self._ledger = ledger
        self._live: dict[str, dict[str, int]] = {}
        self._index: set[str] = set()

    def hold(
        self, scope: str, field: str, count: int, present: bool, owner: str | None = None
    ) -> asyncio.Future[Moved]:
        place = live_name(scope, field)
        entries = self._live.setdefault(place, {})
        before = len(entries)
        if present:
            entries[owner or self.process_id] = count
        else:
            entries.pop(owner or self.process_id, None)
        after = len(entries)
        if not entries:
            del self._live[place]
        future: asyncio.Future[Moved] = asyncio.get_running_loop().create_future()
        future.set_result(Moved(before, after, self._ledger.move(scope, field, after > 0)))
        return future

    def index(self, entry: str, present: bool) -> None:
        if present:
            self._index.add(entry)
        else:
            self._index.discard(entry)

    async def own_index(self) -> set[str]:
        return set(self._index)

    async def own_index_size(self) -> int:
        return len(self._index)

    async def holders(self, scope: str, field: str) -> dict[str, int]:
        return dict(self._live.get(live_name(scope, field), {}))

    async def indexes(self) -> dict[str, list[str]]:
        return {self.process_id: sorted(self._index)}


# KEYS: the scope's live hash, the ledger's state hash and counter. ARGV: process id,
# count, present (1/0), flag, counter TTL s. Returns {before, after, seq or 0}.
HOLD_SCRIPT = b"""
local before = redis.call('HLEN', KEYS[1])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local after = redis.call('HLEN', KEYS[1])
local want = 0
if after > 0 then want = 1 end
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == want then
  return {before, after, 0}
end
if want == 1 then
  redis.call('HSET', KEYS[2], ARGV[4], '1')
else
  redis.call('HDEL', KEYS[2], ARGV[4])
end
local seq = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {before, after, seq}
"""

_NOW = b"""local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""
# KEYS: the process set. ARGV: process id, ttl ms.
BEAT_SCRIPT = _NOW + b"redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])\nreturn 1\n"
# KEYS: the process set. ARGV: "dead" (deadline passed) or "live".
PROCS_SCRIPT = (
    _NOW
    + b"""if ARGV[1] == 'dead' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""
)
# KEYS: a process's claim, its index. ARGV: claimer, claim TTL ms. Returns {1, entry...}
# to the first claimer, {0} to any other.
CLAIM_SCRIPT = b"""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0}
end
local out = {1}
for _, entry in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  out[#out + 1] = entry
end
return out
"""


class RedisHolds(Holds):
    """The entries in Redis (one server or a Cluster) through the broker's command queue."""

    def __init__(
        self, command: Callable[..., asyncio.Future[Any]], ledger: RedisLedger, *, prefix: str,
        process_id: str, ttl: float,
    ) -> None:  # fmt: skip
        self._command = command
        self._ledger = ledger
        self._prefix = f"{prefix}:lifecycle:"
        self.process_id = process_id
        self.ttl = ttl

    def _proc(self, process_id: str) -> str:
        return f"{self._prefix}{{proc:{process_id}}}"

    @property
    def _procs(self) -> str:
        return self._prefix + "procs"

    def live_key(self, scope: str, field: str) -> str:
        return f"{self._prefix}{{{scope}}}{live_name(scope, field)[len(scope) :]}"

    def hold(
        self, scope: str, field: str, count: int, present: bool, owner: str | None = None
    ) -> asyncio.Future[Moved]:
        state, seq = self._ledger.keys(scope)
        reply = self._command(
            "EVAL", HOLD_SCRIPT, 3, self.live_key(scope, field), state, seq,
            owner or self.process_id, count, "1" if present else "0", field, SEQ_TTL,
        )  # fmt: skip
        moved: asyncio.Future[Moved] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[Any]) -> None:
            if moved.done():
                return
            if done.cancelled():
                moved.cancel()
            elif (error := done.exception()) is not None:
                moved.set_exception(error)
            else:
                before, after, number = done.result()
                moved.set_result(Moved(int(before), int(after), int(number)))

        reply.add_done_callback(settle)
        return moved

    def index(self, entry: str, present: bool) -> None:
        command = "SADD" if present else "SREM"
        reply = self._command(command, self._proc(self.process_id) + ":index", entry)
        reply.add_done_callback(_retrieve)

    async def own_index(self) -> set[str]:
        reply = await self._command("SMEMBERS", self._proc(self.process_id) + ":index")
        return {entry.decode() for entry in reply}

    async def own_index_size(self) -> int:
        return int(await self._command("SCARD", self._proc(self.process_id) + ":index"))

    async def holders(self, scope: str, field: str) -> dict[str, int]:
        reply = await self._command("HGETALL", self.live_key(scope, field))
        return {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}

    async def indexes(self) -> dict[str, list[str]]:
        live = await self._command("EVAL", PROCS_SCRIPT, 1, self._procs, "live")
        pids = [pid.decode() for pid in live]
        found = await asyncio.gather(
            *(self._command("SMEMBERS", self._proc(pid) + ":index") for pid in pids)
        )
        return {
            pid: sorted(entry.decode() for entry in entries)
            for pid, entries in zip(pids, found, strict=True)
        }

    async def beat(self) -> None:
        ttl_ms = int(self.ttl * 1000)
        await self._command("EVAL", BEAT_SCRIPT, 1, self._procs, self.process_id, ttl_ms)

    async def dead(self) -> list[str]:
        reply = await self._command("EVAL", PROCS_SCRIPT, 1, self._procs, "dead")
        return [pid.decode() for pid in reply if pid.decode() != self.process_id]

    async def claim(self, process_id: str) -> list[str] | None:
        proc = self._proc(process_id)
        reply = await self._command(
            "EVAL", CLAIM_SCRIPT, 2, proc + ":claim", proc + ":index", self.process_id,
            CLAIM_TTL_MS,
        )  # fmt: skip
        if not int(reply[0]):
            return None
        return [entry.decode() for entry in reply[1:]]

    async def swept(self, process_id: str) -> None:
        await self._command("DEL", self._proc(process_id) + ":index")
        await self._command("ZREM", self._procs, process_id)


def holds_for(broker: Broker, ledger: Ledger | None) -> Holds:
    """The holds sharing `broker`'s reach, and `ledger` (the webhooks' own, when it has one:
    with the memory broker the flags and counters live in that object)."""
    ledger = ledger or ledger_for(broker)
    if isinstance(broker, MemoryBroker):
        assert isinstance(ledger, MemoryLedger)
        return MemoryHolds(ledger)
    from echoserver.brokers.redis_base import PipelinedRedisBroker

    if isinstance(broker, PipelinedRedisBroker):
        assert isinstance(ledger, RedisLedger)
        return RedisHolds(
            broker._command,
            ledger,
            prefix=broker._keys.prefix,
            process_id=broker.process_id,
            ttl=broker._presence_ttl,
        )
    raise TypeError(f"no lifecycle holds for {type(broker).__name__}")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """An index write that failed (Redis went down) is not waited for: not reported."""
    if not future.cancelled():
        future.exception()

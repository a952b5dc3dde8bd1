"""What both Redis brokers share: the command queue, subscriptions kept, health, reconnects.

This module owns PipelinedRedisBroker, the base of RedisBroker (one server) and
RedisClusterBroker. Commands queue and go out as pipelined batches, one batch in flight at a
time, so a process's publishes keep their call order and a busy process pays one round trip
per batch rather than per message; a subclass sends a batch (`_round_trip`) to one server
or through the cluster client. Publish and backlog are one script each (redis_wire.py).
The channels this process wants are recorded whether or not Redis is reachable; a
supervisor task connects (`_open_session`), re-subscribes them and re-writes presence
(`_restore`), and on any failure goes down (`healthy` False), waits with exponential
backoff and full jitter, and tries again.

A short outage (a restart, a cluster failover) loses no message and fails no sender:
while the broker is down, publishes wait in the queue, in call order, and go out once it
is back (after the re-subscriptions, so this process's members get them). A batch on its
way when it went down gets op_timeout to settle what it can (a cluster's other primaries
still answer); its publishes still unanswered then wait with the rest (Redis may have run
one whose reply was lost: it is then published twice, the price of losing none). A
waiting publish fails with BrokerUnavailable once it has waited `publish_timeout` seconds,
or at once when MAX_WAITING_BYTES already wait; the oldest fail first, so a publish that
failed is never overtaken by an older one. While publishes wait, reconnection attempts
come at most publish_timeout / 4 apart, so a Redis that is back is noticed in time.
Other commands (history reads, presence) fail at once while the broker is down, as they
always did.

Why one module of this length: the command queue, the waiting publishes and the
supervisor act on the same state (the queue, `healthy`, the session) and change it
together at every outage and recovery; apart, that state would pass between objects on
every command.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from echoserver.brokers.base import (
    SIGNAL,
    Backlog,
    Broker,
    BrokerUnavailable,
    Envelope,
    OnEnvelope,
)
from echoserver.brokers.redis_presence import RedisPresence
from echoserver.brokers.redis_wire import (
    BACKLOG_SCRIPT,
    RENEW_SCRIPT,
    KeyNames,
    decode,
    encode,
    jittered,
    publish_script,
    read_backlog,
    sha1,
)

log = logging.getLogger("echoserver.broker")

MAX_BATCH = 512
RESTORE_PASSES = 10
# Payload bytes of publishes that may wait for a broker that is down, all senders of this
# process together (each connection also waits with at most broadcast.max_queue_bytes).
MAX_WAITING_BYTES = 64 << 20

Queued = tuple[tuple[Any, ...], asyncio.Future[Any]]


@dataclass(frozen=True)
class RedisOptions:
    """How a Redis broker is tuned, on one server or a cluster alike."""

    history: int = 0  # messages kept per channel for recovery
    history_ttl: float = 0.0  # seconds a kept message lives (0 = no age limit)
    history_bytes: int = Broker.history_bytes  # payload bytes kept per channel
    prefix: str = "echoserver"  # of every key and pub/sub channel name
    presence_ttl: float = 10.0  # seconds a process's presence outlives its last refresh
    op_timeout: float = 3.0  # seconds for one command or connection attempt
    backoff_cap: float = 3.0  # seconds, the longest wait between reconnection attempts


class _Offset(asyncio.Future[int]):
    """A publish's future. The publish script answers [offset, epoch]: both go on the
    published envelope (as the memory broker sets them), the future gets the offset."""

    envelope: Envelope

    def set_result(self, result: Any) -> None:
        seq, epoch = result
        envelope = self.envelope
        envelope.seq = seq
        envelope.epoch = epoch.decode()
        super().set_result(seq)


class SubscriberLink:
    """A connection in pub/sub mode: one writer at a time; its reader (the broker's
    `_read_messages`) sets `pong` when a PING is answered."""

    def __init__(self, name: str, connection: AbstractConnection) -> None:
        self.name = name
        self.connection = connection
        self.lock = asyncio.Lock()
        self.pong = asyncio.Event()

    async def send(self, *commands: tuple[Any, ...]) -> None:
        packed = self.connection.pack_commands(commands)
        async with self.lock:
            await self.connection.send_packed_command(packed, check_health=False)

    async def ping(self, timeout: float) -> None:
        """Raise ConnectionError unless the reader sees the answer within `timeout`."""
        self.pong.clear()
        await self.send(("PING",))
        try:
            await asyncio.wait_for(self.pong.wait(), timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no reply to PING from {self.name}") from None


class PipelinedRedisBroker(Broker):
    """A broker whose commands go to Redis through one queue of pipelined batches."""

    presence: RedisPresence
    # The subscribe and unsubscribe commands (plain or sharded pub/sub); the scripts by
    # SHA1, which every connection loads before use; the publish and backlog ones' SHA1s.
    SUBSCRIBE: ClassVar[str]
    UNSUBSCRIBE: ClassVar[str]
    # The kinds of pub/sub push a subscriber connection reads: a message, a subscription
    # confirmed, one ended.
    PUSHED: ClassVar[tuple[bytes, bytes, bytes]]
    # The command the publish script ends with (PUBLISH or SPUBLISH) and the other scripts
    # a subclass runs; __init_subclass__ derives SCRIPTS and the two SHA1s from them.
    PUBLISH_COMMAND: ClassVar[bytes]
    OTHER_SCRIPTS: ClassVar[tuple[bytes, ...]]
    SCRIPTS: ClassVar[dict[bytes, bytes]]
    PUBLISH_SHA: ClassVar[bytes]
    BACKLOG_SHA: ClassVar[bytes]
    RENEW_SHA: ClassVar[bytes]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        publish = publish_script(cls.PUBLISH_COMMAND)
        cls.PUBLISH_SHA, cls.BACKLOG_SHA = sha1(publish), sha1(BACKLOG_SCRIPT)
        cls.RENEW_SHA = sha1(RENEW_SCRIPT)
        bodies = (publish, BACKLOG_SCRIPT, RENEW_SCRIPT, *cls.OTHER_SCRIPTS)
        cls.SCRIPTS = {sha1(body): body for body in bodies}

    def __init__(self, where: str, db: int, options: RedisOptions) -> None:
        self.where = where
        # Unique across hosts and restarts: this process's entries in presence.
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.history_size = options.history
        self.history_ttl = options.history_ttl
        self.history_bytes = options.history_bytes
        self._keys = KeyNames(options.prefix, db)
        self._presence_ttl = options.presence_ttl
        self._op_timeout = options.op_timeout
        self._backoff_cap = options.backoff_cap

        self._on_envelope: OnEnvelope | None = None
        self._channels: set[str] = set()  # what this process wants to receive
        self._names: dict[bytes, str] = {}  # pub/sub channel name -> channel, while wanted
        self._sub_waiters: dict[str, deque[asyncio.Future[None]]] = {}

        self._healthy = False
        self._reason = f"redis {where}: not connected yet"
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._queue: list[Queued] = []
        self._in_flight: list[Queued] = []
        self._wake = asyncio.Event()
        self._refusal_logged = -10.0
        self._in_flight_since = 0.0
        # While down, `_queue` holds only waiting publishes; this has each one's
        # (deadline on the loop's clock, payload bytes), in the same order.
        self._waiting: deque[tuple[float, int]] = deque()
        self._waiting_bytes = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()  # no batch on its way
        self._idle.set()

    # -- what a subclass provides -----------------------------------------------------

    @abc.abstractmethod
    async def _open_session(self, tasks: list[asyncio.Task[None]]) -> None:
        """Connect, start the readers, `_restore()`, start `_send_batches` and the
        heartbeat; every task started goes into `tasks` (the supervisor watches them and
        cancels them when one ends, also when this raises half way)."""

    @abc.abstractmethod
    async def _close_session(self) -> None:
        """Disconnect what `_open_session` connected (its tasks are cancelled already)."""

    @abc.abstractmethod
    async def _round_trip(self, target: Any, batch: list[Queued]) -> None:
        """Send one batch and settle each future with its reply or error."""

    @abc.abstractmethod
    async def _send_subscriptions(
        self, command: str, channels: list[str], strict: bool = False
    ) -> None:
        """Send (UN)SUBSCRIBE for the channels; SUBSCRIBE waits for the confirmations.

        Errors are left to the supervisor (it re-subscribes after reconnecting) unless
        `strict`, as while restoring, when they abort the connection attempt."""

    @abc.abstractmethod
    async def _write_presence(self, commands: list[tuple[Any, ...]]) -> None:
        """Run presence commands outside the queue (it opens only once healthy)."""

    def _farewell(self) -> list[tuple[Any, ...]]:
        """Commands that take this process out of Redis when the broker closes."""
        return self.presence.removal()

    async def _release(self) -> None:
        """Free what the broker holds for its whole life, once it is closed."""

    # -- Broker interface -------------------------------------------------------------

    async def start(self, on_envelope: OnEnvelope) -> None:
        """Connect; if Redis is unreachable, start degraded and keep reconnecting."""
        self._on_envelope = on_envelope
        if self._supervisor is None:
            self._supervisor = asyncio.ensure_future(self._supervise())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_attempt.wait(), 3 * self._op_timeout)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._healthy:
            # Leave nothing behind: others stop counting this process's members at once.
            cleanup = [self._command(*command) for command in self._farewell()]
            with contextlib.suppress(BrokerUnavailable, RedisError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*cleanup), self._op_timeout)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._go_down(f"redis {self.where}: broker closed")  # nothing is left waiting
        with contextlib.suppress(Exception):
            await self._release()
        self._on_envelope = None
        self._channels.clear()
        self._names.clear()

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed the subscription (or at once while Redis is down)."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        self._names[self._keys.pubsub(channel).encode()] = channel
        if self._healthy:
            await self._send_subscriptions(self.SUBSCRIBE, [channel])

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        # Dropping the name stops delivery now, before Redis confirms.
        self._names.pop(self._keys.pubsub(channel).encode(), None)
        if self._healthy:
            await self._send_subscriptions(self.UNSUBSCRIBE, [channel])

    def publish(self, envelope: Envelope) -> asyncio.Future[int]:
        """A future of the offset: queued synchronously, so the queue's order is the call
        order. While Redis is down it waits (see the module docstring); raises
        BrokerUnavailable at once only when the broker is closing or MAX_WAITING_BYTES wait."""
        header, data = encode(envelope)
        name, seq_key, history_key, bytes_key, epoch_key = self._keys(envelope.channel)
        size, ttl = self.kept_for(envelope.channel)
        args = (
            "EVALSHA",
            self.PUBLISH_SHA,
            4,
            seq_key,
            history_key,
            bytes_key,
            epoch_key,
            name,
            header,
            data,
            size,
            int(ttl * 1000),
            self.history_bytes,
        )
        future = _Offset(loop=asyncio.get_running_loop())
        future.envelope = envelope
        if self._healthy:
            self._queue.append((args, future))
            self._wake.set()
            return future
        return self._wait_for_redis(args, len(data), future)

    def signal(self, envelope: Envelope) -> None:
        """A plain (S)PUBLISH of the envelope with offset SIGNAL: no number, no history."""
        header, data = encode(envelope)
        message = b"%d:%s%s" % (SIGNAL, header, data)
        name = self._keys.pubsub(envelope.channel)
        self._command(self.PUBLISH_COMMAND.decode(), name, message).add_done_callback(_retrieve)

    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        """Raises BrokerUnavailable while Redis is unreachable."""
        waiters = self._sub_waiters.get(channel)
        if waiters:
            # Another joiner's SUBSCRIBE is still on its way: read history only once it is
            # active, or a message published in between would be in neither history nor live.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiters[-1]), self._op_timeout)
        _, seq_key, history_key, _, epoch_key = self._keys(channel)
        reply = await self._command(
            "EVALSHA", self.BACKLOG_SHA, 3, seq_key, history_key, epoch_key, after, max(limit, 0)
        )
        return read_backlog(channel, reply, int(self.kept_for(channel)[1] * 1000))

    async def renew_epoch(self, channel: str, epoch: str) -> str:
        """Raises BrokerUnavailable while Redis is unreachable."""
        _, _, history_key, bytes_key, epoch_key = self._keys(channel)
        reply = await self._command(
            "EVALSHA", self.RENEW_SHA, 3, epoch_key, history_key, bytes_key, epoch
        )
        return bytes(reply).decode()

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def health_reason(self) -> str:
        return "" if self._healthy else self._reason

    # -- the command queue ------------------------------------------------------------

    def _command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future has its reply. Raises BrokerUnavailable when down."""
        if not self._healthy:
            raise BrokerUnavailable(self._reason)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        self._wake.set()
        return future

    async def _send_batches(self, target: Any) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Skipping the settled ones: publishes held when the broker went down whose
            # batch was answered after all (see _supervise).
            batch = [queued for queued in self._queue[:MAX_BATCH] if not queued[1].done()]
            del self._queue[:MAX_BATCH]
            if not batch:
                continue
            self._in_flight = batch
            # No wait_for here (a task per batch costs a loop pass): the heartbeat watches
            # its age (_check_in_flight).
            self._in_flight_since = time.monotonic()
            self._idle.clear()
            try:
                await self._round_trip(target, batch)
            finally:
                self._idle.set()
            self._in_flight = []
            if not self._healthy:
                return  # went down meanwhile: what is queued waits for the next session

    def _as_eval(self, noscript: list[Queued]) -> list[Queued]:
        """Commands refused with NOSCRIPT, as EVALs that load and run their scripts: the
        script cache was flushed (SCRIPT FLUSH, a failover, a promoted replica). Sent only
        after the whole batch's replies are read, so they keep their order."""
        return [(("EVAL", self.SCRIPTS[args[1]], *args[2:]), future) for args, future in noscript]

    def _check_in_flight(self) -> None:
        if self._in_flight and time.monotonic() - self._in_flight_since > self._op_timeout:
            raise ConnectionError(f"no reply from Redis in {self._op_timeout:g}s")

    def _log_refusal(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._refusal_logged >= 10:  # at most one line per 10 s under load
            self._refusal_logged = now
            log.warning("redis %s refused a command: %s", self.where, error)

    # -- publishes waiting for Redis to come back ---------------------------------------

    def _publish_size(self, args: tuple[Any, ...]) -> int | None:
        """The payload bytes of a queued publish (EVALSHA, or EVAL after NOSCRIPT); None
        for any other command."""
        if args[0] == "EVALSHA" and args[1] == self.PUBLISH_SHA:
            return len(args[9])
        if args[0] == "EVAL" and args[1] == self.SCRIPTS[self.PUBLISH_SHA]:
            return len(args[9])
        return None

    def _wait_for_redis(
        self, args: tuple[Any, ...], size: int, future: asyncio.Future[int]
    ) -> asyncio.Future[int]:
        if self._closing:
            raise BrokerUnavailable(self._reason)
        if self._waiting and self._waiting_bytes + size > MAX_WAITING_BYTES:
            raise BrokerUnavailable(f"{MAX_WAITING_BYTES} bytes wait already; {self._reason}")
        self._hold(args, future, size, asyncio.get_running_loop().time() + self.publish_timeout)
        return future

    def _hold(
        self, args: tuple[Any, ...], future: asyncio.Future[Any], size: int, deadline: float
    ) -> None:
        self._queue.append((args, future))
        self._waiting.append((deadline, size))
        self._waiting_bytes += size
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_at(deadline, self._expire_waiting)

    def _expire_waiting(self) -> None:
        """Fail the publishes that waited publish_timeout: always the oldest ones."""
        self._expiry = None
        waiting = self._waiting
        now = asyncio.get_running_loop().time()
        expired = 0
        while waiting and waiting[0][0] <= now:
            self._waiting_bytes -= waiting.popleft()[1]
            expired += 1
        if expired:
            gone = self._queue[:expired]
            del self._queue[:expired]
            reason = f"{self._reason} for {self.publish_timeout:g}s"
            for _, future in gone:
                if not future.done():
                    future.set_exception(BrokerUnavailable(reason))
        if waiting:
            self._expiry = asyncio.get_running_loop().call_at(waiting[0][0], self._expire_waiting)

    def _stop_waiting(self) -> None:
        """Redis is back: what waits goes out with the queue."""
        self._waiting.clear()
        self._waiting_bytes = 0
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _hold_pending(self, reason: str) -> None:
        """The broker went down: publishes on their way wait for it to come back (unless
        it is closing), every other command fails."""
        if self._waiting and not self._closing:
            return  # down already: the queue holds only waiting publishes
        pending, self._queue = self._in_flight + self._queue, []
        self._in_flight = []
        self._stop_waiting()
        deadline = asyncio.get_running_loop().time() + self.publish_timeout
        for args, future in pending:
            if future.done():
                continue
            size = None if self._closing else self._publish_size(args)
            if size is None:
                future.set_exception(BrokerUnavailable(reason))
            else:
                self._hold(args, future, size, deadline)

    # -- subscriptions ----------------------------------------------------------------

    def _waiters_for(self, channels: list[str]) -> list[asyncio.Future[None]]:
        """One future per channel, settled by its subscription's confirmation."""
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[None]] = []
        for channel in channels:
            waiter: asyncio.Future[None] = loop.create_future()
            self._sub_waiters.setdefault(channel, deque()).append(waiter)
            waiters.append(waiter)
        return waiters

    async def _await_confirmations(self, waiters: list[asyncio.Future[None]]) -> None:
        """Wait up to op_timeout for the subscriptions just sent to be confirmed."""
        if waiters:
            await asyncio.wait_for(asyncio.gather(*waiters), self._op_timeout)

    def _confirmed(self, name: bytes) -> None:
        """Redis confirmed a subscription to this pub/sub name."""
        channel = self._keys.channel_of(name)
        waiters = self._sub_waiters.get(channel)
        if waiters:
            waiter = waiters.popleft()
            if not waiters:
                del self._sub_waiters[channel]
            if not waiter.done():
                waiter.set_result(None)

    def _unsubscribed(self, link: SubscriberLink, name: bytes) -> None:
        """Redis says the link no longer receives this pub/sub name."""

    async def _read_messages(self, link: SubscriberLink) -> None:
        """Deliver what arrives on a subscriber connection until it fails."""
        read = link.connection.read_response
        names = self._names
        message, subscribed, unsubscribed = self.PUSHED
        while True:
            reply = await read(disable_decoding=True)
            if type(reply) is list:
                kind = reply[0]
                if kind == message:
                    channel = names.get(reply[1])
                    if channel is not None and self._on_envelope is not None:
                        self._deliver(channel, reply[2])
                elif kind == subscribed:
                    self._confirmed(reply[1])
                elif kind == unsubscribed:
                    self._unsubscribed(link, reply[1])
                elif kind == b"pong":
                    link.pong.set()
            elif reply == b"PONG":  # a PING while subscribed to nothing
                link.pong.set()

    def _deliver(self, channel: str, message: bytes) -> None:
        try:
            envelope = decode(channel, message)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("ignoring a malformed message on %s: %r", channel, message[:64])
            return
        try:
            self._on_envelope(envelope)  # type: ignore[misc]
        except Exception:
            log.exception("delivering a message on %s failed", channel)

    # -- connecting and reconnecting --------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        down_since = time.monotonic()
        while not self._closing:
            tasks: list[asyncio.Task[None]] = []
            try:
                await self._open_session(tasks)
                self._healthy = True
                self._stop_waiting()
                self._first_attempt.set()
                if attempt:
                    log.info(
                        "redis %s: connected again after %.1fs",
                        self.where,
                        time.monotonic() - down_since,
                    )
                attempt = 0
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                error = next(iter(done)).exception()
                raise error or ConnectionError("connection closed")
            except asyncio.CancelledError:
                self._go_down(f"redis {self.where}: broker closed")
                raise
            except Exception as error:
                reason = f"redis {self.where} unreachable: {error or type(error).__name__}"
                if self._healthy or not attempt:
                    log.warning("%s; reconnecting", reason)
                    down_since = time.monotonic()
                else:
                    log.debug("%s (attempt %d)", reason, attempt + 1)
                self._go_down(reason)
            finally:
                try:
                    if not self._idle.is_set() and not self._closing:
                        # A batch is on its way: let it settle what it can (a cluster's
                        # other primaries answer), so a publish Redis ran is not sent again.
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._idle.wait(), self._op_timeout)
                finally:
                    for task in tasks:
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._close_session()
            self._first_attempt.set()
            cap = self._backoff_cap
            if self._waiting:
                # Publishes wait: notice a Redis that is back well within their timeout.
                cap = min(cap, self.publish_timeout / 4)
            await asyncio.sleep(jittered(attempt, cap))
            attempt += 1

    def _go_down(self, reason: str) -> None:
        self._healthy = False
        self._reason = reason
        self._hold_pending(reason)
        for waiters in self._sub_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)  # re-subscribed when Redis is back
        self._sub_waiters.clear()

    async def _restore(self) -> None:
        """Re-subscribe every channel and re-write this process's presence.

        Joins and leaves go on while this runs (they only record what they want while the
        broker is down), so it repeats until nothing changed during a pass; the caller
        marks the broker healthy right after, with no await in between.
        """
        subscribed: set[str] = set()
        for _ in range(RESTORE_PASSES):
            wanted = set(self._channels)
            added, dropped = sorted(wanted - subscribed), sorted(subscribed - wanted)
            presence = self.presence.resync()
            if not (added or dropped or presence):
                return
            for start in range(0, len(added), 1000):
                await self._send_subscriptions(self.SUBSCRIBE, added[start : start + 1000], True)
            if dropped:
                await self._send_subscriptions(self.UNSUBSCRIBE, dropped, True)
            subscribed = wanted
            if presence:
                await self._write_presence(presence)
        raise ConnectionError("channels kept changing while re-subscribing")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A signal is best effort: its failure is not reported (nor left unretrieved)."""
    if not future.cancelled():
        future.exception()

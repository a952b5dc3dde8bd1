"""The Redis broker: broadcasts, history and presence shared by processes and hosts.

This module owns RedisBroker. Every echoserver channel is one Redis
pub/sub channel, so Redis's publish order is the channel's order on every process. One Lua
script per message INCRs the channel's sequence number, keeps the capped history list and
PUBLISHes, so sequence order is publish order and a joiner can splice history and live
messages by seq (see hub.join).

Per process: one subscriber connection (a reader task hands every message to the hub
synchronously) and one command connection. Commands queue and go out as pipelined
batches, one batch in flight at a time, so a process's publishes keep their call order and
a busy process pays one round trip per batch rather than per message.

Presence (redis_presence.py): a hash per channel {process id: local members}, counted only
for processes whose heartbeat key is alive; this broker refreshes the heartbeat (TTL
`presence_ttl`), so a crashed worker's members disappear within that time.

Failures: while Redis is unreachable, `healthy` is False (with `health_reason`), publish()
raises BrokerUnavailable at once, backlog() raises it too (history() is empty) and
presence counts this process only. A supervisor task reconnects with exponential backoff
and full jitter, re-subscribes every channel and re-writes this process's presence.
Messages other processes publish while this one is cut off do not reach its members live
(Redis pub/sub delivers at most once); a client that comes back with ?since= gets the
kept ones.

Wire format, scripts and key names: redis_wire.py (shared with the cluster broker).

Why one module of this length: the connection supervisor, the pipelined command queue and
the subscriber reader share the connection state they recover together after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from echoserver.brokers.base import Backlog, Broker, BrokerUnavailable, Envelope, OnEnvelope
from echoserver.brokers.redis_presence import COUNT_SCRIPT, RedisPresence
from echoserver.brokers.redis_wire import (
    BACKLOG_SCRIPT,
    KeyNames,
    decode,
    decode_kept,
    encode,
    jittered,
    publish_script,
    read_backlog,
    sha1,
)

log = logging.getLogger("echoserver.broker")

_PUBLISH = publish_script(b"PUBLISH")
_SCRIPTS = {sha1(body): body for body in (_PUBLISH, BACKLOG_SCRIPT, COUNT_SCRIPT)}
_PUBLISH_SHA, _BACKLOG_SHA = list(_SCRIPTS)[:2]

_MAX_BATCH = 512
_RESTORE_PASSES = 10

# Kept under their old names for importers of this module.
_jittered = jittered
__all__ = ["RedisBroker", "decode", "decode_kept", "encode"]


class RedisBroker(Broker):
    """A broker on one Redis server (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    presence: RedisPresence

    def __init__(
        self,
        url: str,
        *,
        history: int = 0,
        history_ttl: float = 0.0,
        prefix: str = "echoserver",
        presence_ttl: float = 10.0,
        op_timeout: float = 3.0,
        backoff_cap: float = 3.0,
    ) -> None:
        kwargs: dict[str, Any] = dict(parse_url(url))
        # Our own timeouts, retries and reconnects; RESP2 so pub/sub replies are plain arrays.
        kwargs.update(
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=op_timeout,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        kwargs.setdefault("client_name", f"echoserver:{os.getpid()}")
        self._pool = ConnectionPool(**kwargs)  # only a factory of configured connections
        self._pool.make_connection()  # a bad URL option fails here, not in every reconnect
        db = int(kwargs.get("db") or 0)
        if "path" in kwargs:
            self.where = f"{kwargs['path']} db {db}"
        else:
            self.where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.history_size = history
        self.history_ttl = history_ttl
        self._prefix = prefix
        # Pub/sub ignores the database number, so it is part of the channel name.
        self._pubsub_prefix = f"{prefix}:{db}:ch:"
        # (pub/sub channel, seq key, history key) of a channel, one Redis Cluster slot.
        self._keys = KeyNames(prefix, self._pubsub_prefix)
        self._pubsub_name = self._keys.pubsub
        heartbeat_prefix = f"{prefix}:proc:"
        self._heartbeat_key = heartbeat_prefix + self.process_id
        self.presence = RedisPresence(
            self._command,
            prefix=prefix,
            process_id=self.process_id,
            heartbeat_prefix=heartbeat_prefix,
        )
        self._presence_ttl = presence_ttl
        self._op_timeout = op_timeout
        self._backoff_cap = backoff_cap

        self._on_envelope: OnEnvelope | None = None
        self._channels: set[str] = set()  # what this process wants to receive
        self._names: dict[bytes, str] = {}  # pub/sub channel name -> channel, while wanted
        self._sub_waiters: dict[str, deque[asyncio.Future[None]]] = {}

        self._healthy = False
        self._reason = f"redis {self.where}: not connected yet"
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._sub: AbstractConnection | None = None
        self._sub_lock = asyncio.Lock()
        self._pong = asyncio.Event()
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._in_flight: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._refusal_logged = -10.0
        self._in_flight_since = 0.0

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
            cleanup = [self._command("DEL", self._heartbeat_key)]
            cleanup += [self._command(*command) for command in self.presence.removal()]
            with contextlib.suppress(BrokerUnavailable, RedisError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*cleanup), self._op_timeout)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._on_envelope = None
        self._channels.clear()
        self._names.clear()

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirmed the subscription (or at once while Redis is down)."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        self._names[self._pubsub_name(channel).encode()] = channel
        if self._healthy:
            await self._send_subscriptions("SUBSCRIBE", [channel])

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        # Dropping the name stops delivery now, before Redis confirms.
        self._names.pop(self._pubsub_name(channel).encode(), None)
        if self._healthy:
            await self._send_subscriptions("UNSUBSCRIBE", [channel])

    def publish(self, envelope: Envelope) -> asyncio.Future[int]:
        """A future of the offset: queued synchronously, so the queue's order is the call order."""
        header, data = encode(envelope)
        name, seq_key, history_key = self._keys(envelope.channel)
        ttl_ms = int(self.history_ttl * 1000)
        return self._command(
            "EVALSHA",
            _PUBLISH_SHA,
            2,
            seq_key,
            history_key,
            name,
            header,
            data,
            self.history_size,
            ttl_ms,
        )

    async def backlog(self, channel: str, after: int, limit: int) -> Backlog:
        """Raises `unavailable` while Redis is unreachable."""
        waiters = self._sub_waiters.get(channel)
        if waiters:
            # Another joiner's SUBSCRIBE is still on its way: read history only once it is
            # active, or a message published in between would be in neither history nor live.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiters[-1]), self._op_timeout)
        _, seq_key, history_key = self._keys(channel)
        reply = await self._command(
            "EVALSHA", _BACKLOG_SHA, 2, seq_key, history_key, after, max(limit, 0)
        )
        return read_backlog(channel, reply, int(self.history_ttl * 1000))

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def health_reason(self) -> str:
        return "" if self._healthy else self._reason

    # -- commands: a queue sent as pipelined batches over the command connection ------

    def _command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future has its reply. Raises BrokerUnavailable when down."""
        if not self._healthy:
            raise self.unavailable(self._reason)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        self._wake.set()
        return future

    async def _send_batches(self, connection: AbstractConnection) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._in_flight = self._queue[:_MAX_BATCH]
            del self._queue[:_MAX_BATCH]
            # No wait_for here (a task per batch costs a loop pass): _heartbeat watches age.
            self._in_flight_since = time.monotonic()
            await self._round_trip(connection, batch)
            self._in_flight = []

    async def _round_trip(
        self, connection: AbstractConnection, batch: list[tuple[tuple[Any, ...], Any]]
    ) -> None:
        retry = await self._exchange(connection, batch)
        if retry:
            # The script cache was flushed (SCRIPT FLUSH, a failover): EVAL loads and runs
            # the scripts. Only after the whole batch's replies are read, in the same order.
            again = [(("EVAL", _SCRIPTS[args[1]], *args[2:]), future) for args, future in retry]
            await self._exchange(connection, again)

    async def _exchange(
        self, connection: AbstractConnection, batch: list[tuple[tuple[Any, ...], Any]]
    ) -> list[tuple[tuple[Any, ...], Any]]:
        """Send a batch, settle each future with its reply; return the NOSCRIPT ones."""
        await connection.send_packed_command(
            connection.pack_commands([args for args, _ in batch]), check_health=False
        )
        noscript = []
        for args, future in batch:
            try:
                reply = await connection.read_response(disable_decoding=True)
            except NoScriptError:
                noscript.append((args, future))
                continue
            except ResponseError as error:
                # Reachable but refusing (OOM, READONLY replica, ...): the sender is told.
                self._log_refusal(error)
                if not future.done():
                    future.set_exception(self.unavailable(f"redis {self.where}: {error}"))
                continue
            if not future.done():
                future.set_result(reply)
        return noscript

    def _log_refusal(self, error: ResponseError) -> None:
        now = time.monotonic()
        if now - self._refusal_logged >= 10:  # at most one line per 10 s under load
            self._refusal_logged = now
            log.warning("redis %s refused a command: %s", self.where, error)

    async def _call(self, connection: AbstractConnection, *args: Any) -> Any:
        """One command outside the queue, while (re)connecting."""
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)
        return await connection.read_response(disable_decoding=True)

    def _fail_pending(self, reason: str) -> None:
        pending, self._queue = self._in_flight + self._queue, []
        self._in_flight = []
        for _, future in pending:
            if not future.done():
                future.set_exception(self.unavailable(reason))
        for waiters in self._sub_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)  # re-subscribed when Redis is back
        self._sub_waiters.clear()

    # -- the subscriber connection ----------------------------------------------------

    async def _send_subscriptions(
        self, command: str, channels: list[str], strict: bool = False
    ) -> None:
        """Send (UN)SUBSCRIBE; SUBSCRIBE waits for Redis's confirmations.

        Errors are left to the supervisor (it re-subscribes after reconnecting) unless
        `strict`, as while restoring, when they abort the connection attempt.
        """
        sub = self._sub
        if sub is None:
            if strict:
                raise ConnectionError("no subscriber connection")
            return
        waiters: list[asyncio.Future[None]] = []
        if command == "SUBSCRIBE":
            loop = asyncio.get_running_loop()
            for channel in channels:
                waiter: asyncio.Future[None] = loop.create_future()
                self._sub_waiters.setdefault(channel, deque()).append(waiter)
                waiters.append(waiter)
        names = [self._pubsub_name(channel) for channel in channels]
        try:
            async with self._sub_lock:
                await sub.send_packed_command(sub.pack_command(command, *names), check_health=False)
            if waiters:
                await asyncio.wait_for(asyncio.gather(*waiters), self._op_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            if strict:
                raise
            log.debug("%s %s: %s", command, channels, error)

    async def _read_messages(self, sub: AbstractConnection) -> None:
        read = sub.read_response
        names = self._names
        while True:
            reply = await read(disable_decoding=True)
            if type(reply) is list:
                kind = reply[0]
                if kind == b"message":
                    channel = names.get(reply[1])
                    if channel is not None and self._on_envelope is not None:
                        self._deliver(channel, reply[2])
                elif kind == b"subscribe":
                    channel = reply[1].decode()[len(self._pubsub_prefix) + 1 : -1]
                    waiters = self._sub_waiters.get(channel)
                    if waiters:
                        waiter = waiters.popleft()
                        if not waiters:
                            del self._sub_waiters[channel]
                        if not waiter.done():
                            waiter.set_result(None)
                elif kind == b"pong":
                    self._pong.set()
            elif reply == b"PONG":  # a PING while subscribed to nothing
                self._pong.set()

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

    # -- liveness ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Refresh this process's heartbeat key and check both connections answer."""
        interval = min(self._presence_ttl / 4, self._op_timeout / 2)
        ttl_ms = int(self._presence_ttl * 1000)
        while True:
            await asyncio.sleep(interval)
            if self._in_flight and time.monotonic() - self._in_flight_since > self._op_timeout:
                raise ConnectionError(f"no reply from Redis in {self._op_timeout:g}s")
            await asyncio.wait_for(
                self._command("SET", self._heartbeat_key, b"1", "PX", ttl_ms), self._op_timeout
            )
            sub = self._sub
            if sub is None:
                return
            self._pong.clear()
            async with self._sub_lock:
                await sub.send_packed_command(sub.pack_command("PING"), check_health=False)
            try:
                await asyncio.wait_for(self._pong.wait(), self._op_timeout)
            except asyncio.TimeoutError:
                raise ConnectionError("no reply to PING on the subscriber connection") from None

    # -- connecting and reconnecting --------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        down_since = time.monotonic()
        while not self._closing:
            connections: list[AbstractConnection] = []
            tasks: list[asyncio.Task[None]] = []
            try:
                sub = self._pool.make_connection()
                cmd = self._pool.make_connection()
                connections = [sub, cmd]
                await self._connect(sub, cmd)
                tasks.append(asyncio.ensure_future(self._read_messages(sub)))
                # Everything this process had in Redis may be gone (a restarted server).
                self.presence.lost()
                await self._restore(cmd)
                tasks.append(asyncio.ensure_future(self._send_batches(cmd)))
                tasks.append(asyncio.ensure_future(self._heartbeat()))
                self._healthy = True
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
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._sub = None
                for connection in connections:
                    with contextlib.suppress(Exception):
                        await connection.disconnect(nowait=True)
            self._first_attempt.set()
            await asyncio.sleep(jittered(attempt, self._backoff_cap))
            attempt += 1

    def _go_down(self, reason: str) -> None:
        self._healthy = False
        self._reason = reason
        self._fail_pending(reason)

    async def _connect(self, sub: AbstractConnection, cmd: AbstractConnection) -> None:
        timeout = self._op_timeout
        await asyncio.wait_for(sub.connect(), timeout)
        await asyncio.wait_for(cmd.connect(), timeout)
        for body in _SCRIPTS.values():
            await asyncio.wait_for(self._call(cmd, "SCRIPT", "LOAD", body), timeout)
        ttl_ms = int(self._presence_ttl * 1000)
        await asyncio.wait_for(
            self._call(cmd, "SET", self._heartbeat_key, b"1", "PX", ttl_ms), timeout
        )
        self._sub = sub

    async def _restore(self, cmd: AbstractConnection) -> None:
        """Re-subscribe every channel and re-write this process's presence.

        Joins and leaves go on while this runs (they only record what they want while the
        broker is down), so it repeats until nothing changed during a pass; the caller
        marks the broker healthy right after, with no await in between.
        """
        subscribed: set[str] = set()
        for _ in range(_RESTORE_PASSES):
            wanted = set(self._channels)
            added, dropped = sorted(wanted - subscribed), sorted(subscribed - wanted)
            presence = self.presence.resync()
            if not (added or dropped or presence):
                return
            for start in range(0, len(added), 1000):
                await self._send_subscriptions("SUBSCRIBE", added[start : start + 1000], True)
            if dropped:
                await self._send_subscriptions("UNSUBSCRIBE", dropped, True)
            subscribed = wanted
            for command in presence:
                await asyncio.wait_for(self._call(cmd, *command), self._op_timeout)
        raise ConnectionError("channels kept changing while re-subscribing")

"""The Redis broker: broadcasts, history and presence shared by processes and hosts.

This module owns RedisBroker. Every echoserver channel is one Redis
pub/sub channel, so Redis's publish order is the channel's order on every process. One Lua
script per message INCRs the channel's sequence number, keeps the capped history list and
PUBLISHes, so sequence order is publish order and a joiner can splice history and live
messages by seq (see hub.join).

Per process: one subscriber connection (a reader task hands every message to the hub
synchronously) and one command connection, which the queue of pipelined batches shared
with the cluster broker (redis_base.py) writes to.

Presence (redis_presence.py): a hash per channel {process id: local members}, counted only
for processes whose heartbeat key is alive; this broker refreshes the heartbeat (TTL
`presence_ttl`), so a crashed worker's members disappear within that time.

Failures: while Redis is unreachable, `healthy` is False (with `health_reason`), a
publish waits for it up to `publish_timeout` (redis_base.py), backlog() raises
BrokerUnavailable (history() is empty) and
presence counts this process only. A supervisor task reconnects with exponential backoff
and full jitter, re-subscribes every channel and re-writes this process's presence.
Messages other processes publish while this one is cut off do not reach its members live
(Redis pub/sub delivers at most once); a client that comes back with ?since= gets the
kept ones.

Wire format, scripts and key names: redis_wire.py (shared with the cluster broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from echoserver.brokers import redis_users
from echoserver.brokers.base import BrokerUnavailable
from echoserver.brokers.redis_base import (
    PipelinedRedisBroker,
    Queued,
    RedisOptions,
    SubscriberLink,
    log,
)
from echoserver.brokers.redis_presence import COUNT_SCRIPT, RedisPresence

__all__ = ["RedisBroker"]


class RedisBroker(PipelinedRedisBroker):
    """A broker on one Redis server (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    SUBSCRIBE = "SUBSCRIBE"
    UNSUBSCRIBE = "UNSUBSCRIBE"
    PUSHED = (b"message", b"subscribe", b"unsubscribe")
    PUBLISH_COMMAND = b"PUBLISH"
    OTHER_SCRIPTS = (COUNT_SCRIPT, redis_users.SET_BY_HEARTBEAT, redis_users.ROLL_BY_HEARTBEAT)

    def __init__(self, url: str, options: RedisOptions | None = None) -> None:
        options = options or RedisOptions()
        kwargs: dict[str, Any] = dict(parse_url(url))
        # Our own timeouts, retries and reconnects; RESP2 so pub/sub replies are plain arrays.
        kwargs.update(
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=options.op_timeout,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        kwargs.setdefault("client_name", f"echoserver:{os.getpid()}")
        self._pool = ConnectionPool(**kwargs)  # only a factory of configured connections
        self._pool.make_connection()  # a bad URL option fails here, not in every reconnect
        db = int(kwargs.get("db") or 0)
        if "path" in kwargs:
            where = f"{kwargs['path']} db {db}"
        else:
            where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
        super().__init__(where, db, options)
        heartbeat_prefix = f"{options.prefix}:proc:"
        self._heartbeat_key = heartbeat_prefix + self.process_id
        self.presence = RedisPresence(
            self._command,
            prefix=options.prefix,
            process_id=self.process_id,
            heartbeat_prefix=heartbeat_prefix,
        )
        self._sub: SubscriberLink | None = None
        self._cmd: AbstractConnection | None = None
        self._session: list[AbstractConnection] = []  # what _close_session disconnects

    def _farewell(self) -> list[tuple[Any, ...]]:
        return [("DEL", self._heartbeat_key), *self.presence.removal()]

    # -- commands: batches over the command connection --------------------------------

    async def _round_trip(self, target: Any, batch: list[Queued]) -> None:
        connection: AbstractConnection = target
        noscript = await self._exchange(connection, batch)
        if noscript:
            await self._exchange(connection, self._as_eval(noscript))

    async def _exchange(self, connection: AbstractConnection, batch: list[Queued]) -> list[Queued]:
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
                    future.set_exception(BrokerUnavailable(f"redis {self.where}: {error}"))
                continue
            if not future.done():
                future.set_result(reply)
        return noscript

    async def _call(self, connection: AbstractConnection, *args: Any) -> Any:
        """One command outside the queue, while (re)connecting."""
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)
        return await connection.read_response(disable_decoding=True)

    async def _write_presence(self, commands: list[tuple[Any, ...]]) -> None:
        assert self._cmd is not None
        for command in commands:
            await asyncio.wait_for(self._call(self._cmd, *command), self._op_timeout)

    # -- the subscriber connection ----------------------------------------------------

    async def _send_subscriptions(
        self, command: str, channels: list[str], strict: bool = False
    ) -> None:
        sub = self._sub
        if sub is None:
            if strict:
                raise ConnectionError("no subscriber connection")
            return
        waiters = self._waiters_for(channels) if command == self.SUBSCRIBE else []
        names = [self._keys.pubsub(channel) for channel in channels]
        try:
            await sub.send((command, *names))
            await self._await_confirmations(waiters)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            if strict:
                raise
            log.debug("%s %s: %s", command, channels, error)

    # -- liveness ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Refresh this process's heartbeat key and check both connections answer."""
        interval = min(self._presence_ttl / 4, self._op_timeout / 2)
        ttl_ms = int(self._presence_ttl * 1000)
        while True:
            await asyncio.sleep(interval)
            self._check_in_flight()
            await asyncio.wait_for(
                self._command("SET", self._heartbeat_key, b"1", "PX", ttl_ms), self._op_timeout
            )
            sub = self._sub
            if sub is None:
                return
            await sub.ping(self._op_timeout)

    # -- connecting -------------------------------------------------------------------

    async def _open_session(self, tasks: list[asyncio.Task[None]]) -> None:
        sub = self._pool.make_connection()
        cmd = self._cmd = self._pool.make_connection()
        self._session = [sub, cmd]
        timeout = self._op_timeout
        await asyncio.wait_for(sub.connect(), timeout)
        await asyncio.wait_for(cmd.connect(), timeout)
        for body in self.SCRIPTS.values():
            await asyncio.wait_for(self._call(cmd, "SCRIPT", "LOAD", body), timeout)
        ttl_ms = int(self._presence_ttl * 1000)
        await asyncio.wait_for(
            self._call(cmd, "SET", self._heartbeat_key, b"1", "PX", ttl_ms), timeout
        )
        self._sub = SubscriberLink(self.where, sub)
        tasks.append(asyncio.ensure_future(self._read_messages(self._sub)))
        # Everything this process had in Redis may be gone (a restarted server).
        self.presence.lost()
        await self._restore()
        tasks.append(asyncio.ensure_future(self._send_batches(cmd)))
        tasks.append(asyncio.ensure_future(self._heartbeat()))

    async def _close_session(self) -> None:
        self._sub = self._cmd = None
        session, self._session = self._session, []
        for connection in session:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)

"""The Redis Cluster broker: broadcasts, history and presence spread over a Redis Cluster.

This module owns RedisClusterBroker and its URL (``redis-cluster://host:port[,host:port]``,
``rediss-cluster://`` for TLS; any one node is enough to discover the cluster). Every
echoserver channel is one sharded pub/sub channel (SSUBSCRIBE/SPUBLISH, Redis 7) whose name,
sequence counter and history share one slot (hash tags, redis_wire.py), so the publish
script INCRs, keeps and SPUBLISHes in one step on the channel's primary: sequence order is
publish order, as on one Redis. Channels spread over the primaries by slot.

Commands go through redis.asyncio's cluster client: one queue, sent as pipelined batches
(the client splits a batch per primary and keeps each primary's commands in queue order),
one batch in flight at a time, so a process's publishes keep their call order per channel.
Receiving: one subscriber connection per primary, SSUBSCRIBEd to the channels of its slots;
a reader task per connection hands every message to the hub synchronously.

Presence (redis_cluster_presence.py): per-channel hashes whose entries carry a deadline,
counted on the channel's own slot.

Failures (a primary dies, its replica takes over; a resharding moves a slot): the first
sign (the primary's connection closes, a command fails with a connection error, MOVED or
CLUSTERDOWN, a PING goes unanswered) takes the whole broker down: `healthy` is False with
the reason, publishes in flight and new ones wait for it to come back (up to
`publish_timeout`, redis_base.py), backlog() raises BrokerUnavailable, presence counts this
process only; members stay connected.
A supervisor task re-discovers the topology with exponential backoff and full jitter, and
once every primary answers with cluster_state:ok it re-SSUBSCRIBEs every channel on its
new primary and re-writes this process's presence: delivery resumes by itself. Offsets go
on from the promoted replica's counter (replication is asynchronous: publishes acknowledged
just before the primary died may be lost, and their offsets reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
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
from echoserver.brokers.redis_cluster_presence import (
    COUNT_SCRIPT,
    SET_SCRIPT,
    ClusterPresence,
)
from echoserver.brokers.urls import split_cluster_url

# Replies that mean the cluster's shape changed or is changing: re-discover it.
_TOPOLOGY_ERRORS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(seed nodes, connection options) of a ``redis-cluster://`` or ``rediss-cluster://`` URL:
    options and credentials as in a ``redis://`` URL (urls.split_cluster_url has the form)."""
    credentials, seeds, query = split_cluster_url(url)
    base = "rediss" if url.startswith("rediss-") else "redis"
    options = dict(parse_url(f"{base}://{credentials}seed:1/0" + (f"?{query}" if query else "")))
    for name in ("host", "port", "db", "path"):
        options.pop(name, None)
    return seeds, options


class _Shard(SubscriberLink):
    """One primary's subscriber connection."""

    def __init__(self, name: str, connection: AbstractConnection) -> None:
        super().__init__(name, connection)
        # Our own SUNSUBSCRIBEs not yet confirmed, per name: any other confirmation is
        # Redis dropping a subscription because the slot moved.
        self.unsubscribing: dict[bytes, int] = {}


class RedisClusterBroker(PipelinedRedisBroker):
    """A broker on a Redis Cluster (``redis-cluster://`` or ``rediss-cluster://`` URL)."""

    presence: ClusterPresence
    SUBSCRIBE = "SSUBSCRIBE"
    UNSUBSCRIBE = "SUNSUBSCRIBE"
    PUSHED = (b"smessage", b"ssubscribe", b"sunsubscribe")
    PUBLISH_COMMAND = b"SPUBLISH"
    OTHER_SCRIPTS = (
        COUNT_SCRIPT,
        SET_SCRIPT,
        redis_users.SET_BY_DEADLINE,
        redis_users.ROLL_BY_DEADLINE,
    )

    def __init__(self, url: str, options: RedisOptions | None = None) -> None:
        options = options or RedisOptions()
        seeds, connection_options = parse_cluster_url(url)
        # A cluster has database 0 only; the channel names have the same form as on one Redis.
        super().__init__("cluster " + ",".join(f"{h}:{p}" for h, p in seeds), 0, options)
        self._tls = connection_options.pop("connection_class", Connection) is SSLConnection
        connection_options.setdefault("client_name", f"echoserver:{os.getpid()}")
        self._connection_options = connection_options
        self._known: list[tuple[str, int]] = list(seeds)  # seeds, then every node seen
        self.presence = ClusterPresence(
            self._command,
            prefix=options.prefix,
            process_id=self.process_id,
            ttl=options.presence_ttl,
        )
        # One client for the broker's life: its first discovery also reads the server's
        # command table (tens of ms), later ones only the topology.
        self._client = self._new_client(connection_options)  # a bad URL option fails here
        self._discovered = False
        self._shards: dict[str, _Shard] = {}
        self._reshaped = asyncio.Event()

    async def _release(self) -> None:
        await self._client.aclose()

    # -- commands: batches through the cluster client ---------------------------------

    async def _round_trip(self, target: Any, batch: list[Queued]) -> None:
        """Send a batch and settle its futures. A topology error ends the connection."""
        client: RedisCluster = target
        results = await self._pipeline(client, [args for args, _ in batch])
        noscript, reshaped = self._settle(batch, results)
        if noscript:
            again = self._as_eval(noscript)
            _, failed = self._settle(again, await self._pipeline(client, [a for a, _ in again]))
            reshaped = reshaped or failed
        if reshaped is not None:
            raise reshaped

    def _settle(
        self, batch: list[Queued], results: list[Any]
    ) -> tuple[list[Queued], Exception | None]:
        """Give each future its reply or error. Returns the commands refused with NOSCRIPT
        (left pending) and the error that ends the connection, if one did."""
        noscript = []
        reshaped: Exception | None = None
        for (args, future), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):
                noscript.append((args, future))
            elif isinstance(result, Exception):
                reshaped = self._refused(args, future, result) or reshaped
            elif not future.done():
                future.set_result(result)
        return noscript, reshaped

    async def _pipeline(self, client: RedisCluster, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One reply or error per command. The client keeps each primary's commands in
        order; it does not follow redirections (a resend would come after later commands)."""
        pipe = client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return await pipe.execute(raise_on_error=False, allow_redirections=False)

    def _refused(
        self, args: tuple[Any, ...], future: asyncio.Future[Any], error: Exception
    ) -> Exception | None:
        """Tell the sender; return the error that ends the connection, if it is one. A
        publish that met a connection or topology error is left pending: it waits for
        the broker to come back (redis_base.py), like the rest of its batch."""
        message = str(error)
        if isinstance(error, ResponseError) and not message.startswith(_TOPOLOGY_ERRORS):
            # Reachable but refusing (OOM, ...): only that command failed.
            if not future.done():
                future.set_exception(BrokerUnavailable(f"redis {self.where}: {error}"))
            self._log_refusal(error)
            return None
        if self._publish_size(args) is None and not future.done():
            future.set_exception(BrokerUnavailable(f"redis {self.where}: {error}"))
        return ConnectionError(f"{type(error).__name__}: {message}")

    async def _call(self, connection: AbstractConnection, *args: Any) -> Any:
        """One command on a subscriber connection, while (re)connecting."""
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)
        return await asyncio.wait_for(
            connection.read_response(disable_decoding=True), self._op_timeout
        )

    async def _write_presence(self, commands: list[tuple[Any, ...]]) -> None:
        # A pipeline of its own, routed by the channels' slots.
        results = await asyncio.wait_for(self._pipeline(self._client, commands), self._op_timeout)
        for result in results:
            if isinstance(result, Exception):
                raise ConnectionError(f"re-writing presence: {result}")

    # -- the subscriber connections, one per primary ----------------------------------

    def _shard_of(self, channel: str) -> _Shard | None:
        """The subscriber connection to the channel's primary; None once the map is stale."""
        slot = key_slot(self._keys.pubsub(channel).encode())
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except Exception:  # an uncovered slot
            return None
        return self._shards.get(node.name)

    async def _send_subscriptions(
        self, command: str, channels: list[str], strict: bool = False
    ) -> None:
        """Per channel, to its primary."""
        by_shard: dict[_Shard, list[str]] = {}
        for channel in channels:
            shard = self._shard_of(channel)
            if shard is None:
                if strict:
                    raise ConnectionError(f"no primary known for channel {channel!r}")
                self._reshaped.set()  # re-subscribed once the topology is re-discovered
                return
            by_shard.setdefault(shard, []).append(channel)
        waiters = self._waiters_for(channels) if command == self.SUBSCRIBE else []
        try:
            for shard, mine in by_shard.items():
                names = [self._keys.pubsub(channel) for channel in mine]
                if command == self.UNSUBSCRIBE:
                    for name in names:
                        key = name.encode()
                        shard.unsubscribing[key] = shard.unsubscribing.get(key, 0) + 1
                # One command per channel: the channels of one command must share a slot.
                await shard.send(*[(command, name) for name in names])
            await self._await_confirmations(waiters)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            if strict:
                raise
            log.debug("%s %s: %s", command, channels, error)

    def _unsubscribed(self, link: SubscriberLink, name: bytes) -> None:
        assert isinstance(link, _Shard)
        pending = link.unsubscribing.get(name, 0)
        if pending > 1:
            link.unsubscribing[name] = pending - 1
        elif pending:
            del link.unsubscribing[name]
        elif name in self._names:
            raise ConnectionError(f"{link.name} gave up {name!r}: its slot moved")

    # -- liveness ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Push this process's presence deadlines on and check every primary answers."""
        interval = min(self._presence_ttl / 4, self._op_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            self._check_in_flight()
            refresh = [self._command(*command) for command in self.presence.refresh()]
            if refresh:
                await asyncio.wait_for(asyncio.gather(*refresh), self._op_timeout)
            timeout = self._op_timeout
            await asyncio.gather(*(shard.ping(timeout) for shard in self._shards.values()))

    async def _watch_shape(self) -> None:
        """Ends the connection once a channel's primary is not among the connected ones."""
        await self._reshaped.wait()
        raise ConnectionError("the cluster's slots moved")

    # -- connecting -------------------------------------------------------------------

    def _new_client(self, options: dict[str, Any]) -> RedisCluster:
        kwargs = {
            key: value
            for key, value in options.items()
            if key in ("username", "password", "client_name") or key.startswith("ssl_")
        }
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._known],
            ssl=self._tls,
            # Our own timeouts, retries and re-discovery; RESP2 so replies are plain arrays.
            protocol=2,
            socket_timeout=self._op_timeout,
            socket_connect_timeout=self._op_timeout,
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )

    def _new_connection(self, node: ClusterNode) -> AbstractConnection:
        kind = SSLConnection if self._tls else Connection
        return kind(
            host=node.host,
            port=node.port,
            **{
                **self._connection_options,
                "protocol": 2,
                "socket_timeout": None,
                "socket_connect_timeout": self._op_timeout,
                "health_check_interval": 0,
                "retry": Retry(NoBackoff(), 0),
            },
        )

    async def _open_session(self, tasks: list[asyncio.Task[None]]) -> None:
        shards = await self._connect(self._client)
        self._shards = {shard.name: shard for shard in shards}
        self._reshaped.clear()
        tasks += [asyncio.ensure_future(self._read_messages(shard)) for shard in shards]
        # Everything this process had in the cluster may be gone (a failover).
        self.presence.lost()
        await self._restore()
        tasks.append(asyncio.ensure_future(self._send_batches(self._client)))
        tasks.append(asyncio.ensure_future(self._heartbeat()))
        tasks.append(asyncio.ensure_future(self._watch_shape()))

    async def _close_session(self) -> None:
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            with contextlib.suppress(Exception):
                await shard.connection.disconnect(nowait=True)

    async def _connect(self, client: RedisCluster) -> list[_Shard]:
        """Discover the topology; connect to every primary once it says the cluster is ok."""
        discovering = client.nodes_manager if self._discovered else client
        await asyncio.wait_for(discovering.initialize(), 3 * self._op_timeout)
        self._discovered = True
        nodes = client.get_nodes()
        for node in nodes:  # any of them can tell the topology next time
            address = (node.host, int(node.port))
            if address not in self._known:
                self._known.append(address)
        shards: list[_Shard] = []
        try:
            for node in nodes:
                if node.server_type != "primary":
                    continue
                connection = self._new_connection(node)
                shards.append(_Shard(node.name, connection))
                await asyncio.wait_for(connection.connect(), self._op_timeout)
                info = await self._call(connection, "CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:
                    raise ConnectionError(f"{node.name} says the cluster is not ok")
                for body in self.SCRIPTS.values():
                    await self._call(connection, "SCRIPT", "LOAD", body)
        except BaseException:
            for shard in shards:
                with contextlib.suppress(Exception):
                    await shard.connection.disconnect(nowait=True)
            raise
        if not shards:
            raise ConnectionError("no primary node")
        return shards

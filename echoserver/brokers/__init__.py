"""Brokers: the memory (embedded), Redis and Redis Cluster engines behind one interface."""

from __future__ import annotations

from echoserver.brokers.base import Backlog, Broker, BrokerUnavailable, Envelope, Presence
from echoserver.brokers.memory import MemoryBroker

__all__ = [
    "Backlog",
    "Broker",
    "BrokerUnavailable",
    "Envelope",
    "MemoryBroker",
    "Presence",
    "create_broker",
]


def create_broker(
    url: str, *, history: int = 0, history_ttl: float = 0.0, history_bytes: int = 1 << 20
) -> Broker:
    """The broker named by the `broadcast.broker` setting, keeping `history` per channel
    (at most `history_bytes` of payload) for at most `history_ttl` seconds (0 = no age
    limit). The hub may set these (and the other bounds) on the broker it is given."""
    if url == "memory":
        return MemoryBroker(history=history, history_ttl=history_ttl, history_bytes=history_bytes)
    from echoserver.brokers.redis_base import RedisOptions

    options = RedisOptions(history=history, history_ttl=history_ttl, history_bytes=history_bytes)
    if url.startswith(("redis-cluster://", "rediss-cluster://")):
        from echoserver.brokers.redis_cluster import RedisClusterBroker

        return RedisClusterBroker(url, options)
    from echoserver.brokers.redis import RedisBroker

    return RedisBroker(url, options)

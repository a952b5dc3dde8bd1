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


def create_broker(url: str) -> Broker:
    """The broker named by the `broadcast.broker` setting. Its history and other bounds are
    the hub's to set (Hub sets them on the broker it is given)."""
    if url == "memory":
        return MemoryBroker()
    from echoserver.brokers.redis_base import RedisOptions

    options = RedisOptions()
    if url.startswith(("redis-cluster://", "rediss-cluster://")):
        from echoserver.brokers.redis_cluster import RedisClusterBroker

        return RedisClusterBroker(url, options)
    from echoserver.brokers.redis import RedisBroker

    return RedisBroker(url, options)

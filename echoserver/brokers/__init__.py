"""Brokers: the memory (embedded) and Redis engines behind one interface."""

from __future__ import annotations

from echoserver.brokers.base import Broker, BrokerUnavailable, Envelope, Presence
from echoserver.brokers.memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "Envelope",
    "MemoryBroker",
    "Presence",
    "create_broker",
]


def create_broker(url: str, *, history: int = 0) -> Broker:
    """The broker named by the `broadcast.broker` setting, keeping `history` per channel."""
    if url == "memory":
        return MemoryBroker(history=history)
    from echoserver.brokers.redis import RedisBroker

    return RedisBroker(url, history=history)

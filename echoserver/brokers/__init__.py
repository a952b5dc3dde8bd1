"""Brokers: the memory (embedded) and Redis engines behind one interface."""

from __future__ import annotations

from echoserver.brokers.base import Broker, BrokerUnavailable, Envelope
from echoserver.brokers.memory import MemoryBroker

__all__ = ["Broker", "BrokerUnavailable", "Envelope", "MemoryBroker", "create_broker"]


def create_broker(url: str) -> Broker:
    """The broker named by the `broadcast.broker` setting."""
    if url == "memory":
        return MemoryBroker()
    from echoserver.brokers.redis import RedisBroker

    return RedisBroker(url)

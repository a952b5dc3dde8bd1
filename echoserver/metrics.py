"""Prometheus collectors for one Application, in a registry of its own.

Each Application gets its own CollectorRegistry (no process-global state), so tests can
build many apps side by side and /metrics shows only what this server did.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "echoserver_connections",
            "Open WebSocket connections.",
            ["mode", "channel"],
            registry=r,
        )
        self.messages_in = Counter(
            "echoserver_messages_received", "Messages received from clients.", registry=r
        )
        self.bytes_in = Counter(
            "echoserver_received_bytes", "Payload bytes received from clients.", registry=r
        )
        self.messages_out = Counter(
            "echoserver_messages_sent", "Messages queued to clients.", registry=r
        )
        self.bytes_out = Counter(
            "echoserver_sent_bytes", "Payload bytes queued to clients.", registry=r
        )
        self.deliveries = Counter(
            "echoserver_broadcast_deliveries",
            "Broadcast messages queued to a receiver.",
            ["channel"],
            registry=r,
        )
        self.drops = Counter(
            "echoserver_broadcast_drops",
            "Broadcast messages dropped for a slow receiver.",
            ["channel"],
            registry=r,
        )
        self.slow_disconnects = Counter(
            "echoserver_slow_client_disconnects",
            "Receivers closed with 1013 for falling behind.",
            ["channel"],
            registry=r,
        )
        self.handshakes_refused = Counter(
            "echoserver_handshakes_refused",
            "WebSocket handshakes refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.closes = Counter(
            "echoserver_closes",
            "Closed WebSocket connections, by close code.",
            ["code"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

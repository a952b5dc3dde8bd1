"""Prometheus metrics for one Application, in a registry of its own.

The message path only bumps plain integers (a prometheus_client Counter takes a lock on
every inc(), too dear per message); a custom collector turns them into Prometheus metric
families when /metrics is scraped. Each Application has its own CollectorRegistry, so
tests can build many apps side by side and /metrics shows only what this server did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

OpenConnections = Callable[[], Mapping[tuple[str, str], int]]


class ChannelCounts(Protocol):
    deliveries: int
    delivered_bytes: int
    drops: int
    slow_disconnects: int


ChannelStats = Callable[[], Mapping[str, ChannelCounts]]


class WebhookCounts:
    """What the webhook sender did (echoserver/webhooks), bumped by it, read on scrape."""

    def __init__(self) -> None:
        self.sent = 0  # events in a request the backend answered 2xx
        self.dropped: Counter[str] = Counter()  # events dropped, by reason
        self.requests: Counter[str] = Counter()  # attempts, by HTTP status or error
        self.reports: Counter[str] = Counter()  # lifecycle holds' writes: owned / unchanged
        self.queued: Callable[[], int] = lambda: 0  # events waiting now


class Metrics(Collector):
    """Counters bumped by the handlers, rendered on scrape."""

    def __init__(self, open_connections: OpenConnections, channel_stats: ChannelStats) -> None:
        self._open_connections = open_connections
        self._channel_stats = channel_stats
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.handshakes_refused: Counter[str] = Counter()
        self.tokens_refused: Counter[str] = Counter()  # connection tokens, by what failed
        self.closes: Counter[int] = Counter()
        self.api_requests: Counter[int] = Counter()  # publish API requests, by status
        self.connections_refused: Counter[str] = Counter()  # at accept, by reason
        self.accept_errors: Counter[str] = Counter()  # failed accept() calls, by errno name
        self.request_timeouts = 0  # connections closed past limits.request_timeout
        # Connections holding a slot (occupancy.py); the Application sets it.
        self.held_connections: Callable[[], int] = lambda: 0
        self.webhooks = WebhookCounts()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "echoserver_connections", "Open WebSocket connections.", labels=["mode", "channel"]
        )
        for (mode, channel), count in sorted(self._open_connections().items()):
            connections.add_metric([mode, channel], count)
        yield connections
        yield GaugeMetricFamily(
            "echoserver_connections_held",
            "Connections this process holds, counted against websocket.max_connections: "
            "WebSocket, SSE and connections still in HTTP.",
            value=self.held_connections(),
        )
        yield GaugeMetricFamily(
            "echoserver_webhook_events_queued",
            "Lifecycle events waiting for the webhook backend (at most webhooks.queue_size).",
            value=self.webhooks.queued(),
        )
        yield CounterMetricFamily(
            "echoserver_webhook_events_sent",
            "Lifecycle events the webhook backend accepted (answered 2xx).",
            value=self.webhooks.sent,
        )
        channels = sorted(self._channel_stats().items())
        deliveries = sum(stats.deliveries for _, stats in channels)
        delivered_bytes = sum(stats.delivered_bytes for _, stats in channels)
        for name, doc, value in (
            ("echoserver_messages_received", "Messages received from clients.", self.messages_in),
            ("echoserver_received_bytes", "Payload bytes received from clients.", self.bytes_in),
            (
                "echoserver_request_timeouts",
                "Connections closed because a request (headers and body) did not arrive "
                "within limits.request_timeout.",
                self.request_timeouts,
            ),
            (
                "echoserver_messages_sent",
                "Messages queued to clients (replies and broadcast deliveries).",
                self.messages_out + deliveries,
            ),
            (
                "echoserver_sent_bytes",
                "Payload bytes queued to clients (replies and broadcast deliveries).",
                self.bytes_out + delivered_bytes,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, attribute in (
            (
                "echoserver_broadcast_deliveries",
                "Broadcast messages queued to a receiver.",
                "deliveries",
            ),
            (
                "echoserver_broadcast_drops",
                "Broadcast messages dropped for a receiver over its queue cap.",
                "drops",
            ),
            (
                "echoserver_slow_client_disconnects",
                "Receivers closed with 1013 for falling behind.",
                "slow_disconnects",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["channel"])
            for channel, stats in channels:
                family.add_metric([channel], getattr(stats, attribute))
            yield family
        for name, doc, label, counts in (
            (
                "echoserver_handshakes_refused",
                "WebSocket handshakes refused, by reason.",
                "reason",
                self.handshakes_refused,
            ),
            (
                "echoserver_tokens_refused",
                "Connection tokens refused (WebSocket and SSE), by what failed: missing, "
                "malformed, algorithm, kid, signature, expired, not_yet_valid, audience, "
                "issuer, claims.",
                "reason",
                self.tokens_refused,
            ),
            (
                "echoserver_closes",
                "Closed WebSocket connections, by close code.",
                "code",
                self.closes,
            ),
            (
                "echoserver_connections_refused",
                "Connections answered 503 and closed at accept, by reason: full "
                "(websocket.max_connections and its headroom), per_address "
                "(websocket.max_connections_per_ip).",
                "reason",
                self.connections_refused,
            ),
            (
                "echoserver_accept_errors",
                "Failed accept() calls, by reason (emfile: out of file descriptors); each "
                "pauses accepting for a moment.",
                "reason",
                self.accept_errors,
            ),
            (
                "echoserver_api_publish_requests",
                "Publish API requests (POST /api/channels/<channel>/messages), by status; "
                "200 = published.",
                "status",
                self.api_requests,
            ),
            (
                "echoserver_webhook_events_dropped",
                "Lifecycle events never sent, by reason: queue_full (webhooks.queue_size, "
                "the oldest go), gave_up (webhooks.max_attempts failed), "
                "shutdown (still queued when the server stopped), error (a bug, logged).",
                "reason",
                self.webhooks.dropped,
            ),
            (
                "echoserver_webhook_requests",
                "Webhook requests, by outcome: the HTTP status, or timeout / error.",
                "outcome",
                self.webhooks.requests,
            ),
            (
                "echoserver_webhook_reports",
                "Lifecycle transitions this process observed, by what the ledger said: owned "
                "(this process sends the event) or unchanged (another process did, or the "
                "state already held).",
                "outcome",
                self.webhooks.reports,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, count in sorted(counts.items()):
                family.add_metric([str(key)], count)
            yield family

"""Lifecycle webhooks: channel_occupied/vacated, user_online/offline, user_joined/left,
POSTed to a backend, signed by the Standard Webhooks scheme, batched, retried, bounded,
and sent once across processes (docs/webhooks.md).

events.py is the source API (Webhooks.deliver) and the event body; sender.py the queue,
batches and retries; signing.py the signature; http.py the one Tornado-using edge. What
decides the events: fanout/lifecycle.py, through brokers/lifecycle_holds.py.
"""

from __future__ import annotations

from echoserver.brokers import Broker
from echoserver.brokers.lifecycle import ledger_for
from echoserver.config.settings import WebhooksSettings
from echoserver.config.webhooks import secret_bytes
from echoserver.metrics import WebhookCounts
from echoserver.webhooks.events import Webhooks
from echoserver.webhooks.http import Post, tornado_post
from echoserver.webhooks.sender import Bounds, Sender

__all__ = ["Webhooks", "build"]


def build(
    settings: WebhooksSettings, broker: Broker, counts: WebhookCounts, post: Post | None = None
) -> Webhooks:
    """The server's Webhooks: a no-op without webhooks.url."""
    if not settings.url:
        return Webhooks(None, None, settings.events)
    bounds = Bounds(
        queue_size=settings.queue_size,
        batch_window=settings.batch_window,
        max_batch=settings.max_batch,
        timeout=settings.timeout,
        retry_initial=settings.retry_initial,
        retry_max=settings.retry_max,
        max_attempts=settings.max_attempts,
    )
    sender = Sender(
        settings.url, secret_bytes(settings.secret), post or tornado_post(), bounds, counts
    )
    return Webhooks(sender, ledger_for(broker), settings.events)

"""POST /api/publish: many messages for many channels in one request (the batch publish API).

The body's rules are in wire/batch.py; this handler maps outcomes to statuses and publishes
the whole batch through the hub (Hub.post_many: one batch through the broker). It shares
the one-message API's key check, streamed body and counters (handlers.PublishHandler); its
body may be up to BODY_FACTOR x websocket.max_message_size bytes or MIN_BODY, whichever is
more.
"""

from __future__ import annotations

import json

import tornado.web

from echoserver.brokers import BrokerUnavailable
from echoserver.web.handlers import PublishHandler
from echoserver.wire.batch import BatchRefused, read_batch
from echoserver.wire.envelopes import Refused

BODY_FACTOR = 4  # a batch's body: up to this many times websocket.max_message_size,
MIN_BODY = 1 << 20  # or this many bytes, whichever is more


@tornado.web.stream_request_body
class BatchPublishHandler(PublishHandler):
    """200 with {"results": [{"channel", "offset", "epoch", "local_receivers"}, ...]} in the
    request's order; 400 naming the first bad item's index; nothing published unless all
    of the request is valid."""

    def body_limit(self) -> int:
        return max(BODY_FACTOR * self.server.config.websocket.max_message_size, MIN_BODY)

    def _too_big(self) -> Refused:
        limit = self.body_limit()
        return Refused(
            413,
            f"the body is over {limit} bytes ({BODY_FACTOR} x websocket.max_message_size, "
            f"at least {MIN_BODY})",
        )

    async def post(self) -> None:  # type: ignore[override]
        if self._refused:
            return
        config = self.server.config
        try:
            messages = read_batch(
                b"".join(self._body),
                mixed=config.mode == "mixed",
                max_items=config.api.max_batch,
                max_size=config.websocket.max_message_size,
            )
        except BatchRefused as refused:
            self._refused = True
            body = {"error": refused.message, "index": refused.index}
            self.write_json(body, refused.status)
            return
        try:
            published = await self.server.hub.post_many(messages)
        except BrokerUnavailable as exc:
            self._refuse(Refused(503, f"not published: {exc}"))
            return
        results = [
            {"channel": channel, "offset": offset, "epoch": epoch, "local_receivers": local}
            for (channel, _, _), (offset, epoch, local) in zip(messages, published, strict=True)
        ]
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"results": results}, separators=(",", ":")))

"""The webhook sender: a bounded queue of events, batched into signed POSTs, retried.

Events wait in one queue of at most `queue_size`; past it the oldest is dropped (a dead
backend costs bounded memory, and the freshest state survives). Events that arrive within
`batch_window` seconds of the first one go in one request of at most `max_batch`, whose
body is ``{"events": [...]}``. One request is in flight at a time, and a failed one (an
error, a timeout, a status other than 2xx) is retried, with the same webhook-id, after
retry_initial, 2 x retry_initial, ... up to retry_max seconds with full jitter, at most
`max_attempts` times; only then are its events dropped. So a backend receives each
scope's events in sequence; it may receive a request twice (its answer was lost), and
skips a webhook-id it has seen, as Standard Webhooks asks.

What is dropped is counted (metrics.WebhookCounts) and logged at most every LOG_INTERVAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from echoserver.metrics import WebhookCounts
from echoserver.webhooks.http import Post
from echoserver.webhooks.signing import headers

log = logging.getLogger("echoserver.webhooks")

LOG_INTERVAL = 10.0  # seconds between two warnings about dropped events


@dataclass(frozen=True)
class Bounds:
    queue_size: int = 10000
    batch_window: float = 0.05
    max_batch: int = 100
    timeout: float = 5.0
    retry_initial: float = 0.5
    retry_max: float = 30.0
    max_attempts: int = 10


class DropLog:
    """Warnings about dropped events, one per LOG_INTERVAL with the count since the last."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = -LOG_INTERVAL
        self._unlogged: dict[str, int] = {}

    def dropped(self, reason: str, count: int) -> None:
        self._unlogged[reason] = self._unlogged.get(reason, 0) + count
        now = self._clock()
        if now - self._last >= LOG_INTERVAL:
            self._last = now
            what = ", ".join(f"{n} {r}" for r, n in sorted(self._unlogged.items()))
            self._unlogged.clear()
            log.warning("webhook events dropped: %s", what)


class Sender:
    """Queues events and delivers them to `url`, signed with `key`, through `post`."""

    def __init__(
        self, url: str, key: bytes, post: Post, bounds: Bounds, counts: WebhookCounts
    ) -> None:
        self.url = url
        self._key = key
        self._post = post
        self.bounds = bounds
        self.counts = counts
        counts.queued = lambda: len(self._queue)
        self.drops = DropLog()
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued, nothing in flight
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def put(self, event: dict[str, Any]) -> None:
        """Queue one event (a JSON-ready dict); never waits."""
        if len(self._queue) >= self.bounds.queue_size:
            self._queue.popleft()
            self._drop("queue_full", 1)
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self, grace: float) -> None:
        """Deliver what is queued for up to `grace` seconds, then stop; the rest is dropped."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._queue:
            self._drop("shutdown", len(self._queue))
            self._queue.clear()

    def _drop(self, reason: str, count: int) -> None:
        self.counts.dropped[reason] += count
        self.drops.dropped(reason, count)

    async def _run(self) -> None:
        bounds = self.bounds
        while True:
            await self._wake.wait()
            if bounds.batch_window > 0:
                await asyncio.sleep(bounds.batch_window)
            batch = [self._queue.popleft() for _ in range(min(bounds.max_batch, len(self._queue)))]
            if not self._queue:
                self._wake.clear()
            if batch:
                try:
                    await self._deliver(batch)
                except asyncio.CancelledError:
                    self._queue.extendleft(reversed(batch))  # counted by close()
                    raise
                except Exception:  # a bug must not stop every later event
                    log.exception("webhook request failed")
                    self._drop("error", len(batch))
            if not self._queue:
                self._idle.set()

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """One request, retried; its events are counted sent or dropped."""
        bounds = self.bounds
        msg_id = "msg_" + os.urandom(12).hex()
        body = json.dumps({"events": batch}, separators=(",", ":")).encode()
        for attempt in range(1, bounds.max_attempts + 1):
            signed = headers(self._key, msg_id, int(time.time()), body)
            try:
                status = await self._post(self.url, signed, body, bounds.timeout)
                outcome = str(status)
            except Exception as err:  # any failure to get an answer is retried
                status = 0
                outcome = "timeout" if "timeout" in str(err).lower() else "error"
                log.debug("webhook %s attempt %d: %s", msg_id, attempt, err)
            self.counts.requests[outcome] += 1
            if 200 <= status < 300:
                self.counts.sent += len(batch)
                return
            if attempt < bounds.max_attempts:
                cap = min(bounds.retry_max, bounds.retry_initial * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, cap))
        log.debug("webhook %s failed %d times", msg_id, bounds.max_attempts)
        self._drop("gave_up", len(batch))  # logged, throttled, by DropLog

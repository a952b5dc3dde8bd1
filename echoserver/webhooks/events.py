"""The event source: what the presence side calls when it observes a lifecycle transition.

    webhooks.emit("channel_vacated", channel="room", at=time.time())
    webhooks.emit("user_joined", channel="room", user="alice", info={...})

emit() reports an observed state, idempotently: every process may report the same
transition, and reporting a state that already holds changes nothing. Each report goes
through the broker's lifecycle ledger (brokers/lifecycle.py), whose compare-and-set picks
the one process that changed the state; that process alone queues the event, with the
scope's next sequence number. Debouncing is the caller's: report "vacated"/"offline"/"left"
only once presence_grace has passed without a return (then `at` says when it happened).

The server's own source is deliver(): the lifecycle holds (fanout/lifecycle.py) move the
ledger's flag in the same write that records a process's entry, so their events arrive
here already owned, with their seq.

Event JSON (one per transition; ``seq`` counts per channel for channel_* and
user_joined/user_left, per user for user_online/user_offline):

    {"id": "evt_...", "type": "user_joined", "channel": "room", "user": "alice",
     "seq": 7, "at": 1765028000.123, "info": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from echoserver.brokers import BrokerUnavailable
from echoserver.brokers.lifecycle import Ledger
from echoserver.webhooks.sender import Sender

log = logging.getLogger("echoserver.webhooks")


@dataclass(frozen=True)
class Kind:
    """How an event kind maps onto the ledger: its scope, its flag, and the flag's state."""

    needs_channel: bool
    needs_user: bool
    active: bool
    pair: str  # the kind that moves the same flag back


KINDS: dict[str, Kind] = {
    "channel_occupied": Kind(True, False, True, "channel_vacated"),
    "channel_vacated": Kind(True, False, False, "channel_occupied"),
    "user_online": Kind(False, True, True, "user_offline"),
    "user_offline": Kind(False, True, False, "user_online"),
    "user_joined": Kind(True, True, True, "user_left"),
    "user_left": Kind(True, True, False, "user_joined"),
}


def ledger_key(kind: str, channel: str | None, user: str | None) -> tuple[str, str]:
    """(scope, flag) of an event: the channel's or the user's."""
    if kind.startswith("channel_"):
        return f"c:{channel}", "#occupied"
    if kind in ("user_online", "user_offline"):
        return f"u:{user}", "#online"
    return f"c:{channel}", f"u:{user}"


@dataclass
class _Report:
    kind: str
    channel: str | None
    user: str | None
    at: float
    info: Any


class Webhooks:
    """emit() for the presence side; sends through `sender` what `ledger` says is ours.

    Without a sender (no webhooks.url) emit() does nothing, so callers need no check.
    `events`: the kinds sent; a kind's pair moves the ledger too (so a second
    channel_occupied can follow a vacated one that is not sent), which shows as a gap.
    """

    def __init__(
        self,
        sender: Sender | None,
        ledger: Ledger | None,
        events: tuple[str, ...],
        max_pending: int = 10000,
    ) -> None:
        self.sender = sender
        self.ledger = ledger
        self.events = frozenset(events)
        # The kinds whose flags the ledger moves: the sent ones and their pairs.
        self._tracked = self.events | {KINDS[kind].pair for kind in self.events}
        self._max_pending = max_pending
        self._pending: deque[_Report] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.sender is not None and self.ledger is not None

    def wants(self, *kinds: str) -> bool:
        """Whether reporting any of these kinds can lead to a request."""
        return self.enabled and any(kind in self._tracked for kind in kinds)

    def emit(
        self,
        kind: str,
        *,
        channel: str | None = None,
        user: str | None = None,
        at: float | None = None,
        info: Any = None,
    ) -> None:
        """Report an observed transition (never waits; see the module docstring)."""
        spec = KINDS[kind]  # a KeyError for an unknown kind: a caller's bug
        if spec.needs_channel != (channel is not None) or spec.needs_user != (user is not None):
            raise ValueError(f"{kind} takes channel={spec.needs_channel}, user={spec.needs_user}")
        if not self.enabled or kind not in self._tracked:
            return
        if info is not None:
            json.dumps(info)  # a TypeError here, to the caller, rather than in the sender
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            assert self.sender is not None
            self.sender.counts.dropped["queue_full"] += 1
            self.sender.drops.dropped("queue_full", 1)
        self._pending.append(_Report(kind, channel, user, time.time() if at is None else at, info))
        self._wake.set()

    def deliver(
        self,
        kind: str,
        seq: int,
        *,
        channel: str | None = None,
        user: str | None = None,
        at: float | None = None,
        info: Any = None,
    ) -> None:
        """Queue an event whose transition is already owned, `seq` its number: the
        lifecycle holds (brokers/lifecycle_holds.py) move the ledger with their own write."""
        if not self.enabled or kind not in self._tracked:
            return
        assert self.sender is not None
        self.sender.counts.reports["owned"] += 1
        if kind in self.events:
            report = _Report(kind, channel, user, time.time() if at is None else at, info)
            self.sender.put(event(report, seq))

    def unchanged(self, kind: str) -> None:
        """A lifecycle hold that moved no state (another process holds it): counted."""
        if self.wants(kind):
            assert self.sender is not None
            self.sender.counts.reports["unchanged"] += 1

    def start(self) -> None:
        if self.enabled and self._task is None:
            assert self.sender is not None
            self.sender.start()
            self._task = asyncio.ensure_future(self._claim())

    async def close(self, grace: float) -> None:
        """Claim what is reported, deliver what is queued (for up to `grace` seconds)."""
        if self._task is None:
            return
        assert self.sender is not None
        deadline = time.monotonic() + grace
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._pending:
            self.sender.counts.dropped["shutdown"] += len(self._pending)
            self._pending.clear()
        await self.sender.close(max(0.0, deadline - time.monotonic()))

    async def _claim(self) -> None:
        """Ask the ledger about every report, all at once (the broker pipelines them), in
        their order; queue the ones this process owns."""
        assert self.ledger is not None and self.sender is not None
        ledger, sender = self.ledger, self.sender
        while True:
            await self._wake.wait()
            self._wake.clear()
            reports = list(self._pending)
            self._pending.clear()
            claims = []
            for report in reports:
                scope, flag = ledger_key(report.kind, report.channel, report.user)
                claims.append(ledger.transition(scope, flag, KINDS[report.kind].active))
            results = await asyncio.gather(*claims, return_exceptions=True)
            for report, result in zip(reports, results, strict=True):
                if isinstance(result, BrokerUnavailable):
                    sender.counts.dropped["broker_unavailable"] += 1
                    sender.drops.dropped("broker_unavailable", 1)
                elif isinstance(result, BaseException):
                    sender.counts.dropped["error"] += 1
                    log.error("webhook ledger failed for %s", report.kind, exc_info=result)
                elif not result:
                    sender.counts.reports["unchanged"] += 1
                else:
                    sender.counts.reports["owned"] += 1
                    if report.kind in self.events:
                        sender.put(event(report, result))


def event(report: _Report, seq: int) -> dict[str, Any]:
    """An event as the request body carries it."""
    body: dict[str, Any] = {"id": "evt_" + os.urandom(12).hex(), "type": report.kind}
    if report.channel is not None:
        body["channel"] = report.channel
    if report.user is not None:
        body["user"] = report.user
    body["seq"] = seq
    body["at"] = round(report.at, 3)
    if report.info is not None:
        body["info"] = report.info
    return body

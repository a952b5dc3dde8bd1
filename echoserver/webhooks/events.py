"""The event queue of the lifecycle webhooks: what the lifecycle holds call once a write of
theirs has changed a state.

    webhooks.deliver("channel_occupied", seq, channel="room", at=time.time())
    webhooks.deliver("user_joined", seq, channel="room", user="alice", info={...})

The holds (brokers/lifecycle_holds.py, driven by fanout/lifecycle.py) move the ledger's
flag and take the scope's next sequence number in the same atomic write that records a
process's entry, so the one process whose write changed the state delivers the event, with
its seq; every other process's write reports unchanged(). Debouncing is the caller's: a
"vacated"/"offline"/"left" comes only once presence_grace has passed without a return
(then `at` says when it happened).

Event JSON (one per transition; ``seq`` counts per channel for channel_* and
user_joined/user_left, per user for user_online/user_offline):

    {"id": "evt_...", "type": "user_joined", "channel": "room", "user": "alice",
     "seq": 7, "at": 1765028000.123, "info": {...}}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from echoserver.brokers.lifecycle import Ledger
from echoserver.webhooks.sender import Sender

# Each kind and the kind that moves the same flag back.
KINDS: dict[str, str] = {
    "channel_occupied": "channel_vacated",
    "channel_vacated": "channel_occupied",
    "user_online": "user_offline",
    "user_offline": "user_online",
    "user_joined": "user_left",
    "user_left": "user_joined",
}


@dataclass
class _Report:
    kind: str
    channel: str | None
    user: str | None
    at: float
    info: Any


class Webhooks:
    """deliver() for the lifecycle holds; sends through `sender` the kinds in `events`.

    Without a sender (no webhooks.url) deliver() does nothing, so callers need no check.
    `events`: the kinds sent; a kind's pair moves the ledger too (so a second
    channel_occupied can follow a vacated one that is not sent), which shows as a gap.
    `ledger`: the flags and counters the holds move (the memory broker's lives here).
    """

    def __init__(
        self, sender: Sender | None, ledger: Ledger | None, events: tuple[str, ...]
    ) -> None:
        self.sender = sender
        self.ledger = ledger
        self.events = frozenset(events)
        # The kinds whose flags the ledger moves: the sent ones and their pairs.
        self._tracked = self.events | {KINDS[kind] for kind in self.events}
        self._started = False

    @property
    def enabled(self) -> bool:
        return self.sender is not None and self.ledger is not None

    def wants(self, *kinds: str) -> bool:
        """Whether a transition of any of these kinds can lead to a request."""
        return self.enabled and any(kind in self._tracked for kind in kinds)

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
        if self.enabled and not self._started:
            assert self.sender is not None
            self.sender.start()
            self._started = True

    async def close(self, grace: float) -> None:
        """Deliver what is queued (for up to `grace` seconds)."""
        if not self._started:
            return
        assert self.sender is not None
        self._started = False
        await self.sender.close(grace)


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

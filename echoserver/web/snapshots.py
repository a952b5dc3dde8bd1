"""Snapshots a webhook backend reconciles with after its own downtime, behind the API key,
across every process sharing the broker (the lifecycle holds' process indexes, the
presence counts and rolls), with this process's own detail where only it knows it:

GET /api/channels: every channel with a member on some live process (or within the
presence grace after its last one: not vacated yet), sorted:
    {"channels": [{"channel": "room", "members": 5, "users": 2, "local": 2}, ...]}
  members: connections on the channel on every process (guests too), users: distinct
  users there (a user within the grace too), local: this process's members.
GET /api/users/<sub>: where the user is connected, per process, and their channels:
    {"user": "alice", "online": true, "connections": 3,
     "processes": [{"process": "<id>", "here": true, "connections": 2,
                    "channels": ["news", "room"]}, ...],
     "channels": ["news", "room"],
     "local": [{"kind": "websocket", "channel": "room"}, ...]}
  online: as user_online/user_offline say (true within the grace, with 0 connections),
  connections: their open connections on every process, channels: where they are on
  any process, local: this process's connections (kind, URL channel).
Both answer 503 while the broker is unreachable.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from echoserver.brokers import BrokerUnavailable
from echoserver.endpoints.sse import EventStream
from echoserver.web.handlers import JSONHandler, api_key_refusal


class _KeyedRead(JSONHandler):
    def prepare(self) -> None:
        refused = api_key_refusal(
            self.server.config.api.key, self.request.headers.get("Authorization")
        )
        if refused is None:
            return
        if refused.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
        self.write_json({"error": refused.message}, refused.status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, BrokerUnavailable):  # the processes' view cannot be read now
            self.write_json({"error": f"broker unavailable: {error}"}, 503)
            return
        super().write_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, BrokerUnavailable):
            super().log_exception(typ, value, tb)


def _channels_by_process(indexes: dict[str, list[str]]) -> dict[str, set[str]]:
    """Process id -> the channels it has members on (index entries "c\\t<channel>")."""
    return {
        pid: {entry[2:] for entry in entries if entry.startswith("c\t")}
        for pid, entries in indexes.items()
    }


class ChannelsSnapshot(_KeyedRead):
    async def get(self) -> None:
        hub = self.server.hub
        local = hub.local_members()
        names = set(local)
        lifecycle = self.server.lifecycle
        if lifecycle is not None:
            for held in _channels_by_process(await lifecycle.indexes()).values():
                names.update(held)
        ordered = sorted(names)
        totals = await asyncio.gather(*(hub.members(channel) for channel in ordered))
        rolls = await asyncio.gather(*(hub.presence.roll(channel) for channel in ordered))
        channels = [
            {"channel": channel, "members": total, "users": len(roll.users),
             "local": local.get(channel, 0)}
            for channel, total, roll in zip(ordered, totals, rolls, strict=True)
        ]  # fmt: skip
        self.write_json({"channels": channels})


class UserSnapshot(_KeyedRead):
    async def get(self, sub: str) -> None:
        server = self.server
        local: list[dict[str, Any]] = []
        for connection in list(server.connections):
            identity = getattr(connection, "identity", None)
            if identity is None or identity.sub != sub:
                continue
            kind = "sse" if isinstance(connection, EventStream) else "websocket"
            local.append({"kind": kind, "channel": connection.channel})
        lifecycle = server.lifecycle
        counts: dict[str, int] = {}
        where: dict[str, set[str]] = defaultdict(set)
        here = ""
        if lifecycle is not None:
            here = lifecycle.holds.process_id
            indexes, counts = await asyncio.gather(
                lifecycle.indexes(), lifecycle.user_connections(sub)
            )
            for pid, entries in indexes.items():
                for entry in entries:
                    parts = entry.split("\t", 3)
                    if parts[0] == "r" and len(parts) >= 3 and parts[2] == sub:
                        where[pid].add(parts[1])
        else:
            counts = {"local": len(local)} if local else {}
            where["local"] = {c["channel"] for c in local}
        processes = [
            {"process": pid, "here": pid == here, "connections": counts.get(pid, 0),
             "channels": sorted(where.get(pid, ()))}
            for pid in sorted(set(counts) | {p for p, chs in where.items() if chs})
        ]  # fmt: skip
        channels = sorted(set().union(*where.values())) if where else []
        self.write_json(
            {
                "user": sub,
                "online": bool(counts),
                "connections": sum(counts.values()),
                "processes": processes,
                "channels": channels,
                "local": local,
            }
        )

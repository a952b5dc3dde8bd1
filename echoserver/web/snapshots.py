"""Snapshots a webhook backend reconciles with after its own downtime, behind the API key:

GET /api/channels: this process's channels, each with its members here ("local") and
across every process ("members", the presence count):
    {"channels": [{"channel": "room", "local": 2, "members": 5}, ...]}
GET /api/users/<sub>: the user's connections in this process and their channels:
    {"user": "alice", "connections": [{"kind": "websocket", "channel": "room"}, ...],
     "channels": ["room", ...]}

Both are this process's view (plus presence counts): channels with members only on other
processes, and another process's connections of a user, need the cross-process presence
registry (issue 21, part 3) to list them.
"""

from __future__ import annotations

import asyncio
from typing import Any

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


class ChannelsSnapshot(_KeyedRead):
    async def get(self) -> None:
        hub = self.server.hub
        local = sorted(hub.local_members().items())
        totals = await asyncio.gather(*(hub.members(channel) for channel, _ in local))
        channels = [
            {"channel": channel, "local": here, "members": total}
            for (channel, here), total in zip(local, totals, strict=True)
        ]
        self.write_json({"channels": channels})


class UserSnapshot(_KeyedRead):
    def get(self, sub: str) -> None:
        connections: list[dict[str, Any]] = []
        for connection in list(self.server.connections):
            identity = getattr(connection, "identity", None)
            if identity is None or identity.sub != sub:
                continue
            kind = "sse" if isinstance(connection, EventStream) else "websocket"
            connections.append({"kind": kind, "channel": connection.channel})
        channels = sorted({c["channel"] for c in connections})
        self.write_json({"user": sub, "connections": connections, "channels": channels})

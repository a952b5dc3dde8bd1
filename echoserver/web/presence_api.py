"""GET /api/channels/<channel>/presence: who is on a channel, across every process.

Behind the API key, like the publish API (404 while api.key is empty, 401 without the key).
The answer, read from the broker's presence (brokers/base.py Presence.roll):

    {"channel": C,
     "users": [{"user": sub, "info": I, "connections": n}, ...],
     "connections": N, "users_count": U, "guests": G}

`users` lists every user (a verified token's sub) with a connection on the channel on a
live process, or within broadcast.presence_grace of their last one (then "connections": 0);
`info` is their token's info claim (null without one). `connections` counts every member
(users' connections and guests'), `users_count` is len(users), `guests` the members without
a token (connections minus the users' connections). A crashed process's entries drop out
within the broker's presence TTL. While Redis is unreachable the answer is this process's.
"""

from __future__ import annotations

from echoserver.web.handlers import JSONHandler, api_key_refusal


class PresenceHandler(JSONHandler):
    async def get(self, channel: str) -> None:
        refused = api_key_refusal(
            self.server.config.api.key, self.request.headers.get("Authorization")
        )
        if refused is not None:
            if refused.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
            self.write_json({"error": refused.message}, refused.status)
            return
        roll = await self.server.hub.presence.roll(channel)
        users = sorted(roll.users, key=lambda u: u.user)
        held = sum(u.connections for u in users)
        self.write_json(
            {
                "channel": channel,
                "users": [
                    {"user": u.user, "info": u.info, "connections": u.connections} for u in users
                ],
                "connections": roll.connections,
                "users_count": len(users),
                "guests": max(0, roll.connections - held),
            }
        )

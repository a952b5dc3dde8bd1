"""The user API: POST /api/users/<sub>/messages publishes to the user's personal channel
(the first namespace whose pattern holds {sub} names it), and DELETE
/api/users/<sub>/connections closes every connection of the user, on every process and host
(a control message through the broker): WebSockets with 4003, event streams with
`event: disconnected`. Both need the API key, like the publish API.
"""

from __future__ import annotations

import tornado.web

from echoserver.brokers import BrokerUnavailable
from echoserver.web.handlers import JSONHandler, PublishHandler, api_key_refusal
from echoserver.wire.envelopes import Refused


@tornado.web.stream_request_body
class UserMessagesHandler(PublishHandler):
    async def post(self, sub: str) -> None:
        if self._refused:
            return
        channel = self.server.authority.rights.personal_channel(sub)
        if channel is None:
            if any(ns.personal for ns in self.server.authority.rights.namespaces):
                self._refuse(Refused(400, "this sub cannot be part of a channel name"))
            else:
                self._refuse(Refused(404, "no personal channels: no namespace has {sub}"))
            return
        await self.publish_body(channel)


class UserConnectionsHandler(JSONHandler):
    async def delete(self, sub: str) -> None:
        server = self.server
        refused = api_key_refusal(server.config.api.key, self.request.headers.get("Authorization"))
        if refused is None and not server.authority.uses_tokens:
            refused = Refused(404, "no users: the server has no JWT keys (auth.jwt_*)")
        if refused is not None:
            if refused.status == 401:
                self.set_header("WWW-Authenticate", 'Bearer realm="echoserver"')
            self.write_json({"error": refused.message}, refused.status)
            return
        try:
            outcome = server.hub.control(server.authority.disconnect_message(sub))
            if not isinstance(outcome, int):
                await outcome
        except BrokerUnavailable as exc:
            self.write_json({"error": f"not sent: {exc}"}, 503)
            return
        # Every process closes its own connections of the user as the message reaches it.
        self.write_json({"user": sub, "disconnecting": True}, 202)

    def on_finish(self) -> None:
        self.server.metrics.api_requests[self.get_status()] += 1

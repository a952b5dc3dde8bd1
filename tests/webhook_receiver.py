"""A webhook backend for the tests: a Tornado app on the test's own loop that checks every
request with the stock Standard Webhooks library, skips a webhook-id it has processed (as
the scheme asks of a receiver), and fails attempts as its `plan` says."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import tornado.httpserver
import tornado.web
from standardwebhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class _Hook(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        receiver = self.receiver
        msg_id = self.request.headers.get("webhook-id", "")
        attempt = len(receiver.attempts)
        receiver.attempts.append(msg_id)
        action = receiver.plan[attempt] if attempt < len(receiver.plan) else "ok"
        if action == "500":  # fails before processing anything
            self.set_status(500)
            return
        headers = {name: value for name, value in self.request.headers.get_all()}
        payload = Webhook(receiver.secret).verify(self.request.body, headers)  # raises
        receiver.verified += 1
        if msg_id in receiver.processed:
            receiver.duplicates += 1
        else:
            receiver.processed.add(msg_id)
            receiver.batches.append(payload["events"])
            receiver.events.extend(payload["events"])
        if action == "slow":  # processed, but answers after the sender gave up
            await asyncio.sleep(receiver.slow)
        self.set_status(204)


class Receiver:
    def __init__(self, secret: str, plan: tuple[str, ...] = (), slow: float = 1.5) -> None:
        self.secret, self.plan, self.slow = secret, plan, slow
        self.attempts: list[str] = []  # webhook-id of every request, in order
        self.processed: set[str] = set()
        self.batches: list[list[dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.duplicates = 0
        self.verified = 0
        self.port = 0
        self._server: tornado.httpserver.HTTPServer | None = None

    def start(self) -> Receiver:
        app = tornado.web.Application([(r"/hook", _Hook, {"receiver": self})])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets([sock])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def of(self, channel: str) -> list[tuple[str, int]]:
        """(type, seq) of the channel's events, in the order they arrived."""
        return [(e["type"], e["seq"]) for e in self.events if e.get("channel") == channel]

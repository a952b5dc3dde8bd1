"""A webhook receiver for the benchmarks: a Tornado app on 127.0.0.1, in a thread of the
benchmark's own process, that answers every POST with 204 and counts requests and events.

It verifies nothing (the tests check signatures; a benchmark measures the server's side):
it is the cheapest backend a server can have, so what a run shows is what sending costs the
server, not what a slow backend does to it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from typing import Any

import tornado.httpserver
import tornado.web
from procs import HOST, free_port

PATH = "/hooks"


class _Hook(tornado.web.RequestHandler):
    def initialize(self, sink: WebhookSink) -> None:
        self.sink = sink

    def post(self) -> None:
        try:
            events = json.loads(self.request.body).get("events", [])
        except (ValueError, AttributeError):
            events = []
        self.sink.record(events)
        self.set_status(204)


class WebhookSink:
    """Start it (`with WebhookSink() as sink`), give the server `sink.url`, read `counts()`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}{PATH}"
        self.requests = 0
        self.events: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="webhook-sink", daemon=True)

    def record(self, events: list[Any]) -> None:
        with self._lock:
            self.requests += 1
            self.events.update(str(e.get("type")) for e in events if isinstance(e, dict))

    def counts(self) -> dict[str, Any]:
        """Requests and events so far (events by type); a run takes the difference."""
        with self._lock:
            return {"requests": self.requests, "events": dict(self.events)}

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        app = tornado.web.Application([(PATH, _Hook, {"sink": self})])
        server = tornado.httpserver.HTTPServer(app)
        server.listen(self.port, address=HOST)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()

    def __enter__(self) -> WebhookSink:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the webhook receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What the sink got between two counts()."""
    types = set(after["events"]) | set(before["events"])
    events = {t: after["events"].get(t, 0) - before["events"].get(t, 0) for t in sorted(types)}
    return {
        "requests": after["requests"] - before["requests"],
        "events": {t: n for t, n in events.items() if n},
    }

"""The public API for mounting the server's endpoints in your own Tornado application.

It owns nothing but the names a user imports: settings() loads the settings as the
command line does, and Realtime puts together the state the server itself runs on (the
hub and its broker, metrics, the connection limits; web.app.ServerState) and gives its
routes, under a path prefix, for your ``tornado.web.Application``::

    from echoserver import embed

    rt = embed.Realtime(embed.settings(mode="broadcast"), prefix="/rt")
    app = tornado.web.Application([*rt.routes(), (r"/hello", Hello)], **rt.app_settings())
    app.listen(port, "127.0.0.1")
    await rt.start()
    ...
    await rt.stop()

docs/embedding.md says what applies under your server and what is your application's job.
Everything else in the package is internal and may change between releases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tornado.routing

from echoserver.brokers import Broker, create_broker
from echoserver.config import ConfigError, Settings, load
from echoserver.endpoints.access import log_request
from echoserver.metrics import Metrics
from echoserver.web.app import ServerState, new_hub

__all__ = ["ConfigError", "Realtime", "Settings", "settings"]


def settings(
    mode: str | None = None,
    *,
    flags: Mapping[str, object] | None = None,
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """The settings, layered as the command line does: defaults < the TOML file <
    ``ECHOSERVER_*`` environment < `flags` (dotted key names: ``{"websocket.max_message_size":
    65536}``) < `mode`. `config_path` None reads ``$ECHOSERVER_CONFIG`` (if set), "" no file;
    `env` None reads ``os.environ``. Raises ConfigError (one line) on a bad value."""
    layered = dict(flags or {})
    if mode is not None:
        layered["mode"] = mode
    return load(config_path, env, layered)


class Realtime:
    """Echo, broadcast or mixed mode (``settings.mode``) for a Tornado application: the
    WebSocket endpoint at `prefix` + ``websocket.path`` (and /<channel> below it), and
    under `prefix` the server's /healthz, /metrics, /api/... and /sse routes.

    Create it, put routes() in your Application, then await start() on the loop that
    serves it before taking traffic, and stop() when shutting down. `broker`: the one
    to publish through; by default the one ``broadcast.broker`` names.
    """

    def __init__(self, settings: Settings, prefix: str = "", *, broker: Broker | None = None):
        hub = new_hub(settings, broker or create_broker(settings.broadcast.broker))
        self._state = ServerState(settings, hub, prefix)  # ValueError for a bad prefix

    @property
    def settings(self) -> Settings:
        return self._state.config

    @property
    def prefix(self) -> str:
        return self._state.prefix

    @property
    def websocket_path(self) -> str:
        """Where clients connect: prefix + websocket.path (+ /<channel> but in echo mode)."""
        return self._state.prefix + self._state.config.websocket.path

    @property
    def metrics(self) -> Metrics:
        """The counters /metrics serves (``metrics.render()``: the Prometheus text)."""
        return self._state.metrics

    @property
    def connections(self) -> int:
        """The WebSocket and event-stream clients open now."""
        return len(self._state.connections)

    def routes(self) -> list[tornado.routing.Rule]:
        """The rules to put in your Application's list, beside your own, in any order.

        The first answers 403 to a request under the prefix whose Host
        ``websocket.allowed_hosts`` does not admit (the server's DNS-rebinding guard); the
        others hand each handler this instance's state. Call it once per Application.
        """
        return self._state.routes(check_host=True)

    def app_settings(self) -> dict[str, Any]:
        """Application settings to pass along with yours (``**rt.app_settings()``): the
        server's access log for every route (logger ``echoserver.access``), where a probe
        or a refused Host is a debug line, so a client cannot make the log grow by one
        warning a request. Optional: without it Tornado logs each request its own way."""
        return {"log_function": log_request}

    async def start(self) -> None:
        """Connect the broker, on the loop that serves the routes (the first client would
        otherwise do it), fetch a remote JWKS, and listen for the user API's disconnects."""
        await self._state.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new clients (503), close every client with 1001 and wait for them up to
        `timeout` seconds (default ``shutdown_timeout``), then stop the keepalive and the
        broker. Stop your HTTP server after it: the drain answers 503 meanwhile."""
        state = self._state
        await state.drain(state.config.shutdown_timeout if timeout is None else timeout)
        await state.close()

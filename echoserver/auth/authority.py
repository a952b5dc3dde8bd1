"""Authority: the server's one view of who clients are and what they may do.

It bundles the verifier (tokens), the rights (namespaces), the expiry clock and the users'
connections, and turns a request's token into an Identity. The endpoints ask it at the
handshake and register the connection with it; the user API reaches every process's users
through a control message (on_control), which the hub carries on its control channel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from echoserver.auth.expiry import ExpiryClock
from echoserver.auth.identity import GUEST, Identity
from echoserver.auth.rights import Rights
from echoserver.auth.users import Users
from echoserver.auth.verifier import TokenRefused, Verifier
from echoserver.config.settings import Settings

log = logging.getLogger("echoserver.auth")


class Connection(Protocol):
    def token_expired(self) -> None: ...

    def disconnect(self) -> None: ...


class Authority:
    def __init__(self, settings: Settings) -> None:
        self.verifier = Verifier(settings.auth)
        self.rights = Rights(settings.namespaces)
        self.clock = ExpiryClock(settings.auth.leeway)
        self.users = Users()
        # on_user(sub, info, connections): a user's open connections here changed (the
        # lifecycle's user_online/user_offline, fanout/lifecycle.py).
        self.on_user: Callable[[str, Any, int], None] | None = None
        self.anonymous = settings.auth.anonymous
        if self.verifier.enabled:
            self.kind = "jwt"
        elif settings.websocket.auth_token:
            self.kind = "token"
        else:
            self.kind = "none"

    @property
    def uses_tokens(self) -> bool:
        """Whether a client's token is a JWT to verify (else the shared token, or none)."""
        return self.verifier.enabled

    async def start(self) -> None:
        await self.verifier.start()

    def close(self) -> None:
        self.clock.close()

    async def identify(self, token: str | None) -> Identity:
        """Who presents this token (None: none was sent); TokenRefused when nobody."""
        if not self.verifier.enabled:
            return GUEST
        if not token:
            if self.anonymous:
                return GUEST
            raise TokenRefused("no token", "missing")
        return await self.verifier.verify(token)

    def admit(self, connection: Connection, identity: Identity) -> None:
        """An open connection: found by its user, closed when its token runs out."""
        if identity.sub is not None:
            self.users.add(identity.sub, connection)
            if self.on_user is not None:
                self.on_user(identity.sub, identity.info, self.users.connections(identity.sub))
        if identity.exp is not None:
            self.clock.watch(connection, identity.exp)

    def release(self, connection: Connection, identity: Identity) -> None:
        if identity.sub is not None:
            self.users.discard(identity.sub, connection)
            if self.on_user is not None:
                self.on_user(identity.sub, identity.info, self.users.connections(identity.sub))
        if identity.exp is not None:
            self.clock.forget(connection)

    def refreshed(self, connection: Connection, new: Identity) -> None:
        """The connection's token was replaced by one for the same user (the user index
        stays as it is): its deadline moves to the new token's."""
        self.clock.watch(connection, new.exp)

    @staticmethod
    def disconnect_message(sub: str) -> bytes:
        return json.dumps({"disconnect": sub}).encode()

    def on_control(self, data: bytes) -> None:
        """A control message from some process (the hub's control channel)."""
        try:
            message = json.loads(data)
            sub = message["disconnect"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a control message that is not a disconnect")
            return
        if isinstance(sub, str):
            closed = self.users.disconnect(sub)
            if closed:
                log.info("disconnected %d connections of user %r", closed, sub[:64])

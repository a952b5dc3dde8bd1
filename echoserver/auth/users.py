"""Users: each verified user's open connections in this process, so an operator's
"disconnect alice" (DELETE /api/users/alice/connections, carried to every process by the
broker) finds them.
"""

from __future__ import annotations

from typing import Protocol


class UserConnection(Protocol):
    def disconnect(self) -> None:
        """The server ends the connection (4003, or the end of an event stream)."""


class Users:
    def __init__(self) -> None:
        self._by_sub: dict[str, set[UserConnection]] = {}

    def add(self, sub: str, connection: UserConnection) -> None:
        self._by_sub.setdefault(sub, set()).add(connection)

    def discard(self, sub: str, connection: UserConnection) -> None:
        connections = self._by_sub.get(sub)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._by_sub[sub]

    def connections(self, sub: str) -> int:
        """How many connections the user has here (what the lifecycle counts as online)."""
        return len(self._by_sub.get(sub, ()))

    def disconnect(self, sub: str) -> int:
        """End every connection of the user here; how many there were."""
        connections = list(self._by_sub.pop(sub, ()))
        for connection in connections:
            connection.disconnect()
        return len(connections)

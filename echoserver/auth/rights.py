"""Rights: the [[namespaces]] compiled, and who may join and publish on a channel.

The first namespace whose pattern matches a channel is its namespace; a channel no pattern
matches has none and keeps the server's defaults (anyone connected joins and publishes, the
[broadcast] history). `{sub}` in a pattern matches a channel-name segment and makes the
channel personal: only the user whose `sub` it is may join. Rights:

- subscribe: "anyone" (guests too), "user" (any verified token), "claim" (the token's
  `channels` claim matches the channel);
- publish: "members" (whoever may join), "claim" (the token's `publish` claim matches),
  "api" (no client: only the publish API).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from echoserver.auth.identity import Identity
from echoserver.config.namespaces import SUB
from echoserver.config.settings import NamespaceSettings
from echoserver.routes import CHANNEL_PATTERN

CHANNEL = re.compile(CHANNEL_PATTERN)
MAX_CACHED = 10_000  # channels whose namespace is remembered; past it the cache restarts


@dataclass(frozen=True, slots=True)
class Namespace:
    settings: NamespaceSettings
    regex: re.Pattern[str]  # with a group "sub" when the pattern has {sub}

    @property
    def personal(self) -> bool:
        return SUB in self.settings.pattern

    def owner_may_join(self, identity: Identity, channel: str) -> bool:
        """For a personal channel: whether it is this identity's own."""
        if not self.personal:
            return True
        match = self.regex.fullmatch(channel)
        return match is not None and identity.sub == match.group("sub")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A namespace pattern as a regex: fnmatch's glob, `{sub}` as a named group."""
    head, found, tail = pattern.partition(SUB)
    body = _glob(head)
    if found:
        body += r"(?P<sub>[A-Za-z0-9_.\-]+)" + _glob(tail)
    return re.compile(body)


def _glob(text: str) -> str:
    # fnmatch.translate gives "(?s:...)\Z"; the inner part is what we want.
    translated = fnmatch.translate(text)
    return translated[len("(?s:") : -len(r")\Z")] if text else ""


class Rights:
    """What each namespace allows, asked per channel."""

    def __init__(self, namespaces: tuple[NamespaceSettings, ...]) -> None:
        self.namespaces = tuple(Namespace(ns, compile_pattern(ns.pattern)) for ns in namespaces)
        self._cache: dict[str, Namespace | None] = {}

    def namespace_of(self, channel: str) -> Namespace | None:
        try:
            return self._cache[channel]
        except KeyError:
            pass
        found = next((ns for ns in self.namespaces if ns.regex.fullmatch(channel)), None)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[channel] = found
        return found

    def join_refusal(self, identity: Identity, channel: str) -> str | None:
        """Why this identity may not join the channel, or None."""
        namespace = self.namespace_of(channel)
        if namespace is None:
            return None
        rule = namespace.settings.subscribe
        if rule == "user" and not identity.is_user:
            return f"{channel} is for users with a token"
        if rule == "claim" and not identity.may_join_by_claim(channel):
            return f"the token's channels claim does not allow {channel}"
        if not namespace.owner_may_join(identity, channel):
            return f"{channel} is another user's personal channel"
        return None

    def may_publish(self, identity: Identity, channel: str) -> bool:
        """Whether a client with this identity, a member of the channel, may publish on it."""
        namespace = self.namespace_of(channel)
        if namespace is None:
            return True
        rule = namespace.settings.publish
        if rule == "api":
            return False
        if rule == "claim":
            return identity.may_publish_by_claim(channel)
        return True

    def personal_channel(self, sub: str) -> str | None:
        """The channel of the first personal namespace for this user, or None (no personal
        namespace, or a sub that cannot be part of a channel name)."""
        for namespace in self.namespaces:
            if namespace.personal:
                channel = namespace.settings.pattern.replace(SUB, sub)
                match = namespace.regex.fullmatch(channel)
                fits = CHANNEL.fullmatch(channel) and match and match.group("sub") == sub
                return channel if fits else None
        return None

    def retention(self, channel: str, default: tuple[int, float]) -> tuple[int, float]:
        """(messages, seconds) of history the channel keeps: its namespace's, where set."""
        namespace = self.namespace_of(channel)
        if namespace is None:
            return default
        history, ttl = namespace.settings.history, namespace.settings.history_ttl
        return (default[0] if history < 0 else history, default[1] if ttl < 0 else ttl)

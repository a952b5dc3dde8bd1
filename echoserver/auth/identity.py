"""Identity: what a verified connection token says about its holder, and GUEST, a client
let in without one (auth.anonymous, or a server with no JWT keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

MAX_INFO_BYTES = 1024  # the info claim, as JSON: shown to other users later
MAX_SUB_CHARS = 256
MAX_PATTERNS = 100  # in each of the channels and publish claims


class BadClaims(ValueError):
    """A signed token whose claims this server cannot use (one line, no values)."""


@dataclass(frozen=True, slots=True)
class Identity:
    sub: str | None  # None: a guest
    exp: float | None = None  # unix seconds; None: never expires
    channels: tuple[str, ...] | None = None  # glob patterns it may join (claim mode)
    publish: tuple[str, ...] | None = None  # glob patterns it may publish to (claim mode)
    info: Any = None  # public JSON about the user

    @property
    def is_user(self) -> bool:
        return self.sub is not None

    def may_join_by_claim(self, channel: str) -> bool:
        return self.channels is not None and any(fnmatchcase(channel, p) for p in self.channels)

    def may_publish_by_claim(self, channel: str) -> bool:
        return self.publish is not None and any(fnmatchcase(channel, p) for p in self.publish)


GUEST = Identity(None)


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadClaims(f"the {name} claim must be a list of strings")
    if len(value) > MAX_PATTERNS:
        raise BadClaims(f"the {name} claim has more than {MAX_PATTERNS} patterns")
    return tuple(value)


def from_claims(claims: dict[str, Any]) -> Identity:
    """The identity a verified token's claims describe; BadClaims when they cannot be used."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_CHARS:
        raise BadClaims(f"sub must be a string of 1..{MAX_SUB_CHARS} characters")
    exp = claims.get("exp")
    info = claims.get("info")
    if info is not None:
        encoded = json.dumps(info, separators=(",", ":"))
        if len(encoded.encode()) > MAX_INFO_BYTES:
            raise BadClaims(f"the info claim is over {MAX_INFO_BYTES} bytes as JSON")
    return Identity(
        sub=sub,
        exp=float(exp) if isinstance(exp, (int, float)) else None,
        channels=_patterns(claims, "channels"),
        publish=_patterns(claims, "publish"),
        info=info,
    )

"""The [webhooks] rules: the receiver's URL, the Standard Webhooks secret and the event
names (the sender itself is echoserver/webhooks)."""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from echoserver.config.rules import Rule, loopback_host
from echoserver.config.values import HIDDEN

# Every lifecycle event a backend may ask for, in the order the docs list them.
EVENT_KINDS = (
    "channel_occupied",
    "channel_vacated",
    "user_online",
    "user_offline",
    "user_joined",
    "user_left",
)
SECRET_PREFIX = "whsec_"
# What the Standard Webhooks specification asks of a symmetric secret.
SECRET_BYTES = (24, 64)


def check_url(value: str) -> str | None:
    if value == "":
        return None
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        return "not a valid URL"
    if url.scheme not in ("https", "http") or not url.hostname:
        return ""
    if any(ch.isspace() for ch in value) or url.fragment:
        return ""
    if url.scheme == "http" and not loopback_host(url.hostname):
        return "plain http:// only to a loopback address; use https://"
    return None


def secret_bytes(value: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError when it is not one."""
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"it must start with {SECRET_PREFIX}")
    text = value[len(SECRET_PREFIX) :]
    text += "=" * (-len(text) % 4)  # unpadded base64 is common, and stock libraries take it
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"it decodes to {len(key)} bytes, not {low}..{high}")
    return key


def check_secret(value: str) -> str | None:
    if value == "":
        return None
    if value == HIDDEN:
        return "this is the placeholder --print-config prints instead of the secret"
    try:
        secret_bytes(value)
    except ValueError as err:
        return str(err)
    return None


def check_events(value: tuple[str, ...]) -> str | None:
    for kind in value:
        if kind not in EVENT_KINDS:
            return f"unknown event {kind!r}"
    if len(set(value)) != len(value):
        return "an event is listed twice"
    return None


URL = Rule(
    '"" (no webhooks), an https:// URL, or http:// to a loopback address',
    check_url,
)
SECRET = Rule(
    f'"" or a Standard Webhooks secret: "{SECRET_PREFIX}" then the base64 of '
    f"{SECRET_BYTES[0]}..{SECRET_BYTES[1]} random bytes",
    check_secret,
)
EVENTS = Rule("a list of: " + ", ".join(EVENT_KINDS), check_events)

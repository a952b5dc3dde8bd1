"""The Standard Webhooks signature (https://www.standardwebhooks.com/): the headers that let
a backend check a request came from us, unchanged, and recently.

webhook-signature is "v1," then the base64 of HMAC-SHA256, keyed with the bytes the
`whsec_` secret encodes, of "<webhook-id>.<webhook-timestamp>.<body>".
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header's value."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one signed request (a retry is signed again, at its own time)."""
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
    }

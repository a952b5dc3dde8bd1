"""What a published message is on the wire: mixed mode's JSON and the publish API's body.

Mixed mode keeps a broadcast's payload in the broker as JSON text. Receivers get it inside
``{"type":"broadcast","channel":C,"payload":P,"offset":N,"epoch":E}``, built once per
fan-out from that JSON, its channel and the broker's offset and epoch (URL-safe: no
escaping, wire/positions.py) and cached on the shared message, so 1000 receivers cost one
envelope. The publish API turns a request body and its Content-Type into the message a
member would have sent, or refuses it with the HTTP status to answer.

Both take only JSON every receiver can parse back (load_json): no NaN or Infinity, no
number beyond a double's range (1e400 would go out as Infinity), and no nesting deeper
than MAX_JSON_DEPTH, which also keeps json's recursion far from its limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from echoserver.wire.shared import SharedMessage

_UTF8_CHARSETS = ("", "utf-8", "utf8", "us-ascii")


class Refused(Exception):
    """A publish request the server will not take: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Arrays and objects nested deeper than this are refused (mixed mode and the publish API).
MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")


class NotJson(ValueError):
    """Text json.loads would take that is not JSON a receiver can rely on."""


def _no_constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise NotJson(f"the number {text[:20]} is out of range")
    return number


# One decoder: json.loads with hooks would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def nested_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit`; free for small text."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in _OPENING:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def load_json(data: bytes, depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads of UTF-8 text for what others will receive; ValueError (NotJson for the
    reasons above, with a message to show) for anything else. `depth`: the nesting allowed
    (a batch's envelope adds its own levels around each message)."""
    if nested_too_deep(data, depth):
        raise NotJson(f"nested deeper than {depth} levels")
    return _DECODER.decode(data.decode())


def mixed_payload(value: Any) -> bytes:
    """A mixed-mode broadcast's payload as the broker keeps it: compact JSON, UTF-8."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape: keep it escaped
        return json.dumps(value, separators=(",", ":")).encode()


def notice(kind: str, **fields: Any) -> bytes:
    """A JSON notice of the server's own to one client: {"type": kind, ...fields}."""
    return json.dumps({"type": kind, **fields}).encode()


def recovery_fields(
    since: int, recovered: bool | None, first: int | None, epoch: str | None = None
) -> dict[str, Any]:
    """What a client resuming after offset `since` is told of its replay (mixed mode's
    {"type":"recovery"}, the event stream's recovery event); `epoch`, the channel's epoch
    that `first` and later offsets belong to (None: the broker could not tell)."""
    return {"recovered": recovered, "since": since, "first": first, "epoch": epoch}


MIXED_BROADCAST = "mixed broadcast"  # the key of mixed_broadcast's bytes in a delivery


def mixed_broadcast(delivery: SharedMessage) -> bytes | None:
    """The mixed-mode envelope of a delivery, built by its first receiver; None for a
    binary message, which mixed mode does not carry. A presence event (a negative offset,
    brokers.base.SIGNAL) is its own envelope: it goes out as it is."""
    if delivery.seq < 0:
        return delivery.data
    if delivery.binary:
        return None
    rendered = delivery.encoded.get(MIXED_BROADCAST)
    if rendered is None:
        # The channel is part of the shared bytes: every receiver of a fan-out is on it.
        rendered = delivery.encoded[MIXED_BROADCAST] = (
            b'{"type":"broadcast","channel":%s,"payload":%s,"offset":%d,"epoch":"%s"}'
            % (
                json.dumps(delivery.channel).encode(),
                delivery.data,
                delivery.seq,
                delivery.epoch.encode(),
            )
        )
    return rendered


def without_signals(delivery: SharedMessage) -> bytes | None:
    """Broadcast mode's payloads where presence events are sent (join_leave namespaces):
    the payload as it is, and None (skipped) for a presence event (a negative offset),
    which a broadcast-mode client could not tell from a message."""
    return None if delivery.seq < 0 else delivery.data


def _media_type(content_type: str | None) -> tuple[str, str]:
    """(media type, charset), both lower case; ("", "") when there is no Content-Type."""
    media, *params = (content_type or "").split(";")
    charset = ""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media.strip().lower(), charset


def _is_json(media: str) -> bool:
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def body_message(body: bytes, content_type: str | None, mixed: bool) -> tuple[bytes, bool]:
    """(data, binary) to publish for a request body; raises Refused.

    text/* and JSON media types are text (UTF-8, checked); anything else, or no
    Content-Type, is binary. In mixed mode the message is the payload's JSON: a JSON body
    as parsed, a text body as a string; binary is refused there, as binary frames are.
    """
    media, charset = _media_type(content_type)
    if not (media.startswith("text/") or _is_json(media)):
        if mixed:
            raise Refused(
                415, "mixed mode carries JSON: send text/* or application/json, not binary"
            )
        return body, True
    if charset not in _UTF8_CHARSETS:
        raise Refused(415, f"text must be UTF-8, not charset {charset}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(415, "the body is not valid UTF-8") from None
    if not mixed:
        return body, False
    if _is_json(media):
        try:
            value = load_json(body)
        except NotJson as error:
            raise Refused(400, f"the body is not valid JSON: {error}") from None
        except ValueError:
            raise Refused(400, "the body is not valid JSON") from None
        return mixed_payload(value), False
    return mixed_payload(text), False

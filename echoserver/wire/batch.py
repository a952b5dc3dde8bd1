"""What a batch publish request is: the body of POST /api/publish, read into messages.

The body is JSON, one of two forms:

- an array of items, each ``{"channel": C, "data": D}`` or ``{"channel": C,
  "data_base64": B}``: one message per item;
- one message to many channels (as Centrifugo's broadcast): ``{"channels": [C, ...],
  "data": D}`` or with ``"data_base64"``.

``data`` is any JSON value: a string is sent as its text, anything else as its compact JSON
text; in mixed mode it is the broadcast's payload, as the one-message API's JSON body.
``data_base64`` is binary, refused in mixed mode (as binary frames are). The whole request
is checked before anything is published: read_batch returns every message or raises
BatchRefused naming the first bad item's index.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from echoserver.routes import CHANNEL_PATTERN
from echoserver.wire.channels import CHANNEL
from echoserver.wire.envelopes import MAX_JSON_DEPTH, NotJson, load_json, mixed_payload

_ITEM_KEYS = ({"channel", "data"}, {"channel", "data_base64"})
_ITEM_FORM = 'an item is {"channel": C, "data": D} or {"channel": C, "data_base64": B}'
_BROADCAST_KEYS = ({"channels", "data"}, {"channels", "data_base64"})


class BatchRefused(Exception):
    """A batch the server will not publish: its HTTP status, why, and the bad item's index
    (None when the request as a whole is refused)."""

    def __init__(self, status: int, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.index = index


def read_batch(
    body: bytes, *, mixed: bool, max_items: int, max_size: int
) -> list[tuple[str, bytes, bool]]:
    """(channel, data, binary) per message, in the request's order; raises BatchRefused."""
    try:
        # Two levels more than a message's own: the array (or object) and its items.
        parsed = load_json(body, MAX_JSON_DEPTH + 2)
    except NotJson as error:
        raise BatchRefused(400, f"the body is not valid JSON: {error}") from None
    except ValueError:
        raise BatchRefused(400, "the body is not valid JSON") from None
    if isinstance(parsed, dict):
        return _broadcast(parsed, mixed, max_items, max_size)
    if not isinstance(parsed, list):
        raise BatchRefused(400, "the body is neither an array of messages nor a broadcast")
    if not parsed:
        raise BatchRefused(400, "no message to publish")
    if len(parsed) > max_items:
        raise BatchRefused(400, f"{len(parsed)} messages, over api.max_batch ({max_items})")
    messages = []
    for index, item in enumerate(parsed):
        if not isinstance(item, dict) or set(item) not in _ITEM_KEYS:
            raise BatchRefused(400, _ITEM_FORM, index)
        channel = _channel(item["channel"], index)
        data, binary = _message(item, mixed, max_size, index)
        messages.append((channel, data, binary))
    return messages


def _broadcast(
    parsed: dict[str, Any], mixed: bool, max_items: int, max_size: int
) -> list[tuple[str, bytes, bool]]:
    if set(parsed) not in _BROADCAST_KEYS:
        raise BatchRefused(
            400, 'a broadcast is {"channels": [C, ...], "data": D} (or "data_base64": B)'
        )
    channels = parsed["channels"]
    if not isinstance(channels, list) or not channels:
        raise BatchRefused(400, '"channels" is a non-empty array of channel names')
    if len(channels) > max_items:
        raise BatchRefused(400, f"{len(channels)} channels, over api.max_batch ({max_items})")
    names = [_channel(channel, index) for index, channel in enumerate(channels)]
    data, binary = _message(parsed, mixed, max_size, None)
    return [(name, data, binary) for name in names]


def _channel(value: Any, index: int) -> str:
    if not isinstance(value, str) or not CHANNEL.fullmatch(value):
        raise BatchRefused(400, f"not a valid channel name (they match {CHANNEL_PATTERN})", index)
    return value


def _message(
    item: dict[str, Any], mixed: bool, max_size: int, index: int | None
) -> tuple[bytes, bool]:
    if "data_base64" in item:
        if mixed:
            raise BatchRefused(400, "mixed mode carries JSON: data_base64 is refused", index)
        encoded = item["data_base64"]
        if not isinstance(encoded, str):
            raise BatchRefused(400, "data_base64 is a base64 string", index)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BatchRefused(400, "data_base64 is not valid base64", index) from None
        binary = True
    else:
        value = item["data"]
        if mixed or not isinstance(value, str):
            data = mixed_payload(value)
        else:
            try:
                data = value.encode()
            except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
                raise BatchRefused(400, "data is not valid UTF-8 text", index) from None
        binary = False
    if len(data) > max_size:
        raise BatchRefused(
            400, f"the message is over websocket.max_message_size ({max_size} bytes)", index
        )
    return data, binary

"""The opening handshake's decisions, without a socket: upgrade checks, origins, tokens."""

from __future__ import annotations

import base64

import pytest
from tornado.httputil import HTTPHeaders

from echoserver.wire.handshake import (
    accept_value,
    bearer_token,
    check_upgrade,
    origin_allowed,
    request_origin,
    token_matches,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()


def headers(**values: str) -> HTTPHeaders:
    base = {
        "Host": "127.0.0.1:8888",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    base.update({k.replace("_", "-"): v for k, v in values.items()})
    return HTTPHeaders({k: v for k, v in base.items() if v != "-"})


def test_rfc_example_accept_value() -> None:
    # RFC 6455 section 1.3
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_valid_upgrade_passes() -> None:
    assert check_upgrade("GET", headers().get) is None
    assert check_upgrade("GET", headers(Sec_WebSocket_Version="8").get) is None


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"Upgrade": "h2c"}, 400),
        ({"Upgrade": "-"}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Sec_WebSocket_Key": "-"}, 400),
        ({"Sec_WebSocket_Key": "short"}, 400),
        ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 15).decode()}, 400),
        ({"Host": "-"}, 400),
        ({"Sec_WebSocket_Version": "99"}, 426),
        ({"Sec_WebSocket_Version": "-"}, 426),
    ],
)
def test_bad_upgrades_are_refused(changes: dict[str, str], status: int) -> None:
    refusal = check_upgrade("GET", headers(**changes).get)
    assert refusal is not None and refusal.status == status


def test_only_get_upgrades() -> None:
    refusal = check_upgrade("POST", headers().get)
    assert refusal is not None and refusal.status == 405


def test_origin_falls_back_to_sec_websocket_origin() -> None:
    assert request_origin(headers(Origin="http://a.example").get) == "http://a.example"
    old_draft = headers(Sec_WebSocket_Origin="http://b.example", Sec_WebSocket_Version="8")
    assert request_origin(old_draft.get) == "http://b.example"
    assert request_origin(headers().get) is None


HOST = "127.0.0.1:8888"


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, [], True),  # not a browser
        ("http://127.0.0.1:8888", [], True),  # same host
        ("http://127.0.0.1:8888/", [], True),
        ("http://127.0.0.1:9999", [], False),
        ("https://evil.example", [], False),
        ("null", [], False),
        ("http://[", [], False),  # malformed: refused, never an error
        ("", [], False),
        ("http://127.0.0.1:8888", ["https://app.example"], False),  # the list is the list
        ("https://app.example", ["https://app.example"], True),
        ("HTTPS://APP.EXAMPLE/", ["https://app.example"], True),
        ("https://evil.example", ["*"], True),
        ("http://[", ["*"], True),
    ],
)
def test_origin_policy(origin: str | None, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, frozenset(allowed), HOST) is ok


def test_tokens() -> None:
    assert bearer_token("Bearer s3cret") == "s3cret"
    assert bearer_token("bearer s3cret") == "s3cret"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
    assert bearer_token("Bearerabc") is None  # another scheme's name
    # The scheme with no token (what "Bearer " is once trailing space is stripped): an
    # empty, so wrong, credential, not an absent one.
    assert bearer_token("Bearer") == ""
    assert bearer_token("Bearer ") == ""
    assert bearer_token("Bearer  s3cret") == " s3cret"  # not the token: nothing is trimmed
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cre", "s3cret")
    assert not token_matches("", "s3cret")

"""The page with JWT connection tokens, in a real browser: Playwright driving Debian's
Chromium against `python -m echoserver --auth-jwt-secret ...`, tokens made here with PyJWT.

What the page decodes of a token is display only (the server verifies); these tests check it
shows the user and the expiry, warns before the expiry, refreshes in mixed mode, and waits
for the user after a 4001 (token expired), a 4003 (disconnected by the server) or a 401.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import pytest

from tests import test_browser as harness
from tests.test_browser import Tab, start_server

jwt = pytest.importorskip("jwt")

pytestmark = pytest.mark.browser

# The page harness of tests/test_browser.py: one Chromium per module, tabs that collect errors.
browser = harness.browser
tabs = harness.tabs

SECRET = "browser-test-secret-0123456789abcdef"
CLOCK_RE = re.compile(r"^\d\d:\d\d:\d\d$")


def make_token(sub: str = "alice", ttl: float | None = 3600, secret: str = SECRET, **claims) -> str:
    """An HS256 JWT for `sub` expiring `ttl` seconds from now (None: no exp)."""
    now = int(time.time())
    body: dict = {"sub": sub, "iat": now, **claims}
    if ttl is not None:
        body["exp"] = now + ttl
    return jwt.encode(body, secret, algorithm="HS256")


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def iso_utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.fixture(scope="module")
def plain_echo():
    """A server without tokens: the page still decodes what is in its field."""
    server = start_server("echo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_mixed():
    server = start_server("mixed")
    yield server
    server.stop()


def fill_token(t: Tab, token: str) -> None:
    t.page.fill("#token", token)


# ---------------------------------------------------------------- display only


def test_page_shows_sub_and_expiry_of_a_jwt(tabs, plain_echo):
    t = tabs().open(plain_echo)
    page = t.page
    assert page.is_hidden("#jwt-claims")
    token = make_token("alice", ttl=3600)
    fill_token(t, token)
    page.wait_for_selector("#jwt-claims:not([hidden])")
    assert page.text_content("#jwt-sub") == "alice"
    assert page.get_attribute("#jwt-exp", "datetime") == iso_utc(claims_of(token)["exp"])
    assert CLOCK_RE.match(page.text_content("#jwt-exp"))
    left = page.text_content("#jwt-left")
    assert re.fullmatch(r"\((in 59 min \d\d s|in 1 h 00 min)\)", left), left
    # A live countdown.
    page.wait_for_function("s => document.querySelector('#jwt-left').textContent !== s", arg=left)
    assert page.get_attribute("#jwt-claims", "data-expired") == "false"

    # Not JWT-shaped, or parts that are not JSON: nothing special (the server decides).
    for junk in ("s3cret", "abc.def.ghi", "a.b", token + ".x", "!!!." + token.split(".", 1)[1]):
        fill_token(t, junk)
        page.wait_for_selector("#jwt-claims", state="hidden")

    # An expired token says so; a token without exp says it has none.
    fill_token(t, make_token("bob", ttl=-30))
    page.wait_for_selector('#jwt-claims[data-expired="true"]')
    assert re.fullmatch(r"\(expired \d+ s ago\)", page.text_content("#jwt-left"))
    fill_token(t, make_token("carol", ttl=None))
    page.wait_for_selector("#jwt-noexp:not([hidden])")
    assert page.text_content("#jwt-sub") == "carol"
    assert page.is_hidden("#jwt-exp-wrap")
    t.shot("desktop-jwt-claims.png")


def test_claims_are_shown_as_text_never_markup(tabs, plain_echo):
    t = tabs().open(plain_echo)
    page = t.page
    hostile = '<img src=x onerror="window.__pwned = 1"><b>eve</b>'
    fill_token(t, make_token(hostile))
    page.wait_for_selector("#jwt-claims:not([hidden])")
    assert page.text_content("#jwt-sub") == hostile
    assert page.locator("#jwt-claims img, #jwt-claims b").count() == 0
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None


def test_warning_before_expiry_while_connected(tabs, plain_echo):
    """The page's own clock drives the warning: a server without tokens ignores the JWT, so
    the connection outlives it and the warning goes on to say the token has expired."""
    t = tabs().open(plain_echo)
    page = t.page
    page.click("#disconnect")
    t.wait_state("closed")
    fill_token(t, make_token("alice", ttl=3))
    page.click("#connect")
    t.wait_state("open")
    page.wait_for_selector("#token-warning:not([hidden])", timeout=5_000)
    assert page.get_attribute("#token-warning-text", "aria-live") == "polite"
    assert "expires soon" in page.text_content("#token-warning-text")
    assert "press Connect" in page.text_content("#token-warning-hint")
    page.wait_for_function(
        "document.querySelector('#token-warning-text').textContent.includes('expired at')",
        timeout=5_000,
    )
    # Disconnecting ends the warning: it is about the open connection's token.
    page.click("#disconnect")
    t.wait_state("closed")
    assert page.is_hidden("#token-warning")


def test_refresh_button_only_in_mixed_mode_with_a_jwt(tabs, plain_echo, plain_mixed):
    e = tabs().open(plain_echo)
    assert e.page.is_hidden("#refresh-token")
    m = tabs().open(plain_mixed)
    page = m.page
    assert page.is_visible("#refresh-token")
    assert page.is_disabled("#refresh-token")
    fill_token(m, "not-a-jwt")
    assert page.is_disabled("#refresh-token")
    fill_token(m, make_token("alice"))
    page.wait_for_selector("#refresh-token:not([disabled])")
    page.click("#disconnect")
    m.wait_state("closed")
    assert page.is_disabled("#refresh-token")

"""The page with JWT connection tokens, in a real browser: Playwright driving Debian's
Chromium against `python -m echoserver --auth-jwt-secret ...`, tokens made here with PyJWT.

What the page decodes of a token is display only (the server verifies); these tests check it
shows the user and the expiry, warns before the expiry, refreshes in mixed mode, and waits
for the user after a 4001 (token expired), a 4003 (disconnected by the server) or a 401.
"""

from __future__ import annotations

import re
import time
import urllib.request
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


# ---------------------------------------------------------------- against a JWT server


def jwt_server(mode: str, *args: str):
    """A server whose connection tokens are JWTs signed with SECRET, closing a connection
    the moment its token expires (no leeway)."""
    return start_server(mode, "--auth-jwt-secret", SECRET, "--auth-leeway", "0", *args)


@pytest.fixture(scope="module")
def jwt_mixed():
    server = jwt_server("mixed", "--api-key", API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jwt_echo():
    server = jwt_server("echo")
    yield server
    server.stop()


API_KEY = "browser-test-api-key"


def refused_at_load(t: Tab, server) -> None:
    """Open the page: with no token yet its first attempt is refused (401) and it waits."""
    t.page.goto(server.url + "/")
    t.page.wait_for_function(
        "document.querySelector('#status').textContent.includes('token required')"
    )


def connect_with(t: Tab, token: str) -> None:
    t.page.fill("#token", token)
    t.page.click("#connect")
    t.wait_state("open")


def connected_count(t: Tab) -> int:
    return t.page.locator('#log .entry[data-dir="sys"]', has_text="Connected to").count()


def assert_waits_for_the_user(t: Tab, connections: int, ms: int = 2500) -> None:
    """Auto-reconnect is on, yet nothing is retried for a while."""
    assert t.page.is_checked("#reconnect")
    t.page.wait_for_timeout(ms)
    assert t.page.text_content("#retry") == ""
    assert t.page.get_attribute("#status", "data-state") == "closed"
    assert connected_count(t) == connections
    assert not t.page.is_disabled("#connect")


def test_jwt_server_label_and_refused_tokens_wait_for_the_user(tabs, jwt_mixed):
    t = tabs()
    refused_at_load(t, jwt_mixed)
    page = t.page
    assert page.text_content("#token-need") == "(a JWT, required)"
    # Signed with another secret: 401, said so, no retry.
    forged = make_token("alice", secret="another-secret-0123456789abcdefgh")
    page.fill("#token", forged)
    page.click("#connect")
    page.locator('#log .entry[data-dir="error"]', has_text="wrong token (401)").wait_for()
    page.wait_for_function(
        "document.querySelector('#status').textContent.includes('token refused')"
    )
    assert page.get_attribute("#token", "aria-invalid") == "true"
    assert_waits_for_the_user(t, 0, ms=1500)
    # Genuine but expired: the hint says when it expired.
    page.fill("#token", make_token("alice", ttl=-60))
    page.click("#connect")
    page.locator('#log .entry[data-dir="error"]', has_text="the token expired (401)").wait_for()
    assert "expired at" in page.text_content("#hint")
    # A good one connects, and the page shows whom it names.
    connect_with(t, make_token("alice", ttl=600))
    assert page.text_content("#jwt-sub") == "alice"
    assert page.get_attribute("#token", "aria-invalid") is None
    assert page.is_hidden("#hint")


def test_expiry_warns_then_4001_and_no_reconnect(tabs, jwt_echo):
    t = tabs()
    refused_at_load(t, jwt_echo)
    page = t.page
    # The warning shows for the last fifth of the token's life, under a second here: the
    # page records each time it appears, so a busy machine cannot make the test miss it.
    page.evaluate(
        """() => {
            window.warnings = [];
            const box = document.querySelector('#token-warning');
            new MutationObserver(() => {
                if (!box.hidden) window.warnings.push(box.textContent.replace(/\\s+/g, ' '));
            }).observe(box, { attributes: true, attributeFilter: ['hidden'] });
        }"""
    )
    connect_with(t, make_token("alice", ttl=4))
    assert page.text_content("#jwt-sub") == "alice"
    # 4001 at exp: said in the log, the status and the hint.
    t.wait_state("closed", timeout=6_000)
    # The warning, with its countdown, came before the server closed the connection.
    warnings = page.evaluate("window.warnings")
    assert len(warnings) == 1, warnings
    assert "expires soon" in warnings[0], warnings
    assert re.search(r"in \d s", warnings[0]) and "press Connect" in warnings[0], warnings
    page.locator('#log .entry[data-dir="error"]', has_text="4001").wait_for()
    assert "token expired" in page.text_content("#status")
    assert "Paste a new token" in page.text_content("#hint")
    assert page.get_attribute("#token", "aria-invalid") == "true"
    assert page.is_hidden("#token-warning")
    t.shot("desktop-jwt-expired.png")
    # No reconnect loop with the same expired token.
    assert_waits_for_the_user(t, 1)
    # A new token connects again.
    connect_with(t, make_token("alice", ttl=600))
    assert page.is_hidden("#hint")


def test_refresh_keeps_the_connection_past_the_first_expiry(tabs, jwt_mixed):
    t = tabs()
    refused_at_load(t, jwt_mixed)
    page = t.page
    first = make_token("alice", ttl=4)
    connect_with(t, first)
    assert page.is_visible("#refresh-token") and page.is_enabled("#refresh-token")
    second = make_token("alice", ttl=120)
    page.fill("#token", second)
    page.click("#refresh-token")
    refreshed = t.entry("in", "Token refreshed").first
    assert refreshed.locator(".tag").text_content() == "refreshed"
    assert t.entry("out", "New token for alice").count() == 1
    # The token itself never reaches the log.
    assert second not in page.text_content("#log")
    # Past the first token's expiry: still open, still answering.
    wait_ms = (claims_of(first)["exp"] + 1.5 - time.time()) * 1000
    page.wait_for_timeout(max(0, wait_ms))
    assert page.get_attribute("#status", "data-state") == "open"
    assert page.is_hidden("#token-warning")
    page.select_option("#envelope", "echo")
    t.send("still here")
    t.entry("in", "still here")
    assert connected_count(t) == 1
    # A token for another user is refused; the connection and its expiry stay.
    page.fill("#token", make_token("mallory", ttl=120))
    page.click("#refresh-token")
    bad = page.locator('#log .entry[data-dir="error"]', has_text="another user").first
    bad.wait_for()
    assert bad.locator(".tag").text_content() == "refresh refused"
    assert page.get_attribute("#status", "data-state") == "open"
    t.shot("desktop-jwt-refreshed.png")


def test_4003_disconnect_waits_for_the_user(tabs, jwt_mixed):
    t = tabs()
    refused_at_load(t, jwt_mixed)
    page = t.page
    connect_with(t, make_token("dave", ttl=600))
    request = urllib.request.Request(
        jwt_mixed.url + "/api/users/dave/connections",
        method="DELETE",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202
    t.wait_state("closed")
    page.locator('#log .entry[data-dir="error"]', has_text="4003").wait_for()
    assert "disconnected by the server" in page.text_content("#status")
    assert "4003" in page.text_content("#hint")
    assert_waits_for_the_user(t, 1)
    page.click("#connect")
    t.wait_state("open")


def test_guests_welcome_label(tabs):
    """With auth.anonymous a client without a token joins as a guest: the label says so."""
    server = jwt_server("mixed", "--auth-anonymous")
    try:
        t = tabs().open(server)
        assert t.page.text_content("#token-need") == "(a JWT, or none to join as a guest)"
        assert t.page.is_hidden("#jwt-claims")
    finally:
        server.stop()


def test_a_channel_the_token_does_not_open_is_403_and_waits_for_the_user(tabs, tmp_path):
    """Another user's personal channel: 403, said so, and not retried (it will not change)."""
    config = tmp_path / "namespaces.toml"
    config.write_text('[[namespaces]]\npattern = "user.{sub}"\nsubscribe = "user"\n')
    server = jwt_server("broadcast", "--config", str(config))
    try:
        t = tabs()
        refused_at_load(t, server)
        page = t.page
        page.fill("#channel", "user.bob")
        page.fill("#token", make_token("alice", ttl=600))
        page.click("#connect")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('not allowed')"
        )
        assert "does not allow this channel" in page.text_content("#hint")
        assert_waits_for_the_user(t, 0, ms=1500)
        page.fill("#channel", "user.alice")  # her own
        page.click("#connect")
        t.wait_state("open")
    finally:
        server.stop()

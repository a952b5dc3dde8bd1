"""The page in a real browser: Playwright driving Debian's Chromium against `python -m echoserver`.

Never downloads a browser: without /usr/bin/chromium these tests skip (fail when $CI is set).
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers import ROOT, ServerProcess

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
RTT_RE = re.compile(r"RTT \d+(\.\d+)? ms")


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason)


# ---------------------------------------------------------------- server subprocess


def start_server(mode: str, *args: str) -> ServerProcess:
    """`python -m echoserver --mode MODE ARGS`, its log also in tests/artifacts/, once healthy."""
    return ServerProcess(["--mode", mode, *args], log_dir=ARTIFACTS).wait_healthy()


def _serve(mode: str):
    server = start_server(mode)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo_server():
    yield from _serve("echo")


@pytest.fixture(scope="module")
def broadcast_server():
    yield from _serve("broadcast")


@pytest.fixture(scope="module")
def mixed_server():
    yield from _serve("mixed")


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} not found: install Debian's chromium (no playwright install)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the python package `playwright` is not installed")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A page in its own context, with console errors and uncaught exceptions collected."""

    def __init__(self, browser, viewport=DESKTOP, bypass_csp=True):
        # The page's Content-Security-Policy forbids eval, which page.wait_for_function uses
        # to run its expression; tests/test_hostile_web.py runs the page with the policy on.
        self.context = browser.new_context(viewport=viewport, bypass_csp=bypass_csp)
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def open(self, server: ServerProcess, query: str = "") -> Tab:
        self.page.goto(server.url + "/" + query)
        self.wait_state("open")
        return self

    def wait_state(self, state: str, timeout: float = 10_000) -> None:
        self.page.wait_for_selector(f'#status[data-state="{state}"]', timeout=timeout)

    def send(self, text: str) -> None:
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")

    def entry(self, direction: str, text: str):
        loc = self.page.locator(f'#log .entry[data-dir="{direction}"]', has_text=text)
        loc.first.wait_for()
        return loc

    def count(self, direction: str) -> int:
        return self.page.locator(f'#log .entry[data-dir="{direction}"]').count()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser):
    opened: list[Tab] = []

    def make(viewport=DESKTOP) -> Tab:
        t = Tab(browser, viewport)
        opened.append(t)
        return t

    yield make
    for t in opened:
        t.close()
    # Whatever else a test checks, the page must never throw.
    assert [e for t in opened for e in t.page_errors] == []


# ---------------------------------------------------------------- tests


def test_page_loads_clean_and_shows_mode(tabs, echo_server):
    t = tabs().open(echo_server)
    page = t.page
    assert page.text_content("#mode").strip() == "echo"
    assert page.title().endswith("echoserver")
    # The stylesheet and script came from /static/ (the pill is styled, the status is live).
    radius = page.eval_on_selector(
        "#status", "e => parseFloat(getComputedStyle(e).borderTopLeftRadius)"
    )
    assert radius > 5
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert "Open" in page.text_content("#status")
    # Echo mode: /ws, no channel or envelope controls on show.
    assert page.text_content("#url").endswith(f"127.0.0.1:{echo_server.port}/ws")
    assert not page.is_visible("#channel")
    assert not page.is_visible("#envelope")
    # Every form control has a <label for>.
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
              .filter(e => !e.id || !document.querySelector(`label[for="${e.id}"]`))
              .map(e => e.id || e.outerHTML)"""
    )
    assert unlabeled == []
    page.wait_for_timeout(300)  # let any late asset/script error surface
    assert t.console_errors == [] and t.page_errors == []


def test_enter_sends_and_echo_shows_rtt(tabs, echo_server):
    t = tabs().open(echo_server)
    t.send("hello browser")
    t.entry("out", "hello browser")
    echoed = t.entry("in", "hello browser").first
    assert RTT_RE.search(echoed.locator(".rtt").text_content())
    assert "13 B" in echoed.text_content() and "text" in echoed.text_content()
    assert t.page.input_value("#message") == ""
    t.shot("desktop-echo.png")
    assert t.console_errors == []


def test_shift_enter_inserts_newline(tabs, echo_server):
    t = tabs().open(echo_server)
    page = t.page
    page.click("#message")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#message") == "line one\nline two"
    page.wait_for_timeout(300)
    assert t.count("out") == 0 and t.count("in") == 0
    page.keyboard.press("Enter")
    echoed = t.entry("in", "line two").first
    assert echoed.locator(".content").text_content() == "line one\nline two"
    assert t.count("out") == 1


def test_binary_hex_and_base64_round_trip(tabs, echo_server):
    t = tabs().open(echo_server)
    page = t.page
    page.select_option("#msgtype", "binary")
    page.select_option("#encoding", "hex")
    t.send("deadbeef")
    for direction in ("out", "in"):
        e = page.locator(f'#log .entry[data-dir="{direction}"]').first
        e.wait_for()
        assert e.locator(".kind").text_content() == "binary"
        assert e.locator(".size").text_content() == "4 B"
        assert re.sub(r"\s", "", e.locator(".content").text_content()) == "deadbeef"
    assert RTT_RE.search(page.locator('#log .entry[data-dir="in"] .rtt').first.text_content())
    # The same bytes as base64.
    page.select_option("#encoding", "base64")
    t.send("3q2+7w==")
    page.wait_for_function("document.querySelectorAll('#log .entry[data-dir=\"in\"]').length === 2")
    last = page.locator('#log .entry[data-dir="in"]').nth(1)
    assert re.sub(r"\s", "", last.locator(".content").text_content()) == "deadbeef"
    # Bad hex is refused in the page, nothing is sent.
    page.select_option("#encoding", "hex")
    t.send("abc")
    assert "even number" in page.text_content("#compose-error")
    page.wait_for_timeout(200)
    assert t.count("out") == 2


def test_broadcast_two_pages_see_each_other(tabs, broadcast_server):
    a = tabs().open(broadcast_server, "?channel=room-1")
    b = tabs().open(broadcast_server, "?channel=room-1")
    other = tabs().open(broadcast_server, "?channel=elsewhere")
    assert a.page.text_content("#mode").strip() == "broadcast"
    assert a.page.text_content("#url").endswith("/ws/room-1")
    a.send("hello from A")
    b.entry("in", "hello from A")
    a.entry("in", "hello from A")  # include_sender is on by default
    b.send("hello from B")
    a.entry("in", "hello from B")
    # Live member count from /api/channels/<channel>, polled while open.
    for t in (a, b):
        t.page.wait_for_function("document.querySelector('#members').textContent.trim() === '2'")
    # Another channel hears nothing.
    other.page.wait_for_timeout(300)
    assert other.count("in") == 0
    # Editing the channel reconnects to the new one.
    b.page.fill("#channel", "elsewhere")
    b.page.press("#channel", "Enter")
    b.page.wait_for_function("document.querySelector('#url').textContent.endsWith('/ws/elsewhere')")
    b.wait_state("open")
    other.send("moved")
    b.entry("in", "moved")


def test_mixed_mode_envelopes(tabs, mixed_server):
    t = tabs().open(mixed_server)
    page = t.page
    assert page.text_content("#mode").strip() == "mixed"
    assert page.is_visible("#envelope")
    page.select_option("#envelope", "echo")
    t.send("ping mixed")
    e = t.entry("in", "ping mixed").first
    assert e.locator(".tag").text_content() == "echo"
    assert RTT_RE.search(e.locator(".rtt").text_content())
    page.select_option("#envelope", "broadcast")
    t.send("to everyone")
    t.page.locator('#log .entry[data-dir="in"] .tag', has_text="broadcastResult").wait_for()
    result = page.locator('#log .entry[data-dir="in"]', has_text="broadcastResult").first
    assert "1 listener" in result.text_content()
    assert RTT_RE.search(result.locator(".rtt").text_content())
    t.shot("desktop-mixed.png")


def test_reconnects_after_server_restart(tabs):
    server = start_server("echo")
    try:
        t = tabs().open(server)
        assert t.page.is_checked("#reconnect")
        # Record every status change and countdown text from now on.
        t.page.evaluate(
            """() => {
                 window.__seen = [];
                 const note = () => window.__seen.push(
                   document.querySelector('#status').dataset.state + '|' +
                   document.querySelector('#retry').textContent);
                 new MutationObserver(note).observe(document.querySelector('header'),
                   {subtree: true, childList: true, characterData: true, attributes: true});
               }"""
        )
        server.kill()
        t.wait_state("closed")
        server.restart().wait_healthy()
        t.wait_state("open", timeout=20_000)  # no click: the page reconnected by itself
        seen = t.page.evaluate("window.__seen")
        states = [s.split("|")[0] for s in seen]
        assert "closed" in states and states[-1] == "open"
        assert states.index("closed") < len(states) - 1
        assert any(s.startswith("closed|retrying in") for s in seen), seen
        t.entry("sys", "Connection closed")
        t.send("after restart")
        t.entry("in", "after restart")
        assert t.page_errors == []
    finally:
        server.stop()


def test_token_hint_and_reconnect_switch(tabs):
    server = start_server("echo", "--auth-token", "s3cret")
    try:
        t = tabs()
        t.page.goto(server.url + "/")
        # Refused at the handshake (401): closed before opening, with a hint about the token.
        t.page.wait_for_selector("#hint:not([hidden])")
        assert "token" in t.page.text_content("#hint").lower()
        t.wait_state("closed")
        # Switching auto-reconnect off stops the retries.
        t.page.uncheck("#reconnect")
        t.page.wait_for_function("document.querySelector('#retry').textContent === ''")
        t.page.wait_for_timeout(1200)
        assert t.page.get_attribute("#status", "data-state") == "closed"
        t.page.fill("#token", "s3cret")
        t.page.click("#connect")
        t.wait_state("open")
        assert t.page.is_hidden("#hint")
        shown_url = t.page.text_content("#url")
        assert "token=" in shown_url and "s3cret" not in shown_url  # the token is masked
        t.send("with token")
        t.entry("in", "with token")
        # Disconnect is final: no reconnect, even with auto-reconnect back on.
        t.page.check("#reconnect")
        t.page.click("#disconnect")
        t.wait_state("closed")
        t.page.wait_for_timeout(1000)
        assert t.page.get_attribute("#status", "data-state") == "closed"
        assert "1000" in t.page.text_content("#status")
    finally:
        server.stop()


def test_layout_fits_390px(tabs, echo_server, broadcast_server):
    long_channel = "c" * 64
    for server, query, name in (
        (echo_server, "", "phone-echo.png"),
        (broadcast_server, f"?channel={long_channel}", "phone-broadcast.png"),
    ):
        t = tabs(PHONE).open(server, query)
        t.send("x" * 300)  # a long unbreakable message
        t.entry("in", "xxxxxxxx")
        t.page.fill("#filter", "")
        width = t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"horizontal scroll at 390px: scrollWidth={width}"
        t.shot(name)


def test_log_is_bounded_under_flood(tabs, broadcast_server):
    t = tabs().open(broadcast_server, "?channel=flood")
    # A second client in the same channel floods it with 5000 messages.
    t.page.evaluate(
        """() => new Promise(resolve => {
             const w = new WebSocket(`ws://${location.host}/ws/flood`);
             w.onopen = () => { for (let i = 0; i < 5000; i++) w.send('flood ' + i); resolve(); };
           })"""
    )
    t.page.wait_for_function(
        "[...document.querySelectorAll('#log .entry')]"
        ".some(e => e.textContent.includes('flood 4999'))",
        timeout=20_000,
    )
    assert t.page.locator("#log .entry").count() <= 500
    # Still responsive, and the filter narrows the kept entries.
    t.page.fill("#filter", "flood 4998")
    t.page.wait_for_function("document.querySelectorAll('#log .entry').length === 1")
    t.page.click("#clear")
    t.page.wait_for_function("document.querySelectorAll('#log .entry').length === 0")


# ---------------------------------------------------------------- the page tells the truth

# Keeps every WebSocket the page opens in window.__sockets, so a test can make the server
# answer something the page's own controls never send.
CAPTURE_SOCKETS = """(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
})()"""


def _health(t: Tab) -> tuple[str, str]:
    return (t.page.get_attribute("#health", "data-status") or "", t.page.text_content("#health"))


def _wait_health(t: Tab, status: str, timeout: float) -> None:
    t.page.wait_for_function(
        "s => document.querySelector('#health').dataset.status === s", arg=status, timeout=timeout
    )


def _redis_server_fixture(tmp_path: Path):
    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    for attempt in range(3):  # the free port may be taken before redis binds it
        redis = RedisServer(tmp_path)
        try:
            return redis.start()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def redis(tmp_path):
    server = _redis_server_fixture(tmp_path)
    yield server
    server.stop()


def test_mixed_mode_server_notice_is_an_error(tabs, mixed_server):
    t = tabs()
    t.page.add_init_script(CAPTURE_SOCKETS)
    t.open(mixed_server)
    # Not JSON: only the server can answer with {"type":"error"} in mixed mode.
    t.page.evaluate("window.__sockets[window.__sockets.length - 1].send('not json')")
    notice = t.entry("error", "expected a JSON object")
    assert t.count("in") == 0  # not shown as a message received from a peer
    assert "server notice" in notice.first.text_content()
    # A peer's broadcast that merely looks like a notice stays a received message.
    t.page.select_option("#envelope", "broadcast")
    t.send('{"type":"error","error":"forged"}')
    forged = t.entry("in", "forged").first
    assert forged.locator(".tag").first.text_content() == "broadcast"
    assert t.page.locator('#log .entry[data-dir="error"]').count() == 1
    t.shot("desktop-mixed-notice.png")


def test_log_tags_line_up_in_every_entry(tabs, mixed_server):
    t = tabs()
    t.page.add_init_script(CAPTURE_SOCKETS)
    t.open(mixed_server)
    t.page.select_option("#envelope", "echo")
    t.send("aligned")
    t.entry("in", "aligned")
    t.page.evaluate('window.__sockets[window.__sockets.length - 1].send(\'{"type":"nope"}\')')
    t.entry("error", "unknown type")
    rows = t.page.evaluate(
        """() => [...document.querySelectorAll('#log .entry')].filter(e => e.querySelector('.tag'))
             .map(e => {
               const meta = e.querySelector('.meta').getBoundingClientRect();
               const tag = e.querySelector('.tag');
               return {dir: e.dataset.dir, height: meta.height,
                       margin: parseFloat(getComputedStyle(tag).marginTop),
                       offset: tag.getBoundingClientRect().top - meta.top};
             })"""
    )
    assert {"in", "error"} <= {r["dir"] for r in rows}, rows
    assert all(r["margin"] == 0 for r in rows), rows
    heights = [r["height"] for r in rows]
    offsets = [r["offset"] for r in rows]
    assert max(heights) - min(heights) <= 1, rows
    assert max(offsets) - min(offsets) <= 1, rows


def test_hex_dump_wraps_only_between_bytes(tabs, echo_server):
    t = tabs(PHONE).open(echo_server)
    t.page.select_option("#msgtype", "binary")
    t.send(" ".join(f"{i % 256:02x}" for i in range(300)))  # 256 shown, "+44 more bytes"
    t.page.locator('#log .entry[data-dir="in"] .content').first.wait_for()
    # Wherever a line ends depends on the width: try several, one character apart and more.
    for width in (*range(360, 400, 3), 1280):
        t.page.set_viewport_size({"width": width, "height": 844})
        split = t.page.evaluate(SPLIT_TOKENS)
        assert split == [], f"tokens split across lines at {width}px: {split}"
    t.page.set_viewport_size(PHONE)
    assert "+44 more bytes" in t.page.text_content('#log .entry[data-dir="in"] .content')
    t.shot("phone-hex.png")


SPLIT_TOKENS = r"""() => {
          const broken = [];
          for (const pre of document.querySelectorAll('#log .entry .content.hex')) {
            const walker = document.createTreeWalker(pre, NodeFilter.SHOW_TEXT);
            for (let node; (node = walker.nextNode()); ) {
              for (const m of node.data.matchAll(/\S+/g)) {
                const r = document.createRange();
                r.setStart(node, m.index);
                r.setEnd(node, m.index + m[0].length);
                const tops = new Set([...r.getClientRects()].map(c => Math.round(c.top)));
                if (tops.size > 1) broken.push(m[0]);
              }
            }
          }
          return broken;
        }"""


def test_mixed_mode_offers_text_only(tabs, mixed_server, echo_server):
    t = tabs().open(mixed_server)
    page = t.page
    # Nothing on show lets the user pick what the server always refuses.
    assert not page.is_visible("#msgtype") and not page.is_visible("#file")
    assert not page.is_visible("#encoding")
    assert page.eval_on_selector("#msgtype", "s => s.value") == "text"
    assert page.eval_on_selector('#msgtype option[value="binary"]', "o => o.disabled")
    t.shot("desktop-mixed-compose.png")
    # Echo mode still offers binary and files.
    e = tabs().open(echo_server)
    assert e.page.is_visible("#msgtype") and e.page.is_visible("#file")
    assert not e.page.eval_on_selector('#msgtype option[value="binary"]', "o => o.disabled")


def _empty_text(t: Tab) -> str:
    return t.page.evaluate("getComputedStyle(document.querySelector('#log'), '::before').content")


def test_filter_without_match_says_so(tabs, echo_server):
    t = tabs().open(echo_server)
    t.send("findable")
    t.entry("in", "findable")
    t.page.fill("#filter", "nothing-like-this")
    t.page.wait_for_function("document.querySelectorAll('#log .entry').length === 0")
    assert _empty_text(t) == '"No messages match the filter."'
    t.page.fill("#filter", "findable")
    t.page.wait_for_function("document.querySelectorAll('#log .entry').length === 2")
    t.page.fill("#filter", "")
    t.page.click("#clear")
    t.page.wait_for_function("document.querySelectorAll('#log .entry').length === 0")
    assert _empty_text(t) == '"No messages yet."'


def test_refused_token_waits_for_the_user(tabs):
    server = start_server("echo", "--auth-token", "s3cret")
    try:
        t = tabs()
        t.page.goto(server.url + "/")
        t.page.wait_for_selector("#hint:not([hidden])")
        assert "requires a token" in t.page.text_content("#hint")
        assert "required" in t.page.text_content("#token-need")
        assert "optional" not in t.page.text_content('label[for="token"]')
        assert t.page.get_attribute("#token", "aria-invalid") == "true"
        t.page.locator('#log .entry[data-dir="error"]', has_text="401").wait_for()
        # Auto-reconnect stays on, yet nothing is retried: a token does not appear by itself.
        assert t.page.is_checked("#reconnect")
        t.page.wait_for_timeout(4000)
        assert t.page.text_content("#retry") == ""
        assert t.page.get_attribute("#status", "data-state") == "closed"
        assert "token required" in t.page.text_content("#status")
        assert t.page.locator("#log .entry", has_text="Could not connect").count() == 1
        assert not t.page.is_disabled("#connect")
        # A wrong token: refused again, said so, still waiting.
        t.page.fill("#token", "wrong")
        t.page.click("#connect")
        t.page.locator('#log .entry[data-dir="error"]', has_text="wrong token").wait_for()
        t.page.wait_for_function(
            "document.querySelector('#status').textContent.includes('token refused')"
        )
        t.shot("desktop-token-refused.png")
        t.page.fill("#token", "s3cret")
        t.page.click("#connect")
        t.wait_state("open")
        assert t.page.get_attribute("#token", "aria-invalid") is None
        assert "required" in t.page.text_content("#token-need")
    finally:
        server.stop()


def _healthz_with_auth(auth: bool):
    def handle(route) -> None:
        from playwright.sync_api import Error

        try:
            response = route.fetch()  # the real server's answer, plus the field
            body = response.json()
            body["auth"] = auth
            route.fulfill(response=response, json=body)
        except Error:
            pass  # the page closed while its poll was in flight: nothing left to answer

    return handle


def test_token_label_follows_healthz_auth_field(tabs, echo_server):
    """A server that says in /healthz whether it wants a token is believed before any attempt."""
    for auth, expected in ((True, "(required)"), (False, "(not required)")):
        t = tabs()
        t.page.route("**/healthz", _healthz_with_auth(auth))
        t.page.goto(echo_server.url + "/")
        t.page.wait_for_function(
            "s => document.querySelector('#token-need').textContent === s", arg=expected
        )
        # The page keeps polling /healthz: no handler may be left for a closing page.
        t.page.unroute_all(behavior="ignoreErrors")


def test_not_connected_error_clears_once_connected(tabs, echo_server):
    t = tabs().open(echo_server)
    t.page.click("#disconnect")
    t.wait_state("closed")
    t.send("too early")
    assert "press Connect first" in t.page.text_content("#compose-error")
    t.page.click("#connect")
    t.wait_state("open")
    t.page.wait_for_selector("#compose-error", state="hidden")
    t.send("now")
    t.entry("in", "now")


def test_health_line_follows_a_broker_outage(tabs, redis):
    server = start_server("mixed", "--broker", redis.url)
    try:
        t = tabs().open(server)
        phone = tabs(PHONE).open(server)
        _wait_health(t, "ok", 10_000)
        redis.stop()
        # No reload: the page polls /healthz by itself.
        for tab in (t, phone):
            _wait_health(tab, "degraded", 20_000)
            _status, text = _health(tab)
            assert "degraded" in text and "redis" in text, text
        # A broadcast the server could not deliver: its notice is an error, not a message.
        t.page.select_option("#envelope", "broadcast")
        t.send("while redis is down")
        t.entry("error", "not delivered")
        assert t.page.locator('#log .entry[data-dir="in"]', has_text="not delivered").count() == 0
        t.shot("desktop-outage.png")
        phone.shot("phone-outage.png")
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        redis.start()
        _wait_health(t, "ok", 30_000)
        assert t.page.get_attribute("#status", "data-state") == "open"
    finally:
        server.stop()


def test_broadcast_not_delivered_close_is_an_error(tabs, redis):
    """Broadcast mode is a raw relay, so the server reports an undeliverable message by
    closing the sender with 1013 "not delivered: ..."; the others stay connected."""
    # A message waits publish_timeout for Redis to come back before its sender is told.
    server = start_server("broadcast", "--broker", redis.url, "--publish-timeout", "1")
    try:
        sender = tabs().open(server, "?channel=outage")
        receiver = tabs().open(server, "?channel=outage")
        redis.stop()
        _wait_health(sender, "degraded", 20_000)
        sender.send("lost in the outage")
        closed = sender.entry("error", "1013").first
        assert "not delivered" in closed.text_content()
        assert (
            sender.page.locator('#log .entry[data-dir="in"]', has_text="not delivered").count() == 0
        )
        sender.shot("desktop-broadcast-not-delivered.png")
        sender.wait_state("open", timeout=20_000)  # it reconnects by itself
        assert receiver.page.get_attribute("#status", "data-state") == "open"
        assert receiver.page.locator("#log .entry", has_text="Connection closed").count() == 0
        assert receiver.page.locator('#log .entry[data-dir="error"]').count() == 0
    finally:
        server.stop()


def test_replayed_history_is_marked(tabs):
    server = start_server("mixed", "--history", "5")
    try:
        a = tabs().open(server, "?channel=kept")
        a.page.select_option("#envelope", "broadcast")
        for text in ("kept one", "kept two"):
            a.send(text)
            a.entry("in", text)
        b = tabs().open(server, "?channel=kept")
        b.entry("sys", "Replaying 2 earlier messages")
        for text in ("kept one", "kept two"):
            e = b.entry("in", text).first
            assert e.get_attribute("data-replayed") == "true"
            assert "replayed" in e.locator(".meta").text_content()
        b.entry("sys", "End of replayed history")
        a.send("live now")
        live = b.entry("in", "live now").first
        assert live.get_attribute("data-replayed") is None
        b.shot("desktop-history.png")
    finally:
        server.stop()


# ---------------------------------------------------------------- offsets, resume, curl

API_KEY = "browser-test-key"

# The received broadcasts in the log, oldest first: text, offset shown, and how it is marked.
RECEIVED_BROADCASTS = """() => [...document.querySelectorAll('#log .entry[data-dir="in"]')]
  .filter(e => e.querySelector('.tag').textContent === 'broadcast')
  .map(e => [e.querySelector('.content').textContent,
             e.querySelector('.offset') ? e.querySelector('.offset').textContent : null,
             e.dataset.replay || null])"""


def _publish(
    server: ServerProcess, channel: str, body: str, content_type: str = "text/plain"
) -> int:
    """POST to the publish API; returns the message's offset."""
    request = urllib.request.Request(
        f"{server.url}/api/channels/{channel}/messages",
        data=body.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["offset"]


def _socket_urls(t: Tab) -> list[str]:
    return t.page.evaluate("window.__sockets.map(s => s.url)")


def test_offsets_are_shown_in_mixed_mode_only(tabs, mixed_server, broadcast_server):
    t = tabs().open(mixed_server, "?channel=offsets-shown")
    assert t.page.is_hidden("#offsets-note")
    t.page.select_option("#envelope", "broadcast")
    for text in ("first", "second"):
        t.send(text)
        t.page.locator('#log .entry[data-dir="in"]', has_text="broadcastResult").filter(
            has_text=text
        ).wait_for()
    assert t.page.evaluate(RECEIVED_BROADCASTS) == [
        ["first", "offset 1", None],
        ["second", "offset 2", None],
    ]
    results = t.page.locator('#log .entry[data-dir="in"]', has_text="broadcastResult")
    assert [results.nth(i).locator(".offset").text_content() for i in range(2)] == [
        "offset 1",
        "offset 2",
    ]
    assert t.page.text_content("#url").endswith("/ws/offsets-shown")  # a fresh join: no since
    t.shot("desktop-offsets.png")
    # Broadcast mode is a raw relay: no offsets in the frames, and the page says so.
    b = tabs().open(broadcast_server, "?channel=offsets-raw")
    assert b.page.is_visible("#offsets-note")
    assert "mixed mode only" in b.page.text_content("#offsets-note")
    b.send("raw")
    b.entry("in", "raw")
    assert b.page.locator("#log .entry .offset").count() == 0


def test_reconnect_resumes_from_the_last_offset_through_redis(tabs, redis):
    """Two servers share Redis; the page's server dies, messages are published through the
    other, and the page, reconnecting by itself to the restarted server, gets every one of
    them exactly once, in order, marked as recovered, then the live stream."""
    args = ("--broker", redis.url, "--history", "100", "--api-key", API_KEY)
    a = start_server("mixed", *args)
    b = start_server("mixed", *args)
    try:
        t = tabs()
        t.page.add_init_script(CAPTURE_SOCKETS)
        t.open(a, "?channel=resume")
        for i in (1, 2):
            _publish(b, "resume", f"before {i}")
        t.entry("in", "before 2")
        a.kill()
        t.wait_state("closed")
        missed = [_publish(b, "resume", f"missed {i}") for i in range(1, 6)]
        assert missed == [3, 4, 5, 6, 7]
        a.restart().wait_healthy()  # the same port
        t.wait_state("open", timeout=20_000)  # no click: it reconnected by itself
        t.entry("sys", "Recovered 5 messages (offsets 3\u20137) published while disconnected")
        assert _publish(b, "resume", "live after") == 8
        t.entry("in", "live after")
        urls = _socket_urls(t)
        assert urls[0].endswith("/ws/resume"), urls
        # Each resume names the epoch of offset 2 too (issue 21: an offset never lies).
        resumed = re.compile(r"/ws/resume\?since=2&epoch=[A-Za-z0-9_-]{1,32}$")
        assert len(urls) >= 2 and all(resumed.search(u) for u in urls[1:]), urls
        assert "?since=2" in t.page.text_content("#url")
        assert t.page.evaluate(RECEIVED_BROADCASTS) == [
            ["before 1", "offset 1", None],
            ["before 2", "offset 2", None],
            *[[f"missed {i}", f"offset {i + 2}", "recovery"] for i in range(1, 6)],
            ["live after", "offset 8", None],
        ]
        recovered = t.page.locator('#log .entry[data-replay="recovery"]').first
        assert "recovered" in recovered.locator(".meta").text_content()
        assert t.page.locator('#log .entry[data-dir="error"]').count() == 0
        t.shot("desktop-recovered.png")
    finally:
        a.stop()
        b.stop()


def test_recovery_says_what_was_missed_when_history_is_too_short(tabs):
    server = start_server("mixed", "--history", "3", "--api-key", API_KEY)
    try:
        t = tabs(PHONE)
        t.page.add_init_script(CAPTURE_SOCKETS)
        t.open(server, "?channel=short")
        for i in (1, 2):
            _publish(server, "short", f"seen {i}")
        t.entry("in", "seen 2")
        # Drop the page's connection while the server stays up; it reconnects once allowed.
        t.page.uncheck("#reconnect")
        t.page.evaluate("window.__sockets[window.__sockets.length - 1].close()")
        t.wait_state("closed")
        for i in range(1, 6):
            _publish(server, "short", f"gone {i}")  # offsets 3..7; only 5..7 are kept
        t.page.check("#reconnect")
        t.wait_state("open", timeout=20_000)
        assert re.search(r"/ws/short\?since=2&epoch=[A-Za-z0-9_-]+$", _socket_urls(t)[-1])
        missed = t.entry("error", "Some messages were missed").first.text_content()
        assert "offsets 3\u20134 (2 messages) are no longer kept" in missed, missed
        assert "broadcast.history" in missed
        t.entry("sys", "Replayed the 3 messages (offsets 5\u20137) still kept")
        assert t.page.evaluate(RECEIVED_BROADCASTS) == [
            ["seen 1", "offset 1", None],
            ["seen 2", "offset 2", None],
            ["gone 3", "offset 5", "recovery"],
            ["gone 4", "offset 6", "recovery"],
            ["gone 5", "offset 7", "recovery"],
        ]
        width = t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        t.shot("phone-not-recovered.png")
    finally:
        server.stop()


def test_curl_lines_name_this_server_and_channel_and_copy(tabs, echo_server):
    server = start_server("mixed", "--api-key", API_KEY)
    try:
        t = tabs()
        t.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        t.open(server, "?channel=cli-room")
        base = f"http://127.0.0.1:{server.port}"
        publish = t.page.text_content("#curl-publish")
        assert publish == (
            'curl -H "Authorization: Bearer $ECHOSERVER_API_KEY" '
            "-H 'Content-Type: application/json' --data '{\"text\":\"hello\"}' "
            f"{base}/api/channels/cli-room/messages"
        )
        assert t.page.text_content("#curl-subscribe") == f"curl -N {base}/sse/cli-room"
        # Named buttons, reachable by role: "Copy" plus what it copies.
        t.page.get_by_role("button", name="Copy Publish a message").click()
        t.page.wait_for_function(
            "document.querySelector('#copy-status').textContent === 'Copied the publish command.'"
        )
        assert t.page.evaluate("navigator.clipboard.readText()") == publish
        t.page.focus("#copy-subscribe")
        t.page.keyboard.press("Enter")
        t.page.wait_for_function(
            "document.querySelector('#copy-status').textContent.includes('subscribe')"
        )
        assert t.page.evaluate("navigator.clipboard.readText()") == f"curl -N {base}/sse/cli-room"
        assert t.page.text_content("#copy-subscribe") == "Copied"
        assert t.page.text_content("#copy-publish") == "Copy"  # only the last one says so
        # Both lines work as they stand (given the key in the environment): what the one
        # publishes, the page and the other show.
        subscribe = t.page.text_content("#curl-subscribe")
        env = {**os.environ, "ECHOSERVER_API_KEY": API_KEY}
        with subprocess.Popen(
            ["bash", "-c", subscribe + " --silent --max-time 10"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        ) as curl:
            t.page.wait_for_function("document.querySelector('#members').textContent === '2'")
            subprocess.run(["bash", "-c", publish], env=env, check=True, capture_output=True)
            t.entry("in", '{"text":"hello"}')
            assert curl.stdout is not None
            streamed = b""
            while b'data: {"text":"hello"}' not in streamed:
                line = curl.stdout.readline()
                assert line, f"the stream ended: {streamed!r}"
                streamed += line
            curl.terminate()
        t.shot("desktop-cli.png")
        # Another channel: the lines follow.
        t.page.fill("#channel", "elsewhere")
        t.page.press("#channel", "Enter")
        t.page.wait_for_function(
            "document.querySelector('#curl-publish').textContent.endsWith"
            "('/api/channels/elsewhere/messages')"
        )
        assert t.page.text_content("#curl-subscribe") == f"curl -N {base}/sse/elsewhere"

        # Without the clipboard API (plain http from another host), the command is selected.
        f = tabs(PHONE)
        f.page.add_init_script(
            "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})"
        )
        f.open(server, "?channel=" + "c" * 64)
        f.page.click("#copy-publish")
        f.page.wait_for_function("document.querySelector('#copy-status').textContent !== ''")
        assert f.page.evaluate("String(window.getSelection())") == f.page.text_content(
            "#curl-publish"
        )
        assert "publish command" in f.page.text_content("#copy-status")
        width = f.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"horizontal scroll at 390px: scrollWidth={width}"
        f.page.locator("#cli-card").scroll_into_view_if_needed()
        f.shot("phone-cli.png")
        # Echo mode has no channels: no card.
        e = tabs().open(echo_server)
        assert e.page.is_hidden("#cli-card") and e.page.is_hidden("#offsets-note")
    finally:
        server.stop()

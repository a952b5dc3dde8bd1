"""The page following several channels on one connection (issue 21, mixed mode), in a real
browser: Playwright driving Debian's Chromium against `python -m echoserver`.

Adding and removing channels, a subscribe past websocket.max_subscriptions, who is on a
channel from join/leave events (JWT users in a join_leave namespace), every channel resumed
exactly after the connection drops, and a server restart on the memory broker (a new epoch)
shown as messages that may have been missed. Messages are published with the publish API.
"""

from __future__ import annotations

import json
import re
import time

import jwt
import pytest

from tests import test_browser as harness
from tests.servers import ServerProcess
from tests.test_browser import API_KEY, Tab, _publish, start_server
from tests.wsraw import RawClient, close_payload

pytestmark = pytest.mark.browser

# The page harness of tests/test_browser.py: one Chromium per module, tabs that collect errors.
browser = harness.browser
tabs = harness.tabs

# Every WebSocket the page opens, and every text frame it sends.
CAPTURE = """(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__sent = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.__sockets.push(this); }
    send(data) { if (typeof data === 'string') window.__sent.push(data); super.send(data); }
  };
})()"""

# The received broadcasts of one channel in the log, oldest first: text, offset, how marked.
RECEIVED_ON = """(ch) => [...document.querySelectorAll('#log .entry[data-dir="in"]')]
  .filter(e => e.querySelector('.tag').textContent === 'broadcast' && e.dataset.channel === ch)
  .map(e => [e.querySelector('.content').textContent,
             e.querySelector('.offset') ? e.querySelector('.offset').textContent : null,
             e.dataset.replay || null])"""

SECRET = "browser-channels-secret-0123456789abcdef"
ROOMS = [{"pattern": "room.*", "join_leave": True}]


def opened(t: Tab, server, channel: str) -> Tab:
    t.page.add_init_script(CAPTURE)
    return t.open(server, f"?channel={channel}")


def row(t: Tab, channel: str):
    return t.page.locator(f'#channels li[data-channel="{channel}"]')


def follow(t: Tab, channel: str) -> None:
    t.page.fill("#follow-channel", channel)
    t.page.click("#follow")
    t.page.wait_for_selector(f'#channels li[data-channel="{channel}"][data-status="subscribed"]')


def sent(t: Tab) -> list[dict]:
    return [json.loads(s) for s in t.page.evaluate("window.__sent")]


def received(t: Tab, channel: str) -> list[list]:
    return t.page.evaluate(RECEIVED_ON, channel)


def drop_connection(t: Tab) -> None:
    """Close the page's socket with auto-reconnect off: the page stays away until allowed."""
    t.page.uncheck("#reconnect")
    t.page.evaluate("window.__sockets[window.__sockets.length - 1].close()")
    t.wait_state("closed")


def row_position(t: Tab, channel: str) -> tuple[str | None, str | None]:
    pos = row(t, channel).locator(".chan-pos")
    return pos.get_attribute("data-offset"), pos.get_attribute("data-epoch")


@pytest.fixture(scope="module")
def mixed3():
    """Mixed mode, the publish API, at most 3 channels per connection."""
    server = start_server("mixed", "--api-key", API_KEY, "--max-subscriptions", "3")
    yield server
    server.stop()


def test_add_two_channels_labelled_then_remove_one(tabs, mixed3):
    t = opened(tabs(), mixed3, "m.a")
    assert t.page.is_visible("#channels-card")
    follow(t, "m.b")
    follow(t, "m.c")
    names = t.page.eval_on_selector_all(
        "#channels li", "rows => rows.map(r => [r.dataset.channel, r.dataset.url])"
    )
    assert names == [["m.a", "true"], ["m.b", "false"], ["m.c", "false"]]
    assert not row(t, "m.a").locator(".chan-remove").is_visible()  # the URL's stays
    subscribes = [m for m in sent(t) if m["type"] == "subscribe"]
    assert subscribes == [
        {"type": "subscribe", "channel": "m.b"},
        {"type": "subscribe", "channel": "m.c"},
    ]
    for ch in ("m.a", "m.b", "m.c"):
        _publish(mixed3, ch, f"hello {ch}")
    for ch in ("m.a", "m.b", "m.c"):
        entry = t.entry("in", f"hello {ch}").first
        assert entry.locator(".chan").text_content() == ch
        assert received(t, ch) == [[f"hello {ch}", "offset 1", None]]
    offset, epoch = row_position(t, "m.b")
    assert offset == "1" and epoch and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", epoch)
    # Publishing on a chosen followed channel.
    t.page.select_option("#envelope", "broadcast")
    options = t.page.eval_on_selector_all("#send-channel option", "os => os.map(o => o.value)")
    assert options == ["m.a", "m.b", "m.c"]
    t.page.select_option("#send-channel", "m.c")
    t.send("to c")
    result = t.page.locator('#log .entry[data-dir="in"]', has_text="broadcastResult").filter(
        has_text="to c"
    )
    result.first.wait_for()
    assert result.first.locator(".chan").text_content() == "m.c"
    assert {"type": "broadcast", "channel": "m.c", "payload": "to c"} in sent(t)
    t.page.wait_for_function("() => (" + RECEIVED_ON + ")('m.c').some(e => e[0] === 'to c')")
    # Remove m.b: nothing of it arrives after its unsubscribed.
    row(t, "m.b").locator(".chan-remove").click()
    t.entry("sys", "Stopped following m.b.")
    assert row(t, "m.b").count() == 0
    assert {"type": "unsubscribe", "channel": "m.b"} in sent(t)
    assert "m.b" not in t.page.eval_on_selector_all(
        "#send-channel option", "os => os.map(o => o.value)"
    )
    _publish(mixed3, "m.b", "after removal")
    _publish(mixed3, "m.c", "marker on c")
    t.entry("in", "marker on c")
    t.page.wait_for_timeout(200)
    assert t.page.locator("#log .entry", has_text="after removal").count() == 0
    assert received(t, "m.b") == [["hello m.b", "offset 1", None]]
    t.shot("desktop-channels.png")
    t.page.set_viewport_size(harness.PHONE)
    t.page.wait_for_timeout(100)
    width = t.page.evaluate("document.documentElement.scrollWidth")
    assert width <= harness.PHONE["width"], width
    t.shot("phone-channels.png")


def test_subscribe_past_max_subscriptions_shows_the_error(tabs, mixed3):
    t = opened(tabs(), mixed3, "s.a")
    follow(t, "s.b")
    follow(t, "s.c")  # three with the URL's: the limit
    t.page.fill("#follow-channel", "s.d")
    t.page.click("#follow")
    t.page.wait_for_selector("#follow-error:not([hidden])")
    shown = t.page.text_content("#follow-error")
    assert "Could not follow s.d" in shown and "at most 3 channels" in shown, shown
    error = t.entry("error", "at most 3 channels").first
    assert error.locator(".chan").text_content() == "s.d"
    assert "subscribe refused" in error.locator(".meta").text_content()
    assert row(t, "s.d").count() == 0
    assert t.page.get_attribute("#status", "data-state") == "open"  # the connection stays
    # An invalid name never reaches the server.
    before = len(sent(t))
    t.page.fill("#follow-channel", "no spaces")
    t.page.click("#follow")
    assert "Invalid channel" in t.page.text_content("#follow-error")
    assert len(sent(t)) == before


def _token(sub: str, info: dict) -> str:
    claims = {"sub": sub, "info": info, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_roster_and_log_follow_joins_and_leaves(tabs):
    env = {"ECHOSERVER_NAMESPACES": json.dumps(ROOMS)}
    args = ["--mode", "mixed", "--auth-jwt-secret", SECRET, "--presence-grace", "0.3"]
    server = ServerProcess(args, env, log_dir=harness.ARTIFACTS).wait_healthy()
    try:
        t = tabs()
        t.page.add_init_script(CAPTURE)
        t.page.goto(server.url + "/?channel=room.a")
        t.page.wait_for_function(
            "document.querySelector('#status').textContent.includes('token required')"
        )
        t.page.fill("#token", _token("alice", {"name": "Alice"}))
        t.page.click("#connect")
        t.wait_state("open")
        # A member gets its own join.
        me = row(t, "room.a").locator('.roster li[data-user="alice"]')
        me.wait_for()
        assert "(you)" in me.text_content() and '{"name":"Alice"}' in me.text_content()
        follow(t, "room.b")
        row(t, "room.b").locator('.roster li[data-user="alice"]').wait_for()
        follow(t, "plain")  # no join_leave namespace: no events, and the page says so
        plain = row(t, "plain").locator(".chan-who")
        assert plain.get_attribute("data-presence") == "false"
        assert "no join or leave events seen" in plain.text_content()
        # Bob joins room.b; his info is markup-looking text, shown as text.
        info = {"name": "Bob <img src=x onerror=alert(1)>"}
        bob = RawClient(server.port, f"/ws/room.b?token={_token('bob', info)}")
        assert bob.status == 101
        try:
            entry = row(t, "room.b").locator('.roster li[data-user="bob"]')
            entry.wait_for()
            assert "<img src=x onerror=alert(1)>" in entry.text_content()
            assert t.page.locator("#channels img, #log img").count() == 0
            assert row(t, "room.a").locator('.roster li[data-user="bob"]').count() == 0
            joined = t.entry("sys", "bob joined").first
            assert joined.locator(".chan").text_content() == "room.b"
            assert joined.locator(".tag").text_content() == "join"
            assert "Bob <img" in joined.text_content()
        finally:
            bob.send_frame(0x8, close_payload(1000))
            bob.close()
        left = t.entry("sys", "bob left").first  # after the 0.3 s grace
        assert left.locator(".chan").text_content() == "room.b"
        assert left.locator(".tag").text_content() == "leave"
        row(t, "room.b").locator('.roster li[data-user="bob"]').wait_for(state="detached")
        assert row(t, "room.b").locator(".roster li").count() == 1  # alice
        t.shot("desktop-roster.png")
    finally:
        server.stop()


def test_three_channels_resume_exactly_after_the_connection_drops(tabs):
    server = start_server("mixed", "--api-key", API_KEY, "--history", "100")
    try:
        t = opened(tabs(), server, "r.a")
        follow(t, "r.b")
        follow(t, "r.c")
        channels = ("r.a", "r.b", "r.c")
        for ch in channels:
            _publish(server, ch, f"before {ch}")
            t.entry("in", f"before {ch}")
        epochs = {ch: row_position(t, ch)[1] for ch in channels}
        assert all(epochs.values()), epochs
        drop_connection(t)
        assert [row(t, ch).get_attribute("data-status") for ch in channels] == ["waiting"] * 3
        for i in (1, 2, 3):
            for ch in channels:
                assert _publish(server, ch, f"missed {i} {ch}") == i + 1
        mark = len(sent(t))
        t.page.check("#reconnect")
        t.wait_state("open", timeout=15_000)
        url = t.page.evaluate("window.__sockets[window.__sockets.length - 1].url")
        assert url.endswith(f"/ws/r.a?since=1&epoch={epochs['r.a']}"), url
        resubscribed = [m for m in sent(t)[mark:] if m["type"] == "subscribe"]
        assert resubscribed == [
            {"type": "subscribe", "channel": ch, "since": 1, "epoch": epochs[ch]}
            for ch in ("r.b", "r.c")
        ]
        recovered = "Recovered 3 messages (offsets 2\u20134) published while disconnected"
        t.entry("sys", recovered + ";")  # the URL's channel
        t.entry("sys", recovered + " on r.b;")
        t.entry("sys", recovered + " on r.c;")
        for ch in channels:
            assert _publish(server, ch, f"live {ch}") == 5
        for ch in channels:
            t.entry("in", f"live {ch}")
        for ch in channels:
            assert received(t, ch) == [
                [f"before {ch}", "offset 1", None],
                *[[f"missed {i} {ch}", f"offset {i + 1}", "recovery"] for i in (1, 2, 3)],
                [f"live {ch}", "offset 5", None],
            ], ch
            assert row_position(t, ch) == ("5", epochs[ch])
        assert t.page.locator('#log .entry[data-dir="error"]').count() == 0
        assert t.page.locator(".chan-gap:not([hidden])").count() == 0
    finally:
        server.stop()


def test_a_restart_on_the_memory_broker_shows_messages_may_be_missed(tabs):
    server = start_server("mixed", "--api-key", API_KEY, "--history", "100")
    try:
        t = opened(tabs(), server, "e.a")
        follow(t, "e.b")
        follow(t, "e.c")
        channels = ("e.a", "e.b", "e.c")
        for ch in channels:
            _publish(server, ch, f"old {ch}")
            t.entry("in", f"old {ch}")
        old = {ch: row_position(t, ch)[1] for ch in channels}
        server.kill()
        t.wait_state("closed")
        server.restart().wait_healthy()  # the same port, every channel's state gone
        t.wait_state("open", timeout=15_000)
        for ch in channels:
            notice = t.page.locator(
                f'#log .entry[data-dir="error"][data-channel="{ch}"]',
                has_text="Some messages may have been missed",
            )
            notice.first.wait_for()
            assert "numbers the channel anew" in notice.first.text_content()
            assert f"was {old[ch]}" in notice.first.text_content()
            gap = row(t, ch).locator(".chan-gap")
            assert gap.is_visible() and "new epoch" in gap.text_content()
            assert "Messages may have been missed" in gap.text_content()
        # The new numbering is followed from its start.
        _publish(server, "e.b", "new b")
        t.entry("in", "new b")
        offset, epoch = row_position(t, "e.b")
        assert offset == "1" and epoch and epoch != old["e.b"]
        t.shot("desktop-not-recovered-epoch.png")
    finally:
        server.stop()

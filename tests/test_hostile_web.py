"""A hostile web: DNS rebinding (Host), origins by scheme and port, secrets in logs, forged
access-log fields, odd static paths, the page's security headers and the API-key reads.

The rules are tested as plain functions; the routes in-process (pytest-tornado's
http_server, on the test loop) and through a real `python -m echoserver` subprocess (on
the other loop), whose every log line is searched for the secrets.
"""

from __future__ import annotations

import json
import logging
import re
import socket

import pytest
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.websocket import websocket_connect

from echoserver.endpoints.access import text_value
from echoserver.web.redact import REDACTED, redact
from echoserver.wire.handshake import origin_allowed
from echoserver.wire.hosts import HostPolicy, Throttle
from tests.conftest import make_settings
from tests.test_browser import Tab, browser, start_server  # noqa: F401 (a fixture)
from tests.test_security import Handshake, status_of

TOKEN = "T0ken-for-the-clients.7f3a"
API_KEY = "ApiKey-for-the-backend.91c2"
WRONG = "Wr0ng-but-close-token.7f3b"  # a wrong guess is often a typo of the real one
SECRETS = (TOKEN, API_KEY, WRONG)
REBOUND = "attacker.example"
# One field of a text access line: key=bare or key="quoted with \" escapes".
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


# --- the rules, without I/O ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "allowed", "host", "ok"),
    [
        ("127.0.0.1", (), "localhost:8888", True),
        ("127.0.0.1", (), "LOCALHOST:1", True),  # names compare case-insensitively
        ("127.0.0.1", (), "127.0.0.1:8888", True),
        ("127.0.0.1", (), "127.0.0.1", True),
        ("127.0.0.1", (), "[::1]:8888", True),
        ("127.0.0.1", (), f"{REBOUND}:8888", False),  # the rebound page
        ("127.0.0.1", (), REBOUND, False),
        ("127.0.0.1", (), "127.0.0.2:8888", False),
        ("127.0.0.1", (), "localhost.evil.example", False),
        ("127.0.0.1", (), "[::1", False),  # not a Host at all
        ("127.0.0.1", (), None, True),  # HTTP/1.0 without Host: not a browser
        ("127.0.0.2", (), "127.0.0.2:8888", True),  # the configured host too
        ("::1", (), "[::1]:8888", True),
        ("::1", (), REBOUND, False),
        ("localhost", (), "localhost:8888", True),
        ("localhost", (), REBOUND, False),
        ("0.0.0.0", (), f"{REBOUND}:8888", True),  # not loopback: any, as before
        ("::", (), REBOUND, True),
        ("127.0.0.1", ("*",), REBOUND, True),
        ("127.0.0.1", ("chat.example",), "chat.example:8443", True),
        ("127.0.0.1", ("chat.example",), "CHAT.example", True),
        ("127.0.0.1", ("chat.example",), "localhost:8888", False),  # the list is the list
        ("0.0.0.0", ("chat.example",), REBOUND, False),
        ("0.0.0.0", ("chat.example:8443",), "chat.example:8443", True),
        ("0.0.0.0", ("chat.example:8443",), "chat.example:8444", False),
        ("0.0.0.0", ("chat.example:80",), "chat.example", True),  # the default port
        ("0.0.0.0", ("[::1]:8888",), "[::1]:8888", True),
    ],
)
def test_host_policy(listen: str, allowed: tuple[str, ...], host: str | None, ok: bool) -> None:
    assert HostPolicy.build(listen, allowed).allows(host) is ok


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "ok"),
    [
        ("http://127.0.0.1:8888", "127.0.0.1:8888", "http", True),
        ("https://127.0.0.1:8888", "127.0.0.1:8888", "http", False),  # scheme differs
        ("http://127.0.0.1:8888", "127.0.0.1:8888", "https", False),
        ("https://127.0.0.1:8888", "127.0.0.1:8888", "https", True),
        ("http://127.0.0.1:8889", "127.0.0.1:8888", "http", False),  # port differs
        ("http://localhost", "localhost:80", "http", True),  # default ports normalised
        ("http://localhost:80", "localhost", "http", True),
        ("https://localhost", "localhost:443", "https", True),
        ("http://localhost", "localhost:443", "http", False),
        ("HTTP://LocalHost:8888", "localhost:8888", "http", True),
        ("http://[::1]:8888", "[::1]:8888", "http", True),
        ("http://user@127.0.0.1:8888", "127.0.0.1:8888", "http", False),
        ("http://127.0.0.1:8888/path", "127.0.0.1:8888", "http", False),
        ("ws://127.0.0.1:8888", "127.0.0.1:8888", "http", False),
        ("null", "127.0.0.1:8888", "http", False),
    ],
)
def test_default_origin_rule_compares_scheme_host_and_port(
    origin: str, host: str, scheme: str, ok: bool
) -> None:
    assert origin_allowed(origin, frozenset(), host, scheme) is ok


def test_redact_takes_out_every_credential() -> None:
    lines = [
        f"Malformed HTTP message from 127.0.0.1: Invalid header value 'Bearer {WRONG}\\x01'",
        f"Invalid header name 'x-{WRONG}'",
        f"GET /ws?channel=a&token={WRONG} (127.0.0.1)",
        f"uri='/static/x%00?access_token={WRONG}&b=1'",
        f"headers: {{'Authorization': 'Token {WRONG}'}}",
        f"Authorization: Bearer {WRONG}",
        f"b'{TOKEN}\\xff'",  # a configured secret, wherever it is
        f"{API_KEY}",
    ]
    for line in lines:
        redacted = redact(line, [TOKEN, API_KEY])
        assert REDACTED in redacted
        assert not any(secret in redacted for secret in SECRETS), redacted
    assert redact("basic facts, 3 tokens, 100% done") == "basic facts, 3 tokens, 100% done"


def test_text_values_cannot_forge_fields() -> None:
    assert text_value(None) == "-"
    assert text_value("http://127.0.0.1:8888") == "http://127.0.0.1:8888"
    forged = text_value('http://x status=101 close=1000 "\n')
    assert forged == '"http://x status=101 close=1000 \\"\\n"'
    assert dict(FIELD.findall(f"origin={forged}")) == {"origin": forged}


def test_throttle_allows_one_line_per_interval_and_counts_the_rest() -> None:
    throttle = Throttle(60.0)
    assert throttle.ready(1000.0) == 0
    assert [throttle.ready(1000.0 + i) for i in range(1, 6)] == [None] * 5
    assert throttle.ready(1060.0) == 5
    assert throttle.ready(1061.0) is None


# --- in-process: the routes ---------------------------------------------------------------


async def get(client, port: int, path: str, **headers: str) -> HTTPResponse:
    request = HTTPRequest(f"http://127.0.0.1:{port}{path}", headers=headers or None)
    return await client.fetch(request, raise_error=False)


ROUTES = ["/", "/static/app.js", "/healthz", "/metrics", "/api/protocol", "/api/channels/a"]


class TestRebindingOnLoopback:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast", host="127.0.0.1")

    @pytest.mark.gen_test
    async def test_a_rebound_host_is_refused_on_every_route(self, http_client, http_port):
        for path in [*ROUTES, "/ws", "/sse", "/no/such/route"]:
            response = await get(http_client, http_port, path, Host=f"{REBOUND}:{http_port}")
            assert response.code == 403, path
            assert response.body == b"host not allowed\n"
            assert response.headers["Server"] == "echoserver"
        # The WebSocket handshake itself, with the Origin the rebound page sends.
        request = HTTPRequest(
            f"ws://127.0.0.1:{http_port}/ws",
            headers={"Host": f"{REBOUND}:{http_port}", "Origin": f"http://{REBOUND}:{http_port}"},
        )
        with pytest.raises(Exception, match="403"):
            await websocket_connect(request)

    @pytest.mark.gen_test
    async def test_loopback_names_are_admitted(self, http_client, http_port):
        for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
            for path in ROUTES:
                response = await get(http_client, http_port, path, Host=f"{host}:{http_port}")
                assert response.code == 200, (host, path)
            request = HTTPRequest(
                f"ws://127.0.0.1:{http_port}/ws/a",
                headers={"Host": f"{host}:{http_port}", "Origin": f"http://{host}:{http_port}"},
            )
            connection = await websocket_connect(request)
            await connection.write_message("hi")
            assert await connection.read_message() == "hi"
            connection.close()

    @pytest.mark.gen_test
    async def test_refusals_write_one_warning_per_interval(self, http_client, http_port, caplog):
        caplog.set_level(logging.DEBUG)
        for _ in range(20):
            response = await get(http_client, http_port, "/healthz", Host=REBOUND)
            assert response.code == 403
        loud = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        assert loud[0].levelno == logging.WARNING
        assert REBOUND in loud[0].getMessage()
        refused = [r for r in caplog.records if r.name == "echoserver.http"]
        assert len(refused) == 20  # the other 19 at debug

    @pytest.mark.gen_test
    async def test_origin_with_another_scheme_or_port_is_refused(self, http_client, http_port):
        own = f"127.0.0.1:{http_port}"
        for origin, code in [
            (f"http://{own}", 400),  # admitted: a plain GET is then no upgrade (400)
            (f"https://{own}", 403),
            (f"http://127.0.0.1:{http_port + 1}", 403),
            (f"http://localhost:{http_port}", 403),  # another host than the Host sent
        ]:
            response = await get(http_client, http_port, "/ws", Origin=origin)
            assert response.code == code, origin


class TestAllowedHostsList:
    @pytest.fixture
    def settings(self):
        return make_settings(**{"websocket.allowed_hosts": ("chat.example",)})

    @pytest.mark.gen_test
    async def test_only_the_listed_names(self, http_client, http_port):
        assert (await get(http_client, http_port, "/", Host="chat.example")).code == 200
        assert (
            await get(http_client, http_port, "/", Host=f"chat.example:{http_port}")
        ).code == 200
        for host in (f"localhost:{http_port}", f"127.0.0.1:{http_port}", REBOUND):
            assert (await get(http_client, http_port, "/healthz", Host=host)).code == 403, host


class TestNotLoopback:
    @pytest.fixture
    def settings(self):
        return make_settings(host="0.0.0.0")

    @pytest.mark.gen_test
    async def test_any_host_passes(self, http_client, http_port):
        for path in ROUTES:
            response = await get(http_client, http_port, path, Host=f"{REBOUND}:{http_port}")
            assert response.code == 200, path


class TestHeaders:
    @pytest.mark.gen_test
    async def test_page_and_assets_carry_the_security_headers(self, http_client, http_port):
        for path in ("/", "/static/app.js", "/static/style.css", "/static/missing.js"):
            response = await get(http_client, http_port, path)
            headers = response.headers
            policy = headers["Content-Security-Policy"]
            assert "default-src 'self'" in policy
            assert f"connect-src 'self' ws://127.0.0.1:{http_port} " in policy
            assert "frame-ancestors 'none'" in policy
            assert "base-uri 'none'" in policy
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["X-Frame-Options"] == "DENY"

    @pytest.mark.gen_test
    async def test_server_header_names_no_version_and_json_is_nosniff(self, http_client, http_port):
        for path in [*ROUTES, "/no/such/route", "/ws"]:
            response = await get(http_client, http_port, path)
            assert response.headers["Server"] == "echoserver", path
            assert response.headers["X-Content-Type-Options"] == "nosniff", path

    @pytest.mark.gen_test
    async def test_odd_static_paths_are_client_errors(self, http_client, http_port, caplog):
        for path, code in [
            ("/static/x%00", 400),
            ("/static/app.js%00.png", 400),
            ("/static/%ff", 400),
            ("/static/" + "a" * 4000, 404),
            ("/static/" + "a/" * 1000 + "b", 404),
            ("/static/..%2f..%2fsetup.cfg", 403),
        ]:
            response = await get(http_client, http_port, path)
            assert response.code == code, path
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "Traceback" not in caplog.text


class TestProtectedReads:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast", **{"api.key": API_KEY, "api.protect_reads": True})

    @pytest.mark.gen_test
    async def test_metrics_and_channels_need_the_key(self, http_client, http_port):
        for path in ("/metrics", "/api/channels/a"):
            response = await get(http_client, http_port, path)
            assert response.code == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = await get(http_client, http_port, path, Authorization=f"Bearer {WRONG}")
            assert wrong.code == 401, path
            keyed = await get(http_client, http_port, path, Authorization=f"Bearer {API_KEY}")
            assert keyed.code == 200, path
        # Load balancers and the page keep what they need; the page learns not to ask.
        health = await get(http_client, http_port, "/healthz")
        assert health.code == 200 and json.loads(health.body)["protect_reads"] is True
        assert (await get(http_client, http_port, "/api/protocol")).code == 200
        channel = await get(
            http_client, http_port, "/api/channels/a", Authorization=f"Bearer {API_KEY}"
        )
        assert json.loads(channel.body) == {"channel": "a", "members": 0}


class TestOpenReadsByDefault:
    @pytest.fixture
    def settings(self):
        return make_settings(mode="broadcast", **{"api.key": API_KEY})

    @pytest.mark.gen_test
    async def test_reads_stay_open_without_protect_reads(self, http_client, http_port):
        for path in ("/metrics", "/api/channels/a"):
            assert (await get(http_client, http_port, path)).code == 200


# --- a real server: its log -----------------------------------------------------------------


def raw_request(port: int, request: bytes) -> bytes:
    """One request on its own connection (closed after it); the whole answer."""
    if b"\r\nConnection:" not in request:
        request = request.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_log_line(run_server, log_format):
    server = run_server(
        "--mode", "broadcast", "--log-level", "debug", "--log-format", log_format,
        "--auth-token", TOKEN, "--api-key", API_KEY,
    )  # fmt: skip
    port = server.port
    host = f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
    for secret in SECRETS:
        # A header value Tornado refuses, which it quotes in its own line.
        raw_request(
            port,
            b"GET / HTTP/1.1\r\n" + host + f"Authorization: Bearer {secret}\x01\r\n\r\n".encode(),
        )
        # A NUL in a static path: a 400, not a 500 with the request's repr.
        answer = raw_request(
            port, b"GET /static/x%00?token=" + secret.encode() + b" HTTP/1.1\r\n" + host + b"\r\n"
        )
        assert status(answer) == 400
        answer = raw_request(
            port, b"GET /static/%ff?token=" + secret.encode() + b" HTTP/1.1\r\n" + host + b"\r\n"
        )
        assert status(answer) == 400
        # Handshakes: a bad origin, no upgrade, a token that is not UTF-8, a rebound Host.
        assert status_of(port, f"/ws?token={secret}", {"Origin": "https://evil.example"}) in (
            401,
            403,
        )
        answer = raw_request(
            port, f"GET /ws/a?token={secret} HTTP/1.1\r\n".encode() + host + b"\r\n"
        )
        assert status(answer) in (400, 401)
        answer = raw_request(
            port, f"GET /ws?token={secret}%ff HTTP/1.1\r\n".encode() + host + b"\r\n"
        )
        assert status(answer) == 401
        answer = raw_request(
            port, f"GET /ws?token={secret} HTTP/1.1\r\nHost: {REBOUND}\r\n\r\n".encode()
        )
        assert status(answer) == 403
        handshake = Handshake(port, f"/ws/a?token={secret}", {"Authorization": f"Bearer {secret}"})
        handshake.close()
        # The publish API with a key, right or wrong, and one Tornado refuses.
        for auth in (f"Bearer {secret}", f"Bearer {secret}\x01"):
            body = b"hello"
            raw_request(
                port,
                b"POST /api/channels/a/messages HTTP/1.1\r\n" + host
                + f"Authorization: {auth}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
            )  # fmt: skip
        raw_request(
            port, b"GET /metrics?token=" + secret.encode() + b" HTTP/1.1\r\n" + host + b"\r\n"
        )
    assert server.stop() == 0
    lines = server.lines
    assert any("status=400" in line or '"status": 400' in line for line in lines)
    assert any("Invalid header value" in line for line in lines)  # the line is kept
    leaks = [line for line in lines if any(secret in line for secret in SECRETS)]
    assert leaks == []
    assert "Traceback" not in server.log()


def test_access_line_origin_cannot_forge_fields(run_server):
    server = run_server()
    origin = "http://x.example status=101 close=1000"
    assert status_of(server.port, headers={"Origin": origin}) == 403
    assert status_of(server.port, headers={"Origin": 'http://a"b\\c'}) == 403
    server.stop()
    access = [line for line in server.lines if "echoserver.access" in line and "/ws" in line]
    assert len(access) == 2
    for line in access:
        fields = FIELD.findall(line.split(": ", 1)[1])
        names = [name for name, _ in fields]
        assert names.count("status") == 1 and "close" not in names, line
        assert dict(fields)["status"] == "403"
    assert json.loads(dict(FIELD.findall(access[0]))["origin"]) == origin


def test_rebinding_refused_on_a_real_loopback_server(run_server):
    server = run_server("--host", "127.0.0.1")
    port = server.port
    rebound = {"Host": f"{REBOUND}:{port}", "Origin": f"http://{REBOUND}:{port}"}
    assert status_of(port, headers=rebound) == 403
    assert (
        status_of(port, headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
        == 101
    )
    assert (
        status(raw_request(port, f"GET /healthz HTTP/1.1\r\nHost: {REBOUND}\r\n\r\n".encode()))
        == 403
    )
    assert status(raw_request(port, b"GET /healthz HTTP/1.0\r\n\r\n")) == 200  # no Host at all
    server.stop()
    warnings = [line for line in server.lines if "refused Host" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0]


def test_any_host_on_a_server_listening_everywhere(run_server):
    server = run_server("--host", "0.0.0.0")
    port = server.port  # still reached through 127.0.0.1
    rebound = {"Host": f"{REBOUND}:{port}", "Origin": f"http://{REBOUND}:{port}"}
    assert status_of(port, headers=rebound) == 101
    assert (
        status(raw_request(port, f"GET /healthz HTTP/1.1\r\nHost: {REBOUND}\r\n\r\n".encode()))
        == 200
    )


# --- the page in Chromium, with its Content-Security-Policy on ------------------------------


@pytest.mark.browser
@pytest.mark.parametrize("protect_reads", [False, True])
def test_page_works_under_its_policy(browser, protect_reads):  # noqa: F811
    args = ("--api-key", API_KEY, "--api-protect-reads") if protect_reads else ()
    server = start_server("broadcast", *args)
    opened: list[Tab] = []
    try:
        for _ in range(2):
            t = Tab(browser, bypass_csp=False)
            opened.append(t)
            t.open(server, "?channel=csp")
        a, b = opened
        a.send("under the policy")
        b.entry("in", "under the policy")
        a.entry("in", "under the policy")
        members = a.page.locator("#members-field")
        if protect_reads:
            # The page cannot hold the API key: the count goes away instead of erroring.
            members.wait_for(state="hidden")
        else:
            a.page.locator("#members", has_text="2").wait_for()
            assert members.is_visible()
        a.page.wait_for_timeout(300)  # let any late violation surface
        for t in opened:
            assert t.console_errors == [] and t.page_errors == []
    finally:
        for t in opened:
            t.close()
        server.stop()

"""Connection tokens verified by a JWKS fetched over HTTP (auth.jwks = a URL).

The JWKS is served by a small Tornado app in the test, on 127.0.0.1, that counts its
requests and can rotate its keys, fail (500, not JSON) or answer late. The echoserver is
an in-process app (pytest-tornado) whose RemoteJwks clock the test moves on, so "a minute
later" takes no time; one test runs a real `python -m echoserver` against it instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.auth.jwks import REFETCH_INTERVAL, RemoteJwks
from echoserver.config import Settings
from tests.conftest import make_settings, run, wait_until
from tests.servers import ServerProcess

# --- the keys --------------------------------------------------------------------------------


class Key:
    """A private key, its public JWK (with kid and alg) and tokens signed by it."""

    def __init__(self, alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "alg": alg, "use": "sig"}

    def token(self, sub: str = "alice", kid: str | None = None) -> str:
        claims = {"sub": sub, "exp": int(time.time()) + 600}
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": kid or self.kid}
        )


_KEYS: dict[tuple[str, str], Key] = {}


def key(alg: str = "ES256", kid: str = "k1") -> Key:
    """One key per (alg, kid) for the whole run: RSA keys take a while to make."""
    found = _KEYS.get((alg, kid))
    if found is None:
        found = _KEYS[(alg, kid)] = Key(alg, kid)
    return found


# --- the JWKS server -------------------------------------------------------------------------


class Jwks:
    """What the JWKS app serves, and what it was asked."""

    def __init__(self, *keys: Key) -> None:
        self.keys = list(keys)
        self.status = 200
        self.body: bytes | None = None  # instead of the keys (a broken document)
        self.delay = 0.0
        self.requests = 0
        self.asked = asyncio.Event()  # set at each request (made on the serving loop)

    def document(self) -> bytes:
        return json.dumps({"keys": [k.jwk for k in self.keys]}).encode()


class JwksHandler(tornado.web.RequestHandler):
    def initialize(self, jwks: Jwks) -> None:
        self.jwks = jwks

    async def get(self) -> None:
        jwks = self.jwks
        jwks.requests += 1
        jwks.asked.set()
        if jwks.delay:
            await asyncio.sleep(jwks.delay)
        self.set_status(jwks.status)
        self.set_header("Content-Type", "application/json")
        self.finish(jwks.body if jwks.body is not None else jwks.document())


class JwksServer:
    """The JWKS app on a port of 127.0.0.1 bound now, served once start() runs on a loop."""

    def __init__(self, jwks: Jwks) -> None:
        self.jwks = jwks
        self.socket, self.port = tornado.testing.bind_unused_port()
        self.server: tornado.httpserver.HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def start(self) -> None:
        app = tornado.web.Application([("/jwks.json", JwksHandler, {"jwks": self.jwks})])
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.add_sockets([self.socket])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        else:
            self.socket.close()


class Clock:
    """RemoteJwks's monotonic clock, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def a_minute_later(self) -> None:
        self.now += REFETCH_INTERVAL + 1


# --- the in-process echoserver ---------------------------------------------------------------


@pytest.fixture
def jwks_server(io_loop: Any) -> Iterator[JwksServer]:
    server = JwksServer(Jwks(key("ES256", "k1")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def jwks(jwks_server: JwksServer) -> Jwks:
    return jwks_server.jwks


@pytest.fixture
def settings(jwks_server: JwksServer) -> Settings:
    return make_settings(mode="echo", **{"auth.jwks": jwks_server.url})


@pytest.fixture
def clock(app: Any) -> Clock:
    """The test's clock in the app's RemoteJwks, before the server starts and fetches."""
    clock = Clock()
    remote = app.server.authority.verifier.remote
    assert remote is not None
    remote._clock = clock
    return clock


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="echoserver")
    return caplog


async def connect(port: int, token: str) -> WebSocketClientConnection:
    return await websocket_connect(f"ws://127.0.0.1:{port}/ws?token={token}")


async def accepted(port: int, token: str) -> bool:
    """Whether a WebSocket with this token opens (and echoes); False on a 401."""
    try:
        client = await connect(port, token)
    except HTTPClientError as error:
        assert error.code == 401, error
        return False
    await client.write_message("ping")
    assert await asyncio.wait_for(client.read_message(), 5) == "ping"
    client.close()
    return True


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_token_signed_by_the_jwks_key_is_accepted(
    alg: str, app: Any, jwks: Jwks, clock: Clock, http_server: Any, http_port: int
) -> None:
    current = key(alg, f"{alg}-1")
    jwks.keys = [key("ES256", "other"), current]
    await app.server.start()
    assert jwks.requests == 1
    assert await accepted(http_port, current.token())
    # The right kid, the wrong key: a bad signature, however the rest looks.
    impostor = Key(alg, f"{alg}-1") if alg != "RS256" else key("RS256", "impostor")
    assert not await accepted(http_port, impostor.token(kid=current.kid))
    assert jwks.requests == 1  # a known kid fetches nothing


@pytest.mark.gen_test(timeout=15)
async def test_a_rotated_key_is_fetched_once_a_minute_at_most(
    app: Any,
    jwks: Jwks,
    clock: Clock,
    log: pytest.LogCaptureFixture,
    http_server: Any,
    http_port: int,
) -> None:
    old, new = key("ES256", "k1"), key("RS256", "k2")
    await app.server.start()
    assert await accepted(http_port, old.token())
    jwks.keys = [new, old]  # the issuer rotates: the new key first, the old one kept a while

    # Within a minute of the start's fetch, an unknown kid fetches nothing: 401.
    assert not await accepted(http_port, new.token())
    assert jwks.requests == 1
    assert "unknown key id 'k2'" in log.text

    clock.a_minute_later()
    assert await accepted(http_port, new.token())
    assert jwks.requests == 2
    assert await accepted(http_port, old.token())

    # Two unknown kids within the next minute: one fetch between them.
    clock.a_minute_later()
    assert not await accepted(http_port, key("ES256", "k3").token())
    assert not await accepted(http_port, key("ES256", "k4").token())
    assert jwks.requests == 3
    assert "unknown key id 'k3'" in log.text and "unknown key id 'k4'" in log.text
    assert await accepted(http_port, new.token())


@pytest.mark.gen_test(timeout=15)
async def test_clients_with_the_new_kid_at_once_share_one_fetch(
    app: Any, jwks: Jwks, clock: Clock, http_server: Any, http_port: int
) -> None:
    await app.server.start()
    new = key("EdDSA", "k2")
    jwks.keys = [new]
    jwks.delay = 0.5
    clock.a_minute_later()
    results = await asyncio.gather(*(accepted(http_port, new.token(f"u{n}")) for n in range(3)))
    assert results == [True, True, True]
    assert jwks.requests == 2


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"error": "down"}'),
        (200, b"<html>not json</html>"),
        (200, b'{"keys": []}'),
        (200, json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k9"}]}).encode()),
    ],
    ids=["500", "not-json", "no-keys", "only-a-secret"],
)
async def test_a_failed_fetch_keeps_the_keys_it_had(
    status: int,
    body: bytes,
    app: Any,
    jwks: Jwks,
    clock: Clock,
    log: pytest.LogCaptureFixture,
    http_server: Any,
    http_port: int,
) -> None:
    await app.server.start()
    jwks.status, jwks.body = status, body
    clock.a_minute_later()
    assert not await accepted(http_port, key("ES256", "k2").token())  # sets off the fetch
    assert jwks.requests == 2
    warnings = [r for r in log.records if r.levelno == logging.WARNING]
    assert any("could not fetch" in r.getMessage() for r in warnings), log.text
    assert "keeping 1 known keys" in log.text
    assert await accepted(http_port, key("ES256", "k1").token())


@pytest.mark.gen_test(timeout=15)
async def test_a_failed_first_fetch_is_tried_again_a_minute_later(
    app: Any,
    jwks: Jwks,
    clock: Clock,
    log: pytest.LogCaptureFixture,
    http_server: Any,
    http_port: int,
) -> None:
    jwks.status = 503
    await app.server.start()  # starts without keys: every token is refused meanwhile
    assert "keeping 0 known keys" in log.text
    assert not await accepted(http_port, key("ES256", "k1").token())
    assert jwks.requests == 1
    jwks.status = 200
    clock.a_minute_later()
    assert await accepted(http_port, key("ES256", "k1").token())
    assert jwks.requests == 2


@pytest.mark.gen_test(timeout=15)
async def test_a_slow_fetch_never_holds_up_the_event_loop(
    app: Any, jwks: Jwks, clock: Clock, http_server: Any, http_port: int
) -> None:
    await app.server.start()
    other = await connect(http_port, key("ES256", "k1").token("bob"))
    new = key("ES256", "k2")
    jwks.keys = [new]
    jwks.delay = 1.0
    jwks.asked.clear()
    clock.a_minute_later()
    joining = asyncio.ensure_future(accepted(http_port, new.token()))
    await asyncio.wait_for(jwks.asked.wait(), 5)  # the fetch is under way
    for n in range(3):
        started = time.monotonic()
        await other.write_message(f"echo {n}")
        assert await asyncio.wait_for(other.read_message(), 5) == f"echo {n}"
        assert time.monotonic() - started < 0.5  # a loop held by the fetch: 1 s or more
    assert not joining.done()  # still waiting on the JWKS
    assert await joining
    other.close()


# --- RemoteJwks on its own ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_remote_jwks_refetches_only_when_due(jwks_server: JwksServer) -> None:
    clock = Clock()
    remote = RemoteJwks(jwks_server.url, clock=clock)
    assert remote.due()
    await remote.refresh()
    assert [k.kid for k in remote.keys] == ["k1"]
    assert not remote.due()
    await remote.refresh()
    assert jwks_server.jwks.requests == remote.fetches == 1
    jwks_server.jwks.keys = [key("EdDSA", "k2")]
    clock.now += REFETCH_INTERVAL - 1
    assert not remote.due()
    clock.now += 1
    assert remote.due()
    await asyncio.gather(remote.refresh(), remote.refresh())  # concurrent callers share one
    assert jwks_server.jwks.requests == 2
    assert [(k.kid, k.algorithms) for k in remote.keys] == [("k2", ("EdDSA",))]


async def two_fetches(answers: list[bytes], check_first: list[str] | None = None) -> RemoteJwks:
    """A RemoteJwks fetching twice, a minute apart, from a port that answers each request
    with the next of `answers` as raw bytes (consumed); `check_first`: the kids the first
    fetch must have brought."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    clock = Clock()
    remote = RemoteJwks(f"http://127.0.0.1:{port}/jwks.json", clock=clock)
    try:
        await remote.refresh()
        if check_first is not None:
            assert [k.kid for k in remote.keys] == check_first
        clock.a_minute_later()
        await remote.refresh()
    finally:
        listener.close()
    return remote


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize(
    "answer",
    [b"garbage\r\n\r\n", b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"keys": ['],
    ids=["not-http", "cut-short"],
)
async def test_remote_jwks_keeps_its_keys_when_the_answer_is_not_http(
    answer: bytes, log: pytest.LogCaptureFixture
) -> None:
    """A port that answers garbage, or a body shorter than its length: a failed fetch."""
    answers = [b"HTTP/1.0 200 OK\r\n\r\n" + Jwks(key("ES256", "k1")).document(), answer]
    remote = await two_fetches(answers, check_first=["k1"])
    assert not answers and remote.fetches == 2
    assert [k.kid for k in remote.keys] == ["k1"]
    assert "could not fetch" in log.text and "keeping 1 known keys" in log.text


@pytest.mark.gen_test(timeout=15)
async def test_a_redirect_off_https_is_refused(log: pytest.LogCaptureFixture) -> None:
    """A redirect is followed only where auth.jwks could point: never to http elsewhere."""
    targets = ["http://10.255.255.1/jwks.json", "file:///etc/passwd"]
    answers = [b"HTTP/1.0 302 Found\r\nLocation: %s\r\n\r\n" % t.encode() for t in targets]
    started = time.monotonic()
    remote = await two_fetches(answers)
    assert time.monotonic() - started < 3  # refused at once, never tried
    assert not answers and remote.keys == []
    assert "refused a redirect to 'http://10.255.255.1/jwks.json'" in log.text
    assert "Redirection to url 'file:///etc/passwd' is not allowed" in log.text


# --- a real server ----------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_a_real_server_fetches_at_start_and_logs_an_unknown_kid() -> None:
    """`python -m echoserver --auth-jwks URL` against the JWKS app on this test's loop."""
    jwks = Jwks(key("RS256", "k1"))

    async def scenario() -> None:
        served = JwksServer(jwks)
        served.start()
        server = await asyncio.to_thread(
            lambda: ServerProcess(["--mode", "echo", "--auth-jwks", served.url]).wait_ready()
        )
        try:
            assert jwks.requests == 1
            assert await accepted(server.port, key("RS256", "k1").token())
            assert not await accepted(server.port, key("ES256", "k2").token())
            assert jwks.requests == 1  # the start's fetch was less than a minute ago
            logged = await asyncio.to_thread(
                wait_until, lambda: "unknown key id 'k2'" in server.log(), 5
            )
            assert logged, server.log()
        finally:
            await asyncio.to_thread(server.stop)
            served.stop()

    run(scenario(), timeout=30)

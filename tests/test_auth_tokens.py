"""Connection tokens at the handshake: a JWT signed with each kind of key lets its user in
on WebSocket and SSE (header or query); every refused token is a 401 whose reason is in the
server's log and never in the answer; the token itself never reaches a log line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import WebSocketClientConnection, websocket_connect

from echoserver.auth.identity import MAX_INFO_BYTES
from echoserver.config import Settings
from echoserver.web.app import make_app
from tests.authkeys import OTHER_SECRET, SECRET, jwk_of, mint, new_private_key, public_pem
from tests.conftest import make_settings

ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")


async def connect(
    port: int, token: str | None = None, path: str = "/ws", header: bool = False
) -> WebSocketClientConnection:
    url = f"ws://127.0.0.1:{port}{path}"
    headers = {}
    if token is not None and header:
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        url += ("&" if "?" in url else "?") + f"token={token}"
    return await websocket_connect(HTTPRequest(url, headers=headers, request_timeout=5))


async def refused(port: int, token: str | None, path: str = "/ws", header: bool = False) -> int:
    with pytest.raises(HTTPClientError) as info:
        client = await connect(port, token, path, header)
        client.close()
    return info.value.code


async def echoes(client: WebSocketClientConnection) -> bool:
    client.write_message("ping?")
    answer = await client.read_message()
    client.close()
    return answer == "ping?"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, str]]:
    """Each algorithm's signing key and what the server verifies with (secret or PEM path)."""
    folder = tmp_path_factory.mktemp("keys")
    out: dict[str, tuple[Any, str]] = {"HS256": (SECRET, SECRET)}
    for alg in ALGORITHMS[1:]:
        private = new_private_key(alg)
        out[alg] = (private, public_pem(private, folder / f"{alg}.pem"))
    return out


class TestEveryKindOfKey:
    @pytest.fixture
    def settings(self, keys: dict[str, tuple[Any, str]]) -> Settings:
        return make_settings(
            mode="broadcast",
            **{
                "auth.jwt_secret": (SECRET, OTHER_SECRET),  # a rollover: both verify
                "auth.jwt_public_key": (keys["RS256"][1], keys["ES256"][1]),
                "auth.jwks": self.jwks_file,
            },
        )

    @pytest.fixture(autouse=True)
    def _jwks(self, tmp_path: Path, keys: dict[str, tuple[Any, str]]) -> None:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": [jwk_of(keys["EdDSA"][0], "ed-1")]}))
        type(self).jwks_file = str(path)

    jwks_file = ""

    @pytest.mark.parametrize("alg", ALGORITHMS)
    @pytest.mark.gen_test
    async def test_a_token_of_each_algorithm_lets_its_user_in(
        self, http_server: Any, http_port: int, keys: dict[str, tuple[Any, str]], alg: str
    ) -> None:
        headers = {"kid": "ed-1"} if alg == "EdDSA" else None
        token = mint(keys[alg][0], alg, headers=headers)
        assert await echoes(await connect(http_port, token))
        assert await echoes(await connect(http_port, token, header=True))

    @pytest.mark.gen_test
    async def test_both_secrets_of_a_rollover_verify(self, http_server: Any, http_port: int):
        assert await echoes(await connect(http_port, mint(OTHER_SECRET)))
        assert await refused(http_port, mint("x" * 40)) == 401

    @pytest.mark.gen_test
    async def test_a_key_verifies_only_its_own_family(
        self, http_server: Any, http_port: int, keys: dict[str, tuple[Any, str]]
    ) -> None:
        # The RSA public key's PEM used as an HMAC secret: the classic confusion attack.
        pem = Path(keys["RS256"][1]).read_bytes()
        forged = jwt.api_jws.PyJWS()
        forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
        token = forged.encode(
            json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode(), pem, "HS256"
        )
        assert await refused(http_port, token) == 401


class TestRefusals:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(
            mode="broadcast",
            **{
                "auth.jwt_secret": (SECRET,),
                "auth.audience": "chat",
                "auth.issuer": "https://id.example",
            },
        )

    @pytest.mark.gen_test
    async def test_every_refusal_is_a_401_whose_reason_only_the_log_has(
        self, http_server: Any, http_port: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        good = {"aud": "chat", "iss": "https://id.example"}
        now = int(time.time())
        cases = [
            (None, "no token", "missing"),
            ("not-a-jwt", "malformed token", "malformed"),
            (mint(ttl=-5, **good), "expired", "expired"),
            (mint("y" * 40, **good), "bad signature", "signature"),
            (mint(aud="other", iss=good["iss"]), "wrong audience", "audience"),
            (mint(aud="chat", iss="https://evil.example"), "wrong issuer", "issuer"),
            (mint(alg="HS512", key="z" * 64, **good), "algorithm 'HS512' not allowed", "algorithm"),
            (jwt.encode({"sub": "a"}, None, "none"), "algorithm 'none' not allowed", "algorithm"),
            (mint(sub=None, **good), 'missing the "sub" claim', "claims"),
            (mint(nbf=now + 600, **good), "not yet valid", "not_yet_valid"),
            (mint(info="x" * MAX_INFO_BYTES, **good), "info claim is over", "claims"),
            (mint(channels="chat.*", **good), "channels claim must be a list", "claims"),
        ]
        caplog.set_level(logging.INFO)
        for token, reason, _ in cases:
            caplog.clear()
            body = await self._refusal_body(http_port, token)
            assert body == "missing or invalid token", reason  # the client learns no reason
            lines = [r.getMessage() for r in caplog.records if r.name == "echoserver.ws"]
            assert any(reason in line for line in lines), (reason, lines)
            if token:
                assert all(token not in r.getMessage() for r in caplog.records)
        counted = http_server.request_callback.server.metrics.tokens_refused
        assert set(counted) == {label for _, _, label in cases}
        assert await echoes(await connect(http_port, mint(**good)))

    async def _refusal_body(self, port: int, token: str | None) -> str:
        url = f"http://127.0.0.1:{port}/ws" + (f"?token={token}" if token else "")
        headers = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        response = await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False)
        assert response.code == 401
        return response.body.decode()

    @pytest.mark.gen_test
    async def test_event_streams_check_the_token_too(self, http_server: Any, http_port: int):
        good = mint(aud="chat", iss="https://id.example")
        client = AsyncHTTPClient()
        for token, status in ((None, 401), ("bad", 401), (mint(ttl=-5), 401)):
            query = f"?token={token}" if token else ""
            response = await client.fetch(
                f"http://127.0.0.1:{http_port}/sse{query}", raise_error=False, request_timeout=5
            )
            assert response.code == status
        chunks: list[bytes] = []
        request = HTTPRequest(
            f"http://127.0.0.1:{http_port}/sse",
            headers={"Authorization": f"Bearer {good}"},
            streaming_callback=chunks.append,
            request_timeout=0.5,
        )
        with pytest.raises(HTTPClientError) as info:
            await client.fetch(request)
        assert info.value.code == 599  # the stream stayed open until the client gave up
        assert b"retry:" in b"".join(chunks)


class TestAnonymous:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(**{"auth.jwt_secret": (SECRET,), "auth.anonymous": True})

    @pytest.mark.gen_test
    async def test_guests_come_in_without_a_token_and_bad_tokens_stay_out(
        self, http_server: Any, http_port: int
    ) -> None:
        assert await echoes(await connect(http_port))
        assert await refused(http_port, "bad") == 401
        assert await echoes(await connect(http_port, mint()))


@pytest.mark.parametrize(
    ("changes", "kind", "anonymous"),
    [
        ({}, "none", False),
        ({"websocket.auth_token": "t0ken"}, "token", False),
        ({"auth.jwt_secret": (SECRET,)}, "jwt", False),
        ({"auth.jwt_secret": (SECRET,), "auth.anonymous": True}, "jwt", True),
    ],
)
@pytest.mark.gen_test
async def test_healthz_says_which_token_the_server_wants(
    changes: dict[str, Any], kind: str, anonymous: bool
) -> None:
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(make_settings(**changes)))
    server.add_sockets([sock])
    try:
        response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/healthz")
        body = json.loads(response.body)
        assert (body["auth"], body["anonymous"]) == (kind, anonymous)
        response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/protocol")
        codes = json.loads(response.body)["close_codes"]
        assert codes["4001"] == "token expired"
        assert codes["4003"] == "disconnected by the server"
    finally:
        server.stop()

"""Verifier: a connection token (JWT) checked against the configured keys, by PyJWT.

The algorithm comes from the configuration (auth.algorithms, or what the keys fit), never
from the token: its header's `alg` only picks among the allowed ones, and each key verifies
only its own family (an RSA key never checks an HS256 token). A refused token raises
TokenRefused with the reason for the server's log (the client learns only "401").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt

from echoserver.auth.identity import BadClaims, Identity, from_claims
from echoserver.auth.jwks import RemoteJwks
from echoserver.config.jwt_keys import (
    HMAC,
    KNOWN,
    VerifyKey,
    hmac_algorithms,
    is_jwks_url,
    key_algorithms,
    load_public_key,
    read_jwks_file,
    read_secret,
)
from echoserver.config.settings import AuthSettings

MAX_TOKEN_CHARS = 8192  # a JWT larger than this is not a connection token


class TokenRefused(Exception):
    """Why a token was refused: `reason` for the log, `label` for the metric."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label


class UnknownKeyId(TokenRefused):
    def __init__(self, kid: str) -> None:
        super().__init__(f"unknown key id {kid[:64]!r}", "kid")


# PyJWT's exceptions, most specific first: (class, label, reason or None for its message).
_REFUSALS: tuple[tuple[type[Exception], str, str | None], ...] = (
    (jwt.ExpiredSignatureError, "expired", "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "not yet valid (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "audience", "wrong audience"),
    (jwt.InvalidIssuerError, "issuer", "wrong issuer"),
    (jwt.MissingRequiredClaimError, "claims", None),
    (jwt.InvalidAlgorithmError, "algorithm", "algorithm not allowed"),
    (jwt.DecodeError, "malformed", "malformed token"),
    (jwt.InvalidTokenError, "claims", None),
)


class Verifier:
    """The configured keys, and verify(token) -> Identity."""

    def __init__(self, settings: AuthSettings) -> None:
        self.keys: list[VerifyKey] = []
        for item in settings.jwt_secret:
            secret = read_secret(item)
            self.keys.append(VerifyKey(secret, hmac_algorithms(secret)))
        for path in settings.jwt_public_key:
            key = load_public_key(path)
            self.keys.append(VerifyKey(key, key_algorithms(key)))
        self.remote: RemoteJwks | None = None
        if is_jwks_url(settings.jwks):
            self.remote = RemoteJwks(settings.jwks)
        elif settings.jwks:
            self.keys += read_jwks_file(settings.jwks)
        if settings.algorithms:
            self.algorithms = frozenset(settings.algorithms)
        else:
            fitting = {alg for key in self.keys for alg in key.algorithms}
            if self.remote is not None:
                fitting.update(alg for alg in KNOWN if alg not in HMAC)
            self.algorithms = frozenset(fitting)
        self.audience = settings.audience or None
        self.issuer = settings.issuer or None
        self.leeway = settings.leeway
        self.enabled = bool(self.keys or self.remote)

    def secrets(self) -> list[str]:
        """The HMAC secrets as text, for the log filter to hide."""
        keys = [key.key for key in self.keys if isinstance(key.key, bytes)]
        return [key.decode("utf-8", "replace") for key in keys]

    async def start(self) -> None:
        if self.remote is not None:
            await self.remote.refresh()

    async def verify(self, token: str) -> Identity:
        """The token's identity; TokenRefused says why not. Awaits only to fetch a remote
        JWKS again for a kid it does not know (at most once a minute)."""
        try:
            return self.verify_now(token)
        except UnknownKeyId:
            if self.remote is None or not self.remote.due():
                raise
        await self.remote.refresh()
        return self.verify_now(token)

    def verify_now(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRefused(f"token over {MAX_TOKEN_CHARS} characters", "malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenRefused("malformed token", "malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg[:20] if isinstance(alg, str) else type(alg).__name__
            raise TokenRefused(f"algorithm {shown!r} not allowed", "algorithm")
        kid = header.get("kid")
        tried = False
        for key in self._candidates(alg, kid if isinstance(kid, str) else None):
            tried = True
            try:
                claims = self._decode(token, key.key, alg)
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue  # the other key of a rollover may fit
            try:
                return from_claims(claims)
            except BadClaims as err:
                raise TokenRefused(str(err), "claims") from None
        if not tried and isinstance(kid, str) and self._has_kids():
            raise UnknownKeyId(kid)
        raise TokenRefused("bad signature", "signature")

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_sub": False},
            )
        except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
            raise
        except jwt.InvalidTokenError as err:
            for kind, label, reason in _REFUSALS:
                if isinstance(err, kind):
                    raise TokenRefused(reason or str(err), label) from None
            raise  # pragma: no cover - every InvalidTokenError is in the table
        return claims

    def _candidates(self, alg: str, kid: str | None) -> Iterator[VerifyKey]:
        keys = self.keys if self.remote is None else [*self.keys, *self.remote.keys]
        for key in keys:
            if alg not in key.algorithms:
                continue
            if kid is not None and key.kid is not None and key.kid != kid:
                continue
            yield key

    def _has_kids(self) -> bool:
        return self.remote is not None or any(key.kid is not None for key in self.keys)

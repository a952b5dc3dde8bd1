"""Keys and tokens for the auth tests: an HMAC secret, and RSA, EC P-256 and Ed25519 key
pairs written as PEM files, and mint() to sign a token with any of them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET = "a-test-secret-of-at-least-32-bytes!!"
OTHER_SECRET = "another-secret-also-32-bytes-long!!!"


def new_private_key(alg: str) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


def public_pem(private_key: Any, path: Path) -> str:
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


def jwk_of(private_key: Any, kid: str) -> dict[str, Any]:
    """The public half of a key as a JWK with this kid."""
    algorithm = jwt.algorithms
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = algorithm.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = algorithm.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = algorithm.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid}


def mint(
    key: Any = SECRET,
    alg: str = "HS256",
    *,
    sub: str | None = "alice",
    ttl: float | None = 300,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token for `sub` expiring in `ttl` seconds (None: no exp)."""
    body = dict(claims)
    if sub is not None:
        body["sub"] = sub
    if ttl is not None:
        body["exp"] = int(time.time() + ttl)
    return jwt.encode(body, key, alg, headers=headers)

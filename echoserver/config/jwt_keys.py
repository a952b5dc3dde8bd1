"""The [auth] keys' rules and the key material they name: HMAC secrets (a value or
`file:PATH`), PEM public keys, JWKS files and URLs, and which algorithms each key may verify.

The check (--check-config) and the running server's verifier (auth/verifier.py) read keys
through these functions, so a file that passes the check is read the same way at start.
PyJWT and cryptography parse; nothing here verifies a token.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from echoserver.config.rules import loopback_host
from echoserver.config.values import HIDDEN

# RFC 7518 3.2: an HMAC key at least as long as the hash. Shorter secrets can be guessed
# offline from one token; PyJWT warns about them too.
MIN_SECRET_BYTES = 32
MAX_KEYS = 2  # the current one and the one before it, during a rollover

HMAC = ("HS256", "HS384", "HS512")
RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA = ("EdDSA",)
KNOWN = (*HMAC, *RSA, *EC_BY_CURVE.values(), *EDDSA)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class KeyProblem(ValueError):
    """Why a configured key cannot be used (one line, without the key's value)."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise KeyProblem(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError:
        raise KeyProblem("not a valid path") from None


def read_secret(item: str) -> bytes:
    """An HMAC secret: the value itself, or the bytes of the file after `file:` (one
    trailing newline dropped, as editors and `echo` add it)."""
    if not item.startswith("file:"):
        return item.encode()
    data = _read(item[len("file:") :])
    return data[:-1] if data.endswith(b"\n") else data


def hmac_algorithms(secret: bytes) -> tuple[str, ...]:
    """The HMAC algorithms a secret this long is fit for."""
    sizes = {"HS256": 32, "HS384": 48, "HS512": 64}
    return tuple(alg for alg in HMAC if len(secret) >= sizes[alg])


def load_public_key(path: str) -> PublicKey:
    """A PEM public key (RSA, EC on P-256/384/521, or Ed25519)."""
    try:
        key = serialization.load_pem_public_key(_read(path))
    except ValueError:
        raise KeyProblem("found no PEM public key in it") from None
    if not isinstance(key, PublicKey):
        raise KeyProblem(f"a {type(key).__name__} is not an RSA, EC or Ed25519 key")
    key_algorithms(key)  # an EC curve without a JWT algorithm
    return key


def key_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a public key verifies (never an HMAC one: RFC 8725 3.1)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise KeyProblem(f"EC curve {key.curve.name} has no JWT algorithm")
        return (alg,)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return EDDSA
    raise KeyProblem(f"a {type(key).__name__} cannot verify tokens")


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key that verifies tokens: which algorithms it may, and its kid when it has one."""

    key: Any  # bytes (an HMAC secret) or a cryptography public key
    algorithms: tuple[str, ...]
    kid: str | None = None


def parse_jwks(data: bytes) -> list[VerifyKey]:
    """A JWKS document's keys that can verify a signature: public keys (never "oct": a
    shared secret published in a JWKS is a mistake) not marked for encryption only."""
    try:
        document = json.loads(data)
        entries = [k for k in document["keys"] if isinstance(k, dict)]
    except (ValueError, KeyError, TypeError):
        raise KeyProblem('not a JWKS: a JSON object with a "keys" array') from None
    keys = []
    for entry in entries:
        if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue
        try:
            key = jwt.PyJWK(entry).key
            algorithms = key_algorithms(key)
        except (jwt.PyJWKError, jwt.InvalidKeyError, KeyProblem):
            continue
        declared = entry.get("alg")
        if isinstance(declared, str):
            algorithms = tuple(alg for alg in algorithms if alg == declared)
        kid = entry.get("kid")
        keys.append(VerifyKey(key, algorithms, kid if isinstance(kid, str) else None))
    if not keys:
        raise KeyProblem("no usable public key in it")
    return keys


def read_jwks_file(path: str) -> list[VerifyKey]:
    return parse_jwks(_read(path))


def is_jwks_url(value: str) -> bool:
    return value.startswith(("https://", "http://"))


def check_secrets(value: tuple[str, ...]) -> str | None:
    if len(value) > MAX_KEYS:
        return f"at most {MAX_KEYS} (the current secret and the previous one)"
    for item in value:
        if HIDDEN in item:
            return "this is the placeholder --print-config prints instead of the secret"
        try:
            secret = read_secret(item)
        except KeyProblem as err:
            return str(err)
        if len(secret) < MIN_SECRET_BYTES:
            return f"a secret of {len(secret)} bytes is too short to sign with"
    return None


def check_public_keys(value: tuple[str, ...]) -> str | None:
    if len(value) > MAX_KEYS:
        return f"at most {MAX_KEYS} (the current key and the previous one)"
    for path in value:
        try:
            load_public_key(path)
        except KeyProblem as err:
            return f"{path}: {err}"
    return None


def check_jwks(value: str) -> str | None:
    if value == "":
        return None
    if is_jwks_url(value):
        url = urllib.parse.urlsplit(value)
        if not url.hostname:
            return "the URL names no host"
        if url.scheme == "http" and not loopback_host(url.hostname):
            return "plain http:// only to a loopback address; use https://"
        return None
    try:
        read_jwks_file(value)
    except KeyProblem as err:
        return str(err)
    return None


def check_algorithms(value: tuple[str, ...]) -> str | None:
    for alg in value:
        if alg.lower() == "none":
            return '"none" would accept unsigned tokens'
        if alg not in KNOWN:
            return f"unknown algorithm {alg!r}"
    return None

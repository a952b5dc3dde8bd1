"""The credentials of the reconnect storm's auth comparison (bench_storm.py --auth).

A variant says how the server checks a connection and what each client presents:

- `none`: no check (the reference every other variant is divided by);
- `token`: the shared `--auth-token`, the same string from every client;
- a JWT algorithm (`hs256`, `hs384`, `hs512`, `rs256`, `ps256`, `es256`, `eddsa`): the server
  gets the secret (`--auth-jwt-secret`) or the public key as a PEM file
  (`--auth-jwt-public-key`: RSA 2048, EC P-256 or Ed25519), narrowed to that one algorithm
  (`--auth-algorithms`); every connection presents its own token, with its own `sub`.

Keys are generated with `cryptography` into a temporary directory, fresh per invocation, and
every token is minted here with PyJWT before any run starts, into a file the storm client
reads before its timed part: neither the signing nor the key generation is in a figure.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# variant -> JWT algorithm (None: not a JWT)
VARIANTS: dict[str, str | None] = {
    "none": None,
    "token": None,
    "hs256": "HS256",
    "hs384": "HS384",
    "hs512": "HS512",
    "rs256": "RS256",
    "ps256": "PS256",
    "es256": "ES256",
    "eddsa": "EdDSA",
}

# Tokens outlive any run (the server checks exp): a day.
LIFETIME_S = 86_400


def parse_variants(text: str) -> list[str]:
    """The variants of `--auth`, in order, `none` first (added when missing), no repeats."""
    wanted = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown auth variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    ordered = ["none", *wanted]
    return list(dict.fromkeys(ordered))


@dataclass(frozen=True)
class Prepared:
    """One variant, ready: the server's extra flags and the client's tokens (a file)."""

    name: str
    server_args: list[str]
    tokens_file: Path | None
    token_bytes: int  # the length of one token (the first), 0 for none
    description: str  # the flags with the secret left out, for the report
    secret: str | None = None  # what the report and error messages must not show
    decode_us: float | None = None  # PyJWT's decode of one token, alone, in this process


def _generate_key(algorithm: str) -> Any:
    """A fresh private key for an asymmetric algorithm."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if algorithm.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no key type for {algorithm}")


def _public_pem(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


_KEY_NAMES = {"RS": "rsa-2048", "PS": "rsa-2048", "ES": "ec-p256", "Ed": "ed25519"}


def mint(
    algorithm: str, key: Any, count: int, *, prefix: str = "storm", info: bool = False
) -> list[str]:
    """`count` tokens, each with its own sub (`storm-0`, `storm-1`, ...) and a day to live;
    with `info`, an `info` claim too ({"name": sub}, what presence and webhooks carry)."""
    import jwt

    exp = int(time.time()) + LIFETIME_S
    tokens = []
    for i in range(count):
        claims: dict[str, Any] = {"sub": f"{prefix}-{i}", "exp": exp}
        if info:
            claims["info"] = {"name": claims["sub"]}
        tokens.append(jwt.encode(claims, key, algorithm=algorithm))
    return tokens


def prepare(name: str, count: int, directory: Path) -> Prepared:
    """The server's flags and the client's tokens for one variant, files under `directory`."""
    algorithm = VARIANTS[name]
    if name == "none":
        return Prepared(name, [], None, 0, "no auth")
    tokens_file = directory / f"{name}.tokens"
    if name == "token":
        shared = secrets.token_urlsafe(32)
        tokens_file.write_text(shared + "\n")
        shown = "--auth-token (shared, 43 characters)"
        return Prepared(name, ["--auth-token", shared], tokens_file, len(shared), shown, shared)
    assert algorithm is not None
    secret = None
    if algorithm.startswith("HS"):
        secret = base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")
        key: Any = secret
        verify_key: Any = secret
        server = ["--auth-jwt-secret", secret]
        shown = "--auth-jwt-secret (64 characters)"
    else:
        key = _generate_key(algorithm)
        verify_key = key.public_key()
        pem = directory / f"{name}-{_KEY_NAMES[algorithm[:2]]}.pem"
        pem.write_bytes(_public_pem(key))
        server = ["--auth-jwt-public-key", str(pem)]
        shown = f"--auth-jwt-public-key {_KEY_NAMES[algorithm[:2]]}.pem"
    tokens = mint(algorithm, key, count)
    tokens_file.write_text("\n".join(tokens) + "\n")
    server += ["--auth-algorithms", algorithm]
    shown += f" --auth-algorithms {algorithm}"
    decode = decode_us(tokens, verify_key, algorithm)
    return Prepared(name, server, tokens_file, len(tokens[0]), shown, secret, decode)


def decode_us(tokens: list[str], key: Any, algorithm: str, sample: int = 300) -> float:
    """PyJWT's decode (signature and claims) of one token, on its own: the fastest of three
    passes over up to `sample` tokens, in µs. What the verification alone costs in Python,
    beside what the server's handshake pays for it."""
    import jwt

    tokens = tokens[:sample]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for token in tokens:
            jwt.decode(token, key, algorithms=[algorithm])
        best = min(best, time.perf_counter() - started)
    return best * 1e6 / len(tokens)


def read_tokens(path: str) -> list[str]:
    """The client's side: one token per line."""
    return [line for line in Path(path).read_text().splitlines() if line]

"""bench_storm.py --auth still runs: the reconnect storm with no auth, the shared token and JWTs.

Like tests/test_bench_scripts.py, these run the script as a real subprocess at a tiny scale
and check that every variant opened every connection and that the figures are there, never
how large they are; and that the credentials the script makes are what the server is told
(each JWT verifies with the key or secret given to the server, each with its own sub).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_bench_scripts import BENCH, positive, run_script

pytestmark = pytest.mark.timeout(90)

JWT_VARIANTS = ("hs256", "rs256", "es256", "eddsa")


@pytest.fixture
def storm_auth() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import storm_auth

        yield storm_auth
    finally:
        sys.path.remove(str(BENCH))


def test_every_variant_opens_every_connection_at_a_tiny_scale(tmp_path: Path) -> None:
    pytest.importorskip("jwt")
    out = tmp_path / "storm-auth.json"
    variants = ("none", "token", *JWT_VARIANTS)
    args = ["--auth", ",".join(variants[1:]), "--count", "40", "--concurrency", "10"]
    args += ["--runs", "1", "--quiet-wait", "0", "--json", str(out)]
    done = run_script("bench_storm.py", *args, timeout=80)

    report = json.loads(out.read_text())
    assert "--auth token,hs256,rs256,es256,eddsa" in report["command"]
    assert list(report["results"]) == list(variants)  # none first: the reference
    for name in variants:
        (run,) = report["results"][name]
        assert "error" not in run, (name, run)
        assert run["opened"] == 40 and run["failures"] == {}, (name, run)
        assert positive(run["handshakes_per_s"]) and positive(run["server_us_per_handshake"])
        assert run["auth"] == name
    assert "the token in ?token=" in done.stdout
    for name in variants:
        assert f"| {name} (1/1 runs)" in done.stdout
    # The secrets are random per invocation and never printed.
    assert "--auth-jwt-secret (64 characters)" in done.stdout


def test_a_token_in_the_authorization_header(tmp_path: Path) -> None:
    pytest.importorskip("jwt")
    out = tmp_path / "storm-auth.json"
    args = ["--auth", "es256", "--token-in", "header", "--count", "30", "--concurrency", "10"]
    args += ["--runs", "1", "--quiet-wait", "0", "--json", str(out)]
    done = run_script("bench_storm.py", *args, timeout=60)

    results = json.loads(out.read_text())["results"]
    for name in ("none", "es256"):
        (run,) = results[name]
        assert "error" not in run and run["opened"] == 30, (name, run)
    assert "Authorization: Bearer" in done.stdout


def test_each_token_verifies_with_what_the_server_is_given(
    tmp_path: Path, storm_auth: ModuleType
) -> None:
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    for name in ("hs512", "rs256", "ps256", "es256", "eddsa"):
        prepared = storm_auth.prepare(name, 25, tmp_path)
        flag, value, narrow, algorithm = prepared.server_args
        assert narrow == "--auth-algorithms" and algorithm == storm_auth.VARIANTS[name]
        if flag == "--auth-jwt-secret":
            key = value
            assert value not in prepared.description
        else:
            assert flag == "--auth-jwt-public-key"
            key = load_pem_public_key(Path(value).read_bytes())
        tokens = storm_auth.read_tokens(str(prepared.tokens_file))
        claims = [jwt.decode(t, key, algorithms=[algorithm]) for t in tokens]
        assert [c["sub"] for c in claims] == [f"storm-{i}" for i in range(25)]
        assert all(c["exp"] > 0 for c in claims)
        assert prepared.token_bytes == len(tokens[0])
        assert positive(prepared.decode_us)


def test_the_variants_are_checked_and_none_comes_first(storm_auth: ModuleType) -> None:
    assert storm_auth.parse_variants("es256, token,none,es256") == ["none", "es256", "token"]
    with pytest.raises(ValueError, match="hs257"):
        storm_auth.parse_variants("hs257")


def test_help_names_the_auth_comparison() -> None:
    done = run_script("bench_storm.py", "--help", timeout=30)
    assert "--auth VARIANTS" in done.stdout and "--token-in" in done.stdout

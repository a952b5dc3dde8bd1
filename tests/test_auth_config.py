"""The [auth] keys and [[namespaces]] tables: each set by its flag, variable or table, printed
back, and every bad value refused with exit 2 and one line naming the key."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from echoserver.config import ConfigError, load
from echoserver.config.settings import NamespaceSettings
from tests.authkeys import SECRET, jwk_of, new_private_key, public_pem
from tests.servers import run_once

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def error_of(**kwargs: Any) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def rsa_pem(tmp_path: Path) -> str:
    return public_pem(new_private_key("RS256"), tmp_path / "rsa.pem")


def test_every_auth_flag_sets_its_key_and_prints_back(tmp_path: Path, rsa_pem: str) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(new_private_key("ES256"), "k1")]}))
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    args = [
        "--auth-jwt-secret", f"file:{secret_file}",
        "--auth-jwt-public-key", rsa_pem,
        "--auth-jwks", str(jwks),
        "--auth-algorithms", "HS256,RS256,ES256",
        "--auth-audience", "chat", "--auth-issuer", "https://id.example",
        "--auth-leeway", "5", "--auth-anonymous",
    ]  # fmt: skip
    env = {"ECHOSERVER_NAMESPACES": '[{"pattern": "user.{sub}", "subscribe": "user"}]'}
    proc = run_once(*args, "--print-config", env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    printed = tomllib.loads(proc.stdout)
    assert printed["auth"] == {
        "jwt_secret": ["<hidden, not printed>"],  # a secret is never printed
        "jwt_public_key": [rsa_pem],
        "jwks": str(jwks),
        "algorithms": ["HS256", "RS256", "ES256"],
        "audience": "chat",
        "issuer": "https://id.example",
        "leeway": 5.0,
        "anonymous": True,
    }
    assert printed["namespaces"] == [{"pattern": "user.{sub}", "subscribe": "user"}]
    assert SECRET not in proc.stdout
    # The printed file, with its secret put back, loads to the same settings.
    path = tmp_path / "printed.toml"
    path.write_text(proc.stdout.replace('"<hidden, not printed>"', f'"file:{secret_file}"'))
    again = run_once("--config", str(path), "--check-config", env={})
    assert (again.returncode, again.stdout.strip()) == (0, "config ok"), again.stderr


def test_namespaces_from_the_file_and_the_environment_replacing_them(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[auth]\njwt_secret = ["{SECRET}"]\n'
        '[[namespaces]]\npattern = "chat.*"\npublish = "claim"\nhistory = 5\n'
        '[[namespaces]]\npattern = "news"\nhistory_ttl = 60\njoin_leave = true\n'
    )
    settings = load(str(path), env={})
    assert settings.namespaces == (
        NamespaceSettings("chat.*", publish="claim", history=5),
        NamespaceSettings("news", history_ttl=60.0, join_leave=True),
    )
    env = {"ECHOSERVER_NAMESPACES": '[{"pattern": "x"}]'}
    assert load(str(path), env=env).namespaces == (NamespaceSettings("x"),)


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({"auth.algorithms": "none"}, {}, 'auth.algorithms = ["none"] (from flag'),
        ({"auth.algorithms": "HS1"}, {}, "unknown algorithm 'HS1'"),
        ({"auth.jwt_secret": "short"}, {}, "auth.jwt_secret = <hidden>"),
        ({"auth.jwt_secret": "file:/nonexistent/s"}, {}, "cannot read /nonexistent/s"),
        ({"auth.jwt_secret": f"{SECRET},{SECRET}x,{SECRET}y"}, {}, "at most 2"),
        ({"auth.jwt_public_key": "/nonexistent.pem"}, {}, "auth.jwt_public_key"),
        ({"auth.jwks": "http://id.example/jwks"}, {}, "plain http:// only to a loopback"),
        ({"auth.jwks": "/nonexistent.json"}, {}, "auth.jwks"),
        ({"auth.leeway": "601"}, {}, "auth.leeway = 601.0"),
        ({"auth.anonymous": "true"}, {}, "auth.anonymous = true (from flag --auth-anonymous)"),
        (
            {"auth.jwt_secret": SECRET, "websocket.auth_token": "t0ken"},
            {},
            "websocket.auth_token = <hidden>",
        ),
        (
            {"auth.jwt_secret": SECRET, "auth.algorithms": "RS256"},
            {},
            "RS256 fits none of the configured keys",
        ),
        (
            {"auth.jwt_secret": SECRET, "auth.algorithms": "HS512"},  # 36 bytes < 64
            {},
            "HS512 fits none",
        ),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "u.{sub}"}]'}, "namespaces[0] (pattern"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a", "subscribe": "user"}]'}, "JWT keys"),
        ({}, {"ECHOSERVER_NAMESPACES": "[{"}, "ECHOSERVER_NAMESPACES (from the environment)"),
        ({}, {"ECHOSERVER_NAMESPACES": '{"pattern": "a"}'}, "must be an array of tables"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"subscribe": "anyone"}]'}, "has no pattern"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a", "x": 1}]'}, "namespaces[0].x"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a b"}]'}, "namespaces[0].pattern"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a", "publish": "all"}]'}, ".publish"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a", "history": -2}]'}, ".history = -2"),
        ({}, {"ECHOSERVER_NAMESPACES": '[{"pattern": "a", "history": "5"}]'}, "got a string"),
    ],
)
def test_bad_auth_settings_are_refused_naming_the_key(
    flags: dict[str, str], env: dict[str, str], expected: str
) -> None:
    message = error_of(flags=flags, env=env)
    assert expected in message, message
    assert SECRET not in message


def test_a_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_once("--auth-jwt-secret", SECRET, "--auth-algorithms", "none", "--check-config")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "auth.algorithms" in proc.stderr
    not_a_key = tmp_path / "x.pem"
    not_a_key.write_text("hello\n")
    proc = run_once("--auth-jwt-public-key", str(not_a_key), "--check-config")
    assert proc.returncode == 2
    assert "auth.jwt_public_key" in proc.stderr and "found no PEM public key" in proc.stderr


def test_a_jwks_file_without_a_usable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    assert "no usable public key" in error_of(flags={"auth.jwks": str(path)})
    path.write_text("[]")
    assert 'a JSON object with a "keys" array' in error_of(flags={"auth.jwks": str(path)})


def test_the_example_namespaces_load() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "namespaces.toml"
    proc = run_once(
        "--config", str(example), "--mode", "mixed", "--auth-jwt-secret", SECRET, "--check-config"
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "config ok"), proc.stderr
    assert [
        ns.pattern
        for ns in load(str(example), env={}, flags={"auth.jwt_secret": SECRET}).namespaces
    ] == [
        "user.{sub}",
        "dash.*",
        "room.*",
    ]

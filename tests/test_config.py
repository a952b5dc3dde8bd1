"""Unit tests for echoserver.config: the KEYS table, load() layering, validation, to_toml."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from echoserver import config, routes
from echoserver.config import KEYS, ConfigError, Settings, load, to_toml
from echoserver.web.app import make_app
from tests.certs import tls_pair
from tests.servers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = ROOT / "config" / "echoserver.toml"
REDIS_EXAMPLE = ROOT / "config" / "broadcast-redis.toml"


def write(tmp_path: Path, text: str, name: str = "echoserver.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def page_dir(directory: Path) -> Path:
    """`directory` made a valid static_dir: it holds an index.html."""
    directory.mkdir(exist_ok=True)
    (directory / "index.html").write_text("<html></html>", encoding="utf-8")
    return directory


def get(settings: Settings, dotted: str) -> Any:
    obj: Any = settings
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def error_of(**kwargs: Any) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- the KEYS table ---------------------------------------------------------------------


def leaf_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    defaults = Settings()
    for fld in dataclasses.fields(Settings):
        if fld.name == "namespaces":
            continue  # a list of tables, not keys: test_auth_config.py
        value = getattr(defaults, fld.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{fld.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[fld.name] = value
    return out


def test_keys_describe_every_settings_field_once() -> None:
    fields = leaf_fields()
    assert [k.name for k in KEYS] == list(fields)
    for key in KEYS:
        assert key.default == fields[key.name]
        assert key.type is type(fields[key.name])
        assert key.doc and "\n" not in key.doc
        assert key.allowed
        assert key.rule.check(key.default) is None, key.name


def test_env_names_and_flags_are_derived_and_unique() -> None:
    envs = [k.env for k in KEYS]
    flags = [k.flag for k in KEYS]
    assert len(set(envs)) == len(envs)
    assert len(set(flags)) == len(flags)
    for key in KEYS:
        assert key.env == "ECHOSERVER_" + key.name.replace(".", "_").upper()
    by_name = {k.name: k for k in KEYS}
    assert by_name["mode"].env == "ECHOSERVER_MODE"
    assert by_name["websocket.max_message_size"].env == "ECHOSERVER_WEBSOCKET_MAX_MESSAGE_SIZE"
    assert by_name["broadcast.broker"].env == "ECHOSERVER_BROADCAST_BROKER"
    assert by_name["tls.certfile"].env == "ECHOSERVER_TLS_CERTFILE"
    assert by_name["log.level"].env == "ECHOSERVER_LOG_LEVEL"
    assert by_name["static_dir"].flag == "--static-dir"
    assert by_name["websocket.path"].flag == "--path"
    assert by_name["websocket.allowed_origins"].flag == "--allowed-origins"
    assert by_name["broadcast.broker"].flag == "--broker"
    assert by_name["tls.keyfile"].flag == "--tls-keyfile"
    assert by_name["log.access"].flag == "--log-access"


# --- defaults and the shipped config files -------------------------------------------------


def test_no_layers_gives_defaults() -> None:
    assert load(env={}) == Settings()
    assert load(env={}, flags={}) == Settings()


def test_example_file_loads_to_exactly_the_defaults() -> None:
    assert load(config_path=str(EXAMPLE), env={}) == Settings()


def test_example_file_documents_every_key_in_its_section() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    section = ""
    seen: dict[str, str] = {}
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.fullmatch(r"(\w+) = (.*)", line):
            name = f"{section}.{m.group(1)}" if section else m.group(1)
            seen[name] = m.group(2)
            above = lines[i - 1]
            assert above.startswith("# ") and len(above) > 10, f"no comment above {name}"
    for key in KEYS:
        assert key.name in seen, f"{key.name} missing from {EXAMPLE}"
        assert seen[key.name] == config.format_value(key.default), key.name
    assert len(seen) == len(KEYS)


def test_example_file_is_what_to_toml_writes() -> None:
    """The example's key lines and comments come from KEYS; only its header is written."""
    assert EXAMPLE.read_text(encoding="utf-8").endswith(to_toml(Settings(), comments=True))


def test_redis_example_loads() -> None:
    settings = load(config_path=str(REDIS_EXAMPLE), env={})
    assert settings.mode == "broadcast"
    assert settings.host == "0.0.0.0"
    assert settings.processes == 0
    assert settings.broadcast.broker == "redis://127.0.0.1:6379/0"
    assert settings.broadcast.history == 50
    assert settings.log.format == "json"


def test_redis_example_with_memory_broker_override_is_refused() -> None:
    message = error_of(
        config_path=str(REDIS_EXAMPLE), env={"ECHOSERVER_BROADCAST_BROKER": "memory"}
    )
    assert message.startswith("processes = 0 (from file ")
    assert 'broadcast.broker = "redis://...' in message


# --- precedence -------------------------------------------------------------------------

# key, file value (TOML), env value, flag value, and the typed value of each layer
PRECEDENCE = [
    ("port", "9001", "9002", "9003", (8888, 9001, 9002, 9003)),
    ("mode", '"broadcast"', "mixed", "echo", ("echo", "broadcast", "mixed", "echo")),
    ("websocket.max_message_size", "2048", "4096", "8192", (1048576, 2048, 4096, 8192)),
    ("websocket.ping_interval", "30", "40.5", "50", (20.0, 30.0, 40.5, 50.0)),
    ("websocket.compression", "true", "false", "yes", (False, True, False, True)),
    (
        "websocket.allowed_origins",
        '["https://a.example"]',
        "https://b.example, ,https://c.example:8443",
        "*",
        ((), ("https://a.example",), ("https://b.example", "https://c.example:8443"), ("*",)),
    ),
    ("broadcast.include_sender", "false", "1", "no", (True, False, True, False)),
    ("broadcast.broker", '"redis://h1/0"', "rediss://h2:6380/1", "unix:///run/r.sock", None),
    ("log.level", '"debug"', "warning", "error", ("info", "debug", "warning", "error")),
]


@pytest.mark.parametrize(("name", "file_value", "env_value", "flag_value", "expected"), PRECEDENCE)
def test_each_layer_overrides_the_one_below(
    tmp_path: Path, name: str, file_value: str, env_value: str, flag_value: str, expected: Any
) -> None:
    if expected is None:
        expected = ("memory", "redis://h1/0", "rediss://h2:6380/1", "unix:///run/r.sock")
    section, _, attr = name.rpartition(".")
    text = (f"[{section}]\n" if section else "") + f"{attr} = {file_value}\n"
    path = write(tmp_path, text)
    env = {config._BY_NAME[name].env: env_value}
    # ping_timeout must not exceed ping_interval: keep pings consistent when testing it
    extra = {"websocket.ping_timeout": 1} if name == "websocket.ping_interval" else {}
    assert get(load(env={}, flags=extra), name) == expected[0]
    assert get(load(config_path=path, env={}, flags=extra), name) == expected[1]
    assert get(load(config_path=path, env=env, flags=extra), name) == expected[2]
    flags = {**extra, name: flag_value}
    assert get(load(config_path=path, env=env, flags=flags), name) == expected[3]


def test_layers_combine_across_keys(tmp_path: Path) -> None:
    path = write(tmp_path, 'mode = "broadcast"\nport = 1\n[log]\nlevel = "debug"\n')
    env = {"ECHOSERVER_PORT": "2", "ECHOSERVER_LOG_FORMAT": "json"}
    settings = load(config_path=path, env=env, flags={"log.level": "error", "host": "0.0.0.0"})
    assert (settings.mode, settings.port, settings.host) == ("broadcast", 2, "0.0.0.0")
    assert (settings.log.level, settings.log.format) == ("error", "json")


def test_config_path_comes_from_env_unless_given(tmp_path: Path) -> None:
    from_env = write(tmp_path, "port = 1111\n", "env.toml")
    given = write(tmp_path, "port = 2222\n", "given.toml")
    assert load(env={"ECHOSERVER_CONFIG": from_env}).port == 1111
    assert load(config_path=given, env={"ECHOSERVER_CONFIG": from_env}).port == 2222
    assert load(config_path="", env={"ECHOSERVER_CONFIG": from_env}).port == 8888
    assert load(env={"ECHOSERVER_CONFIG": ""}).port == 8888


def test_env_none_means_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOSERVER_CONFIG", raising=False)
    monkeypatch.setenv("ECHOSERVER_PORT", "4321")
    assert load().port == 4321


def test_validation_is_of_the_merged_result(tmp_path: Path) -> None:
    # a bad value in a lower layer is fine when a higher layer replaces it ...
    path = write(tmp_path, "port = 70000\n")
    assert load(config_path=path, env={"ECHOSERVER_PORT": "80"}).port == 80
    # ... and the error names the layer the surviving bad value came from
    path = write(tmp_path, "port = 80\n")
    message = error_of(config_path=path, env={"ECHOSERVER_PORT": "70000"})
    assert message.startswith("port = 70000 (from env ECHOSERVER_PORT)")
    message = error_of(config_path=path, flags={"port": 70000})
    assert message.startswith("port = 70000 (from flag --port)")


# --- env and flag parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("Yes", True)],
        *[("false", False), ("0", False), ("NO", False), (" false ", False)],
    ],
)
def test_env_booleans(text: str, value: bool) -> None:
    assert load(env={"ECHOSERVER_WEBSOCKET_COMPRESSION": text}).websocket.compression is value


@pytest.mark.parametrize("text", ["", "on", "y", "2", "truthy"])
def test_env_bad_booleans(text: str) -> None:
    message = error_of(env={"ECHOSERVER_WEBSOCKET_COMPRESSION": text})
    assert message.startswith(
        f'websocket.compression = "{text}" (from env ECHOSERVER_WEBSOCKET_COMPRESSION): '
        "must be true or false"
    )


@pytest.mark.parametrize("text", ["", "1.5", "1_000", "0x10", "1e3", "eighty", "8 8"])
def test_env_ints_are_strict(text: str) -> None:
    message = error_of(env={"ECHOSERVER_PORT": text})
    assert f'port = "{text}" (from env ECHOSERVER_PORT): must be an integer 0..65535' in message


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1_0", "", "1,5", "0x1"])
def test_env_floats_are_strict(text: str) -> None:
    message = error_of(env={"ECHOSERVER_WEBSOCKET_RATE_LIMIT": text})
    assert "(from env ECHOSERVER_WEBSOCKET_RATE_LIMIT): must be a number >= 0" in message


def test_env_numbers_accept_surrounding_space_and_signs() -> None:
    env = {"ECHOSERVER_PORT": " 80 ", "ECHOSERVER_WEBSOCKET_RATE_LIMIT": "+.5"}
    settings = load(env=env)
    assert (settings.port, settings.websocket.rate_limit) == (80, 0.5)


def test_env_lists_and_strings() -> None:
    env = {
        "ECHOSERVER_WEBSOCKET_ALLOWED_ORIGINS": " ,, ",
        "ECHOSERVER_WEBSOCKET_AUTH_TOKEN": "s3cr3t",
        "ECHOSERVER_HOST": "::",
    }
    settings = load(env=env)
    assert settings.websocket.allowed_origins == ()
    assert settings.websocket.auth_token == "s3cr3t"
    assert settings.host == "::"


def test_a_misspelled_env_var_is_an_error_like_an_unknown_key() -> None:
    message = error_of(env={"ECHOSERVER_MDOE": "broadcast"})
    assert message.startswith("unknown variable ECHOSERVER_MDOE (in the environment)")
    assert message.endswith("did you mean ECHOSERVER_MODE?")
    message = error_of(env={"ECHOSERVER_WEBSOCKET_PAHT": "/x", "ECHOSERVER_PORT": "1"})
    assert "did you mean ECHOSERVER_WEBSOCKET_PATH?" in message
    for name in ("ECHOSERVER_TLS", "ECHOSERVER_", "ECHOSERVER_TEST_LOOP"):
        assert f"unknown variable {name} " in error_of(env={name: "x"})


def test_other_env_vars_are_ignored(tmp_path: Path) -> None:
    env = {"ECHOSERVER": "x", "echoserver_mode": "y", "ECHOSERVERX_MODE": "z", "PATH": "/"}
    assert load(env=env) == Settings()
    assert load(env={"ECHOSERVER_CONFIG": write(tmp_path, "port = 1\n")}).port == 1


def test_flags_accept_typed_values_and_skip_none() -> None:
    flags = {
        "port": 0,
        "shutdown_timeout": 3,
        "websocket.compression": True,
        "websocket.allowed_origins": ["https://a.example"],
        "mode": None,
    }
    settings = load(env={}, flags=flags)
    assert settings.port == 0
    assert settings.shutdown_timeout == 3.0 and isinstance(settings.shutdown_timeout, float)
    assert settings.websocket.compression is True
    assert settings.websocket.allowed_origins == ("https://a.example",)
    assert settings.mode == "echo"


def test_flags_reject_wrong_types_and_unknown_keys() -> None:
    assert error_of(flags={"port": True}).startswith("port = true (from flag --port)")
    assert error_of(flags={"port": 1.5}).startswith("port = 1.5 (from flag --port)")
    message = error_of(flags={"websocket.pth": "/x"})
    assert "unknown key websocket.pth" in message and "websocket.path" in message


# --- file errors ----------------------------------------------------------------------


def test_unknown_key_in_section(tmp_path: Path) -> None:
    path = write(tmp_path, '[websocket]\npth = "/x"\n')
    message = error_of(config_path=path)
    assert f"unknown key websocket.pth (in file {path})" in message
    assert "did you mean websocket.path?" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "prot = 80\n")
    message = error_of(config_path=path)
    assert f"unknown key prot (in file {path})" in message and "port" in message


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[websockets]\npath = '/x'\n")
    message = error_of(config_path=path)
    assert f"unknown section [websockets] (in file {path})" in message
    assert "[websocket]" in message


def test_nested_table_inside_section_is_an_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[websocket.extra]\na = 1\n")
    assert "unknown key websocket.extra" in error_of(config_path=path)


def test_section_given_as_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, "log = 1\n")
    message = error_of(config_path=path)
    assert message.startswith(f"log = 1 (from file {path}): must be the table [log]")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('port = "80"', 'port = "80" (from file {p}): must be an integer 0..65535; got a string'),
        ("port = true", "port = true (from file {p}): must be an integer"),
        ("port = 80.0", "port = 80.0 (from file {p}): must be an integer"),
        (
            '[broadcast]\ninclude_sender = "yes"',
            'broadcast.include_sender = "yes" (from file {p}): must be true or false',
        ),
        ("[websocket]\ncompression = 1", "websocket.compression = 1 (from file {p}): must be"),
        ("[websocket]\nrate_limit = false", "websocket.rate_limit = false (from file {p})"),
        (
            '[websocket]\nallowed_origins = "*"',
            'websocket.allowed_origins = "*" (from file {p}): must be a list',
        ),
        (
            "[websocket]\nallowed_origins = [1]",
            "websocket.allowed_origins = [1] (from file {p}): must be a list",
        ),
        ("mode = 2024-01-01", "mode = 2024-01-01 (from file {p}): must be one of"),
    ],
)
def test_wrong_toml_types(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml + "\n")
    assert expected.format(p=path) in error_of(config_path=path)


def test_int_is_accepted_for_a_float_key(tmp_path: Path) -> None:
    path = write(tmp_path, "shutdown_timeout = 3\n[websocket]\nping_interval = 0\n")
    settings = load(config_path=path, env={})
    assert settings.shutdown_timeout == 3.0 and isinstance(settings.shutdown_timeout, float)
    assert settings.websocket.ping_interval == 0.0


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    message = error_of(config_path=path)
    assert message == f"config file {path}: cannot read: No such file or directory"
    message = error_of(env={"ECHOSERVER_CONFIG": path})
    assert message.startswith(f"config file {path} (from env ECHOSERVER_CONFIG): cannot read")


def test_directory_as_file(tmp_path: Path) -> None:
    message = error_of(config_path=str(tmp_path))
    assert message == f"config file {tmp_path}: cannot read: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n")
    os.chmod(path, 0)
    assert error_of(config_path=path) == f"config file {path}: cannot read: Permission denied"


@pytest.mark.parametrize(
    "text", ["port = \n", "[websocket\n", "port = 1\nport = 2\n", 'a = "\n"\n', "x = [1,"]
)
def test_malformed_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert error_of(config_path=path).startswith(f"config file {path}: invalid TOML: ")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'host = "caf\xe9"\n')
    assert error_of(config_path=str(path)).startswith(f"config file {path}: invalid TOML: ")


# --- ranges and allowed values --------------------------------------------------------

BAD_VALUES = [
    ("mode", "loud", 'must be one of "echo", "broadcast", "mixed"'),
    ("host", "", "must be a host name or IP address"),
    ("host", "local host", "must be a host name or IP address"),
    # Would go to DNS as names: refused without a lookup.
    ("host", "999.1.1.1", "not a valid IPv4 or IPv6 address"),
    ("host", "1.2.3", "not a valid IPv4 or IPv6 address"),
    ("host", "::g", "not a valid IPv4 or IPv6 address"),
    ("port", 70000, "must be an integer 0..65535"),
    ("port", -1, "must be an integer 0..65535"),
    ("processes", -1, "must be an integer >= 0"),
    ("static_dir", "/nonexistent/dir", 'must be "" for the page shipped with the package'),
    ("shutdown_timeout", -0.5, "must be a number >= 0"),
    ("websocket.path", "ws", "must be a URL path"),
    ("websocket.path", "/", "must be a URL path"),
    ("websocket.path", "/ws/", "must be a URL path"),
    ("websocket.path", "/a//b", "must be a URL path"),
    ("websocket.path", "/w s", "must be a URL path"),
    ("websocket.path", "/static", "clash with the server's own route /static"),
    ("websocket.path", "/static/ws", "clash with the server's own route /static"),
    ("websocket.path", "/healthz/ws", "clash with the server's own route /healthz"),
    ("websocket.path", "/metrics", "clash with the server's own route /metrics"),
    ("websocket.path", "/api", "clash with the server's own route /api/channels"),
    ("websocket.path", "/api/channels", "clash with the server's own route /api/channels"),
    ("websocket.path", "/api/channels/x", "clash with the server's own route /api/channels"),
    ("websocket.path", "/api/channels/x/messages", "clash with the server's own route"),
    ("websocket.path", "/sse", "clash with the server's own route /sse"),
    ("websocket.path", "/sse/room", "clash with the server's own route /sse"),
    ("websocket.path", "/favicon.ico", "clash with the server's own route /favicon.ico"),
    ("websocket.path", "/robots.txt", "clash with the server's own route /robots.txt"),
    ("websocket.max_message_size", -5, "must be an integer 1..2147483648"),
    ("websocket.max_message_size", 0, "must be an integer 1..2147483648"),
    ("websocket.max_message_size", 2**31 + 1, "must be an integer 1..2147483648"),
    ("websocket.ping_interval", -1, "must be a number >= 0"),
    ("websocket.ping_timeout", 0, "must be a number > 0"),
    ("websocket.ping_timeout", float("nan"), "must be a number > 0"),
    ("websocket.max_connections", -1, "must be an integer >= 0"),
    ("websocket.allowed_origins", ["https://a.example/"], 'bad item "https://a.example/"'),
    ("websocket.allowed_origins", ["a.example"], 'bad item "a.example"'),
    ("websocket.allowed_origins", ["https://A.example"], 'bad item "https://A.example"'),
    ("websocket.allowed_origins", ["*", "https://a.example"], '"*" must be the only item'),
    ("websocket.rate_limit", -1, "must be a number >= 0"),
    ("websocket.rate_limit", float("inf"), "must be a number >= 0"),
    ("broadcast.max_queue_bytes", 1023, "must be an integer >= 1024"),
    ("broadcast.slow_client", "x", 'must be one of "drop", "disconnect"'),
    ("broadcast.history", 10001, "must be an integer 0..10000"),
    ("broadcast.history", -1, "must be an integer 0..10000"),
    ("broadcast.broker", "redis", 'must be "memory" or a Redis URL'),
    ("broadcast.broker", "http://h:6379", 'must be "memory" or a Redis URL'),
    ("broadcast.broker", "redis://h:99999", "Port out of range"),
    ("broadcast.broker", "unix://", "needs a socket path"),
    ("broadcast.broker", "Memory", 'must be "memory" or a Redis URL'),
    ("broadcast.broker", "redis-cluster://", "'' is not host:port"),
    ("broadcast.broker", "redis-cluster://h1:7000,h2", "'h2' is not host:port"),
    ("broadcast.broker", "redis-cluster://h1:7000,,h2:7001", "'' is not host:port"),
    ("broadcast.broker", "rediss-cluster://h1:70000", "'h1:70000' is not host:port"),
    ("broadcast.broker", "redis-cluster://h1:7000/2", "database 0 only"),
    ("log.level", "verbose", 'must be one of "debug", "info", "warning", "error"'),
    ("log.level", "INFO", 'must be one of "debug", "info", "warning", "error"'),
    ("log.format", "xml", 'must be one of "text", "json"'),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_out_of_range_values_name_key_value_source_and_allowed(
    name: str, value: Any, allowed: str
) -> None:
    message = error_of(flags={name: value})
    key = config._BY_NAME[name]
    shown = config.format_value(float(value) if key.type is float else value)
    assert message.startswith(f"{name} = {shown} (from flag {key.flag}): ")
    assert allowed in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("host", "0.0.0.0"),
        ("host", "::1"),
        ("host", "example.internal"),
        ("port", 0),
        ("port", 65535),
        ("processes", 0),
        ("websocket.path", "/a/b.c_d-e"),
        ("websocket.max_message_size", 2**31),
        ("websocket.ping_interval", 0),
        ("websocket.max_connections", 0),
        ("websocket.allowed_origins", ["*"]),
        ("websocket.allowed_origins", ["http://[::1]:8080", "https://a.example:8443"]),
        ("broadcast.max_queue_bytes", 1024),
        ("broadcast.history", 10000),
        ("broadcast.broker", "redis://"),
        ("broadcast.broker", "rediss://:pw@redis.internal:6380/2"),
        ("broadcast.broker", "unix:///run/redis.sock?db=1"),
        ("broadcast.broker", "redis-cluster://10.0.0.1:7000"),
        ("broadcast.broker", "redis-cluster://10.0.0.1:7000,10.0.0.2:7001,h3:7002/0"),
        ("broadcast.broker", "rediss-cluster://u:p@[::1]:7000,[::1]:7001?ssl_cert_reqs=none"),
    ],
)
def test_edge_values_are_accepted(name: str, value: Any) -> None:
    got = get(load(env={}, flags={name: value}), name)
    assert got == (tuple(value) if isinstance(value, list) else value)


def test_static_dir_must_exist(tmp_path: Path) -> None:
    page = str(page_dir(tmp_path / "page"))
    assert load(env={}, flags={"static_dir": page}).static_dir == page
    message = error_of(flags={"static_dir": str(tmp_path / "missing")})
    assert "no such directory" in message


def test_static_dir_must_hold_the_page(tmp_path: Path) -> None:
    """A directory without index.html used to be accepted, and then / answered 404."""
    message = error_of(flags={"static_dir": str(tmp_path)})
    assert message.startswith(f'static_dir = "{tmp_path}" (from flag --static-dir): ')
    assert "it has no index.html" in message


@pytest.mark.parametrize(
    "path",
    ["/ws", "/socket", "/v1/ws", "/apis", "/api-ws", "/ssex", "/metricsx", "/static.ws", "/ws/api"],
)
def test_websocket_paths_beside_the_routes_are_fine(path: str) -> None:
    assert load(env={}, flags={"websocket.path": path}).websocket.path == path


@pytest.mark.parametrize("mode", ["echo", "broadcast"])
def test_the_app_serves_nothing_outside_the_route_table(mode: str) -> None:
    """Every route of the Application lies inside routes.RESERVED (or is the page, or
    the WebSocket path): the table config checks against is the one the app is built from."""
    app = make_app(config.load(env={}, flags={"mode": mode, "websocket.path": "/sock"}))
    tails = ("", "/x", "/x/messages", "/x/connections", "/x/presence")
    samples = [f"{prefix}{tail}" for prefix in routes.RESERVED for tail in tails]
    seen_ws = 0
    for rule in app.wildcard_router.rules:
        regex = rule.matcher.regex  # type: ignore[attr-defined]
        if regex.match("/sock/room") or regex.match("/sock"):
            seen_ws += 1
            continue
        assert regex.match("/") or any(regex.match(sample) for sample in samples), regex
    assert seen_ws == (1 if mode == "echo" else 2)


def test_secrets_are_not_echoed_in_errors() -> None:
    message = error_of(flags={"websocket.auth_token": "top secret"})
    assert message.startswith("websocket.auth_token = <hidden> (from flag --auth-token)")
    assert "secret" not in message.replace("secret a client", "")
    message = error_of(flags={"broadcast.broker": "redis://:hunter2@h:99999/0"})
    assert "hunter2" not in message and "redis://:***@h:99999/0" in message
    message = error_of(env={"ECHOSERVER_BROADCAST_BROKER": "rediss-cluster://u:hunter2@h1:1,h2"})
    assert message.startswith("broadcast.broker = ") and "hunter2" not in message
    assert "rediss-cluster://u:***@h1:1,h2" in message and "'h2' is not host:port" in message


# --- cross-field checks ---------------------------------------------------------------


def test_tls_both_or_neither(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path)
    settings = load(env={}, flags={"tls.certfile": cert, "tls.keyfile": key})
    assert (settings.tls.certfile, settings.tls.keyfile) == (cert, key)
    message = error_of(flags={"tls.certfile": cert})
    assert message.startswith('tls.keyfile = "" (from default): must be set too')
    assert f'tls.certfile = "{cert}" (from flag --tls-certfile)' in message
    message = error_of(env={"ECHOSERVER_TLS_KEYFILE": key})
    assert message.startswith('tls.certfile = "" (from default): must be set too')


def test_tls_files_must_be_readable(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path)
    missing = str(tmp_path / "missing.pem")
    message = error_of(flags={"tls.certfile": missing, "tls.keyfile": key})
    assert message.startswith(f'tls.certfile = "{missing}" (from flag --tls-certfile)')
    assert "No such file or directory" in message
    message = error_of(flags={"tls.certfile": cert, "tls.keyfile": str(tmp_path)})
    assert "it is a directory" in message


def test_tls_files_must_be_pem_and_match(tmp_path: Path) -> None:
    """Checked when the settings load (so by --check-config too), not at the first client."""
    cert, key = tls_pair(tmp_path, "one")
    other_cert, other_key = tls_pair(tmp_path, "two")
    locked_cert, locked_key = tls_pair(tmp_path, "locked", passphrase=b"pw")
    junk = write(tmp_path, "not a certificate\n", "junk.pem")
    der = tmp_path / "cert.der"
    der.write_bytes(x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(
        serialization.Encoding.DER
    ))  # fmt: skip

    def tls_error(certfile: str, keyfile: str) -> str:
        return error_of(env={}, flags={"tls.certfile": certfile, "tls.keyfile": keyfile})

    for bad_cert in (junk, str(der), key):
        message = tls_error(bad_cert, key)
        assert message.startswith(f'tls.certfile = "{bad_cert}" (from flag --tls-certfile): ')
        assert "must be a PEM certificate chain" in message
    for bad_key in (junk, cert):
        message = tls_error(cert, bad_key)
        assert message.startswith(f'tls.keyfile = "{bad_key}" (from flag --tls-keyfile): ')
        assert "must be a PEM private key" in message
    message = tls_error(cert, other_key)
    assert message == (
        f'tls.keyfile = "{other_key}" (from flag --tls-keyfile): must be the private key of '
        f'tls.certfile = "{cert}" (from flag --tls-certfile); they do not match'
    )
    assert "without a passphrase" in tls_error(locked_cert, locked_key)
    assert load(env={}, flags={"tls.certfile": other_cert, "tls.keyfile": other_key}).tls


@pytest.mark.parametrize("mode", ["broadcast", "mixed"])
@pytest.mark.parametrize("processes", [0, 2])
def test_many_processes_need_a_shared_broker(mode: str, processes: int) -> None:
    message = error_of(env={"ECHOSERVER_MODE": mode}, flags={"processes": processes})
    assert message.startswith(f"processes = {processes} (from flag --processes): must be 1")
    assert f'mode = "{mode}" (from env ECHOSERVER_MODE)' in message
    assert 'configure a Redis broker (broadcast.broker = "redis://...")' in message
    flags = {"processes": processes, "broadcast.broker": "redis://127.0.0.1:6379/0"}
    assert load(env={"ECHOSERVER_MODE": mode}, flags=flags).processes == processes


def test_many_processes_are_fine_in_echo_mode() -> None:
    assert load(env={}, flags={"processes": 4}).processes == 4


def test_ping_timeout_at_most_ping_interval() -> None:
    message = error_of(flags={"websocket.ping_timeout": 30})
    assert message.startswith("websocket.ping_timeout = 30.0 (from flag --ping-timeout)")
    assert "<= websocket.ping_interval (20.0 from default)" in message
    flags = {"websocket.ping_interval": 0, "websocket.ping_timeout": 30}
    assert load(env={}, flags=flags).websocket.ping_timeout == 30.0


def test_default_ping_timeout_follows_a_lower_ping_interval(tmp_path: Path) -> None:
    settings = load(env={"ECHOSERVER_WEBSOCKET_PING_INTERVAL": "5"})
    assert (settings.websocket.ping_interval, settings.websocket.ping_timeout) == (5.0, 5.0)
    assert load(config_path=write(tmp_path, to_toml(settings)), env={}) == settings
    settings = load(env={}, flags={"websocket.ping_interval": 5, "websocket.ping_timeout": 2})
    assert settings.websocket.ping_timeout == 2.0


# --- to_toml --------------------------------------------------------------------------


def test_protect_reads_needs_an_api_key() -> None:
    with pytest.raises(ConfigError, match=r"^api.protect_reads = true \(from flag"):
        load(env={}, flags={"api.protect_reads": True})
    settings = load(env={}, flags={"api.protect_reads": True, "api.key": "k"})
    assert settings.api.protect_reads


@pytest.mark.parametrize("hosts", [("*", "a"), ("Upper.example",), ("a b",), ("x/y",)])
def test_allowed_hosts_refuses_bad_items(hosts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match=r"^websocket.allowed_hosts = "):
        load(env={}, flags={"websocket.allowed_hosts": list(hosts)})


def test_allowed_hosts_takes_names_ports_and_brackets() -> None:
    hosts = ("chat.example", "chat.example:8443", "[::1]:8888", "10.0.0.5")
    assert (
        load(env={}, flags={"websocket.allowed_hosts": list(hosts)}).websocket.allowed_hosts
        == hosts
    )


def test_to_toml_round_trips_defaults(tmp_path: Path) -> None:
    text = to_toml(Settings())
    assert set(tomllib.loads(text)) == {k.name for k in KEYS if "." not in k.name} | {
        "websocket",
        "broadcast",
        "api",
        "tls",
        "log",
        "limits",
        "auth",
        "webhooks",
    }
    assert load(config_path=write(tmp_path, text), env={}) == Settings()


def test_to_toml_round_trips_awkward_values(tmp_path: Path) -> None:
    odd_dir = page_dir(tmp_path / 'we"ird\\dir ü\t')
    cert, key = tls_pair(tmp_path)
    flags = {
        "mode": "mixed",
        "port": 0,
        "processes": 3,
        "static_dir": str(odd_dir),
        "shutdown_timeout": 1e-05,
        "websocket.allowed_origins": "https://a.example,http://[::1]:9",
        "websocket.auth_token": 'x"y\\z',
        "websocket.rate_limit": 12.5,
        "websocket.ping_interval": 1e20,
        "broadcast.broker": "rediss://:p%40ss@r:6380/0",
        "broadcast.include_sender": False,
        "tls.certfile": cert,
        "tls.keyfile": key,
    }
    settings = load(env={}, flags=flags)
    text = to_toml(settings, secrets=True)
    assert load(config_path=write(tmp_path, text), env={}) == settings
    commented = to_toml(settings, comments=True, secrets=True)
    assert load(config_path=write(tmp_path, commented, "c.toml"), env={}) == settings


def test_to_toml_hides_secrets_unless_asked(tmp_path: Path) -> None:
    settings = load(env={}, flags={"websocket.auth_token": "s3cr3t"})
    text = to_toml(settings)
    assert "s3cr3t" not in text
    lines = text.splitlines()
    at = lines.index(f"auth_token = {config.format_value(config.HIDDEN)}")
    assert lines[at - 1].startswith("# websocket.auth_token is set but not printed")
    # The placeholder is never taken for a token: reusing the printed file fails loudly.
    message = error_of(config_path=write(tmp_path, text))
    assert message.startswith("websocket.auth_token = <hidden> (from file ")
    assert "placeholder" in message
    assert 'auth_token = "s3cr3t"' in to_toml(settings, secrets=True)
    assert 'auth_token = ""' in to_toml(Settings())  # nothing to hide


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr3t@127.0.0.1:6379/0",
        "rediss://user:s3cr3t@redis.example:6380/1",
        "redis-cluster://user:s3cr3t@127.0.0.1:7000,127.0.0.1:7001",
    ],
)
def test_to_toml_hides_the_broker_password(tmp_path: Path, url: str) -> None:
    settings = load(env={}, flags={"broadcast.broker": url})
    text = to_toml(settings)
    assert "s3cr3t" not in text
    lines = text.splitlines()
    printed = url.replace("s3cr3t", config.HIDDEN)
    at = lines.index(f"broker = {config.format_value(printed)}")
    assert lines[at - 1].startswith("# broadcast.broker's password is not printed")
    # Reused as it is, the file fails loudly instead of connecting with a wrong password.
    message = error_of(config_path=write(tmp_path, text))
    assert message.startswith("broadcast.broker = ")
    assert "placeholder" in message and "s3cr3t" not in message
    assert f"broker = {config.format_value(url)}" in to_toml(settings, secrets=True)
    assert load(config_path=write(tmp_path, to_toml(settings, secrets=True)), env={}) == settings


def test_error_messages_are_one_line() -> None:
    err = ConfigError("a\nb\r\nc")
    assert str(err) == "a b c"

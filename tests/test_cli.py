"""Tests for echoserver.cli: flags generated from KEYS, and `python -m echoserver` as a real
subprocess for --print-config, --check-config and every kind of config error."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import echoserver
from echoserver import cli, config
from echoserver.config import KEYS, Settings, load

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m echoserver ARGS` with a clean ECHOSERVER_* environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHOSERVER_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "echoserver", *args],
        env=base,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def printed_settings(tmp_path: Path, stdout: str) -> Settings:
    path = tmp_path / "printed.toml"
    path.write_text(stdout, encoding="utf-8")
    return load(config_path=str(path), env={})


# --- --print-config and --check-config through a real process ------------------------


def test_print_config_defaults(tmp_path: Path) -> None:
    proc = run(["--print-config"])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert printed_settings(tmp_path, proc.stdout) == Settings()


def test_precedence_through_the_cli(tmp_path: Path) -> None:
    conf = tmp_path / "conf.toml"
    conf.write_text(
        'mode = "broadcast"\nport = 9001\nhost = "0.0.0.0"\n'
        "[websocket]\nmax_message_size = 2048\ncompression = true\n"
        '[broadcast]\nhistory = 5\nbroker = "redis://file/0"\n'
        '[log]\nlevel = "debug"\nformat = "json"\n',
        encoding="utf-8",
    )
    env = {
        "ECHOSERVER_CONFIG": str(conf),
        "ECHOSERVER_PORT": "9002",
        "ECHOSERVER_WEBSOCKET_MAX_MESSAGE_SIZE": "4096",
        "ECHOSERVER_WEBSOCKET_COMPRESSION": "no",
        "ECHOSERVER_BROADCAST_BROKER": "redis://env/0",
        "ECHOSERVER_LOG_LEVEL": "warning",
        "ECHOSERVER_UNRELATED": "ignored",
    }
    flags = ["--port", "9003", "--broker", "rediss://flag:6380/1", "--log-level", "error"]
    flags += ["--compression", "--processes", "0"]
    proc = run([*flags, "--print-config"], env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    data = tomllib.loads(proc.stdout)
    assert data["port"] == 9003  # flag > env > file
    assert data["mode"] == "broadcast"  # file > default
    assert data["host"] == "0.0.0.0"
    assert data["processes"] == 0  # flag
    assert data["shutdown_timeout"] == 10.0  # default
    assert data["websocket"]["max_message_size"] == 4096  # env > file
    assert data["websocket"]["compression"] is True  # flag > env > file
    assert data["websocket"]["path"] == "/ws"  # default
    assert data["broadcast"]["history"] == 5  # file
    assert data["broadcast"]["broker"] == "rediss://flag:6380/1"
    assert data["log"] == {"level": "error", "format": "json", "access": True}
    assert printed_settings(tmp_path, proc.stdout) == load(
        env=env,
        flags={
            "port": "9003",
            "broadcast.broker": "rediss://flag:6380/1",
            "log.level": "error",
            "websocket.compression": True,
            "processes": "0",
        },
    )


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("port = 1111\n", encoding="utf-8")
    (tmp_path / "b.toml").write_text("port = 2222\n", encoding="utf-8")
    env = {"ECHOSERVER_CONFIG": str(tmp_path / "a.toml")}
    proc = run(["--config", str(tmp_path / "b.toml"), "--print-config"], env=env)
    assert tomllib.loads(proc.stdout)["port"] == 2222


def test_print_config_round_trips_a_full_config(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    args = [
        "--mode", "mixed", "--host", "::", "--port", "0", "--processes", "2",
        "--static-dir", str(tmp_path), "--shutdown-timeout", "2.5", "--loop", "asyncio",
        "--path", "/socket", "--max-message-size", "65536", "--ping-interval", "5",
        "--ping-timeout", "4", "--compression", "--max-connections", "0",
        "--allowed-origins", "https://a.example,https://b.example:8443",
        "--auth-token", "t0ken", "--rate-limit", "100",
        "--no-include-sender", "--max-queue-bytes", "4096", "--slow-client", "disconnect",
        "--history", "10", "--broker", "redis://127.0.0.1:6379/0",
        "--tls-certfile", str(cert), "--tls-keyfile", str(key),
        "--log-level", "debug", "--log-format", "json", "--no-log-access",
    ]  # fmt: skip
    proc = run([*args, "--print-config"])
    assert (proc.returncode, proc.stderr) == (0, "")
    settings = printed_settings(tmp_path, proc.stdout)
    for key_ in KEYS:  # every key was moved off its default by its flag
        section, _, attr = key_.name.rpartition(".")
        value = getattr(getattr(settings, section) if section else settings, attr)
        assert value != key_.default, key_.name
    # --check-config on the printed file, through the same process path
    printed = tmp_path / "printed.toml"
    proc = run(["--config", str(printed), "--check-config"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config ok\n", "")


@pytest.mark.parametrize(
    "args",
    [
        ["--check-config"],
        ["--config", "config/echoserver.toml", "--check-config"],
        ["--config", "config/broadcast-redis.toml", "--check-config"],
        ["--mode", "broadcast", "--processes", "3", "--broker", "redis://r/0", "--check-config"],
    ],
)
def test_check_config_ok(args: list[str]) -> None:
    proc = run(args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config ok\n", "")


# --- every config error: exit 2, one line naming key/file, value and source -------------

Case = Callable[[Path], tuple[list[str], dict[str, str], list[str]]]


def file_case(text: str, args: list[str], expected: list[str]) -> Case:
    def make(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
        path = tmp_path / "bad.toml"
        path.write_text(text, encoding="utf-8")
        return ["--config", str(path), *args], {}, [s.format(p=path) for s in expected]

    return make


def plain_case(args: list[str], env: dict[str, str], expected: list[str]) -> Case:
    return lambda tmp_path: (
        [a.format(p=tmp_path) for a in args],
        env,
        [s.format(p=tmp_path) for s in expected],
    )


def missing_via_env(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    path = tmp_path / "missing.toml"
    env = {"ECHOSERVER_CONFIG": str(path)}
    return [], env, [f"config file {path} (from env ECHOSERVER_CONFIG)", "No such file"]


def tls_half(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    cert = tmp_path / "cert.pem"
    cert.write_text("c")
    env = {"ECHOSERVER_TLS_CERTFILE": str(cert)}
    expected = ['tls.keyfile = ""', "(from default)", "ECHOSERVER_TLS_CERTFILE", str(cert)]
    return [], env, expected


def unreadable(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    if os.geteuid() == 0:
        pytest.skip("root can read a chmod 000 file; the directory case covers unreadable")
    path = tmp_path / "secret.toml"
    path.write_text("port = 1\n")
    path.chmod(0)
    return ["--config", str(path)], {}, [f"config file {path}", "Permission denied"]


ERRORS: dict[str, Case] = {
    "unknown key": file_case(
        '[websocket]\npth = "/x"\n', [], ["unknown key websocket.pth", "file {p}"]
    ),
    "unknown top-level key": file_case("prot = 80\n", [], ["unknown key prot", "file {p}"]),
    "unknown section": file_case(
        "[websockets]\npath = '/x'\n", [], ["unknown section [websockets]", "file {p}"]
    ),
    "wrong type in file (string for int)": file_case(
        'port = "80"\n', [], ['port = "80"', "(from file {p})", "an integer 0..65535"]
    ),
    "wrong type in file (string for bool)": file_case(
        '[broadcast]\ninclude_sender = "yes"\n',
        [],
        ['broadcast.include_sender = "yes"', "(from file {p})", "true or false"],
    ),
    "wrong type in file (bool for int)": file_case(
        "[websocket]\nmax_connections = true\n",
        [],
        ["websocket.max_connections = true", "(from file {p})", "an integer >= 0"],
    ),
    "wrong type in env (int)": plain_case(
        [],
        {"ECHOSERVER_PORT": "eighty"},
        ['port = "eighty"', "(from env ECHOSERVER_PORT)", "an integer 0..65535"],
    ),
    "wrong type in env (bool)": plain_case(
        [],
        {"ECHOSERVER_WEBSOCKET_COMPRESSION": "maybe"},
        ['websocket.compression = "maybe"', "env ECHOSERVER_WEBSOCKET_COMPRESSION", "true"],
    ),
    "wrong type in flag (float)": plain_case(
        ["--rate-limit", "fast"], {}, ['websocket.rate_limit = "fast"', "flag --rate-limit"]
    ),
    "port 70000 flag": plain_case(
        ["--port", "70000"], {}, ["port = 70000", "(from flag --port)", "0..65535"]
    ),
    "port 70000 file": file_case(
        "port = 70000\n", [], ["port = 70000", "(from file {p})", "0..65535"]
    ),
    "port 70000 env": plain_case(
        [], {"ECHOSERVER_PORT": "70000"}, ["port = 70000", "(from env ECHOSERVER_PORT)"]
    ),
    "negative max_message_size flag": plain_case(
        ["--max-message-size", "-5"],
        {},
        ["websocket.max_message_size = -5", "(from flag --max-message-size)", "1..2147483648"],
    ),
    "negative max_message_size env": plain_case(
        [],
        {"ECHOSERVER_WEBSOCKET_MAX_MESSAGE_SIZE": "-1"},
        ["websocket.max_message_size = -1", "env ECHOSERVER_WEBSOCKET_MAX_MESSAGE_SIZE"],
    ),
    "mode loud": plain_case(
        [], {"ECHOSERVER_MODE": "loud"}, ['mode = "loud"', "(from env ECHOSERVER_MODE)", "echo"]
    ),
    "mode loud file": file_case(
        'mode = "loud"\n', [], ['mode = "loud"', "(from file {p})", '"broadcast"']
    ),
    "slow_client x": plain_case(
        ["--slow-client", "x"],
        {},
        ['broadcast.slow_client = "x"', "(from flag --slow-client)", '"drop", "disconnect"'],
    ),
    "history too big": file_case(
        "[broadcast]\nhistory = 10001\n", [], ["broadcast.history = 10001", "0..10000"]
    ),
    "trailing slash path": plain_case(
        ["--path", "/ws/"], {}, ['websocket.path = "/ws/"', "(from flag --path)"]
    ),
    "http broker": plain_case(
        [],
        {"ECHOSERVER_BROADCAST_BROKER": "http://h"},
        ['broadcast.broker = "http://h"', "env ECHOSERVER_BROADCAST_BROKER", "redis://"],
    ),
    "bad log level": plain_case(
        ["--log-level", "verbose"], {}, ['log.level = "verbose"', "(from flag --log-level)"]
    ),
    "missing file": plain_case(
        ["--config", "{p}/nope.toml"], {}, ["config file {p}/nope.toml", "No such file"]
    ),
    "missing file via env": missing_via_env,
    "directory as config file": plain_case(
        ["--config", "{p}"], {}, ["config file {p}: cannot read: Is a directory"]
    ),
    "unreadable file": unreadable,
    "malformed TOML": file_case("port = \n", [], ["config file {p}: invalid TOML: ", "line 1"]),
    "malformed TOML (duplicate key)": file_case(
        "port = 1\nport = 2\n", [], ["config file {p}: invalid TOML: "]
    ),
    "tls half-set": tls_half,
    "processes 2, broadcast, memory broker": plain_case(
        ["--mode", "broadcast", "--processes", "2"],
        {},
        ["processes = 2", "(from flag --processes)", 'broadcast.broker = "redis://..."'],
    ),
    "processes 0, mixed from file, memory broker": file_case(
        'mode = "mixed"\nprocesses = 0\n',
        [],
        ["processes = 0", "(from file {p})", "Redis broker"],
    ),
    "ping_timeout above ping_interval": plain_case(
        ["--ping-interval", "5", "--ping-timeout", "10"],
        {},
        ["websocket.ping_timeout = 10.0", "(from flag --ping-timeout)", "ping_interval"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS.values()), ids=list(ERRORS))
def test_config_error_is_one_clear_line(tmp_path: Path, case: Case) -> None:
    args, env, expected = case(tmp_path)
    proc = run([*args, "--check-config"], env=env)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("echoserver: config error: ")
    for part in expected:
        assert part in proc.stderr


def test_config_error_also_stops_print_config_and_serving() -> None:
    for extra in (["--print-config"], []):
        proc = run(["--port", "70000", *extra])
        assert (proc.returncode, proc.stdout) == (2, "")
        assert proc.stderr == (
            "echoserver: config error: port = 70000 (from flag --port): "
            "must be an integer 0..65535\n"
        )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port"], "argument --port: expected one argument"),
        (["--prot", "80"], "unrecognized arguments: --prot 80"),
        (["--po", "80"], "unrecognized arguments: --po 80"),  # no abbreviations
        (["serve"], "unrecognized arguments: serve"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(args: list[str], expected: str) -> None:
    proc = run(args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("echoserver: error: ")
    assert expected in proc.stderr


def test_version() -> None:
    proc = run(["--version"])
    assert (proc.returncode, proc.stdout.strip()) == (0, f"echoserver {echoserver.__version__}")


# --- the parser, in process -----------------------------------------------------------


def test_help_lists_every_flag_with_doc_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for key in KEYS:
        assert key.flag in out
        if key.type is bool:
            assert "--no-" + key.flag[2:] in out
        assert f"(default: {config.format_value(key.default)})" in out
    for flag in ("--config", "--print-config", "--check-config", "--version"):
        assert flag in out


VALUES = {
    bool: None,
    int: "3",
    float: "2.5",
    tuple: "https://x.example",
}


def test_every_flag_sets_exactly_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    special = {
        "mode": "mixed",
        "loop": "asyncio",
        "host": "0.0.0.0",
        "static_dir": str(tmp_path),
        "websocket.path": "/sock",
        "websocket.ping_interval": "30",  # above the default ping_timeout: it stays put
        "websocket.ping_timeout": "1",
        "websocket.auth_token": "tok",
        "broadcast.max_queue_bytes": "2048",
        "broadcast.slow_client": "disconnect",
        "broadcast.broker": "redis://h/0",
        "log.level": "debug",
        "log.format": "json",
    }
    defaults = Settings()
    for key in KEYS:
        if key.name.startswith("tls."):
            continue  # certfile and keyfile only go together: covered elsewhere
        if key.type is bool:
            argv = [("--no-" + key.flag[2:]) if key.default else key.flag]
            expected: Any = not key.default
        else:
            text = special.get(key.name, VALUES.get(key.type))
            argv = [key.flag, text]
            expected = config._from_text(key, text, "test")
        assert cli.main([*argv, "--print-config"]) == 0, key.name
        out, err = capsys.readouterr()
        assert err == ""
        settings = printed_settings(tmp_path, out)
        for other in KEYS:
            o_section, _, o_attr = other.name.rpartition(".")
            got = getattr(getattr(settings, o_section) if o_section else settings, o_attr)
            want = getattr(getattr(defaults, o_section) if o_section else defaults, o_attr)
            assert got == (expected if other is key else want), (key.name, other.name)


def test_main_hands_settings_to_server_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    received: list[Settings] = []
    fake = types.ModuleType("echoserver.server")
    fake.run = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "echoserver.server", fake)
    monkeypatch.setattr(echoserver, "server", fake, raising=False)
    for name in [n for n in os.environ if n.startswith("ECHOSERVER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ECHOSERVER_LOG_LEVEL", "debug")
    assert cli.main(["--port", "0", "--mode", "broadcast"]) == 0
    assert received == [
        load(env={"ECHOSERVER_LOG_LEVEL": "debug"}, flags={"port": 0, "mode": "broadcast"})
    ]


def test_main_does_not_start_the_server_on_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = types.ModuleType("echoserver.server")

    def run(settings: Settings) -> Any:
        raise AssertionError("server started")

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "echoserver.server", fake)
    monkeypatch.setattr(echoserver, "server", fake, raising=False)
    assert cli.main(["--history", "-1"]) == 2
    assert capsys.readouterr().err.startswith(
        "echoserver: config error: broadcast.history = -1 (from flag --history)"
    )

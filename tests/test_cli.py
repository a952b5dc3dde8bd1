"""Tests for echoserver.cli: flags generated from KEYS, and `python -m echoserver` as a real
subprocess for --print-config, --check-config and every kind of config error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import echoserver
import echoserver.runtime
from echoserver import cli, config
from echoserver.config import KEYS, Settings, load
from tests.certs import tls_pair
from tests.servers import ROOT, run_once
from tests.test_config import page_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def run_cli(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m echoserver ARGS` with a clean ECHOSERVER_* environment plus `env`; the
    checkout on PYTHONPATH, so that a test may run it from another directory."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return run_once(*args, env={"PYTHONPATH": path, **(env or {})}, cwd=cwd or ROOT, timeout=60)


def printed_settings(tmp_path: Path, stdout: str) -> Settings:
    path = tmp_path / "printed.toml"
    path.write_text(stdout, encoding="utf-8")
    return load(config_path=str(path), env={})


# --- --print-config and --check-config through a real process ------------------------


def test_print_config_defaults(tmp_path: Path) -> None:
    proc = run_cli(["--print-config"])
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
    }
    flags = ["--port", "9003", "--broker", "rediss://flag:6380/1", "--log-level", "error"]
    flags += ["--compression", "--processes", "0"]
    proc = run_cli([*flags, "--print-config"], env=env)
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
    proc = run_cli(["--config", str(tmp_path / "b.toml"), "--print-config"], env=env)
    assert tomllib.loads(proc.stdout)["port"] == 2222


def test_print_config_round_trips_a_full_config(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path)
    page = page_dir(tmp_path / "page")
    args = [
        "--mode", "mixed", "--host", "::", "--port", "0", "--processes", "2",
        "--static-dir", str(page), "--shutdown-timeout", "2.5", "--loop", "asyncio",
        "--path", "/socket", "--max-message-size", "65536", "--ping-interval", "5",
        "--ping-timeout", "4", "--compression", "--max-connections", "0",
        "--allowed-origins", "https://a.example,https://b.example:8443",
        "--auth-token", "t0ken", "--rate-limit", "100", "--max-connections-per-ip", "5",
        "--allowed-hosts", "chat.example,[::1]:8888",
        "--no-include-sender", "--max-queue-bytes", "4096", "--slow-client", "disconnect",
        "--history", "10", "--history-ttl", "60", "--broker", "redis://127.0.0.1:6379/0",
        "--history-bytes", "4096", "--history-total-bytes", "65536", "--publish-timeout", "2",
        "--api-key", "t0ken", "--api-protect-reads", "--request-timeout", "7",
        "--tls-certfile", cert, "--tls-keyfile", key,
        "--tls-min-version", "1.3",
        "--log-level", "debug", "--log-format", "json", "--no-log-access",
        "--max-subscriptions", "50", "--presence-grace", "2", "--api-max-batch", "500",
    ]  # fmt: skip
    proc = run_cli([*args, "--print-config"])
    assert (proc.returncode, proc.stderr) == (0, "")
    # The token is not printed; put it back to reuse the file.
    assert "t0ken" not in proc.stdout
    hidden = config.format_value(config.HIDDEN)
    settings = printed_settings(tmp_path, proc.stdout.replace(hidden, '"t0ken"'))
    for key_ in KEYS:  # every key was moved off its default by its flag
        if key_.section == "auth":  # exclusive with auth_token: test_auth_config.py
            continue
        if key_.section == "webhooks":  # its secret has a shape: test_webhooks_config.py
            continue
        section, _, attr = key_.name.rpartition(".")
        value = getattr(getattr(settings, section) if section else settings, attr)
        assert value != key_.default, key_.name
    # --check-config on the printed file, through the same process path
    printed = tmp_path / "printed.toml"
    proc = run_cli(["--config", str(printed), "--check-config"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config ok\n", "")


def test_print_config_hides_the_auth_token(tmp_path: Path) -> None:
    proc = run_cli(["--print-config"], env={"ECHOSERVER_WEBSOCKET_AUTH_TOKEN": "s3cr3t"})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "s3cr3t" not in proc.stdout
    assert "# websocket.auth_token is set but not printed" in proc.stdout
    assert tomllib.loads(proc.stdout)["websocket"]["auth_token"] == config.HIDDEN
    # Fed back as it is, the placeholder is refused rather than taken for the token.
    (tmp_path / "printed.toml").write_text(proc.stdout, encoding="utf-8")
    proc = run_cli(["--config", str(tmp_path / "printed.toml"), "--check-config"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("echoserver: config error: websocket.auth_token = <hidden>")


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
    proc = run_cli(args)
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


def tls_not_pem(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    cert, _ = tls_pair(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    args = ["--tls-certfile", cert, "--tls-keyfile", str(junk)]
    return args, {}, [f'tls.keyfile = "{junk}" (from flag --tls-keyfile)', "PEM private key"]


def tls_mismatch(tmp_path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    cert, _ = tls_pair(tmp_path, "one")
    _, key = tls_pair(tmp_path, "two")
    env = {"ECHOSERVER_TLS_KEYFILE": key}
    expected = [f'tls.keyfile = "{key}" (from env ECHOSERVER_TLS_KEYFILE)', "do not match"]
    return ["--tls-certfile", cert], env, expected


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
    "path above the channel API": plain_case(
        ["--path", "/api"], {}, ['websocket.path = "/api"', "route /api/channels"]
    ),
    "path on the channel API": plain_case(
        [],
        {"ECHOSERVER_WEBSOCKET_PATH": "/api/channels"},
        ["(from env ECHOSERVER_WEBSOCKET_PATH)", "route /api/channels"],
    ),
    "path under /healthz": file_case(
        '[websocket]\npath = "/healthz/ws"\n', [], ["(from file {p})", "route /healthz"]
    ),
    "path on /sse": plain_case(["--path", "/sse"], {}, ["route /sse"]),
    "misspelled env var": plain_case(
        [],
        {"ECHOSERVER_MDOE": "broadcast"},
        ["unknown variable ECHOSERVER_MDOE", "did you mean ECHOSERVER_MODE?"],
    ),
    "host that is no address": plain_case(
        ["--host", "999.1.1.1"], {}, ['host = "999.1.1.1" (from flag --host)', "IPv4"]
    ),
    "static_dir without a page": plain_case(
        ["--static-dir", "{p}"], {}, ['static_dir = "{p}" (from flag --static-dir)', "index.html"]
    ),
    "tls key not PEM": tls_not_pem,
    "tls key of another certificate": tls_mismatch,
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
    proc = run_cli([*args, "--check-config"], env=env)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("echoserver: config error: ")
    for part in expected:
        assert part in proc.stderr


def test_config_error_also_stops_print_config_and_serving() -> None:
    for extra in (["--print-config"], []):
        proc = run_cli(["--port", "70000", *extra])
        assert (proc.returncode, proc.stdout) == (2, "")
        assert proc.stderr == (
            "echoserver: config error: port = 70000 (from flag --port): "
            "must be an integer 0..65535\n"
        )


def test_check_config_loads_good_tls_files_and_page(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path)
    page = page_dir(tmp_path / "page")
    args = ["--tls-certfile", cert, "--tls-keyfile", key, "--static-dir", str(page)]
    proc = run_cli([*args, "--check-config"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config ok\n", "")


def test_uvloop_asked_for_but_missing_is_a_config_error() -> None:
    # uvloop is installed here: hide it from the child, as if it were not.
    code = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from echoserver.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    for extra in (["--check-config"], ["--processes", "2", "--port", "0"]):
        proc = run_code(code, ["--loop", "uvloop", *extra])
        assert_one_line_exit_2(proc)
        assert proc.stderr.startswith(
            'echoserver: config error: loop = "uvloop" (from flag --loop): '
        )
        assert "uvloop is not installed" in proc.stderr


# --- startup failures: like config errors, one line and status 2 ----------------------


def run_code(code: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -c CODE ARGS` with the same clean environment as run_cli()."""
    return run_once(*args, code=code, timeout=60)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.fixture
def taken_port() -> Any:
    """A port some other program is listening on (loopback)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_port_in_use_is_one_line(taken_port: int, processes: str) -> None:
    """The most common newcomer mistake; with workers too, as the port is bound before fork."""
    proc = run_cli(["--port", str(taken_port), "--processes", processes])
    assert_one_line_exit_2(proc)
    assert proc.stderr.startswith(
        f"echoserver: cannot listen: port = {taken_port} (from flag --port): "
        "address already in use on 127.0.0.1"
    )


def test_port_in_use_names_where_the_port_came_from(taken_port: int, tmp_path: Path) -> None:
    proc = run_cli([], env={"ECHOSERVER_PORT": str(taken_port)})
    assert_one_line_exit_2(proc)
    assert f"port = {taken_port} (from env ECHOSERVER_PORT): address already in use" in proc.stderr
    conf = tmp_path / "c.toml"
    conf.write_text(f"port = {taken_port}\n", encoding="utf-8")
    proc = run_cli(["--config", str(conf)])
    assert_one_line_exit_2(proc)
    assert f"port = {taken_port} (from file {conf}): address already in use" in proc.stderr


def test_port_in_use_with_json_logs_is_one_json_record(taken_port: int) -> None:
    proc = run_cli(["--port", str(taken_port), "--log-format", "json"])
    assert_one_line_exit_2(proc)
    record = json.loads(proc.stderr)
    assert record["level"] == "critical"
    assert record["message"].startswith(f"cannot listen: port = {taken_port} (from flag --port)")
    assert record["exception"] == "OSError: [Errno 98] Address already in use"


def test_host_not_on_this_machine_is_one_line() -> None:
    """10.255.255.1 is no local address: bind() fails at once, nothing is sent anywhere."""
    proc = run_cli(["--host", "10.255.255.1", "--port", "0", "--processes", "2"])
    assert_one_line_exit_2(proc)
    assert proc.stderr.startswith(
        'echoserver: cannot listen: host = "10.255.255.1" (from flag --host): '
        "not an address of this machine"
    )


def test_host_that_does_not_resolve_is_one_line() -> None:
    # The resolver is replaced with one that fails, so no DNS query leaves the machine.
    code = (
        "import socket, sys\n"
        "def no_such_name(*args, **kwargs):\n"
        "    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')\n"
        "socket.getaddrinfo = no_such_name\n"
        "from echoserver.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = run_code(code, ["--host", "example.invalid", "--port", "0"])
    assert_one_line_exit_2(proc)
    assert proc.stderr == (
        'echoserver: cannot listen: host = "example.invalid" (from flag --host): '
        "no such host name (Name or service not known)\n"
    )


def test_tls_files_broken_after_the_check_are_one_line(tmp_path: Path) -> None:
    """The server loads the files again before it listens; a file swapped since is caught."""
    cert, key = tls_pair(tmp_path)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from echoserver import config\n"
        "from echoserver.runtime import serve\n"
        "settings, sources = config.resolve(flags={'tls.certfile': sys.argv[1], "
        "'tls.keyfile': sys.argv[2], 'port': 0})\n"
        "Path(sys.argv[2]).write_text('gone')\n"
        "raise SystemExit(serve.run(settings, sources))\n"
    )
    proc = run_code(code, [cert, key])
    assert_one_line_exit_2(proc)
    assert proc.stderr.startswith(
        f'echoserver: cannot load TLS files: tls.certfile = "{cert}" (from flag --tls-certfile), '
        f'tls.keyfile = "{key}" (from flag --tls-keyfile): '
        "tls.keyfile must be a PEM private key; found no key in it"
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
    proc = run_cli(args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("echoserver: error: ")
    assert expected in proc.stderr


def test_version() -> None:
    proc = run_cli(["--version"])
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
        "static_dir": str(page_dir(tmp_path / "page")),
        "websocket.path": "/sock",
        "websocket.ping_interval": "30",  # above the default ping_timeout: it stays put
        "websocket.ping_timeout": "1",
        "websocket.auth_token": "s3cr3t",
        "api.key": "k3y",
        "websocket.allowed_hosts": "chat.example",
        "broadcast.max_queue_bytes": "2048",
        "broadcast.history_bytes": "2048",
        "broadcast.history_total_bytes": "2048",
        "broadcast.slow_client": "disconnect",
        "broadcast.broker": "redis://h/0",
        "log.level": "debug",
        "log.format": "json",
    }
    defaults = Settings()
    for key in KEYS:
        if key.name.startswith("tls."):
            continue  # certfile and keyfile only go together: covered elsewhere
        if key.name == "api.protect_reads":
            continue  # needs api.key: test_config and the full round trip cover it
        if key.section == "auth":
            continue  # the keys need each other and key files: test_auth_config.py
        if key.section == "webhooks":
            continue  # url needs secret, which has a shape: test_webhooks_config.py
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
        if key.secret:
            assert text not in out
            out = out.replace(config.format_value(config.HIDDEN), config.format_value(text))
        settings = printed_settings(tmp_path, out)
        for other in KEYS:
            o_section, _, o_attr = other.name.rpartition(".")
            got = getattr(getattr(settings, o_section) if o_section else settings, o_attr)
            want = getattr(getattr(defaults, o_section) if o_section else defaults, o_attr)
            assert got == (expected if other is key else want), (key.name, other.name)


def test_main_hands_settings_to_server_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    received: list[Settings] = []
    sources: list[dict[str, str]] = []

    def serve_run(settings: Settings, where: dict[str, str]) -> int:
        received.append(settings)
        sources.append(where)
        return 0

    fake = types.ModuleType("echoserver.runtime.serve")
    fake.run = serve_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "echoserver.runtime.serve", fake)
    monkeypatch.setattr(echoserver.runtime, "serve", fake, raising=False)
    for name in [n for n in os.environ if n.startswith("ECHOSERVER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ECHOSERVER_LOG_LEVEL", "debug")
    assert cli.main(["--port", "0", "--mode", "broadcast"]) == 0
    assert received == [
        load(env={"ECHOSERVER_LOG_LEVEL": "debug"}, flags={"port": 0, "mode": "broadcast"})
    ]
    assert sources[0]["port"] == "flag --port"
    assert sources[0]["log.level"] == "env ECHOSERVER_LOG_LEVEL"
    assert sources[0]["host"] == "default"


def test_main_does_not_start_the_server_on_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = types.ModuleType("echoserver.runtime.serve")

    def serve_run(settings: Settings) -> Any:
        raise AssertionError("server started")

    fake.run = serve_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "echoserver.runtime.serve", fake)
    monkeypatch.setattr(echoserver.runtime, "serve", fake, raising=False)
    assert cli.main(["--history", "-1"]) == 2
    assert capsys.readouterr().err.startswith(
        "echoserver: config error: broadcast.history = -1 (from flag --history)"
    )

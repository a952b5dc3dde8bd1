"""End to end: `python -m echoserver` as a real subprocess, real clients over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from tornado.websocket import websocket_connect

from tests.conftest import fetch
from tests.servers import ROOT, run_once


def health(server) -> dict:
    return json.loads(fetch(server.url + "/healthz")[2])


def test_page_and_health_are_served(run_server):
    server = run_server("--mode", "echo")
    status, headers, body = fetch(server.url + "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<html" in body.lower()
    assert fetch(server.url + "/static/style.css")[0] == 200
    assert health(server)["mode"] == "echo"
    assert f"websocket {server.ws_url}/ws" in server.log()


def test_echo_over_a_real_process(run_server):
    server = run_server("--mode", "echo")

    async def scenario():
        connection = await websocket_connect(server.ws_url + "/ws")
        replies = []
        for message, binary in [("text", False), (b"\x00\xffbin", True), ("", False)]:
            await connection.write_message(message, binary=binary)
            replies.append(await connection.read_message())
        big = bytes(range(256)) * 800  # 200 KB
        await connection.write_message(big, binary=True)
        replies.append(await connection.read_message())
        connection.close()
        return replies

    replies = asyncio.run(scenario())
    assert replies == ["text", b"\x00\xffbin", "", bytes(range(256)) * 800]


def test_broadcast_reaches_the_channel_and_not_another(run_server):
    server = run_server("--mode", "broadcast")

    async def scenario():
        room = [await websocket_connect(server.ws_url + "/ws/room") for _ in range(3)]
        other = await websocket_connect(server.ws_url + "/ws/other")
        for n in range(5):
            await room[n % 3].write_message(f"{n}")
        seen = [[await c.read_message() for _ in range(5)] for c in room]
        await other.write_message("other's own")
        other_first = await other.read_message()
        for c in [*room, other]:
            c.close()
        return seen, other_first

    seen, other_first = asyncio.run(scenario())
    assert seen[0] == seen[1] == seen[2]
    assert sorted(seen[0]) == ["0", "1", "2", "3", "4"]
    assert other_first == "other's own"


def test_precedence_file_env_flag(run_server, tmp_path):
    config = tmp_path / "echoserver.toml"
    config.write_text('mode = "mixed"\n[broadcast]\nhistory = 3\n')
    assert health(run_server("--config", str(config)))["mode"] == "mixed"
    env = {"ECHOSERVER_MODE": "broadcast", "ECHOSERVER_CONFIG": str(config)}
    assert health(run_server(env=env))["mode"] == "broadcast"
    assert health(run_server("--mode", "echo", env=env))["mode"] == "echo"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "port"),
        ([], {"ECHOSERVER_MODE": "loud"}, "mode"),
        ([], {"ECHOSERVER_MDOE": "broadcast"}, "did you mean ECHOSERVER_MODE?"),
        (["--path", "/api/channels"], {}, "websocket.path"),
        (["--config", "/nonexistent/echoserver.toml"], {}, "/nonexistent/echoserver.toml"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, env, named):
    result = run_once(*args, env={"PATH": "/usr/bin:/bin", **env}, inherit=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_a_second_server_on_the_same_port_says_so_in_one_line(run_server):
    first = run_server("--mode", "echo")
    for processes in ("1", "2"):
        result = run_once(
            "--port", str(first.port), "--processes", processes,
            env={"PATH": "/usr/bin:/bin"}, inherit=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr == (
            f"echoserver: cannot listen: port = {first.port} (from flag --port): address "
            "already in use on 127.0.0.1; stop what holds it or choose another port\n"
        )
    assert health(first)["status"] == "ok"  # and the first one is untouched


def test_sigterm_drains_and_exits_0(run_server):
    server = run_server("--mode", "echo")

    async def connect_and_wait_for_close():
        connection = await websocket_connect(server.ws_url + "/ws")
        server.proc.send_signal(15)
        assert await connection.read_message() is None
        return connection.close_code

    assert asyncio.run(connect_and_wait_for_close()) == 1001
    assert server.proc.wait(15) == 0


def test_installed_wheel_finds_its_page_from_another_directory(tmp_path, run_server):
    """A wheel built from this tree, installed into a fresh venv, started elsewhere."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("echoserver-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The dependencies come, without a download, from the site-packages of the Python
    # running the tests (a venv or not): a .pth line appends each to the new venv's path,
    # after its own site-packages, so the installed wheel wins. Plain directory lines do not
    # run the .pth files found there, so this checkout's editable install stays out.
    inner = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    paths = sysconfig.get_paths()
    outer = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        outer.append(site.getusersitepackages())
    lines = dict.fromkeys(p for p in outer if Path(p).is_dir())
    (Path(inner) / "outer-site-packages.pth").write_text("\n".join(lines) + "\n")
    # Nor may a PYTHONPATH the tests run with bring the checkout in (pip would then find
    # echoserver already installed).
    no_checkout = {"PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        env={**os.environ, **no_checkout},
        check=True,
        timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import echoserver, sys; print(echoserver.__file__)"],
        cwd=elsewhere,
        env={**os.environ, **no_checkout},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(env_dir.resolve())
    server = run_server("--mode", "echo", env=no_checkout, cwd=elsewhere, python=str(python))
    status, _, body = fetch(server.url + "/")
    assert status == 200
    assert b"/static/app.js" in body
    assert fetch(server.url + "/static/app.js")[0] == 200


def test_console_script_is_the_same_program():
    script = shutil.which("echoserver")
    assert script, "the echoserver console script is not installed (pip install -e .)"
    checked = subprocess.run(
        [script, "--mode", "broadcast", "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (checked.returncode, checked.stdout.strip()) == (0, "config ok")
    from echoserver import __version__

    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert __version__ in version.stdout

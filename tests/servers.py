"""Every `python -m echoserver` the tests start: servers that run until stopped (ServerProcess)
and runs to completion (run_once), with the environment and event loop they run under."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ECHOSERVER_TEST_LOOP=uvloop|asyncio runs the in-process tests on that loop and the server
# subprocesses on the other one, so one pass each way covers both loops everywhere. It is
# taken out of the environment: the server refuses ECHOSERVER_* variables it does not know,
# and both config.load() in-process and every server subprocess read the environment.
TEST_LOOP = os.environ.pop("ECHOSERVER_TEST_LOOP", "asyncio")
SERVER_LOOP = {"asyncio": "uvloop", "uvloop": "asyncio"}[TEST_LOOP]
READY = re.compile(r"page (https?)://([\d.]+):(\d+)/")


def server_env(env: dict[str, str] | None = None, inherit: bool = True) -> dict[str, str]:
    """The environment a server runs with: ours without ECHOSERVER_* (a developer's settings
    must not change what is under test) unless `inherit` is off, then `env` on top."""
    base = (
        {k: v for k, v in os.environ.items() if not k.startswith("ECHOSERVER_")} if inherit else {}
    )
    base.update(env or {})
    return base


def run_once(
    *args: str,
    env: dict[str, str] | None = None,
    inherit: bool = True,
    cwd: Path = ROOT,
    python: str = sys.executable,
    timeout: float = 30.0,
    check: bool = False,
    code: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m echoserver ARGS` run to its exit (--print-config, a refused start, ...),
    its output captured as text; or, given `code`, `python -c CODE ARGS` (a server started
    through the API, say)."""
    program = ["-c", code] if code is not None else ["-m", "echoserver"]
    return subprocess.run(
        [python, *program, *args],
        env=server_env(env, inherit),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


class ServerProcess:
    """`python -m echoserver` in a subprocess, with its log lines collected.

    It listens on `port` (0: any free one, learnt from the "page" log line) and runs on
    SERVER_LOOP unless `loop` says otherwise (None: the server's own choice). `log_dir` also
    writes the log to a file there; `preexec_fn` runs in the child before it starts.
    `program` runs another Python program serving echoserver instead (an example: its
    arguments after the interpreter; `port` is then its own), ready when a line matches
    `ready` (groups: scheme, host, port).
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        python: str = sys.executable,
        *,
        port: int = 0,
        loop: str | None = SERVER_LOOP,
        log_dir: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
        program: list[str] | None = None,
        ready: re.Pattern[str] = READY,
    ) -> None:
        self.args = list(args)
        self.program, self.ready = program, ready
        self.env = server_env(env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd, self.python, self.loop = cwd, python, loop
        self.log_dir, self.preexec_fn = log_dir, preexec_fn
        self.lines: list[str] = []
        self.log_file: Path | None = None
        self.scheme = "http"
        self.port = port
        self._launch()

    def _launch(self) -> None:
        loop = ["--loop", self.loop] if self.loop else []
        ours = ["-m", "echoserver", "--port", str(self.port), *loop, *self.args]
        self.proc = subprocess.Popen(
            [self.python, *(ours if self.program is None else self.program)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=self.preexec_fn,
        )
        if self.log_dir is not None and self.log_file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = self.log_dir / f"server-{self.proc.pid}.log"
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, self._ready), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.log_file is not None:
                with self.log_file.open("a") as log:
                    log.write(line)
            match = self.ready.search(line)
            if match and not ready.is_set():
                self.scheme, self.port = match.group(1), int(match.group(3))
                ready.set()
        ready.set()

    def wait_ready(self, timeout: float = 15.0) -> ServerProcess:
        """Until it logs the page it serves (it listens then); a server that exits or stays
        silent is stopped, and the error carries its log."""
        if not self._ready.wait(timeout) or not self.port or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log())
        return self

    def wait_healthy(self, timeout: float = 15.0) -> ServerProcess:
        """wait_ready, then until /healthz answers 200 (a broker connected, say)."""
        deadline = time.monotonic() + timeout
        self.wait_ready(timeout)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def restart(self) -> ServerProcess:
        """Start it again, same arguments and the same port, once the last run has ended
        (stop() or kill() first); its log goes on in `lines`. Call wait_ready/wait_healthy."""
        assert self.proc.poll() is not None, "still running"
        self._launch()
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        """Hard kill (SIGKILL): clients see the connection drop."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

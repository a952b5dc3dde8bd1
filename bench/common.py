"""Shared pieces of the benchmarks: servers pinned to a CPU, /proc readings, statistics, tables.

Conventions (see bench/README.md): the server under test runs on CPU 0, the load on CPU 1
(`taskset -c`), everything on loopback (127.0.0.1), and every wait is bounded in time.
The scripts import this module as `common` (they put bench/ on sys.path first), so it has
no dependency on the echoserver package and can benchmark any server command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LOAD_SCRIPT = BENCH_DIR / "load.py"
BASELINE_SCRIPT = BENCH_DIR / "baseline.py"

HOST = "127.0.0.1"
SERVER_CPU = 0
LOAD_CPU = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The server kinds a benchmark compares; "ours" is replaced by --server-cmd when given.
KINDS = ("baseline", "ours")


# ---------------------------------------------------------------------------- processes


def raise_nofile(wanted: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(wanted, hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# Linux: choose the source port at connect(), per destination, not at bind(): one source
# address then has ~28,000 ports for each server port, not ~28,000 in all.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def source_socket_factory(
    count: int, per_address: int, first: int = 2
) -> Callable[[int], socket.socket]:
    """Bind connection i to 127.0.0.(first + i // per_address), so ports never run out.

    Load processes that run side by side give each a different `first`, so that no two
    share an address (one address has ~28,000 ephemeral ports for one server port).
    """

    def make(i: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.0.{first + i // per_address}", 0))
        sock.setblocking(False)
        return sock

    if first < 2 or first + (count - 1) // per_address > 254:
        raise SystemExit(f"too many connections for 127.0.0.{first}-254")
    return make


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback address."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def can_pin() -> bool:
    """True when taskset exists and the machine has the two CPUs the convention needs."""
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: Sequence[str], cpu: int) -> list[str]:
    """`cmd` run under `taskset -c cpu`, or unchanged when pinning is impossible."""
    if can_pin():
        return ["taskset", "-c", str(cpu), *cmd]
    return list(cmd)


def server_command(
    kind: str, mode: str, port: int, *, uvloop: bool, custom: str | None = None
) -> list[str]:
    """The command line of one server under test.

    `custom` is a shell-like template with {port} and {mode} placeholders; it stands in
    for "ours". echoserver picks uvloop by itself whenever it is installed.
    """
    if kind == "baseline":
        cmd = [sys.executable, str(BASELINE_SCRIPT), "--mode", mode, "--port", str(port)]
        return [*cmd, "--uvloop"] if uvloop else cmd
    if custom:
        return shlex.split(custom.format(port=port, mode=mode))
    loop = ["--loop", "uvloop" if uvloop else "asyncio"] if echoserver_has_loop_flag() else []
    return [
        sys.executable,
        "-m",
        "echoserver",
        "--mode",
        mode,
        "--port",
        str(port),
        "--host",
        HOST,
        # No per-handshake access line (the baseline logs nothing) and no connection cap
        # (the idle benchmark opens 10000).
        "--no-log-access",
        "--log-level",
        "warning",
        "--max-connections",
        "0",
        *loop,
    ]


@functools.cache
def echoserver_has_loop_flag() -> bool:
    """Whether this checkout's echoserver takes --loop (older ones always chose uvloop)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "echoserver", "--help"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--loop" in done.stdout


def kind_label(kind: str, custom: str | None) -> str:
    return "custom" if kind == "ours" and custom else kind


# Niceness given to the server and the load (--nice); negative values need root.
NICENESS = 0


def _preexec_load() -> None:
    if NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)


def _preexec_server() -> None:
    """In the server's child: as many file descriptors as allowed, its own process group."""
    raise_nofile()
    os.setpgrp()
    _preexec_load()


class Server:
    """A server under test: started pinned to SERVER_CPU, ready when it answers HTTP."""

    def __init__(self, cmd: Sequence[str], port: int, *, cpu: int | None = SERVER_CPU) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> Server:
        self._log = tempfile.TemporaryFile(prefix="bench-server-")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd if self.cpu is None else pinned(self.cmd, self.cpu),
            cwd=REPO_DIR,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec_server,
        )
        try:
            wait_http(HOST, self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_kb(self) -> int:
        return read_rss_kb(self.pid)

    def cpu_seconds(self) -> float:
        return read_cpu_seconds(self.pid)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something answers an HTTP request on host:port (any status will do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                if sock.recv(16).startswith(b"HTTP/"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no HTTP answer on {host}:{port} within {timeout:.0f}s")


def run_load(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run bench/load.py pinned to LOAD_CPU; return its RESULT object."""
    cmd = pinned([sys.executable, str(LOAD_SCRIPT), *args], LOAD_CPU)
    try:
        done = subprocess.run(
            cmd, capture_output=True, timeout=timeout, check=False, preexec_fn=_preexec_load
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"load did not finish within {timeout:.0f}s: {shlex.join(cmd)}") from exc
    return parse_result(done.stdout.decode(), done.stderr.decode(), done.returncode)


class LoadProcess:
    """bench/load.py pinned to LOAD_CPU (or unpinned with cpu=None), for a benchmark that talks
    to it while it runs: lines from its stdout, commands to its stdin, EOF on its stdin to
    release it, stderr kept in a file."""

    def __init__(self, args: Sequence[str], *, cpu: int | None = LOAD_CPU) -> None:
        self.stderr = tempfile.TemporaryFile(prefix="bench-load-")  # noqa: SIM115 (closed in kill)
        cmd = [sys.executable, str(LOAD_SCRIPT), *args]
        self.proc = subprocess.Popen(
            cmd if cpu is None else pinned(cmd, cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            preexec_fn=_preexec_load,
        )
        self.lines: list[str] = []
        self._unread = b""  # read from the pipe, not yet returned as a line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        """One command line to its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix` (its rest), within `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                # Lines already read come first: the pipe is read in chunks, which may hold
                # several lines, so waiting on the pipe alone could miss one.
                while b"\n" in self._unread:
                    raw, self._unread = self._unread.split(b"\n", 1)
                    line = raw.decode() + "\n"
                    self.lines.append(line)
                    if line.startswith(prefix + " "):
                        return line[len(prefix) + 1 :].rstrip("\n")
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"load exited before {prefix!r}:\n{self.stderr_tail()}")
                self._unread += chunk
        raise RuntimeError(f"no {prefix!r} line from the load within {timeout:.0f}s")

    def release(self) -> None:
        """EOF on its stdin, the signal to stop; finish() then collects its RESULT.

        Releasing several processes first lets them all wind down at once."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None  # so communicate() does not flush it again

    def finish(self, timeout: float) -> dict[str, Any]:
        """Close its stdin (the signal to stop) and return its RESULT."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)  # closes stdin first
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise RuntimeError(f"load did not finish within {timeout:.0f}s") from exc
        return parse_result(
            "".join(self.lines) + (self._unread + out).decode(),
            self.stderr_tail(),
            self.proc.returncode,
        )

    def stderr_tail(self, limit: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()


def parse_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(
        f"load exited with {returncode} and no RESULT line; stderr:\n{stderr[-3000:]}"
    )


# ---------------------------------------------------------------------------- /proc


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, in seconds (/proc/<pid>/stat utime+stime)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, in ns (/proc/<pid>/task/*/schedstat).

    The scheduler's own account (user + system together), to the nanosecond: utime+stime
    in /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for one broadcast.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total


def read_run_delay(pid: int | str = "self") -> float:
    """Seconds a process's threads have waited on a run queue (/proc/<pid>/schedstat).

    Time spent runnable but not running: another process had the CPU. Its growth over a
    window is the noise indicator of a benchmark on a shared machine.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def read_status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def read_rss_kb(pid: int) -> int:
    return read_status_kb(pid, "VmRSS")


def settled_rss(pid: int, settle: float) -> int:
    """A process's VmRSS once it has stopped moving (or after `settle` * 3 seconds)."""
    time.sleep(settle)
    rss = read_rss_kb(pid)
    deadline = time.monotonic() + settle * 2
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read_rss_kb(pid)
        if abs(now - rss) < 256:
            return now
        rss = now
    return rss


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all CPUs (/proc/stat).

    Busy minus the CPU time of the processes a benchmark started is what everyone else on
    the machine took meanwhile: the noise of a benchmark that uses every CPU.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def cpu_busy_pct(sample: float = 0.5) -> float:
    """How busy the whole machine was over `sample` seconds (/proc/stat), in percent."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields)

    idle0, total0 = snapshot()
    time.sleep(sample)
    idle1, total1 = snapshot()
    total = total1 - total0
    return 100.0 * (1 - (idle1 - idle0) / total) if total else 0.0


def wait_quiet(max_wait: float, threshold: float = 15.0) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until other processes leave the CPUs mostly idle.

    Returns (seconds waited, busy percent of the last sample). Other people's test runs
    on a shared 2-CPU machine are the main source of noise; this skips the worst of it.
    """
    start = time.monotonic()
    busy = cpu_busy_pct()
    while busy > threshold and time.monotonic() - start < max_wait:
        busy = cpu_busy_pct()
    return time.monotonic() - start, busy


# ---------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, nearest rank; None if empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline is None or baseline == 0:
        return None
    if float("inf") in (ours, baseline):
        return None
    return ours / baseline


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    if round(value, digits) == 0:
        value = 0.0  # no "-0.0"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------------------- reporting


def command_line() -> str:
    """The exact command that produced a report, runnable from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_DIR)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=5, check=False
    ).stdout.strip()


def _git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def environment_note(uvloop: bool) -> str:
    """One line saying where and how the figures were taken."""
    import tornado

    pinning = (
        f"server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}"
        if can_pin()
        else "NOT pinned (taskset missing or < 2 CPUs)"
    )
    load1, _, _ = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, {pinning}; Python {platform.python_version()}, "
        f"Tornado {tornado.version}, loop {'uvloop' if uvloop else 'asyncio'}; "
        f"git {_git_revision()}; load average at end {load1:.2f}"
    )


def add_server_args(parser: argparse.ArgumentParser, *, default_runs: int = 3) -> None:
    """The options every benchmark shares: runs, which servers, custom command, loop."""
    parser.add_argument("--runs", type=int, default=default_runs, help="runs per server")
    parser.add_argument(
        "--only", choices=KINDS, help="benchmark only the baseline or only ours (no ratio)"
    )
    parser.add_argument(
        "--server-cmd",
        metavar="TEMPLATE",
        help="benchmark this command instead of echoserver; {port} and {mode} are replaced, "
        "e.g. 'python -m echoserver --mode {mode} --port {port}'",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for the machine to be idle "
        "(other processes under 15%% busy); 0 = don't wait",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the server and the load at this niceness; e.g. -5 (as root) gives them "
        "priority over other people's processes on a shared machine (default 0)",
    )
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=uvloop_available(),
        help="run both servers on uvloop (echoserver via --loop; one without that flag picks "
        "uvloop itself when installed); --no-uvloop: both on asyncio (default: on when "
        "uvloop is installed)",
    )


def apply_common_args(args: argparse.Namespace) -> None:
    """What the shared options change in this process: file limit and niceness."""
    global NICENESS
    check_runs(args.runs)
    raise_nofile()
    NICENESS = args.nice


def kinds_to_run(only: str | None) -> list[str]:
    return [only] if only else list(KINDS)


def check_runs(runs: int) -> None:
    if not 1 <= runs <= 50:
        sys.exit("--runs must be between 1 and 50")


@contextlib.contextmanager
def started_server(kind: str, mode: str, *, uvloop: bool, custom: str | None) -> Iterator[Server]:
    """Start one server under test on a free port; stop it on the way out."""
    port = free_port()
    server = Server(server_command(kind, mode, port, uvloop=uvloop, custom=custom), port)
    try:
        server.start()
    except Exception as exc:
        raise RuntimeError(f"{kind} server did not start: {exc}\n{server.log_tail()}") from exc
    try:
        yield server
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- {kind} server log (tail) ---\n{server.log_tail()}") from exc
    finally:
        server.stop()


def say(text: str) -> None:
    """Progress, on stderr so that stdout carries only the report."""
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- runs and reports


Result = dict[str, Any]


def run_interleaved(
    kinds: Sequence[str], runs: int, one_run: Any, *, label: Any = None, quiet_wait: float = 0
) -> dict[str, list[Result]]:
    """Call one_run(kind, i) for run 1..runs, alternating servers so drift hits both alike.

    Before each run, wait up to `quiet_wait` seconds for the machine to be idle. A run that
    fails is kept as {"error": "..."} and left out of the medians.
    """
    results: dict[str, list[Result]] = {kind: [] for kind in kinds}
    for i in range(1, runs + 1):
        for kind in kinds:
            name = label(kind) if label else kind
            waited, busy = wait_quiet(quiet_wait) if quiet_wait > 0 else (0.0, 0.0)
            say(
                f"run {i}/{runs}: {name} (machine {busy:.0f}% busy"
                f"{f' after waiting {waited:.0f}s' if waited >= 1 else ''}) ..."
            )
            started = time.monotonic()
            try:
                result = one_run(kind, i)
            except (RuntimeError, TimeoutError, OSError, SystemExit) as exc:
                text = str(exc).strip() or repr(exc)
                result = {"error": text.splitlines()[0]}
                say(f"run {i}/{runs}: {name} FAILED: {text}")
            else:
                say(f"run {i}/{runs}: {name} done in {time.monotonic() - started:.1f}s")
            result["busy_before_pct"] = busy
            results[kind].append(result)
    return results


def _windows(result: Result) -> list[Result]:
    """The measured windows of a run: itself, or its nested scenarios."""
    if "server_wait_pct" in result:
        return [result]
    return [v for v in result.values() if isinstance(v, dict) and "server_wait_pct" in v]


def disturbed(result: Result, limit: float = 5.0) -> bool:
    """Did the server or the load wait for its CPU more than `limit` % of a window?"""
    return any(w["server_wait_pct"] > limit or w["load_wait_pct"] > limit for w in _windows(result))


class Metric:
    """One column of a report: how to read it from a run's result and how to print it."""

    def __init__(self, title: str, key: Any, digits: int = 1, ratio: bool = True) -> None:
        self.title = title
        self.key = key if callable(key) else (lambda r, k=key: r.get(k))
        self.digits = digits
        self.ratio = ratio

    def value(self, result: Result) -> float | None:
        if "error" in result:
            return None
        try:
            v = self.key(result)
        except (KeyError, TypeError):
            return None
        return None if v is None else float(v)


def summary_table(
    results: dict[str, list[Result]], metrics: Sequence[Metric], names: dict[str, str]
) -> str:
    """Medians per server, then the ratio ours/baseline when both ran."""
    rows = []
    medians: dict[str, list[float | None]] = {}
    for kind, runs in results.items():
        ok = sum(1 for r in runs if "error" not in r)
        medians[kind] = [median([m.value(r) for r in runs]) for m in metrics]
        rows.append(
            [f"{names[kind]} ({ok}/{len(runs)} runs)"]
            + [fmt(v, m.digits) for v, m in zip(medians[kind], metrics, strict=True)]
        )
    if "baseline" in medians and "ours" in medians:
        rows.append(
            [f"{names['ours']} / baseline"]
            + [
                fmt_ratio(ratio(o, b)) if m.ratio else ""
                for o, b, m in zip(medians["ours"], medians["baseline"], metrics, strict=True)
            ]
        )
    return markdown_table(["server (median)", *(m.title for m in metrics)], rows)


def runs_table(
    results: dict[str, list[Result]], metrics: Sequence[Metric], names: dict[str, str]
) -> str:
    """Every run, so that the spread (noise) is visible."""
    rows = []
    for kind, runs in results.items():
        for i, r in enumerate(runs, 1):
            if "error" in r:
                rows.append([f"{names[kind]} #{i}", "FAILED"] + [""] * (len(metrics) - 1))
            else:
                label = f"{names[kind]} #{i}{' (disturbed)' if disturbed(r) else ''}"
                rows.append([label] + [fmt(m.value(r), m.digits) for m in metrics])
    return markdown_table(["run", *(m.title for m in metrics)], rows)


def noise_note(results: dict[str, list[Result]], names: dict[str, str]) -> str:
    """Run-queue waits of every run: time the server or the load was runnable but another
    process had its CPU. More than a few percent means the run was disturbed. Failures too."""
    parts = []
    failures = []
    for kind, runs in results.items():
        cells = []
        for i, r in enumerate(runs, 1):
            if "error" in r:
                failures.append(f"- {names[kind]} #{i} failed: {r['error'][:200]}")
            ws = _windows(r)
            cells.append(
                "+".join(f"{w['server_wait_pct']:.0f}/{w['load_wait_pct']:.0f}" for w in ws)
                if ws
                else "-"
            )
        parts.append(f"{names[kind]} {', '.join(cells)}")
    note = (
        "\nrun-queue wait % in the window, server/load, per run (time runnable while another "
        f"process had the CPU; > 5 marks a run disturbed): {'; '.join(parts)}"
    )
    return "\n".join([note, *failures])


def write_json(path: str | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        say(f"raw results written to {path}")


def print_footer(
    args: argparse.Namespace,
    results: Any,
    metrics: Any,
    names: Any,
    *,
    noise: bool = True,
) -> None:
    """What every benchmark prints after its summary: each run, noise, machine, command."""
    print(runs_table(results, metrics, names))
    if noise:
        print(noise_note(results, names))
    print(f"\n{environment_note(args.uvloop)}")
    if args.server_cmd:
        print(f"custom server: {args.server_cmd}")
    print(f"command: {command_line()}")
    write_json(args.json, {"command": command_line(), "results": results})


def run_all(
    args: argparse.Namespace, one_run: Callable[[str, argparse.Namespace], Result]
) -> tuple[list[Result], dict[str, str]]:
    """Every run of every server (interleaved), and the servers' display names."""
    kinds = kinds_to_run(args.only)
    names = {k: kind_label(k, args.server_cmd) for k in kinds}
    results = run_interleaved(
        kinds,
        args.runs,
        lambda kind, _i: one_run(kind, args),
        label=names.get,
        quiet_wait=args.quiet_wait,
    )
    return results, names


@contextlib.contextmanager
def redis_server(directory: str) -> Iterator[tuple[str, int]]:
    """A private redis-server on a free port; yields (URL, pid)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", HOST, "--save", ""),
            *("--appendonly", "no", "--dir", directory),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0", proc.pid
    finally:
        stop_process(proc, 10)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def redis_ping(port: int) -> bool:
    """Whether a redis-server answers PING on this port of HOST."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False

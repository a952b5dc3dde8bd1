"""An earlier commit of echoserver, built once into its own venv: the "before" of a comparison.

`build(commit)` exports the commit (`git archive`) to <temp>/echoserver-bench/<sha>/src and
installs it there in a venv of its own (`pip install -e 'src[speed]'`), with every package
held to the version this interpreter has (`pip freeze` as constraints), so both servers run
on the same Tornado, redis, PyJWT and uvloop. The build is kept and reused by later
invocations (a marker written last says it completed). The server is started through the
venv's `echoserver` script, never `python -m echoserver`: the benchmarks run servers from
this checkout's root, and `-m` would put that directory, with today's package, first on the
path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import REPO_DIR
from reporting import say

CACHE = Path(tempfile.gettempdir()) / "echoserver-bench"
MARKER = "built"


def full_sha(commit: str) -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--verify", f"{commit}^{{commit}}"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"no commit {commit!r} in {REPO_DIR}: {done.stderr.strip()}")
    return done.stdout.strip()


def _run(cmd: list[str], what: str, timeout: float = 600) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def build(commit: str) -> Path:
    """The `echoserver` script of `commit`'s own venv, built now or by an earlier run."""
    sha = full_sha(commit)
    home = CACHE / sha
    script = home / "venv" / "bin" / "echoserver"
    if (home / MARKER).exists() and script.exists():
        return script
    say(f"building {sha[:7]} into {home} (once; later runs reuse it) ...")
    shutil.rmtree(home, ignore_errors=True)
    (home / "src").mkdir(parents=True)
    tar = home / "src.tar"
    _run(["git", "-C", str(REPO_DIR), "archive", f"--output={tar}", sha], "git archive")
    _run(["tar", "-xf", str(tar), "-C", str(home / "src")], "unpacking the archive")
    tar.unlink()
    return _finish(sha, home, script)


def _finish(sha: str, home: Path, script: Path) -> Path:
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    constraints = home / "constraints.txt"
    constraints.write_text(freeze)
    _run([sys.executable, "-m", "venv", str(home / "venv")], "creating the venv")
    pip = str(home / "venv" / "bin" / "pip")
    _run(
        [pip, "install", "-q", "-c", str(constraints), "-e", f"{home / 'src'}[speed]"],
        f"installing {sha[:7]}",
    )
    if not script.exists():
        raise SystemExit(f"{sha[:7]} installed no echoserver script at {script}")
    (home / MARKER).write_text(sha + "\n")
    return script

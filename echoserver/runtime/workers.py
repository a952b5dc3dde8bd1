"""Worker processes: fork_workers() forks `processes` workers, restarts one that dies, and
passes a stop signal on to all of them (each drains); a worker dies with its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time

log = logging.getLogger("echoserver")


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_MAX_RESTARTS = 100


def fork_workers(count: int, shutdown_timeout: float) -> int:
    """Fork `count` workers sharing the bound sockets; return the worker's index in each.

    The parent never returns: it restarts workers that crash (up to _MAX_RESTARTS), forwards
    SIGHUP (reload the certificate) to every worker, forwards
    SIGTERM/SIGINT as SIGTERM to every worker so each drains its clients, kills workers still
    running shutdown_timeout + 5 s later, and exits 0 once all are gone after a stop signal
    (1 if they all died on their own). tornado.process.fork_processes forwards no signals.
    """
    workers: dict[int, int] = {}  # pid -> index
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers", len(workers))
            signal.signal(signal.SIGALRM, kill_all)
            signal.alarm(int(shutdown_timeout) + 5)
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reload(signum: int, frame: object) -> None:
        for pid in workers:  # each worker reloads its own certificate
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def kill_all(signum: int, frame: object) -> None:
        log.warning("killing %d workers that did not stop in time", len(workers))
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def spawn(index: int) -> int | None:
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across fork, so a stop signal never runs the parent's handler in a worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            _die_with_parent(parent)
            return index
        workers[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return None

    for signum in _STOP_SIGNALS:
        signal.signal(signum, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(count):
        if spawn(index) is not None:
            return index
    log.info("started %d workers: %s", count, " ".join(map(str, workers)))
    restarts = 0
    gave_up = False
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        dead = workers.pop(pid, None)
        if dead is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping or code == 0:
            continue
        if restarts >= _MAX_RESTARTS:
            log.error("worker %d (pid %d) exited with %d; too many restarts", dead, pid, code)
            gave_up = True
            continue
        restarts += 1
        log.warning("worker %d (pid %d) exited with %d; restarting it", dead, pid, code)
        time.sleep(0.2)  # no tight loop when a worker dies at once
        if not stopping and spawn(dead) is not None:
            return dead
    signal.alarm(0)
    log.info("all workers stopped")
    sys.exit(1 if gave_up and not stopping else 0)


def _die_with_parent(parent: int) -> None:
    """Have Linux send this worker SIGTERM (a drain) if the supervising parent dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

"""run(settings): logging, the event loop, sockets, TLS, worker processes, graceful drain.

This is the only module that touches process-wide things (signals, fork, the loop policy).
It wires the concrete broker into the hub and the hub into the Application. What can keep
the server from starting (the TLS files, the address) is tried before any worker is forked
and reported like a config error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Mapping

import tornado.httpserver
import tornado.netutil

from echoserver import __version__
from echoserver.brokers import create_broker
from echoserver.config import Settings, describe
from echoserver.runtime.intake import FrontDoor
from echoserver.web import redact
from echoserver.web.app import EchoServerApp, make_app
from echoserver.wire.framing import CloseCode

log = logging.getLogger("echoserver")

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
HTTP_MAX_BODY = 64 * 1024
HTTP_IDLE_TIMEOUT = 60.0  # seconds, for plain HTTP requests (not WebSocket connections)
# Allocations between two young GC passes (Python's default is 700). A handshake
# allocates ~80 container objects and its connection keeps ~15 of them for hours: at 700,
# a storm of 19,000 handshakes ran ~2,300 young and ~19 full passes, half the server's
# CPU. Objects that die before a pass cost it nothing, so fewer, larger passes cost less.
GC_YOUNG_THRESHOLD = 50_000


class JSONFormatter(logging.Formatter):
    """One JSON object per line; an access line's fields (extra={"access": {...}}) as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:  # exc_text: set (redacted) by redact.RedactingFilter
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        else:
            cause = getattr(record, "exception", None)
            if isinstance(cause, str):  # a cause without its traceback
                entry["exception"] = cause
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format == "json":
        handler.setFormatter(JSONFormatter())
        # What would otherwise reach stderr as plain text goes through the handler too.
        logging.captureWarnings(True)
        sys.excepthook = lambda *exc: log.critical("uncaught exception", exc_info=exc)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Every record on its way out, from any logger: no secret reaches stderr.
    handler.addFilter(redact.install(settings.websocket.auth_token, settings.api.key))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())


def choose_loop(choice: str) -> str:
    """Install the event loop the settings ask for ("auto": uvloop if installed); its name.

    config refuses loop = "uvloop" when uvloop is not installed.
    """
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class StartupError(Exception):
    """Why the server cannot start, in one line naming the settings involved."""


def ssl_context(
    settings: Settings, sources: Mapping[str, str] | None = None
) -> ssl.SSLContext | None:
    if not settings.tls.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = TLS_VERSIONS[settings.tls.min_version]
    context.set_alpn_protocols(["http/1.1"])  # the only protocol served
    try:
        # config has checked the files; this catches one changed since. A key with a
        # passphrase fails here instead of OpenSSL prompting on the terminal.
        context.load_cert_chain(settings.tls.certfile, settings.tls.keyfile, password=lambda: b"")
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        cert = describe(settings, "tls.certfile", sources)
        key = describe(settings, "tls.keyfile", sources)
        raise StartupError(f"cannot load TLS files: {cert}, {key}: {err}") from err
    return context


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def reload_tls(server: tornado.httpserver.HTTPServer, settings: Settings) -> None:
    """SIGHUP: load certfile/keyfile again (a renewed certificate) for new connections.

    Open connections keep the certificate they were made with. A file that does not load
    is logged and the current certificate kept: never a crash, never a port without TLS.
    """
    if not settings.tls.certfile:
        log.info("SIGHUP: no TLS configured, nothing to reload")
        return
    try:
        context = ssl_context(settings)
    except StartupError as error:
        log.error("SIGHUP: keeping the current certificate: %s", error)
        return
    server.ssl_options = context  # read for every new connection
    log.info("SIGHUP: reloaded the TLS certificate from %s", settings.tls.certfile)


# Descriptors a process needs besides one per client: listeners, Redis, logs, the loop.
SPARE_FILES = 64


def check_open_files(settings: Settings) -> None:
    """Raise the soft open-files limit toward what max_connections needs, and say clearly
    when the hard limit stops short (a client past it would be refused by accept())."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.websocket.max_connections
    # 0 = no cap on connections: as many files as the hard limit allows.
    target = wanted + SPARE_FILES if wanted else hard
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if wanted and soft < wanted + SPARE_FILES:
        log.warning(
            "websocket.max_connections = %d needs about %d open files per process, but the "
            "limit is %d (hard %d): raise it (ulimit -n, or LimitNOFILE= in the systemd unit) "
            "or lower websocket.max_connections to %d",
            wanted,
            wanted + SPARE_FILES,
            soft,
            hard,
            max(1, soft - SPARE_FILES),
        )


def listen(settings: Settings, sources: Mapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets for host and port, or a StartupError naming the culprit."""
    try:
        # A deep accept queue: a burst of handshakes waits in the kernel, not in SYN retries.
        return tornado.netutil.bind_sockets(settings.port, settings.host, backlog=LISTEN_BACKLOG)
    except OSError as err:
        reason = _why_not_listening(settings, sources, err)
        raise StartupError(f"cannot listen: {reason}") from err


def _why_not_listening(settings: Settings, sources: Mapping[str, str] | None, err: OSError) -> str:
    host = describe(settings, "host", sources)
    port = describe(settings, "port", sources)
    if isinstance(err, socket.gaierror):
        return f"{host}: no such host name ({err.strerror})"
    if err.errno == errno.EADDRINUSE:
        return (
            f"{port}: address already in use on {settings.host}; "
            "stop what holds it or choose another port"
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host}: not an address of this machine; "
            "use 127.0.0.1, 0.0.0.0, :: or one of its own addresses"
        )
    if err.errno == errno.EACCES and 0 < settings.port < 1024:
        return f"{port}: permission denied; ports below 1024 need privileges"
    return f"{host}, {port}: {err.strerror or err}"


def report(settings: Settings, error: StartupError) -> None:
    """One line on stderr, like a config error; a JSON record when the log format is json."""
    if settings.log.format == "json":
        cause = error.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause else None
        log.critical("%s", error, extra={"exception": detail} if detail else None)
    else:
        print(f"echoserver: {error}", file=sys.stderr)


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


def run(settings: Settings, sources: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0; 2 if the server cannot start.

    ``sources`` (from config.resolve) says where each setting came from, for the error line.
    """
    configure_logging(settings)
    check_open_files(settings)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # Until serve() handles it, a SIGHUP (a certificate reload) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        context = ssl_context(settings, sources)
        sockets = listen(settings, sources)
    except StartupError as error:
        report(settings, error)
        return 2
    port = sockets[0].getsockname()[1]
    loop_name = choose_loop(settings.loop)
    if settings.processes != 1:
        # Each worker returns here; the parent supervises and exits inside fork_workers.
        fork_workers(settings.processes or os.cpu_count() or 1, settings.shutdown_timeout)
    asyncio.run(serve(settings, sockets, port, loop_name, context))
    return 0


async def serve(
    settings: Settings,
    sockets: list[socket.socket],
    port: int,
    loop_name: str,
    context: ssl.SSLContext | None,
) -> None:
    # Stop signals are handled from here on, so one sent as soon as the ready line below
    # appears still drains and exits 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if context is not None and settings.processes != 1:
        # A worker may start long after the supervisor loaded the files (a restart after a
        # crash): it loads them again, so it serves what a reload would, not the original.
        with contextlib.suppress(StartupError):
            context = ssl_context(settings)
    broker = create_broker(settings.broadcast.broker)
    app = make_app(settings, broker)
    await app.hub.start()
    server = FrontDoor(
        app,
        occupancy=app.occupancy,
        metrics=app.metrics,
        request_timeout=settings.limits.request_timeout,
        ssl_options=context,
        xheaders=False,
        # Only the publish API takes a request body (it raises the cap for itself). A
        # whole request must arrive within limits.request_timeout (FrontDoor's deadline);
        # the idle timeout is Tornado's own bound on waiting for headers, kept above it.
        max_body_size=HTTP_MAX_BODY,
        idle_connection_timeout=HTTP_IDLE_TIMEOUT,
    )
    server.add_sockets(sockets)
    loop.add_signal_handler(signal.SIGHUP, reload_tls, server, settings)
    scheme = "https" if context else "http"
    # Where a local browser reaches it: a wildcard address means this machine.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    log.info(
        "echoserver %s (%s mode, %s) page %s://%s:%d/ websocket %s://%s:%d%s",
        __version__,
        settings.mode,
        loop_name,
        scheme,
        host,
        port,
        "wss" if context else "ws",
        host,
        port,
        settings.websocket.path,
    )
    await stop.wait()
    await drain(app, server, settings.shutdown_timeout)


async def drain(app: EchoServerApp, server: tornado.httpserver.HTTPServer, timeout: float) -> None:
    """Refuse new clients, close every client with 1001, wait for them up to `timeout` seconds.

    The port stays open while clients leave, so /healthz can answer 503 "draining" (and a
    new handshake 503) to load balancers; it closes when the wait is over.
    """
    log.info("draining %d connections (up to %.1fs)", len(app.connections), timeout)
    app.draining = True
    for connection in list(app.connections):
        connection.close(CloseCode.GOING_AWAY, "server shutting down")
    deadline = time.monotonic() + timeout
    while app.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if app.connections:
        log.warning("%d connections did not close in time", len(app.connections))
    server.stop()
    await server.close_all_connections()
    app.keepalive.close()
    await app.hub.close()
    log.info("stopped")

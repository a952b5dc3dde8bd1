"""What can keep the server from starting, tried before any worker is forked: the
listening sockets (and a one-line reason when they cannot be had), StartupError and its
report, like a config error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Mapping

import tornado.netutil

from echoserver.config import Settings, describe

log = logging.getLogger("echoserver")


LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


class StartupError(Exception):
    """Why the server cannot start, in one line naming the settings involved."""


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

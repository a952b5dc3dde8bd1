"""Process limits: the open-files limit max_connections needs, and the garbage collector's
young-generation threshold.
"""

from __future__ import annotations

import contextlib
import logging
import resource

from echoserver.config import Settings

log = logging.getLogger("echoserver")


# Allocations between two young GC passes (Python's default is 700). A handshake
# allocates ~80 container objects and its connection keeps ~15 of them for hours: at 700,
# a storm of 19,000 handshakes ran ~2,300 young and ~19 full passes, half the server's
# CPU. Objects that die before a pass cost it nothing, so fewer, larger passes cost less.
GC_YOUNG_THRESHOLD = 50_000


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

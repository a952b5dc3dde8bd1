"""Open files: the server raises its soft limit toward what max_connections needs, and says
clearly what to raise when the hard limit stops short."""

from __future__ import annotations

import resource

from tests.servers import ServerProcess


def start_with_file_limit(soft: int, hard: int, *args: str) -> str:
    """Start a server under this RLIMIT_NOFILE, stop it once ready; its log up to then."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    server = ServerProcess(list(args), preexec_fn=limit)
    try:
        return server.wait_ready().log()
    finally:
        server.stop()


def test_a_hard_limit_below_max_connections_is_named_with_what_to_raise() -> None:
    log = start_with_file_limit(256, 512, "--max-connections", "10000")
    assert "websocket.max_connections = 10000 needs about 10064 open files" in log
    assert "the limit is 512 (hard 512)" in log  # the soft limit was raised to the hard one
    assert "ulimit -n" in log and "LimitNOFILE=" in log
    assert " page http" in log  # a warning, not a refusal: it still serves


def test_a_soft_limit_is_raised_quietly_when_the_hard_one_allows() -> None:
    log = start_with_file_limit(256, 20000, "--max-connections", "10000")
    assert "open files" not in log
    assert " page http" in log

"""`load.py idle`: hold N idle connections, from many source addresses, until stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import procs
from load_client import Counters, Idle, connect_many, emit, error_counts, hold_limit, log


async def wait_stdin_closed(timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(fd, 4096) and not closed.done():
            closed.set_result(True)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(closed, timeout)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def idle_main(args: argparse.Namespace) -> dict[str, Any]:
    hold_limit(args.count)
    counters = Counters()
    url = f"ws://{args.host}:{args.port}{args.path}"
    start = time.perf_counter()
    results = await connect_many(
        url,
        lambda _i: Idle(counters),
        args.count,
        concurrency=args.concurrency,
        timeout=args.connect_timeout,
        socket_factory=procs.source_socket_factory(args.count, args.per_address),
        read_buffer=1024,
    )
    elapsed = time.perf_counter() - start
    transports = [r[0] for r in results if not isinstance(r, BaseException)]
    errors = error_counts(results)
    opened = {"opened": len(transports), "failed": len(results) - len(transports)}
    emit("OPEN", opened)
    log(f"{len(transports)} idle connections open in {elapsed:.1f}s; holding until stdin closes")
    held = await wait_stdin_closed(args.hold)
    still_open = sum(1 for t in transports if not t.is_disconnected)
    for transport in transports:
        transport.disconnect()
    return {
        **opened,
        "errors": errors,
        "connect_s": elapsed,
        "still_open_at_end": still_open,
        "server_closes": counters.server_closes,
        "released_by_stdin": held,
    }

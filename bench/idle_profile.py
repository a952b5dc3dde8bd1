"""What one idle WebSocket connection holds in the server: a tracemalloc breakdown per connection.

Runs echoserver in this process (as `python -m echoserver` would, without forking), with
tracemalloc on; `bench/load.py idle` (a subprocess) opens N connections and holds them. The
snapshot taken once they are open (after a full GC) is diffed against the one taken before,
grouped by the line that allocated, and divided by N: the bytes each connection keeps, and
where they were allocated. Then, from one open connection's endpoint, the objects it reaches
(gc.get_referents, stopping at objects every connection shares) with sys.getsizeof each.

    python bench/idle_profile.py [--connections 500] [--mode echo|broadcast] [--loop uvloop]

An earlier commit: run this file with that build's interpreter (prior_build.py's venv) and
`--load-python` this venv's python.

Only for looking: tracemalloc slows the server, so no timing here; bench_idle.py measures RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs

FRAMES = 12  # traceback depth kept per allocation


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--mode", choices=("echo", "broadcast", "mixed"), default="echo")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to show")
    parser.add_argument("--tracebacks", type=int, default=0, help="full stacks of the top N")
    parser.add_argument(
        "--load-python",
        help="the interpreter that runs bench/load.py (one with picows), when this one is "
        "an earlier build's venv (profiling the code before a change)",
    )
    parser.add_argument("--compression", action="store_true", help="permessage-deflate on")
    return parser.parse_args()


LOAD_PYTHON = [sys.executable]  # --load-python replaces it


async def open_idle(port: int, count: int) -> asyncio.subprocess.Process:
    load = await asyncio.create_subprocess_exec(
        LOAD_PYTHON[0],
        str(procs.LOAD_SCRIPT),
        "idle",
        "--port",
        str(port),
        "--count",
        str(count),
        "--concurrency",
        "50",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert load.stdout is not None
    while True:
        line = await asyncio.wait_for(load.stdout.readline(), 120)
        if not line:
            raise SystemExit("the load exited before opening its connections")
        if line.startswith(b"OPEN "):
            print(f"load: {line.decode().strip()}", file=sys.stderr)
            return load


def site(stat: tracemalloc.StatisticDiff) -> str:
    """The allocating line, and the nearest echoserver frame when it is not one."""
    frames = list(stat.traceback)  # oldest first: the allocating frame is the last
    first = frames[-1] if frames else None
    ours = next((f for f in reversed(frames) if "/echoserver/" in f.filename), None)
    text = f"{short(first.filename)}:{first.lineno}" if first else "?"
    if ours is not None and ours is not first:
        text += f"  <- {short(ours.filename)}:{ours.lineno}"
    return text


def short(filename: str) -> str:
    for marker in ("/echoserver/", "/site-packages/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def walk(root: object, shared: set[int]) -> list[tuple[str, int]]:
    """Objects reachable from `root` that are not in `shared` (reached from elsewhere too)."""
    seen: set[int] = set()
    out: list[tuple[str, int]] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in shared:
            continue
        if isinstance(obj, (type, type(sys), type(walk))) and obj is not root:
            continue  # classes, modules, functions: shared code
        seen.add(id(obj))
        out.append((describe(obj), sys.getsizeof(obj)))
        stack.extend(gc.get_referents(obj))
    return out


def describe(obj: object) -> str:
    kind = type(obj).__qualname__
    if isinstance(obj, dict):
        return f"dict({len(obj)})"
    if isinstance(obj, (str, bytes)):
        return f"{kind}({len(obj)})"
    return kind


async def main(args: argparse.Namespace) -> None:
    from echoserver.brokers import create_broker
    from echoserver.config import load
    from echoserver.runtime.intake import FrontDoor
    from echoserver.runtime.limits import GC_YOUNG_THRESHOLD
    from echoserver.web.app import make_app

    settings = load(
        "",
        {},
        {
            "mode": args.mode,
            "host": "127.0.0.1",
            "port": 0,
            "websocket.max_connections": 0,
            "websocket.compression": args.compression,
            "log.access": False,
            "log.level": "warning",
        },
    )
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    app = make_app(settings, create_broker(settings.broadcast.broker))
    await app.server.start()
    server = FrontDoor(
        app,
        occupancy=app.server.occupancy,
        metrics=app.server.metrics,
        request_timeout=settings.limits.request_timeout,
        xheaders=False,
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    server.add_sockets([listener])
    port = listener.getsockname()[1]

    # Warm up: one round of connections first, so that caches, interned strings and the
    # loop's own structures are in the "before" snapshot, not counted per connection.
    warm = await open_idle(port, 50)
    assert warm.stdin is not None
    warm.stdin.close()
    await warm.wait()
    await asyncio.sleep(0.5)

    gc.collect()
    before = tracemalloc.take_snapshot()
    load_proc = await open_idle(port, args.connections)
    await asyncio.sleep(1.0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    count = len(app.server.connections)
    print(f"## {count} idle connections ({args.mode} mode, {args.loop})\n")
    stats = after.compare_to(before, "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"traced bytes per connection: {total / count:.0f} ({total / 1024:.0f} KB in all)\n")
    by_site: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for stat in stats:
        by_site[site(stat)] += stat.size_diff
        blocks[site(stat)] += stat.count_diff
    print("| bytes/conn | blocks/conn | allocated at |\n|---:|---:|---|")
    for where, size in by_site.most_common(args.top):
        print(f"| {size / count:.0f} | {blocks[where] / count:.2f} | {where} |")
    if args.tracebacks:
        for stat in sorted(stats, key=lambda s: -s.size_diff)[: args.tracebacks]:
            print(
                f"\n{stat.size_diff / count:.0f} bytes/conn, {stat.count_diff / count:.2f} blocks:"
            )
            for frame in stat.traceback.format(most_recent_first=True)[::2]:
                print("   ", frame.strip())

    # One connection's own objects.
    endpoint = next(iter(app.server.connections))
    other = next(c for c in app.server.connections if c is not endpoint)
    # Server-wide state is not the connection's: the walk stops there; what another
    # connection reaches too (settings, interned strings, shared frames) is shared.
    stop = {id(app), id(app.server), id(asyncio.get_running_loop())}
    stop.update(id(value) for value in vars(app.server).values())
    shared = {id(o) for o in reach(other, stop)} | stop
    mine = walk(endpoint, shared)
    print(f"\none connection: {len(mine)} objects of its own, {sum(s for _, s in mine)} bytes")
    kinds: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for kind, size in mine:
        kinds[kind] += 1
        sizes[kind] += size
    print("| object | count | getsizeof |\n|---|---:|---:|")
    for kind, size in sizes.most_common(40):
        print(f"| {kind} | {kinds[kind]} | {size} |")
    assert load_proc.stdin is not None
    load_proc.stdin.close()
    await load_proc.wait()


def reach(root: object, stop: set[int]) -> list[object]:
    seen: set[int] = set(stop)
    out: list[object] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (type, type(sys), type(walk))) and obj is not root:
            continue
        out.append(obj)
        if len(out) > 2_000_000:
            break
        stack.extend(gc.get_referents(obj))
    return out


if __name__ == "__main__":
    arguments = parse_args()
    procs.raise_nofile()
    if arguments.load_python:
        LOAD_PYTHON[0] = arguments.load_python
    tracemalloc.start(FRAMES)
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))

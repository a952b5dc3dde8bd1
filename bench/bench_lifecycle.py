"""What presence and lifecycle webhooks cost the broadcast path: joins and deliveries, per variant.

One invocation, the same run for every variant, interleaved run by run (so drift on the
machine hits them alike); each run a fresh server on CPU 0 (broadcast mode) and the load on
CPU 1, as bench_broadcast.py: `--clients` (500) members of channel "bench", the first also
sending, `--inflight` (4) broadcasts of `--size` (200) bytes in flight. Every member
connects with its own HS256 token (its own `sub` and an `info` claim, all minted before the
first run), and every echoserver variant reads the same config file but for the two
switches (a `[[namespaces]]` table for "bench*", and `[webhooks]`):

- `before`: the code before presence and webhooks existed (`--before-commit`, fa52e7d, the
  last commit on main before issue 21), built once into its own venv (prior_build.py);
- `off`: this checkout, join_leave = false, no webhooks;
- `presence`: join_leave = true (every join is a roster write and a join event on the
  channel's path; broadcast-mode members skip those events);
- `webhooks`: `[webhooks] url` = a receiver in this process (webhook_sink.py: Tornado on
  127.0.0.1, 204 to everything), every event kind;
- `both`: join_leave = true and the webhooks;
- `baseline` (only when asked for): the seed-style Tornado server, which ignores the token.

Per run, two phases. **Join**: from the first connect until the probe broadcast reached every
member, plus `--join-settle` (1 s) for the work the joins set off after their 101 (webhook
requests): seconds to admit all members and the server's CPU µs per join (schedstat).
**Broadcast**: 1 s warm-up, then a `--duration` (5 s) window: deliveries/s, completion
p50/p99, lost and repeated, the server's CPU µs per delivery. With `--broker redis` each run
gets a fresh private redis-server (so no presence or ledger state carries over) and the
report adds Redis's CPU per join and per delivery (Redis is not pinned).

    python bench/bench_lifecycle.py [--clients 500] [--runs 3] [--broker memory|redis]
        [--variants before,off,presence,webhooks,both[,baseline]]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prior_build
import procs
import reporting
import runner
import storm_auth
from redis_helpers import redis_server
from reporting import Metric
from webhook_sink import WebhookSink, difference

from echoserver.config.webhooks import EVENT_KINDS

BEFORE_COMMIT = "fa52e7d"  # main before issue 21: no presence roster, no webhooks
CHANNEL = "bench"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    join_leave: bool = False
    webhooks: bool = False
    before: bool = False  # the --before-commit build instead of this checkout
    baseline: bool = False  # the seed-style server


VARIANTS = {
    v.name: v
    for v in (
        Variant("before", "before (fa52e7d)", before=True),
        Variant("off", "off"),
        Variant("presence", "presence", join_leave=True),
        Variant("webhooks", "webhooks", webhooks=True),
        Variant("both", "presence + webhooks", join_leave=True, webhooks=True),
        Variant("baseline", "baseline", baseline=True),
    )
}
DEFAULT_VARIANTS = "before,off,presence,webhooks,both"


def fmt_events(r: dict[str, Any]) -> float | None:
    hooks = r.get("webhooks")
    return None if hooks is None else sum(hooks["events"].values())


METRICS = [
    Metric("join s", "join_s", 2),
    Metric("server µs/join", "join_server_us_per_join", 0),
    Metric("redis µs/join", "join_redis_us_per_join", 0),
    Metric("deliveries/s", "deliveries_per_s", 0),
    Metric("p50 ms", "completion_p50_ms", 1),
    Metric("p99 ms", "completion_p99_ms", 1),
    Metric("server µs/delivery", "server_us_per_delivery", 2),
    Metric("redis µs/delivery", "redis_us_per_delivery", 3),
    Metric("lost", "lost", 0, ratio=False),
    Metric("repeated", "repeated_or_reordered", 0, ratio=False),
    Metric("server CPU %", "server_cpu_pct", 0, ratio=False),
    Metric("load CPU %", "load_cpu_pct", 0, ratio=False),
    Metric("webhook events", fmt_events, 0, ratio=False),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, in run order, from {', '.join(VARIANTS)} "
        f"(default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--broker", choices=("memory", "redis"), default="memory")
    parser.add_argument(
        "--before-commit",
        default=BEFORE_COMMIT,
        help=f"the commit the `before` variant builds (default {BEFORE_COMMIT})",
    )
    parser.add_argument("--clients", type=int, default=500, help="members, each its own user")
    parser.add_argument("--inflight", type=int, default=4, help="broadcasts in flight")
    parser.add_argument("--size", type=int, default=200, help="payload bytes (>= 16)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument(
        "--join-settle",
        type=float,
        default=1.0,
        help="seconds after all joined still counted in the join phase (default 1)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument("--nice", type=int, default=0, help="the server's and the load's niceness")
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=procs.uvloop_available(),
        help="servers on uvloop (default when installed) or asyncio",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's raw result here")
    args = parser.parse_args(argv)
    args.server_cmd = None  # what print_footer reads; every command here is built per variant
    runner.apply_common_args(args)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variant_names = list(dict.fromkeys(names))
    if args.size < 16:
        parser.error("--size must be at least 16 (sequence number and timestamp)")
    if args.clients + 200 > procs.nofile_limit():
        parser.error(f"RLIMIT_NOFILE {procs.nofile_limit()} is too low for {args.clients}")
    return args


def config_text(variant: Variant, webhook_url: str, webhook_secret: str) -> str:
    """The TOML every echoserver variant reads: the same namespace, the two switches."""
    lines = [
        "[[namespaces]]",
        f'pattern = "{CHANNEL}*"',
        f"join_leave = {'true' if variant.join_leave else 'false'}",
    ]
    if variant.webhooks:
        kinds = ", ".join(f'"{k}"' for k in EVENT_KINDS)
        lines += [
            "",
            "[webhooks]",
            f'url = "{webhook_url}"',
            f'secret = "{webhook_secret}"',
            f"events = [{kinds}]",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Setup:
    """What every run shares: the files, the secret, the receiver, the `before` build."""

    directory: Path
    jwt_secret: str
    tokens_file: Path
    configs: dict[str, Path]
    before_script: Path | None
    sink: WebhookSink


def server_command(
    variant: Variant, setup: Setup, port: int, broker: list[str], uvloop: bool
) -> list[str]:
    """bench's usual echoserver command (procs.server_command), for this variant."""
    if variant.baseline:
        return procs.server_command("baseline", "broadcast", port, uvloop=uvloop)
    cmd = procs.server_command("ours", "broadcast", port, uvloop=uvloop)
    assert cmd[1:3] == ["-m", "echoserver"], cmd
    if variant.before:
        assert setup.before_script is not None
        cmd = [str(setup.before_script), *cmd[3:]]
    config = ["--config", str(setup.configs[variant.name])]
    return [*cmd, *config, "--auth-jwt-secret", setup.jwt_secret, *broker]


def one_run(variant: Variant, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        broker: list[str] = []
        redis_pid = 0
        if args.broker == "redis" and not variant.baseline:
            redis_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-"))
            url, redis_pid = stack.enter_context(redis_server(redis_dir))
            broker = ["--broker", url]
        hooks_before = setup.sink.counts()
        with runner.started_server(
            variant.name,
            "broadcast",
            uvloop=args.uvloop,
            custom=None,
            command=lambda port: server_command(variant, setup, port, broker, args.uvloop),
        ) as server:
            load_args = [
                "broadcast",
                *("--port", str(server.port), "--channel", CHANNEL),
                *("--receivers", str(args.clients), "--inflight", str(args.inflight)),
                *("--size", str(args.size), "--warmup", str(args.warmup)),
                *("--duration", str(args.duration), "--server-pid", str(server.pid)),
                *("--tokens", str(setup.tokens_file), "--join-settle", str(args.join_settle)),
                *("--redis-pid", str(redis_pid)),
            ]
            timeout = args.join_settle + args.warmup + args.duration + 120
            result = procs.run_load(load_args, timeout)
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(f"server exited during the run\n{server.log_tail()}")
        # The server has exited (its webhooks flush on the way out): every request is in.
        if variant.webhooks:
            result["webhooks"] = difference(setup.sink.counts(), hooks_before)
        return result


@contextlib.contextmanager
def prepared(args: argparse.Namespace) -> Iterator[Setup]:
    """Tokens, configs, the receiver and (when asked for) the `before` build."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp,
        WebhookSink() as sink,
    ):
        directory = Path(tmp)
        secret = base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")
        webhook_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        tokens = storm_auth.mint("HS256", secret, args.clients, prefix="bench", info=True)
        tokens_file = directory / "tokens"
        tokens_file.write_text("\n".join(tokens) + "\n")
        configs = {}
        for name in args.variant_names:
            path = directory / f"{name}.toml"
            path.write_text(config_text(VARIANTS[name], sink.url, webhook_secret))
            configs[name] = path
        before = None
        if "before" in args.variant_names:
            before = prior_build.build(args.before_commit)
        yield Setup(directory, secret, tokens_file, configs, before, sink)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    variants = [VARIANTS[n] for n in args.variant_names]
    with prepared(args) as setup:
        results = runner.run_interleaved(
            [v.name for v in variants],
            args.runs,
            lambda name, _i: one_run(VARIANTS[name], setup, args),
            label=lambda name: VARIANTS[name].label,
            quiet_wait=args.quiet_wait,
        )
    names = {v.name: v.label for v in variants}
    metrics = METRICS if args.broker == "redis" else [m for m in METRICS if "redis" not in m.title]
    versus = "before" if "before" in names else ("off" if "off" in names else None)
    print(
        f"## Presence and webhooks on the broadcast path ({args.broker} broker): "
        f"{args.clients} members of one channel, each its own user (HS256 token), "
        f"{args.size}-byte payload, {args.inflight} broadcasts in flight, "
        f"{args.duration:g} s window after {args.warmup:g} s warm-up\n"
    )
    print(reporting.summary_table(results, metrics, names, versus=versus))
    print(
        "\njoin s = first connect to the last member's 101; server µs/join = the server's CPU "
        f"from the first connect to the probe broadcast's arrival at every member plus "
        f"{args.join_settle:g} s, / members. server µs/delivery = the server's CPU in the "
        "window / deliveries in it. webhook events = what the receiver got in the run."
    )
    if "before" in names:
        print(f"before = {prior_build.full_sha(args.before_commit)[:7]}, built into its own venv")
    print()
    reporting.print_footer(args, results, metrics, names)


if __name__ == "__main__":
    main()

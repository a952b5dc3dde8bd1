"""Command line: argument parsing only, then hand the settings to the server.

This module owns ``main()`` and the argparse parser, whose flags are generated from
``config.KEYS`` (one flag per key, 1:1). Flag values are passed to ``config.load()`` as
strings so that typing and validation, and their one-line errors, live in one place.
"""

from __future__ import annotations

import argparse
import sys

from echoserver import __version__, config

_SECTION_TITLES = {
    "": "general",
    "websocket": "[websocket]",
    "broadcast": "[broadcast]",
    "api": "[api]",
    "tls": "[tls]",
    "log": "[log]",
    "limits": "[limits]",
    # [[namespaces]] have no flags: they are tables (the file, or ECHOSERVER_NAMESPACES).
    "auth": "[auth] (connection tokens)",
    "webhooks": "[webhooks] (lifecycle events to a backend)",
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse would print the usage block and exit; we want one line and status 2 from
    # main(), like config errors.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _metavar(key: config.Key) -> str:
    if key.rule.choices:
        return "{" + ",".join(key.rule.choices) + "}"
    if key.type is tuple:
        return "ITEM[,ITEM...]"
    return key.field.upper()


def _help(key: config.Key) -> str:
    default = config.format_value(key.default)  # same spelling as the config file
    return f"{key.doc} (default: {default})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="echoserver",
        description="A real-time WebSocket echo and broadcast server on Tornado.",
        epilog="Precedence: defaults < config file < ECHOSERVER_* environment < flags.",
        allow_abbrev=False,  # keep flags 1:1 with keys; no prefix guessing
    )
    parser.add_argument(
        "--config",
        dest="config_path",
        metavar="PATH",
        help="TOML config file (default: $ECHOSERVER_CONFIG, else none)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (secrets hidden) and exit",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings (TLS files, the page, ...) without listening, "
        'print "config ok" and exit',
    )
    parser.add_argument("--version", action="version", version=f"echoserver {__version__}")
    groups = {s: parser.add_argument_group(t) for s, t in _SECTION_TITLES.items()}
    for key in config.KEYS:
        group = groups[key.section]
        if key.type is bool:
            group.add_argument(
                key.flag,
                dest=key.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_help(key),
            )
        else:
            group.add_argument(
                key.flag,
                dest=key.name,
                metavar=_metavar(key),
                default=argparse.SUPPRESS,
                help=_help(key),
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"echoserver: error: {err} (see echoserver --help)", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    options = vars(args)
    flags = {k.name: options[k.name] for k in config.KEYS if k.name in options}
    try:
        settings, sources = config.resolve(config_path=args.config_path, flags=flags)
    except config.ConfigError as err:
        print(f"echoserver: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(config.to_toml(settings))
        return 0
    if args.check_config:
        print("config ok")
        return 0
    from echoserver.runtime import serve

    return serve.run(settings, sources)

"""[[namespaces]]: a list of tables, each a channel pattern and the rights and options of the
channels it matches. Read from the file (`[[namespaces]]`) or, replacing the file's, from
ECHOSERVER_NAMESPACES as a JSON array of the same tables; there is no flag.

Every table is checked here, naming the table and option (`namespaces[1].publish`) like any
key. What a pattern means at run time (auth/namespaces.py) is compiled from the same text.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from echoserver.config.settings import ENV_PREFIX, ConfigError, NamespaceSettings
from echoserver.config.values import _toml_type_name, format_value

ENV = ENV_PREFIX + "NAMESPACES"
SUB = "{sub}"  # in a pattern: the connecting user's own `sub`
SUBSCRIBE = ("anyone", "user", "claim")
PUBLISH = ("members", "claim", "api")
MAX_HISTORY = 10000  # as broadcast.history
# Channel characters and the glob's own (* ? [ ] !), with {sub} at most once.
PATTERN_RE = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]*(\{sub\}[A-Za-z0-9_.\-*?\[\]!]*)?")
MAX_PATTERN = 128

_OPTIONS: dict[str, tuple[type, str]] = {
    "pattern": (str, 'a glob over channel names, like "chat.*" or "user.{sub}"'),
    "subscribe": (str, 'one of "anyone", "user", "claim"'),
    "publish": (str, 'one of "members", "claim", "api"'),
    "history": (int, f"an integer -1..{MAX_HISTORY} (-1 = broadcast.history)"),
    "history_ttl": (float, "a number >= 0, or -1 for broadcast.history_ttl"),
    "join_leave": (bool, "true or false"),
}


def _problem(name: str, value: Any) -> str | None:
    """None when an option's typed value is allowed, else "" or a detail."""
    if name == "pattern":
        if not value or len(value) > MAX_PATTERN:
            return f"1..{MAX_PATTERN} characters"
        if not PATTERN_RE.fullmatch(value):
            return "only channel characters, * ? [ ] ! and {sub} once"
        return None
    if name == "subscribe":
        return None if value in SUBSCRIBE else ""
    if name == "publish":
        return None if value in PUBLISH else ""
    if name == "history":
        return None if -1 <= value <= MAX_HISTORY else ""
    if name == "history_ttl":
        return None if math.isfinite(value) and (value >= 0 or value == -1) else ""
    return None


def _typed(kind: type, value: Any) -> Any:
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else None
    return value if isinstance(value, kind) else None


def parse(tables: Any, source: str) -> tuple[NamespaceSettings, ...]:
    """The [[namespaces]] tables as settings, or ConfigError naming the first bad one."""
    if not isinstance(tables, list):
        raise ConfigError(
            f"namespaces = {format_value(tables)[:60]} (from {source}): must be an array of "
            f"tables ([[namespaces]]), got {_toml_type_name(tables)}",
            key="namespaces",
            source=source,
        )
    parsed = []
    for index, table in enumerate(tables):
        where = f"namespaces[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where} (from {source}): must be a table, got {_toml_type_name(table)}",
                key=where,
                source=source,
            )
        if "pattern" not in table:
            raise ConfigError(
                f"{where} (from {source}): has no pattern; every namespace needs one",
                key=f"{where}.pattern",
                source=source,
            )
        options: dict[str, Any] = {}
        for name, value in table.items():
            dotted = f"{where}.{name}"
            if name not in _OPTIONS:
                raise ConfigError(
                    f"unknown option {dotted} (in {source}); allowed: {', '.join(_OPTIONS)}",
                    key=dotted,
                    source=source,
                )
            kind, allowed = _OPTIONS[name]
            typed = _typed(kind, value)
            detail = f"got {_toml_type_name(value)}" if typed is None else _problem(name, typed)
            if detail is not None:
                shown = format_value(value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                message = f"{dotted} = {shown} (from {source}): must be {allowed}"
                raise ConfigError(
                    message + (f"; {detail}" if detail else ""), key=dotted, source=source
                )
            options[name] = typed
        parsed.append(NamespaceSettings(**options))
    return tuple(parsed)


def from_env(text: str) -> tuple[NamespaceSettings, ...]:
    source = f"env {ENV}"
    try:
        tables = json.loads(text)
    except ValueError as err:
        raise ConfigError(
            f"{ENV} (from the environment): must be a JSON array of namespace tables; {err}",
            key="namespaces",
            source=source,
        ) from None
    return parse(tables, source)


def needs_identity(namespace: NamespaceSettings) -> bool:
    """Whether its rights can only be met by a verified token."""
    return (
        namespace.subscribe != "anyone" or namespace.publish == "claim" or SUB in namespace.pattern
    )


def to_toml(namespaces: tuple[NamespaceSettings, ...]) -> list[str]:
    """The tables as TOML lines ([[namespaces]] each, options that differ from the default)."""
    lines: list[str] = []
    defaults = NamespaceSettings(pattern="")
    for namespace in namespaces:
        lines += ["", "[[namespaces]]"]
        for name in _OPTIONS:
            value = getattr(namespace, name)
            if name == "pattern" or value != getattr(defaults, name):
                lines.append(f"{name} = {format_value(value)}")
    return lines

"""Configuration: the typed, frozen settings and how they are loaded and checked.

settings.py holds the dataclasses, keys.py the KEYS table (one entry per key: type,
default, doc, rule, env var, flag), rules.py what each key allows, loader.py load()
(defaults < TOML file < ``ECHOSERVER_*`` environment < flags, then validation), values.py
and render.py the TOML spelling and to_toml(). Checks that need no socket happen here, so
``--check-config`` finds them.

A leaf: it imports nothing from the package but ``routes`` and ``brokers.urls`` (the
broker URL grammar), both leaves themselves (the import contract in setup.cfg). Import
from here: ``from echoserver.config import load, Settings, KEYS``.
"""

from __future__ import annotations

from echoserver.config.keys import _BY_NAME, KEYS, Key
from echoserver.config.loader import _from_text, describe, load, resolve
from echoserver.config.render import to_toml
from echoserver.config.rules import Rule, load_tls_identity
from echoserver.config.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    SECTIONS,
    APISettings,
    BroadcastSettings,
    ConfigError,
    LimitsSettings,
    LogSettings,
    Settings,
    TLSSettings,
    WebSocketSettings,
)
from echoserver.config.values import HIDDEN, format_value

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "HIDDEN",
    "KEYS",
    "SECTIONS",
    "_BY_NAME",
    "APISettings",
    "BroadcastSettings",
    "ConfigError",
    "Key",
    "LimitsSettings",
    "LogSettings",
    "Rule",
    "Settings",
    "TLSSettings",
    "WebSocketSettings",
    "_from_text",
    "describe",
    "format_value",
    "load",
    "load_tls_identity",
    "resolve",
    "to_toml",
]

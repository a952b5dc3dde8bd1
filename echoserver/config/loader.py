"""Loading: built-in defaults < TOML file < ``ECHOSERVER_*`` environment < command-line
flags, each value typed and checked, then the cross-field rules; load(), resolve() and
describe().
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from echoserver.config import namespaces
from echoserver.config.jwt_keys import (
    HMAC,
    KeyProblem,
    hmac_algorithms,
    key_algorithms,
    load_public_key,
    read_secret,
)
from echoserver.config.keys import _BY_NAME, KEYS, Key
from echoserver.config.rules import _check_tls
from echoserver.config.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    SECTIONS,
    ConfigError,
    NamespaceSettings,
    Settings,
)
from echoserver.config.values import _show, _toml_type_name


def _bad(key: Key, value: Any, source: str, detail: str = "") -> ConfigError:
    msg = f"{key.name} = {_show(key, value)} (from {source}): must be {key.allowed}"
    if detail:
        msg += f"; {detail}"
    return ConfigError(msg, key=key.name, source=source)


def _from_toml(key: Key, value: Any, source: str) -> Any:
    """Type-check a value that already has a type (TOML, or a typed flag)."""
    if key.type is bool:
        ok = isinstance(value, bool)
    elif key.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an integer past any float
                raise _bad(key, value, source) from None
    elif key.type is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if ok:
            return tuple(value)
        if isinstance(value, (list, tuple)):
            raise _bad(key, value, source, "every item must be a string")
    if not ok:
        raise _bad(key, value, source, f"got {_toml_type_name(value)}")
    return value


_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _from_text(key: Key, text: str, source: str) -> Any:
    """Parse a string from the environment or the command line."""
    # Outer whitespace is dropped for numbers and booleans (env files often carry it),
    # never for strings, where it could be part of a path or token.
    stripped = text.strip()
    if key.type is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _bad(key, text, source, "also accepted: 1/0, yes/no")
    if key.type is int:
        if _INT_RE.fullmatch(stripped):
            try:
                return int(stripped)
            except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
                pass
        raise _bad(key, text, source)
    if key.type is float:
        if _FLOAT_RE.fullmatch(stripped):
            return float(stripped)
        raise _bad(key, text, source)
    if key.type is str:
        return text
    return tuple(item.strip() for item in text.split(",") if item.strip())


# ---------------------------------------------------------------------------------------
# The layers.

_Layer = dict[str, tuple[Any, str]]  # key name -> (typed value, source)


def _read_file(path: str, via: str) -> dict[str, Any]:
    where = f"config file {path}" + (f" (from {via})" if via else "")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        message = f"{where}: cannot read: {err.strerror or err}"
        raise ConfigError(message, source=where) from None
    except ValueError as err:  # TOMLDecodeError, UnicodeDecodeError, an over-long integer
        raise ConfigError(f"{where}: invalid TOML: {err}", source=where) from None


def _unknown(
    name: str, known: list[str], where: str, what: str = "key", allowed: str = ""
) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(
        f"unknown {what} {name} (in {where}); allowed: {allowed or ', '.join(known)}{hint}",
        key=name,
        source=where,
    )


def _file_layer(data: Mapping[str, Any], path: str) -> _Layer:
    source = f"file {path}"
    layer: _Layer = {}
    sections = [s for s in SECTIONS if s]
    top = [k.name for k in KEYS if not k.section]
    for name, value in data.items():
        if name == "namespaces":
            continue  # a list of tables: namespaces.parse()
        if name in sections:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{name} = {_show(None, value)} (from {source}): must be the "
                    f"table [{name}], got {_toml_type_name(value)}",
                    key=name,
                    source=source,
                )
            known = [k.name for k in KEYS if k.section == name]
            for attr, sub in value.items():
                dotted = f"{name}.{attr}"
                if dotted not in _BY_NAME:
                    raise _unknown(dotted, known, source)
                layer[dotted] = (_from_toml(_BY_NAME[dotted], sub, source), source)
        elif name in top:
            layer[name] = (_from_toml(_BY_NAME[name], value, source), source)
        elif isinstance(value, dict):
            raise _unknown(f"[{name}]", [f"[{s}]" for s in sections], source, "section")
        else:
            raise _unknown(name, top, source)
    return layer


_ENV_ALLOWED = (
    f"{CONFIG_ENV}, or {ENV_PREFIX} followed by a key's name in upper case with _ for . "
    f"(e.g. {ENV_PREFIX}WEBSOCKET_PATH)"
)


def _env_layer(env: Mapping[str, str]) -> _Layer:
    # The prefix is ours: a misspelled variable is an error, like an unknown key in a file.
    by_env = {k.env: k for k in KEYS}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in (CONFIG_ENV, namespaces.ENV):
            if name in by_env:
                continue
            known = [CONFIG_ENV, namespaces.ENV, *by_env]
            raise _unknown(name, known, "the environment", "variable", _ENV_ALLOWED)
    layer: _Layer = {}
    for name, key in by_env.items():
        if name in env:
            source = f"env {name}"
            layer[key.name] = (_from_text(key, env[name], source), source)
    return layer


def _flag_layer(flags: Mapping[str, object]) -> _Layer:
    layer: _Layer = {}
    for name, value in flags.items():
        if value is None:
            continue
        key = _BY_NAME.get(name)
        if key is None:
            raise _unknown(name, list(_BY_NAME), "flags")
        source = f"flag {key.flag}"
        if isinstance(value, str):
            layer[name] = (_from_text(key, value, source), source)
        else:
            layer[name] = (_from_toml(key, value, source), source)
    return layer


# ---------------------------------------------------------------------------------------
# Validation and assembly.


def _bad_value(merged: _Layer, name: str, message: str) -> ConfigError:
    """A key's value (as merged) refused with a message of its own."""
    value, source = merged[name]
    return ConfigError(
        f"{name} = {_show(_BY_NAME[name], value)} (from {source}): {message}",
        key=name,
        source=source,
    )


def _validate(merged: _Layer) -> None:
    """Check every key, then the cross-field rules; fills in defaults that follow others."""
    for key in KEYS:
        value, source = merged[key.name]
        detail = key.rule.check(value)
        if detail is not None:
            raise _bad(key, value, source, detail)

    cert, cert_src = merged["tls.certfile"]
    keyf, key_src = merged["tls.keyfile"]
    if bool(cert) != bool(keyf):
        empty, other, other_src = (
            ("tls.keyfile", cert, cert_src) if cert else ("tls.certfile", keyf, key_src)
        )
        set_name = "tls.certfile" if cert else "tls.keyfile"
        raise _bad_value(
            merged,
            empty,
            f"must be set too, because {set_name} = {_show(None, other)} "
            f"(from {other_src}); set both or neither",
        )
    if cert:
        problem = _check_tls(cert, cert_src, keyf)
        if problem is not None:
            raise _bad_value(merged, *problem)

    interval, interval_src = merged["websocket.ping_interval"]
    timeout, timeout_src = merged["websocket.ping_timeout"]
    if interval > 0 and timeout > interval and timeout_src == "default":
        # Lowering only ping_interval should just work: the default timeout follows it.
        merged["websocket.ping_timeout"] = (interval, interval_src)
    elif interval > 0 and timeout > interval:
        raise _bad_value(
            merged,
            "websocket.ping_timeout",
            f"must be a number > 0 and <= websocket.ping_interval "
            f"({_show(None, interval)} from {interval_src})",
        )

    protect, _ = merged["api.protect_reads"]
    api_key, api_key_src = merged["api.key"]
    if protect and not api_key:
        raise _bad_value(
            merged,
            "api.protect_reads",
            f'needs api.key, which is "" (from {api_key_src}); set a key or leave this false',
        )

    hook_url, hook_url_src = merged["webhooks.url"]
    hook_secret, _ = merged["webhooks.secret"]
    if hook_url and not hook_secret:
        raise _bad_value(
            merged,
            "webhooks.secret",
            f"must be set with webhooks.url (from {hook_url_src}): every request is signed",
        )

    processes, _ = merged["processes"]
    mode, mode_src = merged["mode"]
    broker, _ = merged["broadcast.broker"]
    if processes != 1 and mode in ("broadcast", "mixed") and broker == "memory":
        raise _bad_value(
            merged,
            "processes",
            f'must be 1 with mode = "{mode}" (from {mode_src}) and the memory broker, '
            "which cannot share messages between processes; configure a Redis broker "
            '(broadcast.broker = "redis://...") or set processes = 1',
        )


def _validate_auth(merged: _Layer, spaces: tuple[NamespaceSettings, ...], spaces_src: str) -> None:
    """The [auth] keys against each other, the shared token and the namespaces."""
    secrets, _ = merged["auth.jwt_secret"]
    public_keys, _ = merged["auth.jwt_public_key"]
    jwks, _ = merged["auth.jwks"]
    jwt_set = bool(secrets or public_keys or jwks)

    token, _ = merged["websocket.auth_token"]
    if token and jwt_set:
        raise _bad_value(
            merged,
            "websocket.auth_token",
            "cannot be set together with JWT keys (auth.jwt_secret, auth.jwt_public_key, "
            'auth.jwks): a client sends one token; set auth_token = "" or remove the keys',
        )
    anonymous, _ = merged["auth.anonymous"]
    if anonymous and not jwt_set:
        raise _bad_value(
            merged,
            "auth.anonymous",
            "needs JWT keys (auth.jwt_secret, auth.jwt_public_key or auth.jwks): without "
            "them every client is a guest already",
        )
    algorithms, _ = merged["auth.algorithms"]
    fitting: set[str] = set()
    try:
        for item in secrets:
            fitting.update(hmac_algorithms(read_secret(item)))
        for path in public_keys:
            fitting.update(key_algorithms(load_public_key(path)))
    except KeyProblem:  # already refused by the key's own rule
        pass
    for alg in algorithms:
        if alg in fitting or (jwks and alg not in HMAC):
            continue
        raise _bad_value(
            merged,
            "auth.algorithms",
            f"{alg} fits none of the configured keys (auth.jwt_secret, auth.jwt_public_key"
            + (", auth.jwks" if jwks else "")
            + ")",
        )
    if jwt_set and algorithms and not (fitting.intersection(algorithms) or jwks):
        raise _bad_value(merged, "auth.algorithms", "leaves no configured key usable")
    if not jwt_set:
        for index, space in enumerate(spaces):
            if namespaces.needs_identity(space):
                raise ConfigError(
                    f"namespaces[{index}] (pattern {space.pattern!r}, from {spaces_src}): its "
                    "rights need verified users, so it needs JWT keys (auth.jwt_secret, "
                    "auth.jwt_public_key or auth.jwks)",
                    key=f"namespaces[{index}]",
                    source=spaces_src,
                )


def _build(merged: _Layer, spaces: tuple[NamespaceSettings, ...] = ()) -> Settings:
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key in KEYS:
        parts[key.section][key.field] = merged[key.name][0]
    top = parts.pop("")
    sections = {s: SECTIONS[s](**kw) for s, kw in parts.items()}
    return Settings(**top, **sections, namespaces=spaces)


def load(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Settings:
    """Merge defaults < config file < environment < flags, validate, return Settings.

    ``config_path`` None falls back to ``$ECHOSERVER_CONFIG``; "" (from either) means no
    file. ``env`` None means ``os.environ``. ``flags`` maps dotted key names to typed
    values or to strings (parsed like env values); None values are skipped.
    Raises ConfigError (one line) on any problem.
    """
    return resolve(config_path, env, flags)[0]


def resolve(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """load(), and where each key's value came from: {"port": "flag --port", ...}."""
    if env is None:
        env = os.environ
    via = ""
    if config_path is None:
        config_path = env.get(CONFIG_ENV, "")
        via = f"env {CONFIG_ENV}"
    merged: _Layer = {k.name: (k.default, "default") for k in KEYS}
    spaces: tuple[NamespaceSettings, ...] = ()
    spaces_src = "default"
    if config_path:
        data = _read_file(config_path, via)
        merged.update(_file_layer(data, config_path))
        if "namespaces" in data:
            spaces_src = f"file {config_path}"
            spaces = namespaces.parse(data["namespaces"], spaces_src)
    merged.update(_env_layer(env))
    if namespaces.ENV in env:
        spaces_src = f"env {namespaces.ENV}"
        spaces = namespaces.from_env(env[namespaces.ENV])
    merged.update(_flag_layer(flags or {}))
    _validate(merged)
    _validate_auth(merged, spaces, spaces_src)
    sources = {name: source for name, (_, source) in merged.items()}
    sources["namespaces"] = spaces_src
    return _build(merged, spaces), sources


def describe(settings: Settings, name: str, sources: Mapping[str, str] | None = None) -> str:
    """A setting as config errors show it: 'port = 8888 (from flag --port)'."""
    section, _, attr = name.rpartition(".")
    value = getattr(getattr(settings, section) if section else settings, attr)
    shown = f"{name} = {_show(_BY_NAME[name], value)}"
    source = (sources or {}).get(name)
    return f"{shown} (from {source})" if source else shown

"""Configuration: the typed, frozen settings and how they are loaded and checked.

This module owns the ``Settings`` dataclasses, the ``KEYS`` table (one entry per key:
type, default, doc, allowed values, env var, CLI flag), ``load()`` (built-in defaults <
TOML file < ``ECHOSERVER_*`` environment < command-line flags, then validation) and
``to_toml()``. Env names, flags, validation, ``to_toml`` and the documented example file
all derive from ``KEYS``. Checks that need no socket happen here, so ``--check-config``
finds them: the TLS files load and match, the page exists, the WebSocket path clashes with
no other route. It imports only ``routes``, itself a leaf.

Why one long module: most of its length is the KEYS table (a docstring, a rule and a
default per key) and the rules it names; splitting the table from the loader would put
one fact (a key) in two places.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from echoserver import routes
from echoserver.brokers.urls import url_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "KEYS",
    "SECTIONS",
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
    "describe",
    "format_value",
    "load",
    "resolve",
    "to_toml",
]

ENV_PREFIX = "ECHOSERVER_"
CONFIG_ENV = "ECHOSERVER_CONFIG"


@dataclass(frozen=True)
class WebSocketSettings:
    path: str = "/ws"
    max_message_size: int = 1048576
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    compression: bool = False
    max_connections: int = 10000
    allowed_origins: tuple[str, ...] = ()
    auth_token: str = ""
    rate_limit: float = 0.0
    max_connections_per_ip: int = 0
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class BroadcastSettings:
    include_sender: bool = True
    max_queue_bytes: int = 1048576
    slow_client: str = "drop"
    history: int = 0
    history_ttl: float = 0.0
    history_bytes: int = 1048576
    history_total_bytes: int = 67108864
    broker: str = "memory"
    publish_timeout: float = 5.0


@dataclass(frozen=True)
class APISettings:
    key: str = ""
    protect_reads: bool = False


@dataclass(frozen=True)
class LimitsSettings:
    request_timeout: float = 20.0


@dataclass(frozen=True)
class TLSSettings:
    certfile: str = ""
    keyfile: str = ""
    min_version: str = "1.2"


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    access: bool = True


@dataclass(frozen=True)
class Settings:
    mode: str = "echo"
    host: str = "127.0.0.1"
    port: int = 8888
    processes: int = 1
    static_dir: str = ""
    shutdown_timeout: float = 10.0
    loop: str = "auto"
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    broadcast: BroadcastSettings = field(default_factory=BroadcastSettings)
    api: APISettings = field(default_factory=APISettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    log: LogSettings = field(default_factory=LogSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)


# Section name -> its dataclass; "" is the top level. Order is the order of to_toml().
SECTIONS: dict[str, type] = {
    "": Settings,
    "websocket": WebSocketSettings,
    "broadcast": BroadcastSettings,
    "api": APISettings,
    "tls": TLSSettings,
    "log": LogSettings,
    "limits": LimitsSettings,
}
# Sections whose flags carry no section prefix (--path, --broker rather than --websocket-path).
_UNPREFIXED_FLAG_SECTIONS = ("", "websocket", "broadcast", "limits")


class ConfigError(Exception):
    """A configuration problem, described in one line.

    The message names the key (dotted) or the file, the offending value, where it came
    from (default / file PATH / env NAME / flag --x) and what is allowed. ``key`` and
    ``source`` repeat the first two for callers that want them separately.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(" ".join(message.splitlines()))
        self.key = key
        self.source = source


# ---------------------------------------------------------------------------------------
# Rules: what a key allows. ``check`` returns None when the value is fine, otherwise a
# detail to append to "must be <allowed>" ("" for no detail).


@dataclass(frozen=True)
class Rule:
    allowed: str
    check: Callable[[Any], str | None] = lambda value: None
    choices: tuple[str, ...] = ()


def _int_range(lo: int, hi: int | None = None) -> Rule:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer {lo}..{hi}"
    return Rule(allowed, lambda v: None if lo <= v and (hi is None or v <= hi) else "")


def _number(lo: float, *, exclusive: bool = False) -> Rule:
    allowed = f"a number {'>' if exclusive else '>='} {lo:g}"

    def check(v: float) -> str | None:
        if not math.isfinite(v):
            return ""
        return None if (v > lo if exclusive else v >= lo) else ""

    return Rule(allowed, check)


def _choice(*options: str) -> Rule:
    return Rule(
        "one of " + ", ".join(f'"{o}"' for o in options),
        lambda v: None if v in options else "",
        choices=options,
    )


_BOOL = Rule("true or false")

_LOOPS = ("auto", "asyncio", "uvloop")


def _check_loop(v: str) -> str | None:
    if v not in _LOOPS:
        return ""
    if v == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed (pip install 'echoserver[speed]', or loop = \"auto\")"
    return None


_LOOP = Rule(_choice(*_LOOPS).allowed, _check_loop, choices=_LOOPS)

_HOST_RE = re.compile(r"[A-Za-z0-9._:%-]+")
_NUMERIC_HOST_RE = re.compile(r"[0-9.]+|.*:.*")


def _check_host(v: str) -> str | None:
    if not _HOST_RE.fullmatch(v):
        return ""
    # What looks like an address must be one: otherwise it would go to DNS as a name.
    if _NUMERIC_HOST_RE.fullmatch(v):
        try:
            ipaddress.ip_address(v)
        except ValueError:
            return "not a valid IPv4 or IPv6 address"
    return None


_HOST = Rule(
    "a host name or IP address to listen on, e.g. 127.0.0.1, 0.0.0.0 or ::",
    _check_host,
)

_PATH_RE = re.compile(r"/[A-Za-z0-9_./-]*[A-Za-z0-9_.-]")


def _check_ws_path(v: str) -> str | None:
    if not _PATH_RE.fullmatch(v) or "//" in v:
        return ""
    route = routes.clash(v)
    if route is not None:
        return f"it would clash with the server's own route {route}"
    return None


_WS_PATH = Rule(
    'a URL path like "/ws": starts with "/", no trailing "/", characters A-Z a-z 0-9 _ . - /',
    _check_ws_path,
)

_ORIGIN_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")


def _check_origins(v: tuple[str, ...]) -> str | None:
    if v == ("*",):
        return None
    for item in v:
        if item == "*":
            return '"*" must be the only item'
        if not _ORIGIN_RE.fullmatch(item):
            return f"bad item {format_value(item)}"
    return None


_ORIGINS = Rule(
    'a list of exact origins in lower case like "https://app.example:8443" '
    '(no path, no trailing "/"), or ["*"] for any origin, or [] for same host only',
    _check_origins,
)

_HOSTNAME_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")


def _check_hosts(v: tuple[str, ...]) -> str | None:
    if v == ("*",):
        return None
    for item in v:
        if item == "*":
            return '"*" must be the only item'
        if not _HOSTNAME_RE.fullmatch(item):
            return f"bad item {format_value(item)}"
    return None


_HOSTS = Rule(
    'a list of host names in lower case as clients send them in Host, like "chat.example" '
    '(any port) or "chat.example:8443" (that port only), IPv6 in brackets; ["*"] for any; '
    "[] for the default (on a loopback address: localhost, 127.0.0.1, [::1] and host; "
    "elsewhere any)",
    _check_hosts,
)

# What to_toml() prints for a secret. The token rule refuses it (it has spaces), so a
# printed file reused as is fails to load instead of running with a wrong token.
HIDDEN = "<hidden, not printed>"


def _check_token(v: str) -> str | None:
    if v == HIDDEN:
        return "this is the placeholder --print-config prints instead of the token"
    return None if all("!" <= ch <= "~" for ch in v) else ""


_TOKEN = Rule(
    'a string of visible ASCII characters without spaces, or "" for no auth',
    _check_token,
)
_API_KEY = Rule(
    'a string of visible ASCII characters without spaces, or "" to turn the publish API off',
    _check_token,
)


def _check_broker(v: str) -> str | None:
    if v == "memory":
        return None
    if HIDDEN in v:
        return "its password is the placeholder --print-config prints instead of it"
    if any(ch.isspace() for ch in v):
        return ""
    return url_problem(v)


_BROKER = Rule(
    '"memory" or a Redis URL starting with redis://, rediss://, unix://, '
    "redis-cluster:// or rediss-cluster://",
    _check_broker,
)


def _check_readable_file(v: str) -> str | None:
    if v == "":
        return None
    if os.path.isdir(v):
        return "it is a directory"
    try:
        with open(v, "rb"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    except ValueError:  # a NUL byte, or a character the file system cannot encode
        return "not a valid path"
    return None


_READABLE_FILE = Rule('"" or the path of a readable file', _check_readable_file)


class _Passphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Passphrase  # instead of OpenSSL asking on the terminal


def _check_tls(cert: str, cert_src: str, key: str) -> tuple[str, str] | None:
    """(key name, what is wrong) if the two files do not make a TLS server's identity."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert)  # parses every certificate in the file
    except (ssl.SSLError, OSError):
        return "tls.certfile", "must be a PEM certificate chain; found no certificate in it"
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Passphrase:
        return "tls.keyfile", "must be a PEM private key without a passphrase; this one has one"
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            return "tls.keyfile", (
                f"must be the private key of tls.certfile = {_show(None, cert)} "
                f"(from {cert_src}); they do not match"
            )
        return "tls.keyfile", "must be a PEM private key; found no key in it"
    except OSError as err:
        return "tls.keyfile", f"cannot be read: {err.strerror or err}"
    return None


def _check_static_dir(v: str) -> str | None:
    if v == "":
        return None
    if not os.path.isdir(v):
        return "no such directory"
    if not os.path.isfile(os.path.join(v, "index.html")):
        return "it has no index.html, so / would answer 404"
    return None


_STATIC_DIR = Rule(
    '"" for the page shipped with the package, or a directory holding index.html',
    _check_static_dir,
)


# ---------------------------------------------------------------------------------------
# The KEYS table.


@dataclass(frozen=True)
class Key:
    """One configuration key: everything env, flags, validation and docs derive from."""

    name: str  # dotted: "port", "websocket.max_message_size"
    type: type  # bool, int, float, str, or tuple (a list of strings)
    default: Any
    doc: str
    rule: Rule
    env: str
    flag: str  # for booleans the CLI also offers --no-<flag>
    secret: bool = False  # never shown in error messages

    @property
    def section(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def field(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def allowed(self) -> str:
        return self.rule.allowed


def _key(name: str, doc: str, rule: Rule, *, secret: bool = False) -> Key:
    section, _, attr = name.rpartition(".")
    fld = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[attr]
    if fld.default is dataclasses.MISSING:
        assert fld.default_factory is not dataclasses.MISSING, name
        default = fld.default_factory()
    else:
        default = fld.default
    prefix = "" if section in _UNPREFIXED_FLAG_SECTIONS else section + "-"
    return Key(
        name=name,
        type=type(default),
        default=default,
        doc=doc,
        rule=rule,
        env=ENV_PREFIX + name.replace(".", "_").upper(),
        flag="--" + prefix + attr.replace("_", "-"),
        secret=secret,
    )


KEYS: tuple[Key, ...] = (
    _key(
        "mode",
        "echo: back to the sender; broadcast: to every client on its channel; "
        "mixed: chosen per message by a JSON envelope.",
        _choice("echo", "broadcast", "mixed"),
    ),
    _key("host", "Address to listen on; 0.0.0.0 or :: for every interface.", _HOST),
    _key("port", "TCP port to listen on, 0..65535; 0 picks a free port.", _int_range(0, 65535)),
    _key(
        "processes",
        "Worker processes sharing the port; 0 = one per CPU. Above 1, broadcast and mixed "
        "modes need a Redis broker.",
        _int_range(0),
    ),
    _key(
        "static_dir",
        'Directory holding index.html (required) and its assets; "" = the page shipped with '
        "the package.",
        _STATIC_DIR,
    ),
    _key(
        "shutdown_timeout",
        "Seconds to let clients finish after SIGTERM before closing them with 1001.",
        _number(0),
    ),
    _key(
        "loop",
        "Event loop: auto = uvloop when it is installed, else asyncio.",
        _LOOP,
    ),
    _key(
        "websocket.path",
        'URL path of the WebSocket endpoint, like "/ws" (no trailing "/"); '
        "PATH/<channel> joins a channel. It may not equal, contain or fall under the "
        "server's own routes: " + ", ".join(routes.RESERVED) + ".",
        _WS_PATH,
    ),
    _key(
        "websocket.max_message_size",
        "Largest incoming message in bytes (1..2**31); bigger ones close the connection with "
        "1009. Each frame of a fragmented message counts 64 bytes on top of its payload, so "
        "a flood of tiny or empty fragments is cut off like one big message.",
        _int_range(1, 2**31),
    ),
    _key(
        "websocket.ping_interval",
        "Seconds between server pings; 0 = no pings.",
        _number(0),
    ),
    _key(
        "websocket.ping_timeout",
        "Seconds to wait for a pong before closing; > 0 and at most ping_interval "
        "(the default follows a lower ping_interval).",
        _number(0, exclusive=True),
    ),
    _key(
        "websocket.compression",
        "Offer permessage-deflate compression to clients.",
        _BOOL,
    ),
    _key(
        "websocket.max_connections",
        "Most connections per process: WebSocket, SSE and connections still in HTTP "
        "(a request not yet answered) together; a WebSocket or SSE past it gets HTTP 503, "
        "and a few more (8) are let in for plain HTTP only, so /healthz still answers, "
        "past which a new connection gets 503 at accept. 0 = unlimited.",
        _int_range(0),
    ),
    _key(
        "websocket.allowed_origins",
        'Origins allowed to connect, exact and lower case like "https://app.example:8443"; '
        '[] = same host only (and clients without Origin), ["*"] = any.',
        _ORIGINS,
    ),
    _key(
        "websocket.auth_token",
        'Shared secret a client must present to connect; "" = no auth.',
        _TOKEN,
        secret=True,
    ),
    _key(
        "websocket.rate_limit",
        "Messages per second allowed per client, bursts of one second's worth; every ping and "
        "pong the client sends counts as one too (a fragmented message counts once). More "
        "close it with 1008. 0 = no limit.",
        _number(0),
    ),
    _key(
        "websocket.max_connections_per_ip",
        "Most connections one client address may hold at once per process: WebSocket, SSE "
        "and HTTP requests in flight together; more get HTTP 503. 0 = no per-address limit "
        "(the default: behind a proxy every client shares its address).",
        _int_range(0),
    ),
    _key(
        "websocket.allowed_hosts",
        "Host header values the server answers (DNS rebinding); others get HTTP 403. "
        "[] = on a loopback address only localhost, 127.0.0.1, [::1] and host; elsewhere "
        'any. ["*"] = any.',
        _HOSTS,
    ),
    _key(
        "broadcast.include_sender",
        "Deliver broadcast messages back to their sender too.",
        _BOOL,
    ),
    _key(
        "broadcast.max_queue_bytes",
        "Unsent bytes allowed per client (>= 1024) before the slow_client policy applies.",
        _int_range(1024),
    ),
    _key(
        "broadcast.slow_client",
        'What happens to a client over max_queue_bytes: "drop" its messages or '
        '"disconnect" it with 1013.',
        _choice("drop", "disconnect"),
    ),
    _key(
        "broadcast.history",
        "Messages kept per channel (0..10000): the last ones are replayed to a client when "
        "it joins, and a client resuming with ?since=N gets the kept ones after N; 0 = none.",
        _int_range(0, 10000),
    ),
    _key(
        "broadcast.history_ttl",
        "Seconds a kept message stays in the history (and can be replayed or recovered); "
        "0 = no age limit.",
        _number(0),
    ),
    _key(
        "broadcast.history_bytes",
        "Payload bytes of kept history per channel (>= 1024), on every broker: the oldest "
        "messages go first past it, whatever history allows; a larger message is not kept.",
        _int_range(1024),
    ),
    _key(
        "broadcast.history_total_bytes",
        "Bytes of kept history per process with the memory broker, all channels together "
        "(>= 1024): the oldest messages go first past it.",
        _int_range(1024),
    ),
    _key(
        "broadcast.broker",
        'Message broker: "memory" (one process), a redis://, rediss://, unix:// URL, or a '
        "Redis Cluster: redis-cluster://host:port[,host:port...] (rediss-cluster:// for TLS).",
        _BROKER,
    ),
    _key(
        "broadcast.publish_timeout",
        "Seconds a message waits for an unreachable broker to come back before its sender "
        "is told it was not delivered (> 0). Waiting messages are bounded in bytes too: "
        "max_queue_bytes per connection, 64 MiB per process; past that the sender is told "
        "at once.",
        _number(0, exclusive=True),
    ),
    _key(
        "api.key",
        "Secret a backend sends as Authorization: Bearer <key> to POST messages to "
        '/api/channels/<channel>/messages; "" = the publish API is off (404).',
        _API_KEY,
        secret=True,
    ),
    _key(
        "api.protect_reads",
        "Require Authorization: Bearer <api.key> on /metrics and GET /api/channels/... too "
        "(needs api.key).",
        _BOOL,
    ),
    _key(
        "tls.certfile",
        'PEM certificate chain for HTTPS/WSS; "" = plain HTTP. Set with keyfile.',
        _READABLE_FILE,
    ),
    _key(
        "tls.keyfile",
        'PEM private key of certfile, without a passphrase; "" = plain HTTP. Set with certfile.',
        _READABLE_FILE,
    ),
    _key(
        "tls.min_version",
        "Oldest TLS version a client may use: 1.2 or 1.3. SIGHUP reloads certfile/keyfile.",
        _choice("1.2", "1.3"),
    ),
    _key(
        "log.level",
        "Lowest level logged: debug, info, warning or error.",
        _choice("debug", "info", "warning", "error"),
    ),
    _key(
        "log.format",
        "Log line format: text for people or json for log collectors.",
        _choice("text", "json"),
    ),
    _key("log.access", "Log one access line per WebSocket handshake.", _BOOL),
    _key(
        "limits.request_timeout",
        "Seconds a client has to send a whole HTTP request, headers and body (> 0), from "
        "its connection's accept or the end of its previous request; slower ones are "
        "closed (408 if the headers were not all in). Default 20.",
        _number(0, exclusive=True),
    ),
)

_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


# ---------------------------------------------------------------------------------------
# Showing values in TOML syntax (for to_toml and for error messages).

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_value(value: Any) -> str:
    """A value in TOML syntax, as to_toml() and --help spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (int, float)):
        return repr(value)  # repr of inf/nan is also TOML's spelling
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return repr(value)


_URL_PASSWORD_RE = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@]*?:)[^/@]*@")


def _show(key: Key | None, value: Any) -> str:
    """A value as error messages show it: TOML syntax, secrets hidden."""
    if key is not None and key.secret and value != "":
        return "<hidden>"
    if isinstance(value, str):
        value = _URL_PASSWORD_RE.sub(r"\1***@", value)
    try:
        text = format_value(value)
    except ValueError:  # an integer with more digits than Python will turn into text
        return "<a number too long to show>"
    # One readable line, whatever was pasted into the value.
    return text if len(text) <= 80 else text[:77] + "..."


# In this order: bool is a subclass of int.
_TOML_TYPE_NAMES = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml_type_name(value: Any) -> str:
    for kind, name in _TOML_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return "a date/time"


# ---------------------------------------------------------------------------------------
# Turning layer values into typed values.


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
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV and name not in by_env:
            known = [CONFIG_ENV, *by_env]
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


def _validate(merged: _Layer) -> None:
    """Check every key, then the cross-field rules; fills in defaults that follow others."""
    for key in KEYS:
        value, source = merged[key.name]
        detail = key.rule.check(value)
        if detail is not None:
            raise _bad(key, value, source, detail)

    def bad(name: str, message: str) -> ConfigError:
        value, source = merged[name]
        return ConfigError(
            f"{name} = {_show(_BY_NAME[name], value)} (from {source}): {message}",
            key=name,
            source=source,
        )

    cert, cert_src = merged["tls.certfile"]
    keyf, key_src = merged["tls.keyfile"]
    if bool(cert) != bool(keyf):
        empty, other, other_src = (
            ("tls.keyfile", cert, cert_src) if cert else ("tls.certfile", keyf, key_src)
        )
        set_name = "tls.certfile" if cert else "tls.keyfile"
        raise bad(
            empty,
            f"must be set too, because {set_name} = {_show(None, other)} "
            f"(from {other_src}); set both or neither",
        )
    if cert:
        problem = _check_tls(cert, cert_src, keyf)
        if problem is not None:
            raise bad(*problem)

    interval, interval_src = merged["websocket.ping_interval"]
    timeout, timeout_src = merged["websocket.ping_timeout"]
    if interval > 0 and timeout > interval and timeout_src == "default":
        # Lowering only ping_interval should just work: the default timeout follows it.
        merged["websocket.ping_timeout"] = (interval, interval_src)
    elif interval > 0 and timeout > interval:
        raise bad(
            "websocket.ping_timeout",
            f"must be a number > 0 and <= websocket.ping_interval "
            f"({_show(None, interval)} from {interval_src})",
        )

    protect, _ = merged["api.protect_reads"]
    api_key, api_key_src = merged["api.key"]
    if protect and not api_key:
        raise bad(
            "api.protect_reads",
            f'needs api.key, which is "" (from {api_key_src}); set a key or leave this false',
        )

    processes, _ = merged["processes"]
    mode, mode_src = merged["mode"]
    broker, _ = merged["broadcast.broker"]
    if processes != 1 and mode in ("broadcast", "mixed") and broker == "memory":
        raise bad(
            "processes",
            f'must be 1 with mode = "{mode}" (from {mode_src}) and the memory broker, '
            "which cannot share messages between processes; configure a Redis broker "
            '(broadcast.broker = "redis://...") or set processes = 1',
        )


def _build(merged: _Layer) -> Settings:
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key in KEYS:
        parts[key.section][key.field] = merged[key.name][0]
    top = parts.pop("")
    return Settings(**top, **{s: SECTIONS[s](**kw) for s, kw in parts.items()})


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
    if config_path:
        merged.update(_file_layer(_read_file(config_path, via), config_path))
    merged.update(_env_layer(env))
    merged.update(_flag_layer(flags or {}))
    _validate(merged)
    return _build(merged), {name: source for name, (_, source) in merged.items()}


def describe(settings: Settings, name: str, sources: Mapping[str, str] | None = None) -> str:
    """A setting as config errors show it: 'port = 8888 (from flag --port)'."""
    section, _, attr = name.rpartition(".")
    value = getattr(getattr(settings, section) if section else settings, attr)
    shown = f"{name} = {_show(_BY_NAME[name], value)}"
    source = (sources or {}).get(name)
    return f"{shown} (from {source})" if source else shown


def to_toml(settings: Settings, *, comments: bool = False, secrets: bool = False) -> str:
    """The settings as TOML that load() reads back to equal settings.

    A secret that is set is printed as HIDDEN (which load() refuses), with a comment
    saying so, unless ``secrets``; so is the password in a URL (the broker's). With
    ``comments``, each key gets a one-line comment above it: its doc, its env var and its
    flag (this is how config/echoserver.toml is written).
    """
    lines: list[str] = []
    for section in SECTIONS:
        if section:
            lines += ["", f"[{section}]"]
        obj = getattr(settings, section) if section else settings
        for key in KEYS:
            if key.section != section:
                continue
            if comments:
                lines.append(f"# {key.doc} Env {key.env}, flag {key.flag}.")
            value = getattr(obj, key.field)
            if key.secret and value != "" and not secrets:
                lines.append(
                    f"# {key.name} is set but not printed: put its value here to reuse this file."
                )
                value = HIDDEN
            elif isinstance(value, str) and not secrets and _URL_PASSWORD_RE.match(value):
                lines.append(
                    f"# {key.name}'s password is not printed: put it here to reuse this file."
                )
                value = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}{HIDDEN}@", value)
            lines.append(f"{key.field} = {format_value(value)}")
    return "\n".join(lines) + "\n"

"""Rules: what each key allows, and the checks that need no socket (the TLS files load and
match, the page exists, the WebSocket path clashes with no route).

A rule's ``check`` returns None when the value is fine, else a detail to append to
"must be <allowed>". The broker URL grammar is the brokers' own (brokers/urls.py).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from echoserver import routes
from echoserver.brokers.urls import url_problem
from echoserver.config.values import HIDDEN, _show, format_value


def loopback_host(host: str) -> bool:
    """Whether a URL's host is this machine (localhost or a loopback address): where plain
    http:// is allowed for a JWKS or a webhook receiver."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def _items_or_star(pattern: re.Pattern[str]) -> Callable[[tuple[str, ...]], str | None]:
    """A check for a list whose items match `pattern`, or ["*"] alone."""

    def check(v: tuple[str, ...]) -> str | None:
        if v == ("*",):
            return None
        for item in v:
            if item == "*":
                return '"*" must be the only item'
            if not pattern.fullmatch(item):
                return f"bad item {format_value(item)}"
        return None

    return check


_check_origins = _items_or_star(_ORIGIN_RE)


_ORIGINS = Rule(
    'a list of exact origins in lower case like "https://app.example:8443" '
    '(no path, no trailing "/"), or ["*"] for any origin, or [] for same host only',
    _check_origins,
)

_HOSTNAME_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")


_check_hosts = _items_or_star(_HOSTNAME_RE)


_HOSTS = Rule(
    'a list of host names in lower case as clients send them in Host, like "chat.example" '
    '(any port) or "chat.example:8443" (that port only), IPv6 in brackets; ["*"] for any; '
    "[] for the default (on a loopback address: localhost, 127.0.0.1, [::1] and host; "
    "elsewhere any)",
    _check_hosts,
)


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


def load_tls_identity(
    context: ssl.SSLContext, cert: str, key: str, cert_src: str = "default"
) -> tuple[str, str] | None:
    """Load `cert` and `key` into `context` as its identity; (key name, what is wrong) when
    they do not make one. The config check and the server's own context both load through
    this, so a file that passes --check-config is read the same way when the server starts
    or reloads it."""
    try:  # parses every certificate in the file, into a context of its own
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
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


def _check_tls(cert: str, cert_src: str, key: str) -> tuple[str, str] | None:
    """(key name, what is wrong) if the two files do not make a TLS server's identity."""
    return load_tls_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, cert_src)


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

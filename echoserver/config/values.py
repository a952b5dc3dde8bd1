"""Values as the configuration spells them: format_value (TOML syntax, for to_toml, --help
and error messages), _show (the same with secrets and URL passwords hidden, for error
messages) and HIDDEN, what to_toml prints for a secret.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from echoserver.config.keys import Key


# What to_toml() prints for a secret. The token rule refuses it (it has spaces), so a
# printed file reused as is fails to load instead of running with a wrong token.
HIDDEN = "<hidden, not printed>"


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
    if key is not None and key.secret and value not in ("", ()):
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

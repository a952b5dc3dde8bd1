"""to_toml: the settings as a TOML file load() reads back (how config/echoserver.toml is
written and --print-config prints).
"""

from __future__ import annotations

from echoserver.config import namespaces
from echoserver.config.keys import KEYS
from echoserver.config.settings import SECTIONS, Settings
from echoserver.config.values import _URL_PASSWORD_RE, HIDDEN, format_value


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
            if key.secret and value and not secrets:
                lines.append(
                    f"# {key.name} is set but not printed: put its value here to reuse this file."
                )
                value = (HIDDEN,) if isinstance(value, tuple) else HIDDEN
            elif isinstance(value, str) and not secrets and _URL_PASSWORD_RE.match(value):
                lines.append(
                    f"# {key.name}'s password is not printed: put it here to reuse this file."
                )
                value = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}{HIDDEN}@", value)
            lines.append(f"{key.field} = {format_value(value)}")
    if comments:
        lines += ["", *NAMESPACES_COMMENT]
    lines += namespaces.to_toml(settings.namespaces)
    return "\n".join(lines) + "\n"


NAMESPACES_COMMENT = (
    "# [[namespaces]]: rights and options per group of channels; the first pattern that",
    "# matches a channel wins, and a channel no pattern matches keeps the defaults (anyone",
    '# connected joins and publishes). pattern: a glob ("chat.*"); "{sub}" in it matches only',
    '# the connecting user\'s own sub ("user.{sub}"). subscribe: "anyone" | "user" (a valid',
    '# token) | "claim" (the token\'s channels claim). publish: "members" | "claim" (the',
    '# token\'s publish claim) | "api" (the publish API only). history, history_ttl: -1 =',
    "# the [broadcast] values. join_leave: presence events. Env ECHOSERVER_NAMESPACES (a",
    "# JSON array of these tables) replaces the file's. For example:",
    "# [[namespaces]]",
    '# pattern = "user.{sub}"',
    '# subscribe = "user"',
    '# publish = "api"',
)

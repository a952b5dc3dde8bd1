"""The URL table: every path the server answers besides the WebSocket endpoint.

This module owns the route prefixes, the Tornado URL patterns built from them and the
channel-name pattern. web/app.py builds its route list from it; config refuses a
``websocket.path`` that would shadow, or be shadowed by, any of these routes. It is a
leaf: it imports nothing from the package.
"""

from __future__ import annotations

import re

# A channel name in a URL: /ws/<channel>, /api/channels/<channel>, /sse/<channel>.
CHANNEL_PATTERN = r"[A-Za-z0-9_.-]{1,64}"

PAGE = "/"  # the page itself; only "/" exactly, so it reserves nothing below it
STATIC = "/static"  # the page's assets (Tornado's static_url_prefix, without its "/")
HEALTH = "/healthz"
METRICS = "/metrics"
CHANNELS = "/api/channels"  # /api/channels/<channel>, POST /api/channels/<channel>/messages
MESSAGES = "messages"  # the publish API's last path segment, below a channel
PRESENCE = "presence"  # GET /api/channels/<channel>/presence: who is there
USERS = "/api/users"  # POST /api/users/<sub>/messages, DELETE /api/users/<sub>/connections
CONNECTIONS = "connections"
# A user's sub in a URL: any characters but "/" (percent-encoded as needed), 1..256 of them.
SUB_PATTERN = r"[^/]{1,256}"
PUBLISH = "/api/publish"  # POST: many messages for many channels in one request
PROTOCOL = "/api/protocol"  # channel names and close codes, for clients such as the page
SSE = "/sse"  # /sse and /sse/<channel>: a channel as Server-Sent Events
# Tornado serves these two from the static directory as well.
STATIC_FILES = ("/favicon.ico", "/robots.txt")

# Every prefix the WebSocket path may not equal, fall under or contain.
RESERVED: tuple[str, ...] = (
    STATIC,
    *STATIC_FILES,
    HEALTH,
    METRICS,
    CHANNELS,
    USERS,
    PROTOCOL,
    PUBLISH,
    SSE,
)


def exact(path: str) -> str:
    """The Tornado pattern matching `path` and nothing else."""
    return re.escape(path)


def with_channel(prefix: str) -> str:
    """The Tornado pattern for prefix/<channel>, the channel captured."""
    return rf"{re.escape(prefix)}/({CHANNEL_PATTERN})"


def channel_messages(prefix: str = "") -> str:
    """The Tornado pattern for the publish API, /api/channels/<channel>/messages (below
    `prefix` when the routes are mounted under one)."""
    return rf"{with_channel(prefix + CHANNELS)}/{re.escape(MESSAGES)}"


def channel_presence(prefix: str = "") -> str:
    """GET /api/channels/<channel>/presence: the channel's users and totals."""
    return rf"{with_channel(prefix + CHANNELS)}/{re.escape(PRESENCE)}"


def user_messages(prefix: str = "") -> str:
    """POST /api/users/<sub>/messages: to the user's personal channel."""
    return rf"{re.escape(prefix + USERS)}/({SUB_PATTERN})/{re.escape(MESSAGES)}"


def user_connections(prefix: str = "") -> str:
    """DELETE /api/users/<sub>/connections: close all of the user's connections."""
    return rf"{re.escape(prefix + USERS)}/({SUB_PATTERN})/{re.escape(CONNECTIONS)}"


def user(prefix: str = "") -> str:
    """GET /api/users/<sub>: the user's connections and channels (a snapshot)."""
    return rf"{re.escape(prefix + USERS)}/({SUB_PATTERN})"


def clash(path: str) -> str | None:
    """The reserved route that `path` equals, falls under or contains; None if none."""
    for route in RESERVED:
        if path == route or path.startswith(route + "/") or route.startswith(path + "/"):
            return route
    return None

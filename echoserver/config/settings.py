"""The settings themselves: the frozen dataclasses a running server reads, the sections,
the environment prefix and ConfigError.

A leaf of the config package: it imports nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    max_subscriptions: int = 100


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
    presence_grace: float = 5.0


@dataclass(frozen=True)
class APISettings:
    key: str = ""
    protect_reads: bool = False
    max_batch: int = 1000


@dataclass(frozen=True)
class LimitsSettings:
    request_timeout: float = 20.0


@dataclass(frozen=True)
class AuthSettings:
    jwt_secret: tuple[str, ...] = ()
    jwt_public_key: tuple[str, ...] = ()
    jwks: str = ""
    algorithms: tuple[str, ...] = ()
    audience: str = ""
    issuer: str = ""
    leeway: float = 0.0
    anonymous: bool = False


@dataclass(frozen=True)
class WebhooksSettings:
    url: str = ""
    secret: str = ""
    events: tuple[str, ...] = ("channel_occupied", "channel_vacated", "user_online", "user_offline")
    queue_size: int = 10000
    batch_window: float = 0.05
    max_batch: int = 100
    timeout: float = 5.0
    retry_initial: float = 0.5
    retry_max: float = 30.0
    max_attempts: int = 10


@dataclass(frozen=True)
class NamespaceSettings:
    """One [[namespaces]] table: the rights and options of the channels its pattern matches.

    history and history_ttl of -1 take broadcast.history and broadcast.history_ttl.
    """

    pattern: str
    subscribe: str = "anyone"
    publish: str = "members"
    history: int = -1
    history_ttl: float = -1.0
    join_leave: bool = False


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
    auth: AuthSettings = field(default_factory=AuthSettings)
    webhooks: WebhooksSettings = field(default_factory=WebhooksSettings)
    # [[namespaces]]: a list of tables, not keys, so outside SECTIONS and the KEYS table
    # (loaded and checked by config/namespaces.py).
    namespaces: tuple[NamespaceSettings, ...] = ()


# Section name -> its dataclass; "" is the top level. Order is the order of to_toml().
SECTIONS: dict[str, type] = {
    "": Settings,
    "websocket": WebSocketSettings,
    "broadcast": BroadcastSettings,
    "api": APISettings,
    "tls": TLSSettings,
    "log": LogSettings,
    "limits": LimitsSettings,
    "auth": AuthSettings,
    "webhooks": WebhooksSettings,
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

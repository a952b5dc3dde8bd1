"""The KEYS table: one entry per key (type, default, doc, rule, env var, CLI flag).

Env names, flags, validation, to_toml and the documented example file all derive from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from echoserver import routes
from echoserver.config.jwt_keys import (
    check_algorithms,
    check_jwks,
    check_public_keys,
    check_secrets,
)
from echoserver.config.rules import (
    _API_KEY,
    _BOOL,
    _BROKER,
    _HOST,
    _HOSTS,
    _LOOP,
    _ORIGINS,
    _READABLE_FILE,
    _STATIC_DIR,
    _TOKEN,
    _WS_PATH,
    Rule,
    _choice,
    _int_range,
    _number,
)
from echoserver.config.settings import _UNPREFIXED_FLAG_SECTIONS, ENV_PREFIX, SECTIONS
from echoserver.config.webhooks import EVENTS as _WEBHOOK_EVENTS
from echoserver.config.webhooks import SECRET as _WEBHOOK_SECRET
from echoserver.config.webhooks import URL as _WEBHOOK_URL


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


_JWT_SECRETS = Rule(
    "a list of at most two HMAC secrets of 32 bytes or more, each the value itself or "
    '"file:PATH"; [] = none',
    check_secrets,
)
_PUBLIC_KEYS = Rule(
    "a list of at most two paths of PEM public keys (RSA, EC P-256/384/521 or Ed25519); [] = none",
    check_public_keys,
)
_JWKS = Rule(
    '"", the path of a JWKS file, or an https:// URL (http:// to a loopback address)',
    check_jwks,
)
_ALGORITHMS = Rule(
    "a list of JWT algorithms (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512, "
    "EdDSA), never none; [] = every one the configured keys fit",
    check_algorithms,
)
_TEXT = Rule("a string")
_LEEWAY = Rule("a number 0..600", lambda v: None if 0 <= v <= 600 else "")

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
        "websocket.max_subscriptions",
        "Most channels one connection follows at once: a mixed-mode WebSocket's URL channel "
        'and its {"type":"subscribe"} channels together (past it a subscribe gets '
        '{"type":"error"}), or the ?channel= list of one event stream (past it HTTP 400).',
        _int_range(1, 10000),
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
        "broadcast.presence_grace",
        "Seconds a user (a token's sub) still counts as on a channel after their last "
        "connection there closed (0 = none): a reconnect within it is neither a leave nor a "
        "join, and the leave is announced (namespaces with join_leave) only after it.",
        _number(0),
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
        "api.max_batch",
        "Most messages one POST /api/publish may carry (items, or channels of a broadcast), "
        "1..100000; its body may be up to 4 x websocket.max_message_size bytes or 1 MiB, "
        "whichever is more.",
        _int_range(1, 100_000),
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
    _key(
        "auth.jwt_secret",
        "HMAC secrets that sign connection tokens (JWT, HS256/384/512): a client sends "
        "?token= or Authorization: Bearer. Two during a rollover. "
        '"file:PATH" reads the secret from a file. [] = no HMAC tokens.',
        _JWT_SECRETS,
        secret=True,
    ),
    _key(
        "auth.jwt_public_key",
        "PEM public keys that verify connection tokens (RS*, PS*, ES*, EdDSA as the key "
        "fits); two during a rollover. [] = none.",
        _PUBLIC_KEYS,
    ),
    _key(
        "auth.jwks",
        "A JWKS (file or URL) whose keys verify connection tokens by their kid; a URL is "
        'fetched at start and again for an unknown kid, at most once a minute. "" = none.',
        _JWKS,
    ),
    _key(
        "auth.algorithms",
        "Algorithms a token may be signed with; the token's own header never widens it. "
        "[] = every one the configured keys fit.",
        _ALGORITHMS,
    ),
    _key(
        "auth.audience",
        'Required aud claim of a connection token; "" = not checked.',
        _TEXT,
    ),
    _key(
        "auth.issuer",
        'Required iss claim of a connection token; "" = not checked.',
        _TEXT,
    ),
    _key(
        "auth.leeway",
        "Seconds of clock skew allowed when checking exp, nbf and iat (0..600); a connection "
        "is closed with 4001 this long after its token's exp.",
        _LEEWAY,
    ),
    _key(
        "auth.anonymous",
        "Let clients without a token in as guests (with JWT keys set); guests may join only "
        'namespaces whose subscribe = "anyone".',
        _BOOL,
    ),
    # [webhooks]: lifecycle events POSTed to a backend (echoserver/webhooks).
    _key(
        "webhooks.url",
        "Where lifecycle events are POSTed, signed by the Standard Webhooks scheme (needs "
        'webhooks.secret); "" = no webhooks. https://, or http:// to a loopback address.',
        _WEBHOOK_URL,
    ),
    _key(
        "webhooks.secret",
        'The Standard Webhooks signing secret, "whsec_" then base64 (24..64 bytes); the '
        "backend verifies webhook-signature with it.",
        _WEBHOOK_SECRET,
        secret=True,
    ),
    _key(
        "webhooks.events",
        "Events sent: channel_occupied, channel_vacated, user_online, user_offline, "
        "user_joined, user_left (the last two once per user and channel).",
        _WEBHOOK_EVENTS,
    ),
    _key(
        "webhooks.queue_size",
        "Events waiting for the backend, at most (1..1000000); past it the oldest are "
        "dropped, counted in echoserver_webhook_events_dropped and logged.",
        _int_range(1, 1000000),
    ),
    _key(
        "webhooks.batch_window",
        "Seconds an event waits for others to share its request (>= 0).",
        _number(0),
    ),
    _key(
        "webhooks.max_batch",
        "Most events in one request (1..10000).",
        _int_range(1, 10000),
    ),
    _key(
        "webhooks.timeout",
        "Seconds a request may take, connecting included (> 0); slower ones are retried.",
        _number(0, exclusive=True),
    ),
    _key(
        "webhooks.retry_initial",
        "Seconds before the first retry of a failed request (> 0); each retry waits twice "
        "as long as the one before, up to retry_max, with full jitter.",
        _number(0, exclusive=True),
    ),
    _key(
        "webhooks.retry_max",
        "Longest wait between two attempts, in seconds (> 0).",
        _number(0, exclusive=True),
    ),
    _key(
        "webhooks.max_attempts",
        "Attempts per request (1..1000) before its events are dropped (counted and logged); "
        "later events wait behind it, so a backend sees them in order.",
        _int_range(1, 1000),
    ),
)

_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}

"""The [webhooks] keys: what url, secret and events accept, their cross-check, and a round
trip through flags and --print-config."""

from __future__ import annotations

import base64
import sys

import pytest

from echoserver.config import ConfigError, Settings, load
from echoserver.config.webhooks import secret_bytes
from tests.servers import run_once

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def loaded(**env: str) -> Settings:
    return load(env={f"ECHOSERVER_WEBHOOKS_{k.upper()}": v for k, v in env.items()})


def test_defaults_send_nothing() -> None:
    hooks = load(env={}).webhooks
    assert hooks.url == "" and hooks.secret == ""
    assert hooks.events == ("channel_occupied", "channel_vacated", "user_online", "user_offline")
    assert (hooks.queue_size, hooks.batch_window, hooks.max_batch) == (10000, 0.05, 100)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example/in", "https://hooks.example:8443/a?b=c", "http://127.0.0.1:9/x",
     "http://localhost/x", "http://[::1]:80/x"],
)  # fmt: skip
def test_urls_accepted(url: str) -> None:
    assert loaded(url=url, secret=SECRET).webhooks.url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://hooks.example/in", "loopback"),
        ("ftp://hooks.example/in", "must be"),
        ("https://", "must be"),
        ("https://hooks.example:99999/", "not a valid URL"),
    ],
)
def test_urls_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.url") as err:
        loaded(url=url, secret=SECRET)
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("k" * 40, "whsec_"),
        ("whsec_!!!!", "not base64"),
        ("whsec_" + base64.b64encode(b"k" * 8).decode(), "8 bytes"),
    ],
)
def test_secrets_refused_without_showing_them(secret: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.secret") as err:
        loaded(url="https://h.example/", secret=secret)
    assert says in str(err.value)
    assert secret not in str(err.value)


def test_the_secret_is_the_standard_shape_padded_or_not() -> None:
    assert secret_bytes(SECRET) == b"k" * 32
    assert secret_bytes(SECRET.rstrip("=")) == b"k" * 32


def test_a_url_needs_a_secret_and_events_are_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.secret.*must be set with webhooks\.url"):
        loaded(url="https://h.example/")
    with pytest.raises(ConfigError, match="unknown event 'channel_emptied'"):
        loaded(events="channel_occupied,channel_emptied")
    hooks = loaded(events="user_joined, user_left").webhooks
    assert hooks.events == ("user_joined", "user_left")


def test_flags_round_trip_through_print_config() -> None:
    args = [
        "--webhooks-url", "https://h.example/in", "--webhooks-secret", SECRET,
        "--webhooks-events", "channel_vacated,user_left", "--webhooks-queue-size", "7",
        "--webhooks-batch-window", "0.2", "--webhooks-max-batch", "3",
        "--webhooks-timeout", "2", "--webhooks-retry-initial", "0.1",
        "--webhooks-retry-max", "4", "--webhooks-max-attempts", "5", "--print-config",
    ]  # fmt: skip
    proc = run_once(*args)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout  # a secret is never printed
    printed = tomllib.loads(proc.stdout)["webhooks"]
    assert printed == {
        "url": "https://h.example/in",
        "secret": "<hidden, not printed>",
        "events": ["channel_vacated", "user_left"],
        "queue_size": 7,
        "batch_window": 0.2,
        "max_batch": 3,
        "timeout": 2.0,
        "retry_initial": 0.1,
        "retry_max": 4.0,
        "max_attempts": 5,
    }

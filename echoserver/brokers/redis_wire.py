"""What the Redis brokers share: the wire format, the Lua scripts, channel key names, backoff.

A message as Redis carries it: ``<seq>.<epoch>:<kind><n>:<sender><data>`` where epoch is the
channel's numbering (base 36), kind is ``t`` (text) or ``b`` (binary), n is the sender id's
length in bytes (0 = no sender) and data is the raw payload, up to the end (a message kept
from before epochs, ``<seq>:<kind>...``, is read as one of the current epoch). A history
list item is ``<ms> <message>``: Redis's clock when it was published, for the age limit
(`history_ttl`). A channel's keys and pub/sub name carry ``{channel}`` as a hash tag, so its
counter, history and publish share one Redis Cluster slot: the publish script can INCR, keep
and (S)PUBLISH in one step on every kind of deployment, so sequence order is publish order.

Epochs: a channel's epoch key (in the same slot) is made by the publish script in the step
that makes the counter (INCR gives 1: the counter was never there, or Redis lost it: a
flush, a replaced server, an evicted key), or when it is missing beside a counter (a
deployment from before epochs, an evicted epoch key). It is Redis's clock in microseconds
in base 36 (10 characters), so a later epoch never repeats an earlier one. A new epoch made
with a new counter also drops whatever history the old numbering left. A process from
before epochs cannot read ``<seq>.<epoch>:`` (it logs the message as malformed and drops
it): upgrade every process sharing a Redis together.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from echoserver.brokers.base import Backlog, Envelope

# KEYS: seq, history, history bytes, epoch. Returns {seq, epoch}. ARGV: pub/sub channel,
# header (kind, sender), data, history cap, history age limit in ms (0 = none), history byte
# cap. History items are the message after Redis's time in ms and a space, newest first. The
# history bytes key holds the kept items' payload bytes (rebuilt from the list when
# missing); the oldest items go while the list is over the cap in count or in bytes, or
# older than the age limit. A message over the byte cap is not kept and empties the history,
# so what is kept always ends at the last offset. Both keys expire with the newest item when
# there is an age limit. PUBLISH_COMMAND is PUBLISH (one Redis) or SPUBLISH (a cluster: the
# shard channel is in the script's slot, which Redis 7 allows).
# A new epoch: Redis's clock in microseconds, base 36.
_NEW_EPOCH = b"""
local function new_epoch()
  local time = redis.call('TIME')
  local n = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  local epoch = ''
  repeat
    local d = n % 36
    epoch = string.sub(digits, d + 1, d + 1) .. epoch
    n = math.floor(n / 36)
  until n == 0
  return epoch
end
"""

_PUBLISH_TEMPLATE = (
    _NEW_EPOCH
    + b"""
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[4])
if seq == 1 or not epoch then
  epoch = new_epoch()
  redis.call('SET', KEYS[4], epoch)
  if seq == 1 then
    redis.call('DEL', KEYS[2], KEYS[3])
  end
end
local message = string.format('%d', seq) .. '.' .. epoch .. ':' .. ARGV[2] .. ARGV[3]
local cap = tonumber(ARGV[4])
local function payload(item)
  local head, sender = string.match(item, '^(%d+ %d+[.%w]*:[tb](%d+):)')
  return #item - #head - tonumber(sender)
end
if cap > 0 then
  local max_bytes = tonumber(ARGV[6])
  local size = #ARGV[3]
  if size > max_bytes then
    redis.call('DEL', KEYS[2], KEYS[3])
  else
    local kept = redis.call('GET', KEYS[3])
    if kept then
      kept = tonumber(kept)
    else
      kept = 0
      for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        kept = kept + payload(item)
      end
    end
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    local count = redis.call('LPUSH', KEYS[2], string.format('%.0f', now) .. ' ' .. message)
    kept = kept + size
    local ttl = tonumber(ARGV[5])
    while count > 0 do
      local oldest = redis.call('LINDEX', KEYS[2], -1)
      local at = tonumber(string.match(oldest, '^(%d+) '))
      if count <= cap and kept <= max_bytes and (ttl <= 0 or now - at <= ttl) then break end
      redis.call('RPOP', KEYS[2])
      kept = kept - payload(oldest)
      count = count - 1
    end
    redis.call('SET', KEYS[3], kept)
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[2], ttl)
      redis.call('PEXPIRE', KEYS[3], ttl)
    end
  end
end
redis.call('PUBLISH_COMMAND', ARGV[1], message)
return {seq, epoch}
"""
)


def publish_script(command: bytes) -> bytes:
    """The publish script for PUBLISH or SPUBLISH."""
    return _PUBLISH_TEMPLATE.replace(b"PUBLISH_COMMAND", command)


# KEYS: seq, history, epoch. ARGV: after (offset), limit. Returns {last offset, now in ms,
# items newest first, epoch ('' = none yet)}: kept offsets are consecutive and end at the
# last, so the items above `after` are the first (last - after) of the list.
BACKLOG_SCRIPT = b"""
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[3]) or ''
local want = math.min(last - tonumber(ARGV[1]), tonumber(ARGV[2]))
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local items = {}
if want > 0 then
  items = redis.call('LRANGE', KEYS[2], 0, want - 1)
end
return {last, now, items, epoch}
"""


# KEYS: epoch, history, history bytes. ARGV: the epoch to replace. When it is still the
# channel's, a new one replaces it and the history kept under it goes (its offsets were
# reissued: see Broker.renew_epoch); returns the channel's epoch either way.
RENEW_SCRIPT = (
    _NEW_EPOCH
    + b"""
local epoch = redis.call('GET', KEYS[1])
if epoch ~= ARGV[1] then
  return epoch or ''
end
epoch = new_epoch()
redis.call('SET', KEYS[1], epoch)
redis.call('DEL', KEYS[2], KEYS[3])
return epoch
"""
)


def sha1(body: bytes) -> bytes:
    """The name EVALSHA knows a script by."""
    return hashlib.sha1(body).hexdigest().encode()


BACKOFF_BASE = 0.1


def jittered(attempt: int, cap: float) -> float:
    """Full jitter over an exponential ceiling: spreads reconnecting processes apart."""
    return random.uniform(0, min(cap, BACKOFF_BASE * 2**attempt))


def encode(envelope: Envelope) -> tuple[bytes, bytes]:
    """The message header after ``<seq>:`` and the payload, as the publish script joins them."""
    sender = envelope.sender.encode() if envelope.sender else b""
    kind = b"b" if envelope.binary else b"t"
    return b"%s%d:%s" % (kind, len(sender), sender), envelope.data


def decode(channel: str, message: bytes) -> Envelope:
    """An envelope from one published message (see the module docstring for the format)."""
    colon = message.index(b":")
    dot = message.find(b".", 0, colon)
    if dot < 0:
        seq, epoch = int(message[:colon]), ""
    else:
        seq, epoch = int(message[:dot]), message[dot + 1 : colon].decode()
    binary = message[colon + 1] == 98  # ord("b")
    end = message.index(b":", colon + 2)
    size = int(message[colon + 2 : end])
    start = end + 1 + size
    sender = message[end + 1 : start].decode() if size else None
    return Envelope(channel, message[start:], binary, sender, seq, epoch)


def decode_kept(channel: str, item: bytes) -> tuple[int, Envelope]:
    """(when it was published, in Redis's ms, and the envelope) of one history item."""
    space = item.index(b" ")
    return int(item[:space]), decode(channel, item[space + 1 :])


def read_backlog(channel: str, reply: Any, ttl_ms: int) -> Backlog:
    """The Backlog from the backlog script's reply, without items older than `ttl_ms` or
    of another epoch (items kept from before epochs are taken as the current one's)."""
    last, now, items, raw_epoch = reply
    epoch = raw_epoch.decode()
    envelopes = []
    for item in items:  # newest first: stop at the first one too old
        at, envelope = decode_kept(channel, item)
        if ttl_ms > 0 and now - at > ttl_ms:
            break
        if envelope.epoch != epoch:
            if envelope.epoch:
                break  # an older numbering's: neither it nor anything older counts
            envelope.epoch = epoch
        envelopes.append(envelope)
    envelopes.reverse()
    return Backlog(envelopes, int(last), epoch)


class KeyNames:
    """A channel's (pub/sub name, seq key, history key, history bytes key, epoch key),
    all hash-tagged with {channel}.

    Pub/sub ignores the database number, so it is part of the pub/sub name."""

    def __init__(self, prefix: str, db: int) -> None:
        self.prefix = prefix
        self.pubsub_prefix = f"{prefix}:{db}:ch:"
        self._cache: dict[str, tuple[str, str, str, str, str]] = {}

    def __call__(self, channel: str) -> tuple[str, str, str, str, str]:
        keys = self._cache.get(channel)
        if keys is None:
            if len(self._cache) >= 10000:
                self._cache.clear()
            tag = f"{{{channel}}}"
            keys = self._cache[channel] = (
                self.pubsub_prefix + tag,
                f"{self.prefix}:{tag}:seq",
                f"{self.prefix}:{tag}:history",
                f"{self.prefix}:{tag}:history:bytes",
                f"{self.prefix}:{tag}:epoch",
            )
        return keys

    def pubsub(self, channel: str) -> str:
        return f"{self.pubsub_prefix}{{{channel}}}"

    def channel_of(self, pubsub_name: bytes) -> str:
        """The channel a pub/sub name (as Redis sends it back) belongs to."""
        return pubsub_name.decode()[len(self.pubsub_prefix) + 1 : -1]

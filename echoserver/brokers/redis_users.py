"""Users in Redis presence: the scripts that record and list who is on a channel.

Per channel and user, a hash ``<prefix>:{channel}:user:<sub>`` maps each process id to
``<connections> <deadline ms> <info JSON>``; a set ``<prefix>:{channel}:users`` lists the
users with such a hash. Both carry the channel's hash tag, so on a Redis Cluster they live
on the channel's slot and one script reads them all. An entry is alive while its process
is: on one Redis, while the process's heartbeat key exists (the deadline is not read); on a
cluster, until its deadline in Redis's own clock, which the process pushes on every few
seconds. A script that meets a dead entry drops it, so a SIGKILLed worker's users leave
the counts within the presence TTL, as its members do.

The set script writes this process's entry and answers how many live entries the user had
just before and just after, in one atomic step: (0, n) is the user's arrival on the
channel, (n, 0) their departure, whichever process writes last. An entry with 0
connections is a user within the presence grace (fanout/presence.py): still there.
"""

from __future__ import annotations

from echoserver.brokers.redis_wire import sha1

_NOW = b"""local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# How an entry is read: `pid` its process id, `deadline` its deadline (a string).
ALIVE_BY_HEARTBEAT = b"redis.call('EXISTS', heartbeat .. pid) == 1"
ALIVE_BY_DEADLINE = b"tonumber(deadline) >= now"


def set_script(alive: bytes) -> bytes:
    """KEYS: the user's hash, the channel's user set. ARGV: process id, connections,
    present (1/0), info JSON, ttl ms (0: the keys do not expire), user, heartbeat prefix.
    Returns {live entries before, live entries after}."""
    return (
        _NOW
        + b"""local heartbeat = ARGV[7]
local function live()
  local fields = redis.call('HGETALL', KEYS[1])
  local n = 0
  for i = 1, #fields, 2 do
    local pid = fields[i]
    local deadline = string.match(fields[i + 1], '^%%d+ (%%d+) ') or '0'
    if %s then
      n = n + 1
    else
      redis.call('HDEL', KEYS[1], pid)
    end
  end
  return n
end
local before = live()
local ttl = tonumber(ARGV[5])
if ARGV[3] == '1' then
  local deadline = string.format('%%.0f', now + ttl)
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. deadline .. ' ' .. ARGV[4])
  redis.call('SADD', KEYS[2], ARGV[6])
  if ttl > 0 then
    for _, key in ipairs(KEYS) do
      if redis.call('PTTL', key) < ttl then
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local after = live()
if after == 0 then
  redis.call('SREM', KEYS[2], ARGV[6])
end
return {before, after}
"""
        % alive
    )


def roll_script(alive: bytes) -> bytes:
    """KEYS: the channel's user set. ARGV: the prefix of its users' hashes (the user is
    appended; the same slot), heartbeat prefix. Returns {user, connections, info JSON,
    ...} for every user with a live entry; drops the dead ones."""
    return (
        _NOW
        + b"""local heartbeat = ARGV[2]
local out = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. user
  local fields = redis.call('HGETALL', key)
  local live, total, info = 0, 0, 'null'
  for i = 1, #fields, 2 do
    local pid = fields[i]
    local count, deadline, data = string.match(fields[i + 1], '^(%%d+) (%%d+) (.*)$')
    if count and %s then
      live = live + 1
      total = total + tonumber(count)
      info = data
    else
      redis.call('HDEL', key, pid)
    end
  end
  if live == 0 then
    redis.call('SREM', KEYS[1], user)
  else
    out[#out + 1] = user
    out[#out + 1] = total
    out[#out + 1] = info
  end
end
return out
"""
        % alive
    )


SET_BY_HEARTBEAT = set_script(ALIVE_BY_HEARTBEAT)
ROLL_BY_HEARTBEAT = roll_script(ALIVE_BY_HEARTBEAT)
SET_BY_DEADLINE = set_script(ALIVE_BY_DEADLINE)
ROLL_BY_DEADLINE = roll_script(ALIVE_BY_DEADLINE)
SHA = {
    body: sha1(body)
    for body in (SET_BY_HEARTBEAT, ROLL_BY_HEARTBEAT, SET_BY_DEADLINE, ROLL_BY_DEADLINE)
}

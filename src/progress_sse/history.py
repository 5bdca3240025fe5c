"""The name of the event log's current history, kept by Redis itself.

A cursor is `<epoch>-<n>` (cursors.py). Every number must be given out at most
once under one epoch, or a client could skip events without a word. The numbers
live in one hash with the epoch (keys.py `history`), so losing the data loses
both. But a Redis can also lose only the last writes and go on: a failover to a
replica that lagged behind, a restart from an append-only file that had not
caught up. Its sequence is then behind numbers already handed out. Redis gives a
node a new replication ID whenever it starts and whenever it becomes a master, so
the hash records the ID of the node that gave out its numbers, and a node with
another ID names a new history before it gives out or reads any number. The one
Lua function below does this for the write script (worker/publisher.py) and for
every read of where a stream stands (web/store.py).
"""

from __future__ import annotations

# `begin(key, candidate)`: name a new history (`candidate`, made by the caller:
# scripts may not make random values of their own). The sequence `n` carries on;
# `since` records where the new history began (every number of it is above), and
# `born` when (Redis's clock, seconds). Returns the name and `since`.
#
# `history(key, candidate)`: the current name and `since`, after beginning a new
# history if the hash is gone or another node gave out its numbers.
HISTORY_LUA = """
local function begin(key, candidate)
  local since = redis.call('HGET', key, 'n') or '0'
  redis.call('HSET', key, 'epoch', candidate, 'since', since, 'born', redis.call('TIME')[1])
  return candidate, tonumber(since)
end
local function history(key, candidate)
  local node = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  local known = redis.call('HMGET', key, 'epoch', 'node', 'since')
  if known[1] and known[2] == node then return known[1], tonumber(known[3]) or 0 end
  redis.call('HSET', key, 'node', node)
  return begin(key, candidate)
end
"""

# Where the history stands, for a reader: {epoch, n, since, age in seconds}.
READ_LUA = (
    HISTORY_LUA
    + """
local epoch, since = history(KEYS[1], ARGV[1])
local known = redis.call('HMGET', KEYS[1], 'n', 'born')
return {epoch, known[1] or '0', since, redis.call('TIME')[1] - tonumber(known[2])}
"""
)

# Begin a new history if the current one is still called ARGV[1]: for a reader that
# saw its numbers go back under one name (web/hub.py), whatever the cause. Returns
# the current name.
RENAME_LUA = (
    HISTORY_LUA
    + """
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then begin(KEYS[1], ARGV[2]) end
return redis.call('HGET', KEYS[1], 'epoch')
"""
)

"""Worker and publisher side: store an event and announce it, in one round trip.

A Lua script appends the event to the task's log, updates its state hash and
publishes it on the task's channel atomically, so a watcher can never see a
notification for an event that is not in the log yet, and the `id` it carries is
the log id that was just made. The same script keeps the one rule every reader
relies on: nothing is stored after a task's terminal event.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ClusterError, TryAgainError

from ..config import Settings
from ..connections import keys_for, sync_client
from ..cursors import new_epoch
from ..events import TERMINAL_STATES, State, dumps, finite_number, make_event
from ..history import HISTORY_LUA
from ..keys import Keys

log = logging.getLogger(__name__)

# What a write that Redis never saw raises (a stopped, restarting or unreachable Redis):
# worth trying again later, unlike a refused command. BusyLoadingError is a ConnectionError.
# On a cluster, redis-py's client gives up with ClusterError once its own retries
# of such errors are spent, and a slot being moved answers TRYAGAIN.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError)

# The terminal states, as the Lua test `prev == 'success' or …`: generated from the
# one Python definition (events.TERMINAL_STATES), so the two cannot drift apart.
_PREV_IS_TERMINAL = " or ".join(f"prev == '{state}'" for state in sorted(TERMINAL_STATES))
_ENDS = " or ".join(f"ARGV[3] == '{state}'" for state in sorted(TERMINAL_STATES))
# A task's keys get their TTL again when this share of it has passed since they
# last did (and at the task's first and last event): not on every event. They
# live from 7/8 of PROGRESS_SSE_HISTORY_TTL to all of it after the last event
# while the task runs, and all of it after its end.
RENEW_AFTER = 1 / 8


def _append_script(publish: str) -> str:
    """The write script; `publish` is PUBLISH, or SPUBLISH on a cluster (sharded
    pub/sub: only the nodes of the slot carry the message, not every node)."""
    return (
        HISTORY_LUA
        + f"""
local cur = redis.call('HMGET', KEYS[1], 'state', 'eid', 'seq', 'epoch', 'events', 'renewed', 'name', 'fed')
local prev = cur[1]
if prev then
  -- The same call again (redis-py retried after a reply was lost): already stored.
  if cur[2] == ARGV[8] then return cur[4] .. '-' .. cur[3] end
  if {_PREV_IS_TERMINAL} then
    return 0
  end
  -- `queued` only opens a log: a retry publishes the task again under the same id.
  if ARGV[3] == 'queued' then return 0 end
end
-- Stored only from these states when given: '|queued|', '|-|' for a task without one.
if ARGV[9] ~= '' and not string.find(ARGV[9], '|' .. (prev or '-') .. '|', 1, true) then return 0 end
local ttl = tonumber(ARGV[5])
local epoch, since = history(KEYS[3], ARGV[10])
-- As text with every digit: Lua turns a number of 15 digits or more into text
-- like 2.1834010558e+14. (Its numbers are doubles: exact up to 2^53.)
local seq = string.format('%d', redis.call('HINCRBY', KEYS[3], 'n', 1))
local events, renewed = tonumber(cur[5]) or 0, tonumber(cur[6])
-- The task's log holds numbers the current history gives out again (the sequence
-- was lost and started over): it is of a history that is gone.
if prev and cur[4] ~= epoch and tonumber(cur[3]) > since then
  redis.call('DEL', KEYS[2])
  events, renewed = 0, nil
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], seq .. '-0', 's', ARGV[3], 'd', ARGV[4])
redis.call('HINCRBY', KEYS[7], ARGV[3], 1)
-- Everything the state hash learns, in one HSET.
local fields = {{'state', ARGV[3], 'seq', seq, 'epoch', epoch, 'latest', ARGV[4], 'eid', ARGV[8], 'events', events + 1}}
local time = redis.call('TIME')
local now = tonumber(time[1])
local renew = not renewed or now - renewed >= ttl * {RENEW_AFTER} or {_ENDS}
if renew then
  fields[#fields + 1] = 'renewed'
  fields[#fields + 1] = now
end
-- The all-tasks feed takes every change of state, and a task's progress at most
-- once an interval (ARGV[11], ms) since its last progress there (`fed`): its
-- readers want to see tasks, not every step.
local now_ms = now * 1000 + math.floor(tonumber(time[2]) / 1000)
local fed = tonumber(cur[8])
local feed = ARGV[3] ~= 'progress' or not fed or now_ms - fed >= tonumber(ARGV[11])
if feed and ARGV[3] == 'progress' then
  fields[#fields + 1] = 'fed'
  fields[#fields + 1] = now_ms
end
if not prev then
  fields[#fields + 1] = 'created_at'
  fields[#fields + 1] = ARGV[7]
end
for i = 15, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
if not prev then
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (tonumber(ARGV[7]) - ttl))
end
if ARGV[3] == 'queued' then
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (tonumber(ARGV[7]) - ttl))
elseif prev == 'queued' then
  redis.call('ZREM', KEYS[5], ARGV[2])
end
if renew then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
local id = epoch .. '-' .. seq
redis.call('{publish}', ARGV[1], id .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4])
if feed then
  local name = ARGV[13] ~= '' and ARGV[13] or cur[7] or ''
  local entry = {{'MAXLEN', '~', ARGV[12], seq .. '-0', 't', ARGV[2], 'n', name, 's', ARGV[3], 'd', ARGV[4],
    'e', epoch}}
  -- A feed numbered by a sequence that since started over is of a lost history:
  -- no cursor can resume in it any more, and its numbers are in the way.
  if type(redis.pcall('XADD', KEYS[6], unpack(entry))) == 'table' then
    redis.call('DEL', KEYS[6])
    redis.call('XADD', KEYS[6], unpack(entry))
  end
  redis.call('{publish}', ARGV[14], id .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[2] .. '\\n' .. name .. '\\n' .. ARGV[4])
end
return id
"""
    )


@dataclass(eq=False)
class Publisher:
    """Writes a task's events to Redis: one script call (one round trip) each."""

    client: redis.Redis
    keys: Keys
    # Seconds a task's keys live after its last event, and events kept per task.
    history_ttl: int = field(default=86_400, kw_only=True)
    history_max: int = field(default=10_000, kw_only=True)
    # The all-tasks feed: seconds between a task's progress entries, entries kept.
    feed_interval: float = field(default=1.0, kw_only=True)
    feed_max: int = field(default=10_000, kw_only=True)
    # What it was made from, when `from_settings` made it: the web's reaper reads its
    # broker and queued timeout there (web/reaper.py).
    settings: Settings | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        self._append = self.client.register_script(_append_script("SPUBLISH" if self.keys.cluster else "PUBLISH"))
        self._unreachable = False  # publish_quietly's: whether the last attempt found Redis away

    @classmethod
    def from_settings(cls, settings: Settings) -> Publisher:
        return cls(
            sync_client(settings.redis_url),
            keys_for(settings),
            history_ttl=settings.history_ttl,
            history_max=settings.history_max,
            feed_interval=settings.feed_interval,
            feed_max=settings.feed_max,
            settings=settings,
        )

    def publish(
        self,
        event: Mapping[str, Any],
        *,
        only_if: Collection[State | None] = (),
        **fields: str | float | int,
    ) -> str | None:
        """Store and announce `event`; extra `fields` go into the task's state hash.

        Returns the event's cursor (`<epoch>-<n>`), or None when the task was already terminal (or a
        second `queued` came), or, with `only_if`, was in none of those states (None:
        no state yet): the event was refused and nothing changed. Raises on Redis
        errors; the signal handlers use `publish_quietly`.
        """
        task_id = str(event["task_id"])
        state = str(event["state"])
        if state in TERMINAL_STATES:
            fields.setdefault("finished_at", event["ts"])
        if event.get("name"):
            fields.setdefault("name", str(event["name"]))
        pairs: list[str | float | int] = []
        for key, value in fields.items():
            pairs += [key, value]
        partition = self.keys.partition_of(task_id)  # its keys and the partition's share a slot
        stored = self._append(
            keys=[
                self.keys.state(task_id),
                self.keys.log(task_id),
                self.keys.history(partition),
                self.keys.recent(partition),
                self.keys.queued(partition),
                self.keys.feed_log(partition),
                self.keys.stats(partition),
            ],
            args=[
                self.keys.channel(task_id),
                task_id,
                state,
                dumps(event),
                self.history_ttl,
                self.history_max,
                event["ts"],
                uuid.uuid4().hex,  # makes a retried call idempotent
                "".join(f"|{state or '-'}|" for state in only_if),
                new_epoch(),  # the history's name, should this write begin one
                round(self.feed_interval * 1000),
                self.feed_max,
                str(event.get("name") or ""),
                self.keys.feed_channel(partition),
                *pairs,
            ],
        )
        return None if stored == 0 else _text(stored)

    def publish_quietly(self, event: Mapping[str, Any], **fields: str | float | int) -> str | None:
        """`publish` that logs instead of raising: for code running inside Celery.

        While Redis is unreachable only the first failure is logged with its
        traceback, not each of the 20 progress events a second a task may send."""
        try:
            cursor = self.publish(event, only_if=(), **fields)
        except CONNECTION_ERRORS as exc:
            if not self._unreachable:
                self._unreachable = True
                log.warning(
                    "progress-sse could not store the %s event of task %s: Redis does not answer "
                    "(further events are not reported until it does)",
                    event.get("state"),
                    event.get("task_id"),
                    exc_info=exc,
                )
            return None
        except Exception:
            log.warning(
                "progress-sse could not store the %s event of task %s",
                event.get("state"),
                event.get("task_id"),
                exc_info=True,
            )
            return None
        if self._unreachable:
            self._unreachable = False
            log.warning("progress-sse stores events again: Redis answers")
        return cursor

    def finish(
        self,
        task_id: str,
        name: str | None,
        state: State,
        *,
        counts: tuple[float, float | None] | None = None,
        message: str | None = None,
        only_if: Collection[State | None] = (),
        **extra: Any,
    ) -> str | None:
        """End the task's run with `state` (a terminal state, or `retry`): the one
        way the bridge, a cancel and the reaper end a task. `only_if`: as `publish`'s.

        The event carries the last known counts, so a determinate bar stays
        determinate (and is full on success): `counts` (current, total) when the
        caller knows them better than Redis (the worker's unsent progress), else
        the stored latest event's. The task leaves the running index either way;
        a retry runs again later and is indexed again then. Returns the cursor, or
        None when the task had already ended (the write script refuses a second
        end, so racing enders are harmless)."""
        if counts is None or name is None:
            latest = self.latest(task_id) or {}
            name = name or latest.get("name")
            if counts is None:
                counts = (finite_number(latest.get("current")) or 0, finite_number(latest.get("total")))
        current, total = counts
        if state is State.SUCCESS and total is not None:
            current = total
        try:
            return self.publish(
                make_event(task_id, name, state, current=current, total=total, message=message, **extra),
                only_if=only_if,
            )
        finally:  # even when the write failed: the task is no longer running here
            self.task_ended(task_id)

    def latest(self, task_id: str) -> dict[str, Any] | None:
        """The task's latest stored event, or None (unknown task, or Redis unreachable)."""
        try:
            raw = self.client.hget(self.keys.state(task_id), "latest")
        except redis.RedisError:
            log.warning("progress-sse could not read task %s", task_id, exc_info=True)
            return None
        if raw is None:
            return None
        latest: dict[str, Any] = json.loads(raw)
        return latest

    def worker_alive(self, hostname: str, instance: str, ttl: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.worker(hostname), instance, ex=ttl)
        pipe.sadd(self.keys.workers, hostname)  # so the web can count workers without a SCAN
        pipe.execute()

    def worker_gone(self, hostname: str, instance: str) -> None:
        """Forget the heartbeat, unless another instance of the hostname took it over."""
        key = self.keys.worker(hostname)
        if self.client.get(key) in (instance, instance.encode()):
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(key)
            pipe.srem(self.keys.workers, hostname)
            pipe.execute()

    def task_running(self, task_id: str, hostname: str, instance: str) -> None:
        self.client.hset(self.keys.running, task_id, f"{hostname}|{instance}")

    def task_ended(self, task_id: str) -> None:
        self.client.hdel(self.keys.running, task_id)

    def join_group(self, group_id: str, task_id: str) -> None:
        """Record that `task_id` belongs to Celery group `group_id`."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(self.keys.group(group_id), task_id)
        pipe.expire(self.keys.group(group_id), self.history_ttl)
        pipe.execute()

    def state(self, task_id: str) -> str | None:
        """The task's current state, or None (unknown task, or Redis unreachable)."""
        try:
            raw = self.client.hget(self.keys.state(task_id), "state")
        except redis.RedisError:
            log.warning("progress-sse could not read task %s", task_id, exc_info=True)
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    def discard(self, task_id: str) -> None:
        """Forget a task that was never really queued (its publish to the broker failed)."""
        partition = self.keys.partition_of(task_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.state(task_id), self.keys.log(task_id))
        pipe.zrem(self.keys.recent(partition), task_id)
        pipe.zrem(self.keys.queued(partition), task_id)
        pipe.execute()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

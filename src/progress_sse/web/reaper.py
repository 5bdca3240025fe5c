"""Web side: mark tasks `lost` that no worker will ever end.

Two rules (docs/protocol.md, "States", says when each applies):

- **Their worker vanished.** A worker killed outright (SIGKILL, an out-of-memory
  kill, a platform restarting its dyno) fires no Celery signal, so nothing would
  ever end its running tasks' streams. Each worker's parent keeps a heartbeat key
  alive (bridge._Heartbeat); running tasks are indexed with their worker. Every
  third of the TTL this reaper looks for running tasks whose worker's key has
  expired and stores `lost` for them.
- **Their message vanished.** A task that stays `queued` for
  `PROGRESS_SSE_QUEUED_TIMEOUT` seconds, and whose message a Redis broker no longer
  holds (in no queue list, not in the `unacked` hash of prefetched and ETA
  messages) in two checks in a row, will never be run: it is stored as `lost` too,
  only if it is still `queued` then.

Several web processes may reap at once: the write script stores only the first
terminal event, so the others' attempts are no-ops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from ..config import Settings, is_redis_url
from ..events import State
from ..keys import Keys
from ..worker import broker as kombu
from ..worker.publisher import Publisher
from . import metrics

log = logging.getLogger(__name__)

WORKER_GONE = "The worker running it stopped answering"
MESSAGE_GONE = "The broker no longer holds its message: no worker will run it"
# Stale queued tasks looked at per check, oldest first (on a cluster, split over
# the partitions' indexes).
QUEUED_PER_CHECK = 100
# Seconds between two checks of the broker (each reads its queues).
QUEUED_CHECK_EVERY = 30.0
# Messages a check reads at most (queue lists and the unacked hash together); with
# more, it cannot tell cheaply where a message is, and marks nothing.
MAX_SCAN = 10_000
# Priority steps a queue may have lists for: kombu's are 0, 3, 6 and 9 unless set otherwise.
_PRIORITIES = range(1, 10)


async def reap_once(client: aioredis.Redis, keys: Keys, publisher: Publisher) -> list[str]:
    """Mark the tasks of gone workers lost; returns their ids."""
    running = cast(dict[str, str], await client.hgetall(keys.running))
    if not running:
        return []
    # Each entry is "hostname|instance": the task is lost once that hostname's
    # heartbeat is gone, or belongs to another instance (the worker was restarted).
    workers = {task_id: value.partition("|") for task_id, value in running.items()}
    hosts = sorted({host for host, _, _ in workers.values()})
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.get(keys.worker(host))
    beating = dict(zip(hosts, await pipe.execute(), strict=True))
    lost = [
        task_id
        for task_id, (host, _, instance) in workers.items()
        if beating[host] is None or (instance and beating[host] != instance)
    ]
    for task_id in lost:
        await asyncio.to_thread(_mark_lost, publisher, task_id, workers[task_id][0])
    return lost


async def live_workers(client: aioredis.Redis, keys: Keys) -> int:
    """How many workers' heartbeats are alive now (for /healthz and POST /tasks).

    Hostnames whose heartbeat key has expired are pruned from the index on the way."""
    hosts = sorted(cast(set[str], await client.smembers(keys.workers)))
    if not hosts:
        return 0
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.exists(keys.worker(host))
    alive = await pipe.execute()
    gone = [host for host, exists in zip(hosts, alive, strict=True) if not exists]
    if gone:
        # A worker that comes back meanwhile re-adds itself with its next beat.
        await client.srem(keys.workers, *gone)
    return len(hosts) - len(gone)


def _mark_lost(publisher: Publisher, task_id: str, host: str) -> None:
    # Refused, harmlessly, if it ended meanwhile (or another web process was first).
    # Which worker goes in its own field, which only operators see (events.for_watcher).
    if publisher.finish(task_id, None, State.LOST, message=WORKER_GONE, reason="worker_gone", worker=host):
        metrics.TASKS_LOST.labels("worker_gone").inc()  # by the one process that stored it


@dataclass(eq=False)
class QueuedRule:
    """The queued rule's broker, bound and memory between checks."""

    broker: aioredis.Redis
    fingerprint: str
    timeout: float
    # Tasks whose message was not found when they were last looked for: lost if it
    # is not found the next time either.
    missing: set[str] = field(default_factory=set)
    # Where in each partition's stale queued tasks the next check starts: each check
    # takes the next QUEUED_PER_CHECK, so a long backlog is looked through in turn.
    offsets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> QueuedRule | None:
        """None when the broker is not a Redis, whose messages this rule cannot see."""
        fingerprint = kombu.fingerprint(settings.broker_url)
        if fingerprint == "other" or not is_redis_url(settings.broker_url):
            return None
        # Bytes, not text: a message is parsed as it is, and never fails to decode.
        client = aioredis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2.0, socket_timeout=10.0, client_name="progress-sse-reaper"
        )
        return cls(client, fingerprint, float(settings.queued_timeout))


async def reap_queued_once(
    client: aioredis.Redis, keys: Keys, publisher: Publisher, rule: QueuedRule, *, now: float | None = None
) -> list[str]:
    """Look for the messages of tasks queued for longer than the rule's timeout, and
    mark lost those whose message was missing this time and the time before; returns
    their ids."""
    now = time.time() if now is None else now
    per_partition = -(-QUEUED_PER_CHECK // keys.partitions)  # the check's share of each, rounded up
    pipe = client.pipeline(transaction=False)
    for partition in range(keys.partitions):
        offset = rule.offsets.get(partition, 0)
        pipe.zrangebyscore(keys.queued(partition), "-inf", now - rule.timeout, start=offset, num=per_partition)
    pages = cast(list[list[str]], await pipe.execute())
    for partition, page in enumerate(pages):
        rule.offsets[partition] = rule.offsets.get(partition, 0) + len(page) if len(page) == per_partition else 0
    stale = [task_id for page in pages for task_id in page]
    if not stale:
        return []
    pipe = client.pipeline(transaction=False)
    for task_id in stale:
        pipe.hmget(keys.state(task_id), ["state", "broker"])
    found = cast(list[list[str | None]], await pipe.execute())
    candidates, done = [], []
    for task_id, (state, where) in zip(stale, found, strict=True):
        if state == State.QUEUED and where in (None, rule.fingerprint):  # none: POST /tasks, to this broker
            candidates.append(task_id)
        else:  # moved on (or expired) without the index hearing of it, or not in this broker
            done.append(task_id)
    if done:
        pipe = client.pipeline(transaction=False)
        for task_id in done:
            pipe.zrem(keys.queued(keys.partition_of(task_id)), task_id)
        await pipe.execute()
        rule.missing.difference_update(done)
    held = await held_by_broker(rule.broker, candidates) if candidates else set()
    if held is None:  # the broker cannot tell: nothing is marked, nothing remembered
        rule.missing.clear()
        return []
    rule.missing.difference_update(held)
    missing = [task_id for task_id in candidates if task_id not in held]
    confirmed = [task_id for task_id in missing if task_id in rule.missing]
    rule.missing.update(missing)
    rule.missing.difference_update(confirmed)
    lost = []
    for task_id in confirmed:
        if await asyncio.to_thread(_mark_message_lost, publisher, task_id):
            lost.append(task_id)
            metrics.TASKS_LOST.labels("message_gone").inc()
    return lost


async def held_by_broker(broker: aioredis.Redis, task_ids: Iterable[str]) -> set[str] | None:
    """Which of `task_ids` kombu's Redis transport holds a message of: in a queue's
    lists (every priority) or the `unacked` hash. None when it cannot tell: no
    binding table (not a database kombu uses, or a `global_keyprefix`), or more than
    MAX_SCAN messages to read."""
    wanted = set(task_ids)
    tables = [table async for table in broker.scan_iter(match=f"{kombu.BINDING_PREFIX}*", count=1000)]
    if not tables:
        return None
    pipe = broker.pipeline(transaction=False)
    for table in tables:
        pipe.smembers(table)
    queues = {member.rsplit(kombu.SEP.encode(), 1)[-1] for members in await pipe.execute() for member in members}
    queues.discard(b"")
    suffixes = [b"", *(f"{kombu.SEP}{p}".encode() for p in _PRIORITIES)]
    lists = [queue + suffix for queue in sorted(queues) for suffix in suffixes]
    pipe = broker.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    pipe.hlen(kombu.UNACKED)
    *lengths, unacked = await pipe.execute()
    if sum(lengths) + unacked > MAX_SCAN:
        return None
    # Each list, then the hash, in one read each (a read in parts could miss messages
    # that pushes and pops shift past it). The lists first: a message moves from one
    # to the hash, so read in this order one on its way is seen in one or the other.
    pipe = broker.pipeline(transaction=False)
    for name in lists:
        pipe.lrange(name, 0, -1)
    raws = [raw for entries in await pipe.execute() for raw in entries]
    held = wanted & await asyncio.to_thread(_ids_of, raws, False)
    held |= wanted & await asyncio.to_thread(_ids_of, cast(list[bytes], await broker.hvals(kombu.UNACKED)), True)
    return held


def _ids_of(raws: list[bytes], unacked: bool) -> set[str]:
    """The task ids of kombu messages (an unacked entry is [message, exchange, routing key])."""
    ids = set()
    for raw in raws:
        try:
            message: Any = json.loads(raw)
            if unacked:
                message = message[0]
            task_id = message.get("headers", {}).get("id") or message.get("properties", {}).get("correlation_id")
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            continue
        if isinstance(task_id, str):
            ids.add(task_id)
    return ids


def _mark_message_lost(publisher: Publisher, task_id: str) -> bool:
    # Only if still queued: a worker that started it meanwhile wins.
    return (
        publisher.finish(
            task_id, None, State.LOST, message=MESSAGE_GONE, reason="message_gone", only_if=(State.QUEUED,)
        )
        is not None
    )


async def run(
    client: aioredis.Redis, keys: Keys, publisher: Publisher, ttl: int, *, settings: Settings | None = None
) -> None:
    """Reap every third of the worker TTL; the queued rule every QUEUED_CHECK_EVERY
    seconds, with `settings` (default: the publisher's) naming the broker."""
    settings = settings or publisher.settings
    rule = QueuedRule.from_settings(settings) if settings is not None else None
    checked = float("-inf")
    try:
        while True:
            await asyncio.sleep(max(ttl / 3, 0.2))
            try:
                lost = await reap_once(client, keys, publisher)
                if rule is not None and time.monotonic() - checked >= QUEUED_CHECK_EVERY:
                    checked = time.monotonic()
                    lost += await reap_queued_once(client, keys, publisher, rule)
            except Exception:
                log.warning("progress-sse could not look for lost tasks", exc_info=True)
                continue
            if lost:
                log.warning("progress-sse marked %d task(s) lost: %s", len(lost), ", ".join(lost))
    finally:
        if rule is not None:
            await rule.broker.aclose()

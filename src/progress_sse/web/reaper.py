"""Web side: mark tasks `lost` whose worker vanished without a word.

A worker killed outright (SIGKILL, an out-of-memory kill, a platform restarting
its dyno) fires no Celery signal, so nothing would ever end its running tasks'
streams. Each worker's parent keeps a heartbeat key alive (bridge._Heartbeat);
running tasks are indexed with their worker. Every third of the TTL this reaper
looks for running tasks whose worker's key has expired and stores `lost` for them.
Several web processes may reap at once: the write script stores only the first
terminal event, so the others' attempts are no-ops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import redis.asyncio as aioredis

from ..events import State
from ..keys import Keys
from ..worker.publisher import Publisher

log = logging.getLogger(__name__)


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
    publisher.finish(task_id, None, State.LOST, message="The worker running it stopped answering", worker=host)


async def run(client: aioredis.Redis, keys: Keys, publisher: Publisher, ttl: int) -> None:
    while True:
        await asyncio.sleep(max(ttl / 3, 0.2))
        try:
            lost = await reap_once(client, keys, publisher)
        except Exception:
            log.warning("progress-sse could not look for lost tasks", exc_info=True)
            continue
        if lost:
            log.warning("progress-sse marked %d task(s) lost: %s", len(lost), ", ".join(lost))

"""A worker that vanishes without a word: its running tasks end as `lost`."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.web.reaper import reap_once
from progress_sse.worker.publisher import Publisher

from .conftest import Server, Worker
from .sse import SSEReader


@pytest.fixture
async def parts(settings: Settings, redis_client: redis.Redis) -> AsyncIterator[tuple[aioredis.Redis, Keys, Publisher]]:
    keys = Keys(f"{settings.key_prefix}-reap-{uuid.uuid4().hex[:6]}")
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    publisher = Publisher(sync_client(settings.redis_url), keys)
    yield client, keys, publisher
    for key in redis_client.scan_iter(match=f"{keys.prefix}:*"):
        redis_client.delete(key)
    await client.aclose()
    publisher.client.close()


async def test_reaper_marks_only_the_tasks_of_workers_without_a_heartbeat(
    parts: tuple[aioredis.Redis, Keys, Publisher],
) -> None:
    client, keys, publisher = parts
    alive, gone = str(uuid.uuid4()), str(uuid.uuid4())
    restarted = str(uuid.uuid4())
    for task_id, host, instance in (
        (alive, "celery@alive", "one"),
        (gone, "celery@gone", "one"),
        (restarted, "celery@alive", "killed-before"),  # same hostname, an earlier life
    ):
        publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=3, total=9))
        publisher.task_running(task_id, host, instance)
    publisher.worker_alive("celery@alive", "one", ttl=30)

    assert sorted(await reap_once(client, keys, publisher)) == sorted([gone, restarted])
    lost = publisher.latest(gone)
    assert lost is not None
    assert (lost["state"], lost["current"], lost["total"]) == ("lost", 3, 9)
    assert lost["message"] == "The worker running it stopped answering"
    assert lost["worker"] == "celery@gone", "which worker: in a field only operators see"
    assert publisher.state(alive) == "progress"
    assert await client.hkeys(keys.running) == [alive]
    assert await reap_once(client, keys, publisher) == []  # nothing twice

    publisher.worker_gone("celery@alive", "another-instance")  # not its heartbeat to remove
    assert await client.exists(keys.worker("celery@alive"))
    publisher.worker_gone("celery@alive", "one")
    assert not await client.exists(keys.worker("celery@alive"))


@pytest.mark.e2e
async def test_tasks_of_a_worker_killed_outright_end_as_lost(
    make_server: Any, settings: Settings, output_dir: Path
) -> None:
    doomed = settings.with_(queue=f"{settings.queue}-doomed", worker_ttl=1)
    worker = Worker(doomed, output_dir / "doomed-worker.log", concurrency=1)
    try:
        await asyncio.to_thread(worker.wait_ready)
        server: Server = await make_server(doomed)
        task_id = await server.start_task("demo.count", n=1000, delay=0.05)
        async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
            reader = SSEReader(resp)
            await reader.until(lambda e: e.event == "progress")
            os.killpg(worker.process.pid, signal.SIGKILL)  # the whole worker, no signal handlers run
            rest = await reader.rest(timeout=20)
    finally:
        worker.stop()
    assert rest[-1].event == "lost"
    assert rest[-1].payload["total"] == 1000
    assert rest[-1].payload["message"] == "The worker running it stopped answering"
    assert rest[-1].payload["worker"].startswith(worker.name), "which worker: a field of its own, for operators"
    assert (await server.state(task_id))["state"] == "lost"

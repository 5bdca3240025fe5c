"""Tasks no worker will end: those of a worker that vanished without a word, and
queued ones whose message the broker no longer holds, end as `lost`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import progress_sse
from progress_sse.cli.embedded import EmbeddedRedis
from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.web.reaper import MESSAGE_GONE, QueuedRule, held_by_broker, reap_once, reap_queued_once
from progress_sse.worker import broker
from progress_sse.worker.celery_app import make_celery
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
    assert lost["reason"] == "worker_gone"
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


def queue_message(publisher: Publisher, celery: Any, age: float, **fields: str) -> str:
    """A task queued `age` seconds ago as POST /tasks does (or the bridge, with its
    `broker` field), its message on a queue no worker consumes."""
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "demo.count", State.QUEUED, ts=time.time() - age), **fields)
    celery.send_task("demo.count", task_id=task_id)
    return task_id


def drop_message(client: redis.Redis, queue: str, task_id: str) -> None:
    """What a broker that lost a message looks like: the message is gone from its list."""
    for raw in client.lrange(queue, 0, -1):
        if task_id in raw:
            assert client.lrem(queue, 1, raw) == 1
            return
    raise AssertionError(f"no message of {task_id} on {queue}")


async def test_a_queued_task_ends_as_lost_once_its_message_is_gone_twice_in_a_row(
    parts: tuple[aioredis.Redis, Keys, Publisher], settings: Settings, redis_client: redis.Redis
) -> None:
    client, keys, publisher = parts
    # On the suite's Redis, on a queue no worker consumes.
    own = settings.with_(queue=f"{keys.prefix}-nobody", queued_timeout=60)
    celery = make_celery(own)
    rule = QueuedRule.from_settings(own)
    assert rule is not None
    try:
        kept = queue_message(publisher, celery, age=600)
        vanished = queue_message(publisher, celery, age=600)
        elsewhere = queue_message(publisher, celery, age=600, broker=broker.fingerprint("redis://another-host:6379/0"))
        started = queue_message(publisher, celery, age=600)
        fresh = queue_message(publisher, celery, age=0)
        for task_id in (vanished, elsewhere, started, fresh):
            drop_message(redis_client, own.queue, task_id)

        assert await reap_queued_once(client, keys, publisher, rule) == [], "one check is not enough"
        publisher.publish(make_event(started, "demo.count", State.STARTED))  # a worker got it meanwhile
        assert await reap_queued_once(client, keys, publisher, rule) == [vanished]

        lost = publisher.latest(vanished)
        assert lost is not None
        assert (lost["state"], lost["reason"], lost["message"]) == ("lost", "message_gone", MESSAGE_GONE)
        left = [publisher.state(t) for t in (kept, elsewhere, started, fresh)]
        assert left == ["queued", "queued", "started", "queued"]
        assert await client.zscore(keys.queued(), vanished) is None, "out of the index with its end"
        assert await client.zscore(keys.queued(), started) is None
        assert await reap_queued_once(client, keys, publisher, rule) == []
    finally:
        redis_client.delete(own.queue)
        celery.close()
        await rule.broker.aclose()


async def test_a_message_in_the_unacked_hash_is_held_and_a_broker_kombu_never_used_cannot_tell(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    task_id = str(uuid.uuid4())
    queue = f"{settings.key_prefix}-held-{uuid.uuid4().hex[:6]}"
    celery = make_celery(settings.with_(queue=queue))
    client = aioredis.Redis.from_url(settings.broker_url)
    try:
        celery.send_task("demo.count", task_id=task_id)
        [raw] = redis_client.lrange(queue, 0, -1)
        assert await held_by_broker(client, [task_id]) == {task_id}
        # As kombu holds a prefetched or ETA message: out of its list, into the unacked hash.
        tag = f"{queue}-tag"
        redis_client.lrem(queue, 1, raw)
        redis_client.hset("unacked", tag, json.dumps([json.loads(raw), queue, queue]))
        try:
            assert await held_by_broker(client, [task_id]) == {task_id}
        finally:
            redis_client.hdel("unacked", tag)
        assert await held_by_broker(client, [task_id]) == set()
    finally:
        celery.close()
        await client.aclose()
    with EmbeddedRedis(tmp_path / "empty") as url:
        empty = aioredis.Redis.from_url(url)
        try:
            assert await held_by_broker(empty, [task_id]) is None, "no binding table: no kombu here"
        finally:
            await empty.aclose()


def test_the_queued_rule_looks_only_in_a_redis_broker() -> None:
    assert QueuedRule.from_settings(Settings(broker_url="amqp://guest@rabbit//")) is None
    assert QueuedRule.from_settings(Settings(broker_url="sentinel://s1:26379;sentinel://s2:26379")) is None
    same = {
        broker.fingerprint(url)
        for url in ("redis://localhost/0", "redis://:pw@127.0.0.1:6379", "redis://127.0.0.1:6379/0")
    }
    assert len(same) == 1
    assert broker.fingerprint("redis://127.0.0.1:6379/1") not in same
    assert broker.fingerprint("amqp://guest@rabbit//") == "other"


def test_the_bridge_records_which_broker_a_task_went_to(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    queue = f"{keys.prefix}-nobody"
    app = make_celery(settings.with_(queue=queue))
    publisher = progress_sse.install(app, settings.with_(key_prefix=keys.prefix))
    try:
        task_id = app.send_task("shop.report").id
        assert redis_client.hget(keys.state(task_id), "state") == "queued"
        assert redis_client.hget(keys.state(task_id), "broker") == broker.fingerprint(settings.broker_url)
        assert redis_client.zscore(keys.queued(), task_id) is not None, "in the index of queued tasks"
    finally:
        progress_sse.uninstall()
        publisher.client.close()
        redis_client.delete(queue)
        app.close()

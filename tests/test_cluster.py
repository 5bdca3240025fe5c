"""progress-sse on a Redis Cluster (`redis+cluster://`): six redis-servers of the
run's own (three masters with a replica each), a real worker writing to it, real
web servers reading from it. The end-to-end contract holds as on one Redis, with
two web servers; a failover mid-stream skips nothing without a reset.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from progress_sse.config import ConfigError, Settings
from progress_sse.connections import keys_for, partition_clients, sync_client, web_client
from progress_sse.events import HISTORY_LOST, State, make_event
from progress_sse.keys import CLUSTER_PARTITIONS, Keys, partition_tags
from progress_sse.redis_urls import ClusterURL, parse_cluster
from progress_sse.web.reaper import reap_once
from progress_sse.worker.celery_app import make_celery
from progress_sse.worker.publisher import Publisher

from .conftest import Server, Worker, wait_until
from .redis_servers import LocalCluster
from .sse import SSEReader, composite, follow, numbers

# Every fixture of tests/conftest.py below `settings` follows `backend`: with this
# mark, a Redis Cluster of the run's own.
on_cluster = pytest.mark.parametrize("backend", ["cluster"], indirect=True, scope="session")
pytestmark = pytest.mark.timeout(120)

WAIT = 30.0  # an upper bound; a pass never waits this long


def test_the_url_names_some_of_the_nodes() -> None:
    assert parse_cluster("redis+cluster://:pw@n1:7000,n2") == ClusterURL((("n1", 7000), ("n2", 6379)), None, "pw")
    with pytest.raises(ValueError, match="no databases"):
        parse_cluster("redis+cluster://n1:7000/3")


def test_a_cluster_cannot_be_the_broker_and_the_error_says_so() -> None:
    alone = Settings.from_env({"REDIS_URL": "redis+cluster://n1:7000"})  # install(app): the app has a broker
    with pytest.raises(ConfigError, match="set CELERY_BROKER_URL"):
        make_celery(alone)
    run = subprocess.run(
        [sys.executable, "-m", "progress_sse", "worker"],
        env={
            **{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
            "REDIS_URL": "redis+cluster://n1:7000",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2 and "set CELERY_BROKER_URL" in run.stderr, run.stderr
    assert make_celery(alone.with_(broker_url="redis://b:6379/0"))


def test_a_task_s_keys_share_its_partition_s_slot_and_the_partitions_have_slots_of_their_own() -> None:
    keys = keys_for(Settings(redis_url="redis+cluster://n1:7000", key_prefix="P"))
    tasks = [str(uuid.uuid4()) for _ in range(300)]
    for task in tasks:
        p = keys.partition_of(task)
        names = [keys.state(task), keys.log(task), keys.channel(task), keys.history(p), keys.recent(p)]
        names += [keys.queued(p), keys.control_channel(p)]
        assert {key_slot(name.encode()) for name in names} == {key_slot(partition_tags("P")[p].encode())}
        assert keys.task_of_channel(keys.channel(task)) == task
    assert {keys.partition_of(task) for task in tasks} == set(range(CLUSTER_PARTITIONS))
    assert len({key_slot(keys.history(p).encode()) for p in range(CLUSTER_PARTITIONS)}) == CLUSTER_PARTITIONS
    # What belongs to no task: one slot of its own.
    rest = [keys.running, keys.workers, keys.worker("celery@h"), keys.group("g")]
    assert {key_slot(name.encode()) for name in rest} == {key_slot(b"P")}


def test_the_partitions_spread_evenly_over_the_masters_of_the_run_s_cluster(
    local_cluster: LocalCluster, settings: Settings
) -> None:
    keys = keys_for(settings.with_(redis_url=local_cluster.url))
    owners = Counter(local_cluster.owner(key_slot(keys.history(p).encode())) for p in range(keys.partitions))
    masters = {port for port in local_cluster.ports if local_cluster.is_master(port)}
    assert set(owners) == masters and len(masters) == 3
    assert sorted(owners.values()) == [4, 4, 4], "each master serves as many partitions"


@pytest.fixture
async def servers(make_server: Any, settings: Settings, worker: Worker) -> list[Server]:
    """Two web servers on the cluster (the `backend` of this module's tests), each
    with its own hub and its own sharded subscription; the run's cluster worker."""
    return [await make_server(settings), await make_server(settings)]


@pytest.mark.e2e
@on_cluster
async def test_a_task_s_whole_life_streams_from_both_web_servers(servers: list[Server]) -> None:
    first, second = servers
    task_id = await first.start_task("demo.count", n=5, delay=0.05)
    url = f"/tasks/{task_id}/events"
    lives = await asyncio.gather(*(follow(s.session, s.url(url), [task_id], cursor="0") for s in servers))
    for frames in lives:
        assert [f.event for f in frames][:2] == ["queued", "started"]
        assert frames[-1].event == "success" and frames[-1].payload["result"] == {"processed": 5}
        assert numbers(frames) == sorted(set(numbers(frames)))
    assert [f.id for f in lives[0]] == [f.id for f in lives[1]], "one history, the same ids from either server"
    state = await second.state(task_id)
    assert state["state"] == "success" and state["cursor"] == lives[0][-1].id


@pytest.mark.e2e
@on_cluster
async def test_a_reconnect_resumes_every_event_exactly_once(servers: list[Server]) -> None:
    first, second = servers
    task_id = await first.start_task("demo.count", n=8, delay=0.05)
    url = f"/tasks/{task_id}/events"
    async with first.session.get(first.url(url), headers={"Last-Event-ID": "0"}) as resp:
        head = await SSEReader(resp).until(lambda e: e.payload.get("current") == 3, WAIT)
    rest = await follow(second.session, second.url(url), [task_id], cursor=head[-1].id)
    whole = await follow(first.session, first.url(url), [task_id], cursor="0")
    assert [f.id for f in head + rest] == [f.id for f in whole]


@pytest.mark.e2e
@on_cluster
async def test_many_tasks_share_one_stream_and_the_recent_list(servers: list[Server]) -> None:
    server = servers[0]
    tasks = [await server.start_task("demo.count", n=3, delay=0.02) for _ in range(4)]
    query = "&".join(f"task={t}" for t in tasks)
    frames = await follow(server.session, server.url(f"/events?{query}"), tasks)
    ends = {f.payload["task_id"]: f.event for f in frames if f.terminal}
    assert ends == {t: "success" for t in tasks}
    assert numbers(frames) == sorted(set(numbers(frames)))
    async with server.session.get(server.url("/tasks?limit=50")) as resp:
        listed = [t["task_id"] for t in (await resp.json())["tasks"]]
    assert set(tasks) <= set(listed)


def one_task_per_partition(keys: Keys) -> list[str]:
    """Task ids, one in each partition (so on every master of the cluster)."""
    found: dict[int, str] = {}
    while len(found) < keys.partitions:
        task_id = str(uuid.uuid4())
        found.setdefault(keys.partition_of(task_id), task_id)
    return [found[p] for p in sorted(found)]


@pytest.mark.e2e
@on_cluster
async def test_one_stream_of_tasks_in_every_partition_resumes_each_exactly_once_within_128_bytes(
    make_server: Any, settings: Settings, keys: Keys, redis_client: Any
) -> None:
    """A stream of twelve tasks, one per partition and so spread over all three
    masters, is cut mid-way and resumed on another web server from its one cursor:
    each task's events arrive once, in order. Every partition's sequence stands just
    below the most 8 base62 digits hold, so the cursors are as long as any can be."""
    own = settings.with_(key_prefix=keys.prefix)
    first, second = await make_server(own), await make_server(own)
    for p in range(keys.partitions):
        redis_client.hset(keys.history(p), "n", 62**8 - 50)
    tasks = one_task_per_partition(keys)
    publisher = Publisher(sync_client(own.redis_url), keys)
    try:
        for task_id in tasks:
            publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
        url = "/events?" + "&".join(f"task={t}" for t in tasks)
        async with first.session.get(first.url(url)) as resp:
            reader = SSEReader(resp)
            head = await reader.until(count("queued", len(tasks)), WAIT)
            for task_id in tasks:
                publisher.publish(make_event(task_id, "demo.count", State.STARTED))
            head += await reader.until(count("started", len(tasks)), WAIT)
        for task_id in tasks:  # while no stream is open
            publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=2))
            publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=2, total=2))
        rest = await follow(second.session, second.url(url), tasks, cursor=head[-1].id)
    finally:
        publisher.client.close()
    every = head + rest
    for task_id in tasks:
        mine = [e.event for e in every if e.payload["task_id"] == task_id]
        assert mine == ["queued", "started", "progress", "success"], (task_id, mine)
    assert numbers(every) == sorted(set(numbers(every))), "one cursor, always moving on"
    lengths = {len(str(e.id)) for e in every}
    assert max(lengths) == 128, "twelve partitions of 8-digit numbers: the longest cursor there is"


def count(state: str, wanted: int) -> Any:
    """An SSEReader.until predicate: true at the `wanted`-th event of `state`."""
    seen = 0

    def reached(event: Any) -> bool:
        nonlocal seen
        seen += event.event == state
        return seen == wanted

    return reached


@pytest.mark.e2e
@on_cluster
async def test_a_group_is_one_bar_and_a_cancel_ends_a_running_task(servers: list[Server], settings: Settings) -> None:
    server = servers[1]
    publisher = Publisher.from_settings(settings)
    try:
        group, members = str(uuid.uuid4()), one_task_per_partition(keys_for(settings))[:3]
        for member in members:
            publisher.join_group(group, member)
            publisher.publish(make_event(member, "demo.count", State.QUEUED))
        async with server.session.get(server.url(f"/groups/{group}/events")) as resp:
            reader = SSEReader(resp)
            first = await reader.next_event(WAIT)
            assert first is not None and (first.event, first.payload["tasks"]) == ("group", 3), first
            for member in members:
                publisher.publish(make_event(member, "demo.count", State.SUCCESS, current=1, total=1))
            last = (await reader.rest(WAIT))[-1]
        assert (last.payload["state"], last.payload["done"]) == ("success", 3)
    finally:
        publisher.client.close()

    task_id = await server.start_task("demo.count", n=200, delay=0.1)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        await reader.until(lambda e: e.event == "progress", WAIT)
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as cancel:
            assert cancel.status in (200, 202), await cancel.text()
        assert (await reader.until(lambda e: e.terminal, WAIT))[-1].event == "revoked"


@pytest.mark.e2e
@on_cluster
async def test_the_tasks_of_a_vanished_worker_end_as_lost(settings: Settings) -> None:
    keys = keys_for(settings)
    client = web_client(settings)
    publisher = Publisher(sync_client(settings.redis_url), keys)
    try:
        task_id = str(uuid.uuid4())
        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=4))
        publisher.task_running(task_id, "celery@vanished", "one")
        assert task_id in await reap_once(client, keys, publisher)
        latest = publisher.latest(task_id)
        assert latest is not None and (latest["state"], latest["reason"]) == ("lost", "worker_gone")
    finally:
        await client.aclose()
        publisher.client.close()


@pytest.mark.e2e
@on_cluster
@pytest.mark.fault
async def test_a_failover_mid_stream_resets_and_the_stream_goes_on_to_the_end(
    servers: list[Server], local_cluster: LocalCluster, settings: Settings
) -> None:
    """The replica of the slot's master takes over while a task streams: the new
    master is another node, so its history has a new name; the stream is reset,
    gets the task's state, and follows it to its end."""
    server = servers[0]
    task_id = await server.start_task("demo.count", n=60, delay=0.1)
    publisher = Publisher.from_settings(settings)
    try:
        # An EventSource through the failover: it reconnects with its cursor if the
        # stream breaks (a failure mid-stream ends the connection).
        watching = asyncio.create_task(follow(server.session, server.url(f"/tasks/{task_id}/events"), [task_id]))
        await wait_until(lambda: (publisher.latest(task_id) or {}).get("current", 0) >= 3, WAIT, "progress")
        keys = keys_for(settings)
        slot = key_slot(keys.history(keys.partition_of(task_id)).encode())
        await asyncio.to_thread(local_cluster.fail_over, slot)
        after = await watching
    finally:
        publisher.client.close()
    old = composite(str(after[0].id)).digest  # one task: the digest names its partition's epoch
    names = [f.event for f in after]
    assert "reset" in names, names
    # The open stream rides out the failover (its reads reconnect to the new
    # master) and is told its history is gone.
    reset = after[names.index("reset")]
    assert reset.payload["reason"] == HISTORY_LOST
    later = after[names.index("reset") + 1 :]
    assert later and all(composite(str(f.id)).digest != old for f in later)
    assert later[-1].event == "success" and later[-1].payload["result"] == {"processed": 60}
    currents = [f.payload["current"] for f in later if f.event == "progress"]
    assert currents == sorted(currents), "in order after the reset"


@pytest.mark.e2e
@on_cluster
async def test_each_partition_s_client_asks_the_cluster_where_its_slot_is(
    local_cluster: LocalCluster, settings: Settings
) -> None:
    clients = partition_clients(settings)
    assert clients is not None and len(clients) == CLUSTER_PARTITIONS
    keys = keys_for(settings)
    try:
        for p, client in enumerate(clients):
            assert isinstance(client, aioredis.Redis) and await client.ping()
            node = await client.connection_pool.get_connection()
            try:
                assert node.port == local_cluster.owner(key_slot(keys.history(p).encode()))
            finally:
                await client.connection_pool.release(node)
    finally:
        for client in clients:
            await client.aclose()

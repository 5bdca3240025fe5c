"""A Redis outage under a working worker: nothing stuck when it comes back.

A real worker (prefork) runs on a redis-server of the test's own, which is
killed while tasks run and wait, and started again on the same port:

- with its data (append-only file, fsync on every write, as a Redis that keeps
  its broker's messages runs), after 10 s: the worker must come back with its
  running and prefetched tasks (kombu's Redis transport alone leaves a prefetched
  message in its `unacked` hash for an hour: worker/kombu_redis.py), and a task
  that ended during the outage must still end (worker/outbox.py);
- without its data: the tasks whose messages it lost must end as `lost`
  (the reaper's queued rule, web/reaper.py), and no other.

Watchers connected through the outage, like EventSource, reconnect with their
cursor and must see every task end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from kombu import Connection, Exchange, Queue
from redis.exceptions import ClusterError, TryAgainError

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.events import TERMINAL_STATES, State, make_event
from progress_sse.keys import Keys
from progress_sse.web.reaper import MESSAGE_GONE, QueuedRule, reap_queued_once
from progress_sse.worker import kombu_redis
from progress_sse.worker.celery_app import make_celery
from progress_sse.worker.outbox import Outbox
from progress_sse.worker.publisher import Publisher

from .conftest import Server, Worker, worker_rig
from .redis_servers import RestartableRedis, wait_for
from .sse import follow

# A test that kills a Redis: e2e (a real worker), fault, and bounded as a whole.
outage = [pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(240)]


def marked(test: Any) -> Any:
    for mark in outage:
        test = mark(test)
    return test


OUTAGE = 10.0  # seconds the Redis stays down: the fault, not a wait for anything


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def queue_task(publisher: Publisher, celery: Any, name: str, options: Any = None, **kwargs: Any) -> str:
    """As POST /tasks does (web/control.py): `queued`, then the message."""
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, name, State.QUEUED))
    celery.send_task(name, kwargs=kwargs, task_id=task_id, **(options or {}))
    return task_id


def count(log_path: Path, line: bytes) -> int:
    return log_path.read_bytes().count(line)


def states(client: redis.Redis, keys: Keys, task_ids: list[str]) -> list[str | None]:
    try:
        return [client.hget(keys.state(t), "state") for t in task_ids]
    except redis.ConnectionError:  # the Redis is not back yet
        return [None] * len(task_ids)


async def watch_to_the_end(server: Server, task_id: str, timeout: float) -> list[dict[str, Any]]:
    """A task's events, its whole life, as an EventSource sees them through outages."""
    url = server.url(f"/tasks/{task_id}/events")
    return [frame.payload for frame in await follow(server.session, url, [task_id], cursor="0", timeout=timeout)]


@marked
async def test_a_worker_keeps_its_running_and_prefetched_tasks_through_a_redis_outage(
    private_redis: RestartableRedis, make_server: Any, settings: Settings, output_dir: Path
) -> None:
    # The default deployment: one Redis for the events and the broker.
    own = settings.with_(redis_url=private_redis.url, broker_url=private_redis.url)
    keys = Keys(own.key_prefix)
    log_path = output_dir / "outage-worker.log"
    with worker_rig(own, log_path, concurrency=1) as (worker, publisher, celery, reads):
        await asyncio.to_thread(worker.wait_ready)
        server: Server = await make_server(own)
        # One pool process: `running` runs, `prefetched` waits in the worker (kombu's
        # unacked hash), `waiting` stays on the queue (prefetch multiplier 1).
        running = queue_task(publisher, celery, "demo.count", n=24, delay=0.5)
        prefetched = queue_task(publisher, celery, "demo.count", n=4, delay=0.1)
        waiting = queue_task(publisher, celery, "demo.count", n=4, delay=0.1)
        tasks = [running, prefetched, waiting]
        watchers = [asyncio.create_task(watch_to_the_end(server, t, timeout=150)) for t in tasks]

        def in_hand() -> bool:
            held = " ".join(reads.hvals("unacked"))
            return reads.hget(keys.state(running), "state") == State.PROGRESS and prefetched in held

        await asyncio.to_thread(wait_for, in_hand, 30, "a running and a prefetched task", worker.process)

        private_redis.kill()
        await asyncio.to_thread(
            wait_for, lambda: b"Connection to broker lost" in log_path.read_bytes(), 30, "the worker to notice"
        )
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:  # the outage: the worker must stay up through it
            assert worker.process.poll() is None, log_path.read_text()[-3000:]
            await asyncio.sleep(0.2)
        private_redis.start()

        def ended() -> bool:
            return all(state in TERMINAL_STATES for state in states(reads, keys, tasks))

        await asyncio.to_thread(wait_for, ended, 120, "every task to end", worker.process)
        assert states(reads, keys, tasks) == ["success"] * 3
        assert worker.process.poll() is None
        text = log_path.read_text()
        assert "put 1 prefetched message(s) back on their queue after the broker came back" in text, text[-3000:]
        # The prefetched task ran once, with its whole life on record.
        life = [f["s"] for _, f in reads.xrange(keys.log(prefetched))]
        assert life[0] == "queued" and life[1] == "started" and life[-1] == "success", life
        assert life.count("started") == 1
        # Every watcher, connected through the outage, saw its task end.
        seen = await asyncio.gather(*watchers)
        for task_id, events in zip(tasks, seen, strict=True):
            assert events[-1]["state"] == "success", (task_id, [e["state"] for e in events])
            assert events[-1]["result"] == {"processed": 24 if task_id == running else 4}


@marked
async def test_a_task_that_ends_while_redis_is_down_ends_for_its_watchers_when_it_is_back(
    private_redis: RestartableRedis, make_server: Any, settings: Settings, output_dir: Path
) -> None:
    own = settings.with_(redis_url=private_redis.url, broker_url=private_redis.url)
    keys = Keys(own.key_prefix)
    log_path = output_dir / "outage-ends-worker.log"
    with worker_rig(own, log_path, concurrency=1, app="tests.apps.outage") as (worker, publisher, celery, reads):
        await asyncio.to_thread(worker.wait_ready)
        server: Server = await make_server(own)
        task_id = queue_task(publisher, celery, "outage.ends_while_redis_is_down")
        watcher = asyncio.create_task(watch_to_the_end(server, task_id, timeout=120))
        await asyncio.to_thread(
            wait_for, lambda: reads.hget(keys.state(task_id), "state") == State.PROGRESS, 30, "the task to start"
        )

        started = time.monotonic()
        private_redis.kill()
        ended = f"outage.ends_while_redis_is_down[{task_id}] succeeded".encode()
        await asyncio.to_thread(wait_for, lambda: ended in log_path.read_bytes(), 30, "the task to end", worker.process)
        while time.monotonic() - started < OUTAGE:  # the rest of the outage
            assert worker.process.poll() is None
            await asyncio.sleep(0.2)
        private_redis.start()

        await asyncio.to_thread(
            wait_for, lambda: states(reads, keys, [task_id]) == ["success"], 60, "its end to be stored", worker.process
        )
        assert f"stored the success event of task {task_id} late" in log_path.read_text()
        events = await watcher
        assert events[-1]["state"] == "success"
        assert events[-1]["result"] == "ended while Redis was down"
        assert (events[-1]["current"], events[-1]["total"]) == (5, 5)
        # A restarted Redis is another node as far as numbers go (src/progress_sse/history.py):
        # the watcher was told its history was reset before it got the end.
        assert any("reason" in e for e in events[:-1]), events
        # The reports made during the outage collapsed to the latest, stored before the end.
        logged = [json.loads(f["d"]) for _, f in reads.xrange(keys.log(task_id))]
        during = [e for e in logged if "while Redis was down" in (e.get("message") or "")]
        assert [(e["state"], e["current"], e["total"]) for e in during] == [("progress", 5, 5)], logged
        assert logged[-2] == during[0]
        stored = [f["s"] for _, f in reads.xrange(keys.log(task_id))]
        assert stored[-2:] == ["progress", "success"], stored


@marked
async def test_tasks_whose_messages_a_restarted_broker_lost_end_as_lost_and_no_other(
    forgetful_redis: RestartableRedis, settings: Settings, redis_client: redis.Redis, output_dir: Path
) -> None:
    # Events stay in the suite's Redis, under a prefix of this test's own; the broker forgets.
    own = settings.with_(broker_url=forgetful_redis.url, key_prefix=f"{settings.key_prefix}-q{uuid.uuid4().hex[:6]}")
    keys = Keys(own.key_prefix)
    log_path = output_dir / "forgetful-broker-worker.log"
    worker = Worker(own, log_path, concurrency=1)
    publisher = Publisher(sync_client(own.redis_url), keys)
    celery = make_celery(own)
    broker = redis.Redis(port=forgetful_redis.port, decode_responses=True, socket_timeout=2)
    events = aioredis.Redis.from_url(own.redis_url, decode_responses=True)
    rule = QueuedRule.from_settings(own)
    assert rule is not None
    try:
        await asyncio.to_thread(worker.wait_ready)
        running = queue_task(publisher, celery, "demo.count", n=12, delay=0.25)
        prefetched = queue_task(publisher, celery, "demo.count", n=2, delay=0.05)
        waiting = queue_task(publisher, celery, "demo.count", n=2, delay=0.05)

        def in_hand() -> bool:
            held = " ".join(broker.hvals("unacked"))
            return publisher.state(running) == State.PROGRESS and prefetched in held

        await asyncio.to_thread(wait_for, in_hand, 30, "a running and a prefetched task", worker.process)
        connected = b"Connected to redis"
        before = count(log_path, connected)
        forgetful_redis.kill()
        await asyncio.to_thread(
            wait_for, lambda: b"Connection to broker lost" in log_path.read_bytes(), 30, "the worker to notice"
        )
        forgetful_redis.start()  # empty
        await asyncio.to_thread(
            wait_for, lambda: count(log_path, connected) > before, 60, "the worker to reconnect", worker.process
        )
        await asyncio.to_thread(
            wait_for, lambda: publisher.state(running) == State.SUCCESS, 60, "the running task to end", worker.process
        )
        # Tasks whose messages the broker holds: one waiting in the worker for its ETA
        # (in the unacked hash), one on a queue nobody consumes.
        later = queue_task(publisher, celery, "demo.count", {"countdown": 3600}, n=1)
        unconsumed = queue_task(publisher, celery, "demo.count", {"queue": f"{own.queue}-nobody"}, n=1)
        await asyncio.to_thread(
            wait_for, lambda: later in " ".join(broker.hvals("unacked")), 30, "the worker to hold the ETA task"
        )

        now = time.time() + own.queued_timeout + 1  # as if they had been queued that long
        assert await reap_queued_once(events, keys, publisher, rule, now=now) == [], "one check is not enough"
        lost = await reap_queued_once(events, keys, publisher, rule, now=now)
        assert sorted(lost) == sorted([prefetched, waiting])
        for task_id in lost:
            event = publisher.latest(task_id)
            assert event is not None
            assert (event["state"], event["reason"], event["message"]) == ("lost", "message_gone", MESSAGE_GONE)
        assert [publisher.state(t) for t in (running, later, unconsumed)] == ["success", "queued", "queued"]
        assert await reap_queued_once(events, keys, publisher, rule, now=now) == []
        assert worker.process.poll() is None
    finally:
        worker.stop()
        celery.close()
        publisher.client.close()
        broker.close()
        await events.aclose()
        await rule.broker.aclose()


def test_kombu_970_a_restore_that_failed_is_done_on_the_next_connection(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """kombu#970 as it happens in a worker: the channel holding a prefetched message
    is closed after its transport was detached from the Connection (what
    Connection.collect does when the broker connection fails). kombu's restore then
    raises `'NoneType' object has no attribute 'hostname'`, which stops a worker,
    and leaves the message in the unacked hash for the visibility timeout."""
    assert kombu_redis.apply()
    name = f"{settings.queue}-k970-{uuid.uuid4().hex[:6]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    task_id = str(uuid.uuid4())
    connection = Connection(settings.broker_url)
    try:
        channel = connection.channel()
        queue(channel).declare()
        channel.basic_publish(channel.prepare_message("{}", headers={"id": task_id}), exchange=name, routing_key=name)
        message = queue(channel).get(no_ack=False)  # delivered, not acknowledged: prefetched
        assert message is not None
        tag = message.delivery_tag
        assert redis_client.hexists("unacked", tag) and redis_client.llen(name) == 0

        connection._do_close_transport()
        channel.close()  # without the workaround: AttributeError, and the message stays put

        assert redis_client.hexists("unacked", tag) and redis_client.llen(name) == 0
        assert kombu_redis.stranded() == 1
        with Connection(settings.broker_url) as again:  # the worker's next connection
            again.channel().qos.restore_visible()
        assert not redis_client.hexists("unacked", tag)
        assert task_id in redis_client.lindex(name, 0)
        assert kombu_redis.stranded() == 0
    finally:
        redis_client.delete(name)


def test_the_outbox_stores_a_task_s_writes_in_their_order_once_redis_answers() -> None:
    box = Outbox()
    answering = False
    stored: list[str] = []

    def write(what: str) -> Callable[..., None]:
        def attempt(late: bool = False) -> None:
            if not answering:
                raise redis.ConnectionError("Redis is down")
            stored.append(what)

        return attempt

    box.add("t1", "started", write("t1 started"), size=100)
    box.add("t2", "success", write("t2 success"), size=100)
    assert box.holds("t1") and not box.holds("t3"), "t1's end must queue behind its start"
    box.add("t1", "success", write("t1 success"), size=100)
    assert box.flush(0) is False and len(box) == 3  # still down: kept
    answering = True
    assert box.flush(10) is True and len(box) == 0
    assert list(dict.fromkeys(stored)) == ["t1 started", "t2 success", "t1 success"]


class Clock:
    """The outbox's clock, moved by the test: a write's age without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyRedis:
    """Writes that fail with `error` (a connection error) until `answering`, recorded in order."""

    def __init__(self, error: Exception | None = None) -> None:
        self.answering = False
        self.stored: list[str] = []
        self.error = error or redis.ConnectionError("Redis is down")

    def write(self, what: str) -> Callable[..., None]:
        def attempt(late: bool = False) -> None:
            if not self.answering:
                raise self.error
            self.stored.append(what)

        return attempt


@pytest.mark.parametrize(
    "error",
    [
        redis.TimeoutError("Timeout reading from socket"),
        ClusterError("TTL exhausted."),  # a cluster client whose own retries are spent
        TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    ],
)
def test_the_outbox_keeps_what_a_cluster_or_a_slow_redis_did_not_store(error: Exception) -> None:
    box, redis_ = Outbox(), FlakyRedis(error)
    box.add("t1", "retry", redis_.write("t1 retry"), size=100)
    assert box.flush(0) is False and len(box) == 1, "kept, not dropped"
    redis_.answering = True
    assert box.flush(10) is True
    # The outbox's own thread may store it too: writes are idempotent (as in the test above).
    assert list(dict.fromkeys(redis_.stored)) == ["t1 retry"]


def test_the_outbox_collapses_a_task_s_progress_to_the_latest_in_order_with_its_state_changes() -> None:
    box, redis_ = Outbox(), FlakyRedis()

    def progress(task_id: str, value: int) -> None:
        box.add(task_id, "progress", redis_.write(f"{task_id} progress {value}"), size=100, collapses=True)

    box.add("t1", "started", redis_.write("t1 started"), size=100)
    progress("t1", 1)
    progress("t2", 1)
    progress("t1", 2)  # replaces t1's 1
    box.add("t1", "retry", redis_.write("t1 retry"), size=100)
    progress("t1", 3)  # after the retry: kept apart from 2
    progress("t1", 4)  # replaces 3
    progress("t2", 2)  # replaces t2's 1
    box.add("t1", "success", redis_.write("t1 success"), size=100)
    assert box.flush(0) is False
    assert len(box) == 6 and box.bytes == 600
    redis_.answering = True
    assert box.flush(10) is True and len(box) == 0 and box.bytes == 0 and not box.holds("t1")
    assert list(dict.fromkeys(redis_.stored)) == [
        "t1 started",
        "t1 progress 2",
        "t1 retry",
        "t1 progress 4",
        "t2 progress 2",
        "t1 success",
    ]


def test_the_outbox_drops_writes_older_than_its_ttl_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    box, redis_ = Outbox(ttl=30, clock=clock), FlakyRedis()
    box.add("t1", "started", redis_.write("t1 started"), size=100)
    box.add("t1", "success", redis_.write("t1 success"), size=100)
    clock.now += 20
    box.add("t2", "started", redis_.write("t2 started"), size=100)
    box.add("t3", "success", redis_.write("t3 success"), size=100)
    clock.now += 11  # t1's writes are 31 s old, t2's and t3's 11 s
    with caplog.at_level("WARNING", logger="progress_sse.worker.outbox"):
        assert box.flush(0) is False
        assert len(box) == 2 and box.bytes == 200 and not box.holds("t1") and box.holds("t2")
        redis_.answering = True
        assert box.flush(10) is True
    assert list(dict.fromkeys(redis_.stored)) == ["t2 started", "t3 success"]
    drops = [r.getMessage() for r in caplog.records if "dropped the" in r.getMessage()]
    assert drops == [
        "progress-sse dropped the started event of task t1: older than 30 s "
        "(further drops are not logged until Redis answers)"
    ], drops
    assert any("2 events that waited for it were dropped" in r.getMessage() for r in caplog.records)


def test_the_outbox_keeps_its_bytes_bound_by_dropping_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    box, redis_ = Outbox(max_bytes=1000), FlakyRedis()
    with caplog.at_level("WARNING", logger="progress_sse.worker.outbox"):
        for n in range(1, 6):
            box.add(f"t{n}", "success", redis_.write(f"t{n} success"), size=300)
        assert len(box) == 3 and box.bytes == 900 and not box.holds("t2") and box.holds("t3")
        box.add("t6", "success", redis_.write("t6 success"), size=950)  # alone fits: everything older goes
        assert len(box) == 1 and box.bytes == 950
        redis_.answering = True
        assert box.flush(10) is True
    assert redis_.stored[-1:] == ["t6 success"] and set(redis_.stored) == {"t6 success"}
    drops = [r.getMessage() for r in caplog.records if "dropped the" in r.getMessage()]
    assert len(drops) == 1 and "task t1" in drops[0] and "more than 1000 bytes" in drops[0], drops

"""store.py against a real Redis: where a new or resuming watcher starts, resync reads,
the recent-tasks index and the task description.

Each test writes through a real Publisher under its own key prefix below the run's
prefix, so the shared sequence and the recent index hold only what the test made.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.cursors import Foreign, Position, parse_id
from progress_sse.events import CURSOR_UNKNOWN, Frame, make_event
from progress_sse.keys import Keys
from progress_sse.web.store import Store, describe
from progress_sse.worker.publisher import Publisher


@pytest.fixture
async def store(settings: Settings, keys: Keys) -> AsyncIterator[Store]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield Store(client, keys)
    await client.aclose()


def new_task() -> str:
    return str(uuid.uuid4())


class Log:
    """Publishes through the real script and remembers each event as the Frame a reader
    should get for it."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.frames: list[Frame] = []

    def add(self, task_id: str, state: str, **kwargs: Any) -> Frame:
        payload = make_event(task_id, "demo.count", state, **kwargs)
        cursor = self.publisher.publish(payload)
        assert cursor is not None, f"{state} of {task_id} was refused"
        at = parse_id(cursor)
        frame = Frame(task_id, at.n, state, json.dumps(payload, separators=(",", ":"), ensure_ascii=False), at.epoch)
        self.frames.append(frame)
        return frame

    def of(self, task_id: str) -> list[Frame]:
        return [f for f in self.frames if f.task_id == task_id]


@pytest.fixture
def log(publisher: Publisher) -> Log:
    return Log(publisher)


async def test_start_without_cursor_gives_one_snapshot_per_known_task(store: Store, log: Log) -> None:
    a, b, unknown = new_task(), new_task(), new_task()
    log.add(a, "queued")
    log.add(b, "queued")
    log.add(a, "started")
    latest_a = log.add(a, "progress", current=2, total=5)
    latest_b = log.add(b, "success")

    start = await store.start([a, unknown, b], None)

    assert start.resumed is False
    assert start.upto == {0: latest_b.position}
    by_id = {t.task_id: t for t in start.tasks}
    assert [t.task_id for t in start.tasks] == [a, unknown, b]
    assert by_id[a].known and by_id[a].state == "progress" and not by_id[a].terminal
    assert by_id[a].frames == [latest_a]
    assert by_id[a].frames[0].seq == latest_a.seq  # the snapshot's id is the latest event's cursor
    assert by_id[b].known and by_id[b].state == "success" and by_id[b].terminal
    assert by_id[b].frames == [latest_b]
    assert by_id[unknown].known is False
    assert by_id[unknown].state is None and by_id[unknown].frames == []


async def test_start_with_cursor_gives_exactly_the_events_after_it_in_order(store: Store, log: Log) -> None:
    task_id = new_task()
    log.add(task_id, "queued")
    cursor = log.add(task_id, "started").position
    later = [log.add(task_id, "progress", current=i, total=3) for i in (1, 2, 3)]
    later.append(log.add(task_id, "success", current=3, total=3))

    start = await store.start([task_id], cursor)

    assert start.resumed is True
    assert start.upto == {0: later[-1].position}
    (task,) = start.tasks
    assert task.frames == later
    assert [f.payload()["current"] for f in task.frames] == [1, 2, 3, 3]
    assert task.terminal


async def test_start_with_cursor_at_the_latest_event_gives_nothing_more(store: Store, log: Log) -> None:
    task_id = new_task()
    log.add(task_id, "queued")
    last = log.add(task_id, "success")
    start = await store.start([task_id], last.position)
    assert start.resumed is True
    assert start.tasks[0].frames == []
    assert start.tasks[0].terminal


@pytest.mark.parametrize("kind", ["future", "other epoch", "foreign"])
async def test_a_cursor_of_no_place_in_this_history_starts_over_with_a_reset(store: Store, log: Log, kind: str) -> None:
    task_id = new_task()
    log.add(task_id, "queued")
    latest = log.add(task_id, "progress", current=1, total=2)
    assert latest.position is not None
    cursor = {
        "future": Position(latest.position.epoch, latest.seq + 1000),
        "other epoch": Position("aaaaaaaa", 1),
        "foreign": Foreign("141378"),  # an integer cursor from before epochs
    }[kind]

    start = await store.start([task_id], cursor)

    assert start.resumed is False
    assert start.reset == CURSOR_UNKNOWN
    assert start.upto == {0: latest.position}
    assert start.tasks[0].frames == [latest]


async def test_cursor_zero_replays_the_whole_history_of_the_current_epoch(store: Store, log: Log) -> None:
    task_id = new_task()
    frames = [log.add(task_id, "queued"), log.add(task_id, "started"), log.add(task_id, "success")]

    start = await store.start([task_id], Position("", 0))

    assert start.resumed is True and start.reset is None
    assert start.tasks[0].frames == frames


async def test_cursor_older_than_the_kept_history_falls_back_to_the_snapshot(
    settings: Settings, keys: Keys, store: Store, redis_client: redis.Redis
) -> None:
    client = sync_client(settings.redis_url, name=f"pst-store-test-{uuid.uuid4().hex[:8]}")
    try:
        trimmed_log = Log(Publisher(client, keys, history_max=100))
        trimmed, whole = new_task(), new_task()
        first = trimmed_log.add(trimmed, "queued")
        for i in range(300):
            trimmed_log.add(trimmed, "progress", current=i, total=300)
        trimmed_log.add(whole, "queued")
        trimmed_log.add(whole, "started")
    finally:
        client.close()
    oldest_kept = redis_client.xrange(keys.log(trimmed), count=1)[0][0]
    assert int(oldest_kept.split("-")[0]) > first.seq + 1, "the log was not trimmed: the test proves nothing"

    start = await store.start([trimmed, whole], first.position)

    assert start.resumed is True
    by_id = {t.task_id: t for t in start.tasks}
    # Events right after the cursor are gone: the current state instead, never a gap.
    assert by_id[trimmed].frames == [trimmed_log.of(trimmed)[-1]]
    # The other task's log is whole, so it still resumes exactly.
    assert by_id[whole].frames == trimmed_log.of(whole)


async def test_cursor_inside_the_kept_history_of_a_trimmed_log_still_resumes_exactly(
    settings: Settings, keys: Keys, store: Store, redis_client: redis.Redis
) -> None:
    client = sync_client(settings.redis_url, name=f"pst-store-test-{uuid.uuid4().hex[:8]}")
    try:
        trimmed_log = Log(Publisher(client, keys, history_max=100))
        task_id = new_task()
        for i in range(300):
            trimmed_log.add(task_id, "progress", current=i, total=300)
    finally:
        client.close()
    frames = trimmed_log.of(task_id)
    cursor = frames[-10].position
    assert redis_client.xlen(keys.log(task_id)) < 300

    start = await store.start([task_id], cursor)

    assert start.tasks[0].frames == frames[-9:]


async def test_frames_merges_every_task_in_cursor_order(store: Store, log: Log) -> None:
    a, b, c = new_task(), new_task(), new_task()
    log.add(a, "queued")
    first = log.add(b, "queued")
    cursor = first.position
    log.add(c, "queued")
    log.add(a, "started")
    log.add(c, "started")
    log.add(b, "started")
    log.add(a, "progress", current=1, total=2)
    log.add(c, "success")
    log.add(b, "progress", current=1, total=2)
    expected = [f for f in log.frames if f.seq > first.seq]

    resumed = await store.start([c, b, a], cursor)
    assert resumed.frames() == expected
    assert [f.seq for f in resumed.frames()] == sorted(f.seq for f in expected)

    snapshots = await store.start([c, b, a], None)
    assert snapshots.frames() == [log.of(a)[-1], log.of(c)[-1], log.of(b)[-1]]


async def test_after_returns_later_events_of_several_tasks_merged_and_the_new_position(store: Store, log: Log) -> None:
    a, b, other = new_task(), new_task(), new_task()
    log.add(a, "queued")
    log.add(b, "queued")
    mark = log.add(other, "queued")
    log.add(b, "started")
    log.add(other, "started")
    log.add(a, "started")
    log.add(a, "progress", current=1, total=2)
    last = log.add(b, "failure")
    assert mark.position is not None

    catchup = await store.after([a, b], {0: mark.position})

    assert not catchup.lost
    assert catchup.frames == [f for f in log.frames if f.seq > mark.seq and f.task_id in (a, b)]
    assert [f.seq for f in catchup.frames] == sorted(f.seq for f in catchup.frames)
    assert catchup.upto == {0: last.position}

    again = await store.after([a, b], catchup.upto)
    assert (again.frames, again.upto, again.lost) == ([], catchup.upto, False)


async def test_after_a_position_of_another_history_is_lost(store: Store, log: Log) -> None:
    task_id = new_task()
    log.add(task_id, "queued")
    catchup = await store.after([task_id], {0: Position("aaaaaaaa", 1)})
    assert catchup.lost and catchup.frames == []


async def test_a_sequence_that_went_back_is_lost_and_gets_a_new_epoch(
    store: Store, log: Log, keys: Keys, redis_client: redis.Redis
) -> None:
    """What a failover to a replica that lagged behind looks like: the same epoch, a
    lower number. The first reader to see it renames the history, so no cursor
    handed out before can pass for a place in what comes next."""
    task_id = new_task()
    log.add(task_id, "queued")
    latest = log.add(task_id, "started")
    assert latest.position is not None
    redis_client.hset(keys.history(), "n", latest.seq - 1)

    catchup = await store.after([task_id], {0: latest.position})

    assert catchup.lost
    assert redis_client.hget(keys.history(), "epoch") != latest.epoch
    following = log.add(task_id, "progress", current=1, total=2)
    assert following.epoch != latest.epoch


async def test_recent_lists_newest_first_and_honours_the_limit(store: Store, log: Log) -> None:
    now = time.time()
    tasks = [new_task() for _ in range(4)]
    for i, task_id in enumerate(tasks):
        log.add(task_id, "queued", ts=now + i)
    log.add(tasks[0], "started", ts=now + 10)  # later events do not move a task up

    listed = await store.recent(50)
    assert [t["task_id"] for t in listed] == tasks[::-1]
    assert listed[-1]["state"] == "started"

    assert [t["task_id"] for t in await store.recent(2)] == tasks[:1:-1]
    assert [t["task_id"] for t in await store.recent(1)] == [tasks[-1]]


async def test_recent_forgets_tasks_whose_state_expired(
    store: Store, log: Log, keys: Keys, redis_client: redis.Redis
) -> None:
    now = time.time()
    old, expired, new = new_task(), new_task(), new_task()
    log.add(old, "queued", ts=now)
    log.add(expired, "queued", ts=now + 1)
    log.add(new, "queued", ts=now + 2)
    redis_client.delete(keys.state(expired))  # what its TTL would do

    assert [t["task_id"] for t in await store.recent(50)] == [new, old]
    assert redis_client.zscore(keys.recent(), expired) is None
    assert redis_client.zscore(keys.recent(), old) is not None


async def test_recent_fills_the_limit_when_an_expired_task_is_among_the_newest(
    store: Store, log: Log, keys: Keys, redis_client: redis.Redis
) -> None:
    now = time.time()
    tasks = [new_task() for _ in range(3)]
    for i, task_id in enumerate(tasks):
        log.add(task_id, "queued", ts=now + i)
    redis_client.delete(keys.state(tasks[2]))  # the newest expired

    assert [t["task_id"] for t in await store.recent(2)] == [tasks[1], tasks[0]]


async def test_task_returns_the_state_hash_or_none(store: Store, log: Log) -> None:
    task_id = new_task()
    assert await store.task(task_id) is None
    frame = log.add(task_id, "queued")
    state = await store.task(task_id)
    assert state is not None
    assert state["state"] == "queued"
    assert int(state["seq"]) == frame.seq


async def test_describe_gives_the_latest_event_and_what_is_known_of_the_task(
    store: Store, publisher: Publisher
) -> None:
    task_id = new_task()
    publisher.publish(make_event(task_id, "demo.count", "queued", ts=100.0))
    publisher.publish(make_event(task_id, None, "started", ts=101.5), started_at=101.5, worker="celery@box", pid=77)
    done = make_event(task_id, None, "success", ts=103.0, current=4, total=4, result=[1, 2])
    seq = publisher.publish(done)

    state = await store.task(task_id)
    assert state is not None
    body = describe(state)

    for key in ("task_id", "state", "current", "total", "percent", "message", "ts", "result"):
        assert body[key] == done[key], key
    assert body["name"] == "demo.count"  # from the task, since the latest payload had none
    assert body["created_at"] == 100.0
    assert body["started_at"] == 101.5
    assert body["finished_at"] == 103.0
    assert body["worker"] == "celery@box"
    assert body["worker_pid"] == 77
    assert body["cursor"] == seq


async def test_describe_leaves_unknown_times_none_and_omits_unknown_worker(store: Store, log: Log) -> None:
    task_id = new_task()
    log.add(task_id, "queued", ts=50.0)
    state = await store.task(task_id)
    assert state is not None
    body = describe(state)
    assert body["state"] == "queued"
    assert body["name"] == "demo.count"
    assert body["created_at"] == 50.0
    assert body["started_at"] is None
    assert body["finished_at"] is None
    assert "worker" not in body and "worker_pid" not in body


async def test_a_read_on_another_node_names_a_new_history_before_it_hands_out_a_position(
    store: Store, log: Log, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    latest = log.add(task_id, "queued")
    assert latest.position is not None
    redis_client.hset(keys.history(), "node", "f" * 40)  # a failover to a replica that lagged, say

    catchup = await store.after([task_id], {0: latest.position})

    assert catchup.lost and catchup.upto[0].epoch != latest.epoch
    start = await store.start([task_id], latest.position)
    assert start.reset == CURSOR_UNKNOWN
    # The task's state is of the old history: sent as of the new one's first number.
    assert [(f.id, f.state) for f in start.frames()] == [(str(catchup.upto[0]), "queued")]
    assert catchup.upto[0].n == latest.seq, "the sequence carries on"
    again = await store.start([task_id], catchup.upto[0])
    assert again.resumed and again.frames() == [], "a cursor of the new history has it already"

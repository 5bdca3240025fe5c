"""publisher.py against a real Redis: one Lua round trip appends, updates and announces.

Each test gets its own key prefix below the run's prefix, so the shared sequence and
the recent-tasks index hold only what that test made (the e2e worker may publish under
the run's prefix at the same time) and the session cleanup still removes every key.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import pytest
import redis

from progress_sse.config import Settings
from progress_sse.connections import sync_client
from progress_sse.cursors import parse_id
from progress_sse.events import TERMINAL_STATES, State, dumps, make_event
from progress_sse.keys import Keys
from progress_sse.worker.publisher import Publisher

# A port nothing listens on: connection refused at once.
UNREACHABLE_URL = "redis://127.0.0.1:1/0"


def new_task() -> str:
    return str(uuid.uuid4())


def event(task_id: str, state: str, **kwargs: Any) -> dict[str, Any]:
    return make_event(task_id, "demo.count", state, **kwargs)


def test_publish_returns_increasing_cursors_shared_across_tasks(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    a, b = new_task(), new_task()
    cursors = [
        publisher.publish(event(a, "queued")),
        publisher.publish(event(b, "queued")),
        publisher.publish(event(a, "started")),
        publisher.publish(event(b, "started")),
        publisher.publish(event(a, "progress", current=1, total=2)),
    ]
    assert all(isinstance(c, str) for c in cursors), cursors
    # One sequence for every task of this prefix, and only this test publishes under it,
    # in one history whose name the first write gave it.
    epoch = redis_client.hget(keys.history(), "epoch")
    assert epoch is not None and len(epoch) == 8
    assert cursors == [f"{epoch}-{n}" for n in range(1, 6)]
    assert redis_client.hget(keys.history(), "n") == "5"
    assert [e[0] for e in redis_client.xrange(keys.log(a))] == ["1-0", "3-0", "5-0"]
    assert [e[0] for e in redis_client.xrange(keys.log(b))] == ["2-0", "4-0"]


def test_numbers_of_fifteen_digits_and_more_are_written_out_whole(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """Lua would write 10**15 as 1e+15: every place the number goes gets it whole."""
    redis_client.hset(keys.history(), "n", 10**15)
    task_id = new_task()
    cursor = publisher.publish(event(task_id, "queued"))
    assert cursor is not None and parse_id(cursor).n == 10**15 + 1
    assert [entry for entry, _ in redis_client.xrange(keys.log(task_id))] == [f"{10**15 + 1}-0"]
    assert redis_client.hget(keys.state(task_id), "seq") == str(10**15 + 1)


def test_stream_entry_id_is_the_cursor_with_state_and_json_payload_fields(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    payload = event(task_id, "progress", current=3, total=10, message="Processing item 3: ünïcode")
    cursor = publisher.publish(payload)
    assert cursor is not None
    entries = redis_client.xrange(keys.log(task_id))
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert entry_id == f"{parse_id(cursor).n}-0"
    assert set(fields) == {"s", "d"}
    assert fields["s"] == "progress"
    assert json.loads(fields["d"]) == payload


def test_state_hash_tracks_latest_event_and_what_is_known_of_the_task(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    queued = event(task_id, "queued", ts=1000.5)
    publisher.publish(queued)
    state = redis_client.hgetall(keys.state(task_id))
    assert state["state"] == "queued"
    assert state["name"] == "demo.count"
    assert float(state["created_at"]) == 1000.5
    assert "finished_at" not in state

    started = event(task_id, "started", ts=1001.0)
    seq_started = publisher.publish(started, started_at=1001.0, worker="celery@host", pid=4242)
    state = redis_client.hgetall(keys.state(task_id))
    assert state["state"] == "started"
    assert f"{state['epoch']}-{state['seq']}" == seq_started
    assert json.loads(state["latest"]) == started
    # Extra keyword fields land in the hash as they are.
    assert float(state["started_at"]) == 1001.0
    assert state["worker"] == "celery@host"
    assert state["pid"] == "4242"
    # created_at is the first event's time and is never moved by later ones.
    assert float(state["created_at"]) == 1000.5
    assert "finished_at" not in state

    done = event(task_id, "success", ts=1002.25, current=10, total=10, result=42)
    seq_done = publisher.publish(done)
    state = redis_client.hgetall(keys.state(task_id))
    assert state["state"] == "success"
    assert f"{state['epoch']}-{state['seq']}" == seq_done
    assert json.loads(state["latest"]) == done
    assert float(state["finished_at"]) == 1002.25
    assert float(state["created_at"]) == 1000.5
    assert state["worker"] == "celery@host"  # earlier fields stay


def test_publish_announces_seq_state_and_json_on_the_task_channel(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(keys.channel(task_id))
        confirmation = pubsub.get_message(timeout=2)
        assert confirmation is not None and confirmation["type"] == "subscribe"

        payload = event(task_id, "progress", current=1, total=4, message="line one\nline two")
        seq = publisher.publish(payload)
        message = pubsub.get_message(timeout=2)
    finally:
        pubsub.close()
    assert message is not None, "no PUBLISH reached the task's channel"
    assert message["type"] == "message"
    assert message["channel"] == keys.channel(task_id)
    raw_id, state, data = message["data"].split("\n", 2)
    assert raw_id == seq
    assert state == "progress"
    assert json.loads(data) == payload  # newlines inside the payload survive the split


def test_second_queued_is_refused_and_changes_nothing(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    first = event(task_id, "queued", ts=2000.0)
    seq = publisher.publish(first)
    assert seq is not None
    before = redis_client.hgetall(keys.state(task_id))

    # A Celery retry publishes the task again under the same id: it must not reopen the log.
    assert publisher.publish(event(task_id, "queued", ts=2001.0)) is None
    assert redis_client.xlen(keys.log(task_id)) == 1
    assert redis_client.hgetall(keys.state(task_id)) == before
    history = redis_client.hgetall(keys.history())
    assert f"{history['epoch']}-{history['n']}" == seq  # none used up


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_nothing_is_stored_after_a_terminal_event(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis, terminal: str
) -> None:
    task_id = new_task()
    publisher.publish(event(task_id, "started"))
    seq = publisher.publish(event(task_id, terminal))
    assert seq is not None
    before = redis_client.hgetall(keys.state(task_id))

    barrier = f"{keys.prefix}:barrier"
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(keys.channel(task_id), barrier)
        for _ in range(2):
            confirmation = pubsub.get_message(timeout=2)
            assert confirmation is not None and confirmation["type"] == "subscribe"
        for late in ("progress", "started", "retry", "queued", "success", "failure"):
            assert publisher.publish(event(task_id, late), worker="late") is None, late
        # Redis keeps publish order: any message a refused event sent would come before this one.
        redis_client.publish(barrier, "done")
        message = pubsub.get_message(timeout=2)
    finally:
        pubsub.close()
    assert message is not None and message["channel"] == barrier, f"a refused event was announced: {message}"
    assert redis_client.xlen(keys.log(task_id)) == 2
    assert redis_client.hgetall(keys.state(task_id)) == before
    assert redis_client.hget(keys.history(), "n") == str(parse_id(seq).n)


def test_both_keys_get_the_history_ttl_at_the_start_every_eighth_of_it_and_at_the_end(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    """Setting the TTL on every event costs two commands a progress event: it is set
    at a task's first event, again once an eighth of it has passed (Redis's clock,
    the `renewed` field), and at its end."""
    client = sync_client(settings.redis_url, name=f"pst-publisher-test-{uuid.uuid4().hex[:8]}")
    task_id = new_task()
    both = (keys.state(task_id), keys.log(task_id))

    def ttls() -> list[int]:
        return [redis_client.ttl(key) for key in both]

    try:
        publisher = Publisher(client, keys, history_ttl=120)
        publisher.publish(event(task_id, "queued"))
        assert all(100 < ttl <= 120 for ttl in ttls()), ttls()
        for key in both:
            redis_client.expire(key, 50)
        publisher.publish(event(task_id, "started"))
        assert all(40 < ttl <= 50 for ttl in ttls()), "within an eighth of the TTL: not set again"
        redis_client.hincrby(keys.state(task_id), "renewed", -15)  # as if 15 s (an eighth) had passed
        publisher.publish(event(task_id, "progress", current=1, total=2))
        assert all(100 < ttl <= 120 for ttl in ttls()), ttls()
        for key in both:
            redis_client.expire(key, 50)
        publisher.publish(event(task_id, "success"))
        assert all(100 < ttl <= 120 for ttl in ttls()), "an end sets it again: the keys live a whole TTL after it"
    finally:
        client.close()


def test_log_is_capped_near_history_max(settings: Settings, keys: Keys, redis_client: redis.Redis) -> None:
    client = sync_client(settings.redis_url, name=f"pst-publisher-test-{uuid.uuid4().hex[:8]}")
    task_id = new_task()
    try:
        publisher = Publisher(client, keys, history_max=100)
        last = None
        for i in range(300):
            last = publisher.publish(event(task_id, "progress", current=i, total=300))
    finally:
        client.close()
    length = redis_client.xlen(keys.log(task_id))
    # MAXLEN ~ trims whole stream nodes: at least history_max stay, far fewer than all.
    assert 100 <= length <= 200, length
    newest = redis_client.xrevrange(keys.log(task_id), count=1)
    assert newest[0][0] == f"{parse_id(last).n}-0"  # the cap drops the oldest, never the newest
    assert redis_client.hget(keys.state(task_id), "events") == "300"


def test_recent_index_gets_the_task_once_scored_by_its_first_event(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    now = time.time()
    task_id = new_task()
    publisher.publish(event(task_id, "queued", ts=now))
    publisher.publish(event(task_id, "started", ts=now + 1))
    publisher.publish(event(task_id, "progress", ts=now + 2, current=1, total=2))
    publisher.publish(event(task_id, "success", ts=now + 3))
    assert redis_client.zrange(keys.recent(), 0, -1, withscores=True) == [(task_id, pytest.approx(now, abs=1e-3))]


def test_discard_removes_the_task_keys_and_index_entry_only(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    gone, kept = new_task(), new_task()
    publisher.publish(event(gone, "queued"))
    publisher.publish(event(kept, "queued"))
    publisher.discard(gone)
    assert redis_client.exists(keys.state(gone), keys.log(gone)) == 0
    assert redis_client.zscore(keys.recent(), gone) is None
    assert redis_client.exists(keys.state(kept), keys.log(kept)) == 2
    assert redis_client.zscore(keys.recent(), kept) is not None
    # Forgotten, the id can be queued again from scratch.
    assert publisher.publish(event(gone, "queued")) is not None


def test_publish_quietly_returns_none_when_redis_is_unreachable(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    client = sync_client(UNREACHABLE_URL, name="pst-unreachable")
    try:
        publisher = Publisher(client, keys)
        task_id = new_task()
        with caplog.at_level(logging.WARNING, logger="progress_sse.worker.publisher"):
            assert publisher.publish_quietly(event(task_id, "progress", current=1, total=2)) is None
        with pytest.raises(redis.ConnectionError):
            publisher.publish(event(task_id, "progress", current=1, total=2))
        assert publisher.latest(task_id) is None  # reads do not raise either
    finally:
        client.close()
    assert any(task_id in r.getMessage() for r in caplog.records), "the failure was not logged"


def test_publish_quietly_returns_the_cursor_when_redis_answers(publisher: Publisher, keys: Keys) -> None:
    task_id = new_task()
    cursor = publisher.publish_quietly(event(task_id, "queued"))
    assert cursor is not None and parse_id(cursor).n >= 1
    assert publisher.publish_quietly(event(task_id, "queued")) is None  # refused, quietly


def test_latest_returns_the_last_stored_payload(publisher: Publisher) -> None:
    task_id = new_task()
    assert publisher.latest(task_id) is None
    publisher.publish(event(task_id, "queued"))
    last = event(task_id, "progress", current=7, total=10, message="seven")
    publisher.publish(last)
    assert publisher.latest(task_id) == last
    publisher.publish(event(task_id, "success", current=10, total=10))
    refused = event(task_id, "progress", current=11, total=10)
    publisher.publish(refused)
    latest = publisher.latest(task_id)
    assert latest is not None and latest["state"] == "success"


def test_a_retried_write_is_stored_once(publisher: Publisher, keys: Keys, redis_client: redis.Redis) -> None:
    """redis-py resends a command whose reply was lost; the same event id is a no-op."""
    task_id = new_task()
    publisher.publish(event(task_id, "queued"))
    payload = event(task_id, "started")
    args = [
        keys.channel(task_id),
        task_id,
        "started",
        dumps(payload),
        60,
        100,
        payload["ts"],
        "same-event-id",
        "",
        "aaaaaaaa",
        1000,
        100,
        "demo",
        keys.feed_channel(),
    ]
    script_keys = [
        keys.state(task_id),
        keys.log(task_id),
        keys.history(),
        keys.recent(),
        keys.queued(),
        keys.feed_log(),
        keys.stats(),
    ]
    first = publisher._append(keys=script_keys, args=args)
    again = publisher._append(keys=script_keys, args=args)
    assert first == again
    assert [f["s"] for _, f in redis_client.xrange(keys.log(task_id))] == ["queued", "started"]


def test_text_that_is_not_valid_unicode_is_still_stored(publisher: Publisher) -> None:
    name = "caf\udce9.csv"  # os.fsdecode(b"caf\\xe9.csv"): a lone surrogate
    task_id = new_task()
    publisher.publish(event(task_id, "started"))
    assert publisher.publish(event(task_id, "failure", message=f"cannot import {name}")) is not None
    assert publisher.latest(task_id)["message"] == f"cannot import {name}"


def test_finish_carries_the_last_stored_counts_and_the_name(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    task_id = new_task()
    publisher.publish(make_event(task_id, "demo.count", State.STARTED))
    publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=3, total=8))
    publisher.task_running(task_id, "w@host", "i1")
    assert publisher.finish(task_id, None, State.LOST, message="gone") is not None
    latest = publisher.latest(task_id)
    assert latest is not None
    assert (latest["state"], latest["name"], latest["current"], latest["total"]) == ("lost", "demo.count", 3, 8)
    assert latest["message"] == "gone"
    assert redis_client.hget(keys.running, task_id) is None, "no longer running"


def test_finish_fills_a_determinate_bar_on_success_and_prefers_the_callers_counts(publisher: Publisher) -> None:
    task_id = new_task()
    publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=8))
    publisher.finish(task_id, "demo.count", State.SUCCESS, counts=(7, 8), result=42)
    latest = publisher.latest(task_id)
    assert latest is not None
    assert (latest["current"], latest["total"], latest["result"]) == (8, 8, 42)


def test_finish_of_an_indeterminate_task_keeps_its_count_and_unknown_total(publisher: Publisher) -> None:
    task_id = new_task()
    publisher.publish(make_event(task_id, "t", State.PROGRESS, current=5, total=None))
    publisher.finish(task_id, "t", State.SUCCESS)
    latest = publisher.latest(task_id)
    assert latest is not None
    assert (latest["current"], latest["total"]) == (5, None)


def test_a_second_finish_is_refused_and_changes_nothing(publisher: Publisher) -> None:
    task_id = new_task()
    publisher.publish(make_event(task_id, "t", State.STARTED))
    assert publisher.finish(task_id, "t", State.SUCCESS) is not None
    assert publisher.finish(task_id, "t", State.REVOKED, message="Task revoked", reason="revoked") is None
    latest = publisher.latest(task_id)
    assert latest is not None and latest["state"] == "success"


def test_a_history_whose_numbers_another_node_gave_out_gets_a_new_name(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """A failover or a restart: Redis gives the node a new replication id, and it
    may have lost the last numbers handed out. So the first write there names a new
    history, and the numbers carry on (src/progress_sse/history.py)."""
    task_id = new_task()
    first = publisher.publish(event(task_id, "queued"))
    assert first is not None
    node = redis_client.hget(keys.history(), "node")
    assert node is not None and len(node) == 40, "the hash records the node that gives out numbers"
    redis_client.hset(keys.history(), "node", "f" * 40)

    second = publisher.publish(event(task_id, "started"))
    third = publisher.publish(event(task_id, "progress", current=1, total=2))
    assert second is not None and third is not None
    assert parse_id(second).epoch != parse_id(first).epoch
    assert parse_id(second).n == parse_id(first).n + 1
    assert parse_id(third).epoch == parse_id(second).epoch, "named once"
    assert redis_client.hget(keys.history(), "node") == node
    assert [f["s"] for _, f in redis_client.xrange(keys.log(task_id))] == ["queued", "started", "progress"]


def test_a_log_numbered_by_a_lost_sequence_is_started_over(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """The history's hash alone was lost (evicted, deleted): numbers start over
    while a task's log keeps entries numbered by the old sequence. Its next event
    starts its log over, or a reader would serve old entries as new ones."""
    task_id, other = new_task(), new_task()
    publisher.publish(event(task_id, "queued"))
    publisher.publish(event(task_id, "started"))
    redis_client.delete(keys.history())
    for i in range(4):  # the new sequence passes the task's old numbers
        publisher.publish(event(other, "progress" if i else "queued", current=i, total=9))

    cursor = publisher.publish(event(task_id, "progress", current=1, total=2))

    assert cursor is not None and parse_id(cursor).n == 5
    assert [(entry_id, f["s"]) for entry_id, f in redis_client.xrange(keys.log(task_id))] == [("5-0", "progress")]
    assert redis_client.hget(keys.state(task_id), "events") == "1"

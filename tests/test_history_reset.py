"""A lost event history never leaves a stream silent and never skips an event
without a `reset` frame (docs/protocol.md, "Reset: when the history is lost").

The first tests lose the history by hand, on the shared Redis under keys of their
own: what a restart without data leaves. The last one restarts a redis-server of
its own without persistence under a real worker and real streams.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from progress_sse.config import Settings
from progress_sse.cursors import Position, parse_id
from progress_sse.events import CURSOR_UNKNOWN, HISTORY_LOST, State, make_event
from progress_sse.keys import Keys
from progress_sse.worker.publisher import Publisher

from .conftest import Server, worker_rig
from .redis_servers import RestartableRedis, wait_for
from .sse import SSEReader, follow

WAIT = 10.0  # an upper bound for what we wait on; a pass never waits this long


def new_task() -> str:
    return str(uuid.uuid4())


def publish(publisher: Publisher, task_id: str, state: str, **kwargs: Any) -> str:
    cursor = publisher.publish(make_event(task_id, "demo.count", state, **kwargs))
    assert cursor is not None, f"{state} of {task_id} was refused"
    return cursor


def lose_everything(redis_client: redis.Redis, keys: Keys, task_ids: list[str]) -> None:
    """What a Redis restart without persistence leaves of these keys: nothing."""
    redis_client.delete(keys.history(), keys.recent(), *(key for t in task_ids for key in (keys.state(t), keys.log(t))))


async def test_an_open_stream_resets_then_sends_current_states_then_goes_on_live(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    running, quiet, gone = new_task(), new_task(), new_task()
    for task_id in (running, quiet, gone):
        publish(publisher, task_id, "queued")
        publish(publisher, task_id, "started")
    old = parse_id(publish(publisher, running, "progress", current=1, total=4))

    url = server.url(f"/events?task={running}&task={quiet}&task={gone}")
    async with server.session.get(url) as resp:
        reader = SSEReader(resp)
        before = await reader.until(lambda e: e.id == str(old))
        assert {e.payload["task_id"] for e in before} == {running, quiet, gone}

        lose_everything(redis_client, keys, [running, quiet, gone])
        # `quiet` was written again before anything else (a worker's outbox), `running`'s
        # worker reports on; `gone` had ended, and its end was lost with the history.
        publish(publisher, quiet, "progress", current=5, total=10)
        live = parse_id(publish(publisher, running, "progress", current=2, total=4))
        assert live.epoch != old.epoch and live.n < old.n, "the test needs a history that started over"

        reset = await reader.next_event(WAIT)
        assert reset is not None and reset.event == "reset", reset
        body = reset.payload
        assert body["reason"] == HISTORY_LOST and body["message"]
        assert body["missing"] == [gone], "the task with no state now is named, and still watched"
        assert reset.id == str(old), "a reset frame has no id: the cursor stays until the states"

        states = await reader.until(lambda e: e.payload["task_id"] == running and e.payload["current"] == 2)
        assert {e.payload["task_id"]: e.payload["current"] for e in states} == {quiet: 5, running: 2}
        assert all(parse_id(str(e.id)).epoch == live.epoch for e in states)

        publish(publisher, running, "success", current=4, total=4)
        publish(publisher, quiet, "success", current=10, total=10)
        ended = await reader.until(lambda e: e.terminal and e.payload["task_id"] == quiet)
        assert [(e.event, e.payload["task_id"]) for e in ended] == [("success", running), ("success", quiet)]

        # `gone` is still watched: were its worker still running it, its end arrives.
        publish(publisher, gone, "failure")
        last = await reader.next_event(WAIT)
        assert last is not None and (last.event, last.payload["task_id"]) == ("failure", gone)
        assert await reader.next_event(WAIT) is None, "every task ended: so does the stream"


async def test_a_cursor_of_a_lost_history_gets_a_reset_never_a_skip(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """The client was away while the history was lost and the new sequence passed
    its cursor: resuming from the number would skip events; it gets a reset."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    task_id, other = new_task(), new_task()
    publish(publisher, task_id, "queued")
    old = parse_id(publish(publisher, task_id, "started"))
    lose_everything(redis_client, keys, [task_id])
    publish(publisher, task_id, "progress", current=1, total=9)  # its worker reports on
    for i in range(old.n + 2):  # the new sequence passes the old cursor
        publish(publisher, other, "progress" if i else "queued", current=i, total=100)
    newest = parse_id(publish(publisher, task_id, "progress", current=2, total=9))
    assert newest.epoch != old.epoch and newest.n > old.n

    for cursor in (str(old), str(Position(old.epoch, newest.n)), "141378"):
        async with server.session.get(
            server.url(f"/tasks/{task_id}/events"), headers={"Last-Event-ID": cursor}
        ) as resp:
            assert resp.status == 200
            reader = SSEReader(resp)
            reset = await reader.next_event(WAIT)
            assert reset is not None and reset.event == "reset", (cursor, reset)
            assert reset.payload["reason"] == CURSOR_UNKNOWN and reset.payload["missing"] == []
            state = await reader.next_event(WAIT)
            assert state is not None and state.id == str(newest), (cursor, state)
            assert state.payload["current"] == 2


async def test_a_lost_task_s_stream_with_an_old_cursor_waits_for_it_instead_of_a_404(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    task_id = new_task()
    publish(publisher, task_id, "queued")
    old = publish(publisher, task_id, "started")
    lose_everything(redis_client, keys, [task_id])

    async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers={"Last-Event-ID": old}) as resp:
        assert resp.status == 200, "a 404 would end the EventSource of a task that may still run"
        reader = SSEReader(resp)
        reset = await reader.next_event(WAIT)
        assert reset is not None and reset.event == "reset" and reset.payload["missing"] == [task_id]
        publish(publisher, task_id, "progress", current=3, total=4)
        publish(publisher, task_id, "success", current=4, total=4)
        assert [e.event for e in await reader.rest(WAIT)] == ["progress", "success"]

    async with server.session.get(server.url(f"/tasks/{new_task()}/events")) as resp:
        assert resp.status == 404, "without a cursor an unknown task is still unknown"


async def test_a_task_missing_since_a_reset_stays_watched_when_the_client_reconnects(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """After the reset the client's cursor moved into the new history (another
    task's state); the missing task has still no state when it reconnects. It
    is not `unknown` (the client would stop following it): it is still watched."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    running, missing = new_task(), new_task()
    for task_id in (running, missing):
        publish(publisher, task_id, "started")
    url = server.url(f"/events?task={running}&task={missing}")
    async with server.session.get(url) as resp:
        reader = SSEReader(resp)
        await reader.until(lambda e: e.payload["task_id"] == missing)
        lose_everything(redis_client, keys, [running, missing])
        publish(publisher, running, "progress", current=1, total=2)
        reset, state = await reader.until(lambda e: e.event == "progress")
        assert reset.event == "reset" and reset.payload["missing"] == [missing]
    cursor = str(state.id)
    assert parse_id(cursor).epoch != parse_id(str(reset.id)).epoch

    async with server.session.get(url, headers={"Last-Event-ID": cursor}) as resp:
        reader = SSEReader(resp)
        assert await reader.next_comment() == "ping"
        publish(publisher, missing, "progress", current=7, total=9)
        frame = await reader.next_event(WAIT)
        assert frame is not None and (frame.event, frame.payload["task_id"]) == ("progress", missing), frame


async def test_a_state_kept_from_an_older_history_ends_its_client_s_reconnects_with_204(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """A restart that kept its data begins a new history, but the finished task's
    state is the old one's: it is sent with the new history's first number, so an
    EventSource that reconnects with it gets 204, not the same end again."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    task_id = new_task()
    publish(publisher, task_id, "started")
    old = publish(publisher, task_id, "success")
    redis_client.hset(keys.history(), "node", "f" * 40)  # what a restart looks like from here

    url = server.url(f"/tasks/{task_id}/events")
    async with server.session.get(url, headers={"Last-Event-ID": old}) as resp:
        frames = await SSEReader(resp).rest(WAIT)
    assert [e.event for e in frames] == ["reset", "success"]
    kept = parse_id(str(frames[1].id))
    assert kept.epoch != parse_id(old).epoch and kept.n == parse_id(old).n, "the history began at the old number"
    async with server.session.get(url, headers={"Last-Event-ID": str(kept)}) as resp:
        assert resp.status == 204, "EventSource would reconnect for ever"


async def test_a_task_that_expired_in_an_old_history_is_not_watched_for_ever(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """With a cursor of the current history, a task with no state is taken for one
    lost with the history before only while that history is younger than a task's
    keys live; after that it simply expired: 404, as without a cursor."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix, history_ttl=60))
    task_id, other = new_task(), new_task()
    cursor = publish(publisher, other, "started")
    url = server.url(f"/tasks/{task_id}/events")
    born = int(redis_client.hget(keys.history(), "born") or 0)
    redis_client.hset(keys.history(), "born", born - 61)
    async with server.session.get(url, headers={"Last-Event-ID": cursor}) as resp:
        assert resp.status == 404
    redis_client.hset(keys.history(), "born", born)
    async with server.session.get(url, headers={"Last-Event-ID": cursor}) as resp:
        assert resp.status == 200, "in a young history it may be a task whose history was lost: watched"


async def test_a_group_stream_resets_and_sends_its_aggregate_again(
    make_server: Any, settings: Settings, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    group, members = new_task(), [new_task(), new_task()]
    for task_id in members:
        publisher.join_group(group, task_id)
        publish(publisher, task_id, "queued")
    publish(publisher, members[0], "started")

    async with server.session.get(server.url(f"/groups/{group}/events")) as resp:
        reader = SSEReader(resp)
        first = await reader.next_event(WAIT)
        assert first is not None and first.event == "group"
        lose_everything(redis_client, keys, members)  # the group's own set survives here
        publish(publisher, members[0], "progress", current=1, total=2)
        reset = await reader.next_event(WAIT)
        assert reset is not None and reset.event == "reset", reset
        assert reset.payload["missing"] == [members[1]]
        again = await reader.next_event(WAIT)
        assert again is not None and again.event == "group"
        assert parse_id(str(again.id)).epoch != parse_id(str(first.id)).epoch


# --- a real restart ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.fault
@pytest.mark.timeout(180)
async def test_a_redis_restart_without_data_resets_every_open_stream_and_they_follow_to_the_end(
    forgetful_redis: RestartableRedis, make_server: Any, settings: Settings, output_dir: Path
) -> None:
    """Tasks run, browsers watch, Redis restarts empty (what left every browser on
    a stale bar before epochs). Every client must get a reset, then the tasks'
    states, then live frames to each task's end; and a client that comes back
    later with a cursor of the old history gets a reset, even once the new
    sequence has passed that number."""
    # The broker stays up (the shared Redis, a queue of this test's own): only the
    # event history is lost, and the worker runs its tasks on.
    queue = f"{settings.queue}-reset-{uuid.uuid4().hex[:6]}"
    own = settings.with_(redis_url=forgetful_redis.url, queue=queue)
    keys = Keys(own.key_prefix)
    log_path = output_dir / "history-reset-worker.log"
    with worker_rig(own, log_path) as (worker, publisher, _, reads):
        await asyncio.to_thread(worker.wait_ready)
        server: Server = await make_server(own)
        tasks = [await server.start_task("demo.count", n=40, delay=0.2) for _ in range(2)]
        watched = [tasks, tasks[:1], tasks[1:], tasks]
        paths = [
            f"/events?task={tasks[0]}&task={tasks[1]}",
            f"/tasks/{tasks[0]}/events",
            f"/tasks/{tasks[1]}/events",
            "/feed?name=demo.count",  # the all-tasks feed: the same reset, from its own log
        ]
        clients = [
            asyncio.create_task(follow(server.session, server.url(path), mine))
            for path, mine in zip(paths, watched, strict=True)
        ]

        def running() -> bool:
            return all(reads.hget(keys.state(t), "state") == State.PROGRESS for t in tasks)

        await asyncio.to_thread(wait_for, running, 30, "both tasks to run", worker.process)
        old_epoch = reads.hget(keys.history(), "epoch")
        forgetful_redis.kill()
        forgetful_redis.start()

        seen = await asyncio.gather(*clients)
        for client, frames, mine in zip(paths, seen, watched, strict=True):
            names = [e.event for e in frames]
            assert "reset" in names, (client, names)
            first_reset = names.index("reset")
            last_reset = len(names) - 1 - names[::-1].index("reset")
            assert all(parse_id(str(e.id)).epoch == old_epoch for e in frames[:first_reset]), names
            after = frames[last_reset + 1 :]
            assert after and all(parse_id(str(e.id)).epoch != old_epoch for e in after if e.id)
            for task_id in mine:
                its = [e for e in after if e.payload["task_id"] == task_id]
                assert its and its[-1].event == "success", (task_id, [e.event for e in its])
                assert its[-1].payload["result"] == {"processed": 40}

        # Later, with the last cursor of the old history, once the new one passed it.
        frames = seen[0]
        old = parse_id(str(frames[[e.event for e in frames].index("reset")].id))  # a reset keeps the last id
        while int(reads.hget(keys.history(), "n") or 0) <= old.n:
            publish(publisher, new_task(), "queued")
        async with server.session.get(
            server.url(f"/tasks/{tasks[0]}/events"), headers={"Last-Event-ID": str(old)}
        ) as resp:
            reset, end = await SSEReader(resp).rest(WAIT)
        assert (reset.event, reset.payload["reason"]) == ("reset", CURSOR_UNKNOWN)
        assert end.event == "success" and parse_id(str(end.id)).epoch != old.epoch

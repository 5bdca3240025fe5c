"""The all-tasks feed (`GET /feed`) end to end: tasks nobody named appear, resume is
exactly once, the name filter, progress within its rate, a trimmed log, tokens."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from progress_sse.config import Settings
from progress_sse.connections import hub_client_name
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.tokens import feed_token, operator_token, watch_token
from progress_sse.worker.publisher import Publisher

from .conftest import Server, kill_connections
from .sse import SSEEvent, SSEReader, own

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends, pytest.mark.usefixtures("worker")]

SECRET = "the-feed-test-secret-is-long-enough-too"


def of(task_ids: set[str]) -> Callable[[SSEEvent], bool]:
    return lambda e: e.event != "reset" and e.payload.get("task_id") in task_ids


async def start_as(server: Server, token: str, name: str, **kwargs: Any) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with server.session.post(
        server.url("/tasks"), json={"name": name, "kwargs": kwargs}, headers=headers
    ) as resp:
        assert resp.status == 202
        return str((await resp.json())["id"])


def ended(task_ids: set[str]) -> Callable[[list[SSEEvent]], bool]:
    return lambda events: {e.payload["task_id"] for e in events if e.terminal} >= task_ids


async def read_until(reader: SSEReader, task_ids: set[str], done: Callable[[list[SSEEvent]], bool]) -> list[SSEEvent]:
    """The feed's frames of `task_ids`, until `done` holds for them."""
    got: list[SSEEvent] = []
    while not done(got):
        event = await reader.next_event(timeout=30)
        assert event is not None, "the feed ended"
        if of(task_ids)(event):
            got.append(event)
    return got


def per_task(events: list[SSEEvent]) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    found: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for e in events:
        found.setdefault(e.payload["task_id"], []).append((str(e.event), own(e.id)))
    return found


async def whole_feed(server: Server, task_ids: set[str]) -> list[SSEEvent]:
    """Every kept feed entry of these tasks: the feed read from the start (`0`)."""
    async with server.session.get(server.url("/feed"), headers={"Last-Event-ID": "0"}) as resp:
        assert resp.status == 200
        return await read_until(SSEReader(resp), task_ids, ended(task_ids))


async def test_a_task_nobody_named_appears_with_every_change_of_state(server: Server) -> None:
    async with server.session.get(server.url("/feed")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        reader = SSEReader(resp)
        task_id = await server.start_task("demo.count", n=3, delay=0.01)
        events = await read_until(reader, {task_id}, ended({task_id}))
    states = [e.event for e in events]
    assert states[0] == "queued" and states[1] == "started" and states[-1] == "success"
    assert set(states[2:-1]) <= {"progress"}
    assert {e.payload["name"] for e in events} == {"demo.count"}
    ids = [own(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_a_feed_without_a_cursor_starts_with_the_newest_states(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=2, delay=0.01)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        await SSEReader(resp).rest()
    async with server.session.get(server.url("/feed?name=demo.count")) as resp:
        first = await read_until(SSEReader(resp), {task_id}, lambda got: bool(got))
    assert [(e.event, e.payload["current"]) for e in first] == [("success", 2)]


async def test_resuming_the_feed_gets_every_entry_once(server: Server) -> None:
    async with server.session.get(server.url("/feed")) as resp:
        reader = SSEReader(resp)
        ids = {await server.start_task("demo.count", n=30, delay=0.05) for _ in range(2)}
        # Cut while the tasks run: both queued, one started (the other may wait for a free worker).
        before = await read_until(reader, ids, lambda got: any(e.event == "started" for e in got))
    cursor = before[-1].id
    async with server.session.get(server.url("/feed"), headers={"Last-Event-ID": str(cursor)}) as resp:
        assert resp.status == 200
        after = await read_until(SSEReader(resp), ids, lambda got: ended(ids)(before + got))
    assert not ended(ids)(before), "the cut must come before the tasks end"
    assert per_task(before + after) == per_task(await whole_feed(server, ids))


async def test_the_name_filter_shows_the_names_and_prefixes_asked_for(server: Server, settings: Settings) -> None:
    async with (
        server.session.get(server.url("/feed?name=demo.fail")) as exact,
        server.session.get(server.url("/feed?name=demo.")) as prefix,
        server.session.get(server.url("/feed?name=reports.,mail.send")) as none,
    ):
        counted = await server.start_task("demo.count", n=2, delay=0.01)
        failed = await server.start_task("demo.fail", after=1, delay=0.01)
        both = {counted, failed}
        shown = await read_until(SSEReader(prefix), both, ended(both))
        only = await read_until(SSEReader(exact), both, ended({failed}))
        # The third feed shows neither: the first task it shows is one of its names, sent after both ended.
        marker = f"feed-marker-{time.time_ns()}"
        Publisher.from_settings(settings).publish(make_event(marker, "mail.send", State.QUEUED))
        other = await SSEReader(none).until(lambda e: e.payload.get("task_id") == marker)
    assert {e.payload["task_id"] for e in other if e.event != "notice"} == {marker}
    assert {e.payload["task_id"] for e in shown} == both
    assert {e.payload["task_id"] for e in only} == {failed}
    assert only[-1].event == "failure"


@pytest.mark.parametrize("name", [",".join(f"n{i}" for i in range(51)), ".hidden", "x" * 201, "a\tb"])
async def test_a_malformed_name_filter_is_a_400(server: Server, name: str) -> None:
    async with server.session.get(server.url("/feed"), params={"name": name}) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()


def feed_entries(client: redis.Redis, keys: Keys, task_id: str) -> list[dict[str, Any]]:
    log = client.xrange(keys.feed_log(keys.partition_of(task_id)))
    return [fields for _, fields in log if fields["t"] == task_id]


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, which the write script's interval is measured on."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


async def test_progress_reaches_the_feed_at_most_once_an_interval(redis_client: redis.Redis, keys: Keys) -> None:
    interval = 0.1
    publisher = Publisher(redis_client, keys, feed_interval=interval)
    task_id = f"feed-rate-{time.time_ns()}"
    publisher.publish(make_event(task_id, "demo.rate", State.STARTED))
    started = redis_now(redis_client)
    sent = 0
    # Progress as fast as it goes, for at least five intervals (Redis's clock).
    while sent < 100 or redis_now(redis_client) - started < 5 * interval:
        sent += 1
        publisher.publish(make_event(task_id, "demo.rate", State.PROGRESS, current=sent, total=10**9))
    spent = redis_now(redis_client) - started
    publisher.publish(make_event(task_id, "demo.rate", State.SUCCESS, current=sent, total=10**9))
    entries = feed_entries(redis_client, keys, task_id)
    assert [e["s"] for e in entries if e["s"] != "progress"] == ["started", "success"]
    fed = [json.loads(e["d"])["current"] for e in entries if e["s"] == "progress"]
    # The first progress goes at once; after it, one each full interval at most, and at
    # least one in most of the intervals the progress went on (a loaded machine may stall).
    assert fed[0] == 1, "the first progress is not held back by `started`"
    assert len(fed) <= spent / interval + 1, (len(fed), spent)
    assert len(fed) >= int(spent / interval) // 2, (len(fed), spent)
    assert len(redis_client.xrange(keys.log(task_id))) == sent + 2, "the task's own log keeps every event"


async def test_a_cursor_the_trimmed_feed_no_longer_reaches_gets_a_reset(
    make_server: Callable[..., Any], settings: Settings, redis_client: redis.Redis
) -> None:
    own_settings = settings.with_(key_prefix=f"{settings.key_prefix}-trim", feed_max=10)
    publisher = Publisher.from_settings(own_settings)
    server: Server = await make_server(own_settings)
    keys = publisher.keys
    first = f"trim-first-{time.time_ns()}"
    assert publisher.publish(make_event(first, "demo.trim", State.QUEUED)) is not None
    async with server.session.get(server.url("/tasks/" + first)) as resp:
        old = (await resp.json())["cursor"]
    # Enough entries in its partition that the approximate trim (whole nodes of 100) removes it.
    same = (f"trim-{i}" for i in range(100_000) if keys.partition_of(f"trim-{i}") == keys.partition_of(first))
    for task_id in itertools.islice(same, 400):
        publisher.publish(make_event(task_id, "demo.trim", State.QUEUED))
    async with server.session.get(server.url("/feed"), headers={"Last-Event-ID": old}) as resp:
        reader = SSEReader(resp)
        reset = await reader.next_event()
        states = [await reader.next_event() for _ in range(3)]
    assert reset is not None and reset.event == "reset"
    assert reset.payload["reason"] == "feed_trimmed"
    assert all(e is not None and e.event == "queued" for e in states)
    # `0` asks for every entry still kept, however many went: no reset for that.
    kept = [fields["t"] for _, fields in redis_client.xrange(keys.feed_log(keys.partition_of(first)))]
    assert first not in kept
    async with server.session.get(server.url("/feed"), headers={"Last-Event-ID": "0"}) as resp:
        replay = await SSEReader(resp).until(lambda e: e.payload.get("task_id") == kept[-1])
    assert [e.payload["task_id"] for e in replay if e.event == "queued"][-len(kept) :] == kept
    assert "reset" not in [e.event for e in replay]


async def test_the_feed_needs_an_operator_or_a_feed_scope(make_server: Callable[..., Any], settings: Settings) -> None:
    server: Server = await make_server(settings.with_(secret=SECRET))

    async def status(query: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with server.session.get(server.url(f"/feed{query}"), headers=headers) as resp:
            if resp.status != 200:
                assert "error" in await resp.json()
            return resp.status

    assert await status("", None) == 401
    assert await status("", watch_token(["some-task"], key=SECRET)) == 403
    scoped = feed_token(["demo."], key=SECRET)
    assert await status("?name=demo.count", scoped) == 200
    assert await status("?name=demo.", scoped) == 200
    assert await status("?name=reports.", scoped) == 403
    assert await status("", operator_token(key=SECRET)) == 200

    # With no filter asked for, a scoped token sees its scope's names.
    narrow = feed_token(["demo.fail"], key=SECRET)
    async with server.session.get(server.url("/feed"), headers={"Authorization": f"Bearer {narrow}"}) as resp:
        reader = SSEReader(resp)
        counted = await start_as(server, operator_token(key=SECRET), "demo.count", n=1, delay=0.01)
        failed = await start_as(server, operator_token(key=SECRET), "demo.fail", after=1, delay=0.01)
        shown = await read_until(reader, {counted, failed}, ended({failed}))
    assert {e.payload["task_id"] for e in shown} == {failed}


async def test_a_narrow_filter_moves_past_what_it_does_not_show(
    make_server: Callable[..., Any], settings: Settings, redis_client: redis.Redis
) -> None:
    """A filter that shows one task among many others: its place (and its client's
    cursor, by an `id:` alone) moves past the others, so neither a resync nor a
    reconnect after the capped log moved on takes it for a trimmed one."""
    own_settings = settings.with_(key_prefix=f"{settings.key_prefix}-narrow", feed_max=10)
    publisher = Publisher.from_settings(own_settings)
    server: Server = await make_server(own_settings)
    keys = publisher.keys
    partition = keys.partition_of("rare-0")
    others = (f"other-{i}" for i in range(1_000_000) if keys.partition_of(f"other-{i}") == partition)
    rares = (f"rare-{i}" for i in range(1_000_000) if keys.partition_of(f"rare-{i}") == partition)

    def publish_others(count: int) -> None:  # enough that the approximate trim (nodes of 100) drops some
        for task_id in itertools.islice(others, count):
            publisher.publish(make_event(task_id, "other.task", State.QUEUED))

    async with server.session.get(server.url("/feed?name=rare.")) as resp:
        reader = SSEReader(resp)
        first = next(rares)
        publisher.publish(make_event(first, "rare.task", State.QUEUED))
        shown = await reader.until(lambda e: e.event == "queued")
        publish_others(400)
        # The client's cursor moves past them, with no event.
        passed = await reader.cursor_moves(lambda cursor: own(cursor)[1] > own(shown[-1].id)[1] + 300)
        # A resync (the subscriber connection dropped) reads from past them: no reset.
        assert kill_connections(redis_client, hub_client_name(own_settings.key_prefix)) == keys.partitions
        second = next(rares)
        publisher.publish(make_event(second, "rare.task", State.QUEUED))
        after_resync = await reader.until(lambda e: e.payload.get("task_id") == second)
        assert [e.event for e in after_resync] == ["queued"], "no reset for what it never showed"
        # And a reconnect with the cursor it has once more passed others: no reset either.
        mark = own(after_resync[-1].id)[1]
        publish_others(400)
        cursor = await reader.cursor_moves(lambda at: own(at)[1] > mark + 300)
    third = next(rares)
    publisher.publish(make_event(third, "rare.task", State.QUEUED))
    async with server.session.get(server.url("/feed?name=rare."), headers={"Last-Event-ID": cursor}) as resp:
        resumed = await SSEReader(resp).until(lambda e: e.payload.get("task_id") == third)
    assert [(e.event, e.payload["task_id"]) for e in resumed if e.event != "notice"] == [("queued", third)]
    assert own(passed)[1] > own(shown[-1].id)[1]

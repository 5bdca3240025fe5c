"""The event streams end to end: resume, 204, many tasks on one stream, disconnects,
a killed subscriber connection, heartbeats and shutdown."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
import redis
from aiohttp import web

from progress_sse.config import Settings
from progress_sse.connections import hub_client_name, keys_for, sync_client
from progress_sse.events import State, make_event
from progress_sse.web import HUB, delivery
from progress_sse.worker.publisher import Publisher

from .conftest import Server, kill_connections, subscribers, wait_until
from .sse import SSEEvent, SSEReader, beyond, covered, numbers, own

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends, pytest.mark.usefixtures("worker")]


async def history(server: Server, task_id: str) -> list[SSEEvent]:
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        assert resp.status == 200
        return await SSEReader(resp).rest()


async def events_after(server: Server, task_id: str, cursor: str | None) -> list[tuple[int, int]]:
    """The task's stored events after `cursor` (`own`: the same on every stream),
    from its full history."""
    found = [own(e.id) for e in await history(server, task_id)]
    return [(p, n) for p, n in found if cursor is None or n > covered(cursor, p)]


def progressed(at_least: int) -> Any:
    return lambda e: e.event == "progress" and e.payload["current"] >= at_least


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_after_cursor_gets_each_later_event_once(server: Server, how: str) -> None:
    task_id = await server.start_task("demo.count", n=20, delay=0.05)
    url = server.url(f"/tasks/{task_id}/events")
    async with server.session.get(url) as resp:
        first = await SSEReader(resp).until(progressed(3))
    cursor = str(first[-1].id)

    if how == "header":
        request = server.session.get(url, headers={"Last-Event-ID": cursor})
    else:
        request = server.session.get(f"{url}?last_event_id={cursor}")
    async with request as resp:
        assert resp.status == 200
        second = await SSEReader(resp).rest()

    assert second[-1].event == "success"
    assert [own(e.id) for e in second] == await events_after(server, task_id, cursor)


async def test_last_event_id_header_wins_over_query(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=3, delay=0.01)
    full = await history(server, task_id)
    middle = str(full[2].id)
    async with server.session.get(
        server.url(f"/tasks/{task_id}/events?last_event_id=0"), headers={"Last-Event-ID": middle}
    ) as resp:
        got = await SSEReader(resp).rest()
    assert [e.id for e in got] == [e.id for e in full[3:]]


@pytest.mark.parametrize("cursor", ["not-a-cursor", "-1", "99999999999999", "aaaaaaaa-1", "future"])
async def test_an_unusable_cursor_gets_a_reset_then_the_current_state(server: Server, cursor: str) -> None:
    task_id = await server.start_task("demo.count", n=2, delay=0.01)
    full = await history(server, task_id)
    if cursor == "future":
        cursor = beyond(str(full[-1].id), 10**9)
    async with server.session.get(server.url(f"/tasks/{task_id}/events"), headers={"Last-Event-ID": cursor}) as resp:
        assert resp.status == 200
        got = await SSEReader(resp).rest()
    # A reset (the cursor names no place in this history), the finished task's one
    # terminal event as its current state, then the end.
    assert [e.event for e in got] == ["reset", "success"]
    assert got[0].payload["reason"] == "cursor_unknown"
    assert got[1].id == full[-1].id


async def test_fresh_stream_starts_with_current_state_then_goes_live(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=10, delay=0.05)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in resp.headers
        reader = SSEReader(resp)
        assert await reader.next_comment() == "ping"  # right after the headers
        events = await reader.rest()
    assert events[0].event in {"queued", "started", "progress"}
    assert events[-1].event == "success"
    assert [own(e.id) for e in events[1:]] == await events_after(server, task_id, events[0].id)


async def test_reconnect_at_or_after_terminal_event_gets_204(server: Server) -> None:
    task_id = await server.start_task("demo.count", n=2, delay=0.01)
    last = (await history(server, task_id))[-1]
    assert last.event == "success"
    for url in (f"/tasks/{task_id}/events", f"/events?task={task_id}"):
        async with server.session.get(server.url(url), headers={"Last-Event-ID": str(last.id)}) as resp:
            assert resp.status == 204
    # Without a cursor the finished task is told once, then the stream ends.
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        assert resp.status == 200
        assert [e.event for e in await SSEReader(resp).rest()] == ["success"]


async def test_twenty_tasks_share_one_stream_gaplessly(server: Server) -> None:
    task_ids = [await server.start_task("demo.count", n=4, delay=0.05) for _ in range(20)]
    query = "&".join(f"task={t}" for t in task_ids)
    async with server.session.get(server.url(f"/events?{query}")) as resp:
        assert resp.status == 200
        reader = SSEReader(resp)
        first = await reader.next_event()
        assert first is not None
        assert server.app[HUB].watcher_count == 1
        events = [first, *await reader.rest(timeout=60)]

    ids = numbers(events)
    assert ids == sorted(set(ids)), "one cursor for all tasks: ids only increase"
    for task_id in task_ids:
        mine = [e for e in events if e.payload["task_id"] == task_id]
        assert mine[-1].event == "success", [e.event for e in mine]
        # After its current state, every stored event of the task came exactly once.
        assert [own(e.id) for e in mine[1:]] == await events_after(server, task_id, mine[0].id)


async def test_many_task_stream_resumes_every_task_with_one_cursor(server: Server) -> None:
    task_ids = [await server.start_task("demo.count", n=12, delay=0.05) for _ in range(3)]
    url = server.url("/events?" + "&".join(f"task={t}" for t in task_ids))
    async with server.session.get(url) as resp:
        first = await SSEReader(resp).until(progressed(2))
    cursor = str(first[-1].id)
    async with server.session.get(url, headers={"Last-Event-ID": cursor}) as resp:
        second = await SSEReader(resp).rest(timeout=60)
    for task_id in task_ids:
        mine = [own(e.id) for e in second if e.payload["task_id"] == task_id]
        assert mine == await events_after(server, task_id, cursor)


async def test_unknown_id_on_many_task_stream_is_told_once_and_ignored(server: Server) -> None:
    known = await server.start_task("demo.count", n=2, delay=0.01)
    unknown = "00000000-0000-4000-8000-000000000000"
    async with server.session.get(server.url(f"/events?task={unknown}&task={known}")) as resp:
        assert resp.status == 200
        events = await SSEReader(resp).rest()
    assert events[0].event == "unknown" and events[0].id is None
    assert events[0].payload == {"task_id": unknown}
    assert all(e.payload["task_id"] == known for e in events[1:])
    assert events[-1].event == "success"


async def test_disconnect_releases_handler_and_subscription(
    server: Server, settings: Settings, redis_client: redis.Redis
) -> None:
    task_id = await server.start_task("demo.count", n=400, delay=0.05)
    channel = keys_for(settings).channel(task_id)
    hub = server.app[HUB]
    try:
        async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
            assert await SSEReader(resp).next_event() is not None
            assert hub.watcher_count == 1
            assert subscribers(redis_client, channel) == 1
            resp.close()  # the client goes away mid-stream
        await wait_until(lambda: hub.watcher_count == 0, what="the handler to let go of its watcher")
        await wait_until(lambda: subscribers(redis_client, channel) == 0, what="the unsubscribe")
        assert task_id not in hub.subscribed_tasks
    finally:
        async with server.session.delete(server.url(f"/tasks/{task_id}")) as resp:
            assert resp.status == 202


async def test_watchers_miss_nothing_when_the_subscriber_connection_is_killed(
    server: Server, settings: Settings, redis_client: redis.Redis
) -> None:
    task_id = await server.start_task("demo.count", n=40, delay=0.05)
    hub = server.app[HUB]
    async with (
        server.session.get(server.url(f"/tasks/{task_id}/events")) as one,
        server.session.get(server.url(f"/events?task={task_id}")) as many,
    ):
        readers = [SSEReader(one), SSEReader(many)]
        before = [await r.until(progressed(5)) for r in readers]

        killed = kill_connections(redis_client, hub_client_name(settings.key_prefix))
        partitions = keys_for(settings).partitions
        assert killed == partitions, "one pub/sub connection per web process (on a cluster, per partition)"

        after = [await r.rest(timeout=60) for r in readers]
    assert hub.connections >= 2 * partitions, "the hub reconnected"
    for got_before, got_after in zip(before, after, strict=True):
        events = got_before + got_after
        assert events[-1].event == "success"
        assert [own(e.id) for e in events[1:]] == await events_after(server, task_id, events[0].id)


async def test_heartbeat_comments_keep_an_idle_stream_alive(make_server: Any, settings: Settings) -> None:
    server: Server = await make_server(settings.with_(heartbeat=0.2))
    task_id = await server.start_task("demo.mystery", min_s=1.5, max_s=1.5)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        events = await reader.rest()
    assert events[-1].event == "success"
    # One right after the headers, then more while the task ran quietly.
    assert reader.comments.count("ping") >= 3


async def test_shutdown_ends_open_streams_promptly(make_server: Any, settings: Settings) -> None:
    server: Server = await make_server(settings)
    task_id = await server.start_task("demo.count", n=60, delay=0.05)
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        assert await reader.next_event() is not None
        closing = asyncio.create_task(server.server.close())
        # The stream ends (without a terminal event) well before the task would finish.
        rest = await reader.rest(timeout=10)
        await asyncio.wait_for(closing, 10)
    assert not any(e.terminal for e in rest)


async def test_stream_misses_nothing_across_repeated_subscriber_kills_under_load(
    make_server: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    """Events keep coming while the hub's connection is killed again and again: the
    stream must still carry every stored event once. (A frame published right after
    a reconnect used to overtake the resync and skip what was missed.)"""
    prefix = f"{settings.key_prefix}-kills"
    server: Server = await make_server(settings.with_(key_prefix=prefix))
    keys = keys_for(settings.with_(key_prefix=prefix))
    publisher = Publisher(sync_client(settings.redis_url), keys)
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "load", State.QUEUED))
    stop = threading.Event()

    def pump() -> None:
        count = 0
        while not stop.is_set():
            count += 1
            publisher.publish(make_event(task_id, "load", State.PROGRESS, current=count))
            stop.wait(0.0005)

    got = []
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        got.append(await reader.next_event())
        thread = threading.Thread(target=pump)
        thread.start()
        try:
            for _ in range(5):
                got += await reader.until(lambda e: True)
                assert kill_connections(redis_client, hub_client_name(prefix)) == keys.partitions
                first = own(got[-1].id)[1]
                got += await reader.until(lambda e, first=first: own(e.id)[1] > first + 300)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        publisher.publish(make_event(task_id, "load", State.SUCCESS))
        got += await reader.rest()
    publisher.client.close()

    assert server.app[HUB].connections >= 6 * keys.partitions
    ids = [own(e.id)[1] for e in got if e is not None]
    stored = [int(entry_id.split("-")[0]) for entry_id, _ in redis_client.xrange(keys.log(task_id))]
    assert ids == [s for s in stored if s >= ids[0]], "every stored event after the first, once, in order"
    for key in redis_client.scan_iter(match=f"*{prefix}*"):  # every partition's
        redis_client.delete(key)


UNKNOWN_ID = "00000000-0000-4000-8000-00000000dead"


@pytest.mark.parametrize(
    "path",
    [f"/tasks/{UNKNOWN_ID}/events", f"/events?task={UNKNOWN_ID}", f"/groups/{UNKNOWN_ID}/events"],
)
async def test_every_stream_opens_through_one_place_before_any_answer(
    server: Server, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A check put in EventStream.opened (access.authorize, see tests/test_access.py) runs for a
    task's, many tasks' and a group's stream, and before any of them can say 404."""
    seen: list[str] = []

    def refuse(request: Any, *_: Any) -> int | None:
        seen.append(request.path)
        raise web.HTTPForbidden(text='{"error": "no"}', content_type="application/json")

    monkeypatch.setattr(delivery, "parse_cursor", refuse)  # the first thing opened() does
    async with server.session.get(server.url(path)) as resp:
        assert resp.status == 403, await resp.text()
    assert seen == [path.split("?")[0]]

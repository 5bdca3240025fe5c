"""hub.py against a real Redis: one pub/sub connection per process, confirmed and
reference-counted subscriptions, in-order fan-out, reconnect + resync, bounded inboxes.

Every hub gets its own client whose name carries a uuid, so `CLIENT LIST` finds exactly
its connection (and `CLIENT KILL ID` kills exactly it), and its own key prefix below the
run's prefix, so no other test's publishes reach its channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import progress_sse.web.hub as hub_module
from progress_sse.config import Settings
from progress_sse.cursors import Position, parse_id
from progress_sse.events import Frame, make_event
from progress_sse.keys import Keys
from progress_sse.task_names import NameFilter
from progress_sse.web.hub import Hub, HubUnavailable, Item, Signal, Watcher
from progress_sse.web.store import Store
from progress_sse.worker.publisher import Publisher

from .conftest import wait_until

WAIT = 5.0  # generous upper bound for anything we await; a pass never waits this long


@dataclass
class HubUnderTest:
    hub: Hub
    client: aioredis.Redis
    name: str


@pytest.fixture
async def make_hub(settings: Settings, keys: Keys) -> AsyncIterator[Callable[..., Awaitable[HubUnderTest]]]:
    """`await make_hub(url=None, **hub_kwargs)`: a started Hub on its own no-retry client."""
    made: list[HubUnderTest] = []

    async def make(*, url: str | None = None, **kwargs: Any) -> HubUnderTest:
        name = f"pst-hub-test-{uuid.uuid4().hex}"
        client = aioredis.Redis.from_url(
            url or settings.redis_url,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            client_name=name,
        )
        hub = Hub(client, keys, **kwargs)
        made.append(HubUnderTest(hub, client, name))
        await hub.start()
        return made[-1]

    yield make
    for h in made:
        await h.hub.close()
        await h.client.aclose()


def new_task() -> str:
    return str(uuid.uuid4())


def numsub(redis_client: redis.Redis, channel: str) -> int:
    ((_, count),) = redis_client.pubsub_numsub(channel)
    return int(count)


def connections_named(redis_client: redis.Redis, name: str, kind: str | None = None) -> list[dict[str, str]]:
    clients = redis_client.client_list(_type=kind) if kind else redis_client.client_list()
    return [c for c in clients if c.get("name") == name]


def the_connection(redis_client: redis.Redis, name: str) -> dict[str, str]:
    (conn,) = connections_named(redis_client, name, "pubsub")
    return conn


def publish(publisher: Publisher, task_id: str, state: str, **kwargs: Any) -> Frame:
    payload = make_event(task_id, "demo.count", state, **kwargs)
    cursor = publisher.publish(payload)
    assert cursor is not None
    at = parse_id(cursor)
    return Frame(task_id, at.n, state, "", at.epoch)


async def expect(watcher: Watcher, what: str) -> Item:
    item = await watcher.next(WAIT)
    assert item is not None, f"nothing reached the watcher within {WAIT}s (expected {what})"
    return item


async def expect_frame(watcher: Watcher, sent: Frame) -> Frame:
    item = await expect(watcher, f"frame {sent.seq}")
    assert isinstance(item, Frame), f"expected frame {sent.seq}, got {item}"
    assert (item.task_id, item.id, item.state) == (sent.task_id, sent.id, sent.state)
    return item


async def drain(watcher: Watcher) -> list[Item]:
    """What is in the inbox right now, without waiting for more."""
    items: list[Item] = []
    while (item := await watcher.next(0)) is not None:
        items.append(item)
    return items


async def test_watch_returns_only_after_redis_confirmed_the_subscriptions(
    make_hub: Callable[..., Awaitable[HubUnderTest]], keys: Keys, redis_client: redis.Redis
) -> None:
    h = await make_hub()
    tasks = [new_task() for _ in range(3)]
    for task_id in tasks:
        assert numsub(redis_client, keys.channel(task_id)) == 0
    async with h.hub.watch(tasks):
        # No waiting here: the (blocking) checks run before the hub can do anything more.
        assert [numsub(redis_client, keys.channel(t)) for t in tasks] == [1, 1, 1]
        assert h.hub.subscribed_tasks == set(tasks)
        assert h.hub.watcher_count == 1


async def test_published_frames_reach_the_watcher_in_order(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher
) -> None:
    h = await make_hub()
    task_id = new_task()
    async with h.hub.watch([task_id]) as watcher:
        sent = [
            publish(publisher, task_id, "queued"),
            publish(publisher, task_id, "started"),
            *(publish(publisher, task_id, "progress", current=i, total=3, message=f"step\n{i}") for i in (1, 2, 3)),
            publish(publisher, task_id, "success", current=3, total=3, result={"ok": True}),
        ]
        received = [await expect_frame(watcher, s) for s in sent]
    assert [f.payload()["current"] for f in received[2:5]] == [1, 2, 3]
    assert received[2].payload()["message"] == "step\n1"
    assert received[-1].payload()["result"] == {"ok": True}
    assert received[-1].terminal


async def test_a_watcher_of_several_tasks_gets_all_their_frames_in_publish_order(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher
) -> None:
    h = await make_hub()
    a, b = new_task(), new_task()
    async with h.hub.watch([a, b]) as watcher:
        sent = [
            publish(publisher, a, "queued"),
            publish(publisher, b, "queued"),
            publish(publisher, b, "started"),
            publish(publisher, a, "started"),
        ]
        for s in sent:
            await expect_frame(watcher, s)


async def test_two_watchers_of_one_task_share_one_subscription(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    h = await make_hub()
    task_id = new_task()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(h.hub.watch([task_id]))
        async with h.hub.watch([task_id]) as second:
            assert numsub(redis_client, keys.channel(task_id)) == 1
            # The control channel plus this one task: one subscription, not one per watcher.
            assert the_connection(redis_client, h.name)["sub"] == "2"
            frame = publish(publisher, task_id, "queued")
            await expect_frame(first, frame)
            await expect_frame(second, frame)
        # The remaining watcher keeps the subscription: it still hears new events.
        later = publish(publisher, task_id, "started")
        await expect_frame(first, later)
        assert numsub(redis_client, keys.channel(task_id)) == 1
        assert h.hub.watcher_count == 1


async def test_one_pubsub_connection_for_fifty_watchers_over_twenty_tasks(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    h = await make_hub()
    tasks = [new_task() for _ in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        watchers = [await stack.enter_async_context(h.hub.watch([tasks[i % 20]])) for i in range(50)]
        assert h.hub.watcher_count == 50
        # Every connection of this client, of any type: exactly one, and it is the subscriber.
        assert len(connections_named(redis_client, h.name)) == 1
        conn = the_connection(redis_client, h.name)
        assert conn["sub"] == "21"  # 20 task channels + the control channel
        assert all(numsub(redis_client, keys.channel(t)) == 1 for t in tasks)

        sent = {t: publish(publisher, t, "queued") for t in tasks}
        for i, watcher in enumerate(watchers):
            await expect_frame(watcher, sent[tasks[i % 20]])
        assert h.hub.connections == 1


async def test_leaving_the_last_watcher_unsubscribes_only_that_task(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    h = await make_hub()
    gone, stays = new_task(), new_task()
    async with h.hub.watch([stays]) as staying:
        async with h.hub.watch([gone]), h.hub.watch([gone]):
            assert numsub(redis_client, keys.channel(gone)) == 1
        await wait_until(
            lambda: numsub(redis_client, keys.channel(gone)) == 0, WAIT, "the left channel to be unsubscribed"
        )
        assert numsub(redis_client, keys.channel(stays)) == 1
        assert h.hub.subscribed_tasks == {stays}
        assert the_connection(redis_client, h.name)["sub"] == "2"
        frame = publish(publisher, stays, "queued")
        await expect_frame(staying, frame)


async def test_watching_a_task_again_after_leaving_it_resubscribes(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    h = await make_hub()
    task_id = new_task()
    for state in ("queued", "started", "progress"):
        # Leave and come back at once: the unsubscribe and the new subscribe may cross.
        async with h.hub.watch([task_id]) as watcher:
            assert numsub(redis_client, keys.channel(task_id)) == 1
            await expect_frame(watcher, publish(publisher, task_id, state))
    await wait_until(lambda: numsub(redis_client, keys.channel(task_id)) == 0, WAIT, "the channel to be unsubscribed")


async def test_idle_watchers_cause_no_redis_commands(
    make_hub: Callable[..., Awaitable[HubUnderTest]], redis_client: redis.Redis
) -> None:
    """Redis's own view of the hub's connection is the honest witness here.

    `CLIENT LIST` reports for each connection `idle`: whole seconds since Redis last
    read a command from it or wrote a reply or message to it. Server-wide counters
    (INFO commandstats, total_commands_processed) also count every other client of a
    shared Redis, and MONITOR is far too heavy, so instead: with ten idle watchers
    open, this client must keep exactly one connection, its `idle` must reach 2 s
    (so not one command in those two seconds: no polling, no per-watcher ping, no
    other connection) and its last command must still be the subscription's. The
    default idle_ping (30 s) is far longer than that window; the next test shows
    that a command on the connection does reset what we observe here.
    """
    h = await make_hub()
    tasks = [new_task() for _ in range(5)]
    async with contextlib.AsyncExitStack() as stack:
        for i in range(10):
            await stack.enter_async_context(h.hub.watch([tasks[i % 5]]))
        before = the_connection(redis_client, h.name)
        assert before["cmd"] == "subscribe"
        await wait_until(
            lambda: int(the_connection(redis_client, h.name)["idle"]) >= 2,
            WAIT,
            "the hub's connection to stay silent for 2 s",
        )
        after = the_connection(redis_client, h.name)
        assert after["id"] == before["id"]
        assert after["cmd"] == before["cmd"]
        assert int(after["age"]) > int(before["age"])
        assert len(connections_named(redis_client, h.name)) == 1


async def test_hub_pings_its_idle_connection_and_keeps_it_while_pongs_come_back(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher, redis_client: redis.Redis
) -> None:
    h = await make_hub(idle_ping=0.2)
    task_id = new_task()
    async with h.hub.watch([task_id]) as watcher:
        first = the_connection(redis_client, h.name)
        await wait_until(
            lambda: the_connection(redis_client, h.name)["cmd"] == "ping", WAIT, "the hub to ping when idle"
        )
        # A missing PONG would make the hub drop the connection one idle_ping later; over
        # a whole second (five pings) it must keep the very same connection.
        await wait_until(
            lambda: int(the_connection(redis_client, h.name)["age"]) >= int(first["age"]) + 1,
            WAIT,
            "the connection to live through several pings",
        )
        assert the_connection(redis_client, h.name)["id"] == first["id"]
        assert h.hub.connections == 1
        await expect_frame(watcher, publish(publisher, task_id, "queued"))
        assert h.hub.connections == 1


async def test_watch_raises_hub_unavailable_when_redis_never_confirms(
    make_hub: Callable[..., Awaitable[HubUnderTest]], caplog: pytest.LogCaptureFixture
) -> None:
    h = await make_hub(url="redis://127.0.0.1:1/0", subscribe_timeout=0.3)
    with pytest.raises(HubUnavailable):
        async with h.hub.watch([new_task()]):
            pytest.fail("watch() returned without a confirmed subscription")
    assert h.hub.watcher_count == 0
    assert h.hub.subscribed_tasks == set()
    assert h.hub.connections == 0
    assert any("lost its Redis subscription" in r.getMessage() for r in caplog.records)


async def test_after_its_connection_is_killed_the_hub_reconnects_resubscribes_and_resyncs_every_watcher(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    h = await make_hub()
    a, b = new_task(), new_task()
    position = publish(publisher, a, "queued").position
    assert position is not None
    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(h.hub.watch([a])),
            await stack.enter_async_context(h.hub.watch([a])),
            await stack.enter_async_context(h.hub.watch([a, b])),
        ]
        old = the_connection(redis_client, h.name)
        assert redis_client.client_kill_filter(_id=old["id"]) == 1
        # Published while the subscriber is gone: pub/sub cannot deliver it...
        missed = publish(publisher, a, "started")

        await wait_until(lambda: h.hub.connections == 2, WAIT, "the hub to reconnect")
        for watcher in watchers:
            assert await expect(watcher, "a resync") is Signal.RESYNC
        # ...but the log has it, which is what a resync reads.
        store_client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            catchup = await Store(store_client, keys).after([a, b], {0: position})
        finally:
            await store_client.aclose()
        assert [(f.id, f.state) for f in catchup.frames] == [(missed.id, "started")]

        assert numsub(redis_client, keys.channel(a)) == 1
        assert numsub(redis_client, keys.channel(b)) == 1
        new = the_connection(redis_client, h.name)
        assert new["id"] != old["id"]
        assert new["sub"] == "3"
        assert len(connections_named(redis_client, h.name)) == 1

        live_a = publish(publisher, a, "progress", current=1, total=2)
        live_b = publish(publisher, b, "queued")
        await expect_frame(watchers[0], live_a)
        await expect_frame(watchers[1], live_a)
        await expect_frame(watchers[2], live_a)
        await expect_frame(watchers[2], live_b)


async def test_a_watcher_arriving_during_a_reconnect_waits_for_the_new_subscription(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    # A long first backoff keeps the hub disconnected while the new watcher arrives.
    h = await make_hub(backoff=(0.5, 1.0))
    present, arriving = new_task(), new_task()
    async with h.hub.watch([present]):
        redis_client.client_kill_filter(_id=the_connection(redis_client, h.name)["id"])
        async with h.hub.watch([arriving]) as watcher:
            assert h.hub.connections == 2
            assert numsub(redis_client, keys.channel(arriving)) == 1
            sent = publish(publisher, arriving, "queued")
            item = await expect(watcher, f"frame {sent.seq}")
            if item is Signal.RESYNC:  # the reconnect's resync may reach it too: harmless
                item = await expect(watcher, f"frame {sent.seq}")
            assert isinstance(item, Frame) and item.seq == sent.seq, item


async def test_a_slow_watchers_inbox_stays_within_its_bytes(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher
) -> None:
    """20 frames of about 200 bytes each into an inbox of 1,000: the progress frames
    collapse toward the latest, the state change stays, nobody else waits."""
    h = await make_hub(buffer=1000)
    slow_task, other_task = new_task(), new_task()
    async with h.hub.watch([slow_task]) as slow, h.hub.watch([other_task]) as other:
        sent = [publish(publisher, slow_task, "queued")]
        sent += [publish(publisher, slow_task, "progress", current=i, total=19) for i in range(1, 20)]
        marker = publish(publisher, other_task, "queued")
        # Pub/sub keeps publish order on the one connection: once the marker is here,
        # all 20 frames of the slow task were delivered to its inbox.
        await expect_frame(other, marker)  # the slow watcher holds no one else up
        assert slow.backlog <= 1000
        items = await drain(slow)
    frames = [i for i in items if isinstance(i, Frame)]
    assert Signal.RESYNC not in items and len(frames) < len(sent)
    assert (frames[0].seq, frames[0].state) == (sent[0].seq, "queued"), "the state change stays"
    assert frames[-1].seq == sent[-1].seq, "and so does the latest progress"
    assert [f.seq for f in frames] == sorted(f.seq for f in frames)


def frame(task_id: str, seq: int, state: str, size: int = 100) -> Frame:
    return Frame(task_id, seq, state, "x" * size, "e")


def test_progress_collapses_to_each_tasks_latest_and_state_changes_stay_in_order() -> None:
    watcher = Watcher(["a", "b"], limit=1000)
    sent = [
        frame("a", 1, "started"),
        frame("a", 2, "progress"),
        frame("b", 3, "progress"),
        frame("a", 4, "progress"),
        frame("b", 5, "retry"),
        frame("a", 6, "progress"),
        frame("b", 7, "progress"),
        frame("a", 8, "progress"),  # about 130 bytes a frame: over the bound here, once
        frame("b", 9, "progress"),
        frame("a", 10, "progress"),
    ]
    for item in sent:
        watcher.deliver(item)
    assert watcher.backlog <= 1000
    kept = watcher.pending()
    # At a:8 each task's waiting progress collapsed to its latest (b:7, a:8); b:9 and
    # a:10 came after, within the bound.
    assert [(f.task_id, f.seq) for f in kept if isinstance(f, Frame)] == [
        ("a", 1),
        ("b", 5),
        ("b", 7),
        ("a", 8),
        ("b", 9),
        ("a", 10),
    ]


def test_state_changes_alone_over_the_bound_become_one_resync() -> None:
    watcher = Watcher(["a", "b", "c"], limit=300)  # about 130 bytes a frame
    for seq, (task_id, state) in enumerate([("a", "queued"), ("b", "queued"), ("c", "queued")], start=1):
        watcher.deliver(frame(task_id, seq, state))
    assert watcher.pending() == [Signal.RESYNC], "the log is the buffer of last resort"
    assert watcher.backlog == 0
    watcher.deliver(frame("a", 4, "success"))
    assert [f.seq for f in watcher.pending() if isinstance(f, Frame)] == [4], "and it goes on after"


def test_an_overflow_keeps_the_notices_waiting_which_no_log_holds() -> None:
    watcher = Watcher(["a", "b", "c"], limit=300)
    notice = b'event: notice\ndata: {"id":"n1","text":"hi","ts":1}\n\n'
    watcher.deliver(notice)
    for seq, (task_id, state) in enumerate([("a", "queued"), ("b", "queued"), ("c", "queued")], start=1):
        watcher.deliver(frame(task_id, seq, state))
    assert watcher.pending() == [notice, Signal.RESYNC]


async def test_close_watchers_sends_close_and_marks_them_closed(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
) -> None:
    h = await make_hub()
    async with h.hub.watch([new_task()]) as one, h.hub.watch([new_task(), new_task()]) as two:
        assert not one.closed and not two.closed
        h.hub.close_watchers()
        assert one.closed and two.closed
        assert await expect(one, "close") is Signal.CLOSE
        assert await expect(two, "close") is Signal.CLOSE


async def test_hub_close_finishes_promptly_and_drops_its_connection(
    make_hub: Callable[..., Awaitable[HubUnderTest]], redis_client: redis.Redis
) -> None:
    h = await make_hub()
    async with h.hub.watch([new_task()]) as watcher:
        assert len(connections_named(redis_client, h.name, "pubsub")) == 1
        async with asyncio.timeout(2):
            await h.hub.close()
        assert watcher.closed
        assert await expect(watcher, "close") is Signal.CLOSE
    await wait_until(lambda: not connections_named(redis_client, h.name), WAIT, "the hub's connection to be closed")


class _AsyncioSpy(types.SimpleNamespace):
    """hub.py's view of `asyncio`: everything real, but every sleep's length recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await asyncio.sleep(delay)


async def test_reconnect_backoff_starts_over_after_a_successful_connection(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _AsyncioSpy()
    monkeypatch.setattr(hub_module, "asyncio", spy)
    h = await make_hub(backoff=(0.05, 5.0))
    async with h.hub.watch([new_task()]):
        for drop in range(1, 4):
            redis_client.client_kill_filter(_id=the_connection(redis_client, h.name)["id"])
            await wait_until(lambda n=drop: h.hub.connections == n + 1, WAIT, f"reconnect #{drop}")
    # Each drop came after a healthy connection, so each should wait the first step only.
    assert spy.sleeps == [0.05, 0.05, 0.05]


async def test_a_malformed_message_is_dropped_and_the_hub_keeps_serving(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher, redis_client: redis.Redis
) -> None:
    h = await make_hub()
    task_id = new_task()
    async with h.hub.watch([task_id]) as watcher:
        redis_client.publish(publisher.keys.channel(task_id), "hello from redis-cli")
        sent = publish(publisher, task_id, "queued")
        await expect_frame(watcher, sent)
    assert h.hub.running


async def test_frames_published_after_a_reconnect_wait_behind_the_resync() -> None:
    """While the subscription is restored a watcher holds live frames, then gets
    RESYNC (read the log) before them: a frame may not overtake what was missed."""
    watcher = Watcher(["t"], limit=10_000)
    watcher.hold()
    late = Frame("t", 91, "progress", "{}", "e")
    watcher.deliver(late)
    assert await watcher.next(0) is None, "held, not delivered"
    watcher.resume()
    assert await watcher.next(0) is Signal.RESYNC
    assert await watcher.next(0) == late
    watcher.resume()  # not held any more: nothing happens
    assert await watcher.next(0) is None


async def test_a_partition_s_reconnect_holds_its_own_frames_only() -> None:
    """A stream of tasks in two partitions (a cluster): while partition 1's
    subscription is restored its frames wait behind a resync; partition 0's go on."""
    watcher = Watcher(["t", "u"], limit=10_000)
    watcher.hold(1)
    late = Frame("t", 7, "progress", "{}", "e", partition=1)
    other = Frame("u", 9, "progress", "{}", "f", partition=0)
    watcher.deliver(late)
    watcher.deliver(other)
    assert await watcher.next(0) == other, "not held: its partition's subscription is up"
    assert await watcher.next(0) is None
    watcher.resume(1)
    assert await watcher.next(0) is Signal.RESYNC
    assert await watcher.next(0) == late


async def test_each_watcher_registered_moves_the_generation_on(
    make_hub: Callable[..., Awaitable[HubUnderTest]],
) -> None:
    """A read issued before a watcher was registered has a lower generation than the
    watcher's `confirmed`, even on a channel subscribed long before: so no stream
    shares a read that may have missed its events (web/delivery.py SharedReads)."""
    h = await make_hub()
    task_id = new_task()
    async with h.hub.watch([task_id]) as first:
        before = h.hub.generation
        async with h.hub.watch([task_id]) as second:  # the channel is subscribed already
            assert first.confirmed <= before < second.confirmed == h.hub.generation


async def test_a_message_of_another_history_tells_every_watcher_to_resync(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """Redis lost the sequence (a restart without data, an eviction): the next write
    names a new history. Every stream must look, not only those of that task: a
    stream whose task never writes again would otherwise show its old state for ever."""
    h = await make_hub()
    a, quiet = new_task(), new_task()
    async with h.hub.watch([a]) as watcher_a, h.hub.watch([quiet]) as watcher_quiet:
        await expect_frame(watcher_a, publish(publisher, a, "queued"))
        redis_client.delete(keys.history())  # what a restart without persistence does to it
        renamed = publish(publisher, a, "started")

        assert await expect(watcher_a, "a resync") is Signal.RESYNC
        await expect_frame(watcher_a, renamed)
        assert await expect(watcher_quiet, "a resync") is Signal.RESYNC


async def test_a_sequence_that_went_back_gets_a_new_epoch_before_watchers_resync(
    settings: Settings,
    make_hub: Callable[..., Awaitable[HubUnderTest]],
    publisher: Publisher,
    keys: Keys,
    redis_client: redis.Redis,
) -> None:
    """A failover to a replica that lagged: the same epoch, lower numbers. The hub
    renames the history first, so a cursor handed out before can never pass for a
    place in the new one, then tells every watcher."""
    store_client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        h = await make_hub(new_epoch=Store(store_client, keys).new_epoch)
        task_id, other = new_task(), new_task()
        async with h.hub.watch([task_id, other]) as watcher:
            await expect_frame(watcher, publish(publisher, task_id, "queued"))
            high = publish(publisher, task_id, "started")
            await expect_frame(watcher, high)
            # The replica had not heard of `started` (nor of its log entry: a script's
            # writes replicate together), and the next event takes its number.
            redis_client.hset(keys.history(), "n", high.seq - 1)
            redis_client.delete(keys.log(task_id), keys.state(task_id))
            again = publish(publisher, other, "queued")
            assert again.position == Position(high.epoch, high.seq), "the number was given out twice"

            await expect_frame(watcher, again)  # the stream itself drops it: not past its position
            assert await expect(watcher, "a resync") is Signal.RESYNC
            assert redis_client.hget(keys.history(), "epoch") != high.epoch, "the resync came before the renaming"
    finally:
        await store_client.aclose()


class Socket:
    """A transport's write side, as Direct uses it: what was written, and a buffer
    that fills when the test says the client stopped reading."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.waiting = 0  # bytes the client has not taken

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)

    def is_closing(self) -> bool:
        return False


async def test_an_idle_stream_gets_live_frames_written_to_its_socket_without_waking() -> None:
    """Direct fan-out: a frame for a stream that waits with nothing queued is written
    to its socket, chunk-framed, and moves its place; the stream's task sleeps on.
    What its own loop must see (an end, news from another history, a stream under
    back-pressure) is queued for it instead, and no frame overtakes a queued one."""
    watcher = Watcher(["t", "u"], limit=10_000)
    socket, at = Socket(), {0: Position("e", 10)}
    waiting = {"t"}
    watcher.direct = hub_module.Direct(socket, None, at, lambda: waiting, float("inf"))  # type: ignore[arg-type]
    sleeper = asyncio.ensure_future(watcher.next())
    await asyncio.sleep(0)  # the stream's task is parked in next()
    assert watcher.idle

    first, second = Frame("t", 11, "progress", '{"current":1}', "e"), Frame("t", 12, "progress", "{}", "e")
    watcher.deliver(first)
    watcher.deliver(second)
    assert at == {0: Position("e", 12)} and socket.written == [], "taken now, written at the end of the turn"
    await asyncio.sleep(0)
    assert socket.written == [first.chunk(None) + second.chunk(None)], "the turn's frames in one write"
    assert first.chunk(None).startswith(b"%x\r\n" % len(first.encoded)) and not sleeper.done()

    watcher.deliver(Frame("t", 12, "progress", "{}", "e"))  # no news: at its place
    watcher.deliver(Frame("u", 13, "progress", "{}", "e"))  # a task it no longer waits for
    await asyncio.sleep(0)
    assert len(socket.written) == 1 and not sleeper.done()

    socket.waiting = 64 * 1024  # the client stopped reading: back-pressure
    pressed = Frame("t", 14, "progress", "{}", "e")
    watcher.deliver(pressed)
    assert await sleeper == pressed, "queued, for the loop's own write with its timeout"
    socket.waiting = 0
    watcher.deliver(Frame("t", 15, "progress", "{}", "e"))  # the stream's task is not waiting
    assert len(socket.written) == 1

    sleeper = asyncio.ensure_future(watcher.next())
    await asyncio.sleep(0)
    assert await sleeper == Frame("t", 15, "progress", "{}", "e"), "behind the queued one, not overtaking it"
    sleeper = asyncio.ensure_future(watcher.next())
    await asyncio.sleep(0)
    last, end = Frame("t", 16, "progress", "{}", "e"), Frame("t", 17, "success", "{}", "e")
    watcher.deliver(last)
    watcher.deliver(end)  # in the same turn: the stream's task wakes after the turn's write
    assert await sleeper == end, "an end is the loop's: the stream may be over"
    assert socket.written[-1] == last.chunk(None), "written before the woken task ran"


async def test_the_feed_repeats_its_events_numbers_without_taking_that_for_a_lost_history(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher
) -> None:
    """A feed entry is announced right after its task's event, under the same number:
    one hub hearing both must not take the second for a sequence that went back."""
    h = await make_hub()
    task_id = new_task()
    feed = h.hub.feed_watcher(NameFilter(("demo.",)))
    async with h.hub.watch([task_id]) as watcher, h.hub.watch((), feed, feed=True):
        sent = [publish(publisher, task_id, state) for state in ("queued", "started")]
        for frame in sent:
            await expect_frame(watcher, frame)
            fed = await expect_frame(feed, frame)
            assert fed.name == "demo.count"
        assert await drain(watcher) == [] and await drain(feed) == [], "no resync, nothing else"


async def test_a_feed_watcher_gets_the_names_it_shows_only(
    make_hub: Callable[..., Awaitable[HubUnderTest]], publisher: Publisher
) -> None:
    h = await make_hub()
    other = h.hub.feed_watcher(NameFilter(("reports.",)))
    mine = h.hub.feed_watcher(NameFilter(("demo.count",)))
    async with h.hub.watch((), other, feed=True), h.hub.watch((), mine, feed=True):
        shown = publish(publisher, new_task(), "queued")
        await expect_frame(mine, shown)
        report = make_event(new_task(), "reports.daily", "queued")
        assert publisher.publish(report) is not None
        (item,) = [await expect(other, "the report")]
        assert isinstance(item, Frame) and item.task_id == report["task_id"]
        assert await drain(mine) == [] and await drain(other) == []


def test_a_feed_whose_sequence_started_over_begins_again(
    publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    """The history's hash alone was lost: numbers start over below the feed's last
    entry, which a stream log refuses. The feed of the lost history goes, and the
    write goes on (no cursor can resume in it any more)."""
    first = new_task()
    for state in ("queued", "started", "progress"):
        publish(publisher, first, state)
    redis_client.delete(keys.history())
    again = publish(publisher, new_task(), "queued")
    entries = redis_client.xrange(keys.feed_log())
    assert [(entry_id, fields["e"]) for entry_id, fields in entries] == [(f"{again.seq}-0", again.epoch)]

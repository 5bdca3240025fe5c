"""`GET /metrics` (src/progress_sse/web/metrics.py) against real servers: real Redis,
events from the real Publisher or a real Celery worker, the scrape parsed by
prometheus-client's own parser.

The counters are the test process's (every server in it counts into them), so each
test compares a scrape before with one after. `progress-sse web --workers 2` is
started for real: a scrape of either process reports the sum over both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from progress_sse.cli.embedded import free_port
from progress_sse.config import ConfigError, Settings
from progress_sse.connections import hub_client_name, sync_client
from progress_sse.events import CURSOR_UNKNOWN, HISTORY_LOST, PING, Frame, State, make_event, reset_frame
from progress_sse.keys import Keys
from progress_sse.tokens import operator_token, watch_token
from progress_sse.web import metrics
from progress_sse.web.reaper import reap_once
from progress_sse.worker.publisher import Publisher

from .conftest import Server, kill_connections, wait_until
from .sse import SSEReader
from .test_web_workers import Group, start_group, streams_on_both

SECRET = "the-metrics-test-secret-is-long-enough"
SCRAPER = "a-scrapers-static-token-0123456789"

pytestmark = pytest.mark.e2e


class Scrape:
    """One scrape's samples: `value(sample name, **labels)`, 0 for a series not there."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    @property
    def open(self) -> float:
        return self.value("progress_sse_streams_open")

    @property
    def frames(self) -> float:
        return self.value("progress_sse_stream_frames_total")

    @property
    def bytes(self) -> float:
        return self.value("progress_sse_stream_bytes_total")

    def responses(self, route: str, status: int) -> float:
        return self.value("progress_sse_http_responses_total", route=route, status=str(status))


async def scrape(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Scrape:
    async with session.get(url, headers=headers) as resp:
        body = await resp.text()
        assert resp.status == 200, body
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return Scrape(body)


async def scraped(server: Server) -> Scrape:
    return await scrape(server.session, server.url("/metrics"))


def sse_bytes(events: list[Any]) -> int:
    """The least a stream wrote for these events: each at least `data: <data>\\n\\n`."""
    return sum(len(f"data: {event.data}\n\n".encode()) for event in events)


@pytest.fixture
async def own_server(make_server: Any, settings: Settings, keys: Keys) -> Server:
    """A server on the keys the `publisher` fixture writes: its hub hears only this test's tasks."""
    server: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    return server


async def test_two_streams_count_as_open_and_their_frames_and_bytes_as_the_task_moves(
    own_server: Server, publisher: Publisher
) -> None:
    server = own_server
    task_id = f"metrics-{uuid.uuid4().hex}"
    publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    publisher.publish(make_event(task_id, "demo.count", State.STARTED))
    before = await scraped(server)
    url = server.url(f"/tasks/{task_id}/events")
    async with server.session.get(url) as one, server.session.get(url) as two:
        readers = [SSEReader(one), SSEReader(two)]
        first = [await reader.next_event() for reader in readers]
        assert [event.event for event in first if event is not None] == ["started", "started"]
        opened = await scraped(server)
        assert opened.open == before.open + 2
        assert opened.value("progress_sse_hub_subscriptions") == before.value("progress_sse_hub_subscriptions") + 1
        assert opened.frames >= before.frames + 2
        assert opened.bytes >= before.bytes + sse_bytes(first) + 2 * len(PING)
        assert opened.responses("task_events", 200) == before.responses("task_events", 200) + 2, "when they began"

        publisher.publish(make_event(task_id, "demo.count", State.PROGRESS, current=1, total=3))
        moved = [await reader.next_event() for reader in readers]
        assert [event.event for event in moved if event is not None] == ["progress", "progress"]
        progressed = await scraped(server)
        assert progressed.frames >= opened.frames + 2
        assert progressed.bytes >= opened.bytes + sse_bytes(moved)
        received = "progress_sse_hub_events_received_total"
        assert progressed.value(received, state="progress", channel="task") == (
            before.value(received, state="progress", channel="task") + 1
        ), "one message for both streams"
        assert progressed.open == opened.open

        publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=3, total=3))
        for reader in readers:
            assert [event.event for event in await reader.rest()] == ["success"]

    async def closed() -> bool:
        return (await scraped(server)).open == before.open

    await wait_until(closed, what="the streams' ends in the open streams")
    after = await scraped(server)
    assert after.value("progress_sse_hub_subscriptions") == before.value("progress_sse_hub_subscriptions")
    assert after.frames >= progressed.frames + 2
    assert after.value(received, state="success", channel="task") == (
        before.value(received, state="success", channel="task") + 1
    )


@pytest.mark.usefixtures("worker")
async def test_a_celery_task_s_stream_its_reads_and_responses_by_status(server: Server) -> None:
    before = await scraped(server)
    task_id = await server.start_task("demo.count", n=5, delay=0.01)
    async with server.session.get(server.url(f"/tasks/{task_id}/events?last_event_id=0")) as resp:
        events = await SSEReader(resp).rest()
    assert events[-1].event == "success"
    async with server.session.get(server.url("/no/such/route")) as resp:
        assert resp.status == 404
    async with server.session.get(server.url(f"/tasks/{uuid.uuid4()}")) as resp:
        assert resp.status == 404

    after = await scraped(server)
    assert after.frames >= before.frames + len(events)
    assert after.bytes >= before.bytes + sse_bytes(events)
    assert after.responses("tasks", 202) == before.responses("tasks", 202) + 1
    assert after.responses("task_events", 200) == before.responses("task_events", 200) + 1
    assert after.responses("none", 404) == before.responses("none", 404) + 1, "a path no route takes"
    assert after.responses("task", 404) == before.responses("task", 404) + 1
    assert after.responses("metrics", 200) >= before.responses("metrics", 200) + 1, "the scrape before"
    reads = "progress_sse_redis_read_seconds_count"
    assert after.value(reads) >= before.value(reads) + 1, "the stream's start is a timed read"
    assert after.value("progress_sse_redis_read_seconds_sum") > before.value("progress_sse_redis_read_seconds_sum")


async def test_a_hub_reconnect_and_the_resync_it_asks_for_are_counted(
    own_server: Server, publisher: Publisher, keys: Keys, redis_client: redis.Redis
) -> None:
    server = own_server
    task_id = f"metrics-{uuid.uuid4().hex}"
    publisher.publish(make_event(task_id, "demo.count", State.STARTED))
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        reader = SSEReader(resp)
        assert (await reader.next_event()) is not None
        before = await scraped(server)
        assert kill_connections(redis_client, hub_client_name(keys.prefix)) == keys.partitions

        async def resynced() -> bool:
            now = await scraped(server)
            reconnected = now.value("progress_sse_hub_connects_total") > before.value("progress_sse_hub_connects_total")
            return reconnected and now.value("progress_sse_stream_resyncs_total") >= (
                before.value("progress_sse_stream_resyncs_total") + 1
            )

        await wait_until(resynced, what="a reconnect, then the stream's resync read")
        publisher.publish(make_event(task_id, "demo.count", State.SUCCESS))
        assert [event.event for event in await reader.rest()] == ["success"]


async def test_a_reset_frame_is_counted_by_its_reason(own_server: Server, publisher: Publisher) -> None:
    server = own_server
    task_id = f"metrics-{uuid.uuid4().hex}"
    publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
    publisher.publish(make_event(task_id, "demo.count", State.SUCCESS))
    before = await scraped(server)
    stream = server.url(f"/tasks/{task_id}/events")
    async with server.session.get(stream, headers={"Last-Event-ID": "zzzzzzzz-1"}) as resp:
        events = await SSEReader(resp).rest()
    assert [event.event for event in events] == ["reset", "success"]
    after = await scraped(server)
    resets = "progress_sse_stream_resets_total"
    assert after.value(resets, reason=CURSOR_UNKNOWN) == before.value(resets, reason=CURSOR_UNKNOWN) + 1
    assert after.value(resets, reason=HISTORY_LOST) == before.value(resets, reason=HISTORY_LOST)


@pytest.fixture
async def reaper_parts(settings: Settings, keys: Keys) -> AsyncIterator[tuple[aioredis.Redis, Publisher]]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    publisher = Publisher(sync_client(settings.redis_url), keys)
    yield client, publisher
    await client.aclose()
    publisher.client.close()


async def test_the_reaper_counts_a_task_it_stored_as_lost_once(
    reaper_parts: tuple[aioredis.Redis, Publisher], keys: Keys
) -> None:
    client, publisher = reaper_parts
    lost = "progress_sse_tasks_lost_total"
    before = REGISTRY.get_sample_value(lost, {"reason": "worker_gone"}) or 0
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "demo.count", State.STARTED))
    publisher.task_running(task_id, "celery@gone", "one")
    assert await reap_once(client, keys, publisher) == [task_id]
    assert REGISTRY.get_sample_value(lost, {"reason": "worker_gone"}) == before + 1
    # Another web process's reaper, a moment later, finds it still indexed: its
    # attempt is refused, and counts nothing.
    publisher.task_running(task_id, "celery@gone", "one")
    assert await reap_once(client, keys, publisher) == [task_id]
    assert publisher.state(task_id) == "lost"
    assert REGISTRY.get_sample_value(lost, {"reason": "worker_gone"}) == before + 1


def test_a_stream_s_own_write_counts_its_frames_resets_and_chunked_bytes() -> None:
    """What Live.write hands to `written`: the frames are its `data:` lines, the
    bytes include aiohttp's chunk framing of each piece."""
    frame = Frame("t1", 7, "progress", '{"task_id":"t1","current":1}', "aaaaaaaa", 0)
    data = PING + reset_frame(HISTORY_LOST, ["t2"]) + frame.encoded + reset_frame(CURSOR_UNKNOWN, [])

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    frames, sent = value("progress_sse_stream_frames_total"), value("progress_sse_stream_bytes_total")
    lost, unknown = (value("progress_sse_stream_resets_total", reason=r) for r in (HISTORY_LOST, CURSOR_UNKNOWN))
    metrics.written(data, 64 * 1024)
    assert value("progress_sse_stream_frames_total") == frames + 3, "the ping is no frame"
    assert value("progress_sse_stream_bytes_total") == sent + len(b"%x\r\n%b\r\n" % (len(data), data))
    assert value("progress_sse_stream_resets_total", reason=HISTORY_LOST) == lost + 1
    assert value("progress_sse_stream_resets_total", reason=CURSOR_UNKNOWN) == unknown + 1

    big = frame.encoded * (70_000 // len(frame.encoded))  # more than one piece: a chunk each
    sent = value("progress_sse_stream_bytes_total")
    metrics.written(big, 64 * 1024)
    pieces = [big[at : at + 64 * 1024] for at in range(0, len(big), 64 * 1024)]
    assert len(pieces) == 2
    assert value("progress_sse_stream_bytes_total") == sent + sum(len(b"%x\r\n%b\r\n" % (len(p), p)) for p in pieces)


# -- who may scrape ---------------------------------------------------------------------------


async def status_of(server: Server, path: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with server.session.get(server.url(path), headers=headers) as resp:
        return resp.status


async def test_with_tokens_on_metrics_need_an_operator_or_the_scraper_s_token(
    make_server: Any, settings: Settings
) -> None:
    server: Server = await make_server(settings.with_(secret=SECRET, metrics_token=SCRAPER))
    operator = operator_token(key=SECRET, ttl=60)
    assert await status_of(server, "/metrics") == 401
    assert await status_of(server, "/metrics", watch_token(["t"], key=SECRET, ttl=60)) == 403
    assert await status_of(server, "/metrics", "not-the-scrapers-token-0123456789") == 401
    assert await status_of(server, "/metrics", SCRAPER[:-1]) == 401
    assert await status_of(server, f"/metrics?token={SCRAPER}") == 401, "the scraper's token goes in the header"
    assert await status_of(server, "/metrics", operator) == 200
    assert await status_of(server, "/metrics", SCRAPER) == 200
    # The scraper's token is for /metrics alone.
    assert await status_of(server, "/tasks", SCRAPER) == 401
    assert await status_of(server, "/tasks", operator) == 200

    without: Server = await make_server(settings.with_(secret=SECRET))
    assert await status_of(without, "/metrics", SCRAPER) == 401, "no scraper's token set: a JWT it must be"
    assert await status_of(without, "/metrics", operator) == 200


async def test_without_keys_metrics_are_open_like_every_route(make_server: Any, settings: Settings) -> None:
    server: Server = await make_server(settings)
    assert await status_of(server, "/metrics") == 200
    async with server.session.head(server.url("/metrics")) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"


def test_the_scraper_s_token_is_checked_and_never_repeated() -> None:
    assert Settings.from_env({"PROGRESS_SSE_METRICS_TOKEN": SCRAPER}).metrics_token == SCRAPER
    assert Settings().metrics_token is None
    for bad in ("short-0123456", "has a space-0123456789", "tab\tin-it-0123456789"):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"PROGRESS_SSE_METRICS_TOKEN": bad})
        assert str(refused.value).startswith("PROGRESS_SSE_METRICS_TOKEN is not valid")
        assert bad not in str(refused.value)


# -- `progress-sse web --workers 2` -------------------------------------------------------------


@pytest.fixture
def group_of_two(settings: Settings, redis_client: redis.Redis) -> Iterator[Group]:
    """Two processes on one port, on a key prefix of their own."""
    prefix = f"{settings.key_prefix}-wm{uuid.uuid4().hex[:6]}"
    running = start_group(settings.with_(key_prefix=prefix), free_port())
    try:
        running.wait_serving()
        yield running
    finally:
        if running.process.poll() is None:  # a test that failed: stopped as a platform would
            running.process.terminate()
            try:
                running.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait(timeout=30)
        found = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
        if found:
            redis_client.delete(*found)


def multiprocess_dir(pid: int) -> Path:
    """The metrics directory the group handed its process `pid`."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [value] = [entry.split(b"=", 1)[1] for entry in environ if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.decode())


def test_a_process_that_ended_leaves_the_gauges_sums_and_not_the_counters(tmp_path: Path) -> None:
    """Two processes one after the other on one directory, as in a group: the first
    counts and ends (`process_ended`, as each process of `web --workers N` does when
    it stops); the second's scrape sums its counters with the first's, its gauges alone."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    counting = "from progress_sse.web import metrics as m; m.STREAMS_OPEN.inc({}); m.STREAM_FRAMES.inc({}); "
    first = counting.format(3, 5) + "m.process_ended()"
    second = counting.format(2, 1) + "import sys; sys.stdout.write(m.exposition().decode())"
    subprocess.run([sys.executable, "-c", first], env=env, check=True, timeout=60)
    done = subprocess.run([sys.executable, "-c", second], env=env, check=True, timeout=60, stdout=subprocess.PIPE)
    summed = Scrape(done.stdout.decode())
    assert summed.open == 2
    assert summed.frames == 6


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the processes' environment in /proc")
async def test_with_two_processes_a_scrape_of_either_is_the_sum_of_both(
    group_of_two: Group, redis_client: redis.Redis
) -> None:
    group = group_of_two
    publisher = Publisher.from_settings(group.settings)
    directory = multiprocess_dir(group.children[1])
    assert directory == multiprocess_dir(group.children[2]) and directory.is_dir()
    try:
        task_id = f"wm-{uuid.uuid4().hex}"
        publisher.publish(make_event(task_id, "demo.count", State.QUEUED))
        async with AsyncExitStack() as stack:
            readers = await streams_on_both(stack, group, redis_client, task_id)
            # Each scrape on a new connection, which the kernel hands to either process:
            # each serves only some of the streams, and every scrape says all of them.
            for _ in range(4):
                async with aiohttp.ClientSession() as session:
                    now = await scrape(session, group.url("/metrics"))
                assert now.open == len(readers)
                assert now.responses("task_events", 200) == len(readers)
                assert now.value("progress_sse_hub_subscriptions") == 2, "the task's channel, in each process"
                assert now.value("progress_sse_hub_connects_total") == 2
                assert now.frames >= len(readers)
            publisher.publish(make_event(task_id, "demo.count", State.SUCCESS))
            for reader in readers:
                assert [event.event for event in await reader.rest()] == ["success"]

        async def closed() -> bool:
            async with aiohttp.ClientSession() as session:
                return (await scrape(session, group.url("/metrics"))).open == 0

        await wait_until(closed, what="every process's streams closed, in the sum")
        async with aiohttp.ClientSession() as session:
            after = await scrape(session, group.url("/metrics"))
        assert after.frames >= 2 * len(readers), "each stream's first frame, and its success"
        assert after.value("progress_sse_hub_events_received_total", state="success", channel="task") == 2
    finally:
        publisher.client.close()
    status, output = group.stop()
    assert status == 0, output
    assert not directory.exists(), "the group removes its metrics directory"


async def test_events_stored_are_counted_by_state_in_redis_the_same_for_every_process(
    make_server: Any, settings: Settings, keys: Keys, publisher: Publisher
) -> None:
    """The write script counts what it stores, whoever publishes (here a publisher
    as a worker's is): two web processes of the same Redis report the same totals."""
    one: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    other: Server = await make_server(settings.with_(key_prefix=keys.prefix))
    stored = "progress_sse_events_stored_total"
    before = await scraped(one)
    task_id = f"metrics-{uuid.uuid4().hex}"
    for state in (State.QUEUED, State.STARTED, State.PROGRESS, State.PROGRESS, State.SUCCESS):
        publisher.publish(make_event(task_id, "demo.count", state))
    publisher.publish(make_event(task_id, "demo.count", State.PROGRESS))  # refused after the end: not stored
    after, elsewhere = await scraped(one), await scraped(other)
    moved = {state: after.value(stored, state=state) - before.value(stored, state=state) for state in State}
    assert moved == {state: {"queued": 1, "started": 1, "progress": 2, "success": 1}.get(state, 0) for state in State}
    assert all(elsewhere.value(stored, state=state) == after.value(stored, state=state) for state in State)

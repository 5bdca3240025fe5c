"""A Redis behind Sentinel (`redis+sentinel://`): the web, the worker's publisher
and the CLI's settings take the URL, and a failover to a replica that lagged
behind never lets a client skip an event without a reset (docs/protocol.md,
"Cursors"; the guarantee is in src/progress_sse/history.py).

The master, its replica and the Sentinel are redis-servers of the test's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from progress_sse.config import ConfigError, Settings
from progress_sse.connections import sync_client
from progress_sse.cursors import Position, parse_id
from progress_sse.events import CURSOR_UNKNOWN, HISTORY_LOST, make_event
from progress_sse.keys import Keys
from progress_sse.redis_urls import SentinelURL, from_kombu, parse_sentinel
from progress_sse.worker.publisher import CONNECTION_ERRORS, Publisher

from .conftest import Server, Worker
from .redis_servers import SentinelGroup
from .sse import SSEEvent, SSEReader, follow

WAIT = 30.0  # an upper bound; a pass never waits this long


def test_the_url_names_the_sentinels_the_service_and_the_database() -> None:
    assert parse_sentinel("redis+sentinel://s1:26380,s2,[::1]:7000/progress/3") == SentinelURL(
        (("s1", 26380), ("s2", 26379), ("::1", 7000)), "progress", 3
    )
    where = parse_sentinel("redis+sentinel://:s%40cret@s1/progress?sentinel_password=x")
    assert (where.password, where.db, where.sentinel_password) == ("s@cret", 0, "x")
    assert where.kombu() == (
        "sentinel://:s%40cret@s1:26379/0",
        {"master_name": "progress", "sentinel_kwargs": {"password": "x", "username": None}},
    )


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://s1:26380,s2,[::1]:7000/progress/3", "redis+sentinel://:a%2Fb%3Bc@s1/my%20master"],
)
def test_an_app_s_kombu_sentinel_broker_reads_back_as_the_same_url(url: str) -> None:
    """`install(app)` sends events to the app's broker when REDIS_URL is unset: a
    broker behind Sentinel, in kombu's form, is the same Redis."""
    where = parse_sentinel(url)
    assert parse_sentinel(from_kombu(*where.kombu()) or "") == where
    assert from_kombu("redis://localhost:6379/0", {}) is None
    assert from_kombu("sentinel://s1:26379", {}) is None, "kombu needs master_name"


@pytest.mark.parametrize("password", ["a/b;c", "a#b", "p%41ss", "sp ace@:"])
def test_kombu_reads_back_the_password_it_is_given(password: str) -> None:
    from kombu.utils.url import parse_url

    url, _ = SentinelURL((("s1", 26379), ("s2", 26380)), "progress", 2, password=password).kombu()
    first, second = url.split(";")
    assert parse_url(first)["password"] == password
    assert (parse_url(second)["hostname"], parse_url(second)["port"]) == ("s2", 26380)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1", "service name"),
        ("redis+sentinel:///progress", "no Sentinel address"),
        ("redis+sentinel://s1/progress/zero", "database must be a number"),
        ("redis+sentinel://s1:port/progress", "valid port"),
        ("redis+sentinel://s1/progress?master=x", "unknown option"),
    ],
)
def test_a_wrong_url_is_refused_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env({"REDIS_URL": url})


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "sentinel")
    try:
        group.start()
        yield group
    finally:
        group.stop()


class Case:
    """A web server and the worker's publisher, both on the Sentinel's URL, and a
    task that is queued and started."""

    def __init__(self, server: Server, publisher: Publisher) -> None:
        self.server, self.publisher = server, publisher
        self.task_id = str(uuid.uuid4())
        publish_through(publisher, self.task_id, "queued")
        publish_through(publisher, self.task_id, "started")

    async def publish(self, state: str, **kwargs: Any) -> str:
        return await asyncio.to_thread(publish_through, self.publisher, self.task_id, state, **kwargs)


@pytest.fixture
async def case(sentinel_group: SentinelGroup, make_server: Any, settings: Settings) -> AsyncIterator[Case]:
    own = settings.with_(redis_url=sentinel_group.url, key_prefix=f"pst-sentinel-{uuid.uuid4().hex[:6]}")
    publisher = Publisher(sync_client(own.redis_url), Keys(own.key_prefix))
    try:
        yield Case(await make_server(own), publisher)
    finally:
        publisher.client.close()


def publish_through(publisher: Publisher, task_id: str, state: str, timeout: float = WAIT, **kwargs: Any) -> str:
    """As the worker's outbox does while a failover is under way: try again until
    the new master answers."""
    deadline = time.monotonic() + timeout
    event = make_event(task_id, "demo.count", state, **kwargs)
    while True:
        try:
            cursor = publisher.publish(event)
            assert cursor is not None
            return cursor
        except CONNECTION_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.e2e
@pytest.mark.fault
@pytest.mark.timeout(120)
async def test_an_open_stream_is_reset_by_a_failover_to_a_replica_that_lagged(
    sentinel_group: SentinelGroup, case: Case
) -> None:
    async with case.server.session.get(case.server.url(f"/tasks/{case.task_id}/events")) as resp:
        assert resp.status == 200
        reader = SSEReader(resp)
        first = await reader.next_event(WAIT)
        assert first is not None and first.event == "started"

        handed_out = await lag_behind(sentinel_group, case)
        seen = await reader.until(lambda e: e.payload.get("current") == 3, WAIT)
        assert seen[-1].id == str(handed_out)

        await asyncio.to_thread(sentinel_group.fail_over)
        after = parse_id(await case.publish("progress", current=4, total=10))
        # The replica never saw progress 1..3: its sequence is behind the numbers
        # handed out, and the same numbers come again, under a new name.
        assert after.n <= handed_out.n, "the test needs a replica that lagged behind"
        assert after.epoch != handed_out.epoch

        reset = await reader.next_event(WAIT)
        assert reset is not None and reset.event == "reset", reset
        assert reset.payload["reason"] == HISTORY_LOST
        # Then the current state: `started` as the replica had it (a state of the
        # old history), or progress 4 if it was stored by then; progress 4 comes
        # either way, with its number in the new history.
        states = await reader.until(lambda e: e.payload.get("current") == 4, WAIT)
        assert [e.event for e in states] in (["started", "progress"], ["progress"]), states
        assert states[-1].id == str(after)
        await case.publish("success", current=10, total=10)
        end = await reader.next_event(WAIT)
        assert end is not None and end.event == "success"
        assert parse_id(str(end.id)).epoch == after.epoch


@pytest.mark.e2e
@pytest.mark.fault
@pytest.mark.timeout(120)
async def test_a_failover_to_a_replica_that_lagged_never_hands_out_a_number_twice(
    sentinel_group: SentinelGroup, case: Case
) -> None:
    """No stream is open while the master fails, so no web process hears the
    numbers go back: only the rule of src/progress_sse/history.py stands between
    a client that was away and a silent skip, once the new master passed its number."""
    handed_out = await lag_behind(sentinel_group, case)
    assert handed_out.n == 5  # queued, started, progress 1..3: the last three lost with the master

    await asyncio.to_thread(sentinel_group.fail_over)
    again = [parse_id(await case.publish("progress", current=i, total=10)) for i in (4, 5, 6, 7)]
    assert again[0].n <= handed_out.n < again[-1].n, "the new master must give out the same numbers again"

    frames = await first_frames(case.server, f"/tasks/{case.task_id}/events", str(handed_out), 2)
    assert frames[0].event == "reset", f"a silent resume from {handed_out}: {frames}"
    assert frames[0].payload["reason"] == CURSOR_UNKNOWN
    assert (frames[1].id, frames[1].payload["current"]) == (str(again[-1]), 7)


async def lag_behind(sentinel_group: SentinelGroup, case: Case) -> Position:
    """Stop the replica, then store progress 1..3 on the master alone: the last
    number handed out."""
    sentinel_group.lag()
    for i in (1, 2, 3):
        last = await case.publish("progress", current=i, total=10)
    return parse_id(last)


async def first_frames(server: Server, path: str, cursor: str, count: int) -> list[SSEEvent]:
    """The first `count` frames of a stream resumed from `cursor`, coming back as
    EventSource does while the server says to retry (its reads meet the failover)."""
    async with asyncio.timeout(WAIT):
        while True:
            async with server.session.get(server.url(path), headers={"Last-Event-ID": cursor}) as resp:
                assert resp.status == 200
                reader = SSEReader(resp)
                frames: list[SSEEvent] = []
                while len(frames) < count and (frame := await reader.next_event(WAIT)) is not None:
                    frames.append(frame)
                if frames:
                    return frames
            await asyncio.sleep(0.5)  # the `retry:` of the answer, shortened: a client's manners


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_real_worker_runs_a_task_through_the_sentinel_s_master(
    sentinel_group: SentinelGroup, make_server: Any, settings: Settings, output_dir: Path
) -> None:
    """`progress-sse worker` with only REDIS_URL behind Sentinel: the broker is the
    same Redis, in kombu's form, whatever Celery finds in its environment."""
    own = settings.with_(
        redis_url=sentinel_group.url, broker_url=sentinel_group.url, key_prefix=f"pst-sentinel-{uuid.uuid4().hex[:6]}"
    )
    worker = Worker(own, output_dir / "sentinel-worker.log")
    try:
        await asyncio.to_thread(worker.wait_ready)
        server: Server = await make_server(own)
        task_id = await server.start_task("demo.count", n=3, delay=0.05)
        frames = await follow(server.session, server.url(f"/tasks/{task_id}/events"), [task_id], cursor="0")
        assert [f.event for f in frames][:2] == ["queued", "started"]
        assert frames[-1].event == "success" and frames[-1].payload["result"] == {"processed": 3}
    finally:
        worker.stop()


def test_the_worker_side_and_the_broker_follow_the_sentinel_url(sentinel_group: SentinelGroup) -> None:
    from progress_sse.worker.celery_app import make_celery

    settings = Settings.from_env({"REDIS_URL": sentinel_group.url})
    assert settings.broker_url == sentinel_group.url
    client = sync_client(settings.redis_url)
    try:
        assert client.ping()
        assert client.connection_pool.get_master_address()[1] == sentinel_group.master_port  # type: ignore[attr-defined]
    finally:
        client.close()
    app = make_celery(settings)
    try:
        assert app.conf.broker_transport_options == {"master_name": SentinelGroup.SERVICE}
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            assert connection.transport.driver_type == "redis"
    finally:
        app.close()
    assert isinstance(redis.Redis, type)

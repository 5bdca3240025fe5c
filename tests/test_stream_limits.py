"""Streams under load and faults: the stream limit, Redis down, HEAD, frozen clients
and reads shared by streams opening together. Real server, real Redis (a private
redis-server where the test stops it), raw sockets for clients that stop reading.

The rule throughout (docs/protocol.md, "When a stream cannot be served now"): a
stream that cannot be served gets `200` with a `retry:` delay and ends, which a
standard EventSource retries, never an error status it would take as final.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from progress_sse.cli.embedded import EmbeddedRedis
from progress_sse.config import Settings
from progress_sse.cursors import Position
from progress_sse.events import State, make_event
from progress_sse.web import HUB, STREAMS
from progress_sse.web.delivery import RETRY_LATER_MS, SharedReads
from progress_sse.web.store import Start
from progress_sse.worker.publisher import Publisher

from .conftest import Server, wait_until
from .sse import SSEReader

pytestmark = pytest.mark.fault

RETRY = re.compile(rb"^: .+\nretry: (\d+)\n\n$")


def new_task(publisher: Publisher, task_id: str) -> None:
    assert publisher.publish(make_event(task_id, "demo.count", State.QUEUED)) is not None
    assert publisher.publish(make_event(task_id, "demo.count", State.STARTED)) is not None


async def told_to_retry(resp: aiohttp.ClientResponse) -> int:
    """The stream answered `200`, `retry: <ms>` and its end: the delay."""
    assert resp.status == 200 and resp.content_type == "text/event-stream", resp.status
    body = await asyncio.wait_for(resp.read(), 10)
    match = RETRY.match(body)
    assert match, body
    delay = int(match.group(1))
    assert RETRY_LATER_MS[0] <= delay <= RETRY_LATER_MS[1]
    return delay


async def test_beyond_the_stream_limit_a_stream_is_told_to_retry(
    make_server: Callable[..., Any], settings: Settings, publisher: Publisher
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=publisher.keys.prefix, max_streams=1))
    task_id = "limit-" + str(id(server))
    new_task(publisher, task_id)
    url = server.url(f"/tasks/{task_id}/events")
    async with server.session.get(url) as first:
        reader = SSEReader(first)
        assert (await reader.next_event()) is not None  # open, and holding the one slot
        async with server.session.get(url) as second:
            await told_to_retry(second)
    await wait_until(lambda: server.app[STREAMS].open == 0, what="the first stream to close")
    async with server.session.get(url) as third:  # the slot is free again
        assert third.status == 200
        assert (await SSEReader(third).next_event()) is not None


async def test_head_on_a_stream_is_its_headers_alone(
    make_server: Callable[..., Any], settings: Settings, publisher: Publisher
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=publisher.keys.prefix))
    task_id = "head-" + str(id(server))
    new_task(publisher, task_id)
    for path in (f"/tasks/{task_id}/events", f"/events?task={task_id}"):
        async with server.session.head(server.url(path)) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            assert await asyncio.wait_for(resp.read(), 5) == b""
    assert server.app[STREAMS].open == 0 and server.app[HUB].watcher_count == 0, "nothing held"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    redis_server = EmbeddedRedis(tmp_path)
    redis_server.start()
    try:
        yield redis_server
    finally:
        redis_server.stop()
        redis_server.cleanup()


async def test_with_redis_down_a_new_stream_is_told_to_retry_and_served_once_it_is_back(
    make_server: Callable[..., Any], settings: Settings, own_redis: EmbeddedRedis
) -> None:
    own = settings.with_(redis_url=own_redis.url, broker_url=own_redis.url)
    server: Server = await make_server(own)
    publisher = Publisher.from_settings(own)
    task_id = "outage-task"
    new_task(publisher, task_id)
    hub = server.app[HUB]
    await wait_until(lambda: hub.connections == 1, what="the hub's first connection")

    own_redis.stop()
    await wait_until(lambda: hub.down, timeout=30, what="the hub to see Redis gone")
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        await told_to_retry(resp)
    async with server.session.get(server.url(f"/tasks/{task_id}")) as resp:
        assert resp.status == 503, "a JSON read still says 503: a fetch() caller retries on its own"

    own_redis.start()  # same port, empty: the task is stored again
    new_task(publisher, task_id)
    await wait_until(lambda: not hub.down, timeout=30, what="the hub to reconnect")
    async with server.session.get(server.url(f"/tasks/{task_id}/events")) as resp:
        assert resp.status == 200
        assert (await SSEReader(resp).next_event()) is not None
    publisher.client.close()


def frozen_client(port: int, path: str) -> socket.socket:
    """A client that sends its request, reads the response's head, then stops reading."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the server closed before the response's head"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


async def test_a_client_that_stops_reading_is_let_go_and_holds_no_one_up(
    make_server: Callable[..., Any], settings: Settings, publisher: Publisher
) -> None:
    server: Server = await make_server(
        settings.with_(key_prefix=publisher.keys.prefix, write_timeout=1.0, stream_buffer=64 * 1024)
    )
    streams, hub = server.app[STREAMS], server.app[HUB]
    task_id = "frozen-" + str(id(server))
    new_task(publisher, task_id)
    path = f"/tasks/{task_id}/events"
    frozen = await asyncio.to_thread(frozen_client, server.server.port, path)
    try:
        async with server.session.get(server.url(path)) as resp:
            reader = SSEReader(resp)
            await reader.next_event()
            await wait_until(lambda: streams.open == 2, what="both streams open")
            big = "x" * 50_000  # events of 50 KB, until the frozen client's socket buffers are full
            i = 0
            while streams.stalled == 0:
                assert i < 2_000, "100 MB sent and the frozen client is still held"
                i += 1
                event = make_event(task_id, "demo.count", State.PROGRESS, current=i, message=big)
                # In a thread: the server runs on this event loop meanwhile.
                assert await asyncio.to_thread(publisher.publish, event) is not None
            assert publisher.publish(make_event(task_id, "demo.count", State.SUCCESS, current=i))
            frames = await reader.rest(timeout=60)
        # The reading client, slower than 10 MB at once too, had its waiting progress
        # collapse: what it got is in order, ends with the latest and the success.
        currents = [f.payload["current"] for f in frames if f.event == "progress"]
        assert currents == sorted(set(currents)) and currents[-1] == i, currents
        assert frames[-1].event == "success"
        assert streams.stalled == 1
        await wait_until(lambda: hub.watcher_count == 0, what="its watcher released")
        assert streams.open == 0
    finally:
        frozen.close()


class _Reads:
    """A store whose reads wait until let go, counting them."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def start(self, ids: Any, cursor: Any, fresh: Any, *, replay: bool) -> Start:
        self.calls += 1
        await self.release.wait()
        return Start([], upto={0: Position("e", self.calls)}, resumed=False)


class _Hub:
    def __init__(self) -> None:
        self.generation = 5


async def test_streams_share_a_read_only_if_it_was_issued_after_they_subscribed() -> None:
    """Hub.watch moves the generation on for each watcher it registers; a read
    records the generation when it is issued, one turn of the loop after it was
    asked for."""
    reads, hub = _Reads(), _Hub()
    shared = SharedReads(reads, hub)  # type: ignore[arg-type]

    async def ask(cursor: int, not_before: int) -> asyncio.Future[Start]:
        asked = asyncio.ensure_future(
            shared.start(["t"], Position("e", cursor), (), replay=True, not_before=not_before)
        )
        await asyncio.sleep(0)  # its turn: it joins a read or starts one
        return asked

    first = await ask(7, 5)
    hub.generation = 6  # a watcher registered before the read was issued: it may join
    early = await ask(7, 6)
    for _ in range(10):  # the read is issued a turn after it was asked for
        if reads.calls:
            break
        await asyncio.sleep(0)
    assert reads.calls == 1, "issued, at generation 6"
    joined = await ask(7, 6)
    hub.generation = 7  # registered after the read was issued: it may have missed an event
    late = await ask(7, 7)
    other_cursor = await ask(8, 5)
    reads.release.set()
    results = await asyncio.gather(first, early, joined, late, other_cursor)
    assert reads.calls == 3 and shared.shared == 2
    assert results[0] is results[1] is results[2], "one read, shared by those it covers"
    assert results[3] is not results[0] and results[4] is not results[0]


async def test_a_shared_read_outlives_the_stream_that_began_it() -> None:
    reads, hub = _Reads(), _Hub()
    shared = SharedReads(reads, hub)  # type: ignore[arg-type]
    first = asyncio.ensure_future(shared.start(["t"], None, (), replay=True, not_before=0))
    await asyncio.sleep(0)
    joined = asyncio.ensure_future(shared.start(["t"], None, (), replay=True, not_before=0))
    await asyncio.sleep(0)
    first.cancel()  # its client went away
    reads.release.set()
    assert (await joined).upto == {0: Position("e", 1)}


async def test_streams_opening_together_share_their_first_read_and_miss_nothing(
    make_server: Callable[..., Any], settings: Settings, publisher: Publisher
) -> None:
    server: Server = await make_server(settings.with_(key_prefix=publisher.keys.prefix))
    task_id = "together-" + str(id(server))
    new_task(publisher, task_id)
    url = server.url(f"/tasks/{task_id}/events")

    async def watch() -> list[Any]:
        async with server.session.get(url, headers={"Last-Event-ID": "0"}) as resp:
            return [(f.id, f.event) for f in await SSEReader(resp).rest(timeout=30)]

    watchers = [asyncio.ensure_future(watch()) for _ in range(50)]
    await wait_until(lambda: server.app[STREAMS].open == 50, what="50 streams open")
    assert publisher.publish(make_event(task_id, "demo.count", State.SUCCESS)) is not None
    seen = await asyncio.gather(*watchers)
    assert all(s == seen[0] for s in seen) and [e for _, e in seen[0]] == ["queued", "started", "success"]
    assert server.app[STREAMS].reads.shared > 0, "some streams shared a read"

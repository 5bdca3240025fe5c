"""`text/event-stream` responses: one task's, many tasks' and (with groups.py) a
group's all open in `EventStream.opened` and run on one live loop, `Live`.

Order of work, and why it is gapless and exactly-once:

1. `hub.watch()` registers the watcher and returns once Redis confirmed the
   subscription, so from here on every new event reaches the watcher's inbox.
2. `store.start()` reads, in one transaction per partition, each task's current
   state (or its log after the client's cursor) and the partition's position
   `upto`. Every event of these tasks at or before `upto` is thereby sent or
   summed up by a state.
3. Live frames at or before the stream's position in their partition are
   dropped; every other one is sent and moves that position. Numbers come from
   one sequence per partition, shared by its tasks, and pub/sub keeps publish
   order on a channel's node, so within a partition the numbers a stream sends
   only increase. `Last-Event-ID` is one cursor that covers every task on the
   stream: on one Redis (one partition) the last event's id, on a cluster the
   stream's place in each partition (`stamp`).
4. On a resync signal (subscriber reconnect, an inbox overflow, or the hub hearing
   that the history changed) the log after the position is read the same way.
5. A position names its history (src/progress_sse/cursors.py). When that history
   is gone (the read in 4 finds another epoch, or a sequence that went back), or
   the client's cursor names no place in the current one (`cursor_unknown`), the
   stream sends a reset frame and every task's current state, and goes on from
   the new history's position: never silent, never a silent skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import cursors
from ..cursors import Cursor, Places, Position
from ..events import PING, Frame, reset_frame, unknown_task_frame
from ..task_names import NameFilter
from . import metrics
from .access import GRANT, Access, authorize, authorize_feed, authorize_watch, frame_variant
from .errors import UNAVAILABLE, error
from .hub import Direct, FeedWatcher, Hub, Hubs, Signal, Watcher, news
from .incidents import Incidents
from .store import Catchup, Start, Store

log = logging.getLogger(__name__)

# A stream that cannot be served now (Redis down, the process at its stream limit)
# answers 200 with only `retry: <ms>` and ends: EventSource treats any error status
# as final, but comes back after an ended 200. The delay is spread at random so the
# clients a failure sent away do not return at the same instant.
RETRY_LATER_MS = (1_000, 5_000)
# Streams the heartbeat looks at before it lets the loop run something else: a
# few milliseconds of pings at most.
PINGS_AT_ONCE = 256
# A ping in HTTP/1.1 chunked framing: what the heartbeat writes straight to a socket.
PING_CHUNK = b"%x\r\n%b\r\n" % (len(PING), PING)
# The most a stream writes at once: each piece must drain within the write timeout.
# The size of asyncio's default high-water mark, so one piece waits on one drain.
WRITE_PIECE = 64 * 1024

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and proxies that copy it) would otherwise buffer the stream.
    "X-Accel-Buffering": "no",
}


def parse_cursor(request: web.Request, partitions: int = 1) -> Cursor | None:
    """`Last-Event-ID` (winning) or `?last_event_id=`: see cursors.parse."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    return cursors.parse(raw, partitions=partitions)


def stamp(frames: list[Frame], places: Places, *, composite: bool) -> list[Frame]:
    """`frames`, sent in this order on one stream, with the ids they carry there;
    `places` (the stream's place before them, in each partition) moves past each.
    On one Redis a frame's id is its own `<epoch>-<n>`, the same on every stream,
    so the frame is sent as it is. On a cluster it is the stream's place in every
    partition after it (cursors.composite), and the frame is copied with that id.
    A place never goes back: a task added to a stream may come with a state
    numbered before what the stream has had."""
    if not composite:
        return frames
    stamped = []
    for frame in frames:
        if frame.epoch is not None:
            at = places.get(frame.partition)
            if at is None or at.epoch != frame.epoch or at.n < frame.seq:
                places[frame.partition] = Position(frame.epoch, frame.seq)
            frame = frame.with_cursor(cursors.composite(places, frame.partition))
        stamped.append(frame)
    return stamped


@dataclass(slots=True)
class Batch:
    """Frames a stream writes together. `head` goes first: a reset frame, when these
    frames start over from the current states. Before it, `notices`: broadcast
    notices that came meanwhile (web/notices.py), which are no task's frames."""

    frames: list[Frame]
    head: bytes = b""
    notices: bytes = b""
    # After the frames: an `id:` alone, which moves the client's cursor past what a
    # filtered feed passed (Live.pass_by).
    trailer: bytes = b""


class ClientStalled(Exception):
    """The client accepted no bytes for the write timeout: it was disconnected."""


class Live:
    """The live part of every stream, one task, many or a group: wait, ping, batch,
    resync, close and drop what the stream already has. Each exists only here.

    `batches(tasks)` yields the new frames of `tasks` (a callable: the set may
    shrink as tasks end) in order, each batch what had arrived by then, so a
    client that fell behind catches up in one write. With `direct`, while the
    stream waits with nothing to do, the hub writes live frames straight to its
    socket (web/hub.py `Direct`): most frames of a stream that keeps up never
    wake its task. It ends when the hub closes the watcher (shutdown), or when
    the token the stream was opened with expires (`expires`, a Unix time): the
    client's reconnect then needs a new one. The caller stops it when it has what
    it needs. One timer for every stream writes a ping to those that wrote
    nothing for `heartbeat` seconds (EventStream, `ping_if_quiet`).

    A write the client does not take within `write_timeout` seconds (it stopped
    reading, and the socket's buffers are full) aborts the connection and raises
    ClientStalled: its watcher and subscription are released at once.
    """

    __slots__ = (
        "_clock",
        "_deadline",
        "composite",
        "heartbeat",
        "request",
        "response",
        "store",
        "variant",
        "watcher",
        "write_timeout",
    )

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watcher: Watcher,
        store: Store,
        *,
        heartbeat: float,
        write_timeout: float = 30.0,
        expires: float = math.inf,
        variant: bool | None = None,
    ) -> None:
        self.request, self.response, self.watcher, self.store = request, response, watcher, store
        self.heartbeat, self.write_timeout, self.variant = heartbeat, write_timeout, variant
        self.composite = store.keys.partitions > 1
        self._clock = asyncio.get_running_loop().time
        watcher.last_write = self._clock()
        self._deadline = self._clock() + (expires - time.time())  # on the loop's clock

    async def write(self, data: bytes) -> None:
        # In pieces, each with the whole timeout: a client that reads slowly but
        # steadily is not one that accepts nothing.
        for start in range(0, len(data), WRITE_PIECE):
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.response.write(data[start : start + WRITE_PIECE])
            except TimeoutError:
                transport = self.request.transport
                if transport is not None:
                    transport.abort()
                raise ClientStalled(f"no bytes accepted for {self.write_timeout:g}s") from None
        self.watcher.last_write = self._clock()
        metrics.written(data, WRITE_PIECE)

    def ping_if_quiet(self, now: float) -> None:
        """The heartbeat: a stream that wrote nothing for `heartbeat` seconds and is
        waiting gets a ping, straight to its socket. One whose socket is not taking
        bytes is woken to write it its own way (Signal.PING), with the write
        timeout that lets go of a stalled client. A stream that is not waiting is
        busy writing, which is no silence."""
        watcher = self.watcher
        if now - watcher.last_write < self.heartbeat or not watcher.idle or now >= self._deadline:
            return
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]:
            transport.write(PING_CHUNK)
            metrics.STREAM_BYTES.inc(len(PING_CHUNK))
            watcher.last_write = now
        else:
            watcher.deliver(Signal.PING)

    async def send(self, frames: Iterable[Frame], before: bytes = b"", after: bytes = b"") -> None:
        """`before`, the frames as this stream's client may see them, then `after`, in one write."""
        await self.write(before + b"".join(frame.bytes_for(self.variant) for frame in frames) + after)

    async def send_batch(self, batch: Batch) -> None:
        await self.send(batch.frames, before=batch.notices + batch.head, after=batch.trailer)

    def stamped(self, frames: list[Frame], places: Places) -> list[Frame]:
        """See `stamp`."""
        return stamp(frames, places, composite=self.composite)

    async def batches(
        self,
        tasks: Callable[[], Collection[str]],
        places: Places,
        *,
        direct: bool = False,
        catchup: Callable[[Places], Awaitable[Catchup]] | None = None,
        restart: Callable[[str], Awaitable[tuple[Batch, Places]]] | None = None,
    ) -> AsyncGenerator[Batch, None]:
        """`places`: where the stream stands in each of its tasks' partitions, once
        what it sent first (a Start's frames) is sent: its frames' ids go on from
        there. `direct`: the hub may write live frames of `tasks` as they are
        (not for a group's stream, which sends aggregates; not on a cluster, where
        each stream gives a frame its own id). `catchup` reads what came after the
        stream's places, and `restart` starts it over after its history was lost:
        by default from `tasks`' logs and states (the all-tasks feed reads its own,
        web/feed.py)."""
        catchup = catchup or (lambda at: self.store.after(tasks(), at))
        restart = restart or (lambda reason: self.reset(tasks(), reason))
        at = dict(places)  # what the stream has: a live frame at or before it is no news
        # What the ids of the frames sent so far say it has (a cluster's: see `stamp`).
        ids = dict(places) if self.composite else {}
        # A feed's: where its client's cursor stands (a cluster's is `ids`), which an
        # `id:` alone moves past what it passed (`pass_by`).
        feed = isinstance(self.watcher, FeedWatcher)
        told = ids if self.composite else dict(places)
        left: set[tuple[int, str]] = set()  # histories this stream left: their stragglers are no news
        transport = self.request.transport
        if direct and not self.composite and transport is not None:
            # The hub moves `at` itself for each frame it writes: the same dict.
            self.watcher.direct = Direct(transport, self.variant, at, tasks, self._deadline)
        try:
            while not self.watcher.closed:
                now = self._clock()
                if now >= self._deadline:
                    return
                first = await self.watcher.next(None if math.isinf(self._deadline) else self._deadline - now)
                if first is None:
                    continue  # the token expired: the loop's test ends the stream
                batch: list[Frame] = []
                pinged = False
                notices = b""
                passed: dict[int, Position] = {}
                for item in [first, *self.watcher.pending()]:
                    if item is Signal.CLOSE:
                        break
                    if item is Signal.PING:
                        pinged = True
                        continue
                    if item is Signal.PASSED and feed:
                        passed.update(self.watcher.take_passed())  # type: ignore[attr-defined]  # a FeedWatcher
                        continue
                    if isinstance(item, bytes):
                        notices += item
                        continue
                    if isinstance(item, Frame):
                        verdict = news(item, at, tasks())
                        if verdict:
                            batch.append(item)
                            at[item.partition] = item.position  # type: ignore[assignment]  # it has an epoch
                        if verdict is not None or (item.partition, item.epoch) in left:
                            continue
                    # A resync, or a frame of a history this stream has not seen: read
                    # where its tasks stand since its position.
                    metrics.STREAM_RESYNCS.inc()
                    caught = await catchup(at)
                    if not caught.lost:
                        batch += caught.frames
                        at.update(caught.upto)
                        continue
                    if batch:
                        yield Batch(self.stamped(batch, ids))
                        batch = []
                    left.update((p, place.epoch) for p, place in at.items())
                    reset, upto = await restart(caught.reason)
                    reset.frames = self.stamped(reset.frames, {})
                    at.clear()
                    at.update(upto)
                    ids = dict(upto) if self.composite else {}
                    told = ids if self.composite else dict(upto)
                    yield reset
                stamped = self.stamped(batch, ids)
                trailer = self.pass_by(passed, at, told, stamped) if feed else b""
                if stamped or notices or trailer:
                    yield Batch(stamped, notices=notices, trailer=trailer)
                elif pinged:
                    await self.write(PING)
        finally:
            self.watcher.direct = None

    def pass_by(self, passed: dict[int, Position], at: Places, told: Places, sent: list[Frame]) -> bytes:
        """A feed's place moves past the entries its filter passed (hub.FeedWatcher),
        as a catch-up's read moves it past those it skipped; then its client is told
        with an `id:` alone, which EventSource takes as its cursor and dispatches
        nothing. `told`: the client's cursor before the frames `sent` now. b"" when
        the client's cursor is where the stream stands."""
        for partition, position in passed.items():
            mine = at.get(partition)
            if mine is not None and mine.epoch == position.epoch and position.n > mine.n:
                at[partition] = position
        if not self.composite:  # a cluster's `told` is its ids, which `stamped` moved
            for frame in sent:
                if frame.position is not None:
                    told[frame.partition] = frame.position
        lead = None
        for partition, place in at.items():
            mine = told.get(partition)
            if mine is not None and mine.epoch == place.epoch and place.n > mine.n:
                told[partition] = place
                lead = partition
        if lead is None:
            return b""
        cursor = cursors.composite(told, lead) if self.composite else str(told[lead])
        return f"id: {cursor}\n\n".encode()

    async def reset(self, tasks: Collection[str], reason: str) -> tuple[Batch, Places]:
        """Start over: a reset frame, then each task's current state (read now), and
        the places they are as of (the frames as the stream's loop ids them: `batches`)."""
        start = await self.store.start(sorted(tasks), None)
        missing = [t.task_id for t in start.tasks if not t.known]
        return Batch(start.frames(), reset_frame(reason, missing)), start.upto


@dataclass(slots=True)
class Opened:
    """A stream that passed its checks and is subscribed: see EventStream.opened."""

    request: web.Request
    streams: EventStream
    watcher: Watcher
    ids: list[str]
    cursor: Cursor | None
    response: web.StreamResponse | None = field(default=None, init=False)
    live: Live | None = field(default=None, init=False)
    # What the stream writes first once it began: a ping, and the latest notice.
    greeting: bytes = field(default=PING, init=False)

    async def start(self, fresh: Iterable[str] = (), *, replay: bool = True) -> Start:
        """Where each task stands for this stream (store.start from the client's
        cursor, replaying the events after it unless not `replay`), shared with the
        other streams opening on the same tasks from the same cursor."""
        return await self.streams.reads.start(
            self.ids, self.cursor, fresh, replay=replay, not_before=self.watcher.confirmed
        )

    async def begin(self) -> Live:
        """Send the response's headers: from here on the stream is the client's."""
        self.response = web.StreamResponse(headers=SSE_HEADERS)
        await self.response.prepare(self.request)
        self.live = self.streams.live(self.request, self.response, self.watcher)
        # Read with no await since the stream joined the broadcast (`live`): a notice
        # is either in this greeting or in the stream's inbox, not both.
        self.greeting = PING + self.streams.latest_notice()
        return self.live

    async def end(self) -> web.StreamResponse:
        assert self.response is not None
        await self.response.write_eof()
        return self.response

    def gone(self) -> web.StreamResponse:
        """The answer of a stream whose client `opened` let go (ClientStalled): the
        response as it was, on a connection already closed."""
        assert self.response is not None, "only a stream that began can stall"
        return self.response


class _Read:
    """One shared read: `issued` is the hub's generation when it was issued (None
    until then), `task` the read itself."""

    __slots__ = ("issued", "task")

    def __init__(self) -> None:
        self.issued: int | None = None
        self.task: asyncio.Task[Start] | None = None


class SharedReads:
    """Streams opening at once on the same tasks from the same cursor (a reconnect
    storm after a deploy) share one `store.start` read instead of queueing a read
    each for Redis connections.

    Sharing must not cost a gap: a stream may use a read only if the read was
    issued after the stream's watcher was registered and subscribed (the order
    web/hub.py's `watch` guarantees a read of its own). `Watcher.confirmed` is the
    hub's generation just after that; a read records the generation when it is
    issued. A read waits one turn of the event loop before it is issued, so that
    the streams whose subscriptions were confirmed together all join it."""

    def __init__(self, store: Store, hub: Hub | Hubs) -> None:
        self.store, self.hub = store, hub
        self._inflight: dict[tuple[Any, ...], _Read] = {}
        self.shared = 0  # reads saved (tests and benchmarks read it)

    async def start(
        self, ids: Sequence[str], cursor: Cursor | None, fresh: Iterable[str], *, replay: bool, not_before: int
    ) -> Start:
        key = (tuple(ids), cursor, frozenset(fresh), replay)
        found = self._inflight.get(key)
        if found is not None and found.task is not None and (found.issued is None or found.issued >= not_before):
            self.shared += 1
            return await asyncio.shield(found.task)
        read = _Read()
        read.task = asyncio.ensure_future(self._issue(read, list(ids), cursor, key[2], replay))
        self._inflight[key] = read
        read.task.add_done_callback(lambda done: self._finished(key, read))
        # Shielded: a client that goes away must not cancel the read the others share.
        return await asyncio.shield(read.task)

    async def _issue(
        self, read: _Read, ids: list[str], cursor: Cursor | None, fresh: frozenset[str], replay: bool
    ) -> Start:
        await asyncio.sleep(0)  # the streams registered in this turn may still join
        read.issued = self.hub.generation
        return await self.store.start(ids, cursor, fresh, replay=replay)

    def _finished(self, key: tuple[Any, ...], read: _Read) -> None:
        if self._inflight.get(key) is read:
            del self._inflight[key]
        if read.task is not None and not read.task.cancelled():
            read.task.exception()  # retrieved: an error is its waiters' to report


class EventStream:
    def __init__(
        self,
        hub: Hub | Hubs,
        store: Store,
        access: Access,
        *,
        heartbeat: float,
        write_timeout: float = 30.0,
        max_streams: int = 10_000,
        latest_notice: Callable[[], bytes] = bytes,
    ) -> None:
        self.hub = hub
        # The frame of the broadcast notice a stream that opens is sent (web/notices.py).
        self.latest_notice = latest_notice
        self.store = store
        self.access = access
        self.heartbeat = heartbeat
        self.write_timeout = write_timeout
        self.max_streams = max_streams
        self.reads = SharedReads(store, hub)
        self.open = 0  # streams open now
        self._lives: set[Live] = set()  # the streams that began: what the heartbeat looks after
        self._heartbeat: asyncio.Task[None] | None = None
        self.stalled = 0  # clients disconnected for accepting no bytes (tests read it)
        self.incidents = Incidents(log)

    @contextlib.asynccontextmanager
    async def opened(
        self,
        request: web.Request,
        task_ids: Sequence[str] | Callable[[], Awaitable[Sequence[str]]],
        *,
        group: str | None = None,
        feed: NameFilter | None = None,
    ) -> AsyncIterator[Opened]:
        """Where every stream starts, one task's, many tasks', a group's or the
        all-tasks feed (of the names `feed` lets through; web/feed.py), and every
        reconnect: its task ids, its watcher, subscribed, and the client's cursor.
        What each stream must check before it reads or watches anything belongs
        here, once, at the top: the token's scope (every task listed, the group,
        or the feed's names), before even a group's members are looked up (a callable
        `task_ids`), so no answer, not even a 404, comes before it.

        Here too, once for every stream: a HEAD gets the headers alone; a stream
        that cannot be served now (the process at its stream limit, Redis not
        answering before the response began) gets `try_later`; a client that
        stopped reading is let go quietly."""
        try:
            if feed is not None:
                authorize_feed(request, feed)
            elif group is not None:
                authorize(request, "groups", [group])
            elif not callable(task_ids):
                await authorize_watch(request, self.store, task_ids)  # one id outside the scope refuses it all
            else:
                raise TypeError("a stream of looked-up tasks is a group's: name it")
        except UNAVAILABLE as exc:  # a group's token looks its members' groups up
            log.warning("progress-sse could not open a stream of %s: %s", request.path, exc)
            raise try_later("Redis is not answering") from None
        if request.method == "HEAD":  # what a GET would start with, and nothing held open
            raise web.HTTPOk(text="", headers=SSE_HEADERS)
        if self.open >= self.max_streams:
            self.incidents.warning(
                "stream limit", "progress-sse is at its limit of %d open streams: new ones are told to retry", self.open
            )
            raise try_later("this process serves as many streams as it may")
        self.open += 1
        metrics.STREAMS_OPEN.inc()
        stream: Opened | None = None
        try:
            cursor = parse_cursor(request, self.store.keys.partitions)
            ids = list(await task_ids()) if callable(task_ids) else list(task_ids)
            watching = (
                self.hub.watch(ids) if feed is None else self.hub.watch((), self.hub.feed_watcher(feed), feed=True)
            )
            async with watching as watcher:
                stream = Opened(request, self, watcher, ids, cursor)
                yield stream
        except ClientStalled as exc:
            self.stalled += 1
            metrics.STREAMS_STALLED.inc()
            log.info("progress-sse disconnected a client of %s: %s", request.path, exc)
        except UNAVAILABLE as exc:
            if stream is not None and stream.response is not None and stream.response.prepared:
                # Mid-stream: no answer can follow the one begun. End the connection;
                # the client resumes from its cursor.
                log.warning("progress-sse ended a stream of %s: Redis failed mid-stream: %s", request.path, exc)
                if request.transport is not None:
                    request.transport.abort()
                return
            log.warning("progress-sse could not open a stream of %s: %s", request.path, exc)
            raise try_later("Redis is not answering") from None
        finally:
            self.open -= 1
            metrics.STREAMS_OPEN.dec()
            if stream is not None and stream.live is not None:
                self._lives.discard(stream.live)

    def live(self, request: web.Request, response: web.StreamResponse, watcher: Watcher) -> Live:
        """The live loop of `request`'s stream: it ends when the request's token
        expires, and writes frames as the token's holder may see them. The
        heartbeat looks after it until its stream ends (`opened`)."""
        live = Live(
            request,
            response,
            watcher,
            self.store,
            heartbeat=self.heartbeat,
            write_timeout=self.write_timeout,
            expires=request[GRANT].expires,
            variant=frame_variant(request, self.access),
        )
        self._lives.add(live)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="progress-sse heartbeat")
        return live

    def broadcast(self, frame: bytes) -> None:
        """A frame for every stream that began: a broadcast notice (web/notices.py)."""
        for live in list(self._lives):
            live.watcher.deliver(frame)

    async def _beat(self) -> None:
        """One timer for every stream: four times a heartbeat, each stream that wrote
        nothing for a heartbeat gets a ping (Live.ping_if_quiet). A quiet stream
        is pinged after one to 1.25 heartbeats; no stream keeps a timer of its own.
        Streams that opened together fall due together: the loop is handed back
        every PINGS_AT_ONCE streams, so live frames are not held up behind them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat / 4)
            lives = list(self._lives)
            for start in range(0, len(lives), PINGS_AT_ONCE):
                if start:
                    await asyncio.sleep(0)
                now = loop.time()
                for live in lives[start : start + PINGS_AT_ONCE]:
                    live.ping_if_quiet(now)

    async def close(self) -> None:
        """Stop the heartbeat (the app's cleanup: every stream has ended)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def serve(
        self, request: web.Request, task_ids: Sequence[str], *, single: bool, fresh: Iterable[str] = ()
    ) -> web.StreamResponse:
        fresh = frozenset(fresh)
        async with self.opened(request, task_ids) as stream:
            start = await stream.start(fresh)
            known = [t for t in start.tasks if t.known]
            unknown = [t.task_id for t in start.tasks if not t.known]
            # A client with a cursor knew these tasks: their history is gone, but a
            # worker may still run them, so they are watched. It is told by a reset
            # now, or was before this reconnect if the history is younger than a
            # task's keys live (else the task may just have expired). A task it adds
            # (`fresh`) or names without a cursor is one the server may never have known.
            lost = start.reset or (start.resumed and start.young)
            missing = [t for t in unknown if t not in fresh] if lost else []
            if single and not known and not missing:
                raise error(web.HTTPNotFound, f"There is no task {task_ids[0]!r} (or its history has expired).")
            frames = start.frames()
            waiting = {t.task_id for t in known if not t.terminal} | set(missing)
            if start.resumed and not waiting and not frames:
                return web.Response(status=204)  # EventSource stops reconnecting on 204

            live = await stream.begin()
            head = reset_frame(start.reset, missing) if start.reset else b""
            head += b"".join(unknown_task_frame(task_id) for task_id in unknown if task_id not in missing)
            await live.send(live.stamped(frames, dict(start.base)), before=stream.greeting + head)
            upto = start.upto
            # Sent: let go of what the stream started from (it may stay open for hours).
            del start, known, unknown, missing, frames, head
            if waiting:
                async with contextlib.aclosing(live.batches(lambda: waiting, upto, direct=True)) as batches:
                    async for batch in batches:
                        await live.send_batch(batch)
                        waiting.difference_update(frame.task_id for frame in batch.frames if frame.terminal)
                        if not waiting:
                            break
            return await stream.end()
        return stream.gone()


def try_later(reason: str) -> web.HTTPException:
    """A 200 that holds only `retry:` (a random delay in RETRY_LATER_MS) and ends."""
    delay = random.randint(*RETRY_LATER_MS)
    return web.HTTPOk(text=f": {reason}; retry in {delay} ms\nretry: {delay}\n\n", headers=SSE_HEADERS)

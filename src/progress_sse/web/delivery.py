"""`text/event-stream` responses: one task's, many tasks' and (with groups.py) a
group's all open in `EventStream.opened` and run on one live loop, `Live`.

Order of work, and why it is gapless and exactly-once:

1. `hub.watch()` registers the watcher and returns once Redis confirmed the
   subscription, so from here on every new event reaches the watcher's inbox.
2. `store.start()` reads, in one transaction, each task's current state (or its
   log after the client's cursor) and the shared sequence value `upto`. Every event
   of these tasks with a cursor <= `upto` is thereby sent or summed up by a state.
3. Live frames with a cursor <= the stream's position are dropped; every other one
   is sent and moves the position. Cursors come from one sequence shared by all
   tasks and pub/sub keeps publish order, so the ids a client sees only increase,
   and `Last-Event-ID` is one number that covers every task on the stream.
4. On a resync signal (subscriber reconnect, or an inbox overflow) the log after
   the position is read the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence

from aiohttp import web

from ..events import PING, Frame, unknown_task_frame
from .access import GRANT, Access, authorize, authorize_watch, frame_bytes
from .errors import error
from .hub import Hub, Signal, Watcher
from .store import Store

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and proxies that copy it) would otherwise buffer the stream.
    "X-Accel-Buffering": "no",
}


def parse_cursor(request: web.Request) -> int | None:
    """`Last-Event-ID` (winning) or `?last_event_id=`; anything malformed is no cursor."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


class Live:
    """The live part of every stream, one task, many or a group: wait, ping, batch,
    resync, close and drop what the stream already has. Each exists only here.

    `batches(tasks)` yields the new frames of `tasks` (a callable: the set may
    shrink as tasks end) in order, each batch what had arrived by then, so a
    client that fell behind catches up in one write. Between batches it writes a
    ping after `heartbeat` seconds without a write. It ends when the hub closes
    the watcher (shutdown), or when the token the stream was opened with expires
    (`expires`, a Unix time): the client's reconnect then needs a new one. The
    caller stops it when it has what it needs.
    """

    def __init__(
        self,
        response: web.StreamResponse,
        watcher: Watcher,
        store: Store,
        *,
        heartbeat: float,
        expires: float = math.inf,
        encode: Callable[[Frame], bytes] = lambda frame: frame.encoded,
    ) -> None:
        self.response, self.watcher, self.store, self.heartbeat = response, watcher, store, heartbeat
        self.encode = encode
        self._clock = asyncio.get_running_loop().time
        self._last_write = self._clock()
        self._deadline = self._clock() + (expires - time.time())  # on the loop's clock

    async def write(self, data: bytes) -> None:
        await self.response.write(data)
        self._last_write = self._clock()

    async def send(self, frames: Iterable[Frame], before: bytes = b"") -> None:
        """`before`, then the frames, as this stream's client may see them, in one write."""
        await self.write(before + b"".join(self.encode(frame) for frame in frames))

    async def batches(self, tasks: Callable[[], Collection[str]], position: int) -> AsyncGenerator[list[Frame], None]:
        while not self.watcher.closed:
            # Items the stream drops (duplicates) must not postpone the ping.
            now = self._clock()
            if now >= self._deadline:
                return
            wait = min(self._last_write + self.heartbeat, self._deadline) - now
            first = await self.watcher.next(max(0.0, wait))
            if first is None:
                if self._clock() < self._deadline:
                    await self.write(PING)
                continue
            batch: list[Frame] = []
            for item in [first, *self.watcher.pending()]:
                if item is Signal.CLOSE:
                    break
                if item is Signal.RESYNC:
                    frames, position = await self.store.after(tasks(), position)
                    batch += frames
                elif item.seq > position and item.task_id in tasks():
                    batch.append(item)
                    position = item.seq
            if batch:
                yield batch


class EventStream:
    def __init__(self, hub: Hub, store: Store, access: Access, *, heartbeat: float) -> None:
        self.hub = hub
        self.store = store
        self.access = access
        self.heartbeat = heartbeat

    @contextlib.asynccontextmanager
    async def opened(
        self,
        request: web.Request,
        task_ids: Sequence[str] | Callable[[], Awaitable[Sequence[str]]],
        *,
        group: str | None = None,
    ) -> AsyncIterator[tuple[Watcher, list[str], int | None]]:
        """Where every stream starts, one task's, many tasks' or a group's (and every
        reconnect): its task ids, its watcher, subscribed, and the client's cursor.
        What each stream must check before it reads or watches anything belongs
        here, once, at the top: the token's scope (every task listed, or the
        group), before even a group's members are looked up (a callable
        `task_ids`), so no answer, not even a 404, comes before it."""
        if group is not None:
            authorize(request, "groups", [group])
        elif not callable(task_ids):
            await authorize_watch(request, self.store, task_ids)  # one id outside the scope refuses the stream
        else:
            raise TypeError("a stream of looked-up tasks is a group's: name it")
        cursor = parse_cursor(request)
        ids = list(await task_ids()) if callable(task_ids) else list(task_ids)
        async with self.hub.watch(ids) as watcher:
            yield watcher, ids, cursor

    def live(self, request: web.Request, response: web.StreamResponse, watcher: Watcher) -> Live:
        """The live loop of `request`'s stream: it ends when the request's token
        expires, and writes frames as the token's holder may see them."""
        return Live(
            response,
            watcher,
            self.store,
            heartbeat=self.heartbeat,
            expires=request[GRANT].expires,
            encode=frame_bytes(request, self.access),
        )

    async def serve(
        self, request: web.Request, task_ids: Sequence[str], *, single: bool, fresh: Iterable[str] = ()
    ) -> web.StreamResponse:
        async with self.opened(request, task_ids) as (watcher, _, cursor):
            start = await self.store.start(task_ids, cursor, fresh)
            known = [t for t in start.tasks if t.known]
            if single and not known:
                raise error(web.HTTPNotFound, f"There is no task {task_ids[0]!r} (or its history has expired).")
            frames = start.frames()
            waiting = {t.task_id for t in known if not t.terminal}
            if start.resumed and not waiting and not frames:
                return web.Response(status=204)  # EventSource stops reconnecting on 204

            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            live = self.live(request, response, watcher)
            unknown = b"".join(unknown_task_frame(t.task_id) for t in start.tasks if not t.known)
            await live.send(frames, before=PING + unknown)
            if waiting:
                async with contextlib.aclosing(live.batches(lambda: waiting, start.upto)) as batches:
                    async for batch in batches:
                        await live.send(batch)
                        waiting.difference_update(frame.task_id for frame in batch if frame.terminal)
                        if not waiting:
                            break
            await response.write_eof()
            return response

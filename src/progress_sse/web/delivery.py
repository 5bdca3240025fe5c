"""One `text/event-stream` response for one or many tasks.

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
from collections.abc import Iterable, Sequence

from aiohttp import web

from ..events import PING, unknown_task_frame
from .errors import error
from .hub import Hub, Signal
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


class EventStream:
    def __init__(self, hub: Hub, store: Store, *, heartbeat: float) -> None:
        self.hub = hub
        self.store = store
        self.heartbeat = heartbeat

    async def serve(
        self, request: web.Request, task_ids: Sequence[str], *, single: bool, fresh: Iterable[str] = ()
    ) -> web.StreamResponse:
        cursor = parse_cursor(request)
        async with self.hub.watch(task_ids) as watcher:
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
            await response.write(PING)
            for task in start.tasks:
                if not task.known:
                    await response.write(unknown_task_frame(task.task_id))
            for frame in frames:
                await response.write(frame.encoded)

            position = start.upto
            clock = asyncio.get_running_loop().time
            last_write = clock()
            while waiting and not watcher.closed:
                # Items the stream drops (duplicates) must not postpone the ping.
                first = await watcher.next(max(0.0, last_write + self.heartbeat - clock()))
                if first is None:
                    await response.write(PING)
                    last_write = clock()
                    continue
                # Everything already waiting goes out in one write: a client that
                # fell behind catches up without a send per frame.
                out: list[bytes] = []
                for item in [first, *watcher.pending()]:
                    if item is Signal.CLOSE:
                        break
                    if item is Signal.RESYNC:
                        frames, position = await self.store.after(waiting, position)
                    elif item.seq <= position or item.task_id not in waiting:
                        continue
                    else:
                        frames, position = [item], item.seq
                    for frame in frames:
                        out.append(frame.encoded)
                        if frame.terminal:
                            waiting.discard(frame.task_id)
                if out:
                    await response.write(b"".join(out))
                    last_write = clock()
            await response.write_eof()
            return response

"""The all-tasks feed, `GET /feed`: one resumable stream of every task's changes.

Write side (worker/publisher.py): every event that changes a task's state, and a
task's progress at most once per PROGRESS_SSE_FEED_INTERVAL, is also added to its
partition's feed log (keys.py `feed_log`: a capped stream, each entry under its
event's own number) and announced on the partition's feed channel, by the same
script in the same round trip. So the feed is numbered by the sequence that
numbers every event: a feed cursor is a place in each partition, exactly like a
stream of many tasks, and the feed is gapless and exactly-once for the same
reasons (web/delivery.py): the hub subscribes first, then one transaction per
partition reads its history and the entries (or states) up to a position, then
live entries after it follow.

Without a cursor the feed starts with the current states of the newest tasks it
shows (FEED_START); with one, with the entries after it. A cursor the log no
longer reaches (trimmed: it keeps PROGRESS_SSE_FEED_MAX entries a partition) gets
a reset (`feed_trimmed`), then current states; one of a lost history, as on every
stream (`cursor_unknown`, `history_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..cursors import STARTS, Cursor, Places, Position
from ..events import CURSOR_UNKNOWN, FEED_TRIMMED, HISTORY_LOST, Frame, reset_frame
from ..task_names import NameFilter, PatternError
from .access import GRANT, authorize_feed
from .context import SETTINGS, STREAMS
from .delivery import Batch
from .errors import error
from .hub import FeedWatcher
from .store import Catchup, History, Store, cursor_numbers, opened_places

# The newest tasks whose states a feed without a cursor starts with, found among
# the FEED_SCAN newest of each partition (a narrow name filter may find fewer).
FEED_START = 50
FEED_SCAN = 200

# KEYS[1]: a partition's feed log; ARGV[1]: the number to read after; ARGV[2]: its
# cap. Returns {the number below which entries may have been trimmed away ('0':
# none were), the entries after ARGV[1]}. Trimming drops the oldest entries, so
# once any went, every number below the first entry kept may have had one. (Redis
# 7 counts the entries ever added; before it, a log at its cap is taken to have
# been trimmed.)
FEED_AFTER_LUA = """
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if type(info) ~= 'table' or info.err then return {'0', {}} end
local fields = {}
for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
local length, added = tonumber(fields['length']), tonumber(fields['entries-added'])
local trimmed = '0'
if fields['first-entry'] and ((added and added > length) or (not added and length >= tonumber(ARGV[2]))) then
  trimmed = tostring(tonumber(string.match(fields['first-entry'][1], '^(%d+)')) - 1)
end
return {trimmed, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+')}
"""

# KEYS[1]: a partition's recent index; ARGV[1]: how many of the newest; ARGV[2],
# ARGV[3]: a state key of the partition before and after the task id. Returns
# {id, created, state, seq, latest, epoch, name} for each that still has a state.
# (The state keys share the partition's hash tag, so its slot: keys.py.)
FEED_STATES_LUA = """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local found = {}
for i = 1, #ids, 2 do
  local s = redis.call('HMGET', ARGV[2] .. ids[i] .. ARGV[3], 'state', 'seq', 'latest', 'epoch', 'name')
  if s[1] then found[#found + 1] = {ids[i], ids[i + 1], s[1], s[2], s[3], s[4] or '', s[5] or ''} end
end
return found
"""


class _EveryTask(Collection[str]):
    """What a feed waits for: every task (web/hub.py `news` asks only `in`)."""

    def __contains__(self, task_id: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


EVERY_TASK = _EveryTask()


@dataclass(slots=True)
class FeedStart:
    frames: list[Frame]
    # Where the feed stands once these frames are sent: every partition.
    upto: Places
    # The client's cursor, as places (when it was honoured).
    base: Places = field(default_factory=dict)
    # Why the client's cursor was not honoured: the feed starts with a reset frame.
    reset: str | None = None


class Feed:
    """The reads of one feed: where it starts, and what came after its places,
    of the task names `names` lets through."""

    def __init__(self, store: Store, names: NameFilter, *, cap: int, floor: Places | None = None) -> None:
        self.store, self.names, self.cap = store, names, cap
        self.partitions = range(store.keys.partitions)
        # The stream's watcher's (hub.FeedWatcher.floor): where what was trimmed
        # held nothing the stream still needs, though its place is further back.
        self.floor = floor if floor is not None else {}

    async def start(self, cursor: Cursor | None) -> FeedStart:
        """The entries after `cursor`, or the newest tasks' states without one (or
        with one that cannot be honoured, after a reset)."""
        if cursor is None:
            return await self._states()
        numbers = cursor_numbers(cursor, self.partitions)
        read = await asyncio.gather(*(self._after(p, n) for p, n in numbers.items()))
        histories = {p: history for p, (history, _, _) in zip(numbers, read, strict=True)}
        base = opened_places(cursor, histories, {p: () for p in self.partitions})
        if base is None:
            return await self._states(CURSOR_UNKNOWN)
        frames: list[Frame] = []
        for partition, (history, trimmed, entries) in zip(numbers, read, strict=True):
            # `0` asks for every entry kept, however many went before them.
            if trimmed > base[partition].n and cursor != STARTS:
                return await self._states(FEED_TRIMMED)
            frames += self._frames(partition, history, entries)
        upto = {p: h.upto for p, h in histories.items()}
        unlisted = [p for p in self.partitions if p not in base]
        if unlisted:  # a cursor of another stream: the feed's other partitions start from states
            more = await self._states(partitions=unlisted)
            frames += more.frames
            upto.update(more.upto)
        return FeedStart(frames, upto, base)

    async def after(self, places: Places) -> Catchup:
        """The entries after `places` (web/delivery.py Live.batches' catch-up)."""
        partitions = [p for p in self.partitions if p in places]
        read = await asyncio.gather(*(self._after(p, places[p].n) for p in partitions))
        upto = dict(places)
        frames: list[Frame] = []
        lost: str | None = None
        for partition, (history, trimmed, entries) in zip(partitions, read, strict=True):
            upto[partition] = history.upto
            if await self.store.lost(partition, history, places[partition]):
                lost = HISTORY_LOST
            elif trimmed > self._needed_after(partition, places[partition]):
                lost = lost or FEED_TRIMMED
            else:
                frames += self._frames(partition, history, entries)
        if lost is not None:
            return Catchup([], upto, lost=True, reason=lost)
        return Catchup(frames, upto, lost=False)

    def _needed_after(self, partition: int, at: Position) -> int:
        """The number after which the stream still needs what the log holds."""
        floor = self.floor.get(partition)
        return floor.n if floor is not None and floor.epoch == at.epoch and floor.n > at.n else at.n

    async def restart(self, reason: str) -> tuple[Batch, Places]:
        """Start over from current states, after a reset frame: the history was
        lost, or the log was trimmed past the feed's place (a client so slow that
        its inbox overflowed, and the log moved on meanwhile)."""
        start = await self._states()
        return Batch(start.frames, reset_frame(reason, [])), start.upto

    async def _after(self, partition: int, after: int) -> tuple[History, int, list[Any]]:
        def reads(pipe: Any) -> None:
            pipe.eval(FEED_AFTER_LUA, 1, self.store.keys.feed_log(partition), after, self.cap)

        history, ((trimmed, entries),) = await self.store.read(partition, reads)
        return history, _number(trimmed), entries

    def _frames(self, partition: int, history: History, entries: list[Any]) -> list[Frame]:
        epoch = history.upto.epoch
        frames = []
        for entry_id, pairs in entries:  # from a script: each entry's fields as one flat list
            f = dict(zip(pairs[::2], pairs[1::2], strict=True))
            # An entry of a lost history (its sequence was lost alone, and numbered
            # from the start again) is no place in this one.
            if f.get("e") == epoch and self.names.match(f["n"]):
                name = f["n"] or None
                frames.append(Frame(f["t"], _number(entry_id), f["s"], f["d"], epoch, partition, name=name))
        return frames

    async def _states(self, reset: str | None = None, *, partitions: Collection[int] | None = None) -> FeedStart:
        keys = self.store.keys
        chosen = list(self.partitions if partitions is None else partitions)

        def reads(partition: int) -> Any:
            before, after = keys.state_key_parts(partition)

            def queue(pipe: Any) -> None:
                pipe.eval(FEED_STATES_LUA, 1, keys.recent(partition), FEED_SCAN, before, after)

            return queue

        read = await asyncio.gather(*(self.store.read(p, reads(p)) for p in chosen))
        newest: list[tuple[float, Frame]] = []
        for partition, (history, (found,)) in zip(chosen, read, strict=True):
            upto = history.upto
            for task_id, created, state, seq, latest, epoch, name in found:
                if not self.names.match(name or None):
                    continue
                if epoch == upto.epoch:
                    frame = Frame(task_id, int(seq), state, latest, epoch, partition, name=name or None)
                else:  # kept from before this history began: as of its first number (store.py)
                    frame = Frame(task_id, history.since, state, latest, upto.epoch, partition, name=name or None)
                newest.append((float(created), frame))
        newest.sort(key=lambda pair: pair[0], reverse=True)
        frames = sorted((frame for _, frame in newest[:FEED_START]), key=lambda f: (f.partition, f.seq))
        return FeedStart(frames, {p: history.upto for p, (history, _) in zip(chosen, read, strict=True)}, reset=reset)


def _number(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def requested_names(request: web.Request) -> NameFilter:
    """`?name=` (repeated or comma-separated; `reports.` a prefix), or 400. A token
    with a feed scope and no filter asked for sees its scope's names. A token that
    may see no feed at all is refused first, whatever it asked for."""
    grant = request[GRANT]
    if not grant.operator and grant.feed.everything:
        authorize_feed(request, NameFilter())  # the 403: the request's filter is no concern of it
    try:
        names = NameFilter.parse(request.query.getall("name", []))
    except PatternError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    if names.everything and not grant.operator and not grant.feed.everything:
        return grant.feed
    return names


async def serve(request: web.Request) -> web.StreamResponse:
    streams = request.app[STREAMS]
    names = requested_names(request)
    async with streams.opened(request, [], feed=names) as stream:
        assert isinstance(stream.watcher, FeedWatcher)
        feed = Feed(streams.store, names, cap=request.app[SETTINGS].feed_max, floor=stream.watcher.floor)
        start = await feed.start(stream.cursor)
        live = await stream.begin()
        head = reset_frame(start.reset, []) if start.reset else b""
        await live.send(live.stamped(start.frames, dict(start.base)), before=stream.greeting + head)
        upto = start.upto
        del start  # a feed may stay open for days
        batches = live.batches(lambda: EVERY_TASK, upto, catchup=feed.after, restart=feed.restart)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                await live.send_batch(batch)
        return await stream.end()
    return stream.gone()

"""Web side reads: a task's state, its log after a cursor, the recent-tasks index.

The reads a watcher starts from are one MULTI transaction, so every task on a stream
is seen at the same instant: the sequence value `upto` read with them is then a
single position that covers all of them (see web/delivery.py for why that makes
delivery gapless and exactly-once).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from ..cursors import Cursor, Position, new_epoch
from ..events import CURSOR_UNKNOWN, Frame, is_terminal
from ..history import READ_LUA, RENAME_LUA
from ..keys import Keys

_STATE_FIELDS = ("state", "seq", "latest", "events", "epoch")


@dataclass(slots=True)
class TaskStart:
    """Where one task stands for a new stream: the frames to send first."""

    task_id: str
    known: bool
    state: str | None = None
    frames: list[Frame] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state is not None and is_terminal(self.state)


@dataclass(slots=True)
class Start:
    tasks: list[TaskStart]
    upto: Position
    # False when the request had no cursor, or one we could not honour.
    resumed: bool
    # CURSOR_UNKNOWN when the request had a cursor we could not honour: the stream
    # starts with a reset frame, and tasks without a state are watched as missing.
    reset: str | None = None
    # The history began less than a task's keys live (PROGRESS_SSE_HISTORY_TTL) ago:
    # a task with no state may have been lost with the one before, not expired.
    young: bool = False

    def frames(self) -> list[Frame]:
        """Every task's first frames, merged in cursor order."""
        return list(heapq.merge(*(t.frames for t in self.tasks), key=lambda f: f.seq))


@dataclass(slots=True)
class Catchup:
    """Every event of some tasks after a stream's position, read from their logs."""

    frames: list[Frame]
    upto: Position
    # The history the position belongs to is gone: the stream must start over.
    lost: bool


class Store:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, history_ttl: int = 86_400) -> None:
        self.client = client
        self.keys = keys
        self.history_ttl = history_ttl
        self._rotate = client.register_script(RENAME_LUA)

    async def task(self, task_id: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.keys.state(task_id))
        return cast(dict[str, str], raw) or None

    async def groups_of(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The group of each of these tasks that belongs to one."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.keys.state(task_id), "group")
        found = await pipe.execute()
        return {task_id: str(group) for task_id, group in zip(task_ids, found, strict=True) if group}

    def _history(self, pipe: Any) -> None:
        """Queue the read of where the current history stands (history.py). EVAL of
        the text, not a registered script: redis-py sends SCRIPT EXISTS before every
        pipeline that holds one, a round trip more for each stream that opens."""
        pipe.eval(READ_LUA, 1, self.keys.history, new_epoch())

    async def start(
        self, task_ids: Sequence[str], cursor: Cursor | None, fresh: Iterable[str] = (), *, replay: bool = True
    ) -> Start:
        """What a new stream sends first. Tasks in `fresh` start from their current
        state even when the stream resumes from a cursor (a client adding a task to
        a stream it reopens). Without `replay`, every task starts from its current
        state, but whether the cursor could be resumed is still told (a group's
        stream sends an aggregate, which is a state)."""
        fresh = frozenset(fresh)
        after = cursor.n if isinstance(cursor, Position) and replay else None
        pipe = self.client.pipeline(transaction=True)
        self._history(pipe)
        for task_id in task_ids:
            pipe.hmget(self.keys.state(task_id), _STATE_FIELDS)
            if after is not None:
                log = self.keys.log(task_id)
                pipe.xlen(log)
                pipe.xrange(log, "-", "+", count=1)
                pipe.xrange(log, f"{after + 1}-0", "+")
        replies = iter(await pipe.execute())
        history = _History(*next(replies))
        upto = history.upto
        if isinstance(cursor, Position) and cursor.epoch == "":  # `0`: the start of this history
            cursor = Position(upto.epoch, 0)
        # A cursor of another history, from the future (another Redis, or one that
        # lagged) or no cursor at all: current states, after a reset frame.
        resumed = isinstance(cursor, Position) and upto.covers(cursor)
        tasks = []
        for task_id in task_ids:
            state, seq, latest, events, epoch = next(replies)
            if after is not None:
                length, first, entries = next(replies), next(replies), next(replies)
            if state is None:
                tasks.append(TaskStart(task_id, known=False))
                continue
            if epoch != upto.epoch:
                # A state kept from before this history began (a restart that kept
                # its data, say): sent first, as of the history's first number. A
                # cursor at or past that number had it (from the stream's start in
                # this history), unless the task is new to the stream; a group's
                # aggregate always needs it.
                covered = resumed and replay and after is not None and after >= history.since
                kept = Frame(task_id, history.since, state, latest, upto.epoch)
                frames = [] if covered and task_id not in fresh else [kept]
            elif not resumed or not replay:
                frames = [Frame(task_id, int(seq), state, latest, epoch)]
            elif task_id in fresh:
                # Its state as of `upto`, sent with that id: a cursor must never go
                # backwards, or a reconnect would repeat other tasks' events.
                frames = [Frame(task_id, upto.n, state, latest, upto.epoch)]
            else:
                assert after is not None
                trimmed = int(events or 0) > length
                first_seq = _seq(first[0][0]) if first else 0
                # Events after the cursor were trimmed away: current state it is.
                if trimmed and after < first_seq:
                    frames = [Frame(task_id, int(seq), state, latest, epoch)]
                else:
                    frames = _frames(task_id, entries, upto.epoch)
            tasks.append(TaskStart(task_id, known=True, state=state, frames=frames))
        reset = CURSOR_UNKNOWN if cursor is not None and not resumed else None
        return Start(tasks, upto, resumed, reset, young=history.age < self.history_ttl)

    async def after(self, task_ids: Iterable[str], position: Position) -> Catchup:
        """Every event of these tasks after `position`, in order, and the new position;
        or, when the position's history is gone (another epoch now, or a sequence
        that went back: a replica that lagged), `lost`. A sequence that went back
        is given a new epoch at once, so no cursor of the old one passes for a
        position in what follows (docs/protocol.md, "Cursors")."""
        task_ids = list(task_ids)
        pipe = self.client.pipeline(transaction=True)
        self._history(pipe)
        for task_id in task_ids:
            pipe.hget(self.keys.state(task_id), "epoch")
            pipe.xrange(self.keys.log(task_id), f"{position.n + 1}-0", "+")
        replies = await pipe.execute()
        upto = _History(*replies[0]).upto
        if upto.epoch != position.epoch or upto.n < position.n:
            if upto.epoch == position.epoch:
                await self.new_epoch(upto.epoch)
            return Catchup([], upto, lost=True)
        per_task = [
            _frames(task_id, entries, upto.epoch)
            for task_id, epoch, entries in zip(task_ids, replies[1::2], replies[2::2], strict=True)
            if epoch == upto.epoch  # a log kept from a lost history numbers another sequence
        ]
        return Catchup(list(heapq.merge(*per_task, key=lambda f: f.seq)), upto, lost=False)

    async def new_epoch(self, lost: str) -> str:
        """Give the history a new name if it is still called `lost`; the name it has."""
        return str(await self._rotate(keys=[self.keys.history], args=[lost, new_epoch()]))

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` tasks whose history is still kept, newest first."""
        found: list[dict[str, Any]] = []
        start = 0
        while len(found) < limit:
            # Tasks expire by their last event but are indexed by their first, so an
            # expired one can sit among live ones: read on until the page is full.
            task_ids = cast(list[str], await self.client.zrevrange(self.keys.recent, start, start + limit - 1))
            if not task_ids:
                break
            start += len(task_ids)
            pipe = self.client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hgetall(self.keys.state(task_id))
            states = await pipe.execute()
            gone = [t for t, s in zip(task_ids, states, strict=True) if not s]
            if gone:  # the index forgets them too
                await self.client.zrem(self.keys.recent, *gone)
                start -= len(gone)
            found += [describe(s) for s in states if s]
        return found[:limit]


def describe(state: dict[str, str]) -> dict[str, Any]:
    """`GET /tasks/<id>`: the latest event plus what is known of the task."""
    body: dict[str, Any] = json.loads(state["latest"])
    body["name"] = body.get("name") or state.get("name")
    for key in ("created_at", "started_at", "finished_at"):
        body[key] = float(state[key]) if state.get(key) else None
    if state.get("worker"):
        body["worker"] = state["worker"]
    if state.get("pid"):
        body["worker_pid"] = int(state["pid"])
    if state.get("group"):
        body["group_id"] = state["group"]
    body["cursor"] = f"{state['epoch']}-{state['seq']}" if state.get("epoch") else None
    return body


def _seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _frames(task_id: str, entries: list[tuple[str, dict[str, str]]], epoch: str) -> list[Frame]:
    return [Frame(task_id, _seq(entry_id), f["s"], f["d"], epoch) for entry_id, f in entries]


class _History:
    """READ_LUA's reply (src/progress_sse/history.py)."""

    __slots__ = ("age", "since", "upto")

    def __init__(self, epoch: str, n: str, since: int, age: int) -> None:
        self.upto = Position(epoch, int(n))
        self.since = int(since)
        self.age = int(age)

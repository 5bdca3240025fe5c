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

from ..events import Frame, is_terminal
from ..keys import Keys

_STATE_FIELDS = ("state", "seq", "latest", "events")


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
    upto: int
    # False when the request had no cursor, or one we could not honour.
    resumed: bool

    def frames(self) -> list[Frame]:
        """Every task's first frames, merged in cursor order."""
        return list(heapq.merge(*(t.frames for t in self.tasks), key=lambda f: f.seq))


class Store:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

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

    async def start(self, task_ids: Sequence[str], cursor: int | None, fresh: Iterable[str] = ()) -> Start:
        """What a new stream sends first. Tasks in `fresh` start from their current
        state even when the stream resumes from a cursor (a client adding a task to
        a stream it reopens)."""
        fresh = frozenset(fresh)
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.seq)
        for task_id in task_ids:
            pipe.hmget(self.keys.state(task_id), _STATE_FIELDS)
            if cursor is not None:
                log = self.keys.log(task_id)
                pipe.xlen(log)
                pipe.xrange(log, "-", "+", count=1)
                pipe.xrange(log, f"{cursor + 1}-0", "+")
        replies = iter(await pipe.execute())
        upto = int(next(replies) or 0)
        # A cursor from the future is not ours (another Redis, a restart without
        # persistence): PROTOCOL.md says treat it as no cursor.
        resumed = cursor is not None and cursor <= upto
        tasks = []
        for task_id in task_ids:
            state, seq, latest, events = next(replies)
            if cursor is not None:
                length, first, after = next(replies), next(replies), next(replies)
            if state is None:
                tasks.append(TaskStart(task_id, known=False))
                continue
            snapshot = [Frame(task_id, int(seq), state, latest)]
            if not resumed:
                frames = snapshot
            elif task_id in fresh:
                # Its state as of `upto`, sent with that id: a cursor must never go
                # backwards, or a reconnect would repeat other tasks' events.
                frames = [Frame(task_id, upto, state, latest)]
            else:
                assert cursor is not None
                trimmed = int(events or 0) > length
                first_seq = _seq(first[0][0]) if first else 0
                # Events after the cursor were trimmed away: current state it is.
                frames = snapshot if trimmed and cursor < first_seq else _frames(task_id, after)
            tasks.append(TaskStart(task_id, known=True, state=state, frames=frames))
        return Start(tasks, upto, resumed)

    async def after(self, task_ids: Iterable[str], position: int) -> tuple[list[Frame], int]:
        """Every event of these tasks after `position`, in order, and the new position."""
        task_ids = list(task_ids)
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.seq)
        for task_id in task_ids:
            pipe.xrange(self.keys.log(task_id), f"{position + 1}-0", "+")
        replies = await pipe.execute()
        upto = int(replies[0] or 0)
        per_task = [_frames(t, entries) for t, entries in zip(task_ids, replies[1:], strict=True)]
        return list(heapq.merge(*per_task, key=lambda f: f.seq)), max(upto, position)

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
    body["cursor"] = state["seq"]
    return body


def _seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _frames(task_id: str, entries: list[tuple[str, dict[str, str]]]) -> list[Frame]:
    return [Frame(task_id, _seq(entry_id), f["s"], f["d"]) for entry_id, f in entries]

"""Web side reads: a task's state, its log after a cursor, the recent-tasks index.

The reads a watcher starts from are one MULTI transaction per partition, so every
task of a partition on a stream is seen at the same instant: the sequence value
`upto` read with them is then a single position that covers all of them (see
web/delivery.py for why that makes delivery gapless and exactly-once). One Redis
is one partition; on a cluster each partition's transaction goes to the master
of its slot, and they run side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from ..cursors import STARTS, Cursor, Places, Position, Sealed, composite, new_epoch
from ..events import CURSOR_UNKNOWN, HISTORY_LOST, Frame, is_terminal
from ..history import READ_LUA, RENAME_LUA
from ..keys import Keys
from . import metrics

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
    # Where the stream stands once these frames are sent: each of its partitions.
    upto: Places
    # False when the request had no cursor, or one we could not honour.
    resumed: bool
    # CURSOR_UNKNOWN when the request had a cursor we could not honour: the stream
    # starts with a reset frame, and tasks without a state are watched as missing.
    reset: str | None = None
    # A history began less than a task's keys live (PROGRESS_SSE_HISTORY_TTL) ago:
    # a task with no state may have been lost with the one before, not expired.
    young: bool = False
    # The client's cursor, as places in the stream's partitions (when `resumed`).
    base: Places = field(default_factory=dict)

    def frames(self) -> list[Frame]:
        """Every task's first frames, in cursor order within each partition."""
        every = [frame for task in self.tasks for frame in task.frames]
        return sorted(every, key=lambda f: (f.partition, f.seq))  # stable: tasks sharing a number keep their order


@dataclass(slots=True)
class Catchup:
    """Every event of some tasks after a stream's position, read from their logs."""

    frames: list[Frame]
    upto: Places
    # The history the position belongs to is gone: the stream must start over.
    lost: bool
    # Why, for the reset frame (events.py): the history was lost, or (the all-tasks
    # feed, web/feed.py) its capped log no longer reaches the position.
    reason: str = HISTORY_LOST


class Store:
    """`client` reads any key (on a cluster, redis-py's cluster client routes each);
    `partitions`, one client per partition, run the transactions that must see a
    partition at one instant (by default `client` serves them all)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        history_ttl: int = 86_400,
        partitions: Sequence[aioredis.Redis] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.history_ttl = history_ttl
        self.partitions = list(partitions) if partitions is not None else [client] * keys.partitions
        if len(self.partitions) != keys.partitions:
            raise ValueError(f"{keys.partitions} partitions need as many clients, not {len(self.partitions)}")

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

    def by_partition(self, task_ids: Iterable[str]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for task_id in task_ids:
            found.setdefault(self.keys.partition_of(task_id), []).append(task_id)
        return found

    async def read(self, partition: int, queue: Any) -> tuple[History, list[Any]]:
        """One transaction on the partition: where its history stands (history.py),
        then what `queue(pipe)` asks. EVAL of the script's text, not a registered
        script: redis-py sends SCRIPT EXISTS before every pipeline that holds one, a
        round trip more for each stream that opens."""
        pipe = self.partitions[partition].pipeline(transaction=True)
        pipe.eval(READ_LUA, 1, self.keys.history(partition), new_epoch())
        queue(pipe)
        started = time.perf_counter()
        history, *replies = await pipe.execute()
        metrics.REDIS_READS.observe(time.perf_counter() - started)
        return History(*history), replies

    async def start(
        self, task_ids: Sequence[str], cursor: Cursor | None, fresh: Iterable[str] = (), *, replay: bool = True
    ) -> Start:
        """What a new stream sends first. Tasks in `fresh` start from their current
        state even when the stream resumes from a cursor (a client adding a task to
        a stream it reopens). Without `replay`, every task starts from its current
        state, but whether the cursor could be resumed is still told (a group's
        stream sends an aggregate, which is a state)."""
        fresh = frozenset(fresh)
        tasks_in = self.by_partition(task_ids)
        numbers = cursor_numbers(cursor, tasks_in) if replay else {}
        # A composite cursor's digest covers every partition it lists: all are read.
        listed = [p for p, _ in cursor.numbers] if isinstance(cursor, Sealed) else []
        partitions = sorted(set(tasks_in) | set(listed))

        def queue(partition: int) -> Any:
            after = numbers.get(partition)

            def reads(pipe: Any) -> None:
                for task_id in tasks_in.get(partition, ()):
                    pipe.hmget(self.keys.state(task_id), _STATE_FIELDS)
                    if after is not None:
                        log = self.keys.log(task_id)
                        pipe.xlen(log)
                        pipe.xrange(log, "-", "+", count=1)
                        pipe.xrange(log, f"{after + 1}-0", "+")

            return reads

        read = await asyncio.gather(*(self.read(p, queue(p)) for p in partitions))
        histories = {p: history for p, (history, _) in zip(partitions, read, strict=True)}
        base = opened_places(cursor, histories, tasks_in)
        # A cursor of another history, from the future (another Redis, or one that
        # lagged) or no cursor at all: current states, after a reset frame.
        resumed = base is not None
        base = base or {}
        tasks: dict[str, TaskStart] = {}
        for partition, (history, replies_list) in zip(partitions, read, strict=True):
            replies = iter(replies_list)
            upto = history.upto
            at = base.get(partition)
            after = at.n if at is not None and replay else None
            for task_id in tasks_in.get(partition, ()):
                state, seq, latest, events, epoch = next(replies)
                if partition in numbers:
                    length, first, entries = next(replies), next(replies), next(replies)
                if state is None:
                    tasks[task_id] = TaskStart(task_id, known=False)
                    continue
                if epoch != upto.epoch:
                    # A state kept from before this history began (a restart that kept
                    # its data, say): sent first, as of the history's first number. A
                    # cursor at or past that number had it (from the stream's start in
                    # this history), unless the task is new to the stream; a group's
                    # aggregate always needs it.
                    covered = after is not None and after >= history.since
                    # A task new to a resumed stream: as of `upto`, so the stream's
                    # cursor does not go back (see `fresh` below).
                    added = resumed and replay and (task_id in fresh or after is None)
                    kept = Frame(task_id, upto.n if added else history.since, state, latest, upto.epoch, partition)
                    frames = [] if covered and task_id not in fresh else [kept]
                elif not resumed or not replay:
                    frames = [Frame(task_id, int(seq), state, latest, epoch, partition)]
                elif task_id in fresh or after is None:
                    # Its state as of `upto`, sent with that number: a cursor must never
                    # go backwards, or a reconnect would repeat other tasks' events.
                    # (`after` None: a partition the client's cursor does not list.)
                    frames = [Frame(task_id, upto.n, state, latest, upto.epoch, partition)]
                else:
                    trimmed = int(events or 0) > length
                    first_seq = _seq(first[0][0]) if first else 0
                    # Events after the cursor were trimmed away: current state it is.
                    if trimmed and after < first_seq:
                        frames = [Frame(task_id, int(seq), state, latest, epoch, partition)]
                    else:
                        frames = _frames(task_id, entries, upto.epoch, partition)
                tasks[task_id] = TaskStart(task_id, known=True, state=state, frames=frames)
        reset = CURSOR_UNKNOWN if cursor is not None and not resumed else None
        young = any(histories[p].age < self.history_ttl for p in tasks_in)
        upto_places = {p: histories[p].upto for p in tasks_in}
        return Start([tasks[t] for t in task_ids], upto_places, resumed, reset, young=young, base=base)

    async def after(self, task_ids: Iterable[str], places: Places) -> Catchup:
        """Every event of these tasks after `places`, in order within each partition,
        and the new places; or, when the history of one of the places is gone
        (`lost`), that."""
        tasks_in = self.by_partition(task_ids)
        partitions = sorted(p for p in tasks_in if p in places)

        def queue(partition: int) -> Any:
            after = places[partition].n

            def reads(pipe: Any) -> None:
                for task_id in tasks_in[partition]:
                    pipe.hget(self.keys.state(task_id), "epoch")
                    pipe.xrange(self.keys.log(task_id), f"{after + 1}-0", "+")

            return reads

        read = await asyncio.gather(*(self.read(p, queue(p)) for p in partitions))
        upto = dict(places)
        frames: list[Frame] = []
        lost = False
        for partition, (history, replies) in zip(partitions, read, strict=True):
            upto[partition] = history.upto
            if await self.lost(partition, history, places[partition]):
                lost = True
                continue
            now = history.upto
            per_task = [
                _frames(task_id, entries, now.epoch, partition)
                for task_id, epoch, entries in zip(tasks_in[partition], replies[::2], replies[1::2], strict=True)
                if epoch == now.epoch  # a log kept from a lost history numbers another sequence
            ]
            frames += sorted((f for task in per_task for f in task), key=lambda f: f.seq)
        if lost:
            return Catchup([], upto, lost=True)
        return Catchup(frames, upto, lost=False)

    async def lost(self, partition: int, history: History, was: Position) -> bool:
        """Whether the history of a stream's place `was` in the partition is gone
        (another epoch now, or a sequence that went back: a replica that lagged). A
        sequence that went back is given a new epoch at once, so no cursor of the
        old one passes for a position in what follows (docs/protocol.md, "Cursors")."""
        now = history.upto
        if now.epoch == was.epoch and now.n >= was.n:
            return False
        if now.epoch == was.epoch:
            await self.new_epoch(now.epoch, partition)
        return True

    async def stored_by_state(self) -> dict[str, int]:
        """How many events of each state the write script has stored, in every
        partition (keys.py `stats`)."""
        pipe = self.client.pipeline(transaction=False)
        for partition in range(self.keys.partitions):
            pipe.hgetall(self.keys.stats(partition))
        totals: dict[str, int] = {}
        for counts in await pipe.execute():
            for state, count in counts.items():
                totals[state] = totals.get(state, 0) + int(count)
        return totals

    async def new_epoch(self, lost: str, partition: int = 0) -> str:
        """Give the partition's history a new name if it is still called `lost`; the
        name it has."""
        history = self.keys.history(partition)
        return str(await self.partitions[partition].eval(RENAME_LUA, 1, history, lost, new_epoch()))

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` tasks whose history is still kept, newest first (each
        partition's index read, and merged)."""
        while True:
            pipe = self.client.pipeline(transaction=False)
            for partition in range(self.keys.partitions):
                pipe.zrevrange(self.keys.recent(partition), 0, limit - 1, withscores=True)
            pages = await pipe.execute()
            newest = sorted(
                ((score, task_id, p) for p, page in enumerate(pages) for task_id, score in page), reverse=True
            )[:limit]
            pipe = self.client.pipeline(transaction=False)
            for _, task_id, _ in newest:
                pipe.hgetall(self.keys.state(task_id))
            states = await pipe.execute() if newest else []
            # Tasks expire by their last event but are indexed by their first, so an
            # expired one can sit among live ones: the index forgets it, and is read again.
            gone = [(task_id, p) for (_, task_id, p), state in zip(newest, states, strict=True) if not state]
            if not gone:
                return [describe(state, self.keys) for state in states]
            pipe = self.client.pipeline(transaction=False)
            for task_id, partition in gone:
                pipe.zrem(self.keys.recent(partition), task_id)
            await pipe.execute()


def describe(state: dict[str, str], keys: Keys | None = None) -> dict[str, Any]:
    """`GET /tasks/<id>`: the latest event plus what is known of the task. Its
    `cursor` resumes a stream of the task from there: in the form of `keys`' Redis
    (a composite one of the task's partition on a cluster)."""
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
    body["cursor"] = None
    if state.get("epoch"):
        at = Position(state["epoch"], int(state["seq"]))
        body["cursor"] = task_cursor(keys, body["task_id"], at) if keys is not None else str(at)
    return body


def task_cursor(keys: Keys, task_id: str, at: Position) -> str:
    """The cursor that resumes a stream of `task_id` after its event `at`:
    `<epoch>-<n>` on one Redis; on a cluster, a composite one of the task's
    partition alone (cursors.py)."""
    if keys.partitions == 1:
        return str(at)
    partition = keys.partition_of(task_id)
    return composite({partition: at}, partition)


def _seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _frames(task_id: str, entries: list[tuple[str, dict[str, str]]], epoch: str, partition: int) -> list[Frame]:
    return [Frame(task_id, _seq(entry_id), f["s"], f["d"], epoch, partition) for entry_id, f in entries]


def cursor_numbers(cursor: Cursor | None, partitions: Iterable[int]) -> dict[int, int]:
    """After which number each partition's logs are read for `cursor`, before it is
    known whether the cursor is a place in the current histories (`0`: from the
    start in each of `partitions`)."""
    if cursor == STARTS:  # `0`, parsed or not
        return dict.fromkeys(partitions, 0)
    if isinstance(cursor, Position):
        return {0: cursor.n}
    if isinstance(cursor, Sealed):
        return dict(cursor.numbers)
    return {}


def opened_places(
    cursor: Cursor | None, histories: dict[int, History], tasks_in: Mapping[int, Collection[str]]
) -> Places | None:
    """The client's cursor as places in the stream's partitions, if it is one in the
    current histories: none of its numbers is of a lost history or from the future."""
    if cursor == STARTS:  # `0`, parsed or not
        return {p: Position(histories[p].upto.epoch, 0) for p in tasks_in}
    if isinstance(cursor, Position):
        places: Places | None = {0: cursor}
    elif isinstance(cursor, Sealed):
        places = cursor.opened({p: history.upto.epoch for p, history in histories.items()})
    else:
        return None
    if places is None or not all(histories[p].upto.covers(at) for p, at in places.items()):
        return None
    return {p: at for p, at in places.items() if p in tasks_in}


class History:
    """Where a partition's history stands: READ_LUA's reply (src/progress_sse/history.py)."""

    __slots__ = ("age", "since", "upto")

    def __init__(self, epoch: str, n: str, since: int, age: int) -> None:
        self.upto = Position(epoch, int(n))
        self.since = int(since)
        self.age = int(age)

"""A Celery group as one bar: its members' events folded into one aggregate.

The bridge records each member when it is published (Celery puts the group id in
the message headers). `/groups/<id>/events` watches every member on the same
machinery as `/events` (one subscription per member, gapless), and after each
batch of member events sends one `event: group` frame with the aggregate; its
`id:` is the cursor of the member event that changed it. The aggregate is a state,
so a reconnect simply starts from the current one.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..events import TERMINAL_STATES, Frame, State, dumps, encode_sse, percent_of, reset_frame
from .delivery import EventStream
from .errors import error
from .store import Store


def aggregate(group_id: str, members: Mapping[str, dict[str, Any]], expected: int) -> dict[str, Any]:
    """The group's bar: the sum of its members' current and total (total unknown while
    any member's is), how many tasks have ended, and a state for the whole group."""
    payloads = list(members.values())
    counts = Counter(p["state"] for p in payloads)
    done = sum(counts[s] for s in TERMINAL_STATES)
    current = sum(p.get("current") or 0 for p in payloads)
    totals = [p.get("total") for p in payloads]
    total = sum(t for t in totals if t is not None) if payloads and None not in totals else None
    if len(payloads) < expected:
        total = None  # members not seen yet: the total is not known
    return {
        "group_id": group_id,
        "state": _group_state(counts, done, expected),
        "current": current,
        "total": total,
        "percent": percent_of(current, total),
        "message": f"{done} of {expected} tasks done",
        "tasks": expected,
        "done": done,
        "counts": dict(sorted(counts.items())),
        "ts": round(time.time(), 3),
    }


def _group_state(counts: Counter[str], done: int, expected: int) -> str:
    if done < expected:
        if counts[State.STARTED] or counts[State.PROGRESS] or counts[State.RETRY] or done:
            return State.PROGRESS
        return State.QUEUED
    for state in (State.FAILURE, State.LOST, State.REVOKED):
        if counts[state]:
            return state
    return State.SUCCESS


async def members(store: Store, group_id: str) -> list[str]:
    found = await store.client.smembers(store.keys.group(group_id))
    return sorted(str(member) for member in found)


async def group_state(request: web.Request, store: Store, group_id: str) -> web.Response:
    ids = await members(store, group_id)
    if not ids:
        raise error(web.HTTPNotFound, f"There is no group {group_id!r} (or its history has expired).")
    start = await store.start(ids, None)
    latest = {t.task_id: t.frames[-1].payload() for t in start.tasks if t.known}
    body = aggregate(group_id, latest, len(ids))
    body["members"] = ids
    return web.json_response(body, dumps=dumps)


async def serve(request: web.Request, streams: EventStream, group_id: str) -> web.StreamResponse:
    store = streams.store

    async def known_members() -> list[str]:
        ids = await members(store, group_id)
        if not ids:
            raise error(web.HTTPNotFound, f"There is no group {group_id!r} (or its history has expired).")
        return ids

    async with streams.opened(request, known_members, group=group_id) as stream:
        ids = stream.ids
        start = await stream.start(replay=False)  # the aggregate is a state: it starts from the current one
        latest: dict[str, Frame] = {t.task_id: t.frames[-1] for t in start.tasks if t.known}

        def ended() -> bool:
            return len(latest) == len(ids) and all(f.terminal for f in latest.values())

        def covered(frame: Frame) -> bool:
            at = start.base.get(frame.partition)
            return frame.position is None or (at is not None and at.covers(frame.position))

        # The client's cursor is at or past every member's end: it has seen it all.
        if ended() and start.resumed and all(covered(f) for f in latest.values()):
            return web.Response(status=204)

        live = await stream.begin()

        def newest(frames: list[Frame]) -> Frame | None:
            """The last of `frames` (as sent) that has an id: the aggregate made from
            them is as of it, and the group frame carries its id."""
            return next((f for f in reversed(frames) if f.id), None)

        first = live.stamped(start.frames(), {})
        latest = {member.task_id: member for member in first}
        last = newest(first)

        def frame(changed: Frame | None) -> bytes:
            body = aggregate(group_id, {t: f.payload() for t, f in latest.items()}, len(ids))
            return encode_sse(id=changed.id if changed else None, event="group", data=dumps(body))

        missing = [t.task_id for t in start.tasks if not t.known]
        head = reset_frame(start.reset, missing) if start.reset else b""
        await live.write(stream.greeting + head + frame(last))
        every = frozenset(ids)  # looked up for every frame: a set, not a list
        if not ended():
            async with contextlib.aclosing(live.batches(lambda: every, start.upto)) as batches:
                async for batch in batches:
                    if batch.notices:
                        await live.write(batch.notices)
                    if batch.head:  # started over: the aggregate is made again from current states
                        latest = {member.task_id: member for member in batch.frames}
                        await live.write(batch.head + frame(newest(batch.frames)))
                        if ended():
                            break
                        continue
                    # Fold the members' frames into the aggregate; a member that has
                    # ended stays ended (a late frame of it changes nothing).
                    changed: Frame | None = None
                    for member in batch.frames:
                        if not (latest.get(member.task_id) and latest[member.task_id].terminal):
                            latest[member.task_id] = member
                            changed = member
                    if changed:
                        await live.write(frame(changed))
                        if ended():
                            break
        return await stream.end()
    return stream.gone()

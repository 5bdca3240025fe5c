"""Read an SSE response event by event, with the package's own decoder
(src/progress_sse/cli/decoder.py): the suite and `progress-sse watch` parse the
stream one way. Never `await resp.text()` on an open stream."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp

from progress_sse.cli.decoder import SSEDecoder
from progress_sse.cursors import BASE62, Sealed, base62, parse, parse_id
from progress_sse.events import TERMINAL_STATES
from progress_sse.keys import CLUSTER_PARTITIONS


@dataclass
class SSEEvent:
    id: str | None  # the stream's last event id when it came, as EventSource's lastEventId
    event: str | None
    data: str

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_STATES


@dataclass(frozen=True)
class Comment:
    text: str


class SSEReader:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []  # every comment so far, in order
        # Events and comments in the order they came, not yet taken.
        self._items: deque[SSEEvent | Comment] = deque()
        self._decoder = SSEDecoder(on_comment=self._comment)
        self._ended = False

    def _comment(self, text: str) -> None:
        self.comments.append(text)
        self._items.append(Comment(text))

    async def _next(self) -> SSEEvent | Comment | None:
        """The next event or comment; None at the end of the stream."""
        while not self._items:
            if self._ended:
                return None
            chunk = await self.response.content.readany()
            if not chunk:
                self._ended = True
                continue
            for frame in self._decoder.feed(chunk):
                self._items.append(SSEEvent(frame.id, frame.event, frame.data))
        return self._items.popleft()

    async def next_event(self, timeout: float = 15) -> SSEEvent | None:
        """The next event (comments skipped); None when the stream ends."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self._next()
                if not isinstance(item, Comment):
                    return item

    async def next_comment(self, timeout: float = 15) -> str:
        """The next comment (events skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self._next()
                assert item is not None, "stream ended before a comment"
                if isinstance(item, Comment):
                    return item.text

    async def until(self, predicate: Any, timeout: float = 30) -> list[SSEEvent]:
        """Events up to and including the first that satisfies `predicate`."""
        events: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next_event(timeout)
                assert event is not None, f"stream ended before the expected event; got {[e.event for e in events]}"
                events.append(event)
                if predicate(event):
                    return events

    @property
    def cursor(self) -> str | None:
        """The stream's last event id so far, as EventSource's: an `id:` alone moves it too."""
        return self._decoder.last_event_id

    async def cursor_moves(self, predicate: Any, timeout: float = 30) -> str:
        """Read until the stream's last event id satisfies `predicate` (events that
        come meanwhile are kept for next_event); that id."""
        async with asyncio.timeout(timeout):
            while not predicate(self.cursor):
                chunk = await self.response.content.readany()
                assert chunk, "the stream ended"
                for frame in self._decoder.feed(chunk):
                    self._items.append(SSEEvent(frame.id, frame.event, frame.data))
        return str(self.cursor)

    async def rest(self, timeout: float = 30) -> list[SSEEvent]:
        """Every event until the server ends the stream."""
        events: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while (event := await self.next_event(timeout)) is not None:
                events.append(event)
        return events


def numbers(events: list[SSEEvent]) -> list[int]:
    """The events' places in their stream (`order`), once it is checked that ids of
    one Redis belong to one history."""
    ids = [str(e.id) for e in events]
    epochs = {parse_id(i).epoch for i in ids if "-" in i}
    assert len(epochs) <= 1, f"ids of more than one history: {ids}"
    return [order(i) for i in ids]


def composite(event_id: str) -> Sealed:
    """A cluster's id (`<digest>.<p><n>…`, src/progress_sse/cursors.py), parsed."""
    sealed = parse(event_id, partitions=CLUSTER_PARTITIONS)
    assert isinstance(sealed, Sealed), f"not a composite id: {event_id!r}"
    return sealed


def order(event_id: str | None) -> int:
    """Where an id puts its event in its stream: `n` of a Redis's `<epoch>-<n>`; of a
    cluster's composite id, the sum of its numbers, which every frame a stream sends
    moves on (each number in it only grows)."""
    raw = str(event_id)
    if "-" in raw:
        return parse_id(raw).n
    return sum(n for _, n in composite(raw).numbers)


def own(event_id: str | None) -> tuple[int, int]:
    """The partition and number of the event an id came with: the same on every
    stream that sends the event (a cluster's ids differ between streams, by the
    other partitions they name; their first entry is the event's own)."""
    raw = str(event_id)
    if "-" in raw:
        return 0, parse_id(raw).n
    partition = BASE62.index(raw.split(".")[1][0])  # the lead entry's
    return partition, dict(composite(raw).numbers)[partition]


def covered(cursor: str, partition: int) -> int:
    """The number up to which `cursor` has had `partition`'s events (0: none)."""
    if "-" in cursor:
        return parse_id(cursor).n
    return dict(composite(cursor).numbers).get(partition, 0)


def beyond(event_id: str, by: int) -> str:
    """`event_id` moved `by` past where its history is now: a cursor from the future."""
    if "-" in event_id:
        at = parse_id(event_id)
        return f"{at.epoch}-{at.n + by}"
    sealed = composite(event_id)
    return sealed.digest + "".join(f".{BASE62[p]}{base62(n + by)}" for p, n in sealed.numbers)


async def follow(
    session: aiohttp.ClientSession, url: str, tasks: list[str], *, cursor: str | None = None, timeout: float = 90
) -> list[SSEEvent]:
    """Every frame of a stream as an EventSource gets them: when the stream breaks
    or ends before each of `tasks` has ended, reconnect with the last id (after
    0.2 s, its retry delay: the client's manners, not a wait for anything). A
    stream that never ends on its own (the feed) is left once they have."""
    frames: list[SSEEvent] = []
    ended: set[str] = set()
    async with asyncio.timeout(timeout):
        while not ended >= set(tasks):
            headers = {"Last-Event-ID": cursor} if cursor else {}
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status == 204:
                        break
                    if resp.status == 200:
                        reader = SSEReader(resp)
                        while (event := await reader.next_event(timeout)) is not None:
                            frames.append(event)
                            cursor = event.id or cursor
                            if event.terminal:
                                ended.add(event.payload["task_id"])
                                if ended >= set(tasks):
                                    break
            except (aiohttp.ClientError, ConnectionError):
                pass
            if not ended >= set(tasks):
                await asyncio.sleep(0.2)
    return frames

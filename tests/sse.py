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
from progress_sse.cursors import parse_id
from progress_sse.events import TERMINAL_STATES


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

    async def rest(self, timeout: float = 30) -> list[SSEEvent]:
        """Every event until the server ends the stream."""
        events: list[SSEEvent] = []
        async with asyncio.timeout(timeout):
            while (event := await self.next_event(timeout)) is not None:
                events.append(event)
        return events


def numbers(events: list[SSEEvent]) -> list[int]:
    """The events' cursor numbers, once it is checked they belong to one history."""
    found = [parse_id(str(e.id)) for e in events]
    assert len({p.epoch for p in found}) <= 1, f"ids of more than one history: {found}"
    return [p.n for p in found]


async def follow(
    session: aiohttp.ClientSession, url: str, tasks: list[str], *, cursor: str | None = None, timeout: float = 90
) -> list[SSEEvent]:
    """Every frame of a stream as an EventSource gets them: when the stream breaks
    or ends before each of `tasks` has ended, reconnect with the last id (after
    0.2 s, its retry delay: the client's manners, not a wait for anything)."""
    frames: list[SSEEvent] = []
    ended: set[str] = set()
    async with asyncio.timeout(timeout):
        while ended != set(tasks):
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
            except (aiohttp.ClientError, ConnectionError):
                pass
            if ended != set(tasks):
                await asyncio.sleep(0.2)
    return frames
